"""Modulation on graphs that are not chains, against the rule applied literally.

The reference below is written from the rule's statement (docs/METHOD-NOTES.md, Modulation on
graphs that are not chains), not from the library: a tensor hook on every conv output rescales
the error itself, and which calls are "above" each call is written out by hand for each model.
In float64 the library's parameter gradients must equal the reference's to 1e-10.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from orthomod.modulation import ErrorModulator

@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)



class Literal:
    """The rule, literally: call ``k`` (forward order over the given convs) scales its error by
    ``rho`` computed from the modulated moments of the calls ``above[k]`` that the same backward
    call reached (pooled: mean square over their elements together); the top rule compares with
    the topmost calls above instead."""

    def __init__(self, convs, above, tau=1.0, rule="consecutive"):
        self.above, self.tau, self.rule = above, tau, rule
        self.calls = 0
        self.after, self.numel, self.tops = {}, {}, {}
        self.handles = [c.register_forward_hook(self._forward) for c in convs]

    def _forward(self, module, inputs, output):
        if torch.is_grad_enabled():
            k = self.calls
            self.calls += 1
            output.register_hook(lambda grad: self._backward(k, grad))

    def new_backward(self):
        self.after.clear()
        self.numel.clear()
        self.tops.clear()

    def _backward(self, k, grad):
        q = grad.pow(2).mean().item()
        refs = [m for m in self.above.get(k, []) if m in self.after]
        self.tops[k] = set().union(*(self.tops[m] or {m} for m in refs)) if refs else set()
        use = refs if self.rule == "consecutive" else sorted(self.tops[k])
        rho = 1.0
        if use:
            ref = sum(self.after[m] * self.numel[m] for m in use) / sum(self.numel[m] for m in use)
            ratio = ref / q
            if ratio > self.tau or ratio < 1 / self.tau:
                target = ref if self.rule == "consecutive" else ref / min(max(ratio, 1 / self.tau), self.tau)
                rho = math.sqrt(target / q)
        self.after[k], self.numel[k] = q * rho**2, grad.numel()
        return grad * rho

    def remove(self):
        for h in self.handles:
            h.remove()


def _convs(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _compare(model, run, above, tau=1.0, rule="consecutive", **modulator_args):
    """Gradients of ``run(model)`` (which does the backward calls) under the literal rule and
    under ErrorModulator, on two copies of the same model."""
    literal_model, ours = copy.deepcopy(model), copy.deepcopy(model)
    literal = Literal(_convs(literal_model), above, tau, rule)
    run(literal_model, literal.new_backward)
    literal.remove()
    with ErrorModulator(ours, tau=tau, rule=rule, **modulator_args):
        run(ours, lambda: None)
    expected, got = _grads(literal_model), _grads(ours)
    plain = copy.deepcopy(model)
    run(plain, lambda: None)
    assert len(expected) == len(got) > 0
    error = max(float((g - e).norm() / e.norm()) for g, e in zip(got, expected))
    unmodulated = max(float((p - e).norm() / e.norm()) for p, e in zip(_grads(plain), expected))
    assert unmodulated > 1e-3, "the case does not exercise modulation"
    assert error < 1e-10, f"relative gradient error {error:.3g} against the literal rule"


def _one_backward(model, new_backward, shape=(4, 3, 8, 8)):
    torch.manual_seed(3)
    x, y = torch.randn(shape), torch.randint(0, 5, (shape[0],))
    new_backward()
    F.cross_entropy(model(x), y).backward()


def _unit(c_in, c_out, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.a = _unit(c_in, c_out, stride)
        self.b = nn.Sequential(nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        return F.relu(self.b(self.a(x)) + (x if self.shortcut is None else self.shortcut(x)))


class Net(nn.Module):
    """stem, blocks, pool, classifier (the classifier is not modulated by default)."""

    def __init__(self, *blocks, stem=6, classes=5, width=None):
        super().__init__()
        self.stem = _unit(3, stem)
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(width or stem, classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def _scaled(model, gains):
    """Conv weights multiplied by very different gains, so the moments drift between layers."""
    torch.manual_seed(0)
    for conv, gain in zip(_convs(model), gains):
        with torch.no_grad():
            conv.weight.mul_(gain)
    return model


@pytest.mark.parametrize("tau, rule", [(1.0, "consecutive"), (1.3, "consecutive"), (1.5, "top")])
def test_identity_shortcut_blocks(tau, rule):
    torch.manual_seed(0)
    # calls: 0 stem, 1 a1, 2 b1, 3 a2, 4 b2, 5 a3, 6 b3 (the top: its output feeds only the classifier)
    model = _scaled(Net(Block(6, 6), Block(6, 6), Block(6, 6)), [1, 3, 0.3, 2, 0.5, 4, 0.7])
    # the identity paths: stem's output reaches a1, a2 and a3 through the additions, and so on
    above = {0: [1, 3, 5], 1: [2], 2: [3, 5], 3: [4], 4: [5], 5: [6]}
    _compare(model, _one_backward, above, tau, rule)


@pytest.mark.parametrize("tau", [1.0, 1.3])
def test_projection_shortcut(tau):
    torch.manual_seed(0)
    # calls: 0 stem, 1 a1, 2 b1, 3 shortcut1 (1x1, stride 2), 4 a2, 5 b2
    model = _scaled(Net(Block(6, 8, stride=2), Block(8, 8), width=8), [1, 2, 0.4, 3, 0.6, 2])
    above = {0: [1, 3], 1: [2], 2: [4], 3: [4], 4: [5]}
    _compare(model, _one_backward, above, tau)


class TwoBranch(nn.Module):
    """stem -> (3x3 -> 3x3) and (1x1) -> concat -> conv: a factor on one branch must not reach the other."""

    def __init__(self):
        super().__init__()
        self.stem = _unit(3, 6)
        self.left = nn.Sequential(_unit(6, 4), _unit(4, 4))
        self.right = _unit(6, 3)
        self.head = _unit(7, 6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = self.stem(x)
        return self.fc(self.head(torch.cat([self.left(x), self.right(x)], 1)).mean((2, 3)))


@pytest.mark.parametrize("tau, rule", [(1.0, "consecutive"), (1.2, "consecutive"), (1.2, "top")])
def test_two_branch_concat(tau, rule):
    torch.manual_seed(0)
    # calls: 0 stem, 1 left.0, 2 left.1, 3 right, 4 head
    model = _scaled(TwoBranch(), [1, 3, 0.3, 2.5, 0.5])
    above = {0: [1, 3], 1: [2], 2: [4], 3: [4]}
    _compare(model, _one_backward, above, tau, rule)


class ResNet18Like(nn.Module):
    """Four stages of two basic blocks (the second to fourth start with a strided projection)."""

    def __init__(self):
        super().__init__()
        widths = [4, 6, 8, 10]
        blocks, c = [], 4
        for i, w in enumerate(widths):
            blocks += [Block(c, w, stride=1 if i == 0 else 2), Block(w, w)]
            c = w
        self.net = Net(*blocks, stem=4, width=10)

    def forward(self, x):
        return self.net(x)


def test_resnet18_like_tau1():
    # tau = 1: every call's moment ends equal to the top call's, whatever the graph, so the
    # reference needs no map beyond "each call's reference is the top" (the last conv to run)
    torch.manual_seed(0)
    model = ResNet18Like()
    n = len(_convs(model))
    _scaled(model, [0.5 + (k % 5) * 0.6 for k in range(n)])
    top = n - 1
    _compare(model, lambda m, new: _one_backward(m, new, (4, 3, 16, 16)),
             {k: [top] for k in range(top)})


class Siamese(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(_unit(3, 6), _unit(6, 6), _unit(6, 6))
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        a, b = x.chunk(2, 1)
        return self.fc(torch.cat([self.encoder(a).mean((2, 3)), self.encoder(b).mean((2, 3))], 1))


def test_siamese_two_forward_passes_of_one_encoder():
    torch.manual_seed(0)
    model = _scaled(Siamese(), [1, 3, 0.4])
    # calls 0-2: the first pass, 3-5: the second; each pass is a chain of its own
    above = {0: [1], 1: [2], 3: [4], 4: [5]}
    _compare(model, lambda m, new: _one_backward(m, new, (4, 6, 8, 8)), above, tau=1.0)


def test_a_second_grad_enabled_forward_before_backward():
    torch.manual_seed(0)
    model = _scaled(Net(Block(6, 6)), [1, 3, 0.3])

    def run(m, new):
        torch.manual_seed(3)
        x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
        new()
        loss = F.cross_entropy(m(x), y)
        m(torch.randn(2, 3, 8, 8)).sum()  # a logging pass without no_grad, never backpropagated
        loss.backward()

    # calls 0-2 (the training pass): stem, a, b; calls 3-5 (the logging pass) never get an error
    _compare(model, run, {0: [1], 1: [2], 3: [4], 4: [5]}, tau=1.0)


def test_two_losses_with_retain_graph():
    torch.manual_seed(0)
    model = _scaled(TwoBranch(), [1, 3, 0.3, 2.5, 0.5])

    def run(m, new):
        torch.manual_seed(3)
        x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
        out = m(x)
        new()
        F.cross_entropy(out, y).backward(retain_graph=True)
        new()  # each backward call on its own moments
        out.square().mean().backward()

    _compare(model, run, {0: [1, 3], 1: [2], 2: [4], 3: [4]}, tau=1.2)


def test_a_layer_called_twice_in_one_pass():
    torch.manual_seed(0)

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.shared, self.fc = _unit(3, 6), _unit(6, 6), nn.Linear(6, 5)

        def forward(self, x):
            return self.fc(self.shared(self.shared(self.stem(x))).mean((2, 3)))

    model = _scaled(Recurrent(), [1, 3])
    _compare(model, _one_backward, {0: [1], 1: [2]}, tau=1.0)


class Checkpointed(nn.Module):
    def __init__(self, reentrant=None):
        super().__init__()
        self.reentrant = reentrant
        self.stem = _unit(3, 6)
        self.blocks = nn.ModuleList([Block(6, 6), Block(6, 6)])
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x) if self.reentrant is None else checkpoint(block, x, use_reentrant=self.reentrant)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("tau", [1.0, 1.3])
def test_checkpointing_without_reentrance_is_followed_exactly(tau):
    torch.manual_seed(0)
    model = _scaled(Checkpointed(), [1, 3, 0.3, 2, 0.5])
    checkpointed = copy.deepcopy(model)
    checkpointed.reentrant = False
    above = {0: [1, 3], 1: [2], 2: [3], 3: [4]}
    # the literal rule on the net without checkpointing, the library on the checkpointed one
    literal_model = copy.deepcopy(model)
    literal = Literal(_convs(literal_model), above, tau)
    _one_backward(literal_model, literal.new_backward)
    literal.remove()
    with ErrorModulator(checkpointed, tau=tau) as modulator:
        _one_backward(checkpointed, lambda: None)
        assert modulator.statistics()["scales"][1:] != [1.0] * 4
    for g, e in zip(_grads(checkpointed), _grads(literal_model)):
        assert float((g - e).norm() / e.norm()) < 1e-10


def test_reentrant_checkpointing_is_refused_naming_the_layer():
    torch.manual_seed(0)
    model = Checkpointed(reentrant=True)
    with ErrorModulator(model):
        with pytest.raises(RuntimeError, match=r"layer 'blocks.1.b.0' was recomputed .*use_reentrant=False"):
            x = torch.randn(4, 3, 8, 8, requires_grad=True)
            F.cross_entropy(model(x), torch.randint(0, 5, (4,))).backward()


def test_transposed_convs_are_modulated():
    torch.manual_seed(0)
    model = nn.Sequential(_unit(3, 6, stride=2), nn.ConvTranspose2d(6, 4, 2, stride=2), nn.ReLU(),
                          nn.Conv2d(4, 3, 3, padding=1))
    _scaled(model, [1, 4, 0.3])

    def run(m, new):
        torch.manual_seed(3)
        new()
        m(torch.randn(2, 3, 8, 8)).square().mean().backward()

    _compare(model, run, {0: [1], 1: [2]}, tau=1.0)


def test_a_second_modulator_on_a_submodule_or_a_parent_is_refused():
    model = Net(Block(6, 6))
    with ErrorModulator(model.blocks):
        with pytest.raises(ValueError, match=r"layer 'blocks.0.a.0' already has an ErrorModulator"):
            ErrorModulator(model)
        ErrorModulator(model.stem).remove()  # other layers: fine


def test_filter_chooses_the_layers():
    model = Net(Block(6, 6))
    with ErrorModulator(model, filter=[nn.Conv2d, nn.Linear]) as with_fc:
        assert with_fc.layers[-1] is model.fc and len(with_fc.layers) == 4
    with ErrorModulator(model, filter=lambda name, m: name.startswith("blocks")) as blocks_only:
        assert len(blocks_only.layers) == 2
    with pytest.raises(ValueError, match="that the filter accepts"):
        ErrorModulator(model, filter=lambda name, m: False)
    with pytest.raises(ValueError, match="filter names BatchNorm2d, which is not a weight layer"):
        ErrorModulator(model, filter=[nn.BatchNorm2d])


def _compiled_backward(model, new_backward):
    torch._dynamo.reset()  # compiled code of the same class from elsewhere would skip this model's hooks
    _one_backward(torch.compile(model, backend="aot_eager"), new_backward)


def test_a_model_compiled_after_the_modulator_is_attached_is_modulated_exactly():
    torch.manual_seed(0)
    # calls: 0 stem, 1 a, 2 b (identity shortcut around a and b)
    model = _scaled(Net(Block(6, 6)), [1, 3, 0.3])
    _compare(model, _compiled_backward, {0: [1], 1: [2]}, tau=1.0)


def test_step_refuses_an_iteration_in_which_no_modulated_layer_ran():
    torch.manual_seed(0)
    model = _scaled(Net(Block(6, 6)), [1, 3, 0.3])
    modulator = ErrorModulator(model)
    modulator.step()  # the first call may come before any pass (a loop that steps first)
    _one_backward(model, lambda: None)
    modulator.step()
    with pytest.raises(RuntimeError, match=r"none of the modulated layers ran since the last step\(\)"):
        modulator.step()  # stepped twice
    modulator.remove()
    with ErrorModulator(model, until_step=0) as idle:  # neither modulating nor monitoring: nothing to miss
        idle.step(), idle.step()


def test_a_model_compiled_before_the_modulator_is_attached_is_refused_at_step():
    # torch.compile does not see module hooks added after compiling (dynamo skips guards on
    # them): the compiled model runs without the modulator's hooks and its gradients are not
    # modulated. step() says so instead of letting it train silently unmodulated.
    torch.manual_seed(0)
    model = _scaled(Net(Block(6, 6)), [1, 3, 0.3])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    _one_backward(compiled, lambda: None)
    unmodulated = _grads(model)
    modulator = ErrorModulator(model)
    model.zero_grad()
    _one_backward(compiled, lambda: None)
    assert all(torch.equal(a, b) for a, b in zip(_grads(model), unmodulated))  # the hooks did not run
    modulator.step()
    _one_backward(compiled, lambda: None)
    with pytest.raises(RuntimeError, match="compiled before the modulator was attached"):
        modulator.step()
    modulator.remove()
    # another instance of the class, modulator attached before its own compile: the code compiled
    # for the first instance serves it, hooks skipped again; resetting dynamo after attaching helps
    other = _scaled(Net(Block(6, 6)), [1, 3, 0.3])
    modulator = ErrorModulator(other)
    compiled = torch.compile(other, backend="aot_eager")
    for _ in range(2):
        _one_backward(compiled, lambda: None)
        assert not modulator.scales  # it saw no pass
    with pytest.raises(RuntimeError, match="another instance of its class"):
        modulator.step(), modulator.step()
    torch._dynamo.reset()
    other.zero_grad()
    _one_backward(compiled, lambda: None)
    modulator.step()
    assert modulator.scaled == [True, True, False]
    modulator.remove()
    torch._dynamo.reset()


def test_a_conv_output_changed_in_place_is_modulated_as_the_same_net_without():
    # ReLU(inplace=True) straight after a conv rewrites the tensor the hook was put on; the
    # error modulated must still be the one at the conv's output
    def net(inplace):
        torch.manual_seed(0)
        return _scaled(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace), nn.Conv2d(4, 4, 3, padding=1),
                                     nn.ReLU(inplace), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(inplace),
                                     nn.Flatten(), nn.Linear(5 * 64, 5)), [1, 3, 0.3])

    grads = []
    for inplace in (False, True):
        model = net(inplace)
        with ErrorModulator(model) as modulator:
            _one_backward(model, lambda: None)
            grads.append(_grads(model))
            assert modulator.scaled == [True, True, False]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_replicas_of_the_layers_are_refused_and_a_deep_copy_carries_a_modulator_of_its_own():
    torch.manual_seed(0)
    model = _scaled(Net(Block(6, 6)), [1, 3, 0.3])
    modulator = ErrorModulator(model)
    # nn.DataParallel runs per-device replicas made this way, which share the modulator's hooks
    replica = model.stem[0]._replicate_for_data_parallel()
    replica._parameters.update(weight=model.stem[0].weight, bias=None)  # replicate() gives it the device's copies
    with torch.no_grad():
        replica(torch.randn(2, 3, 8, 8))  # inference through replicas: nothing to modulate
    with pytest.raises(RuntimeError, match="nn.DataParallel's per-device replicas.*DistributedDataParallel"):
        replica(torch.randn(2, 3, 8, 8))
    # copy.deepcopy (an EMA model, a teacher) copies the modulator with the layers: the copy is
    # modulated by its own, exactly as the original, and the original sees none of it
    _one_backward(model, lambda: None)
    twin = copy.deepcopy(model)
    twin.zero_grad(), model.zero_grad()
    _one_backward(twin, lambda: None)
    (twin_modulator,) = {hook.__self__ for hook in twin.stem[0]._forward_hooks.values()}
    assert twin_modulator is not modulator and twin_modulator.scaled == [True, True, False]
    _one_backward(model, lambda: None)
    assert modulator.scaled == [True, True, False]
    assert all(torch.equal(a, b) for a, b in zip(_grads(twin), _grads(model)))
    modulator.remove()


def test_with_hook_guards_on_compiled_code_follows_the_modulator_in_any_order(monkeypatch):
    # skip_nnmodule_hook_guards = False: compiled code checks the module hooks, so a model compiled
    # before the modulator was attached, and an instance whose class was compiled elsewhere, are
    # both recompiled with the hooks and modulated as in eager mode
    monkeypatch.setattr(torch._dynamo.config, "skip_nnmodule_hook_guards", False)
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _scaled(Net(Block(6, 6)), [1, 3, 0.3])
    compiled_first, other = copy.deepcopy(eager), copy.deepcopy(eager)
    compiled = torch.compile(compiled_first, backend="aot_eager")
    _one_backward(compiled, lambda: None)  # compiled without hooks
    compiled_first.zero_grad()
    with ErrorModulator(eager) as reference:
        _one_backward(eager, lambda: None)
    for model, run in ((compiled_first, compiled), (other, torch.compile(other, backend="aot_eager"))):
        with ErrorModulator(model) as modulator:
            modulator.step()
            _one_backward(run, lambda: None)
            modulator.step()  # raises if the compiled code ran without the hooks
            assert modulator.scales == pytest.approx(reference.scales, rel=1e-6) and modulator.scaled == [True, True, False]
        for a, b in zip(_grads(model), _grads(eager)):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    torch._dynamo.reset()
