"""The orthonormality regularizer that replaces L2 weight decay (METHOD.md section 3).

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
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .init import _check_weight

__all__ = ["orthonormal_penalty", "OrthonormalRegularizer", "split_decay_parameters"]


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


def orthonormal_penalty(weight: torch.Tensor) -> torch.Tensor:
    """``sum over groups of ||V V^T - I||_F^2`` for one weight (no lambda); differentiable.

    >>> w = orthomod.init.orthonormal_(torch.empty(8, 4, 3, 3, dtype=torch.float64))
    >>> float(orthonormal_penalty(w)) < 1e-20
    True
    """
    f_out, f_in = _check_weight(weight)
    v = weight.reshape(1, f_out, f_in)
    return sum(_residual(block).square().sum() for block in _group_blocks(v))


def _weights_of(module_or_params: nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(module_or_params, nn.Module):
        layers = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
        return [m.weight for m in module_or_params.modules() if isinstance(m, layers)]
    params = list(module_or_params)
    for p in params:
        if not isinstance(p, torch.Tensor) or p.dim() < 2:
            shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(
                f"OrthonormalRegularizer takes weights with at least 2 dimensions, got {shape}; "
                "pass the model itself to collect its conv/linear weights"
            )
    return params


class OrthonormalRegularizer:
    """``R = coeff/2 * sum_l ||V_l V_l^T - I||_F^2`` over the conv/linear weights given.

    Args:
        module_or_params: a model (its Conv1d/2d/3d and Linear weights are taken; BN and biases
            are not) or an iterable of weight tensors.
        coeff: ``lambda``; the paper uses the weight-decay value, 1e-4 on CIFAR-10.
    """

    def __init__(self, module_or_params: nn.Module | Iterable[torch.Tensor], coeff: float = 1e-4):
        if not coeff >= 0:
            raise ValueError(f"coeff must be >= 0, got {coeff}")
        self.coeff = float(coeff)
        self.params = _weights_of(module_or_params)
        if not self.params:
            raise ValueError("OrthonormalRegularizer found no conv or linear weights to regularize")
        for p in self.params:
            _check_weight(p)
        # Weights of one shape share a batched matmul; grouping by (shape, dtype, device) once
        # here keeps the per-step cost to a few large ops instead of one small op per layer.
        self._buckets: dict[tuple, list[torch.Tensor]] = {}
        for p in self.params:
            self._buckets.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)

    def _stacked(self, params: list[torch.Tensor]) -> torch.Tensor:
        f_out = params[0].shape[0]
        return torch.stack([p.reshape(f_out, -1) for p in params])

    @torch.no_grad()
    def add_grad_(self) -> None:
        """Add ``coeff * 2 (V V^T - I) V`` to the ``.grad`` of every weight that has one."""
        if self.coeff == 0:
            return
        for (shape, _, _), params in self._buckets.items():
            params = [p for p in params if p.grad is not None]
            if not params:
                continue
            v = self._stacked(params)
            grads = [torch.bmm(_residual(block), block) for block in _group_blocks(v)]
            grads[0] = grads[0].reshape(v.shape[0], -1, v.shape[2])
            grad = torch.cat(grads, dim=1) if len(grads) > 1 else grads[0]
            grad.mul_(2.0 * self.coeff)
            torch._foreach_add_([p.grad for p in params], [g.view(shape) for g in grad.unbind(0)])

    @torch.no_grad()
    def penalty(self) -> torch.Tensor:
        """The value of ``R`` (a 0-d float tensor, no graph)."""
        return self._value()

    def loss(self) -> torch.Tensor:
        """``R`` as a differentiable loss term; its gradient equals what :meth:`add_grad_` adds."""
        return self._value()

    def _value(self) -> torch.Tensor:
        total = 0.0
        for params in self._buckets.values():
            for block in _group_blocks(self._stacked(params)):
                total = total + _residual(block).square().sum()
        return 0.5 * self.coeff * total

    def residuals(self) -> list[float]:
        """``||V V^T - I||_F`` per weight, in the order of :attr:`params` (a diagnostic)."""
        with torch.no_grad():
            return [float(orthonormal_penalty(p.float()).sqrt()) for p in self.params]


def split_decay_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(weights, others)``: conv/linear weights (``dim >= 2``) and the rest (BN, biases).

    The usual split for weight decay: only the first list is decayed, whether by L2 or by the
    orthonormality regularizer (METHOD.md section 3, Decision).
    """
    weights, others = [], []
    for p in model.parameters():
        if p.requires_grad:
            (weights if p.dim() >= 2 else others).append(p)
    return weights, others
