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
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from orthomod import create
from orthomod.hardware import Precision, choose_precision, cpu_bf16_feature
from orthomod.regularizers import split_decay_parameters


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_step(base: torch.nn.Module, precision: str, channels_last: bool):
    model = copy.deepcopy(base)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    weights, others = split_decay_parameters(model)
    opt = torch.optim.SGD([{"params": weights, "weight_decay": 1e-4}, {"params": others, "weight_decay": 0.0}],
                          lr=0.01, momentum=0.9)
    mixed = Precision(precision, "benchmark")

    def step(x, y):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with mixed.autocast(torch.device("cpu")):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


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
