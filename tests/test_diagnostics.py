import json
import math

import pytest
import torch
from torch import nn

from conftest import tiny_config
from orthomod.diagnostics import (bn_jacobian, filter_correlation, filter_correlation_of, gradient_norms,
                                  moment_ratios, orthogonality_residuals)
from orthomod.init import orthonormal_
from orthomod.models import create
from orthomod.modulation import ErrorModulator
from orthomod.train import Trainer


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
