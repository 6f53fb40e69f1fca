"""Backward error modulation (docs/METHOD-NOTES.md, Backward error modulation).

Let ``q^l`` be the second moment (mean of squares over the batch and every position) of the
error at conv layer ``l``, the gradient of the loss with respect to conv ``l``'s *output*.
The backward pass reaches the top conv first and is never modulated. Going down, each layer
compares its moment with the (already modulated) moment of the layer above and, when the two
mismatch, scales its error before it propagates further down:

    rho = sqrt(q^{l+1} / q^l),   e^l <- rho * e^l

Scaling the error at conv ``l``'s output also scales conv ``l``'s own weight gradient and
everything below it: a per-layer, adaptive learning rate.

On any autograd graph (docs/METHOD-NOTES.md, Modulation on graphs that are not chains). Each call
of a modulated layer in a grad-enabled forward pass is a node of that pass, and the modulator
scales the error tensor at the node's output itself, so a factor reaches exactly the part of the
graph below the node it was measured at: through residual additions, concatenations, shared
layers and two forward passes alike. "The layer above" node ``l`` is the set of modulated nodes
nearest downstream of it on the error's path (the nodes whose input depends on ``l``'s output
with no modulated node between, read from the autograd graph when their forward runs); on a
chain it is the next conv. Its moment is the pooled one, the mean square over all their errors
together. The top rule's ``q^L`` is the pooled moment of the topmost nodes above ``l`` (those
with no modulated node above them). A node none of whose upper nodes took part in the current
backward pass (``loss.backward()``, ``torch.autograd.grad``, each call on its own) is a top
node and is left alone. State belongs to the pass and the backward call it came from. A node
whose moment is 0, inf or nan is left alone; a reference of 0 scales the node's error to 0, one
of inf to inf, and a nan reference leaves it alone (docs/METHOD-NOTES.md).

``torch.compile``: attach the modulator before the model is compiled, and before any other
instance of its class is compiled in the process, or call ``torch._dynamo.reset()`` after
attaching it. Compiled code does not notice module hooks added after it was compiled (dynamo's
``skip_nnmodule_hook_guards``, on by default), and the code compiled for one instance serves
every instance of the class: the modulator would see nothing and gradients would come out
unmodulated, so :meth:`step` raises when no modulated layer ran since the previous call.
Attached first, each modulated layer's hook splits the compiled graph and runs as written
(exact; tested with the ``aot_eager`` backend). Or, in any order: set
``torch._dynamo.config.skip_nnmodule_hook_guards = False`` before the first compiled call, so that
compiled code checks the module hooks and is recompiled when they change (each instance with
the modulator then gets code of its own; also tested).

Copies: ``nn.DataParallel`` runs per-device replicas of the layers that share the modulator's
hooks; a grad-enabled pass through one raises (use ``DistributedDataParallel``, one process per
device). ``copy.deepcopy`` of a modulated model copies the modulator with it: the copy is
modulated by its own, and the original's sees none of the copy's passes.

Activation checkpointing: ``torch.utils.checkpoint(..., use_reentrant=False)`` is followed
exactly (its recomputation, run inside the backward pass, is recognised and ignored); the
reentrant variant recomputes in a separate backward the modulator cannot see into, and a
backward through it raises a ``RuntimeError`` naming the layer.

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

import functools
import itertools
import math
import types
import weakref

import torch
from torch import nn

from .weights import CONV_TRANSPOSE_TYPES, CONV_TYPES, LayerFilter, weight_layers

__all__ = ["ErrorModulator", "MODULATION_RULES", "attached_modulator"]

MODULATION_RULES = ("consecutive", "top")
_instances = itertools.count()


def _root_sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    """``||t||`` as a 0-dim tensor on t's device, in t's dtype (float32 for fp16).

    The gradient is read once in its own dtype (a bf16 norm accumulates in float32 and is
    rounded once: relative error <= 2^-8): an upcast copy costs three times as much. fp16 norms
    are returned in float32, since a scaled loss's errors overflow fp16's range. Norms per sample
    first: a reduction to a single number runs on one thread, one with a batch of outputs on all
    of them (half the time on 2 cores). The result stays on the device.
    """
    wide = {"dtype": torch.float32} if t.dtype == torch.float16 else {}
    if t.dim() > 1 and t.device.type == "cpu":  # a GPU reduces it in one launch
        t = torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim())), **wide)
    return torch.linalg.vector_norm(t, **wide)


@functools.lru_cache(maxsize=None)
def _zero(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A 0-dim zero on ``device``, made once (the base of the device rule's moment)."""
    return torch.zeros((), device=device, dtype=dtype)


def _host_floats(values: list) -> list[float]:
    """Device tensors, floats and Nones as floats (None: nan), with one device-to-host transfer."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    host = iter(torch.stack(tensors).tolist() if tensors else [])
    return [math.nan if v is None else next(host) if isinstance(v, torch.Tensor) else float(v) for v in values]


def _refuse_reentrant(name: str, grad: torch.Tensor) -> None:
    raise RuntimeError(f"ErrorModulator: layer {name!r} was recomputed inside the backward pass and its recomputed "
                       "output is being backpropagated, as torch.utils.checkpoint(..., use_reentrant=True) does: "
                       "the modulator cannot follow that separate backward. Use use_reentrant=False, which it "
                       "follows exactly, or leave the layer out with filter=")


def _pooled(moments: list, counts: list[int]):
    """The mean square over several errors together, from their moments and sizes (one: itself)."""
    if len(moments) == 1:
        return moments[0]
    return sum(q * n for q, n in zip(moments, counts)) / sum(counts)


def _backward_task() -> int:
    """The id of the backward call running on this thread, -1 outside backward (torch's own
    test, used by ``torch.utils.checkpoint``)."""
    return torch._C._current_graph_task_id()


class _Pass:
    """The nodes of one forward pass, by layer index (for the statistics)."""

    __slots__ = ("nodes",)

    def __init__(self):
        self.nodes: dict[int, _Node] = {}


class _Node:
    """One call of a modulated layer in a grad-enabled forward pass."""

    __slots__ = ("index", "pass_", "modulate", "above", "task", "numel", "before", "after", "scale", "tops")

    def __init__(self, index: int, pass_: _Pass, modulate: bool):
        self.index, self.pass_, self.modulate = index, pass_, modulate
        self.above: list[_Node] = []  # the nearest modulated nodes downstream (filled by their forward)
        self.task = -1  # the backward call that last reached this node
        self.numel = 0
        self.before = self.after = self.scale = None
        self.tops: tuple[_Node, ...] = ()


def attached_modulator(layer: nn.Module) -> "ErrorModulator | None":
    """The :class:`ErrorModulator` that modulates ``layer`` now (attached, not removed), or None."""
    ref = getattr(layer, "_orthomod_modulator", None)
    owner = ref() if ref is not None else None
    return owner if owner is not None and owner._handles and layer in owner._names else None


class ErrorModulator:
    """Attach backward error modulation to the conv layers of ``model``.

    Args:
        model: any module; its conv and transposed-conv layers (``Conv1d/2d/3d``,
            ``ConvTranspose1d/2d/3d``; :mod:`orthomod.weights`) are the modulated layers, numbered
            in the order they first run in a grad-enabled forward pass (the first training pass
            fixes it). Any graph: see the module docstring.
        tau: band half-width (``>= 1``); ``1`` modulates every layer.
        until_step: modulate during the first ``until_step`` calls of :meth:`step` (one per
            training iteration); ``None`` means always, ``0`` never.
        rule: ``"consecutive"`` or ``"top"`` (see the module docstring).
        monitor: record the per-layer moments even when not modulating (for diagnostics);
            otherwise no moment is computed once modulation has stopped.
        rule_on_device: compute the rule with device tensors (no host sync in the backward
            pass) or with host floats; ``None`` (default): device tensors on accelerators, host
            floats for CPU gradients, where reading a value waits for nothing. Same results.
            Where a GPU step is bound by kernel launches (small nets on a fast GPU) the host
            rule is the faster one (docs/PERFORMANCE.md, "On a GPU"): pass ``False`` there.
        filter: which weight layers to modulate (:mod:`orthomod.weights`): a predicate
            ``(name, module) -> bool`` or a list of module types, e.g. ``[nn.Conv2d, nn.Linear]``
            to modulate the classifier too.

    After each backward pass, :attr:`moments_before`, :attr:`moments_after` (per layer, forward
    order) and :attr:`scales` (the factor applied to each layer's error, 1.0 when untouched)
    describe it; :attr:`scaled` says which layers were modulated. The forward pass is unchanged.
    Call :meth:`step` once per iteration: ``until_step`` counts those calls. From the second
    call on, :meth:`step` raises if none of the modulated layers ran (with or without
    gradients) since the call before, while modulating or monitoring: their hooks were skipped
    (a model compiled before the modulator was attached) or it was stepped twice.
    """

    def __init__(
        self,
        model: nn.Module,
        tau: float = 1.0,
        until_step: int | None = None,
        rule: str = "consecutive",
        monitor: bool = False,
        rule_on_device: bool | None = None,
        filter: LayerFilter = None,
    ):
        self.tau, self.until_step, self.rule = self._checked(tau, until_step, rule)
        self.monitor = monitor
        self.rule_on_device = rule_on_device
        self.step_count = 0
        self._runs = 0  # calls of the modulated layers since the last step()
        self._stepped = False
        named = weight_layers(model, filter, default=CONV_TYPES + CONV_TRANSPOSE_TYPES, user="ErrorModulator")
        if not named:
            raise ValueError("ErrorModulator found no conv layers in the model" +
                             (" that the filter accepts" if filter is not None else ""))
        self.layers = [m for _, m in named]
        self._names = {m: name or "<model>" for name, m in named}  # keyed by module: copy.deepcopy maps them
        for name, layer in named:
            if attached_modulator(layer) is not None:
                raise ValueError(f"layer {name or '<model>'!r} already has an ErrorModulator: a second one would "
                                 "scale every error twice; call .remove() on the first (or use it)")
        for layer in self.layers:
            layer._orthomod_modulator = weakref.ref(self)
        self._tag = f"orthomod.modulator.{next(_instances)}"  # marks this modulator's nodes on the graph
        self._memo = self._tag + ".below"
        self._order: dict[nn.Module, int] = {}  # layer -> position in the forward pass
        self._current: _Pass | None = None
        self._last: tuple[_Pass, int] | None = None  # the pass and backward call last reached
        self._statistics: tuple[tuple, dict] | None = None  # host copy of _last's numbers
        # The forward hook is never traced by torch.compile: it is bookkeeping on the autograd graph and
        # runs as written between the compiled pieces (traced, dynamo recompiled it once per layer until
        # its limit). A bound method, so that a deepcopy of the model copies the modulator with it.
        hook = types.MethodType(torch.compiler.disable(type(self)._forward_hook), self)
        self._handles = [layer.register_forward_hook(hook) for layer in self.layers]

    @staticmethod
    def _checked(tau, until_step, rule) -> tuple[float, int | None, str]:
        if not tau >= 1.0:
            raise ValueError(f"tau must be >= 1 (1 modulates every layer), got {tau}")
        if until_step is not None and until_step < 0:
            raise ValueError(f"until_step must be >= 0 or None, got {until_step}")
        if rule not in MODULATION_RULES:
            raise ValueError(f"unknown modulation rule {rule!r}; choose one of {', '.join(MODULATION_RULES)}")
        return float(tau), until_step, rule

    # -- schedule -----------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether the next backward pass is modulated."""
        return self.until_step is None or self.step_count < self.until_step

    def step(self) -> None:
        """Count one training iteration (call once per optimizer step).

        Raises ``RuntimeError`` if, since the previous call, none of the modulated layers ran
        while the modulator was modulating or monitoring (see the class docstring)."""
        if self._stepped and self._runs == 0 and (self.active or self.monitor):
            raise RuntimeError(
                "ErrorModulator.step(): none of the modulated layers ran since the last step(), so no error was "
                "modulated. If the model is compiled, its code was compiled before the modulator was attached (for "
                "it or another instance of its class) and skips hooks added later: call torch._dynamo.reset() "
                "after attaching the modulator, or set torch._dynamo.config.skip_nnmodule_hook_guards = False before "
                "compiling. Otherwise call step() once per iteration that runs the model")
        self._stepped, self._runs = True, 0
        self.step_count += 1

    def state_dict(self) -> dict:
        """The schedule and the rule: ``step_count``, ``tau``, ``until_step``, ``rule``."""
        return {"step_count": self.step_count, "tau": self.tau, "until_step": self.until_step, "rule": self.rule}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (a dict with only ``step_count``, as saved before 2026-11-26,
        keeps this modulator's tau, until_step and rule)."""
        tau, until_step, rule = self._checked(state.get("tau", self.tau), state.get("until_step", self.until_step),
                                              state.get("rule", self.rule))
        self.step_count = int(state["step_count"])
        self.tau, self.until_step, self.rule = tau, until_step, rule

    # -- hooks --------------------------------------------------------------------------------
    def _forward_hook(self, layer: nn.Module, inputs, output) -> None:
        self._runs += 1
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        if layer not in self._names:
            raise RuntimeError(f"ErrorModulator: a copy of a modulated {type(layer).__name__} ran with the modulator's hooks, "
                               "as nn.DataParallel's per-device replicas do; the modulator follows the layers it was "
                               "attached to, one pass at a time. Use DistributedDataParallel (one process per device), "
                               "which it follows exactly")
        if _backward_task() != -1:  # a forward inside a backward pass: checkpoint's recomputation
            output.register_hook(functools.partial(_refuse_reentrant, self._names[layer]))
            return
        if not (self.active or self.monitor):
            self._current = None
            return
        index = self._order.setdefault(layer, len(self._order))
        state = self._current
        if state is None or index == 0 or index in state.nodes:
            state = self._current = _Pass()
        node = _Node(index, state, self.active)
        state.nodes[index] = node
        for below in self._nearest_below(output.grad_fn):
            below.above.append(node)
        output.grad_fn.metadata[self._tag] = node
        output.register_hook(functools.partial(self._backward_hook, node))

    def _nearest_below(self, fn) -> list[_Node]:
        """The nodes of this modulator nearest below ``fn`` on the autograd graph, each once.

        A depth-first walk that stops at tagged nodes; the answer for every graph node it
        finishes is kept in that node's metadata, so shared stretches (a ResNet's identity path)
        are walked once per pass. Each graph node's ``next_functions`` is read once per walk.
        """
        tag, memo = self._tag, self._memo
        frames = [(fn, fn.next_functions, [])]  # (graph node, its children, their answers so far)
        while True:
            f, children, answers = frames[-1]
            if len(answers) == len(children):  # every child answered: f's own answer
                frames.pop()
                below = answers[0] if len(answers) == 1 else {k: v for a in answers for k, v in a.items()}
                if not frames:  # fn itself: the layer's own output, tagged by the caller
                    return list(below.values())
                f.metadata[memo] = below
                frames[-1][2].append(below)
                continue
            child = children[len(answers)][0]
            grandchildren = child.next_functions if child is not None else ()
            if not grandchildren:  # None (no gradient) or a leaf's AccumulateGrad
                answers.append({})
                continue
            meta = child.metadata
            node = meta.get(tag)
            if node is not None:
                answers.append({id(node): node})
            elif memo in meta:
                answers.append(meta[memo])
            else:
                frames.append((child, grandchildren, []))

    def _reference(self, node: _Node, task: int):
        """The pooled moment ``node`` is compared with in this backward call (None: none)."""
        above = [m for m in node.above if m.task == task]
        if self.rule == "top":  # the topmost nodes above, kept for the nodes below
            node.tops = tuple({id(t): t for m in above for t in (m.tops or (m,))}.values())
            above = list(node.tops)
        return _pooled([m.after for m in above], [m.numel for m in above]) if above else None

    def _backward_hook(self, node: _Node, grad: torch.Tensor) -> torch.Tensor | None:
        # On an accelerator, moments, the band test and the factors stay 0-dim device tensors
        # (torch.where, never a Python branch on a value): no host sync per layer. On the CPU a
        # host read waits for nothing, and the same arithmetic on Python floats costs a third of
        # the ~15 tensor ops per layer (docs/PERFORMANCE.md); both agree to the last bit or two.
        # Which nodes are the reference is structure, known on the host.
        task = _backward_task()
        node.task = task
        node.numel = grad.numel()
        reference = self._reference(node, task) if node.modulate else None
        self._last = (node.pass_, task)
        norm = _root_sum_of_squares(grad.detach())
        on_device = self.rule_on_device if self.rule_on_device is not None else grad.device.type != "cpu"
        if not on_device:
            return self._host_rule(node, reference, float(norm) ** 2 / node.numel, grad)
        # Each op here is a kernel launch on a 0-dim tensor, and launches are what this costs on a
        # GPU (docs/PERFORMANCE.md, "On a GPU"): the rule is written in as few as it takes, with the
        # host rule's results (its comparisons are False for nan).
        wide = torch.float32 if norm.device.type == "mps" else torch.float64
        q = torch.addcmul(_zero(norm.device, wide), norm, norm, value=1.0 / node.numel)  # the second moment, in wide
        node.before = q
        if reference is None:
            node.after, node.scale = q, 1.0
            return None
        ratio = reference / q  # = target / q for the consecutive rule
        modulate = q.log().isfinite()  # not when q is 0, inf or nan
        if self.rule == "top":  # back to the nearest edge of [q^L / tau, q^L * tau]; 1 inside it (x / x)
            ratio = ratio / ratio.clamp(1.0 / self.tau, self.tau)
        if self.rule == "top" or self.tau == 1.0:  # no band test can change the factor (tau 1: 1 at ratio 1)
            modulate &= ratio == ratio  # only not when the reference is nan
        else:
            modulate &= (ratio > self.tau) | (ratio < 1.0 / self.tau)
        squared = torch.where(modulate, ratio, 1.0)  # the factor squared
        scale = squared.sqrt()
        node.after, node.scale = q * squared, scale
        return grad * scale

    def _host_rule(self, node: _Node, reference: float | None, q: float, grad: torch.Tensor) -> torch.Tensor | None:
        """The rule of :meth:`_backward_hook` on host floats (CPU gradients)."""
        node.before = q
        scale = 1.0
        if reference is not None and q > 0 and math.isfinite(q):
            ratio = reference / q
            if ratio > self.tau or ratio < 1.0 / self.tau:
                if self.rule == "consecutive":
                    target = reference
                else:  # back to the nearest edge of [q^L / tau, q^L * tau]
                    target = reference / min(max(ratio, 1.0 / self.tau), self.tau)
                scale = math.sqrt(target / q)
        node.after, node.scale = q * scale**2, scale
        return None if scale == 1.0 else grad * scale

    def remove(self) -> None:
        """Detach every hook; the model is as it was before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._current = None
        for layer in self.layers:
            owner = getattr(layer, "_orthomod_modulator", None)
            if owner is not None and owner() is self:
                del layer._orthomod_modulator

    def __enter__(self) -> "ErrorModulator":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- statistics of the last backward pass -------------------------------------------------
    def statistics(self) -> dict[str, list[float]]:
        """``moments_before``, ``moments_after`` and ``scales`` of the last backward pass, per
        layer in forward order (nan: a layer that pass did not reach), read from the device in
        one transfer."""
        if self._last is None:
            return {"moments_before": [], "moments_after": [], "scales": []}
        if self._statistics is None or self._statistics[0] != self._last:
            state, task = self._last
            n = len(self._order)
            nodes = [state.nodes.get(i) for i in range(n)]
            nodes = [node if node is not None and node.task == task else None for node in nodes]
            values = _host_floats([None if m is None else getattr(m, key) for key in ("before", "after", "scale")
                                   for m in nodes])
            self._statistics = (self._last, {"moments_before": values[:n], "moments_after": values[n:2 * n],
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
