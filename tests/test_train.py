import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import tiny_config
from orthomod.config import OPTIMIZERS, ConfigError, TrainConfig
from orthomod.files import load_checkpoint
from orthomod.train import RunError, Trainer, lr_factor


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_folder_contents_and_metrics(tmp_path):
    summary = Trainer(tiny_config(tmp_path, iterations=45), progress=False).run()
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"config.json", "metrics.jsonl", "summary.json", "checkpoint.pt", "best.pt"}
    assert json.loads((run / "config.json").read_text())["model"] == "plain8"
    records = _metrics(run)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(5, 46, 5))
    assert [r["step"] for r in evals] == [20, 40, 45]  # every epoch (1000 // 50 steps) and the end
    for r in train:
        assert set(r) >= {"step", "epoch", "loss", "train_acc", "lr", "images_per_s"} and r["images_per_s"] > 0
    saved = json.loads((run / "summary.json").read_text())
    assert saved == summary
    assert summary["status"] == "completed" and summary["step"] == 45 and not summary["diverged"]
    assert summary["final_test_acc"] == evals[-1]["test_acc"]
    assert summary["best_test_acc"] == max(r["test_acc"] for r in evals)
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 45


def test_step_schedule_scales_with_budget():
    config = TrainConfig(iterations=64000)
    assert [lr_factor(config, s, 64000) for s in (0, 31999, 32000, 47999, 48000, 63999)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    assert [lr_factor(config, s, 400) for s in (199, 200, 300)] == pytest.approx([1, 0.1, 0.01])
    cosine = TrainConfig(iterations=10, schedule="cosine")
    assert lr_factor(cosine, 0, 10) == 1 and lr_factor(cosine, 5, 10) == pytest.approx(0.5)
    warm = TrainConfig(iterations=100, warmup_steps=10)
    assert lr_factor(warm, 0, 100) == pytest.approx(0.1) and lr_factor(warm, 10, 100) == 1


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_trains(tmp_path, optimizer):
    summary = Trainer(tiny_config(tmp_path, optimizer=optimizer, iterations=4, reg="ortho", init="orthonormal"),
                      progress=False).run()
    assert summary["status"] == "completed" and math.isfinite(summary["final_train_loss"])


def test_ortho_reg_gives_no_weight_decay_and_l2_only_on_weights(tmp_path):
    from orthomod.models import create
    from orthomod.train import build_optimizer

    model = create("plain8")
    l2 = build_optimizer(TrainConfig(iterations=1, reg="l2", reg_coeff=5e-4), model)
    assert [g["weight_decay"] for g in l2.param_groups] == [5e-4, 0.0]
    assert all(p.dim() >= 2 for p in l2.param_groups[0]["params"])
    ortho = build_optimizer(TrainConfig(iterations=1, reg="ortho"), model)
    assert [g["weight_decay"] for g in ortho.param_groups] == [0.0, 0.0]
    # ISONet's recipe: weight decay beside the regularizer, on the weights only
    beside = build_optimizer(TrainConfig(iterations=1, reg="conv-ortho", l2_beside=3e-4).validate(), model)
    assert [g["weight_decay"] for g in beside.param_groups] == [3e-4, 0.0]
    assert beside.param_groups[0]["params"] == l2.param_groups[0]["params"]


@pytest.mark.parametrize("reg", ["l2", "none"])
def test_l2_beside_needs_an_orthogonality_regularizer(reg):
    with pytest.raises(ConfigError, match=f"l2_beside adds weight decay beside .* with reg {reg} use --reg l2"):
        TrainConfig(iterations=1, reg=reg, l2_beside=1e-4).validate()
    with pytest.raises(ConfigError, match="l2_beside must be >= 0, got -0.1"):
        TrainConfig(iterations=1, reg="ortho", l2_beside=-0.1).validate()


def test_divergence_stops_cleanly_and_keeps_last_good_checkpoint(tmp_path):
    # the orthonormality gradient is cubic in the weights: a huge lambda and lr blow them up
    config = tiny_config(tmp_path, lr=10.0, reg="ortho", reg_coeff=10.0, iterations=40, checkpoint_every=1)
    summary = Trainer(config, progress=False).run()
    assert summary["status"] == "diverged" and summary["diverged"]
    k = summary["diverged_at_step"]
    assert isinstance(k, int) and 1 <= k <= 40
    assert len(summary["divergence"]["layers"]) == 23
    assert f"diverged at step {k}: loss is" in summary["divergence"]["message"]
    json.loads((tmp_path / "run" / "summary.json").read_text())  # strict JSON despite NaN statistics
    if k > 1:
        state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
        assert state["step"] == k - 1
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_existing_run_folder_needs_resume(tmp_path):
    Trainer(tiny_config(tmp_path, iterations=2), progress=False).run()
    with pytest.raises(RunError, match="already has a checkpoint; continue it with --resume"):
        Trainer(tiny_config(tmp_path, iterations=2), progress=False)


def test_modulation_runs_in_the_trainer(tmp_path):
    config = tiny_config(tmp_path, init="orthonormal", reg="ortho", modulation=True, modulation_tau=1.0,
                         modulation_until=3, iterations=6)
    trainer = Trainer(config, progress=False)
    trainer.run()
    assert trainer.modulator.step_count == 6
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["modulator"] == {
        "step_count": 6, "tau": 1.0, "until_step": 3, "rule": "consecutive"}


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "orthomod", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


@pytest.mark.slow
def test_sigterm_then_resume_continues_without_gaps_or_duplicates(tmp_path):
    common = ["--model", "plain8", "--dataset", "shapes", "--batch-size", "50", "--log-every", "5",
              "--diagnostics-every", "7",
              "--checkpoint-every", "10", "--out", str(tmp_path), "--no-progress"]
    extra = ["--config", str(_write_shapes_config(tmp_path))]
    proc = _cli("train", *common, *extra, "--iterations", "100", "--name", "killed")
    run = tmp_path / "killed"
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and any(r["step"] >= 25 for r in _metrics(run)):
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM received" in err and f"--resume {run}" in err
    interrupted = json.loads((run / "summary.json").read_text())
    assert interrupted["status"] == "interrupted" and 25 <= interrupted["step"] < 100
    assert load_checkpoint(run / "checkpoint.pt")["step"] == interrupted["step"]

    resumed = _cli("train", "--resume", str(run), "--no-progress")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    records = _metrics(run)
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(5, 101, 5))
    assert [r["step"] for r in records if r["kind"] == "eval"] == list(range(20, 101, 20))
    probes = [json.loads(line) for line in (run / "diagnostics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in probes] == [0] + list(range(7, 101, 7))
    final = json.loads((run / "summary.json").read_text())
    assert final["status"] == "completed" and final["step"] == 100
    # each process that trained the run is named, with where it took over
    assert [s["from_step"] for s in final["sessions"]] == [0, interrupted["step"]]
    assert all(s["precision"] == final["precision"] and s["device"] == "cpu" for s in final["sessions"])

    # the same run without interruption ends with the same weights: nothing lost, nothing repeated
    straight = _cli("train", *common, *extra, "--iterations", "100", "--name", "straight")
    straight.communicate(timeout=300)
    a = load_checkpoint(run / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["model"]
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=1e-5, atol=1e-6), key
    # and the same metrics, line by line: a logging window cut by the checkpoint is completed
    # from the sums the checkpoint saved (only the measured speed differs)
    def lines(folder):
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in _metrics(folder)]
    assert lines(run) == lines(tmp_path / "straight")


def _write_shapes_config(tmp_path):
    path = tmp_path / "shapes.toml"
    path.write_text('shapes_train = 1000\nshapes_test = 200\ninit = "orthonormal"\nreg = "ortho"\n'
                    'modulation = true\nmodulation_until = 50\n')
    return path


def test_shapes_dataset_fixed_across_run_seeds():
    from orthomod.data import dataset_for

    a = dataset_for(TrainConfig(iterations=1, shapes_train=100, shapes_test=20, seed=0))
    b = dataset_for(TrainConfig(iterations=1, shapes_train=100, shapes_test=20, seed=7))
    c = dataset_for(TrainConfig(iterations=1, shapes_train=100, shapes_test=20, shapes_seed=1))
    assert torch.equal(a.train_images, b.train_images) and not torch.equal(a.train_images, c.train_images)


def test_deterministic_kernels_hold_during_the_run_and_are_restored_after(tmp_path, monkeypatch):
    import orthomod.train as train_module

    seen = []
    step = train_module.train_step

    def spy(*args, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", spy)
    assert not torch.are_deterministic_algorithms_enabled()
    summary = Trainer(tiny_config(tmp_path, iterations=3, deterministic=True), progress=False).run()
    assert summary["status"] == "completed" and seen == [True, True, True]
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    assert json.loads((tmp_path / "run" / "config.json").read_text())["deterministic"] is True
    seen.clear()
    Trainer(tiny_config(tmp_path, iterations=2, name="plain"), progress=False).run()
    assert seen == [False, False]


def test_init_lsuv_starts_from_unit_output_variance_on_the_first_batch(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, init="lsuv", norm="none", iterations=1), progress=False)
    x, _ = next(iter(trainer.train_loader.epoch(0, 0, first_step=0)))
    variances = []
    hooks = [m.register_forward_hook(lambda m, i, o: variances.append(float(o.var())))
             for m in trainer.model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        trainer.model(x)
    for h in hooks:
        h.remove()
    assert len(variances) == 8 and all(abs(v - 1) < 0.1 for v in variances), variances
    assert trainer.run()["status"] == "completed"


def test_default_run_name_names_what_sets_a_run_apart():
    from orthomod.train import default_run_name

    plain = TrainConfig(model="plain44", init="msra", reg="l2", seed=3)
    assert default_run_name(plain).startswith("plain44-msra-l2-sgd-s3-")
    dirac = plain.replace(parametrization="dirac", activation="crelu", norm="none")
    assert default_run_name(dirac).startswith("plain44-msra-l2-crelu-norm-none-dirac-sgd-s3-")
    modulated = plain.replace(init="orthonormal", reg="ortho", modulation=True, modulation_tau=2.0)
    assert default_run_name(modulated).startswith("plain44-orthonormal-ortho-mod2-sgd-s3-")
