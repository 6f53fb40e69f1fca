import math

import pytest
import torch
from torch import nn

from orthomod.init import group_slices, init_model_, orthonormal_
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
