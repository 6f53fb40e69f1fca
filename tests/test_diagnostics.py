import json
import math

import pytest
import torch
from torch import nn

from conftest import tiny_config
from orthomod.diagnostics import (bn_jacobian, filter_correlation, filter_correlation_of, filter_norms,
                                  gradient_norms, moment_ratios, orthogonality_residuals, signal_propagation)
from orthomod.init import orthonormal_
from orthomod.models import create
from orthomod.modulation import ErrorModulator
from orthomod.train import Trainer, initial_model


def test_filter_correlation_constructed_weights():
    assert filter_correlation_of(orthonormal_(torch.empty(16, 4, 3, 3, dtype=torch.float64))) < 1e-12
    same = torch.randn(1, 27).repeat(5, 1)
    assert filter_correlation_of(same * torch.tensor([1.0, -2.0, 3.0, 0.5, -1.0])[:, None]) == pytest.approx(1.0)
    # two filters 60 degrees apart: |cos| = 0.5 for the single pair
    pair = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    assert filter_correlation_of(pair) == pytest.approx(0.5)
    # three filters: e1, e1, e2 -> pairs (1,2)=1, (1,3)=0, (2,3)=0 -> mean 1/3
    assert filter_correlation_of(torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0]])) == pytest.approx(1 / 3)


def test_model_level_probes_on_orthonormal_init():
    model = create("plain20", init="orthonormal")
    corr = filter_correlation(model)
    assert len(corr["layers"]) == 19 and corr["mean"] < 1e-6
    assert max(orthogonality_residuals(model)) < 1e-5
    assert gradient_norms(model) == [None] * 19
    msra = filter_correlation(create("plain20", init="msra"))
    assert msra["mean"] > 10 * corr["mean"]
    assert filter_norms(model) == pytest.approx([1.0] * 19)  # V V^T = I: unit rows


def test_filter_norms_are_the_mean_norm_of_each_layers_filters_groups_included():
    grouped = nn.Conv2d(4, 6, 3, groups=2, bias=False)  # 6 filters of 2 x 3 x 3 = 18 inputs each
    with torch.no_grad():
        grouped.weight.copy_(torch.arange(1.0, 7.0)[:, None, None, None].expand(6, 2, 3, 3))
    plain = nn.Conv2d(2, 2, 1, bias=False)
    with torch.no_grad():
        plain.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, -1.0]])[:, :, None, None])  # norms 5 and 1
    norms = filter_norms(nn.Sequential(grouped, nn.Linear(2, 2), plain))  # the linear layer is not a conv
    assert norms == pytest.approx([3.5 * math.sqrt(18), 3.0])  # filter i holds i + 1 everywhere: (1..6) * sqrt(18)


def test_moment_ratios_exact_on_known_chain():
    scales = [1.0, 2.0, 0.5, 3.0]
    chain = nn.Sequential(*[nn.Conv2d(4, 4, 1, bias=False) for _ in scales]).double()
    for conv, s in zip(chain, scales):
        orthonormal_(conv.weight, gain=s)
    with ErrorModulator(chain, until_step=0, monitor=True) as probe:
        (chain(torch.randn(3, 4, 5, 5, dtype=torch.float64)) * torch.randn(3, 4, 5, 5, dtype=torch.float64)).sum().backward()
        ratios = moment_ratios(probe.moments_before)
    # q^l / q^L = prod of s_k^2 over the layers above l
    assert ratios["per_layer"] == pytest.approx([(2 * 0.5 * 3) ** 2, (0.5 * 3) ** 2, 9.0, 1.0], rel=1e-10)
    assert ratios["first_over_last"] == pytest.approx(9.0, rel=1e-10)
    assert moment_ratios([2.0, 4.0]) == {"first_over_last": 0.5, "per_layer": [0.5, 1.0]}


@pytest.mark.parametrize("m,gamma", [(16, 1.0), (64, 1.7), (128, 0.3)])
def test_bn_jacobian_is_quasi_isometric(m, gamma):
    torch.manual_seed(m)
    x = torch.randn(m, dtype=torch.float64) * 2 + 1
    out = bn_jacobian(x, gamma=gamma, eps=1e-5)
    eig, rho2 = out["eigenvalues"], out["rho2"]
    assert out["jacobian"].shape == (m, m)
    assert rho2 == pytest.approx(gamma**2 / (x.var(unbiased=False).item() + 1e-5))
    # two near-zero eigenvalues (the mean direction and, up to eps, the normalized input) ...
    assert eig[0].abs() < 1e-10 * rho2 and eig[1] < 1e-4 * rho2
    # ... and all others equal rho^2
    assert torch.allclose(eig[2:], torch.full_like(eig[2:], rho2), rtol=1e-9)
    assert out["relative_deviation"] < 1e-9
    # the Jacobian is rho (I - 11^T/m - c x_hat x_hat^T/m), c = var / (var + eps)
    var = x.var(unbiased=False)
    xhat = (x - x.mean()) / var.sqrt()
    c = var / (var + 1e-5)
    analytic = math.sqrt(rho2) * (torch.eye(m, dtype=x.dtype) - 1 / m - c * torch.outer(xhat, xhat) / m)
    assert torch.allclose(out["jacobian"], analytic, atol=1e-10)


def test_bn_jacobian_rejects_tiny_batch():
    with pytest.raises(ValueError, match="at least 3 values, got 2"):
        bn_jacobian(torch.ones(2))


def test_trainer_records_diagnostics_at_interval(tmp_path):
    config = tiny_config(tmp_path, iterations=12, diagnostics_every=4, init="orthonormal", reg="ortho",
                         modulation=True, modulation_tau=1.0, modulation_until=6)
    Trainer(config, progress=False).run()
    lines = [json.loads(l) for l in (tmp_path / "run" / "diagnostics.jsonl").read_text().splitlines()]
    assert lines[0]["kind"] == "layers" and len(lines[0]["names"]) == 7
    records = lines[1:]
    assert [r["step"] for r in records] == [4, 8, 12]
    for r in records:
        for key in ("filter_correlation", "error_moments_before", "error_moments_after", "modulation_scales",
                    "ortho_residual", "grad_norm"):
            assert len(r[key]) == 7, key
        assert all(q > 0 for q in r["error_moments_before"])
        assert r["moment_ratio_first_last"] == pytest.approx(r["error_moments_after"][0] / r["error_moments_after"][-1])
    # modulation "always" in the first 6 steps: equal moments at step 4; none after
    assert records[0]["error_moments_after"] == pytest.approx([records[0]["error_moments_after"][-1]] * 7, rel=2e-2)
    assert any(s != 1.0 for s in records[0]["modulation_scales"])
    assert records[1]["modulation_scales"] == [1.0] * 7 and records[1]["error_moments_after"] == records[1]["error_moments_before"]


def test_signal_propagation_closed_form_on_a_scaled_orthogonal_chain():
    # 1x1 convs C -> C with weights c_l * Q_l (Q_l orthogonal), no nonlinearity, logits = the last
    # conv's output: the signal's moment gains c_l^2 at each layer going up, the error's c_l^2 at
    # each layer going down, and the top error is (softmax(z) - onehot(y)) / N
    scales = [2.0, 0.5, 3.0, 1.5]
    c, n = 5, 7
    net = nn.Sequential(*[nn.Conv2d(c, c, 1, bias=False) for _ in scales], nn.Flatten(1)).double()
    for conv, scale in zip(net, scales):
        with torch.no_grad():
            conv.weight.copy_(scale * orthonormal_(torch.empty(c, c, 1, 1, dtype=torch.float64)))
    x = torch.randn(n, c, 1, 1, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    out = signal_propagation(net, x, y)
    assert out["names"] == ["0", "1", "2", "3"]
    gains = torch.tensor(scales, dtype=torch.float64) ** 2
    expected_up = x.square().mean() * torch.cumprod(gains, 0)
    assert out["forward"] == pytest.approx(expected_up.tolist(), rel=1e-12)
    logits = net(x)
    top = ((logits.softmax(1) - nn.functional.one_hot(y, c)) / n).square().mean()
    below = torch.cat([torch.flip(torch.cumprod(torch.flip(gains[1:], [0]), 0), [0]), torch.ones(1, dtype=gains.dtype)])
    assert out["errors"] == pytest.approx((top * below).tolist(), rel=1e-10)
    assert out["forward_last_over_first"] == pytest.approx(float(gains[1:].prod()), rel=1e-12)
    assert out["errors_first_over_last"] == pytest.approx(float(gains[1:].prod()), rel=1e-10)


def test_signal_propagation_leaves_the_model_as_it_was():
    model = create("plain8", init="orthonormal")
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = signal_propagation(model, torch.randn(8, 3, 32, 32), torch.arange(8) % 10)
    assert len(out["names"]) == len(out["forward"]) == len(out["errors"]) == 7
    assert all(math.isfinite(v) and v > 0 for v in out["forward"] + out["errors"])
    assert not model.training  # the copy ran in training mode, not the model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN's running stats too
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())
    ErrorModulator(model).remove()  # no modulator left attached to its layers


def test_signal_propagation_refuses_a_layer_run_twice_a_model_without_convs_and_a_modulated_one():
    conv = nn.Conv2d(3, 3, 1)
    with pytest.raises(ValueError, match="layer '0' ran twice in one forward pass"):
        signal_propagation(nn.Sequential(conv, conv, nn.Flatten(1)), torch.randn(2, 3, 1, 1), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="found no layers to measure"):
        signal_propagation(nn.Linear(3, 3), torch.randn(2, 3), torch.tensor([0, 1]))

    class Unused(nn.Module):  # a conv the forward pass never calls
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 3, 1), nn.Linear(3, 2)

        def forward(self, x):
            return self.head(x)

    with pytest.raises(ValueError, match="none of the layers signal_propagation measures ran"):
        signal_propagation(Unused(), torch.randn(2, 3), torch.tensor([0, 1]))
    model = create("plain8")
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    modulator = ErrorModulator(model)
    with pytest.raises(ValueError, match="layer '0.0' has an ErrorModulator attached"):
        signal_propagation(model, x, y)
    modulator.remove()
    assert signal_propagation(model, x, y)["errors_first_over_last"] != pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("changes", [{}, {"init": "lsuv", "norm": "none"}])
def test_initial_model_is_the_trainers_model_at_step_0(tmp_path, changes):
    config = tiny_config(tmp_path, **changes)
    model, images, labels = initial_model(config)
    trainer = Trainer(config, progress=False)
    assert images.shape == (50, 3, 32, 32) and labels.shape == (50,)
    theirs = trainer.model.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())
    x, y = next(iter(trainer.train_loader.epoch(0, 0, first_step=0)))
    assert torch.equal(images, x) and torch.equal(labels, y)
