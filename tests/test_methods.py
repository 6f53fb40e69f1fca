"""Other ways to train deep plain nets, each against a closed form or a literal reference.

Delta-orthogonal init (Xiao et al. 2018), the Dirac init and parametrization (DiracNets),
SReLU (ISONet), tanh nets (Xiao et al.), SRIP (Bansal et al. 2018) and the conv-orthogonality
regularizer (OCNN).
"""
import json
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_config
from orthomod.cli import main
from orthomod.init import delta_orthogonal_, dirac_delta, init_model_, looks_linear_
from orthomod.layers import CReLU, DiracParametrization, SReLU, dirac_parametrize_, fold_, is_dirac_parametrized
from orthomod.models import create
from orthomod.regularizers import (ConvOrthogonalityRegularizer, SRIPRegularizer, conv_orthogonality_penalty,
                                   make_regularizer)
from orthomod.train import Trainer

F64 = torch.float64
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# -- delta-orthogonal ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(16, 16, 3, 3), (32, 8, 5, 5), (12, 7, 3), (6, 4, 3, 1, 3), (9, 9, 1, 1)])
@pytest.mark.parametrize("gain", [1.0, 0.5])
def test_delta_orthogonal_preserves_every_input_norm(shape, gain):
    w = delta_orthogonal_(torch.empty(shape, dtype=F64), gain=gain, generator=torch.Generator().manual_seed(0))
    dims = len(shape) - 2
    padding = tuple(k // 2 for k in shape[2:])
    for seed in range(3):
        x = torch.randn((2, shape[1]) + (7,) * dims, dtype=F64, generator=torch.Generator().manual_seed(seed))
        y = CONV[dims](x, w, padding=padding)
        assert torch.allclose(y.norm(), gain * x.norm(), rtol=1e-12)
    centre = (slice(None), slice(None)) + padding
    mask = torch.ones_like(w, dtype=torch.bool)
    mask[centre] = False
    assert w[mask].abs().max() == 0 if mask.any() else True


def test_delta_orthogonal_with_fewer_outputs_has_orthonormal_rows():
    w = delta_orthogonal_(torch.empty(8, 20, 3, 3, dtype=F64))
    m = w[:, :, 1, 1]
    assert torch.allclose(m @ m.T, torch.eye(8, dtype=F64), atol=1e-12)


def test_delta_orthogonal_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="odd kernel sizes"):
        delta_orthogonal_(torch.empty(4, 4, 2, 2))
    with pytest.raises(ValueError, match="Conv1d/2d/3d weight"):
        delta_orthogonal_(torch.empty(4, 4))
    with pytest.raises(ValueError, match="non-empty"):
        delta_orthogonal_(torch.empty(0, 4, 3, 3))
    with pytest.raises(TypeError, match="floating-point"):
        delta_orthogonal_(torch.empty(4, 4, 3, 3, dtype=torch.int64))


# -- Dirac init and parametrization ----------------------------------------------------------------
def test_dirac_delta_is_the_identity_and_repeats_where_widths_differ():
    assert torch.equal(dirac_delta((5, 5, 3, 3)), nn.init.dirac_(torch.empty(5, 5, 3, 3)))
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    wide = F.conv2d(x, dirac_delta((7, 3, 3, 3), F64), padding=1)
    assert torch.equal(wide, x[:, [o % 3 for o in range(7)]])  # output o copies input o mod 3
    y = torch.randn(2, 7, 6, 6, dtype=F64)
    narrow = F.conv2d(y, dirac_delta((3, 7, 3, 3), F64), padding=1)
    assert torch.allclose(narrow, torch.stack([y[:, [0, 3, 6]].sum(1), y[:, [1, 4]].sum(1), y[:, [2, 5]].sum(1)], 1))


def test_init_schemes_on_a_model_and_refusals_that_name_the_layer():
    model = init_model_(create("plain14", init=None), "delta-orthogonal")
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            centre = m.weight[:, :, 1, 1].double()
            small = min(centre.shape)
            gram = centre.T @ centre if centre.shape[0] >= centre.shape[1] else centre @ centre.T
            assert torch.allclose(gram, torch.eye(small, dtype=F64), atol=1e-5)
            off_centre = m.weight.detach().clone()
            off_centre[:, :, 1, 1] = 0
            assert off_centre.abs().max() == 0
    model = init_model_(create("plain14", init=None), "dirac")
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert torch.equal(m.weight, dirac_delta(tuple(m.weight.shape)))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="layer '0' has groups=2"):
        init_model_(grouped, "dirac")
    with pytest.raises(ValueError, match="cannot initialize layer '0'.*odd kernel"):
        init_model_(nn.Sequential(nn.Conv2d(4, 4, 2)), "delta-orthogonal")


@pytest.mark.parametrize("c_in, c_out, stride", [(16, 16, 1), (16, 32, 2), (32, 16, 1), (3, 16, 1), (16, 8, 2)])
def test_dirac_parametrization_weight_and_folding_are_exact(c_in, c_out, stride):
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
    raw = conv.weight.detach().clone()
    dirac_parametrize_(conv)
    p = conv.parametrizations.weight[0]
    with torch.no_grad():
        p.alpha.uniform_(0.5, 1.5)
        p.beta.uniform_(-0.5, 0.5)
    literal = (p.alpha[:, None, None, None] * dirac_delta(raw.shape)
               + p.beta[:, None, None, None] * raw / raw.flatten(1).norm(dim=1)[:, None, None, None])
    torch.testing.assert_close(conv.weight, literal, rtol=1e-6, atol=1e-7)
    x = torch.randn(4, c_in, 9, 9)
    before = conv(x).detach()
    fold_(conv)
    assert type(conv.weight) is nn.Parameter and not hasattr(conv, "parametrizations")
    torch.testing.assert_close(conv(x), before, rtol=1e-5, atol=1e-5)


def test_a_whole_net_folds_to_a_plain_net_with_the_same_outputs():
    model = dirac_parametrize_(create("plain8"))
    assert is_dirac_parametrized(model)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    F.cross_entropy(model(x), y).backward()  # a, b and the raw W all get gradients
    names = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.endswith("alpha") for n in names) and any(n.endswith("original") for n in names)
    model.eval()
    before = model(x).detach()
    fold_(model)
    assert not is_dirac_parametrized(model)
    assert not any(isinstance(m, DiracParametrization) for m in model.modules())
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


# -- SReLU ------------------------------------------------------------------------------------------
def test_srelu_closed_forms():
    x = torch.randn(4, 3, 5, 5)
    s = SReLU(3, init=0.0)
    assert torch.equal(s(x), torch.relu(x))  # b = 0 is ReLU
    s = SReLU(3)  # ISONet's start, b = -1: max(x, -1) (up to the rounding of (x + 1) - 1)
    torch.testing.assert_close(s(x), torch.clamp(x, min=-1.0), rtol=0, atol=1e-6)
    with torch.no_grad():
        s.bias.copy_(torch.tensor([0.0, -1.0, 2.0]))
    torch.testing.assert_close(s(x)[:, 2], torch.clamp(x[:, 2], min=2.0), rtol=0, atol=1e-6)
    model = create("plain8", activation="srelu", norm="none")
    assert sum(isinstance(m, SReLU) for m in model.modules()) == 7
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    with pytest.raises(ValueError, match=r"only the CIFAR plain nets \(plain<d>\) build activation srelu, not resnet8"):
        create("resnet8", activation="srelu")


# -- tanh (Xiao et al. 2018's vanilla CNNs) ---------------------------------------------------------
def test_a_tanh_net_is_conv_then_tanh_and_delta_orthogonal_makes_its_jacobian_at_zero_orthogonal():
    torch.manual_seed(0)
    model = create("plain14", activation="tanh", norm="none", init="delta-orthogonal").double()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == len(convs) == 13
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        for conv in convs:
            conv.bias.normal_()  # a literal forward must use them too
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    h = x
    for conv in convs:
        h = torch.tanh(F.conv2d(h, conv.weight, conv.bias, stride=conv.stride, padding=1))
    torch.testing.assert_close(model(x), model[-1].fc(h.mean(dim=(2, 3))), rtol=0, atol=1e-12)
    # with zero biases, tanh'(0) = 1 and centre-tap orthogonal kernels: the Jacobian of the first
    # stage (stride 1, 16 channels) at x = 0 preserves the norm of every direction
    init_model_(model, "delta-orthogonal")
    stage = nn.Sequential(*list(model)[1:5])
    assert all(c.stride == (1, 1) and c.in_channels == c.out_channels == 16 for c in convs[1:5])
    v = torch.randn(3, 16, 8, 8, dtype=F64)
    _, jv = torch.autograd.functional.jvp(stage, torch.zeros_like(v), v)
    torch.testing.assert_close(jv.flatten(1).norm(dim=1), v.flatten(1).norm(dim=1), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"only the CIFAR plain nets \(plain<d>\) build activation tanh, not resnet8"):
        create("resnet8", activation="tanh")


# -- CReLU and looks-linear init ---------------------------------------------------------------------
def test_crelu_is_relu_of_x_then_of_minus_x():
    x = torch.tensor([[[[1.5, -2.0]], [[0.0, 3.0]]]])  # (1, 2, 1, 2)
    expected = torch.tensor([[[[1.5, 0.0]], [[0.0, 3.0]], [[0.0, 2.0]], [[0.0, 0.0]]]])
    assert torch.equal(CReLU()(x), expected)


@pytest.mark.parametrize("shape, stride", [((16, 16, 3, 3), 1), ((32, 16, 3, 3), 2), ((8, 32, 5, 5), 1),
                                           ((6, 8, 3), 1), ((10, 128), 1)])
def test_looks_linear_layer_computes_its_first_half_on_x(shape, stride):
    w = looks_linear_(torch.empty(shape, dtype=torch.float64))
    half = shape[1] // 2
    assert torch.equal(w[:, half:], -w[:, :half])
    v = w[:, :half].reshape(shape[0], -1)  # W0's filters: orthonormal (fewer filters than inputs here)
    torch.testing.assert_close(v @ v.T, torch.eye(shape[0], dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(3, half, *(9,) * (len(shape) - 2), dtype=torch.float64)
    if len(shape) == 2:
        out, linear = F.linear(CReLU()(x), w), F.linear(x, w[:, :half])
    else:
        conv = {3: F.conv1d, 4: F.conv2d}[len(shape)]
        pad = shape[-1] // 2
        out, linear = conv(CReLU()(x), w, stride=stride, padding=pad), conv(x, w[:, :half], stride=stride, padding=pad)
    torch.testing.assert_close(out, linear, rtol=0, atol=1e-12)  # W [relu(x), relu(-x)] = W0 x


def test_looks_linear_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="input width C_in is even"):
        looks_linear_(torch.empty(8, 5, 3, 3))
    with pytest.raises(TypeError, match="floating-point"):
        looks_linear_(torch.empty(8, 4, 3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="use activation='crelu'"):
        create("plain8", init="looks-linear")
    with pytest.raises(ValueError, match="needs to know which layers a CReLU feeds"):
        init_model_(create("plain8", activation="crelu"), "looks-linear")


def test_a_looks_linear_crelu_net_starts_linear_and_a_crelu_net_otherwise_does_not():
    torch.manual_seed(0)
    x1, x2 = torch.randn(2, 3, 3, 32, 32, dtype=torch.float64)
    for init, linear in (("looks-linear", True), ("msra", False)):
        model = create("plain14", activation="crelu", init=init).double().eval()  # BN: x / sqrt(1 + eps), linear
        gap = (model(x1 + 2 * x2) - model(x1) - 2 * model(x2)).abs().max() / model(x1).abs().max()
        assert (gap < 1e-12) == linear, (init, gap)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.in_channels for c in convs[:3]] == [3, 32, 32] and model[-1].fc.in_features == 128


def test_a_looks_linear_net_starts_with_even_error_moments_where_centre_taps_alone_do_not():
    """Why W0 is orthonormal over the whole kernel: with W0 delta-orthogonal the linear start
    mixes no positions (each pixel's features are a map of its 3 colours), and BN's backward
    amplifies the error from the last conv to the first by many orders of magnitude."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))

    def moment_ratio(model):  # q(first conv's output error) / q(last conv's), one batch, training mode
        outputs = []

        def keep(module, inputs, output):
            output.retain_grad()
            outputs.append(output)

        for conv in [m for m in model.modules() if isinstance(m, nn.Conv2d)]:
            conv.register_forward_hook(keep)
        F.cross_entropy(model(x), y).backward()
        return (outputs[0].grad.pow(2).mean() / outputs[-1].grad.pow(2).mean()).item()

    assert 1e-2 < moment_ratio(create("plain20", activation="crelu", init="looks-linear")) < 1e2
    centre_taps = create("plain20", activation="crelu", init="delta-orthogonal")
    for module in centre_taps.crelu_fed():
        half = module.weight.shape[1] // 2
        with torch.no_grad():
            module.weight[:, half:] = -module.weight[:, :half]  # mirrored delta-orthogonal W0
    assert moment_ratio(centre_taps) > 1e4


# -- SRIP ----------------------------------------------------------------------------------------------
def test_srip_estimate_converges_to_the_spectral_norm_and_its_gradient_to_autograds():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, bias=False).double()
    reg = SRIPRegularizer(conv, coeff=0.3, iterations=1, generator=torch.Generator().manual_seed(1))
    v = conv.weight.reshape(10, -1)
    a = v @ v.T - torch.eye(10, dtype=F64)
    exact = torch.linalg.matrix_norm(a, ord=2)
    reg._refine(iterations=500)
    assert abs(reg.residuals()[0] - exact.item()) < 0.01 * exact.item()
    conv.weight.grad = torch.zeros_like(conv.weight)
    reg.add_grad_()
    w = conv.weight.detach().clone().requires_grad_()
    vv = w.reshape(10, -1)
    (expected,) = torch.autograd.grad(0.3 * torch.linalg.matrix_norm(vv @ vv.T - torch.eye(10, dtype=F64), ord=2), w)
    torch.testing.assert_close(conv.weight.grad, expected, rtol=1e-4, atol=1e-8)
    state = reg.state_dict()
    other = SRIPRegularizer(conv, coeff=0.3)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.vectors, reg.vectors))


# -- conv orthogonality ---------------------------------------------------------------------------
def _literal_conv_penalty(k: torch.Tensor, stride: int) -> torch.Tensor:
    """Sum over the spatial shifts (multiples of the stride at which two copies overlap) of
    ||sum over taps K[:, :, p] K[:, :, p + s]^T - [s = 0] I||^2, with explicit loops."""
    c_out, _, kh, kw = k.shape
    total = torch.zeros((), dtype=k.dtype)
    reach_h, reach_w = (kh - 1) // stride * stride, (kw - 1) // stride * stride
    for sy in range(-reach_h, reach_h + 1, stride):
        for sx in range(-reach_w, reach_w + 1, stride):
            m = torch.zeros(c_out, c_out, dtype=k.dtype)
            for u in range(kh):
                for v in range(kw):
                    if 0 <= u + sy < kh and 0 <= v + sx < kw:
                        m += k[:, :, u, v] @ k[:, :, u + sy, v + sx].T
            if sy == 0 and sx == 0:
                m -= torch.eye(c_out, dtype=k.dtype)
            total = total + m.square().sum()
    return total


@pytest.mark.parametrize("shape, stride", [((6, 4, 3, 3), 1), ((6, 4, 3, 3), 2), ((5, 8, 5, 5), 2), ((4, 4, 1, 1), 1)])
def test_conv_orthogonality_penalty_equals_the_literal_sum_over_shifts(shape, stride):
    k = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(conv_orthogonality_penalty(k, stride), _literal_conv_penalty(k, stride),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_orthogonality_is_zero_for_delta_orthogonal_kernels_with_fewer_outputs(stride):
    k = delta_orthogonal_(torch.empty(8, 16, 3, 3, dtype=F64))
    assert conv_orthogonality_penalty(k, stride) < 1e-24
    v = torch.randn(5, 9, dtype=F64)  # a linear weight is a 1x1 conv: ||V V^T - I||^2
    torch.testing.assert_close(conv_orthogonality_penalty(v), (v @ v.T - torch.eye(5, dtype=F64)).square().sum())


def test_conv_orthogonality_gradient_uses_each_convs_stride():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.Conv2d(6, 4, 3), nn.Flatten(), nn.LazyLinear(2)).double()
    model(torch.randn(1, 3, 11, 11, dtype=F64))
    reg = ConvOrthogonalityRegularizer(model, coeff=0.2)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    reg.add_grad_()
    for weight, stride in ((model[0].weight, 2), (model[1].weight, 1), (model[3].weight, 1)):
        w = weight.detach().clone().requires_grad_()
        literal = _literal_conv_penalty(w if w.dim() == 4 else w[:, :, None, None], stride)
        (expected,) = torch.autograd.grad(0.5 * 0.2 * literal, w)
        torch.testing.assert_close(weight.grad, expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="layer '0' has groups=2"):
        ConvOrthogonalityRegularizer(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)))


def test_every_regularizer_shares_the_interface():
    model = create("plain8").double()
    for name in ("ortho", "srip", "conv-ortho"):
        reg = make_regularizer(name, model)
        assert reg.coeff > 0 and len(reg.residuals()) == 8
        loss = reg.loss()
        torch.testing.assert_close(reg.penalty(), loss.detach())
        for p in model.parameters():
            p.grad = None
        loss.backward()
        by_loss = [p.grad.clone() for p in reg.params]
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        if name == "srip":
            reg._refine = lambda iterations=None, _old=reg._refine: _old(iterations=0)  # keep u as loss() used it
        reg.add_grad_()
        for a, b in zip(by_loss, reg.params):
            torch.testing.assert_close(b.grad, a, rtol=1e-9, atol=1e-12)


# -- the CLI accepts every valid combination and refuses the others --------------------------------
@pytest.mark.parametrize("flags", [
    ["--init", "delta-orthogonal", "--reg", "ortho", "--modulation", "on"],
    ["--init", "dirac", "--activation", "srelu", "--norm", "none", "--reg", "conv-ortho", "--lr", "0.01"],
    ["--init", "dirac", "--activation", "srelu", "--reg", "conv-ortho", "--modulation", "on"],
    ["--parametrization", "dirac", "--reg", "l2", "--modulation", "on"],
    ["--init", "orthonormal", "--reg", "srip"],
    ["--init", "lsuv", "--norm", "none", "--lr", "0.01"],
    ["--init", "looks-linear", "--activation", "crelu", "--reg", "ortho", "--modulation", "on"],
    ["--init", "delta-orthogonal", "--activation", "tanh", "--norm", "none"],
    ["--init", "dirac", "--activation", "srelu", "--norm", "none", "--reg", "conv-ortho", "--lr", "0.01",
     "--modulation", "on"],
])
def test_combinations_train_and_resume(tmp_path, flags, monkeypatch):
    toml = tmp_path / "t.toml"
    toml.write_text('model = "plain8"\nshapes_train = 100\nshapes_test = 50\nbatch_size = 25\n')
    base = ["train", "--config", str(toml), "--out", str(tmp_path), "--name", "r", "--no-progress",
            "--checkpoint-every", "2", *flags]
    original, stopped = Trainer._agree_on_loss, []

    def stop_once_at_step_2(self, loss):  # as a SIGTERM would: checkpoint at step 2, then exit
        if self.step == 1 and not stopped:
            stopped.append(True)
            self._stop_signal = signal.SIGTERM
        return original(self, loss)

    monkeypatch.setattr(Trainer, "_agree_on_loss", stop_once_at_step_2)
    assert main([*base, "--iterations", "3"]) == 128 + signal.SIGTERM
    assert main(["train", "--resume", str(tmp_path / "r"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["step"] == 3
    assert summary["status"] == "completed" and summary["final_train_loss"] == summary["final_train_loss"]
    assert main(["eval", str(tmp_path / "r")]) == 0
    if "--parametrization" in flags:  # the report rebuilds the parametrized net for Fig. 6
        assert main(["report", str(tmp_path / "r"), "--out", str(tmp_path / "report")]) == 0
        assert (tmp_path / "report" / "first_layer_r.png").is_file()


def test_srip_vectors_are_checkpointed(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, iterations=3, reg="srip", init="orthonormal"), progress=False)
    trainer.run()
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["regularizer"]["vectors"]
    assert all(torch.equal(a, b) for a, b in zip(saved, trainer.regularizer.vectors))
    assert trainer.config.reg_coeff == 1e-2  # SRIP's default lambda, written to config.json
    assert json.loads((tmp_path / "run" / "config.json").read_text())["reg_coeff"] == 1e-2


@pytest.mark.parametrize("flags, message", [
    (["--parametrization", "dirac", "--reg", "ortho"], "DiracNets train W with weight decay"),
    (["--model", "resnet8", "--activation", "srelu"], "only the CIFAR plain nets (plain<d>) build activation"),
    (["--init", "identity"], "init = 'identity' is not valid"),
    (["--init", "looks-linear"], "add --activation crelu"),
    (["--model", "resnet8", "--activation", "crelu"], "only the CIFAR plain nets (plain<d>) build activation"),
    (["--model", "resnet8", "--norm", "none"], "build norm none, not resnet8; use --norm bn"),
    (["--model", "resnet8", "--activation", "tanh", "--norm", "none"],
     "build activation tanh and norm none, not resnet8; use --activation relu --norm bn"),
    (["--reg", "spectral"], "reg = 'spectral' is not valid"),
])
def test_impossible_combinations_are_refused_in_one_line(tmp_path, capsys, flags, message):
    assert main(["train", "--model", "plain8", "--iterations", "1", "--out", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0
