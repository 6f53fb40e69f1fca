"""Step time of each leaderboard row against the baseline row's, measured in one process.

Each row of ``scripts/experiments.py`` (the paper's methods and the other known ones) is built
from its own command-line flags exactly as ``orthomod train`` builds it (model, init, norm and
activation, parametrization, optimizer with its weight decay, regularizer, modulator), in the
precision ``--precision auto`` picks here, channels_last, and trained for a few steps on one
fixed random batch. The machine is noisy: in each round every row is timed right beside the
baseline (msra + L2), the two in alternating order, and a row's ratio is the median over rounds
of its step time over the baseline's beside it. This is the leaderboard's "time per step /
baseline" column: the runs themselves ran at different times on a machine whose speed drifts.
Rows with the baseline's arithmetic (delta-orthogonal init + L2 differs from it only in the init)
show the resolution.

    python benchmarks/bench_rows.py --model plain44 --rounds 5
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

from orthomod.cli import train_config
from orthomod.hardware import choose_precision, cpu_model
from orthomod.train import build_model, build_modulator, build_optimizer, build_regularizer, init_from_data_, \
    train_step

from bench_step import paired_ratio

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def experiments():
    """scripts/experiments.py, where the rows and their flags are defined."""
    spec = importlib.util.spec_from_file_location("experiments", ROOT / "scripts" / "experiments.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_step(flags: list[str], model_name: str, x: torch.Tensor, y: torch.Tensor, precision: str = "auto"):
    """One training step of the row ``flags`` describe, as the trainer takes it, in ``precision``."""
    config = train_config(["--dataset", "cifar10", "--model", model_name, "--iterations", "1",
                           "--precision", precision, *flags])
    torch.manual_seed(0)
    model = build_model(config, 10, init=config.init)
    init_from_data_(config, model, lambda: x)  # LSUV's scaling, on the benchmark's batch
    model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config, model)
    for group in optimizer.param_groups:  # the same arithmetic at any lr; a small one keeps the weights sane
        group["lr"] = 1e-3
    regularizer, modulator = build_regularizer(config, model), build_modulator(config, model)
    precision = choose_precision(config.precision, CPU)

    def step():
        train_step(model, x, y, optimizer, precision=precision, regularizer=regularizer, modulator=modulator)

    return step, precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="plain44")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--rows", help="comma-separated method keys (default: every row; l2 is always timed)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="auto (the trainer's choice here), fp32 or bf16: the leaderboard's column is fp32")
    args = parser.parse_args()
    flags = experiments().METHOD_FLAGS
    names = ["l2", *(k for k in (args.rows.split(",") if args.rows else flags) if k != "l2")]
    unknown = [k for k in names if k not in flags]
    if unknown:
        parser.error(f"unknown row {', '.join(unknown)}; the rows are {', '.join(flags)}")
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,))
    steps = {}
    for name in names:
        steps[name], precision = make_step(flags[name], args.model, x, y, args.precision)
        for _ in range(2):  # warm-up: allocator, oneDNN kernel selection, SRIP's power iteration
            steps[name]()
    def timed(name: str) -> float:
        start = time.perf_counter()
        for _ in range(args.steps_per_round):
            steps[name]()
        return (time.perf_counter() - start) / args.steps_per_round

    # each row's steps right after the baseline's, in turn (B A B A ...), so that a ratio compares
    # two measurements seconds apart; which of the pair goes first alternates between rounds
    times = {name: [] for name in names}  # of each row, and of the baseline just beside it
    baseline = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[1:]:
            first, second = (("l2", name) if r % 2 == 0 else (name, "l2"))
            a, b = timed(first), timed(second)
            times[name].append(b if first == "l2" else a)
            baseline[name].append(a if first == "l2" else b)
    times["l2"] = baseline["l2"] = [t for name in names[1:] for t in baseline[name]]
    result = {
        "model": args.model, "batch_size": args.batch_size, "rounds": args.rounds,
        "steps_per_round": args.steps_per_round, "precision": precision.name,
        "revision": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                   cwd=ROOT).stdout.strip(),
        "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": {name: {"flags": " ".join(flags[name]),
                        "median_step_s": round(statistics.median(times[name]), 4),
                        "ratio_to_l2": round(paired_ratio(times[name], baseline[name]), 3),
                        "round_ratios": [round(a / b, 3) for a, b in zip(times[name], baseline[name])]}
                 for name in names},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
