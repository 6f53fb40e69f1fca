"""Time spent inside the ErrorModulator's hooks during forward + backward of a plain net.

Each hook is wrapped with ``time.perf_counter``; the sums per step (after one warm-up step) say
where the modulator's cost goes: the backward hooks (error moments, the rule and the scaled
error tensor) and the forward hooks (the walk down the autograd graph to the nearest modulated
layers below, and registering the backward hook). Both ways
of computing the rule are timed: on host floats (what CPU gradients use by default) and on
device tensors (what accelerators use).

``floor``: the two passes over memory that exact modulation needs at every layer (the error's
moment and the scaled error), timed on the errors of one real backward pass outside any hook,
beside the bare fwd+bwd in the same rounds: what any exact implementation pays before Python.

    python benchmarks/bench_hooks.py --model plain110 --steps 5
    python benchmarks/bench_hooks.py --model plain110 --steps 5 --precision auto   # as training runs here

``--precision`` (default fp32, as this script ran before it had the flag): the forward passes
run under that precision's autocast, as the trainer's do.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import orthomod.modulation
from orthomod import ErrorModulator, create
from orthomod.hardware import choose_precision, cpu_model



class _TimedModulator(ErrorModulator):
    active_instance = None  # the one whose parts the timed norm adds to

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seconds = {"backward_hooks": 0.0, "forward_hooks": 0.0}
        # parts of the backward hooks: the error moments (one read of each error tensor) and, on
        # host floats, the rule with the multiply of the error tensor by its factor
        self.parts = {"error_moments": 0.0, "host_rule_and_scaled_error": 0.0}
        _TimedModulator.active_instance = self

    def _host_rule(self, *args):
        start = time.perf_counter()
        result = super()._host_rule(*args)
        self.parts["host_rule_and_scaled_error"] += time.perf_counter() - start
        return result

    def _timed(self, key, method, *args):
        start = time.perf_counter()
        result = method(*args)
        self.seconds[key] += time.perf_counter() - start
        return result

    def _backward_hook(self, *args):
        return self._timed("backward_hooks", super()._backward_hook, *args)

    def _forward_hook(self, *args):
        return self._timed("forward_hooks", super()._forward_hook, *args)


_norm = orthomod.modulation._root_sum_of_squares


def _timed_norm(t):
    start = time.perf_counter()
    result = _norm(t)
    _TimedModulator.active_instance.parts["error_moments"] += time.perf_counter() - start
    return result


def floor(model_name: str, x: torch.Tensor, y: torch.Tensor, precision, rounds: int = 5) -> dict:
    """Moments and scaled errors of one backward pass's conv-output errors, outside any hook."""
    model = create(model_name, init="orthonormal").to(memory_format=torch.channels_last)
    errors = []

    def keep(module, inputs, output):
        output.register_hook(lambda grad: errors.append(grad.detach().clone()))

    handles = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with precision.autocast(x.device):
        F.cross_entropy(model(x), y).backward()
    for h in handles:
        h.remove()
    times = {"fwd_bwd": [], "moments": [], "scaled_errors": []}
    for _ in range(rounds + 1):  # the first round warms up
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        with precision.autocast(x.device):
            F.cross_entropy(model(x), y).backward()
        times["fwd_bwd"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for e in errors:
            float(_norm(e))
        times["moments"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for e in errors:
            e * 1.0001  # a fresh tensor, freed at once, as the backward pass frees it
        times["scaled_errors"].append(time.perf_counter() - start)
    ms = {k: round(1e3 * statistics.median(v[1:]), 2) for k, v in times.items()}
    return {"errors": len(errors), "error_megabytes": round(sum(e.numel() * e.element_size() for e in errors) / 2**20),
            "ms_median_of_rounds": ms,
            "passes_fraction_of_fwd_bwd": round((ms["moments"] + ms["scaled_errors"]) / ms["fwd_bwd"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="plain110")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--precision", default="fp32", help="fp32, bf16, or auto (what training picks here)")
    args = parser.parse_args()
    precision = choose_precision(args.precision, torch.device("cpu"))
    orthomod.modulation._root_sum_of_squares = _timed_norm
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,))
    result = {}
    for on_device in (False, True):
        model = create(args.model, init="orthonormal").to(memory_format=torch.channels_last)
        modulator = _TimedModulator(model, tau=1.0, rule_on_device=on_device)
        total = 0.0
        for step in range(args.steps + 1):
            if step == 1:  # the first step warms up; count the rest
                modulator.seconds = dict.fromkeys(modulator.seconds, 0.0)
                modulator.parts = dict.fromkeys(modulator.parts, 0.0)
                total = 0.0
            start = time.perf_counter()
            model.zero_grad(set_to_none=True)
            with precision.autocast(x.device):
                F.cross_entropy(model(x), y).backward()
            total += time.perf_counter() - start
        modulator.remove()
        per_step = {k: round(1e3 * v / args.steps, 2) for k, v in modulator.seconds.items()}
        result["rule on device tensors" if on_device else "rule on host floats"] = {
            "ms_per_step": per_step,
            "of_which_backward_ms_per_step": {k: round(1e3 * v / args.steps, 2) for k, v in modulator.parts.items()},
            "fwd_bwd_ms_per_step": round(1e3 * total / args.steps, 1),
            "hooks_fraction_of_fwd_bwd": round(sum(modulator.seconds.values()) / total, 4)}
    result["floor"] = floor(args.model, x, y, precision)
    print(json.dumps({"model": args.model, "batch_size": args.batch_size, "steps": args.steps, "cpu": cpu_model(),
                      "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                      "precision": precision.name,
                      "threads": torch.get_num_threads(), "result": result}, indent=2))


if __name__ == "__main__":
    main()
