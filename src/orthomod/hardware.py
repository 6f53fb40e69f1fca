"""Which device and numeric precision a run uses, chosen from the hardware it lands on.

``auto`` (the default of both) picks what is fast *and* native on this machine:

- device: ``cuda`` if a CUDA GPU is visible, else ``mps`` (Apple silicon), else ``cpu``.
- precision: bf16 autocast where bf16 arithmetic is native -- CPUs with AMX or AVX-512-BF16,
  CUDA GPUs of compute capability 8.0 or newer; fp16 autocast with a gradient scaler on older
  CUDA GPUs; fp32 everywhere else. On a CPU without native bf16 PyTorch emulates it, and a
  training step becomes many times slower than in fp32 (docs/PERFORMANCE.md: 12x for plain-20
  on an AVX2-only AMD EPYC). The mps path takes fp32 and is untested.

A precision asked for by name is used as asked where it can run (bf16 on a CPU without native
bf16 runs, emulated, and the reason line says so); fp16 is CUDA only, because its gradient scaler
is what keeps small errors from flushing to zero and this project tests it on CUDA alone.
"""
from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import OrthomodError

__all__ = ["PRECISIONS", "Precision", "HardwareError", "resolve_device", "choose_precision", "cpu_bf16_feature",
           "cpu_model", "deterministic_kernels"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST_DTYPE = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class HardwareError(OrthomodError, ValueError):
    """A device or precision was asked for that this machine cannot run; the message says what to use."""


def resolve_device(name: str) -> torch.device:
    """``auto``: cuda, then mps, then cpu; otherwise the named device, if it is there."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise HardwareError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HardwareError(f"device {name!r} asked for but CUDA is not available here; use --device cpu")
    if device.type == "mps" and not _mps_available():
        raise HardwareError(f"device {name!r} asked for but MPS is not available here; use --device cpu")
    return device


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def cpu_bf16_feature() -> str | None:
    """The CPU feature that makes bf16 native here ("AMX" or "AVX512-BF16"), or None.

    Asks PyTorch's own CPU-feature queries (the ones its kernels dispatch on); an older PyTorch
    without them falls back on the kernel's flags in /proc/cpuinfo (Linux).
    """
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if amx is not None and avx512_bf16 is not None:
        return "AMX" if amx() else "AVX512-BF16" if avx512_bf16() else None
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    return "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None


@dataclass(frozen=True)
class Precision:
    """A run's arithmetic: ``name`` is fp32, bf16 or fp16; ``reason`` says why it was chosen."""

    name: str
    reason: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return _AUTOCAST_DTYPE[self.name]

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
        return self.name == "fp16"

    def autocast(self, device: torch.device):
        """The autocast context of this precision on ``device`` (none for fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)


def choose_precision(requested: str, device: torch.device) -> Precision:
    """Resolve ``auto`` (or check a named precision) for ``device``; see the module docstring."""
    if requested not in PRECISIONS:
        raise HardwareError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}")
    kind = device.type
    if kind == "cuda":
        capability = torch.cuda.get_device_capability(device)
        native = capability >= (8, 0)  # Ampere and newer
        gpu = f"{torch.cuda.get_device_name(device)} (compute capability {'.'.join(map(str, capability))})"
        if requested == "auto":
            if native:
                return Precision("bf16", f"auto: {gpu} has native bf16")
            return Precision("fp16", f"auto: {gpu} has no native bf16; fp16 autocast with a gradient scaler")
        if requested == "bf16" and not native:
            raise HardwareError(f"precision bf16 asked for but {gpu} has no native bf16; use --precision fp16 or auto")
        return Precision(requested, f"asked for, on {gpu}")
    if requested == "fp16":
        raise HardwareError(f"precision fp16 needs a CUDA GPU (its gradient scaler is tested there only); "
                            f"this run is on {kind}: use --precision auto, fp32 or bf16")
    if kind == "mps":
        if requested == "bf16":
            raise HardwareError("precision bf16 on mps is not supported by orthomod (untested); use --precision fp32 or auto")
        return Precision("fp32", "mps: fp32 (the mps path is untested)")
    capability = torch.backends.cpu.get_cpu_capability()
    feature = cpu_bf16_feature()
    if requested == "auto":
        if feature is not None:
            return Precision("bf16", f"auto: this CPU has {feature}, so bf16 is native")
        return Precision("fp32", f"auto: this CPU ({capability}) has no native bf16; emulated bf16 would be many times slower")
    if requested == "bf16" and feature is None:
        return Precision("bf16", f"asked for; this CPU ({capability}) has no native bf16: emulated, expect it "
                                 f"many times slower than --precision fp32")
    return Precision(requested, "asked for")


@contextlib.contextmanager
def deterministic_kernels(on: bool = True):
    """Deterministic kernels inside the block, PyTorch's previous settings after it.

    ``torch.use_deterministic_algorithms`` with ``warn_only`` (an op that has no deterministic
    version warns, naming itself, rather than stopping the run), cuDNN's deterministic algorithms
    without autotuning, and cuBLAS's fixed workspace (``CUBLAS_WORKSPACE_CONFIG``, read when the
    process first uses cuBLAS: enter before that). On a GPU, runs then repeat bit for bit, at some
    cost in speed; CPU runs of this project repeat already (same threads, same results).
    """
    if not on:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def cpu_model() -> str:
    """The CPU's model name, with its family and model numbers (a VM's name alone, "AMD EPYC", does
    not tell Zen 3 from Zen 4), for the record beside every timing."""
    fields = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    numbers = (f" (family {fields['cpu family']} model {fields['model']})"
               if "cpu family" in fields and "model" in fields else "")
    return fields["model name"] + numbers
