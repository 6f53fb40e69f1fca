"""Signal-propagation measurements of the paper (docs/METHOD-NOTES.md).

- :func:`filter_correlation`: per layer, the mean over filter pairs ``i != j`` of
  ``|cos(v_i, v_j)|`` (Fig. 2), and its mean over layers.
- Error second moments per conv layer come from :class:`orthomod.modulation.ErrorModulator`
  (``monitor=True`` measures without modulating); :func:`moment_ratios` turns them into the
  first/last ratio of Fig. 3 and the per-layer ratios ``q^l / q^L`` of Fig. 4.
- :func:`orthogonality_residuals` (``||V V^T - I||_F`` per layer, group-wise),
  :func:`filter_norms` (the mean norm of a layer's filters: with BN after a conv its output does
  not depend on that scale, and a step of SGD moves it by an angle that scales as ``lr / norm^2``)
  and :func:`gradient_norms`.
- :func:`signal_propagation`: on one batch at the current weights, each layer's output second
  moment going up and its error moment ``q`` coming down, without changing the model (where a
  net fails at init, and in which direction; docs/METHOD-NOTES.md, Signal propagation at step 0).
- :func:`bn_jacobian`: the exact Jacobian of one BN component over a batch (autograd) and the
  eigenvalues of ``J J^T`` against ``rho^2 = gamma^2 / (sigma_B^2 + eps)`` (the paper's
  appendix: ``J J^T ~= rho^2 I`` apart from two near-zero eigenvalues).

    >>> from orthomod.init import orthonormal_
    >>> v = orthonormal_(torch.empty(8, 16))
    >>> filter_correlation_of(v) < 1e-6
    True
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .modulation import ErrorModulator, attached_modulator
from .regularizers import orthonormal_penalty
from .weights import CONV_TRANSPOSE_TYPES, CONV_TYPES, LayerFilter, filter_matrices, geometry, weight_layers

__all__ = ["weighted_layers", "filter_correlation_of", "filter_correlation", "orthogonality_residuals",
           "filter_norms", "gradient_norms", "moment_ratios", "signal_propagation", "bn_jacobian"]


def weighted_layers(model: nn.Module, filter: LayerFilter = None) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the layers measured, in module order: by default the convs and
    transposed convs (the layers :class:`~orthomod.modulation.ErrorModulator` takes), else those
    ``filter`` accepts (:mod:`orthomod.weights`; e.g. ``[nn.Conv2d, nn.Linear]``)."""
    return weight_layers(model, filter, default=CONV_TYPES + CONV_TRANSPOSE_TYPES, user="diagnostics")


@torch.no_grad()
def filter_correlation_of(weight: torch.Tensor, groups: int = 1, transposed: bool = False) -> float:
    """Mean over pairs ``i != j`` of ``|cos(v_i, v_j)|`` between the filters (rows of ``V``,
    :mod:`orthomod.weights`). Filters of different conv groups read disjoint inputs: their
    cosine is 0, and they count as such pairs."""
    v = filter_matrices(weight.detach(), groups, transposed).double()
    n = v.shape[0] * v.shape[1]
    if n < 2:
        return 0.0
    unit = v / v.norm(dim=2, keepdim=True).clamp_min(1e-30)
    cos = torch.bmm(unit, unit.transpose(1, 2)).abs()
    return float((cos.sum() - cos.diagonal(dim1=1, dim2=2).sum()) / (n * (n - 1)))


def filter_correlation(model: nn.Module, filter: LayerFilter = None) -> dict:
    """Fig. 2: ``{"layers": [per layer], "mean": mean over layers}``."""
    per_layer = [filter_correlation_of(m.weight, *geometry(m)) for _, m in weighted_layers(model, filter)]
    return {"layers": per_layer, "mean": sum(per_layer) / len(per_layer) if per_layer else math.nan}


@torch.no_grad()
def orthogonality_residuals(model: nn.Module, filter: LayerFilter = None) -> list[float]:
    """``||V V^T - I||_F`` per layer (group-wise: the root of the summed squares)."""
    return [float(orthonormal_penalty(m.weight.detach().double(), *geometry(m)).sqrt())
            for _, m in weighted_layers(model, filter)]


@torch.no_grad()
def _mean_filter_norm(layer: nn.Module) -> float:
    return float(filter_matrices(layer.weight.detach(), *geometry(layer)).double().norm(dim=2).mean())


def filter_norms(model: nn.Module, filter: LayerFilter = None) -> list[float]:
    """Per layer, the mean over its filters (rows of ``V``, every group's) of the filter's norm."""
    return [_mean_filter_norm(m) for _, m in weighted_layers(model, filter)]


@torch.no_grad()
def gradient_norms(model: nn.Module, filter: LayerFilter = None) -> list[float | None]:
    """Frobenius norm of each layer's weight gradient (None where there is none, as for a
    parametrized weight, whose gradient goes to its originals)."""
    return [None if m.weight.grad is None else float(m.weight.grad.float().norm())
            for _, m in weighted_layers(model, filter)]


def moment_ratios(moments: list[float]) -> dict:
    """Fig. 3 and Fig. 4 from per-layer error moments (forward order, top conv last).

    ``first_over_last`` is ``q^1 / q^L`` (below 1: errors vanish on their way down);
    ``per_layer`` is ``q^l / q^L`` for every layer.
    """
    if not moments:
        return {"first_over_last": math.nan, "per_layer": []}
    top = moments[-1]
    per_layer = [q / top if top else math.nan for q in moments]
    return {"first_over_last": per_layer[0], "per_layer": per_layer}


def signal_propagation(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn=None,
                       filter: LayerFilter = None) -> dict:
    """One forward and backward pass of ``inputs`` through a copy of ``model`` in training mode
    (BN normalizes with the batch's statistics), measuring every layer of :func:`weighted_layers`:

    - ``forward``: the second moment (mean of squares) of the layer's output;
    - ``errors``: ``q``, the second moment of the loss's gradient with respect to that output, as
      :class:`~orthomod.modulation.ErrorModulator` measures it for Figs. 3-4 (nothing modulated);
    - ``filter_norm``: the mean norm of the layer's filters (:func:`filter_norms`);
    - ``names`` in the order the layers ran, ``forward_last_over_first`` (below 1: the signal
      fades on its way up) and ``errors_first_over_last`` (:func:`moment_ratios`' ``q^1 / q^L``;
      below 1: errors vanish on their way down).

    ``loss_fn(outputs, targets)`` defaults to cross-entropy. ``model`` itself is not touched: its
    weights, buffers (BN's running statistics), gradients and hooks stay as they were. Refused: a
    layer that runs more than once in the pass (one value per layer would mix its calls), and a
    model with an :class:`~orthomod.modulation.ErrorModulator` attached (it would scale the errors).

    >>> net = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.Conv2d(8, 8, 1, bias=False), nn.Flatten(1))
    >>> _ = [nn.init.orthogonal_(m.weight) for m in net[:2]]
    >>> out = signal_propagation(net, torch.randn(4, 3, 1, 1), torch.tensor([0, 1, 2, 3]))
    >>> round(out["forward_last_over_first"], 6), round(out["errors_first_over_last"], 6)
    (1.0, 1.0)
    """
    for name, layer in weighted_layers(model, filter):
        if attached_modulator(layer) is not None:
            raise ValueError(f"layer {name or '<model>'!r} has an ErrorModulator attached, which would scale the "
                             "errors signal_propagation measures: measure the model before attaching it, or after "
                             "its .remove()")
    probe = copy.deepcopy(model).train()
    named = weighted_layers(probe, filter)
    if not named:
        raise ValueError("signal_propagation found no layers to measure" +
                         (" that the filter accepts" if filter is not None else " (no conv layers)"))
    names = {module: name or "<model>" for name, module in named}
    forward: dict[nn.Module, float] = {}  # insertion order: the order the layers ran

    def record(module: nn.Module, args, output) -> None:
        if module in forward:
            raise ValueError(f"layer {names[module]!r} ran twice in one forward pass; signal_propagation "
                             "gives one value per layer: measure a model that calls each layer once")
        forward[module] = float(output.detach().double().square().mean())

    handles = [module.register_forward_hook(record) for _, module in named]
    modulator = ErrorModulator(probe, until_step=0, monitor=True, filter=filter)
    try:
        loss = (loss_fn or nn.functional.cross_entropy)(probe(inputs), targets)
        loss.backward()
        errors = modulator.moments_before
    finally:
        modulator.remove()
        for handle in handles:
            handle.remove()
    if not forward:
        raise ValueError("none of the layers signal_propagation measures ran in the forward pass")
    values = list(forward.values())
    return {"names": [names[m] for m in forward], "forward": values, "errors": errors,
            "filter_norm": [_mean_filter_norm(m) for m in forward],
            "forward_last_over_first": values[-1] / values[0] if values[0] else math.nan,
            "errors_first_over_last": moment_ratios(errors)["first_over_last"]}


def bn_jacobian(x: torch.Tensor, gamma: float = 1.0, beta: float = 0.0, eps: float = 1e-5) -> dict:
    """Exact Jacobian of one BN component over a batch ``x`` of ``m`` scalars, training mode.

    Returns ``jacobian`` (m x m), ``eigenvalues`` of ``J J^T`` (ascending), ``rho2`` =
    ``gamma^2 / (sigma_B^2 + eps)`` with the biased batch variance BN uses, and
    ``relative_deviation``: the largest ``|lambda / rho^2 - 1|`` over all but the two smallest
    eigenvalues.

    >>> out = bn_jacobian(torch.randn(64, dtype=torch.float64), gamma=1.5)
    >>> out["relative_deviation"] < 1e-3
    True
    """
    x = x.detach().reshape(-1)
    if x.numel() < 3:
        raise ValueError(f"bn_jacobian needs a batch of at least 3 values, got {x.numel()}")
    weight = torch.tensor([gamma], dtype=x.dtype)
    bias = torch.tensor([beta], dtype=x.dtype)

    def bn(values: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(values[:, None], None, None, weight, bias, training=True, eps=eps)[:, 0]

    jacobian = torch.autograd.functional.jacobian(bn, x)
    eigenvalues = torch.linalg.eigvalsh(jacobian @ jacobian.T)
    rho2 = gamma**2 / (float(x.var(unbiased=False)) + eps)
    deviation = float((eigenvalues[2:] / rho2 - 1).abs().max())
    return {"jacobian": jacobian, "eigenvalues": eigenvalues, "rho2": rho2, "relative_deviation": deviation}
