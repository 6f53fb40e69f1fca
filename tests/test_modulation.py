"""Modulation on a chain of 1x1 convs with orthogonal weights: exact, predictable moments.

With V_k = s_k Q_k (Q_k orthogonal, square) and no nonlinearity, the error at conv l's output
is W_{l+1}^T ... W_L^T e_L, whose second moment is exactly s_{l+1}^2 ... s_L^2 q_L. So the
factor each rule applies, and the resulting weight gradients, are known in closed form.
"""
import copy
import math

import pytest
import torch
from torch import nn

from orthomod.init import orthonormal_
from orthomod.models import create
from orthomod.modulation import ErrorModulator

C = 6
SCALES = [1.0, 3.0, 1.1, 0.25, 1.05, 2.5]  # s_1 .. s_L (s_1 never matters: nothing below conv 1)


def _chain(scales=SCALES):
    torch.manual_seed(0)
    chain = nn.Sequential(*[nn.Conv2d(C, C, 1, bias=False) for _ in scales]).double()
    for conv, s in zip(chain, scales):
        orthonormal_(conv.weight, gain=s)
    return chain


def _grads(chain, modulator=None):
    torch.manual_seed(1)
    x = torch.randn(4, C, 5, 5, dtype=torch.float64)
    g = torch.randn(4, C, 5, 5, dtype=torch.float64)
    chain.zero_grad()
    (chain(x) * g).sum().backward()
    if modulator is not None:
        modulator.step()
    return [conv.weight.grad.clone() for conv in chain]


def _predicted_factors(scales, tau, rule):
    """Cumulative factor on each layer's error, from the rule as docs/METHOD-NOTES.md states it."""
    n = len(scales)
    factor = [1.0] * n
    after = [None] * n
    after[-1] = 1.0  # q_L, in units of the top moment
    cumulative = 1.0
    for l in range(n - 2, -1, -1):
        raw = scales[l + 1] ** 2 * after[l + 1]  # moment arriving at layer l
        ref = after[l + 1] if rule == "consecutive" else after[-1]
        ratio = ref / raw
        rho = 1.0
        if ratio > tau or ratio < 1 / tau:
            target = ref if rule == "consecutive" else ref / min(max(ratio, 1 / tau), tau)
            rho = math.sqrt(target / raw)
        after[l] = raw * rho**2
        cumulative *= rho
        factor[l] = cumulative
    return factor


@pytest.mark.parametrize("tau,rule", [(1.0, "consecutive"), (2.0, "consecutive"), (1.5, "top"), (1.0, "top")])
def test_weight_gradients_scaled_by_exact_factor(tau, rule):
    chain = _chain()
    plain = _grads(chain)
    with ErrorModulator(chain, tau=tau, rule=rule) as modulator:
        modulated = _grads(chain, modulator)
        scaled = modulator.scaled
        before, after = modulator.moments_before, modulator.moments_after
    expected = _predicted_factors(SCALES, tau, rule)
    for g0, g1, f in zip(plain, modulated, expected):
        assert torch.allclose(g1, f * g0, rtol=1e-10, atol=1e-15)
    assert scaled[-1] is False  # the top layer is never modulated
    if tau == 1.0:  # "always": every layer ends with the top layer's moment
        assert after == pytest.approx([after[-1]] * len(SCALES), rel=1e-10)
        assert all(scaled[:-1])
    # the band 2.0 catches s=3 (ratio 1/9), s=0.25 (16) and s=2.5 (0.16) but not s=1.1 or 1.05
    if (tau, rule) == (2.0, "consecutive"):
        assert scaled == [True, False, True, False, True, False]
        assert expected != [1.0] * len(SCALES)
    ratios = [b / before[-1] for b in before]
    assert ratios[-2] == pytest.approx(SCALES[-1] ** 2, rel=1e-10)  # raw moment below the top


def test_until_step_stops_modulating():
    chain = _chain()
    plain = _grads(chain)
    modulator = ErrorModulator(chain, tau=1.0, until_step=2)
    first, second, third = (_grads(chain, modulator) for _ in range(3))
    expected = _predicted_factors(SCALES, 1.0, "consecutive")
    for g0, g1, g2, g3, f in zip(plain, first, second, third, expected):
        assert torch.allclose(g1, f * g0) and torch.allclose(g2, f * g0)
        assert torch.equal(g3, g0)
    assert modulator.step_count == 3 and not modulator.active
    modulator.remove()


def test_until_step_zero_never_modulates():
    chain = _chain()
    plain = _grads(chain)
    with ErrorModulator(chain, until_step=0) as modulator:
        for g0, g1 in zip(plain, _grads(chain, modulator)):
            assert torch.equal(g0, g1)


def test_monitor_records_without_modulating():
    chain = _chain()
    plain = _grads(chain)
    with ErrorModulator(chain, until_step=0, monitor=True) as modulator:
        grads = _grads(chain, modulator)
        before = modulator.moments_before
    assert all(torch.equal(a, b) for a, b in zip(plain, grads))
    for l in range(len(SCALES) - 1):
        assert before[l] / before[l + 1] == pytest.approx(SCALES[l + 1] ** 2, rel=1e-10)


def test_remove_restores_model():
    chain = _chain()
    plain = _grads(chain)
    modulator = ErrorModulator(chain, tau=1.0)
    _grads(chain, modulator)
    modulator.remove()
    assert all(len(conv._forward_hooks) == 0 for conv in chain)
    assert all(torch.equal(a, b) for a, b in zip(plain, _grads(chain)))


def test_forward_unchanged_under_bf16_autocast_channels_last():
    torch.manual_seed(0)
    model = create("plain20", init="orthonormal").to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(x)
        with ErrorModulator(model, tau=1.0) as modulator:
            out = model(x)
            out.float().logsumexp(1).mean().backward()
    assert torch.equal(reference, out)
    after = torch.tensor(modulator.moments_after)
    assert len(after) == 19 and torch.isfinite(after).all()
    # "always": every layer's moment equals the top's, up to bf16 rounding of the scale
    assert torch.allclose(after, after[-1].expand(19), rtol=2e-2)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_eval_forward_does_not_disturb_statistics():
    chain = _chain()
    with ErrorModulator(chain, tau=1.0) as modulator:
        _grads(chain, modulator)
        scales = modulator.scales
        with torch.no_grad():
            chain(torch.randn(2, C, 5, 5, dtype=torch.float64))
        assert modulator.scales == scales


def test_state_dict_roundtrip_and_validation():
    chain = _chain()
    a = ErrorModulator(chain, until_step=5)
    for _ in range(3):
        with torch.no_grad():
            chain(torch.randn(2, C, 5, 5, dtype=torch.float64))  # one iteration's pass
        a.step()
    a.remove()  # one modulator per model at a time
    b = ErrorModulator(chain, tau=2.0, until_step=9, rule="top")
    b.load_state_dict(a.state_dict())  # the schedule and the rule come back with the step
    assert (b.step_count, b.tau, b.until_step, b.rule) == (3, 1.0, 5, "consecutive")
    b.load_state_dict({"step_count": 4})  # a checkpoint from before 2026-11-26: the rest stays
    assert (b.step_count, b.tau, b.until_step, b.rule) == (4, 1.0, 5, "consecutive")
    with pytest.raises(ValueError, match="tau must be >= 1"):
        b.load_state_dict({"step_count": 1, "tau": 0.5})
    assert b.step_count == 4  # nothing changed by a refused state
    b.remove()
    for bad, msg in [(dict(tau=0.5), "tau must be >= 1"), (dict(until_step=-1), "until_step must be >= 0"),
                     (dict(rule="cumulativ"), "unknown modulation rule 'cumulativ'")]:
        with pytest.raises(ValueError, match=msg):
            ErrorModulator(chain, **bad)
    with pytest.raises(ValueError, match="no conv layers"):
        ErrorModulator(nn.Linear(2, 2))


def _explicit_reference_grads(model, x, y, tau):
    """The rule applied literally: rescale each conv output's error tensor in the backward pass."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    after = {}

    def hook_for(index):
        def hook(grad):
            q = grad.pow(2).mean().item()
            above = after.get(index + 1)
            rho = 1.0
            if above is not None and not (1 / tau <= above / q <= tau):
                rho = math.sqrt(above / q)
            after[index] = q * rho**2
            return grad * rho
        return hook

    def attach(index):
        def forward_hook(module, inputs, output):
            output.register_hook(hook_for(index))
        return forward_hook

    handles = [conv.register_forward_hook(attach(k)) for k, conv in enumerate(convs)]
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    for h in handles:
        h.remove()
    return [p.grad.clone() for p in model.parameters()], after


@pytest.mark.parametrize("tau", [1.0, 1.3])
def test_parameter_gradients_equal_explicit_error_scaling_through_bn_relu(tau):
    torch.manual_seed(0)
    model = create("plain20", init="msra").double()
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    expected, after = _explicit_reference_grads(model, x, y, tau)
    with ErrorModulator(model, tau=tau) as modulator:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        got = [p.grad.clone() for p in model.parameters()]
        moments = modulator.moments_after
        scaled = modulator.scaled
    assert 0 < sum(scaled) < len(scaled) or tau == 1.0
    assert moments == pytest.approx([after[k] for k in range(len(moments))], rel=1e-9)
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, rtol=1e-9, atol=1e-16)


def test_top_rule_catches_compound_drift_that_the_consecutive_band_misses():
    # every layer grows the error by 1.3^2 = 1.69 < tau: the consecutive band never fires, yet
    # over 10 layers the moment grows 1.69^9 ~ 112x (what made plain-110 diverge, docs/RESULTS.md)
    scales = [1.3] * 10
    chain = _chain(scales)
    with ErrorModulator(chain, tau=2.0, rule="consecutive") as consecutive:
        _grads(chain, consecutive)
        assert not any(consecutive.scaled)
        assert consecutive.moments_after[0] / consecutive.moments_after[-1] == pytest.approx(1.69**9, rel=1e-9)
    with ErrorModulator(chain, tau=2.0, rule="top") as top:
        _grads(chain, top)
        ratios = [q / top.moments_after[-1] for q in top.moments_after]
    assert all(0.5 - 1e-12 <= r <= 2.0 + 1e-12 for r in ratios) and sum(top.scaled) == 8


# -- no host sync in the backward pass ------------------------------------------------------------
_HOST_READS = ("item", "__float__", "tolist", "__bool__")


class _CountHostReads:
    """Counts calls of the Tensor methods that copy a value to the host (a GPU sync)."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in _HOST_READS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("tau, rule", [(1.0, "consecutive"), (1.5, "consecutive"), (1.5, "top")])
def test_backward_reads_nothing_back_to_the_host(monkeypatch, tau, rule):
    torch.manual_seed(0)
    model = create("plain20", init="orthonormal")
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    # the device path, which accelerators take by default (CPU gradients take host floats)
    with ErrorModulator(model, tau=tau, rule=rule, rule_on_device=True) as modulator:
        loss = nn.functional.cross_entropy(model(x), y)
        counter = _CountHostReads(monkeypatch)
        float(torch.ones(()))  # the counter sees a host read
        assert counter.calls == ["__float__"]
        loss.backward()
        assert counter.calls == ["__float__"], f"host reads during backward: {counter.calls[1:]}"
        stats = modulator.statistics()  # the statistics: one transfer for all three lists
        assert counter.calls[1:] == ["tolist"]
    assert len(stats["scales"]) == 19 and all(map(math.isfinite, stats["moments_after"]))
    if tau == 1.0:
        assert stats["moments_after"] == pytest.approx([stats["moments_after"][-1]] * 19, rel=1e-5)


@pytest.mark.parametrize("tau, rule", [(1.0, "consecutive"), (1.5, "consecutive"), (1.5, "top"), (4.0, "top")])
def test_device_and_host_rules_agree(tau, rule):
    # bit for bit here, but not by construction: on the CPU torch divides by a 0-dim tensor by
    # multiplying with its reciprocal, which can differ from Python's division in the last place
    torch.manual_seed(0)
    base = create("plain14", init="orthonormal").double()
    x, y = torch.randn(6, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (6,))
    results = []
    for on_device in (True, False):
        model = copy.deepcopy(base)
        with ErrorModulator(model, tau=tau, rule=rule, rule_on_device=on_device) as modulator:
            for _ in range(2):
                model.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
            results.append(([p.grad for p in model.parameters()], modulator.statistics()))
    (grads_device, stats_device), (grads_host, stats_host) = results
    assert any(s != 1.0 for s in stats_host["scales"])
    for key in stats_host:
        assert stats_device[key] == pytest.approx(stats_host[key], rel=1e-13)
    assert all(float((a - b).norm() / b.norm()) < 1e-12 for a, b in zip(grads_device, grads_host))


class _EdgeNet(nn.Module):
    """1x1 convs a -> b -> c (no mixing of positions), c's output times ``gain`` (per position)
    before the loss, b's output reaching c only where ``mask`` is True, and an auxiliary loss on
    a's output that bypasses b and c."""

    def __init__(self, gain, mask):
        super().__init__()
        self.a, self.b, self.c = (nn.Conv2d(3 if i == 0 else 4, 4, 1, bias=False) for i in range(3))
        self.gain, self.mask = gain, mask

    def forward(self, x):
        h = self.a(x)
        return (self.c(torch.where(self.mask, self.b(h), 0.0)) * self.gain).mean() + h.square().mean()


def _edge(case):
    gain, mask = torch.ones(3, 3, dtype=torch.float64), torch.ones(3, 3, dtype=torch.bool)
    if case == "zero":  # b gets no error (q = 0) under a c that has one: ratio inf; a's reference 0
        mask[:] = False
    else:  # c's moment nan or inf at one position that b's error does not come from
        gain[0, 0], mask[0, 0] = (math.nan if case == "nan" else math.inf), False
    return _EdgeNet(gain, mask).double()


@pytest.mark.parametrize("case", ["zero", "nan", "inf"])
@pytest.mark.parametrize("tau, rule", [(1.0, "consecutive"), (1.5, "consecutive"), (1.5, "top")])
def test_device_and_host_rules_agree_on_zero_inf_and_nan_moments(case, tau, rule):
    # the host rule leaves a layer whose moment is 0, inf or nan alone, scales to a reference of 0
    # (factor 0) or inf, and leaves a layer with a nan reference alone: the device rule's fewer
    # ops must do the same
    torch.manual_seed(0)
    base = _edge(case)
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    results = []
    for on_device in (True, False):
        model = copy.deepcopy(base)
        with ErrorModulator(model, tau=tau, rule=rule, rule_on_device=on_device) as modulator:
            model(x).backward()
            results.append(([p.grad for p in model.parameters()], modulator.statistics()))
    (grads_device, stats_device), (grads_host, stats_host) = results
    for key in stats_host:
        assert stats_device[key] == pytest.approx(stats_host[key], rel=1e-13, nan_ok=True), key
    for a, b in zip(grads_device, grads_host):
        assert torch.allclose(a, b, rtol=1e-13, atol=0, equal_nan=True)
    before, scales = stats_host["moments_before"], stats_host["scales"]
    if case == "zero":  # b left alone with q = 0; a scaled to b's moment, 0 (top rule: to c's)
        assert before[1] == 0.0 and scales[1] == 1.0 and before[0] > 0 and (scales[0] == 0.0) == (rule == "consecutive")
    else:  # c's moment nan/inf, left alone; b's error finite, its reference nan (left alone) or inf
        assert not math.isfinite(before[2]) and scales[2] == 1.0 and math.isfinite(before[1]) and before[1] > 0
        assert scales[1] == (1.0 if case == "nan" else math.inf)


def test_a_second_modulator_on_one_model_is_refused_until_the_first_is_removed():
    model = create("plain8")
    first = ErrorModulator(model)
    with pytest.raises(ValueError, match="already has an ErrorModulator: a second one would scale every error twice"):
        ErrorModulator(model)
    first.remove()
    ErrorModulator(model).remove()  # fine once the first is gone
    with ErrorModulator(model):
        twin = copy.deepcopy(model)  # a copy is another model: it may get its own
        ErrorModulator(twin).remove()


def test_on_a_chain_adam_undoes_a_modulation_factor_that_sgd_keeps():
    # on a chain each parameter tensor's gradient is scaled by one number (the product of the
    # factors above it); Adam's first step, lr * g / (|g| + eps), does not see such a number
    from orthomod.models import create

    torch.manual_seed(0)
    base = create("plain8", init="orthonormal")
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))

    def change(optimizer, modulate):
        model = copy.deepcopy(base)
        opt = optimizer(model.parameters())
        with ErrorModulator(model, until_step=None if modulate else 0) as modulator:
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            assert any(modulator.scaled) == modulate
        return [p.detach() - q.detach() for p, q in zip(model.parameters(), base.parameters())]

    def difference(optimizer):  # the largest relative difference over the parameter tensors
        return max(float((a - b).norm() / b.norm()) for a, b in zip(change(optimizer, True), change(optimizer, False)))

    assert difference(lambda ps: torch.optim.Adam(ps, lr=1e-3, eps=1e-12)) < 1e-6
    assert difference(lambda ps: torch.optim.SGD(ps, lr=0.1)) > 0.1
