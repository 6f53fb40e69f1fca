"""Every weight layer handled or named: transposed and grouped convs, parametrized weights, filter=.

References are written out here: a grouped conv as the dense block-diagonal conv it equals, a
transposed conv through autograd of the map it computes.
"""
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from orthomod.diagnostics import filter_correlation, filter_correlation_of, orthogonality_residuals, weighted_layers
from orthomod.init import delta_orthogonal_, init_model_, orthonormal_
from orthomod.modulation import ErrorModulator
from orthomod.regularizers import (ConvOrthogonalityRegularizer, OrthonormalRegularizer, SRIPRegularizer,
                                   make_regularizer, orthonormal_penalty)
from orthomod.weights import filter_matrices, weight_from_filters


def _dense(weight, groups):
    """A grouped conv weight (C_out, C_in/g, k...) as the ungrouped (C_out, C_in, k...) it equals."""
    c_out, per_group = weight.shape[:2]
    dense = weight.new_zeros((c_out, per_group * groups) + tuple(weight.shape[2:]))
    rows = c_out // groups
    for g in range(groups):
        dense[g * rows:(g + 1) * rows, g * per_group:(g + 1) * per_group] = weight[g * rows:(g + 1) * rows]
    return dense


def _gram_residual(v):
    return v @ v.T - torch.eye(v.shape[0], dtype=v.dtype)


def test_grouped_conv_equals_its_dense_block_diagonal_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1, groups=4, bias=False).double()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    assert torch.allclose(conv(x), F.conv2d(x, _dense(conv.weight, 4), padding=1))  # the reference is right


def test_orthonormal_init_per_conv_group():
    conv = nn.Conv2d(8, 8, 3, groups=4, bias=False).double()
    init_model_(conv, "orthonormal")
    v = _dense(conv.weight.detach(), 4).reshape(8, -1)
    assert torch.allclose(v @ v.T, torch.eye(8, dtype=torch.float64), atol=1e-12)


def test_depthwise_conv_with_unit_filters_has_zero_penalty_and_gradient():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, groups=16, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(F.normalize(conv.weight.reshape(16, -1), dim=1).reshape(conv.weight.shape))
    conv.weight.grad = torch.zeros_like(conv.weight)
    reg = OrthonormalRegularizer(conv, coeff=1.0)
    assert float(reg.penalty()) < 1e-24
    reg.add_grad_()
    assert float(conv.weight.grad.abs().max()) < 1e-12
    # the ungrouped reading (one matrix of 16 filters over 9 inputs) is far from orthonormal
    assert float(orthonormal_penalty(conv.weight.detach())) > 1.0


@pytest.mark.parametrize("groups, c_in, c_out", [(4, 8, 8), (2, 4, 12), (3, 12, 3)])
def test_grouped_penalty_and_gradient_equal_the_dense_conv(groups, c_in, c_out):
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, 3, groups=groups, bias=False).double()
    conv.weight.grad = torch.zeros_like(conv.weight)
    reg = OrthonormalRegularizer(conv, coeff=0.5)
    reg.add_grad_()
    w = conv.weight.detach().clone().requires_grad_()
    dense = _dense(w, groups).reshape(c_out, -1)  # f_out <= f_in here: a single orthonormal group
    expected = 0.25 * _gram_residual(dense).square().sum()
    expected.backward()
    assert float(reg.penalty()) == pytest.approx(float(expected.detach()), rel=1e-12)
    assert torch.allclose(conv.weight.grad, w.grad, rtol=1e-10, atol=1e-14)


def test_transposed_conv_filters_are_its_output_channels():
    torch.manual_seed(0)
    deconv = nn.ConvTranspose2d(6, 4, 3, stride=2, bias=False).double()
    v = filter_matrices(deconv.weight, transposed=True)
    assert v.shape == (1, 4, 6 * 9)
    for o in range(4):  # row o: every weight producing output channel o
        assert torch.equal(v[0, o], deconv.weight[:, o].reshape(-1))
    assert torch.equal(weight_from_filters(v, deconv.weight.shape, transposed=True), deconv.weight)


def test_transposed_conv_orthonormal_init_preserves_error_norms():
    # ConvTranspose2d(8 -> 4, 1x1): y = V x per pixel with V (4, 8); V V^T = I makes the map a
    # co-isometry, so the error reaching its input has the norm of the error at its output
    torch.manual_seed(0)
    deconv = nn.ConvTranspose2d(8, 4, 1, bias=False).double()
    init_model_(deconv, "orthonormal")
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    e = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    (deconv(x) * e).sum().backward()
    assert float(x.grad.norm()) == pytest.approx(float(e.norm()), rel=1e-12)


def test_transposed_conv_penalty_gradient_is_autograd_of_its_output_filter_view():
    torch.manual_seed(0)
    deconv = nn.ConvTranspose2d(6, 4, 3, groups=2, bias=False).double()  # weight (6, 2, 3, 3)
    deconv.weight.grad = torch.zeros_like(deconv.weight)
    reg = OrthonormalRegularizer(deconv, coeff=1.0)
    reg.add_grad_()
    w = deconv.weight.detach().clone().requires_grad_()
    expected = 0.0
    for g in range(2):  # group g: inputs 3g..3g+2, outputs 2g, 2g+1; row o = w[inputs, o]
        v = w[3 * g:3 * g + 3].transpose(0, 1).reshape(2, -1)
        expected = expected + 0.5 * _gram_residual(v).square().sum()
    expected.backward()
    assert float(reg.penalty()) == pytest.approx(float(expected.detach()), rel=1e-12)
    assert torch.allclose(deconv.weight.grad, w.grad, rtol=1e-10, atol=1e-14)


def test_msra_on_a_transposed_conv_uses_the_outputs_each_input_feeds():
    deconv = nn.ConvTranspose2d(64, 32, 3, bias=False)
    init_model_(deconv, "msra", generator=torch.Generator().manual_seed(0))
    # He's fan_out for a transposed conv: each input feeds C_out * k * k = 288 outputs
    assert float(deconv.weight.detach().std()) == pytest.approx((2 / 288) ** 0.5, rel=0.03)


def test_delta_orthogonal_transposed_conv_preserves_norms():
    torch.manual_seed(0)
    deconv = nn.ConvTranspose2d(4, 8, 3, padding=1, bias=False).double()
    init_model_(deconv, "delta-orthogonal")
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    assert float(deconv(x).detach().norm()) == pytest.approx(float(x.norm()), rel=1e-12)


def test_srip_on_a_grouped_conv_is_the_spectral_norm_of_the_dense_layer():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 9, 1, groups=3, bias=False).double()
    reg = SRIPRegularizer(conv, coeff=1.0, generator=torch.Generator().manual_seed(1))
    reg._refine(iterations=500)
    dense = _dense(conv.weight.detach(), 3).reshape(9, -1)
    sigma = torch.linalg.matrix_norm(_gram_residual(dense), ord=2)
    assert reg.residuals()[0] == pytest.approx(float(sigma), rel=1e-8)
    # its gradient: that of the dense spectral norm, on the group entries
    conv.weight.grad = torch.zeros_like(conv.weight)
    reg.iterations = 500
    reg.add_grad_()
    w = conv.weight.detach().clone().requires_grad_()
    torch.linalg.matrix_norm(_gram_residual(_dense(w, 3).reshape(9, -1)), ord=2).backward()
    assert torch.allclose(conv.weight.grad, w.grad, rtol=1e-6, atol=1e-10)


def test_filter_correlation_counts_other_groups_as_uncorrelated():
    torch.manual_seed(0)
    w = torch.randn(8, 2, 3, 3, dtype=torch.float64)
    dense = _dense(w, 4)
    assert filter_correlation_of(w, groups=4) == pytest.approx(filter_correlation_of(dense), rel=1e-12)
    assert filter_correlation_of(torch.randn(16, 1, 3, 3), groups=16) == 0.0


# -- parametrized weights: refused by name where an exact action is not defined -------------------
def _weight_normed():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    parametrizations.weight_norm(net[2])
    return net


# the consumers that read each layer's weight (the modulator needs none)
WEIGHT_READERS = [lambda m: init_model_(m, "orthonormal"), lambda m: OrthonormalRegularizer(m),
                  lambda m: SRIPRegularizer(m), lambda m: ConvOrthogonalityRegularizer(m)]


@pytest.mark.parametrize("make", WEIGHT_READERS)
def test_parametrized_weights_are_refused_naming_the_layer(make):
    with pytest.raises(ValueError, match=r"layer '2' has a parametrized weight \(_WeightNorm\).*filter="):
        make(_weight_normed())
    old_style = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the hook-based weight_norm
        nn.utils.weight_norm(old_style[1])
    with pytest.raises(ValueError, match=r"layer '1' computes its weight in a forward pre-hook"):
        make(old_style)


def test_filter_leaves_the_parametrized_layer_out_and_the_modulator_takes_it():
    net = _weight_normed()
    reg = OrthonormalRegularizer(net, filter=lambda name, m: name != "2")
    assert reg.params == [net[0].weight]
    with ErrorModulator(net) as modulator:  # scaling errors does not touch weights: any weight works
        net(torch.randn(2, 3, 8, 8)).square().mean().backward()
        assert len(modulator.scales) == 2
    assert net[2].parametrizations.weight.original1.grad is not None


def _lazy():
    return nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d(), nn.ReLU(), nn.LazyConv2d(4, 3))


@pytest.mark.parametrize("make", WEIGHT_READERS)
def test_lazy_layers_before_their_first_pass_are_refused_naming_the_layer(make):
    with pytest.raises(ValueError, match=r"layer '0' \(LazyConv2d\) has no weight yet.*run the model once"):
        make(_lazy())
    net = _lazy()
    net(torch.randn(2, 3, 8, 8))  # materialized: an ordinary conv net now
    make(net)


def test_the_modulator_takes_lazy_layers_before_their_first_pass():
    net = _lazy()
    with ErrorModulator(net) as modulator:  # it needs no weight, only the layers' outputs
        net(torch.randn(2, 3, 8, 8)).square().mean().backward()
        assert len(modulator.scales) == 2 and modulator.scaled == [True, False]


# -- one definition, filter=, and what is left out is said -----------------------------------------
class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 3)
        self.conv = nn.Conv2d(3, 4, 3)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.fc = nn.Linear(4, 2)


def test_every_consumer_names_what_it_cannot_handle(caplog):
    model = _Mixed()
    for make in (lambda: init_model_(model, "orthonormal"), lambda: OrthonormalRegularizer(model),
                 lambda: ErrorModulator(model).remove(), lambda: weighted_layers(model)):
        with pytest.warns(UserWarning, match=r"leaves out 1 module\(s\) with matrix-shaped parameters it does not "
                                             r"handle: 'emb' \(Embedding\)"):
            make()
    with caplog.at_level(logging.INFO, logger="orthomod"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ErrorModulator(model).remove()
            OrthonormalRegularizer(model, filter=[nn.Conv2d])
    assert "ErrorModulator: its default leaves out 'fc' (Linear)" in caplog.text
    assert "OrthonormalRegularizer: the filter leaves out 'up' (ConvTranspose2d), 'fc' (Linear)" in caplog.text


def test_filter_on_every_consumer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    fc_before = model[3].weight.detach().clone()
    not_fc = lambda name, m: not isinstance(m, nn.Linear)  # noqa: E731
    init_model_(model, "orthonormal", filter=not_fc)
    assert torch.equal(model[3].weight, fc_before)
    assert [p is model[0].weight for p in OrthonormalRegularizer(model, filter=not_fc).params] == [True, False]
    assert len(make_regularizer("srip", model, filter=[nn.Linear]).params) == 1
    assert [name for name, _ in weighted_layers(model, filter=[nn.Conv2d, nn.Linear])] == ["0", "1", "3"]
    assert len(filter_correlation(model, filter=[nn.Linear])["layers"]) == 1
    assert len(orthogonality_residuals(model)) == 2
    with pytest.raises(ValueError, match="filter names Embedding, which is not a weight layer"):
        init_model_(model, "orthonormal", filter=[nn.Embedding])
    with pytest.raises(ValueError, match="filter must be a predicate .* got 'conv'"):
        weighted_layers(model, filter="conv")


# -- bad input: the library's wording --------------------------------------------------------------
@pytest.mark.parametrize("call, error, message", [
    (lambda: orthonormal_(torch.zeros(4, 4, dtype=torch.int64)), TypeError, "floating-point tensor, got torch.int64"),
    (lambda: orthonormal_(torch.empty(0, 3)), ValueError, "cannot orthonormalize an empty weight"),
    (lambda: orthonormal_(torch.empty(4, 3, 1), groups=3), ValueError, "groups=3 does not divide"),
    (lambda: orthonormal_penalty(torch.zeros(4, 4, dtype=torch.int32)), TypeError, "floating-point tensor"),
    (lambda: orthonormal_penalty(torch.empty(3, 0)), ValueError, "empty weight"),
    (lambda: delta_orthogonal_(torch.zeros(4, 4, 3, 3, dtype=torch.int64)), TypeError, "floating-point tensor"),
    (lambda: delta_orthogonal_(torch.empty(0, 4, 3, 3)), ValueError, "non-empty Conv1d/2d/3d weight"),
    (lambda: OrthonormalRegularizer([torch.zeros(4, 4, dtype=torch.int64)]), TypeError, "floating-point tensor"),
    (lambda: OrthonormalRegularizer([torch.empty(0, 4)]), ValueError, "empty weight"),
    (lambda: SRIPRegularizer([torch.zeros(4, 4, dtype=torch.int64)]), TypeError, "floating-point tensor"),
    (lambda: OrthonormalRegularizer(nn.Conv2d(3, 4, 3), filter=[nn.Conv2d], coeff=-1), ValueError, "coeff must be"),
    (lambda: OrthonormalRegularizer([torch.ones(3, 3)], filter=[nn.Conv2d]), ValueError, "filter= selects layers"),
])
def test_bad_input_gets_the_library_wording(call, error, message):
    with pytest.raises(error, match=message):
        call()


def _tied(second=None):
    """Two layers holding one weight tensor (tied weights)."""
    torch.manual_seed(0)
    first = nn.Conv2d(4, 4, 3, padding=1)
    second = second or nn.Conv2d(4, 4, 3, padding=1)
    second.weight = first.weight
    return nn.Sequential(first, nn.ReLU(), second)


@pytest.mark.parametrize("make", [OrthonormalRegularizer, SRIPRegularizer, ConvOrthogonalityRegularizer])
def test_a_weight_shared_by_two_layers_is_regularized_once(make):
    tied = _tied()
    alone = nn.Sequential(tied[0])  # the same tensor, held by one layer
    torch.manual_seed(1)
    reg = make(tied)
    torch.manual_seed(1)
    single = make(alone)
    assert reg.params == single.params == [tied[0].weight]
    assert torch.equal(reg.penalty(), single.penalty())
    tied[0].weight.grad = torch.zeros_like(tied[0].weight)
    reg.add_grad_()
    once = tied[0].weight.grad.clone()
    tied[0].weight.grad.zero_()
    single.add_grad_()
    assert torch.equal(once, tied[0].weight.grad) and once.abs().sum() > 0


def test_a_shared_weight_is_initialized_once_and_its_layouts_must_agree():
    tied = _tied()
    tied[2].bias.data.fill_(1.0)
    init_model_(tied, "orthonormal")
    v = tied[0].weight.reshape(4, -1)
    assert torch.allclose(v @ v.T, torch.eye(4), atol=1e-6) and torch.equal(tied[2].bias, torch.zeros(4))
    from orthomod.init import lsuv_
    (variance,) = lsuv_(tied, torch.randn(8, 4, 6, 6))  # scaled once, for its first layer
    with torch.no_grad():
        assert float(tied[0](torch.randn(8, 4, 6, 6)).var()) == pytest.approx(1.0, abs=0.3)
    mixed = _tied(nn.ConvTranspose2d(4, 4, 3, padding=1))  # the same tensor read with in and out swapped
    for make in WEIGHT_READERS[:3]:
        with pytest.raises(ValueError, match=r"layers '0' \(Conv2d\) and '2' \(ConvTranspose2d\) share one weight"):
            make(mixed)
    strided = _tied(nn.Conv2d(4, 4, 3, stride=2, padding=1))  # conv-orthogonality depends on the stride
    with pytest.raises(ValueError, match="share one weight but lay it out differently"):
        ConvOrthogonalityRegularizer(strided)
    OrthonormalRegularizer(strided)  # V does not: one weight, taken once
