"""Time of each regularizer's ``add_grad_()`` on a plain net, against the SGD step it sits beside.

The machine's noise swamps a few percent in whole-step comparisons (bench_step.py), so this one
times the added work alone: each regularizer's ``add_grad_()`` over every conv/linear weight of
plain-110 (fp32, gradients present), interleaved round by round with an SGD step with weight
decay over the same parameters (the work L2 costs). Divide by a training step's time
(bench_precision.py) for the fraction of a step.

    python benchmarks/bench_regularizers.py --model plain110 --rounds 20
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from orthomod import create
from orthomod.hardware import cpu_model
from orthomod.regularizers import REGULARIZERS, make_regularizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="plain110")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = create(args.model, init="msra")
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    sgd = torch.optim.SGD(model.parameters(), lr=1e-9, momentum=0.9, weight_decay=1e-4)
    work = {"sgd step with weight decay": sgd.step}
    work |= {f"{name} add_grad_": make_regularizer(name, model).add_grad_ for name in REGULARIZERS}
    for fn in work.values():  # warm-up
        fn()
    times = {k: [] for k in work}
    for _ in range(args.rounds):
        for k, fn in work.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    print(json.dumps({"model": args.model, "rounds": args.rounds, "cpu": cpu_model(),
                      "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                      "threads": torch.get_num_threads(),
                      "median_ms": {k: round(1e3 * statistics.median(v), 2) for k, v in times.items()}}, indent=2))


if __name__ == "__main__":
    main()
