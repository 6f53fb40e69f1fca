"""Trainer throughput against a minimal hand-written loop over the same model and data.

Both train plain-44 (by default) on CIFAR-10 with batch 128, in the precision ``--precision auto``
picks on this machine, channels_last,
SGD momentum 0.9 + L2, horizontal flips and per-pixel normalization. The hand-written loop does
only that: index a random permutation, flip, normalize, forward, backward, step. The trainer
adds its lr schedule, divergence check, accuracy, metrics lines and progress bookkeeping.
Rounds alternate between the two (the machine is noisy) and the median images/s are compared,
as well as the median of the per-round ratios (each trainer run against the hand loop after it).
The trainer's images/s are read from its own metrics.jsonl (evaluation and checkpoints excluded).

    ORTHOMOD_DATA=DIR python benchmarks/bench_trainer.py --model plain44 --steps 60 --rounds 3

With ``--against probes`` it instead compares the trainer recording diagnostics every 100 steps
(the default) with the trainer recording none, over windows that contain the probed steps:

    ORTHOMOD_DATA=DIR python benchmarks/bench_trainer.py --against probes --steps 400 --rounds 2

With ``--against hand-overhead`` it measures the trainer's extra time per step directly: both
loops train a skeleton of the model (its number of conv layers, 1x1 convs on 4x4 images, so that
the step's arithmetic and the noise that comes with it nearly vanish), their per-step times are
compared round by round, and the median difference is set against the real model's hand-loop
step to estimate the ratio:

    ORTHOMOD_DATA=DIR python benchmarks/bench_trainer.py --against hand-overhead --model plain44 --steps 300 --rounds 7
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from orthomod.config import TrainConfig
from orthomod.data import load_dataset, normalization
from orthomod.models import create
from orthomod.hardware import choose_precision, cpu_model
from orthomod.train import Trainer



def hand_written_loop(model_name: str, dataset, steps: int, batch_size: int, warmup: int, precision,
                      build=None, lr: float = 0.1) -> float:
    torch.manual_seed(0)
    model = (build() if build is not None else create(model_name, init="msra")).to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 1e-4}, {"params": rest, "weight_decay": 0}],
                          lr=lr, momentum=0.9)
    images, labels = dataset.train_images, dataset.train_labels
    mean, std = normalization(images, "pixel")
    order = torch.randperm(len(images))
    start = None
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        idx = order[i * batch_size:(i + 1) * batch_size]
        x = images[idx]
        flip = torch.rand(len(idx)) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        x = ((x.float() - mean) / std).contiguous(memory_format=torch.channels_last)
        with precision.autocast(torch.device("cpu")):
            loss = F.cross_entropy(model(x).float(), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch_size / (time.perf_counter() - start)


def trainer_run(config: TrainConfig, warmup_windows: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config.replace(out=out, name="bench"), progress=False)
        if trainer.run()["status"] != "completed":
            raise SystemExit("the trainer's run did not complete (see above): its windows would time fewer steps")
        lines = [json.loads(l) for l in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [l for l in lines if l["kind"] == "train"][warmup_windows:]
    # images/s over the measured windows = total images / total time
    return sum(config.log_every * config.batch_size for _ in windows) / sum(
        config.log_every * config.batch_size / w["images_per_s"] for w in windows)


def hand_loop_config(args, precision, warmup: int, log_every: int, lr: float = 0.1) -> TrainConfig:
    """The trainer's settings matching the hand-written loop: msra + L2, no checkpoints mid-run."""
    return TrainConfig(model=args.model, dataset=args.dataset, iterations=args.steps + warmup,
                       batch_size=args.batch_size, log_every=log_every, checkpoint_every=10**9,
                       eval_batch_size=1000, init="msra", reg="l2", precision=precision.name, lr=lr)


def skeleton(convs: int, num_classes: int = 10) -> torch.nn.Module:
    """As many conv layers as the real model, each 1x1 with 3 channels on a 4x4 image, and a
    linear classifier: the same number of modules for the trainer's hooks and the optimizer to
    visit, with next to no arithmetic."""
    layers = [torch.nn.AdaptiveAvgPool2d(4)]
    for _ in range(convs):
        layers += [torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(48, num_classes))


def measure_overhead(args, precision) -> None:
    """The trainer's cost beyond the hand-written loop, in ms per step, measured where the step's
    arithmetic is next to nothing (a skeleton of the model: its conv count, 1x1 convs on 4x4
    images), so that the machine's noise, which scales with the arithmetic, does not swamp it;
    then the real model's hand-loop step time, to turn it into the ratio trainer / hand loop."""
    import orthomod.train

    convs = sum(isinstance(m, torch.nn.Conv2d) for m in create(args.model).modules())
    orthomod.train.build_model = lambda config, num_classes, init=None: skeleton(convs, num_classes)
    log_every, warmup = 10, 20
    # the skeleton (43 BN'd layers of 3 channels) diverged in bf16 on an AVX512-BF16 EPYC (within
    # 4 steps at lr 0.1, 72 at 0.01), which ends the trainer's run early; both loops step it at lr 1e-6
    # (the optimizer does the same arithmetic at any lr), the real model's hand loop at 0.1
    skeleton_lr = 1e-6
    config = hand_loop_config(args, precision, warmup, log_every, lr=skeleton_lr)
    dataset = load_dataset(args.dataset)
    trainer_ms, hand_ms = [], []
    for _ in range(args.rounds):
        trainer_ms.append(1e3 * args.batch_size / trainer_run(config, warmup_windows=warmup // log_every))
        hand_ms.append(1e3 * args.batch_size / hand_written_loop(args.model, dataset, args.steps, args.batch_size,
                                                                 warmup, precision, build=lambda: skeleton(convs),
                                                                 lr=skeleton_lr))
    overhead = statistics.median(t - h for t, h in zip(trainer_ms, hand_ms))
    real = [1e3 * args.batch_size / hand_written_loop(args.model, dataset, args.real_steps, args.batch_size, 3,
                                                      precision) for _ in range(2)]
    step = statistics.median(real)
    print(json.dumps({
        "model": args.model, "dataset": args.dataset, "batch_size": args.batch_size, "convs": convs,
        "skeleton_steps_per_round": args.steps, "rounds": args.rounds, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.machine(), "precision": precision.name,
        "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "skeleton_trainer_ms_per_step": [round(v, 3) for v in trainer_ms],
        "skeleton_hand_loop_ms_per_step": [round(v, 3) for v in hand_ms],
        "trainer_overhead_ms_per_step": round(overhead, 3),
        "real_model_hand_loop_ms_per_step": [round(v, 1) for v in real],
        "estimated_ratio_trainer_over_hand": round(step / (step + overhead), 4),
    }, indent=2))


def compare_probes(args) -> None:
    log_every, warmup = 100, 100
    base = TrainConfig(model=args.model, dataset=args.dataset, iterations=args.steps + warmup,
                       batch_size=args.batch_size, log_every=log_every, checkpoint_every=10**9, init="orthonormal",
                       reg="ortho", precision=args.precision)
    with_probes, without = [], []
    for _ in range(args.rounds):
        with_probes.append(trainer_run(base.replace(diagnostics_every=100), warmup_windows=warmup // log_every))
        without.append(trainer_run(base.replace(diagnostics_every=0), warmup_windows=warmup // log_every))
    print(json.dumps({
        "model": args.model, "dataset": args.dataset, "batch_size": args.batch_size, "steps": args.steps,
        "rounds": args.rounds, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "with_probes_every_100_images_per_s": [round(v, 1) for v in with_probes],
        "without_probes_images_per_s": [round(v, 1) for v in without],
        "probe_cost_fraction": round(1 - statistics.median(with_probes) / statistics.median(without), 4),
    }, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="plain44")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--against", choices=("hand", "probes", "hand-overhead"), default="hand")
    parser.add_argument("--real-steps", type=int, default=10,
                        help="--against hand-overhead: steps of the real model's hand loop (twice)")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    precision = choose_precision(args.precision, torch.device("cpu"))
    if args.against == "probes":
        return compare_probes(args)
    if args.against == "hand-overhead":
        return measure_overhead(args, precision)

    log_every, warmup = 10, 10
    config = hand_loop_config(args, precision, warmup, log_every)
    dataset = load_dataset(args.dataset)
    ours, hand = [], []
    for _ in range(args.rounds):
        ours.append(trainer_run(config, warmup_windows=warmup // log_every))
        hand.append(hand_written_loop(args.model, dataset, args.steps, args.batch_size, warmup, precision))
    result = {
        "model": args.model, "dataset": args.dataset, "batch_size": args.batch_size, "steps": args.steps,
        "rounds": args.rounds, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "precision": precision.name, "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "trainer_images_per_s": [round(v, 1) for v in ours], "hand_loop_images_per_s": [round(v, 1) for v in hand],
        "ratio_trainer_over_hand": round(statistics.median(ours) / statistics.median(hand), 4),
        # each round's trainer run against the hand loop right after it: slow drift of the machine cancels
        "median_of_paired_ratios": round(statistics.median(o / h for o, h in zip(ours, hand)), 4),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
