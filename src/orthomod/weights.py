"""Which layers are weight layers, and the filter matrix ``V`` of each (docs/METHOD-NOTES.md, Weight layers).

One definition for the initializers, the regularizers, the modulator and the diagnostics:

- weight layers are ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` and ``nn.Linear``;
- ``V`` has one row per output channel holding every weight that produces it, **per conv
  group**: ``(groups, C_out / groups, f_in)`` with ``f_in = C_in / groups * prod(kernel)``.
  For a conv (weight ``(C_out, C_in/g, k...)``) row ``o`` is ``W[o]``; for a transposed conv
  (weight ``(C_in, C_out/g, k...)``) it is ``W[:, o]`` of its group. Writing each filter over
  all ``C_in`` inputs, with zeros outside its group, gives a block-diagonal matrix whose
  ``V V^T - I`` is block-diagonal too: the per-group penalty *is* the penalty of the whole layer.

Every consumer takes ``filter=``: a predicate ``filter(name, module) -> bool`` or a list of
module types, applied to the weight layers (it narrows, never widens, the selection). What a
consumer leaves out is said: modules holding a matrix-shaped parameter that no consumer handles
(``nn.Embedding``, ``nn.MultiheadAttention``, ...) get a warning; weight layers left out by the
filter or by the consumer's default get a line on the ``orthomod`` logger.

    >>> conv = torch.nn.Conv2d(8, 8, 3, groups=4)     # weight (8, 2, 3, 3)
    >>> filter_matrices(conv.weight, groups=4).shape    # 4 groups of 2 filters over 2 x 3 x 3 inputs
    torch.Size([4, 2, 18])
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["CONV_TYPES", "CONV_TRANSPOSE_TYPES", "WEIGHT_LAYER_TYPES", "is_weight_layer", "weight_layers",
           "distinct_weights", "geometry", "filter_matrices", "weight_from_filters", "plain_weight", "LayerFilter"]

log = logging.getLogger("orthomod")

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
WEIGHT_LAYER_TYPES = CONV_TYPES + CONV_TRANSPOSE_TYPES + (nn.Linear,)

LayerFilter = Callable[[str, nn.Module], bool] | Sequence[type] | None


def is_weight_layer(module: nn.Module) -> bool:
    """Conv, transposed conv or Linear: the layers every part of orthomod acts on."""
    return isinstance(module, WEIGHT_LAYER_TYPES)


def _accepts(filter: LayerFilter) -> Callable[[str, nn.Module], bool]:
    if filter is None:
        return lambda name, module: True
    if callable(filter) and not isinstance(filter, type):
        return filter
    if isinstance(filter, (str, bytes)) or not isinstance(filter, (type, Sequence, set, frozenset)):
        raise ValueError(f"filter must be a predicate (name, module) -> bool or a list of module types, got {filter!r}")
    types = tuple(filter) if not isinstance(filter, type) else (filter,)
    for t in types:
        if not (isinstance(t, type) and issubclass(t, WEIGHT_LAYER_TYPES)):
            name = getattr(t, "__name__", repr(t))
            raise ValueError(f"filter names {name}, which is not a weight layer orthomod handles; "
                             "allowed: Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear and their subclasses")
    return lambda name, module: isinstance(module, types)


def weight_layers(model: nn.Module, filter: LayerFilter = None, default: tuple[type, ...] = WEIGHT_LAYER_TYPES,
                  user: str = "orthomod") -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the weight layers of ``model`` (module order) of the ``default`` types
    that ``filter`` accepts (``filter`` given: it alone decides among all weight layers).

    ``user`` names the consumer in what is said about the layers it leaves out (see the module
    docstring). The model itself counts as a layer when it is one (its name is ``""``).
    """
    accepts = _accepts(filter)
    chosen, left_out, unknown = [], [], []
    inside_parametrizations = {id(m) for p in model.modules() if isinstance(p, parametrize.ParametrizationList)
                               for m in p.modules()}  # a parametrized weight's originals belong to its layer
    for name, module in model.named_modules():
        if id(module) in inside_parametrizations:
            continue
        if is_weight_layer(module):
            wanted = accepts(name, module) if filter is not None else isinstance(module, default)
            (chosen if wanted else left_out).append((name, module))
        elif any(not nn.parameter.is_lazy(p) and p.dim() >= 2 for p in module.parameters(recurse=False)):
            unknown.append((name, module))
    if unknown:
        warnings.warn(f"{user} leaves out {len(unknown)} module(s) with matrix-shaped parameters it does not "
                      f"handle: {_names(unknown)}", stacklevel=3)
    if left_out:
        reason = "the filter" if filter is not None else "its default"
        log.info("%s: %s leaves out %s", user, reason, _names(left_out))
    return chosen


def _names(layers: list[tuple[str, nn.Module]]) -> str:
    shown = ", ".join(f"{name or '<model>'!r} ({type(m).__name__})" for name, m in layers[:8])
    return shown + (f" and {len(layers) - 8} more" if len(layers) > 8 else "")


def distinct_weights(named: list[tuple[str, nn.Module]], user: str,
                     layout: Callable[[nn.Module], tuple] | None = None) -> list[tuple[str, nn.Module]]:
    """``named`` without the layers whose weight an earlier layer holds too (tied weights).

    A shared weight is one weight: the initializers and regularizers take it once, at its first
    layer (summing a penalty per layer would count it twice). Layers that lay the shared tensor
    out differently (``layout``, by default :func:`geometry`: a conv and a transposed conv,
    different groups) give it no single ``V``: a ValueError names both."""
    layout = layout or geometry
    first: dict[int, tuple[str, nn.Module]] = {}
    distinct = []
    for name, module in named:
        weight = module._parameters.get("weight")  # None: parametrized, for plain_weight to refuse by name
        key = id(weight if weight is not None else module)
        if key not in first:
            first[key] = (name, module)
            distinct.append((name, module))
            continue
        earlier, other = first[key]
        if layout(other) != layout(module):
            raise ValueError(f"{user}: layers {earlier or '<model>'!r} ({type(other).__name__}) and {name or '<model>'!r} "
                             f"({type(module).__name__}) share one weight but lay it out differently "
                             f"({layout(other)} against {layout(module)}), so it has no single V; leave one out "
                             "with filter=")
        log.info("%s: layer %r shares its weight with %r: taken once", user, name or "<model>", earlier or "<model>")
    return distinct


def geometry(module: nn.Module) -> tuple[int, bool]:
    """``(groups, transposed)`` of a weight layer."""
    return getattr(module, "groups", 1), isinstance(module, CONV_TRANSPOSE_TYPES)


def plain_weight(name: str, module: nn.Module, user: str) -> torch.Tensor:
    """The layer's weight if it is an ordinary parameter; a ValueError naming the layer if it is
    computed (``torch.nn.utils.parametrize`` or the older hook-based ``weight_norm``/``spectral_norm``)
    or not made yet (a lazy module before its first forward pass)."""
    label = name or "<model>"
    if nn.parameter.is_lazy(module._parameters.get("weight")):
        raise ValueError(f"{user}: layer {label!r} ({type(module).__name__}) has no weight yet: a lazy module makes it "
                         f"in its first forward pass; run the model once on a batch, then {user}")
    if parametrize.is_parametrized(module, "weight"):
        kind = type(module.parametrizations.weight[0]).__name__
        raise ValueError(f"{user}: layer {label!r} has a parametrized weight ({kind}), which {user} would not act on "
                         f"exactly; apply {user} before registering the parametrization, or leave the layer out "
                         "with filter=")
    if not isinstance(module._parameters.get("weight"), torch.Tensor):
        raise ValueError(f"{user}: layer {label!r} computes its weight in a forward pre-hook (the deprecated "
                         "torch.nn.utils.weight_norm/spectral_norm); use torch.nn.utils.parametrizations and apply "
                         f"{user} first, or leave the layer out with filter=")
    return module.weight


def filter_matrices(weight: torch.Tensor, groups: int = 1, transposed: bool = False) -> torch.Tensor:
    """``V`` of a weight: ``(groups, f_out, f_in)``, one filter per row (a view where the layout
    allows it: ungrouped or grouped convs and linear layers; a copy for transposed convs)."""
    if transposed:
        c_in, per_group = weight.shape[:2]
        v = weight.reshape(groups, c_in // groups, per_group, -1).transpose(1, 2)
        return v.reshape(groups, per_group, -1)
    return weight.reshape(groups, weight.shape[0] // groups, -1)


def weight_from_filters(v: torch.Tensor, shape: tuple[int, ...] | torch.Size, transposed: bool = False) -> torch.Tensor:
    """The inverse of :func:`filter_matrices`: ``V`` (or a gradient with respect to it) in the
    weight's own layout ``shape``."""
    if transposed:
        groups, per_group = v.shape[:2]
        c_in = shape[0]
        v = v.reshape(groups, per_group, c_in // groups, -1).transpose(1, 2)
    return v.reshape(shape)
