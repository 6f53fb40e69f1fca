"""Cost of orthonormality + modulation in a full SGD training step, against weight decay.

Times one training step (forward, backward, regularizer, SGD update) of a CIFAR plain net in
the precision ``--precision auto`` picks on this machine (or the one named) and channels_last, on
the CPU or (``--device cuda``) a GPU, for:
  l2         SGD(weight_decay=1e-4 on conv/linear weights)       -- the reference
  ortho+mod  OrthonormalRegularizer.add_grad_() + ErrorModulator -- orthomod's way
  ortho      OrthonormalRegularizer.add_grad_() alone
  naive+mod  the penalty as a loss term through autograd + ErrorModulator
  ortho+mod-host  ortho+mod with the modulation rule on host floats (one device-to-host wait
             per layer on a GPU; the default there keeps it on the device)
  ortho+mod-device  ortho+mod with the rule on device tensors (the GPU default) wherever it runs:
             on the CPU at a small batch, where the time is the ops' dispatch, a stand-in for a GPU's
             launch-bound step
  srip       SRIPRegularizer.add_grad_() (Bansal et al. 2018) in place of weight decay
  conv-ortho ConvOrthogonalityRegularizer.add_grad_() (Wang et al. 2020) in place of weight decay
  ortho+mod@REV  ortho+mod with the ErrorModulator of git revision REV (``--against REV``): an
             earlier implementation against today's, in one process (also ortho+mod-device@REV)
Configurations are interleaved round by round (the machine is noisy) and the medians compared,
both of wall time and of the process's CPU time (``time.process_time``, all threads): on a shared
VM the time the hypervisor gives to other guests lands in wall time but not in CPU time.

    python benchmarks/bench_step.py --model plain110 --batch-size 128 --rounds 10 --tau 1
    python benchmarks/bench_step.py --configs l2,ortho+mod --against d9db74f
    python benchmarks/bench_step.py --batch-size 2 --configs l2,ortho+mod-device,ortho+mod-device@65fda72
    python benchmarks/bench_step.py --device cuda --precision bf16 --configs l2,ortho+mod,ortho
    python benchmarks/bench_step.py --device cuda --configs l2,ortho+mod --compile default

``--compile MODE`` times each configuration's model under ``torch.compile(mode=MODE)``, with
dynamo's module-hook guards on so that the modulated copies get code of their own (the
ErrorModulator docstring); compilation happens in the warm-up, outside the timed rounds.
``--also-eager`` times each configuration uncompiled too, as ``NAME:eager``, interleaved with the
compiled ones in the same process (does compiling pay on this machine?).

    python benchmarks/bench_step.py --model plain44 --configs l2 --compile default --also-eager
"""
from __future__ import annotations

import argparse
import copy
import json
import importlib.util
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from orthomod import ErrorModulator, OrthonormalRegularizer, create
from orthomod.hardware import choose_precision, cpu_model, resolve_device
from orthomod.regularizers import make_regularizer, split_decay_parameters

def paired_ratio(times: list[float], reference: list[float]) -> float:
    """The median over rounds of one configuration's time over the reference's in the same round
    (a slow spell of the machine hits both of a round's measurements alike)."""
    return statistics.median(a / b for a, b in zip(times, reference))


def modulator_at(revision: str) -> type:
    """The ErrorModulator class of orthomod/modulation.py at a git revision of this repository."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.check_output(["git", "show", f"{revision}:src/orthomod/modulation.py"], cwd=root, text=True)
    spec = importlib.util.spec_from_loader(f"orthomod.modulation_at_{revision}", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "orthomod"  # its relative imports resolve against today's package
    sys.modules[spec.name] = module
    exec(compile(source, f"{revision}:src/orthomod/modulation.py", "exec"), module.__dict__)
    return module.ErrorModulator


def make_step(name: str, base: torch.nn.Module, tau: float, precision, device: torch.device = torch.device("cpu"),
              compile_mode: str | None = None):
    model = copy.deepcopy(base)
    weights, others = split_decay_parameters(model)
    wd = 1e-4 if name == "l2" else 0.0
    opt = torch.optim.SGD([{"params": weights, "weight_decay": wd}, {"params": others, "weight_decay": 0.0}],
                          lr=0.01, momentum=0.9)
    if name in ("srip", "conv-ortho"):
        reg = make_regularizer(name, model)
    else:
        reg = OrthonormalRegularizer(model, 1e-4) if name != "l2" else None
    modulator = None
    if "+mod" in name:
        kind, _, revision = name.partition("@")
        modulator_class = modulator_at(revision) if revision else ErrorModulator
        options = {"rule_on_device": {"host": False, "device": True}[kind.rsplit("-", 1)[1]]} if "-" in kind else {}
        modulator = modulator_class(model, tau=tau, **options)
    scaler = torch.amp.GradScaler(device.type) if precision.needs_grad_scaler else None
    forward = torch.compile(model, mode=compile_mode) if compile_mode else model  # after the modulator's hooks

    def step(x, y):
        with precision.autocast(device):
            loss = F.cross_entropy(forward(x).float(), y)
        if name.startswith("naive"):
            loss = loss + reg.loss()
        opt.zero_grad(set_to_none=True)
        if scaler is not None:  # fp16 (CUDA): as the trainer does it
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if reg is not None and not name.startswith("naive"):
            reg.add_grad_()
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if modulator is not None:
            modulator.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="plain110")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--tau", type=float, default=1.0, help="1 modulates every layer: the costliest case")
    parser.add_argument("--configs", default="l2,ortho+mod,ortho,naive+mod")
    parser.add_argument("--precision", default="auto", help="auto (what training picks here), fp32, bf16 or fp16")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (as training picks)")
    parser.add_argument("--against", help="also time ortho+mod with the modulator of this git revision")
    parser.add_argument("--compile", metavar="MODE", help="torch.compile each model: default, reduce-overhead, ...")
    parser.add_argument("--also-eager", action="store_true", help="with --compile: time each configuration "
                        "uncompiled too (NAME:eager), in the same rounds")
    args = parser.parse_args()
    if args.also_eager and not args.compile:
        parser.error("--also-eager compares with --compile MODE; give both")
    if args.compile:
        torch._dynamo.config.skip_nnmodule_hook_guards = False  # hooked and plain copies: code of their own
    if args.against:
        args.configs += f",ortho+mod@{args.against}"
    device = resolve_device(args.device)
    precision = choose_precision(args.precision, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # a GPU step ends when its kernels do

    torch.manual_seed(0)
    base = create(args.model, init="orthonormal").to(device, memory_format=torch.channels_last)
    x = torch.randn(args.batch_size, 3, 32, 32).to(device, memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,)).to(device)
    names = args.configs.split(",")
    known = ("l2", "ortho+mod", "ortho", "naive+mod", "ortho+mod-host", "ortho+mod-device", "srip", "conv-ortho")
    unknown = [n for n in names if n.partition("@")[0] not in known or ("@" in n and "+mod" not in n)]
    if unknown or "l2" not in names:
        parser.error(f"--configs: {', '.join(unknown) or 'l2 missing'}: choose from {', '.join(known)} "
                     "(l2 is the reference; NAME@REV for a +mod configuration with another revision's modulator)")
    steps = {n: make_step(n, base, args.tau, precision, device, args.compile) for n in names}
    if args.also_eager:
        steps |= {f"{n}:eager": make_step(n, base, args.tau, precision, device) for n in names}
        names = [m for n in names for m in (n, f"{n}:eager")]
    warm_start = time.perf_counter()
    for n in names:  # warm-up: allocator, oneDNN kernel selection, compilation (CUDA graphs record on call 2)
        for _ in range(3 if args.compile else 2):
            steps[n](x, y)
    sync()
    warm_up_s = time.perf_counter() - warm_start
    times = {n: [] for n in names}
    cpu_times = {n: [] for n in names}  # CPU seconds of this process (all threads)
    for _ in range(args.rounds):
        for n in names:
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(args.steps_per_round):
                steps[n](x, y)
            sync()
            times[n].append((time.perf_counter() - start) / args.steps_per_round)
            cpu_times[n].append((time.process_time() - cpu_start) / args.steps_per_round)
    ref = statistics.median(times["l2"])
    result = {
        "model": args.model, "batch_size": args.batch_size, "rounds": args.rounds, "tau": args.tau,
        "revision": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                   cwd=Path(__file__).resolve().parents[1]).stdout.strip(),
        "precision": precision.name, "device": str(device), "compile": args.compile, "warm_up_s": round(warm_up_s, 1),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "median_step_s": {n: round(statistics.median(t), 4) for n, t in times.items()},
        "ratio_vs_l2": {n: round(statistics.median(t) / ref, 4) for n, t in times.items()},
        "median_round_ratio_vs_l2": {n: round(paired_ratio(t, times["l2"]), 4) for n, t in times.items()},
        "cpu_time_median_round_ratio_vs_l2": {n: round(paired_ratio(t, cpu_times["l2"]), 4)
                                              for n, t in cpu_times.items()},
        "cpu_time_round_ratios_vs_l2": {n: [round(a / b, 3) for a, b in zip(t, cpu_times["l2"])]
                                        for n, t in cpu_times.items() if n != "l2"},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
