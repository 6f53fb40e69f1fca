"""Layers from other work on deep plain nets: SReLU (ISONet), CReLU (looks-linear nets) and the
Dirac parametrization (DiracNets).

SReLU (Qi et al. 2020, "Deep Isometric Learning for Visual Recognition"): ``relu(x - b) + b``
with a learnable per-channel ``b``, started at -1; ``b = 0`` is ReLU, and a very negative ``b``
makes it the identity on the inputs it sees, so a net starts close to linear (isometric).

CReLU (Shang et al. 2016; Balduzzi et al. 2017 for deep plain nets): ``[relu(x), relu(-x)]``
along the channels, twice as many channels out as in. A layer it feeds, started by
:func:`orthomod.init.looks_linear_` as ``[W0, -W0]``, computes ``W0 x``: the net starts linear.

Dirac parametrization (Zagoruyko & Komodakis 2017, "DiracNets"): each conv's weight is

    W_eff = diag(a) delta + diag(b) W_hat,   W_hat = W / ||W|| per output filter,

with learnable per-output-channel ``a`` (started at 1) and ``b`` (started at 0.1) and ``delta``
the identity kernel (:func:`orthomod.init.dirac_delta`). It is a ``torch.nn.utils.parametrize``
parametrization, so the conv stays an ordinary ``nn.Conv2d`` whose ``weight`` is computed;
:func:`fold_` replaces it by the computed tensor, leaving a plain net with identical outputs.

    >>> conv = torch.nn.Conv2d(16, 32, 3, padding=1, bias=False)
    >>> _ = dirac_parametrize_(conv)
    >>> x = torch.randn(2, 16, 8, 8)
    >>> before = conv(x)
    >>> torch.allclose(fold_(conv)(x), before, atol=1e-6)
    True
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .init import dirac_delta
from .weights import CONV_TYPES, weight_layers

__all__ = ["SReLU", "CReLU", "DiracParametrization", "dirac_parametrize_", "fold_", "is_dirac_parametrized"]


class SReLU(nn.Module):
    """``relu(x - b) + b`` with one learnable ``b`` per channel (dimension 1), started at ``init``."""

    def __init__(self, channels: int, init: float = -1.0):
        super().__init__()
        self.bias = nn.Parameter(torch.full((channels,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias.view((1, -1) + (1,) * (x.dim() - 2))
        return torch.relu(x - b) + b

    def extra_repr(self) -> str:
        return f"{self.bias.numel()}"


class CReLU(nn.Module):
    """``[relu(x), relu(-x)]`` concatenated along dimension 1: twice the channels of ``x``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.cat((x, -x), dim=1))


class DiracParametrization(nn.Module):
    """``diag(a) delta + diag(b) W / ||W||`` (per output filter) for a conv weight of ``shape``."""

    def __init__(self, shape: tuple[int, ...], alpha: float = 1.0, beta: float = 0.1, dtype=torch.float32):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((shape[0],), float(alpha), dtype=dtype))
        self.beta = nn.Parameter(torch.full((shape[0],), float(beta), dtype=dtype))
        self.register_buffer("delta", dirac_delta(tuple(shape), dtype))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        per_filter = (-1,) + (1,) * (weight.dim() - 1)
        direction = F.normalize(weight.flatten(1), dim=1).view_as(weight)
        return self.alpha.view(per_filter) * self.delta + self.beta.view(per_filter) * direction


def _convs(model: nn.Module):
    return weight_layers(model, default=CONV_TYPES, user="dirac_parametrize_")


def dirac_parametrize_(model: nn.Module, alpha: float = 1.0, beta: float = 0.1) -> nn.Module:
    """Give every Conv1d/2d/3d of ``model`` the Dirac parametrization; return ``model``.

    Build the optimizer afterwards: ``a``, ``b`` and the raw ``W`` (at
    ``conv.parametrizations.weight.original``) are the trained parameters. A grouped conv or an
    even kernel raises a ``ValueError`` naming the layer.
    """
    convs = _convs(model)
    if not convs:
        raise ValueError("dirac_parametrize_ found no Conv1d/2d/3d layer in the model")
    for name, conv in convs:
        if conv.groups != 1:
            raise ValueError(f"the Dirac parametrization is defined for ungrouped convs; layer {name or 'model'!r} "
                             f"has groups={conv.groups}")
        if parametrize.is_parametrized(conv, "weight"):
            raise ValueError(f"layer {name or 'model'!r} already has a parametrized weight")
        try:
            p = DiracParametrization(tuple(conv.weight.shape), alpha, beta, conv.weight.dtype)
        except ValueError as exc:
            raise ValueError(f"cannot Dirac-parametrize layer {name or 'model'!r}: {exc}") from None
        parametrize.register_parametrization(conv, "weight", p.to(conv.weight.device))
    return model


def is_dirac_parametrized(model: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0],
                                                                       DiracParametrization)
               for _, m in _convs(model))


def fold_(model: nn.Module) -> nn.Module:
    """Replace every Dirac-parametrized weight by the tensor it computes: an ordinary plain net
    with the same outputs (up to float rounding), without ``a``, ``b`` or ``delta``."""
    for _, conv in _convs(model):
        if parametrize.is_parametrized(conv, "weight") and isinstance(conv.parametrizations.weight[0],
                                                                      DiracParametrization):
            parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
    return model
