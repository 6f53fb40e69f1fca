"""Step time per precision and memory format: the numbers behind ``--precision auto``.

Times one SGD training step (forward, backward, update; msra + L2, as the baseline trains) of
CIFAR plain nets at batch 128 on random inputs, in fp32 and under bf16 autocast, each with and
without channels_last. Configurations are interleaved round by round (the machine is noisy);
the median per configuration is reported with the CPU it ran on.

    python benchmarks/bench_precision.py --models plain20,plain44,plain110 --rounds 3
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from orthomod import create
from orthomod.hardware import Precision, choose_precision, cpu_bf16_feature, cpu_model

from bench_step import make_step as make_method_step


def make_step(base: torch.nn.Module, precision: str, channels_last: bool):
    """bench_step's weight-decay step, in ``precision``, with or without channels_last."""
    model = copy.deepcopy(base)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step = make_method_step("l2", model, tau=1.0, precision=Precision(precision, "benchmark"))

    def run(x, y):
        step(x.contiguous(memory_format=torch.channels_last) if channels_last else x, y)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="plain20,plain44,plain110")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precisions", default="fp32,bf16")
    args = parser.parse_args()

    configs = [(p, cl) for p in args.precisions.split(",") for cl in (False, True)]
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))
    results = {}
    for name in args.models.split(","):
        base = create(name, init="msra")
        steps = {c: make_step(base, *c) for c in configs}
        for c in configs:  # warm-up: allocator, oneDNN kernel selection
            steps[c](x, y)
        times = {c: [] for c in configs}
        for _ in range(args.rounds):
            for c in configs:
                start = time.perf_counter()
                steps[c](x, y)
                times[c].append(time.perf_counter() - start)
        results[name] = {f"{p}{'+channels_last' if cl else ''}": round(statistics.median(t), 4)
                         for (p, cl), t in times.items()}
    print(json.dumps({
        "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_bf16_feature(), "auto_chooses": choose_precision("auto", torch.device("cpu")).name,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "rounds": args.rounds, "median_step_s": results,
    }, indent=2))


if __name__ == "__main__":
    main()
