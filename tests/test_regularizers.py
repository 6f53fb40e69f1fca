import pytest
import torch
from torch import nn

from orthomod.init import group_slices, orthonormal_
from orthomod.models import create
from orthomod.regularizers import OrthonormalRegularizer, orthonormal_penalty, split_decay_parameters

SHAPES = [(16, 3, 3, 3), (27, 3, 3, 3), (64, 3, 3, 3), (256, 64, 1, 1), (10, 64), (300, 20)]


def _reference_penalty(w):
    """Direct transcription of docs/METHOD-NOTES.md, Orthonormality regularizer, one group at a time."""
    v = w.reshape(w.shape[0], -1)
    total = 0.0
    for s in group_slices(*v.shape):
        g = v[s]
        total = total + ((g @ g.T - torch.eye(g.shape[0], dtype=w.dtype)) ** 2).sum()
    return total


@pytest.mark.parametrize("shape", SHAPES)
def test_penalty_zero_on_orthonormal_weights(shape):
    w = orthonormal_(torch.empty(shape, dtype=torch.float64))
    assert orthonormal_penalty(w).item() < 1e-24


@pytest.mark.parametrize("shape", SHAPES)
def test_penalty_matches_definition(shape):
    w = torch.randn(shape, dtype=torch.float64) * 0.3
    assert torch.allclose(orthonormal_penalty(w), _reference_penalty(w), rtol=1e-12)


def test_penalty_of_scaled_identity_is_exact():
    # V = 2 I (4x4): V V^T - I = 3 I, ||.||^2 = 4 * 9
    assert orthonormal_penalty(2 * torch.eye(4, dtype=torch.float64)).item() == pytest.approx(36.0)


def test_cross_group_products_not_penalized():
    # two identical orthonormal groups stacked: each group is orthonormal, so R = 0 group-wise
    g = orthonormal_(torch.empty(4, 4, dtype=torch.float64))
    assert orthonormal_penalty(torch.cat([g, g])).item() < 1e-24


def test_add_grad_equals_autograd_of_penalty_and_loss():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s, dtype=torch.float64) * 0.2) for s in SHAPES + [(16, 3, 3, 3)]]
    coeff = 3e-3
    reg = OrthonormalRegularizer(params, coeff)
    # autograd of coeff/2 * sum penalty, one weight at a time
    expected = torch.autograd.grad(sum(coeff / 2 * orthonormal_penalty(p) for p in params), params)
    # the differentiable loss() agrees
    via_loss = torch.autograd.grad(reg.loss(), params)
    for p in params:
        p.grad = torch.zeros_like(p)
    reg.add_grad_()
    for p, e, l in zip(params, expected, via_loss):
        assert torch.allclose(p.grad, e, rtol=1e-10, atol=1e-14)
        assert torch.allclose(l, e, rtol=1e-10, atol=1e-14)
        # and the closed form 2 lambda (V V^T - I) V for ungrouped weights
        v = p.detach().reshape(p.shape[0], -1)
        if v.shape[0] <= v.shape[1]:
            closed = 2 * coeff * (v @ v.T - torch.eye(v.shape[0], dtype=v.dtype)) @ v
            assert torch.allclose(p.grad.reshape(v.shape), closed, rtol=1e-10, atol=1e-14)
    assert torch.allclose(reg.penalty(), sum(coeff / 2 * _reference_penalty(p.detach()) for p in params), rtol=1e-12)


def test_add_grad_adds_to_existing_grad_and_skips_missing():
    a = nn.Parameter(torch.randn(8, 16, dtype=torch.float64))
    b = nn.Parameter(torch.randn(8, 16, dtype=torch.float64))
    a.grad = torch.ones_like(a)
    reg = OrthonormalRegularizer([a, b], coeff=0.5)
    reg.add_grad_()
    (expected,) = torch.autograd.grad(0.25 * orthonormal_penalty(a), [a])
    assert torch.allclose(a.grad, 1 + expected)
    assert b.grad is None


def test_channels_last_model_same_as_contiguous():
    torch.manual_seed(0)
    model = create("plain8", init="msra")
    twin = create("plain8", init=None)
    twin.load_state_dict(model.state_dict())
    twin = twin.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32)
    for m, inp in ((model, x), (twin, x.to(memory_format=torch.channels_last))):
        m(inp).square().mean().backward()
        OrthonormalRegularizer(m, 1e-2).add_grad_()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_sgd_step_reduces_penalty_with_regularizer_alone():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(16, 32) * 0.1)
    reg = OrthonormalRegularizer([w], coeff=1.0)
    opt = torch.optim.SGD([w], lr=0.05)
    before = reg.penalty().item()
    for _ in range(50):
        w.grad = torch.zeros_like(w)
        reg.add_grad_()
        opt.step()
    assert reg.penalty().item() < 0.05 * before


def test_module_collection_takes_conv_and_linear_weights_only():
    model = create("plain20")
    reg = OrthonormalRegularizer(model, 1e-4)
    assert len(reg.params) == 19 + 1
    weights, others = split_decay_parameters(model)
    assert {id(p) for p in weights} == {id(p) for p in reg.params}
    assert all(p.dim() == 1 for p in others) and len(others) == 2 * 19 + 1


def test_rejects_bad_input():
    with pytest.raises(ValueError, match=r"at least 2 dimensions, got \(4,\)"):
        OrthonormalRegularizer([torch.zeros(4)])
    with pytest.raises(ValueError, match="coeff must be >= 0"):
        OrthonormalRegularizer(create("plain8"), coeff=-1)
    with pytest.raises(ValueError, match="no conv or linear weights"):
        OrthonormalRegularizer(nn.ReLU())
    w = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="a weight appears more than once"):
        OrthonormalRegularizer([w, w])


def regularizer_in_autocast(name, device, autocast):
    """Gradients and values of regularizer ``name`` on a nearly orthonormal plain-8 on ``device``,
    called inside a bf16 autocast region or not (also used by tests/test_cuda.py)."""
    from orthomod.regularizers import conv_orthogonality_penalty, make_regularizer

    torch.manual_seed(0)
    model = create("plain8", init="orthonormal").to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    reg = make_regularizer(name, model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
        reg.add_grad_()
        values = [reg.penalty(), reg.loss(), orthonormal_penalty(reg.params[0]),
                  conv_orthogonality_penalty(reg.params[0])]
    return [p.grad for p in model.parameters()], values


@pytest.mark.parametrize("name", ["ortho", "srip", "conv-ortho"])
def test_every_regularizer_computes_in_the_weights_dtype_inside_an_autocast_region(name):
    # a training step written inside torch.autocast must not run V V^T - I in bf16: for nearly
    # orthonormal weights the residual would be lost to rounding (35-78% off before the fix)
    (grads, values), (grads_in, values_in) = (regularizer_in_autocast(name, "cpu", a) for a in (False, True))
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_in))
    assert all(v.dtype == torch.float32 and torch.equal(a, v) for a, v in zip(values, values_in))


def test_srip_follows_its_weights_to_another_dtype():
    # a regularizer built before model.double() (or model.cuda()) keeps working, in the new dtype
    from orthomod.regularizers import SRIPRegularizer

    model = create("plain8", init="orthonormal")
    reg = SRIPRegularizer(model, generator=torch.Generator().manual_seed(0))
    model.double()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    reg.add_grad_()
    assert reg.penalty().dtype == torch.float64 and all(u.dtype == torch.float64 for u in reg.vectors)
    assert any(p.grad.abs().sum() > 0 for p in reg.params)
