"""Atomic writes: a file is either its old version or its complete new one, never half of one.

Each write goes to a temporary file in the same folder, is flushed to disk, then renamed over
the target (``os.replace`` is atomic on POSIX and Windows).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

__all__ = ["save_json", "save_checkpoint", "load_checkpoint", "CheckpointError"]


class CheckpointError(Exception):
    """A checkpoint cannot be read; the message names the file and what to do."""


def _replace_from_tmp(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _finite_json(value):
    """NaN and inf become strings: strict JSON readers (jq, browsers) reject the bare tokens."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def save_json(path: Path, payload) -> None:
    text = json.dumps(_finite_json(payload), indent=2, allow_nan=False) + "\n"
    _replace_from_tmp(Path(path), lambda f: f.write(text.encode()))


def save_checkpoint(path: Path, state: dict) -> None:
    _replace_from_tmp(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; the run has not written one yet (nothing to resume)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated, overwritten or foreign file
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not an orthomod checkpoint ({type(exc).__name__}); "
            "delete it to restart the run, or restore it from a copy"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"checkpoint {path} is not an orthomod checkpoint (no model state or step)")
    return state
