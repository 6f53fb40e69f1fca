"""The orthonormality regularizer that replaces L2 weight decay (docs/METHOD-NOTES.md, Orthonormality regularizer).

    R(V_1..V_D) = (lambda / 2) * sum_l ||V_l V_l^T - I||_F^2,   dR/dV = 2 lambda (V V^T - I) V

group-wise when ``f_out > f_in`` (see :func:`orthomod.init.group_slices`). Two equivalent ways
to use it:

- :meth:`OrthonormalRegularizer.add_grad_` adds ``dR/dV`` to each ``.grad`` between
  ``loss.backward()`` and ``optimizer.step()``, exactly where coupled weight decay would act,
  so it composes with every ``torch.optim`` optimizer. No autograd graph; weights of the same
  shape are processed in one batched matmul.
- :meth:`OrthonormalRegularizer.loss` returns ``R`` as a differentiable term to add to the
  loss (slower: it builds a graph through every weight).

    >>> model = torch.nn.Conv2d(16, 32, 3, bias=False)
    >>> reg = OrthonormalRegularizer(model, coeff=1e-4)
    >>> model(torch.randn(2, 16, 8, 8)).square().mean().backward()
    >>> reg.add_grad_()            # then optimizer.step()

With other optimizers and a clipped or scaled loss (README, "In your own training loop"): AdamW's
decoupled decay (default 0.01) would stack on ``R``, so the regularized weights get none; with a
``GradScaler``, ``add_grad_`` comes after ``scaler.unscale_``; clipping before it leaves ``R``'s
gradient unclipped, as coupled weight decay is.

    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> reg = OrthonormalRegularizer(net)
    >>> regularized = {id(p) for p in reg.params}
    >>> others = [p for p in net.parameters() if id(p) not in regularized]
    >>> opt = torch.optim.AdamW([{"params": reg.params, "weight_decay": 0.0},
    ...                          {"params": others, "weight_decay": 0.0}], lr=1e-3)
    >>> net(torch.randn(2, 3, 8, 8)).square().mean().backward()
    >>> _ = torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=1.0)
    >>> reg.add_grad_()
    >>> opt.step()
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .init import check_weight
from .weights import (LayerFilter, filter_matrices, geometry, plain_weight, distinct_weights, weight_from_filters,
                      weight_layers)

__all__ = ["orthonormal_penalty", "OrthonormalRegularizer", "split_decay_parameters", "SRIPRegularizer",
           "conv_orthogonality_penalty", "ConvOrthogonalityRegularizer", "make_regularizer", "REGULARIZERS",
           "DEFAULT_COEFF"]


def _without_autocast(tensors: Iterable[torch.Tensor]) -> contextlib.ExitStack:
    """Autocast off on the tensors' devices: the regularizers compute in the weights' own dtype.
    Called inside an autocast region (a training step written in one), ``V V^T - I`` of a nearly
    orthonormal ``V`` would be computed in bf16/fp16 and lost to rounding (35-78% off on plain-8)."""
    stack = contextlib.ExitStack()
    for device_type in sorted({t.device.type for t in tensors}):
        stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def _outside_autocast(method):
    """A regularizer method run with autocast off on its weights' devices."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with _without_autocast(self.params):
            return method(self, *args, **kwargs)
    return run


def _group_blocks(v: torch.Tensor) -> list[torch.Tensor]:
    """Split a batch of matrices ``(P, f_out, f_in)`` into batches of orthonormal groups.

    Returns one or two tensors of shape ``(B, k, f_in)``: the full groups (``k = min(f_out,
    f_in)``) and, when ``f_in`` does not divide ``f_out``, the remainder groups.
    """
    p, f_out, f_in = v.shape
    size = min(f_out, f_in)
    n_full = f_out // size
    blocks = [v[:, : n_full * size].reshape(p * n_full, size, f_in)]
    if f_out > n_full * size:
        blocks.append(v[:, n_full * size :])
    return blocks


def _residual(block: torch.Tensor) -> torch.Tensor:
    """``V V^T - I`` for a batch of groups ``(B, k, f_in)``."""
    gram = torch.bmm(block, block.transpose(1, 2))
    return gram - torch.eye(block.shape[1], dtype=block.dtype, device=block.device)


def orthonormal_penalty(weight: torch.Tensor, groups: int = 1, transposed: bool = False) -> torch.Tensor:
    """``sum over groups of ||V V^T - I||_F^2`` for one weight (no lambda); differentiable.
    ``groups`` and ``transposed`` as in :func:`orthomod.weights.filter_matrices`: a depthwise conv
    whose every filter has unit norm has penalty 0.

    >>> from orthomod.init import orthonormal_
    >>> w = orthonormal_(torch.empty(8, 4, 3, 3, dtype=torch.float64))
    >>> float(orthonormal_penalty(w)) < 1e-20
    True
    >>> depthwise = torch.nn.functional.normalize(torch.randn(16, 1 * 9), dim=1).reshape(16, 1, 3, 3)
    >>> float(orthonormal_penalty(depthwise, groups=16)) < 1e-12
    True
    """
    check_weight(weight)
    v = filter_matrices(weight, groups, transposed)
    with _without_autocast([weight]):
        return sum(_residual(block).square().sum() for block in _group_blocks(v))


class _Weight:
    """A regularized weight with its layer's conv groups and layout."""

    __slots__ = ("tensor", "groups", "transposed")

    def __init__(self, tensor: torch.Tensor, groups: int = 1, transposed: bool = False):
        self.tensor, self.groups, self.transposed = tensor, groups, transposed


def _weights_of(module_or_params: nn.Module | Iterable[torch.Tensor], filter: LayerFilter = None,
                user: str = "OrthonormalRegularizer") -> list[_Weight]:
    """The weights of a model's weight layers (parametrized ones refused by name), or the given tensors."""
    if isinstance(module_or_params, nn.Module):
        named = distinct_weights(weight_layers(module_or_params, filter, user=user), user)
        return [_Weight(plain_weight(name, m, user), *geometry(m)) for name, m in named]
    if filter is not None:
        raise ValueError(f"{user}: filter= selects layers of a model; with a list of weights, pass only those wanted")
    params = list(module_or_params)
    for p in params:
        if not isinstance(p, torch.Tensor) or p.dim() < 2:
            shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(
                f"{user} takes weights with at least 2 dimensions, got {shape}; "
                "pass the model itself to collect its conv/linear weights"
            )
    if len({id(p) for p in params}) < len(params):
        raise ValueError(f"{user}: a weight appears more than once in the weights given; pass each tensor once")
    return [_Weight(p) for p in params]


class OrthonormalRegularizer:
    """``R = coeff/2 * sum_l ||V_l V_l^T - I||_F^2`` over the conv/linear weights given.

    Args:
        module_or_params: a model (the weights of its weight layers, :mod:`orthomod.weights`:
            convs, transposed convs and linear layers, ``V`` per conv group; BN and biases are
            not taken) or an iterable of weight tensors (each an ungrouped conv or linear weight).
        coeff: ``lambda``; the paper uses the weight-decay value, 1e-4 on CIFAR-10.
        filter: which of the model's weight layers to take (:mod:`orthomod.weights`).
    """

    def __init__(self, module_or_params: nn.Module | Iterable[torch.Tensor], coeff: float = 1e-4,
                 filter: LayerFilter = None):
        if not coeff >= 0:
            raise ValueError(f"coeff must be >= 0, got {coeff}")
        self.coeff = float(coeff)
        self._weights = _weights_of(module_or_params, filter, "OrthonormalRegularizer")
        self.params = [w.tensor for w in self._weights]
        if not self.params:
            raise ValueError("OrthonormalRegularizer found no conv or linear weights to regularize")
        for p in self.params:
            check_weight(p)
        # Weights of one shape and layout share a batched matmul; grouping them once here keeps
        # the per-step cost to a few large ops instead of one small op per layer.
        self._buckets: dict[tuple, list[torch.Tensor]] = {}
        for w in self._weights:
            key = (tuple(w.tensor.shape), w.groups, w.transposed, w.tensor.dtype, w.tensor.device)
            self._buckets.setdefault(key, []).append(w.tensor)

    @staticmethod
    def _stacked(params: list[torch.Tensor], groups: int, transposed: bool) -> torch.Tensor:
        """``(P * groups, f_out, f_in)``: every conv group of every weight, one matrix each."""
        v = torch.stack([filter_matrices(p, groups, transposed) for p in params])
        return v.reshape(-1, *v.shape[2:])

    @_outside_autocast
    @torch.no_grad()
    def add_grad_(self) -> None:
        """Add ``coeff * 2 (V V^T - I) V`` to the ``.grad`` of every weight that has one."""
        if self.coeff == 0:
            return
        for (shape, groups, transposed, _, _), params in self._buckets.items():
            params = [p for p in params if p.grad is not None]
            if not params:
                continue
            v = self._stacked(params, groups, transposed)
            grads = [torch.bmm(_residual(block), block) for block in _group_blocks(v)]
            grads[0] = grads[0].reshape(v.shape[0], -1, v.shape[2])
            grad = torch.cat(grads, dim=1) if len(grads) > 1 else grads[0]
            grad.mul_(2.0 * self.coeff)
            grad = grad.reshape(len(params), groups, *grad.shape[1:])
            torch._foreach_add_([p.grad for p in params],
                                [weight_from_filters(g, shape, transposed) for g in grad.unbind(0)])

    @_outside_autocast
    @torch.no_grad()
    def penalty(self) -> torch.Tensor:
        """The value of ``R = coeff/2 * sum_l orthonormal_penalty(V_l)`` (a 0-d tensor, no graph): the
        regularizer's penalty includes its coefficient, the function's does not."""
        return self._value()

    @_outside_autocast
    def loss(self) -> torch.Tensor:
        """``R`` as a differentiable loss term; its gradient equals what :meth:`add_grad_` adds."""
        return self._value()

    def _value(self) -> torch.Tensor:
        total = 0.0
        for (_, groups, transposed, _, _), params in self._buckets.items():
            for block in _group_blocks(self._stacked(params, groups, transposed)):
                total = total + _residual(block).square().sum()
        return 0.5 * self.coeff * total

    @_outside_autocast
    def residuals(self) -> list[float]:
        """``||V V^T - I||_F`` per weight, in the order of :attr:`params` (a diagnostic)."""
        with torch.no_grad():
            return [float(orthonormal_penalty(w.tensor.float(), w.groups, w.transposed).sqrt()) for w in self._weights]

    def state_dict(self) -> dict:
        return {}  # stateless; the method exists so every regularizer checkpoints alike

    def load_state_dict(self, state: dict) -> None:
        pass


def split_decay_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(weights, others)``: conv/linear weights (``dim >= 2``) and the rest (BN, biases).

    The usual split for weight decay: only the first list is decayed, whether by L2 or by the
    orthonormality regularizer (docs/METHOD-NOTES.md, Orthonormality regularizer, Decision).
    """
    weights, others = [], []
    for p in model.parameters():
        if p.requires_grad:
            (weights if p.dim() >= 2 else others).append(p)
    return weights, others


# -- other orthogonality regularizers (docs/METHOD-NOTES.md, "Beyond the paper") -------------------
class SRIPRegularizer:
    """SRIP (Bansal et al. 2018): ``coeff * sum_l sigma(V_l V_l^T - I)``, sigma the spectral norm.

    ``V`` is each conv/linear weight viewed as ``(f_out, f_in)`` (the paper's ``W^T W`` with
    filters as columns); for a grouped conv it is the block-diagonal matrix of its conv groups
    (:mod:`orthomod.weights`), so ``V V^T - I`` is block-diagonal and sigma is the largest over
    the groups. sigma is estimated by power iteration on the symmetric ``A = V V^T - I``;
    unlike the authors' code, which starts from a fixed random vector, the vector is carried from
    step to step (as ``torch.nn.utils.spectral_norm`` does), so ``iterations`` per step refine it
    and it is saved by :meth:`state_dict`. With ``u`` the estimated top eigenvector and
    ``s = sign(u^T A u)``, the gradient is ``2 s coeff u u^T V``, the exact gradient of
    ``coeff * sigma`` once ``u`` has converged.

    >>> reg = SRIPRegularizer(torch.nn.Conv2d(4, 8, 3), coeff=1e-2)
    >>> reg.add_grad_() is None   # needs a .grad: no-op for weights without one
    True
    """

    def __init__(self, module_or_params: nn.Module | Iterable[torch.Tensor], coeff: float = 1e-2,
                 iterations: int = 2, generator: torch.Generator | None = None, filter: LayerFilter = None):
        if not coeff >= 0:
            raise ValueError(f"coeff must be >= 0, got {coeff}")
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        self.coeff, self.iterations = float(coeff), int(iterations)
        self._weights = _weights_of(module_or_params, filter, "SRIPRegularizer")
        self.params = [w.tensor for w in self._weights]
        if not self.params:
            raise ValueError("SRIPRegularizer found no conv or linear weights to regularize")
        self.vectors = []
        for w in self._weights:
            f_out, _ = check_weight(w.tensor)
            rows = w.tensor.shape[1] * w.groups if w.transposed else f_out  # output channels
            u = torch.randn(rows, dtype=w.tensor.dtype, device=w.tensor.device, generator=generator)
            self.vectors.append(u / u.norm())

    @staticmethod
    def _filters(w: _Weight, weight: torch.Tensor) -> torch.Tensor:
        """``V`` of ``weight`` (``w``'s tensor, detached or not) in ``w``'s layout."""
        return filter_matrices(weight, w.groups, w.transposed)

    @staticmethod
    def _times(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``A u`` for the block-diagonal ``A`` given as its blocks ``(groups, f, f)``."""
        return torch.bmm(a, u.view(a.shape[0], -1, 1)).reshape(-1)

    @torch.no_grad()
    def _refine(self, iterations: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Power-iterate every layer's vector; return (u, u^T A u) per layer."""
        out = []
        for i, w in enumerate(self._weights):
            a = _residual(self._filters(w, w.tensor.detach()))
            u = self.vectors[i].to(a.device, a.dtype)  # the model may have moved since (model.cuda(), .double())
            for _ in range(self.iterations if iterations is None else iterations):
                x = self._times(a, u)
                u = x / x.norm().clamp_min(torch.finfo(x.dtype).tiny)
            self.vectors[i] = u
            out.append((u, u @ self._times(a, u)))
        return out

    @_outside_autocast
    @torch.no_grad()
    def add_grad_(self) -> None:
        """Add ``2 s coeff u u^T V`` to the ``.grad`` of every weight that has one (one power
        iteration step of ``iterations`` first)."""
        if self.coeff == 0:
            return
        for w, (u, rayleigh) in zip(self._weights, self._refine()):
            if w.tensor.grad is None:
                continue
            v = self._filters(w, w.tensor.detach())  # (groups, f, f_in); u per group: (groups, f, 1)
            per_group = u.view(v.shape[0], -1, 1)
            grad = (2.0 * self.coeff) * torch.sign(rayleigh) * per_group * torch.bmm(per_group.transpose(1, 2), v)
            w.tensor.grad.add_(weight_from_filters(grad, w.tensor.shape, w.transposed))

    def _sigma(self, w: _Weight, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        u = u.to(weight.device, weight.dtype)
        return (u @ self._times(_residual(self._filters(w, weight)), u)).abs()

    @_outside_autocast
    @torch.no_grad()
    def penalty(self) -> torch.Tensor:
        """``coeff * sum sigma`` with the current estimates (a 0-d tensor; refines nothing)."""
        return self.coeff * sum(self._sigma(w, u, w.tensor.detach()) for w, u in zip(self._weights, self.vectors))

    @_outside_autocast
    def loss(self) -> torch.Tensor:
        """``coeff * sum |u^T A u|`` as a differentiable term (u held fixed): its gradient is what
        :meth:`add_grad_` adds."""
        return self.coeff * sum(self._sigma(w, u, w.tensor) for w, u in zip(self._weights, self.vectors))

    @_outside_autocast
    def residuals(self) -> list[float]:
        """The estimated ``sigma(V V^T - I)`` per weight (a diagnostic)."""
        with torch.no_grad():
            return [float(self._sigma(w, u, w.tensor.detach())) for w, u in zip(self._weights, self.vectors)]

    def state_dict(self) -> dict:
        return {"vectors": [u.clone() for u in self.vectors]}

    def load_state_dict(self, state: dict) -> None:
        vectors = state["vectors"]
        if len(vectors) != len(self.params) or any(v.shape != u.shape for v, u in zip(vectors, self.vectors)):
            raise ValueError("SRIP state does not match these weights (another model?)")
        self.vectors = [v.to(u.device, u.dtype) for v, u in zip(vectors, self.vectors)]


def conv_orthogonality_penalty(weight: torch.Tensor, stride: int | tuple[int, ...] = 1) -> torch.Tensor:
    """``||conv(K, K, stride=S, padding=P) - I_r0||_F^2`` (Wang et al. 2020, OCNN), differentiable.

    ``K`` (``(C_out, C_in, k...)``) is convolved with itself over every spatial shift at which
    two copies overlap (``P = floor((k - 1) / S) * S`` per dimension, the paper's padding); the
    result ``(C_out, C_out, ...)`` must be the identity at the zero shift and 0 elsewhere: the
    conv is then an orthogonal map (rows orthonormal). A linear weight is a 1x1 conv:
    ``||V V^T - I||^2``.
    """
    if weight.dim() == 2:
        weight = weight[:, :, None]
    dims = weight.dim() - 2
    if dims not in (1, 2, 3):
        raise ValueError(f"conv_orthogonality_penalty takes a Linear or Conv1d/2d/3d weight, got shape "
                         f"{tuple(weight.shape)}")
    strides = (stride,) * dims if isinstance(stride, int) else tuple(stride)
    with _without_autocast([weight]):
        return _grouped_conv_orthogonality(weight[None], strides)[0]


def _as_kernels(stacked: torch.Tensor) -> torch.Tensor:
    """``(B, C_out, C_in, k...)`` from stacked weights; a linear weight is a 1-D conv of size 1."""
    return stacked[..., None] if stacked.dim() == 3 else stacked


def _grouped_conv_orthogonality(weights: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """:func:`conv_orthogonality_penalty` of ``B`` same-shape kernels ``(B, C_out, C_in, k...)`` in
    one grouped conv (group ``b`` convolves kernel ``b`` with itself); returns the ``B`` penalties."""
    b, c_out, c_in = weights.shape[:3]
    kernel = weights.shape[3:]
    padding = tuple((k - 1) // s * s for k, s in zip(kernel, stride))
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(kernel) - 1]
    images = weights.transpose(0, 1).reshape(c_out, b * c_in, *kernel)  # image o: row o of every kernel
    out = conv(images, weights.reshape(b * c_out, c_in, *kernel), stride=stride, padding=padding, groups=b)
    out = out.reshape(c_out, b, c_out, *out.shape[2:]).transpose(0, 1)  # (B, C_out, C_out, shifts...)
    centre = tuple(n // 2 for n in out.shape[3:])
    eye = torch.eye(c_out, dtype=out.dtype, device=out.device)
    residual = out.clone()
    residual[(slice(None), slice(None), slice(None)) + centre] -= eye
    return residual.square().flatten(1).sum(1)


class ConvOrthogonalityRegularizer:
    """``coeff/2 * sum_l conv_orthogonality_penalty(K_l, stride_l)`` over a model's convs (each
    with its own stride) and linear layers, with the interface of :class:`OrthonormalRegularizer`.

    The ``1/2`` makes ``coeff`` play the role it plays for weight decay and for the paper's
    regularizer. ``add_grad_`` differentiates the penalty alone (not through the loss), with the
    kernels of one shape and stride stacked into one grouped conv.
    """

    def __init__(self, model: nn.Module, coeff: float = 1e-4, filter: LayerFilter = None):
        if not coeff >= 0:
            raise ValueError(f"coeff must be >= 0, got {coeff}")
        if not isinstance(model, nn.Module):
            raise TypeError("ConvOrthogonalityRegularizer takes a model (it needs each conv's stride)")
        self.coeff = float(coeff)
        self._layers: list[tuple[torch.Tensor, tuple[int, ...]]] = []
        self._buckets: dict[tuple, list[torch.Tensor]] = {}  # weights of one shape and stride: one grouped conv
        named = distinct_weights(weight_layers(model, filter, user="ConvOrthogonalityRegularizer"),
                                 "ConvOrthogonalityRegularizer",
                                 lambda m: (geometry(m), getattr(m, "stride", None), getattr(m, "dilation", None)))
        for name, m in named:
            weight = plain_weight(name, m, "ConvOrthogonalityRegularizer")
            if geometry(m)[1]:
                raise ValueError(f"the conv-orthogonality penalty is defined for convs and linear layers; layer "
                                 f"{name!r} is {type(m).__name__} (leave it out with filter=)")
            if isinstance(m, nn.Linear):
                stride = (1,)
            elif m.groups != 1 or m.dilation != (1,) * len(m.dilation):
                raise ValueError(f"the conv-orthogonality penalty is defined for ungrouped, undilated convs; "
                                 f"layer {name!r} has groups={m.groups}, dilation={m.dilation} (leave it out with "
                                 "filter=)")
            else:
                stride = tuple(m.stride)
            self._layers.append((weight, stride))
            self._buckets.setdefault((tuple(weight.shape), stride, weight.dtype, weight.device), []).append(weight)
        if not self._layers:
            raise ValueError("ConvOrthogonalityRegularizer found no conv or linear weights to regularize")
        self.params = [w for w, _ in self._layers]

    @_outside_autocast
    def add_grad_(self) -> None:
        if self.coeff == 0:
            return
        for (_, stride, _, _), weights in self._buckets.items():
            weights = [w for w in weights if w.grad is not None]
            if not weights:
                continue
            with torch.enable_grad():
                leaf = torch.stack([w.detach() for w in weights]).requires_grad_()
                (grad,) = torch.autograd.grad(_grouped_conv_orthogonality(_as_kernels(leaf), stride).sum(), leaf)
            torch._foreach_add_([w.grad for w in weights], list(grad.unbind(0)), alpha=0.5 * self.coeff)

    @_outside_autocast
    @torch.no_grad()
    def penalty(self) -> torch.Tensor:
        return self.loss()

    @_outside_autocast
    def loss(self) -> torch.Tensor:
        return 0.5 * self.coeff * sum(_grouped_conv_orthogonality(_as_kernels(torch.stack(weights)), stride).sum()
                                      for (_, stride, _, _), weights in self._buckets.items())

    @_outside_autocast
    def residuals(self) -> list[float]:
        with torch.no_grad():
            return [float(conv_orthogonality_penalty(w.float(), s).sqrt()) for w, s in self._layers]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


REGULARIZERS = ("ortho", "srip", "conv-ortho")
# lambda when none is given: the paper's weight-decay value for ours; the initial value of the
# authors' CIFAR code for SRIP (annealed there, constant here); for conv-ortho ISONet's code's, the
# one published for this squared penalty (OCNN's 0.1 is for its unsquared norm; docs/METHOD-NOTES.md).
DEFAULT_COEFF = {"ortho": 1e-4, "srip": 1e-2, "conv-ortho": 1e-4}


def make_regularizer(name: str, model: nn.Module, coeff: float | None = None, filter: LayerFilter = None):
    """One of :data:`REGULARIZERS` over ``model``'s weight layers (``filter`` narrows them)."""
    if name not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {name!r}; choose one of {', '.join(REGULARIZERS)}")
    coeff = DEFAULT_COEFF[name] if coeff is None else coeff
    if name == "ortho":
        return OrthonormalRegularizer(model, coeff, filter=filter)
    if name == "srip":
        return SRIPRegularizer(model, coeff, filter=filter)
    return ConvOrthogonalityRegularizer(model, coeff, filter=filter)
