"""Device and precision chosen from the hardware; fp16's gradient scaler used in the right order.

The selection logic is tested on every branch by patching what PyTorch reports about the
machine (no GPU, AMX or Apple chip is needed); the fp16 ordering is tested on CPU with a real
``torch.amp.GradScaler``, which scales and unscales exactly (its scale is a power of two).
"""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from orthomod import hardware
from orthomod.cli import main
from orthomod.config import ConfigError, TrainConfig, load_config_file
from orthomod.hardware import HardwareError, Precision, choose_precision, cpu_bf16_feature, resolve_device
from orthomod.models import create
from orthomod.modulation import ErrorModulator
from orthomod.regularizers import OrthonormalRegularizer
from orthomod.train import Trainer, train_step

CPU = torch.device("cpu")


def _cpu_features(monkeypatch, amx=False, avx512_bf16=False):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)


@pytest.mark.parametrize("amx, avx512_bf16, feature, chosen", [
    (False, False, None, "fp32"), (True, True, "AMX", "bf16"), (False, True, "AVX512-BF16", "bf16")])
def test_auto_on_cpu_takes_bf16_only_where_native(monkeypatch, amx, avx512_bf16, feature, chosen):
    _cpu_features(monkeypatch, amx, avx512_bf16)
    assert cpu_bf16_feature() == feature
    precision = choose_precision("auto", CPU)
    assert precision.name == chosen and precision.reason.startswith("auto: ")
    assert precision.autocast_dtype == (torch.bfloat16 if chosen == "bf16" else None)
    assert not precision.needs_grad_scaler


def test_named_precisions_on_cpu(monkeypatch):
    _cpu_features(monkeypatch)
    assert choose_precision("fp32", CPU) == Precision("fp32", "asked for")
    emulated = choose_precision("bf16", CPU)  # runs as asked, and says what it costs
    assert emulated.name == "bf16" and "no native bf16" in emulated.reason
    with pytest.raises(HardwareError, match="precision fp16 needs a CUDA GPU"):
        choose_precision("fp16", CPU)
    with pytest.raises(HardwareError, match="unknown precision 'fp8'"):
        choose_precision("fp8", CPU)


def test_cpu_feature_fallback_reads_proc_cpuinfo(monkeypatch, tmp_path):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(hardware, "Path", lambda _: cpuinfo)
    cpuinfo.write_text("flags\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert cpu_bf16_feature() == "AMX"
    cpuinfo.write_text("flags\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpu_bf16_feature() == "AVX512-BF16"
    cpuinfo.write_text("flags\t: fpu avx2\n")
    assert cpu_bf16_feature() is None


@pytest.mark.parametrize("capability, chosen", [((8, 0), "bf16"), ((9, 0), "bf16"), ((7, 5), "fp16"), ((6, 1), "fp16")])
def test_auto_on_cuda(monkeypatch, capability, chosen):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    precision = choose_precision("auto", torch.device("cuda"))
    assert precision.name == chosen and "Some GPU" in precision.reason
    assert precision.needs_grad_scaler == (chosen == "fp16")
    if chosen == "fp16":
        with pytest.raises(HardwareError, match="has no native bf16; use --precision fp16 or auto"):
            choose_precision("bf16", torch.device("cuda"))
    assert choose_precision("fp32", torch.device("cuda")).name == "fp32"


def test_mps_takes_fp32(monkeypatch):
    mps = torch.device("mps")
    assert choose_precision("auto", mps).name == "fp32" and "untested" in choose_precision("auto", mps).reason
    for name in ("bf16", "fp16"):
        with pytest.raises(HardwareError):
            choose_precision(name, mps)


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_device_auto_order(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(hardware, "_mps_available", lambda: mps)
    assert resolve_device("auto").type == expected


def test_unavailable_devices_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "_mps_available", lambda: False)
    with pytest.raises(HardwareError, match="CUDA is not available here"):
        resolve_device("cuda:1")
    with pytest.raises(HardwareError, match="MPS is not available here"):
        resolve_device("mps")
    with pytest.raises(HardwareError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


def test_old_bf16_key_and_flag_mean_a_precision(tmp_path, capsys):
    assert TrainConfig.from_dict({"bf16": False, "iterations": 1}).precision == "fp32"
    assert TrainConfig.from_dict({"bf16": True, "iterations": 1}).precision == "bf16"
    with pytest.raises(ConfigError, match="both bf16 and precision"):
        TrainConfig.from_dict({"bf16": True, "precision": "fp32"})
    old = tmp_path / "old.toml"
    old.write_text("bf16 = false\niterations = 1\n")
    assert load_config_file(str(old)) == {"precision": "fp32", "iterations": 1}
    with pytest.raises(ConfigError, match="precision = 'half' is not valid; choose one of auto, fp32, bf16, fp16"):
        TrainConfig(iterations=1, precision="half").validate()
    tiny = tmp_path / "tiny.toml"
    tiny.write_text('model = "plain8"\nshapes_train = 100\nshapes_test = 50\nbatch_size = 50\niterations = 1\n')
    base = ["train", "--config", str(tiny), "--out", str(tmp_path), "--no-progress"]
    assert main(base + ["--name", "old-flag", "--bf16", "off"]) == 0
    assert json.loads((tmp_path / "old-flag" / "config.json").read_text())["precision"] == "fp32"
    assert main(base + ["--name", "half", "--precision", "fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("orthomod: error: precision fp16 needs a CUDA GPU")


def test_trainer_says_and_records_its_choice(tmp_path, capsys):
    summary = Trainer(tiny_config(tmp_path, iterations=2), progress=False).run()
    expected = choose_precision("auto", CPU)
    assert summary["precision"] == expected.name and summary["precision_reason"] == expected.reason
    assert summary["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("precision: ")]
    assert lines == [f"precision: {expected.name} ({expected.reason}); channels_last on; device cpu"]


# -- fp16's gradient scaler and the method --------------------------------------------------------
def _model():
    torch.manual_seed(0)
    return create("plain8", init="msra").double()  # away from orthonormal: the regularizer has a gradient


def _setup(tau=1.0):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, optimizer, OrthonormalRegularizer(model, coeff=1e-2), ErrorModulator(model, tau=tau)


def _batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 32, 32, dtype=torch.float64, generator=generator),
             torch.randint(0, 10, (8,), generator=generator)) for _ in range(3)]


def test_grad_scaler_leaves_the_method_unchanged():
    """With the loss scaled by 1024 the update is that of the unscaled loss: the regularizer's
    gradient is added after unscaling, and modulation factors do not see the scale."""
    fp32 = Precision("fp32", "test")
    plain, scaled = _setup(), _setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=10**6)
    for x, y in _batches():
        train_step(plain[0], x, y, plain[1], precision=fp32, regularizer=plain[2], modulator=plain[3])
        train_step(scaled[0], x, y, scaled[1], precision=fp32, regularizer=scaled[2], modulator=scaled[3],
                   scaler=scaler)
        assert scaled[3].scales == pytest.approx(plain[3].scales, rel=1e-12)
        assert any(s != 1.0 for s in plain[3].scales)
    for a, b in zip(plain[0].parameters(), scaled[0].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15)


def test_regularizer_before_unscale_would_be_wrong():
    """The control of the test above: adding the regularizer's gradient to the still-scaled
    gradients divides it by the scale, and the weights come out measurably different."""
    fp32 = Precision("fp32", "test")
    right, wrong = _setup(), _setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = _batches()[0]
    train_step(right[0], x, y, right[1], precision=fp32, regularizer=right[2], modulator=right[3])
    model, optimizer, regularizer, _ = wrong
    optimizer.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    regularizer.add_grad_()
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    differences = [(a - b).abs().max().item() for a, b in zip(right[0].parameters(), model.parameters())]
    assert max(differences) > 1e-6


def test_modulation_factors_do_not_depend_on_the_loss_scale():
    x, y = _batches()[0]
    results = []
    for factor in (1.0, 1024.0, 2.0**-20):
        model = _model()
        with ErrorModulator(model, tau=1.5, rule="top") as modulator:
            (factor * F.cross_entropy(model(x), y)).backward()
            results.append((modulator.scales, [p.grad / factor for p in model.parameters()]))
    assert any(s != 1.0 for s in results[0][0])
    for scales, grads in results[1:]:
        assert scales == pytest.approx(results[0][0], rel=1e-12)
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-18)
