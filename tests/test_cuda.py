"""The CUDA paths, where a GPU is (skipped elsewhere; run on a lent GPU by benchmarks/gpu_checks.sh):
no host sync in a modulated training step, the device rule equal to the host rule, fp16's gradient
scaler ordered before the regularizer, DistributedDataParallel over NCCL, a torchrun job killed
and resumed, a run stopped on the GPU resumed on the CPU and the other way, deterministic runs
repeating bit for bit, the regularizers in float32 inside a CUDA autocast region, and the
modulator under torch.compile (inductor) as in eager mode."""
import copy
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from test_distributed import _launcher  # torchrun on a free rendezvous port
from test_regularizers import regularizer_in_autocast
from orthomod import ErrorModulator, OrthonormalRegularizer, create
from orthomod.diagnostics import signal_propagation
from orthomod.files import load_checkpoint
from orthomod.hardware import Precision, choose_precision
from orthomod.train import Trainer, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def _batch(n=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)


def test_a_modulated_training_step_never_waits_for_the_gpu():
    # issue 12, item 4, on the device it is for: CUDA's sync debug mode raises at any
    # device-to-host wait (item, float, bool, nonzero, a blocking copy) inside the step
    torch.manual_seed(0)
    model = create("plain20", init="orthonormal").to(CUDA)
    regularizer, modulator = OrthonormalRegularizer(model, 1e-4), ErrorModulator(model, tau=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = (t.to(CUDA) for t in _batch())
    precision = choose_precision("auto", CUDA)
    train_step(model, x, y, optimizer, precision=precision, regularizer=regularizer, modulator=modulator)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            train_step(model, x, y, optimizer, precision=precision, regularizer=regularizer, modulator=modulator)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    scales = modulator.statistics()["scales"]  # the one transfer, outside the step
    assert len(scales) == 19 and all(s > 0 for s in scales) and any(s != 1.0 for s in scales)


def test_signal_propagation_on_the_gpu_equals_the_cpu_float64_and_leaves_the_model_alone():
    torch.manual_seed(0)
    reference = create("plain20", init="msra").double()  # BN and random weights: errors grow downwards
    on_gpu = copy.deepcopy(reference).to(CUDA)
    before = {k: v.clone() for k, v in on_gpu.state_dict().items()}
    x, y = _batch(16, torch.float64)
    cpu = signal_propagation(reference, x, y)
    gpu = signal_propagation(on_gpu, x.to(CUDA), y.to(CUDA))
    assert gpu["names"] == cpu["names"] and len(cpu["names"]) == 19
    assert gpu["forward"] == pytest.approx(cpu["forward"], rel=1e-10)
    assert gpu["errors"] == pytest.approx(cpu["errors"], rel=1e-10)
    assert cpu["errors_first_over_last"] > 1.0  # not a vacuous comparison: errors differ across layers
    assert all(torch.equal(v, before[k]) for k, v in on_gpu.state_dict().items())
    assert all(p.grad is None for p in on_gpu.parameters())


@pytest.mark.parametrize("rule, tau", [("consecutive", 1.0), ("consecutive", 1.3), ("top", 1.3)])
def test_device_rule_on_the_gpu_equals_host_rule_on_the_cpu_float64(rule, tau):
    torch.manual_seed(0)
    reference = create("plain20", init="orthonormal").double()
    on_gpu = copy.deepcopy(reference).to(CUDA)
    x, y = _batch(16, torch.float64)
    results = []
    for model, device, on_device in ((reference, "cpu", False), (on_gpu, "cuda", True)):
        modulator = ErrorModulator(model, tau=tau, rule=rule, rule_on_device=on_device)
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
        results.append(({n: p.grad.cpu() for n, p in model.named_parameters()}, modulator.statistics()["scales"]))
    (grads_cpu, scales_cpu), (grads_gpu, scales_gpu) = results
    # the band test is exercised: tau 1 leaves only the top layer alone, 1.3 some layers more
    assert (sum(s == 1.0 for s in scales_cpu) > 1) == (tau > 1.0) and sum(s != 1.0 for s in scales_cpu) > 10
    assert scales_gpu == pytest.approx(scales_cpu, rel=1e-10)
    for name, g in grads_cpu.items():
        assert torch.allclose(grads_gpu[name], g, rtol=1e-10, atol=1e-14), name


def test_fp16_scaler_unscales_before_the_regularizer_adds_its_gradient():
    # A loss scaled by 2^16 and unscaled again gives the same gradients bit for bit (powers of
    # two), and modulation factors are ratios of moments: so a step through a real GradScaler
    # must equal a step without one. A regularizer added before unscale_ would be divided by
    # 2^16: with coefficient 1 on an msra init its gradient is large enough to show.
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.manual_seed(0)
    base = create("plain20", init="msra").to(CUDA)
    x, y = (t.to(CUDA) for t in _batch())
    weights = []
    for scaled in (False, True):
        model = copy.deepcopy(base)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 16) if scaled else None
        train_step(model, x, y, optimizer, precision=Precision("fp32", "test"), scaler=scaler,
                   regularizer=OrthonormalRegularizer(model, 1.0), modulator=ErrorModulator(model, tau=1.0))
        weights.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*weights):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)


def test_fp16_run_with_the_method_trains_and_records_its_precision(tmp_path):
    config = tiny_config(tmp_path, device="cuda", precision="fp16", init="orthonormal", reg="ortho",
                         modulation=True, iterations=60, shapes_train=3000)
    summary = Trainer(config, progress=False).run()
    assert summary["status"] == "completed" and summary["precision"] == "fp16" and summary["gpu"]
    assert summary["device"].startswith("cuda") and math.isfinite(summary["final_train_loss"])
    scaler = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["grad_scaler"]  # saved for --resume
    assert scaler is not None and scaler["scale"] > 0


@pytest.mark.parametrize("first", ["cuda", "cpu"])
def test_a_run_stopped_on_one_device_resumes_on_the_other(tmp_path, monkeypatch, first):
    # what scripts/experiments.py park does between machines: a run with device auto stopped where
    # a GPU is and resumed where none is (a lent GPU given back), or the other way, with the state
    # that lives on the device: weights, momentum, SRIP's power-iteration vectors
    gpu_there = torch.cuda.is_available
    then = "cpu" if first == "cuda" else "cuda"
    config = tiny_config(tmp_path, iterations=30, init="orthonormal", reg="srip", modulation=True)

    def machine(kind):  # what resolve_device('auto') sees
        monkeypatch.setattr(torch.cuda, "is_available", gpu_there if kind == "cuda" else (lambda: False))

    machine(first)
    trainer = Trainer(config, progress=False)
    agree = trainer._agree_on_loss

    def sigterm_at_step_12(loss):
        if trainer.step >= 12:
            trainer._stop_signal = signal.SIGTERM
        return agree(loss)

    trainer._agree_on_loss = sigterm_at_step_12
    stopped = trainer.run()
    assert stopped["status"] == "interrupted" and 12 <= stopped["step"] < 30
    machine(then)
    final = Trainer(config, run_dir=tmp_path / "run", resume=True, progress=False).run()
    assert final["status"] == "completed" and final["step"] == 30
    assert [(s["device"].split(":")[0], s["from_step"]) for s in final["sessions"]] == [(first, 0),
                                                                                      (then, stopped["step"])]
    steps = [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "train"]
    assert steps == list(range(5, 31, 5))
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["modulator"]["step_count"] == 30 and math.isfinite(final["final_train_loss"])
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def _torchrun(run_folder_args, env):
    cmd = [*_launcher(1), "-m", "orthomod", "train", "--no-progress", *run_folder_args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def test_torchrun_on_one_gpu_killed_and_resumed(tmp_path):
    # what a one-GPU user launches: torchrun with one process (a world of one: no process group;
    # NCCL refuses two ranks on one GPU, so the two-process NCCL path needs a machine with two)
    env = dict(os.environ)
    proc = _torchrun(["--config", "demo", "--iterations", "1500", "--checkpoint-every", "20", "--log-every", "10",
                      "--out", str(tmp_path), "--name", "nccl"], env)
    run = tmp_path / "nccl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 6:
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler does: every process of the job
    out, err = proc.communicate(timeout=120)
    stopped = json.loads((run / "summary.json").read_text())
    assert stopped["status"] == "interrupted" and 20 <= stopped["step"] < 1500, err[-2000:]
    resumed = _torchrun(["--resume", str(run)], env)
    out, err = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, err[-2000:]
    final = json.loads((run / "summary.json").read_text())
    assert final["status"] == "completed" and final["step"] == 1500
    assert final["device"].startswith("cuda") and final["precision"] == "bf16"
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "train"]
    assert steps == list(range(10, 1501, 10))
    print(f"torchrun: interrupted at step {stopped['step']}, resumed to 1500, final test accuracy "
          f"{final['final_test_acc']:.4f}")


def test_ddp_over_nccl_gives_the_gradients_of_the_bare_model_float64(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        bare = create("plain8", init="orthonormal").double().to(CUDA)
        wrapped = copy.deepcopy(bare)
        ddp = torch.nn.parallel.DistributedDataParallel(wrapped, device_ids=[0])
        x, y = (t.to(CUDA) for t in _batch(8, torch.float64))
        for model in (bare, ddp):
            ErrorModulator(model, tau=1.0)
            F.cross_entropy(model(x), y).backward()
        for (name, a), b in zip(bare.named_parameters(), wrapped.parameters()):
            assert torch.allclose(b.grad, a.grad, rtol=1e-10, atol=1e-14), name
    finally:
        dist.destroy_process_group()


def test_deterministic_gpu_runs_repeat_bit_for_bit(tmp_path):
    # without it, cuDNN's kernels made two demo runs of the same code differ (docs/PERFORMANCE.md)
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-m", "orthomod", "train", "--config", "demo", "--iterations", "80",
                        "--deterministic", "on", "--out", str(tmp_path), "--name", name, "--no-progress"],
                       check=True, capture_output=True, timeout=300)
    a, b = (load_checkpoint(tmp_path / n / "checkpoint.pt")["model"] for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["ortho", "srip", "conv-ortho"])
def test_every_regularizer_computes_in_float32_inside_a_cuda_autocast_region(name):
    # as tests/test_regularizers.py on the CPU: a step written inside torch.autocast("cuda") must
    # not compute V V^T - I of nearly orthonormal weights in bf16
    (grads, values), (grads_in, values_in) = (regularizer_in_autocast(name, "cuda", a) for a in (False, True))
    assert all(v.dtype == torch.float32 and torch.allclose(v, w, rtol=1e-5) for v, w in zip(values_in, values))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-9) for a, b in zip(grads, grads_in))


def test_the_modulator_under_torch_compile_on_the_gpu_gives_the_eager_gradients(monkeypatch):
    # inductor on the GPU, compiled before the modulator is attached, with dynamo's hook guards on
    # (the ErrorModulator docstring): float32 gradients as in eager mode, far closer to them than
    # unmodulated gradients are
    monkeypatch.setattr(torch._dynamo.config, "skip_nnmodule_hook_guards", False)
    torch._dynamo.reset()
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.manual_seed(0)
    eager = create("plain8", init="orthonormal").to(CUDA)
    compiled_model, plain = copy.deepcopy(eager), copy.deepcopy(eager)
    x, y = (t.to(CUDA) for t in _batch())
    compiled = torch.compile(compiled_model)
    F.cross_entropy(compiled(x), y).backward()  # compiled without the hooks first
    compiled_model.zero_grad()
    F.cross_entropy(plain(x), y).backward()
    modulators = [ErrorModulator(eager, tau=1.0), ErrorModulator(compiled_model, tau=1.0)]
    for run in (eager, compiled):
        F.cross_entropy(run(x), y).backward()
    flat = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (eager, compiled_model, plain)]
    error, modulation = (flat[1] - flat[0]).norm(), (flat[2] - flat[0]).norm()
    assert modulators[1].scales == pytest.approx(modulators[0].scales, rel=1e-3)
    assert error < 1e-3 * flat[0].norm() and error < 1e-2 * modulation, (error, modulation)
    print(f"compiled vs eager: relative gradient error {float(error / flat[0].norm()):.2e}, "
          f"modulation's effect {float(modulation / flat[0].norm()):.2e}")
    torch._dynamo.reset()
