"""Backward error modulation (docs/METHOD-NOTES.md, Backward error modulation).

Let ``q^l`` be the second moment (mean of squares over the batch and every position) of the
error at conv layer ``l``, the gradient of the loss with respect to conv ``l``'s *output*.
The backward pass reaches the top conv first and is never modulated. Going down, each layer
compares its moment with the (already modulated) moment of the layer above and, when the two
mismatch, scales its error before it propagates further down:

    rho = sqrt(q^{l+1} / q^l),   e^l <- rho * e^l

Scaling the error at conv ``l``'s output also scales conv ``l``'s own weight gradient and
everything below it: a per-layer, adaptive learning rate.

Implementation: backpropagation is linear in the error, so scaling ``e^l`` by ``rho`` is the
same as scaling by ``rho`` every parameter gradient that ``e^l`` produces further down. The
modulator therefore never rewrites an activation gradient (a full extra pass over memory per
layer); it keeps the product of the factors applied so far in the current backward pass and
multiplies each parameter's gradient by it as the gradient is produced. Parameter gradients are
exactly those of the explicit rule; the activation gradients that other hooks may see below a
modulated layer are the raw ones, and the gradient with respect to the input is not scaled.

What "mismatch" means is open in the paper (docs/METHOD-NOTES.md); two rules are offered:

- ``rule="consecutive"`` (the paper's words): modulate when ``q^{l+1} / q^l`` leaves
  ``[1/tau, tau]``; the layer's moment is then set to ``q^{l+1}``. ``tau=1`` modulates every
  layer ("always"), which makes every error moment equal to the top layer's.
- ``rule="top"`` (a variant): measure each layer against the top layer's moment ``q^L``; when
  ``q^L / q^l`` leaves ``[1/tau, tau]``, scale the error just enough to bring its moment back to
  the nearest edge of that band. Moments inside the band keep their variety; ``tau=1`` is
  "always" again.

    >>> from orthomod.models import create
    >>> model = create("plain8")
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)]
    >>> with ErrorModulator(model, tau=1.0, until_step=None) as modulator:  # the defaults
    ...     for x, y in batches:
    ...         torch.nn.functional.cross_entropy(model(x), y).backward()
    ...         optimizer.step(); optimizer.zero_grad()
    ...         modulator.step()
    >>> len(modulator.scales), modulator.step_count
    (7, 2)
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["ErrorModulator", "MODULATION_RULES"]

MODULATION_RULES = ("consecutive", "top")


def _root_sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    """``||t||`` as a 0-dim tensor on t's device, in t's dtype (float32 for fp16).

    The gradient is read once in its own dtype (a bf16 norm accumulates in float32 and is
    rounded once: relative error <= 2^-8): an upcast copy costs three times as much. fp16 norms
    are returned in float32, since a scaled loss's errors overflow fp16's range. Norms per sample
    first: a reduction to a single number runs on one thread, one with a batch of outputs on all
    of them (half the time on 2 cores). The result stays on the device.
    """
    wide = {"dtype": torch.float32} if t.dtype == torch.float16 else {}
    if t.dim() > 1:
        t = torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim())), **wide)
    return torch.linalg.vector_norm(t, **wide)


def _host_floats(values: list) -> list[float]:
    """Device tensors, floats and Nones as floats (None: nan), with one device-to-host transfer."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    host = iter(torch.stack(tensors).tolist() if tensors else [])
    return [math.nan if v is None else next(host) if isinstance(v, torch.Tensor) else float(v) for v in values]


@dataclass
class _Pass:
    """Moments of one forward/backward pass, filled from the top conv down."""

    n_layers: int
    modulate: bool
    pending: torch.Tensor | float | None = None  # product of the factors applied so far (None: 1)
    before: list = field(init=False)
    after: list = field(init=False)
    scale: list = field(init=False)

    def __post_init__(self):
        self.before, self.after, self.scale = ([None] * self.n_layers for _ in range(3))


class ErrorModulator:
    """Attach backward error modulation to the conv layers of ``model`` (in forward order).

    Args:
        model: any module; its ``nn.Conv1d/2d/3d`` layers are the modulated layers, ordered by
            when they run in the forward pass (the first training forward pass fixes it).
        tau: band half-width (``>= 1``); ``1`` modulates every layer.
        until_step: modulate during the first ``until_step`` calls of :meth:`step` (one per
            training iteration); ``None`` means always, ``0`` never.
        rule: ``"consecutive"`` or ``"top"`` (see the module docstring).
        monitor: record the per-layer moments even when not modulating (for diagnostics);
            otherwise no moment is computed once modulation has stopped.
        rule_on_device: compute the rule with device tensors (no host sync in the backward
            pass) or with host floats; ``None`` (default): device tensors on accelerators, host
            floats for CPU gradients, where reading a value waits for nothing. Same results.

    After each backward pass, :attr:`moments_before`, :attr:`moments_after` (per layer, forward
    order) and :attr:`scales` (the factor applied to each layer's error, 1.0 when untouched)
    describe it; :attr:`scaled` says which layers were modulated. The forward pass is unchanged.
    """

    def __init__(
        self,
        model: nn.Module,
        tau: float = 1.0,
        until_step: int | None = None,
        rule: str = "consecutive",
        monitor: bool = False,
        rule_on_device: bool | None = None,
    ):
        if not tau >= 1.0:
            raise ValueError(f"tau must be >= 1 (1 modulates every layer), got {tau}")
        if until_step is not None and until_step < 0:
            raise ValueError(f"until_step must be >= 0 or None, got {until_step}")
        if rule not in MODULATION_RULES:
            raise ValueError(f"unknown modulation rule {rule!r}; choose one of {', '.join(MODULATION_RULES)}")
        self.tau = float(tau)
        self.until_step = until_step
        self.rule = rule
        self.monitor = monitor
        self.rule_on_device = rule_on_device
        self.step_count = 0
        self.layers = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        if not self.layers:
            raise ValueError("ErrorModulator found no conv layers in the model")
        owner = getattr(model, "_orthomod_modulator", None)
        if owner is not None and owner() is not None and owner()._handles and owner()._model() is model:
            raise ValueError("this model already has an ErrorModulator: a second one would scale every error "
                             "twice; call .remove() on the first (or use it)")
        model._orthomod_modulator = weakref.ref(self)
        self._model = weakref.ref(model)
        self._order: dict[int, int] = {}  # id(layer) -> position in the forward pass
        self._current: _Pass | None = None
        self._last: _Pass | None = None
        self._statistics: tuple[_Pass, dict] | None = None  # host copy of _last's numbers
        self._handles = [layer.register_forward_hook(self._forward_hook) for layer in self.layers]
        self._handles += [p.register_hook(self._parameter_hook) for p in model.parameters() if p.requires_grad]

    # -- schedule -----------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether the next backward pass is modulated."""
        return self.until_step is None or self.step_count < self.until_step

    def step(self) -> None:
        """Count one training iteration (call once per optimizer step)."""
        self.step_count += 1

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])

    # -- hooks --------------------------------------------------------------------------------
    def _forward_hook(self, layer: nn.Module, inputs, output: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and output.requires_grad):
            return
        if not (self.active or self.monitor):
            self._current = None
            return
        key = id(layer)
        if key not in self._order:
            self._order[key] = len(self._order)
        index = self._order[key]
        if index == 0 or self._current is None:
            self._current = _Pass(len(self.layers), modulate=self.active)
        state = self._current
        output.register_hook(lambda grad: self._backward_hook(state, index, grad))

    def _reference(self, state: _Pass, index: int) -> float | None:
        """The moment this layer is compared with, or None when there is none yet."""
        if self.rule == "consecutive":
            upper = next((q for q in state.after[index + 1 :] if q is not None), None)
        else:
            top = len(self._order) - 1
            upper = state.after[top] if top != index else None
        return upper

    def _backward_hook(self, state: _Pass, index: int, grad: torch.Tensor) -> None:
        # On an accelerator, moments, the band test and the factors stay 0-dim device tensors
        # (torch.where, never a Python branch on a value): no host sync per layer. On the CPU a
        # host read waits for nothing, and the same arithmetic on Python floats costs a third of
        # the ~15 tensor ops per layer (docs/PERFORMANCE.md); both give the same bits.
        # Which layer is the reference is structure, known on the host.
        norm = _root_sum_of_squares(grad.detach())
        on_device = self.rule_on_device if self.rule_on_device is not None else grad.device.type != "cpu"
        if not on_device:
            return self._host_rule(state, index, float(norm) ** 2 / grad.numel())
        norm = norm.to(torch.float32 if norm.device.type == "mps" else torch.float64)
        q = norm * norm / grad.numel()  # the second moment, as on the host
        if state.pending is not None:
            q = state.pending**2 * q
        reference = self._reference(state, index) if state.modulate else None
        if reference is None:
            state.before[index] = state.after[index] = q
            state.scale[index] = 1.0
        else:
            ratio = reference / q
            outside = (ratio > self.tau) | (ratio < 1.0 / self.tau)
            if self.rule == "consecutive":
                target = reference
            else:  # back to the nearest edge of [q^L / tau, q^L * tau]
                target = reference / ratio.clamp(1.0 / self.tau, self.tau)
            usable = (q > 0) & torch.isfinite(q)
            scale = torch.where(outside & usable, torch.sqrt(target / q), torch.ones_like(q))
            state.pending = scale if state.pending is None else state.pending * scale
            state.before[index] = q
            state.after[index] = q * scale**2
            state.scale[index] = scale
        if index == 0:  # the first conv is the last one the backward pass reaches
            self._last = state

    def _host_rule(self, state: _Pass, index: int, q: float) -> None:
        """The rule of :meth:`_backward_hook` on host floats (CPU gradients)."""
        pending = 1.0 if state.pending is None else float(state.pending)
        q = pending**2 * q
        scale = 1.0
        reference = self._reference(state, index) if state.modulate else None
        if reference is not None and q > 0 and math.isfinite(q):
            ratio = reference / q
            if ratio > self.tau or ratio < 1.0 / self.tau:
                if self.rule == "consecutive":
                    target = reference
                else:  # back to the nearest edge of [q^L / tau, q^L * tau]
                    target = reference / min(max(ratio, 1.0 / self.tau), self.tau)
                scale = math.sqrt(target / q)
        pending *= scale
        state.pending = None if pending == 1.0 else pending  # None: the parameter hooks skip the product
        state.before[index] = q
        state.after[index] = q * scale**2
        state.scale[index] = scale
        if index == 0:
            self._last = state

    def _parameter_hook(self, grad: torch.Tensor) -> torch.Tensor | None:
        # Runs as each parameter's gradient is produced, after the modulation of every layer
        # above it (autograd reaches a layer's parameters once the error at its output is known).
        state = self._current
        if state is None or state.pending is None:
            return None
        return grad * state.pending

    def remove(self) -> None:
        """Detach every hook; the model is as it was before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._current = None
        model = self._model()
        if model is not None and getattr(model, "_orthomod_modulator", None) is not None \
                and model._orthomod_modulator() is self:
            del model._orthomod_modulator

    def __enter__(self) -> "ErrorModulator":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- statistics of the last backward pass -------------------------------------------------
    def statistics(self) -> dict[str, list[float]]:
        """``moments_before``, ``moments_after`` and ``scales`` of the last backward pass, per
        layer in forward order (nan: a layer that pass did not reach), read from the device in
        one transfer."""
        state = self._last
        if state is None:
            return {"moments_before": [], "moments_after": [], "scales": []}
        if self._statistics is None or self._statistics[0] is not state:
            n = len(self._order)
            values = _host_floats(state.before[:n] + state.after[:n] + state.scale[:n])
            self._statistics = (state, {"moments_before": values[:n], "moments_after": values[n:2 * n],
                                        "scales": values[2 * n:]})
        return {key: list(value) for key, value in self._statistics[1].items()}

    @property
    def moments_before(self) -> list[float]:
        """Per-layer error second moments of the last backward pass, before modulation."""
        return self.statistics()["moments_before"]

    @property
    def moments_after(self) -> list[float]:
        """Per-layer error second moments of the last backward pass, after modulation."""
        return self.statistics()["moments_after"]

    @property
    def scales(self) -> list[float]:
        """Factor applied to each layer's error in the last backward pass (1.0: untouched)."""
        return self.statistics()["scales"]

    @property
    def scaled(self) -> list[bool]:
        """Which layers the last backward pass modulated."""
        return [s != 1.0 for s in self.scales]

    def __repr__(self) -> str:
        until = "always" if self.until_step is None else f"until step {self.until_step}"
        return f"ErrorModulator(layers={len(self.layers)}, tau={self.tau}, rule={self.rule!r}, {until})"
