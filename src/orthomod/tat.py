"""TAT (Zhang et al. 2022, "Deep Learning without Shortcuts: Shaping the Kernel with Tailored
Rectifiers") through the ``dks`` package (Martens et al.), an optional dependency:
``pip install "orthomod[tat]"``.

TAT replaces each ReLU of a plain net *without* normalization layers by a leaky ReLU whose
slope and scale are chosen, for the net's depth, so that the whole network's kernel ("C map")
maps correlation 0 to ``eta`` (0.9 by default, the paper's value), and so that each layer
preserves the mean square of its input. The weights start from the scaled-uniform-orthogonal
"delta" distribution of the DKS paper.

``dks`` writes conv weights as ``[in, out, k...]`` and dense weights as ``[in, out]``, while
PyTorch's are ``[out, in, k...]`` and ``[out, in]``: :func:`suo_delta_` hands dks a transposed
view of the weight (which dks fills in place), so the rescaling ``max(sqrt(out / in), 1)``
uses the right widths. Tested: a conv or linear layer so initialized preserves the mean square
of any input exactly, and dks's function applied to PyTorch's layout directly does not.

Our plain nets are treated as a chain of ``depth - 1`` activations for the C map (global
average pooling and the classifier are linear and come last); inputs are the per-pixel
normalized images, not DKS's per-location normalization. Both are choices, see
docs/METHOD-NOTES.md.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .weights import geometry, is_weight_layer, plain_weight

__all__ = ["TATActivation", "suo_delta_", "init_tat_"]


def _dks():
    try:
        from dks.pytorch import activation_transform, parameter_sampling_functions
    except ImportError as exc:
        raise ImportError(f"TAT needs the dks package ({exc}); install it with: pip install \"orthomod[tat]\"") from None
    return activation_transform, parameter_sampling_functions


def suo_delta_(weight: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """DKS's scaled-uniform-orthogonal delta init of a PyTorch conv or linear weight, in place."""
    if weight.dim() < 2:
        raise ValueError(f"suo_delta_ takes a conv or linear weight, got shape {tuple(weight.shape)}")
    _, sampling = _dks()
    with warnings.catch_warnings():
        # dks indexes the centre tap with a list, which torch warns it may one day read as a tensor
        # index; torch 2.13 still reads it as a tuple, and tests/test_tat.py checks the result
        warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
        sampling.scaled_uniform_orthogonal_(weight.detach().transpose(0, 1), gain=gain, delta=True)
    return weight


class TATActivation(nn.Module):
    """The TAT-transformed leaky ReLU for a chain of ``depth`` activations (no parameters)."""

    def __init__(self, depth: int, eta: float = 0.9):
        super().__init__()
        if depth < 1 or not 0 < eta < 1:
            raise ValueError(f"TAT needs depth >= 1 and 0 < eta < 1, got depth {depth} and eta {eta}")
        transform, _ = _dks()

        def chain(x, r_fn):  # the subnetwork maximizing function of a plain chain: r applied depth times
            for _ in range(depth):
                x = r_fn(x)
            return x

        self.depth, self.eta = depth, eta
        try:
            self.fn = transform.get_transformed_activations(["leaky_relu"], method="TAT",
                                                            tat_params={"c_val_0_target": eta},
                                                            subnet_max_func=chain)["leaky_relu"]
        except ValueError as exc:  # dks: the target is out of reach for so few layers
            raise ValueError(f"TAT cannot make a chain of {depth} leaky ReLUs map correlation 0 to {eta} "
                             f"({str(exc).split('.')[0]}); use a deeper net") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return f"depth={self.depth}, eta={self.eta}"


def init_tat_(model: nn.Module) -> nn.Module:
    """:func:`suo_delta_` on every conv and linear weight, zero biases; BN layers, grouped and
    transposed convs and parametrized weights are refused with an error naming the layer."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"TAT is for nets without normalization layers; layer {name!r} is {type(module).__name__}")
        if is_weight_layer(module):
            if getattr(module, "groups", 1) != 1:  # SUO draws one orthogonal matrix per layer
                raise ValueError(f"TAT's init is defined for ungrouped convs; layer {name!r} has groups={module.groups}")
            if geometry(module)[1]:
                raise ValueError(f"TAT's init is defined for convs and linear layers; layer {name!r} is "
                                 f"{type(module).__name__}")
            try:
                suo_delta_(plain_weight(name, module, "init_tat_"))
            except ValueError as exc:
                raise ValueError(f"cannot initialize layer {name!r} for TAT: {exc}") from None
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model
