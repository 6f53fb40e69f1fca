import math

import pytest
import torch
from torch import nn

from orthomod.init import group_slices, init_model_, lsuv_, orthonormal_
from orthomod.models import create

SHAPES = [
    (16, 3, 3, 3),    # f_out < f_in
    (27, 3, 3, 3),    # f_out = f_in
    (64, 3, 3, 3),    # f_out > f_in, not divisible (27 + 27 + 10)
    (54, 3, 3, 3),    # f_out > f_in, divisible
    (256, 64, 1, 1),  # 1x1 expansion: 4 groups of 64
    (100, 64, 1, 1),  # 1x1, remainder 36
    (10, 64),         # linear
    (300, 20),        # linear, group-wise
    (8, 4, 5),        # conv1d
    (8, 2, 3, 3, 3),  # conv3d
]


def _groups(weight):
    v = weight.reshape(weight.shape[0], -1)
    return [v[s] for s in group_slices(*v.shape)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_rows_orthonormal_per_group(shape, dtype, tol):
    w = orthonormal_(torch.empty(shape, dtype=dtype))
    f_out, f_in = shape[0], math.prod(shape[1:])
    groups = _groups(w)
    assert len(groups) == math.ceil(f_out / f_in)
    assert sum(g.shape[0] for g in groups) == f_out
    for g in groups:
        eye = torch.eye(g.shape[0], dtype=dtype)
        assert torch.allclose(g @ g.T, eye, atol=tol, rtol=0)


def test_groups_are_consecutive_full_then_remainder():
    assert group_slices(64, 27) == [slice(0, 27), slice(27, 54), slice(54, 64)]
    assert group_slices(16, 27) == [slice(0, 16)]
    assert group_slices(54, 27) == [slice(0, 27), slice(27, 54)]


def test_gain_scales_and_generator_reproduces():
    a = orthonormal_(torch.empty(8, 16, dtype=torch.float64), gain=2.0, generator=torch.Generator().manual_seed(3))
    b = orthonormal_(torch.empty(8, 16, dtype=torch.float64), gain=2.0, generator=torch.Generator().manual_seed(3))
    c = orthonormal_(torch.empty(8, 16, dtype=torch.float64), gain=2.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a @ a.T, 4 * torch.eye(8, dtype=torch.float64))


def test_in_place_on_parameter_and_returns_it():
    conv = nn.Conv2d(4, 8, 3)
    out = orthonormal_(conv.weight)
    assert out is conv.weight and conv.weight.requires_grad


def test_rejects_vectors_with_clear_message():
    with pytest.raises(ValueError, match=r"at least 2 dimensions.*\(5,\)"):
        orthonormal_(torch.empty(5))


def test_init_model_orthonormal_covers_every_conv_and_linear():
    model = init_model_(create("resnet20", init=None), "orthonormal")
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            for g in _groups(m.weight.detach().double()):
                assert torch.allclose(g @ g.T, torch.eye(g.shape[0], dtype=torch.float64), atol=1e-5)
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_init_model_msra_uses_fan_out_std():
    torch.manual_seed(0)
    model = create("plain20", init="msra")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    w = convs[-1].weight  # 64 x 64 x 3 x 3: 36864 samples
    expected = math.sqrt(2.0 / (64 * 9))
    assert abs(w.std().item() - expected) / expected < 0.02
    assert abs(w.mean().item()) < 0.05 * expected


def test_init_model_unknown_scheme():
    with pytest.raises(ValueError, match="unknown init scheme 'xavierr'; choose one of"):
        init_model_(nn.Linear(2, 2), "xavierr")


def test_orthonormal_refuses_integer_and_empty_tensors():
    with pytest.raises(TypeError, match="floating-point tensor, got torch.int64"):
        orthonormal_(torch.empty(4, 3, dtype=torch.int64))
    for shape in ((0, 3), (3, 0), (4, 0, 3, 3)):
        with pytest.raises(ValueError, match="cannot orthonormalize an empty weight"):
            orthonormal_(torch.empty(shape))


def _output_variances(model, x):
    """Each weight layer's output variance on x, read by hooks of the test's own."""
    seen = {}

    def record(name, output):
        seen.setdefault(name, float(output.var()))

    handles = [m.register_forward_hook(lambda m, i, o, name=name: record(name, o))
               for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def test_lsuv_gives_every_layer_unit_output_variance_and_only_rescales():
    torch.manual_seed(0)
    model = create("plain8", init="orthonormal", norm="none").double()
    x = 7.0 * torch.randn(32, 3, 32, 32, dtype=torch.float64)  # far from unit variance at the input
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() > 1}
    assert any(abs(v - 1) > 0.5 for v in _output_variances(model, x).values())
    returned = lsuv_(model, x, tol=0.05)
    variances = _output_variances(model.train(), x)
    assert len(returned) == len(variances) == 8
    assert all(abs(v - 1) < 0.05 for v in variances.values()), variances
    assert returned == pytest.approx(list(variances.values()), rel=1e-9)  # forward order
    for name, p in model.named_parameters():
        if p.dim() > 1:  # a positive multiple of the orthonormal weight: the direction is kept
            cosine = torch.nn.functional.cosine_similarity(p.detach().flatten(), before[name].flatten(), dim=0)
            assert float(cosine) == pytest.approx(1.0, abs=1e-12) and not torch.equal(p, before[name])


def test_lsuv_measures_a_layer_run_twice_at_its_first_call():
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.Tanh(), shared)  # one weight, two calls
    x = 5.0 * torch.randn(256, 6, dtype=torch.float32)
    (variance,) = lsuv_(model, x, tol=0.02)
    with torch.no_grad():
        first, second = float(shared(x).var()), float(model(x).var())  # read by the test itself
    assert variance == pytest.approx(first, rel=1e-6) and abs(first - 1) < 0.02
    assert abs(second - first) > 0.02  # the second call is not what was calibrated


def test_lsuv_leaves_bn_statistics_and_the_mode_as_they_were():
    torch.manual_seed(0)
    model = create("plain8", init="orthonormal").eval()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    lsuv_(model, torch.randn(16, 3, 32, 32))
    assert not model.training
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())


def test_lsuv_refuses_what_it_cannot_do():
    model = create("plain8", init="orthonormal")
    with pytest.raises(TypeError, match="floating-point batch"):
        lsuv_(model, torch.zeros(4, 3, 32, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="tol > 0 and max_iter >= 1"):
        lsuv_(model, torch.randn(4, 3, 32, 32), max_iter=0)
    with pytest.raises(ValueError, match="needs data"):
        init_model_(model, "lsuv")
    dead = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    nn.init.zeros_(dead[0].weight), nn.init.zeros_(dead[0].bias)
    with pytest.raises(ValueError, match="layer '0' has output variance 0.0"):
        lsuv_(dead, torch.randn(4, 3, 8, 8))
    unused = nn.ModuleDict({"used": nn.Linear(3, 3), "spare": nn.Linear(3, 3)})
    unused.forward = lambda x: unused["used"](x)
    with pytest.raises(ValueError, match="never reaches weight layer"):
        lsuv_(unused, torch.randn(4, 3))


def test_lsuv_warns_naming_a_layer_it_could_not_settle():
    # biases it does not scale spread the outputs by more than any weight scale can take back
    model = nn.Sequential(nn.Linear(5, 5))
    with torch.no_grad():
        model[0].bias.copy_(10.0 * torch.arange(5.0))
    with pytest.warns(UserWarning, match=r"still outside 1 \+- 0.1 after 3 scalings: 0 \("):
        variances = lsuv_(model, torch.randn(64, 5), max_iter=3)
    assert variances[0] > 100
