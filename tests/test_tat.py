"""TAT through dks: the PyTorch layout handled, and the activation's kernel checked by quadrature.

The checks do not reuse dks's own computations: the mean-square preservation of the init is a
closed form, and the C map of the transformed activation is integrated here with Gauss-Hermite
quadrature.
"""
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("dks", reason="TAT needs the optional extra: pip install 'orthomod[tat]'")

from orthomod.cli import main  # noqa: E402
from orthomod.models import create  # noqa: E402
from orthomod.tat import TATActivation, init_tat_, suo_delta_  # noqa: E402


@pytest.mark.parametrize("c_in, c_out", [(16, 16), (16, 32), (3, 16)])
def test_suo_delta_preserves_the_mean_square_of_every_input(c_in, c_out):
    torch.manual_seed(0)
    w = suo_delta_(torch.empty(c_out, c_in, 3, 3, dtype=torch.float64))
    for seed in range(3):
        x = torch.randn(2, c_in, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        y = F.conv2d(x, w, padding=1)
        torch.testing.assert_close(y.square().mean(), x.square().mean(), rtol=1e-12, atol=0)
    linear = suo_delta_(torch.empty(40, 10, dtype=torch.float64))
    x = torch.randn(5, 10, dtype=torch.float64)
    torch.testing.assert_close((x @ linear.T).square().mean(), x.square().mean(), rtol=1e-12, atol=0)


def test_suo_delta_sets_the_centre_tap_only_and_says_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch (2.13 here) warns about dks's list indexing: not the user's concern
        w = suo_delta_(torch.full((8, 8, 3, 3), 7.0, dtype=torch.float64))
    centre = w[:, :, 1, 1]
    torch.testing.assert_close(centre @ centre.T, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.count_nonzero(w).item() == torch.count_nonzero(centre).item()


def test_dks_on_pytorchs_layout_directly_would_be_wrong():
    from dks.pytorch.parameter_sampling_functions import scaled_uniform_orthogonal_

    torch.manual_seed(0)
    w = scaled_uniform_orthogonal_(torch.empty(32, 16, 3, 3, dtype=torch.float64))  # read as [in=32, out=16]
    x = torch.randn(2, 16, 9, 9, dtype=torch.float64)
    ratio = F.conv2d(x, w, padding=1).square().mean() / x.square().mean()
    assert abs(ratio.item() - 1) > 0.4  # it loses the sqrt(out / in) rescaling: half the mean square


def _relu_kernel(c: float) -> float:
    """E[relu(u) relu(v)] for standard normal u, v of correlation c (the arc-cosine kernel)."""
    return (np.sqrt(1 - c * c) + (np.pi - np.arccos(c)) * c) / (2 * np.pi)


@pytest.mark.parametrize("depth, eta", [(19, 0.9), (109, 0.9), (43, 0.5)])
def test_tat_activation_preserves_q_and_maps_correlation_0_to_eta_over_the_chain(depth, eta):
    act = TATActivation(depth, eta=eta)
    x = torch.linspace(-3, 3, 61, dtype=torch.float64)
    scale = act(torch.tensor([1.0], dtype=torch.float64)).item()
    slope = -act(torch.tensor([-1.0], dtype=torch.float64)).item() / scale
    # it is scale * leaky_relu(x, slope), nothing else
    torch.testing.assert_close(act(x), scale * torch.where(x > 0, x, slope * x), rtol=1e-12, atol=1e-12)
    # E[phi(z)^2] = scale^2 (1 + slope^2) / 2 = 1: each layer keeps the mean square
    assert scale**2 * (1 + slope**2) / 2 == pytest.approx(1.0, abs=1e-6)
    # phi = relu(u) - slope relu(-u): C(c) = ((1 + slope^2) k(c) - 2 slope k(-c)) / ((1 + slope^2) / 2)
    c = 0.0
    for _ in range(depth):
        c = ((1 + slope**2) * _relu_kernel(c) - 2 * slope * _relu_kernel(-c)) / ((1 + slope**2) / 2)
    assert c == pytest.approx(eta, abs=1e-4)


def test_a_tat_net_and_its_refusals(tmp_path, capsys):
    model = init_tat_(create("plain20", init=None, activation="tat", norm="none"))
    with pytest.raises(ValueError, match="TAT cannot make a chain of 7 leaky ReLUs map correlation 0 to 0.9"):
        create("plain8", activation="tat", norm="none")
    acts = {id(m) for m in model.modules() if isinstance(m, TATActivation)}
    assert len(acts) == 1 and next(m for m in model.modules() if isinstance(m, TATActivation)).depth == 19
    with pytest.raises(ValueError, match="without normalization layers; layer '0.1' is BatchNorm2d"):
        init_tat_(create("plain8", init=None))
    with pytest.raises(ValueError, match="ungrouped convs; layer '0' has groups=2"):
        init_tat_(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2)))
    toml = tmp_path / "t.toml"
    toml.write_text('model = "plain20"\nshapes_train = 100\nshapes_test = 50\nbatch_size = 25\n')
    flags = ["train", "--config", str(toml), "--out", str(tmp_path), "--no-progress", "--iterations", "3"]
    assert main([*flags, "--name", "tat", "--activation", "tat", "--norm", "none", "--init", "suo-delta",
                 "--lr", "0.01"]) == 0
    assert json.loads((tmp_path / "tat" / "summary.json").read_text())["status"] == "completed"
    assert main(["report", str(tmp_path / "tat"), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "first_layer_tat.png").is_file()
    assert main([*flags, "--name", "bn", "--activation", "tat"]) == 2
    assert "activation tat is for nets without normalization" in capsys.readouterr().err
    assert main([*flags, "--name", "shallow", "--model", "plain8", "--activation", "tat", "--norm", "none"]) == 2
    assert "cannot build plain8: TAT cannot make a chain of 7" in capsys.readouterr().err
