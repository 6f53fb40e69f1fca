"""Run-folder files: atomic writes, checked reads, and a lock that keeps one process per folder.

Each write goes to a temporary file of a name no other process uses, in the same folder, is
flushed to disk, then renamed over the target (``os.replace`` is atomic on POSIX and Windows):
a file is either its old version or its complete new one, never half of one. A failed write
leaves no temporary file behind.

:class:`RunLock` holds an OS lock (``flock``) on ``<run>/.lock`` while a process trains in the
folder. The kernel releases it when the process ends, however it ends (kill -9 included), so a
stale lock cannot outlive its process.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from pathlib import Path

import torch

from .errors import OrthomodError

__all__ = ["save_text", "copy_file", "save_json", "load_json", "save_checkpoint", "load_checkpoint", "CheckpointError",
           "RunFolderError", "RunLock", "RunFolder"]


class CheckpointError(OrthomodError):
    """A checkpoint cannot be read; the message names the file and what to do."""


class RunFolderError(OrthomodError):
    """A run folder's file is missing, unreadable or in use; the message names it and what to do."""


def _replace_from_tmp(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _finite_json(value):
    """NaN and inf become strings: strict JSON readers (jq, browsers) reject the bare tokens."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def save_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a reader sees the old file or the new one, never half)."""
    _replace_from_tmp(Path(path), lambda f: f.write(text.encode()))


def copy_file(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` atomically (a reader sees the old file or the whole copy)."""
    with open(source, "rb") as src:
        _replace_from_tmp(Path(target), lambda f: shutil.copyfileobj(src, f))


def save_json(path: Path, payload) -> None:
    save_text(path, json.dumps(_finite_json(payload), indent=2, allow_nan=False) + "\n")


def load_json(path: Path) -> dict:
    """A run folder's JSON object (config.json, summary.json), or a one-line error naming the file."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunFolderError(f"{path} does not exist; is {path.parent} a run folder?") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"cannot read {path} ({getattr(exc, 'strerror', None) or exc})") from None
    except json.JSONDecodeError as exc:
        raise RunFolderError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}); "
                             "restore it from a copy or delete the run folder") from None
    if not isinstance(value, dict):
        raise RunFolderError(f"{path} does not hold a JSON object; restore it from a copy or delete the run folder")
    return value


def save_checkpoint(path: Path, state: dict) -> None:
    _replace_from_tmp(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: Path, map_location="cpu", missing: str = "the run has not written one yet (nothing to resume)"
                    ) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; {missing}")
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


class RunLock:
    """An exclusive lock on a run folder for the life of this object (or its process).

    Where ``fcntl`` does not exist (Windows) no lock is taken.
    """

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"
        self._file = open(self.path, "a+")
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise RunFolderError(f"run folder {folder} is in use by {holder}; wait for it to end, "
                                 "or choose another --name") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"orthomod process {os.getpid()}")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()


class RunFolder:
    """The files of one run folder, read and written here only (the layout: orthomod.train).

    ``config.json`` and ``summary.json`` are JSON objects written atomically; ``metrics.jsonl``
    and ``diagnostics.jsonl`` get one JSON line per record, each with a ``step``; checkpoints are
    ``checkpoint.pt`` and ``best.pt``.
    """

    JSONL = ("metrics.jsonl", "diagnostics.jsonl")

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def is_run(self) -> bool:
        return (self.path / "config.json").is_file()

    # -- JSON objects --------------------------------------------------------------------------
    def config(self) -> dict:
        if not self.is_run():
            raise RunFolderError(f"{self.path} is not a run folder (no config.json); give the folder a run was "
                                 "written to")
        return load_json(self.path / "config.json")

    def summary(self) -> dict | None:
        path = self.path / "summary.json"
        return load_json(path) if path.exists() else None

    def write_config(self, config: dict) -> None:
        save_json(self.path / "config.json", config)

    def write_summary(self, summary: dict) -> None:
        save_json(self.path / "summary.json", summary)

    # -- JSON lines ----------------------------------------------------------------------------
    def append(self, record: dict, name: str = "metrics.jsonl") -> None:
        with open(self.path / name, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self, name: str = "metrics.jsonl") -> list[dict]:
        """The lines of a JSONL file (none if it does not exist); a line cut by a crash is skipped."""
        path = self.path / name
        if not path.exists():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def clear_records(self) -> None:
        for name in self.JSONL:
            (self.path / name).unlink(missing_ok=True)

    def truncate_records(self, step: int) -> None:
        """Drop the lines written after ``step`` (a checkpoint's): a resumed run writes them again."""
        for name in self.JSONL:
            path = self.path / name
            if not path.exists():
                continue
            kept = [json.dumps(r) for r in self.records(name) if isinstance(r, dict) and "step" in r and r["step"] <= step]
            text = "".join(line + "\n" for line in kept)
            _replace_from_tmp(path, lambda f: f.write(text.encode()))

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, state: dict, name: str = "checkpoint.pt") -> None:
        save_checkpoint(self.path / name, state)

    def load_checkpoint(self, name: str = "checkpoint.pt", map_location="cpu", **kw) -> dict:
        return load_checkpoint(self.path / name, map_location=map_location, **kw)
