"""Weight initializers, in the style of ``torch.nn.init``.

Orthonormal initialization (METHOD.md section 2): a weight of shape ``(f_out, C, kh, kw)``
is viewed as ``V`` of shape ``(f_out, f_in)``, one filter per row, and set so that
``V V^T = I``. When ``f_out > f_in`` no such ``V`` exists, so the rows are split into
consecutive groups of ``f_in`` (the last group holds the remainder) and each group is
orthonormal on its own.

    >>> w = torch.empty(64, 16, 3, 3, dtype=torch.float64)
    >>> v = orthonormal_(w).reshape(64, -1)
    >>> torch.allclose(v @ v.T, torch.eye(64, dtype=torch.float64))
    True
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["orthonormal_", "group_slices", "init_model_", "INIT_SCHEMES"]

INIT_SCHEMES = ("orthonormal", "msra", "default")


def group_slices(f_out: int, f_in: int) -> list[slice]:
    """Row ranges of the orthonormal groups of an ``(f_out, f_in)`` matrix.

    One group when ``f_out <= f_in``; otherwise ``ceil(f_out / f_in)`` consecutive groups of
    ``f_in`` rows, the last holding the remainder (METHOD.md section 2, Decision).
    """
    size = min(f_out, f_in)
    return [slice(start, min(start + size, f_out)) for start in range(0, f_out, size)]


def _check_weight(tensor: torch.Tensor) -> tuple[int, int]:
    if tensor.dim() < 2:
        raise ValueError(
            f"orthonormal weights need at least 2 dimensions (f_out, f_in, ...), got shape {tuple(tensor.shape)}"
        )
    f_out = tensor.shape[0]
    f_in = tensor[0].numel()
    if f_out == 0 or f_in == 0:
        raise ValueError(f"cannot orthonormalize an empty weight of shape {tuple(tensor.shape)}")
    return f_out, f_in


def orthonormal_(
    tensor: torch.Tensor, gain: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Fill ``tensor`` in place with group-wise orthonormal filters, scaled by ``gain``.

    Each group is the Q factor of a Gaussian matrix (with the sign of R's diagonal folded in,
    which makes the draw uniform over orthonormal frames), computed in float64 so that
    ``V V^T = I`` holds to the tensor's precision.
    """
    f_out, f_in = _check_weight(tensor)
    device = generator.device if generator is not None else torch.device("cpu")
    rows = torch.empty(f_out, f_in, dtype=torch.float64)
    for group in group_slices(f_out, f_in):
        k = group.stop - group.start
        gaussian = torch.randn(f_in, k, dtype=torch.float64, device=device, generator=generator).cpu()
        q, r = torch.linalg.qr(gaussian)
        q = q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1.0)
        rows[group] = q.T
    with torch.no_grad():
        tensor.copy_((gain * rows).reshape(tensor.shape))
    return tensor


def _is_weighted_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))


def init_model_(model: nn.Module, scheme: str = "msra", generator: torch.Generator | None = None) -> nn.Module:
    """Initialize every conv/linear/BN layer of ``model`` in place and return it.

    Schemes:
      - ``"orthonormal"``: conv and linear weights by :func:`orthonormal_` (gain 1).
      - ``"msra"``: He normal with ``fan_out`` for convs, as in the ResNet protocol; linear
        layers keep PyTorch's default uniform init.
      - ``"default"``: PyTorch's own ``reset_parameters``.
    In every scheme biases are zero and BN starts at ``gamma = 1, beta = 0``.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; choose one of {', '.join(INIT_SCHEMES)}")
    for module in model.modules():
        if _is_weighted_layer(module):
            if scheme == "orthonormal":
                orthonormal_(module.weight, generator=generator)
            elif scheme == "msra" and not isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            else:
                module.reset_parameters()
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_parameters()
    return model

