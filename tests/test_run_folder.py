"""Run folders that cannot be corrupted, divergence that says the truth, one line for bad input.

Every bad input below must end with exit code 2 (3 for a diverged run), a single line on stderr
starting with "orthomod: error:", and no traceback.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import tiny_config
from orthomod import files
from orthomod.cli import EXIT_DIVERGED, main
from orthomod.files import RunFolderError, RunLock, copy_file, load_checkpoint, save_json, save_text
from orthomod.train import Trainer

TINY = 'model = "plain8"\nshapes_train = 200\nshapes_test = 100\nbatch_size = 50\n'


def _one_line_error(capsys, argv, code=2):
    assert main([str(a) for a in argv]) == code
    err = capsys.readouterr().err.strip().splitlines()
    last = err[-1] if err else ""
    assert "Traceback" not in "\n".join(err)
    assert last.startswith("orthomod: error: "), err
    return last


def _tiny_toml(tmp_path, extra=""):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY + extra)
    return path


def _finished_run(tmp_path, name="run", **changes):
    Trainer(tiny_config(tmp_path, name=name, iterations=4, **changes), progress=False).run()
    return tmp_path / name


# -- bad input: a table ---------------------------------------------------------------------------
def test_bad_inputs_give_one_line_and_exit_2(tmp_path, capsys):
    toml = _tiny_toml(tmp_path)
    train = ["train", "--config", toml, "--iterations", "2", "--out", tmp_path, "--no-progress"]
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    cases = {
        "lr must be a finite number, got inf": [*train, "--lr", "inf"],
        "reg_coeff must be a finite number, got nan": [*train, "--reg-coeff", "nan"],
        "modulation_tau must be a finite number, got nan": [*train, "--modulation-tau", "nan"],
        "epochs must be a finite number, got inf": ["train", "--config", toml, "--epochs", "inf", "--out", tmp_path],
        "is a file; give the folder that holds the data set": [*train, "--dataset", "cifar10", "--data", a_file],
        "cannot write the run folder /proc/orthomod-test": [*train, "--out", "/proc", "--name", "orthomod-test"],
        "cannot write the run folder /sys/orthomod-test": [*train, "--out", "/sys", "--name", "orthomod-test"],
        f"cannot write the run folder {a_file}/x": [*train, "--out", a_file, "--name", "x"],
        "must be a plain folder name (no path separators)": [*train, "--name", "../escaped"],
        f"--out {a_file} is a file": ["report", tmp_path, "--out", a_file],
        f"--out {a_file} is a file; give a folder": ["analyze", "bn-jacobian", "--out", a_file],
        "--gamma must be a finite number, got nan": ["analyze", "bn-jacobian", "--gamma", "nan"],
        "--gamma must be a finite number, got inf": ["analyze", "bn-jacobian", "--gamma", "inf"],
        "--eps must be a finite number > 0, got 0.0": ["analyze", "bn-jacobian", "--eps", "0"],
        "--eps must be a finite number > 0, got -1.0": ["analyze", "bn-jacobian", "--eps", "-1"],
        "--batch must be between 3 and 4096": ["analyze", "bn-jacobian", "--batch", "100000000"],
        f"--figure {a_file} is a file; give a folder": ["analyze", "propagation", "--figure", a_file],
        "cannot create the output folder /proc/x (": ["analyze", "propagation", "--figure", "/proc/x"],
    }
    for expected, argv in cases.items():
        assert expected in _one_line_error(capsys, argv), argv
    assert not (tmp_path.parent / "escaped").exists()


def test_broken_run_folder_files(tmp_path, capsys):
    run = _finished_run(tmp_path)
    config_text = (run / "config.json").read_text()
    (run / "config.json").write_text(config_text[:40])  # cut mid-write by hand
    for argv in (["train", "--resume", run], ["eval", run], ["report", run, "--out", tmp_path / "rep"]):
        assert f"{run / 'config.json'} is not valid JSON" in _one_line_error(capsys, argv)
    (run / "config.json").write_text(config_text)
    (run / "summary.json").write_text("{\"status\": ")
    assert f"{run / 'summary.json'} is not valid JSON" in _one_line_error(
        capsys, ["report", run, "--out", tmp_path / "rep"])

    # config.json and checkpoint disagree on the model
    (run / "config.json").write_text(config_text.replace('"plain8"', '"plain14"'))
    assert "does not hold the weights of plain14" in _one_line_error(capsys, ["eval", run])
    (run / "config.json").write_text(config_text)
    (run / "best.pt").unlink()
    err = _one_line_error(capsys, ["eval", run, "--checkpoint", "best"])
    assert "best.pt is written at the run's first evaluation" in err and "nothing to resume" not in err


def test_cifar_folder_missing_a_file_is_named(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"):
        (folder / name).write_bytes(b"")
    err = _one_line_error(capsys, ["train", "--dataset", "cifar10", "--data", tmp_path, "--iterations", "1",
                                   "--out", tmp_path / "runs"])
    assert f"CIFAR-10 folder {folder} lacks test_batch" in err


def test_disk_full_during_a_checkpoint(tmp_path, capsys, monkeypatch):

    calls, original = [], files.save_checkpoint

    def full(path, state):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(path, state)

    monkeypatch.setattr(files, "save_checkpoint", full)
    toml = _tiny_toml(tmp_path)
    err = _one_line_error(capsys, ["train", "--config", toml, "--iterations", "8", "--checkpoint-every", "2",
                                   "--out", tmp_path, "--name", "full", "--no-progress"])
    assert "No space left on device" in err and "--resume" in err
    assert json.loads((tmp_path / "full" / "summary.json").read_text())["status"] == "failed"
    assert not [p for p in (tmp_path / "full").iterdir() if p.name.endswith(".tmp")]


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    save_json(target, {"a": 1})

    def broken(f):
        f.write(b"{half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        files._replace_from_tmp(target, broken)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    save_text(tmp_path / "page.md", "é |\n")  # the same route for text: UTF-8, nothing left beside it
    assert (tmp_path / "page.md").read_bytes() == "é |\n".encode() and len(list(tmp_path.iterdir())) == 2
    copy_file(tmp_path / "page.md", target)  # and for a copy (a parked checkpoint): the bytes, replaced whole
    assert target.read_bytes() == "é |\n".encode() and len(list(tmp_path.iterdir())) == 2


# -- one process per run folder -----------------------------------------------------------------
def test_lock_is_exclusive_and_released(tmp_path):
    lock = RunLock(tmp_path)
    with pytest.raises(RunFolderError, match=f"in use by orthomod process {os.getpid()}"):
        RunLock(tmp_path)
    lock.release()
    RunLock(tmp_path).release()


def test_a_new_run_never_writes_into_an_existing_run_folder(tmp_path, capsys):
    toml = _tiny_toml(tmp_path, 'diagnostics_every = 0\n')
    # a run that diverged before its first checkpoint leaves a folder without checkpoint.pt
    assert main(["train", "--config", str(toml), "--iterations", "3", "--lr", "1e30", "--out", str(tmp_path),
                 "--name", "first", "--no-progress"]) == EXIT_DIVERGED
    assert not (tmp_path / "first" / "checkpoint.pt").exists()
    err = _one_line_error(capsys, ["train", "--config", toml, "--iterations", "3", "--out", tmp_path,
                                   "--name", "first", "--no-progress"])
    assert f"run folder {tmp_path / 'first'} already holds a run (config.json); continue it with --resume" in err


def _cli(*args):
    return subprocess.Popen([sys.executable, "-m", "orthomod", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(condition, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_second_process_on_a_run_folder_is_refused_and_kill_9_leaves_no_stale_lock(tmp_path):
    toml = _tiny_toml(tmp_path, "checkpoint_every = 5\n")
    run = tmp_path / "dup"
    first = _cli("train", "--config", toml, "--iterations", "100000", "--out", tmp_path, "--name", "dup",
                 "--no-progress", "--seed", "0")
    _wait_for(lambda: (run / "checkpoint.pt").exists())
    for argv in (["--config", toml, "--iterations", "100000", "--out", tmp_path, "--name", "dup", "--seed", "1"],
                 ["--resume", run]):
        second = _cli("train", *argv, "--no-progress")
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2 and err.strip().count("\n") == 0, err
        assert f"run folder {run} is in use by orthomod process {first.pid}" in err
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    RunLock(run).release()  # the kernel dropped the lock with the killed process: nothing stale
    assert json.loads((run / "config.json").read_text())["seed"] == 0
    assert load_checkpoint(run / "checkpoint.pt")["config"]["seed"] == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == sorted(set(steps))  # one line per logged step: no interleaved runs


# -- divergence -----------------------------------------------------------------------------------
def test_divergence_keeps_only_finite_checkpoints_and_exits_3(tmp_path, capsys):
    toml = _tiny_toml(tmp_path, "diagnostics_every = 0\n")
    code = main(["train", "--config", str(toml), "--iterations", "40", "--lr", "1e6", "--checkpoint-every", "1",
                 "--out", str(tmp_path), "--name", "huge", "--no-progress"])
    assert code == EXIT_DIVERGED
    summary = json.loads((tmp_path / "huge" / "summary.json").read_text())
    assert summary["status"] == "diverged"
    message = summary["divergence"]["message"]
    assert message in capsys.readouterr().err
    assert len(summary["divergence"]["buffers"]) == 14  # 7 BN layers: running mean and variance
    if summary["last_checkpoint_step"] is None:
        assert "no checkpoint was written before it" in message
        assert not (tmp_path / "huge" / "checkpoint.pt").exists()
    else:
        state = load_checkpoint(tmp_path / "huge" / "checkpoint.pt")
        assert state["step"] == summary["last_checkpoint_step"]
        assert f"last good checkpoint (step {state['step']})" in message
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_finite_loss_with_nonfinite_bn_statistics_is_divergence(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, iterations=10, checkpoint_every=4), progress=False)
    poisoned = []

    def poison(module, args):  # before step 6's forward, one BN's statistics go to inf
        if isinstance(module, torch.nn.BatchNorm2d) and module.training and trainer.step == 5 and not poisoned:
            module.running_var.fill_(float("inf"))
            poisoned.append(module)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(poison)
    try:
        summary = trainer.run()
    finally:
        handle.remove()
    assert poisoned and torch.isfinite(torch.tensor(summary["final_train_loss"] or 0.0))
    assert summary["status"] == "diverged" and summary["diverged_at_step"] == 8  # found at the next checkpoint
    assert "the loss is finite but 1 parameter or buffer tensors (first: " in summary["divergence"]["message"]
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 4


def test_metrics_after_a_stop_mid_window_equal_an_uninterrupted_run(tmp_path):
    """The stop lands at step 7 with log_every 5: the step-10 line must average steps 6-10."""
    config = tiny_config(tmp_path, iterations=22, diagnostics_every=0)
    stopped = Trainer(config.replace(name="stopped"), progress=False)
    original = stopped._agree_on_loss

    def stop_at_7(loss):
        if stopped.step == 6:
            stopped._stop_signal = signal.SIGTERM
        return original(loss)

    stopped._agree_on_loss = stop_at_7
    assert stopped.run()["step"] == 7
    Trainer(config.replace(name="stopped"), run_dir=tmp_path / "stopped", resume=True, progress=False).run()
    Trainer(config.replace(name="straight"), progress=False).run()

    def lines(name):
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in records]

    assert [r["step"] for r in lines("stopped") if r["kind"] == "train"] == [5, 10, 15, 20, 22]
    assert lines("stopped") == lines("straight")
