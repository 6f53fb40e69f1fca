"""Command line: a thin layer over :mod:`orthomod.train` and the config.

    orthomod train --config demo                 # a preset (see: orthomod presets) or a TOML file
    orthomod train --model plain44 --init orthonormal --reg ortho --epochs 10 --dataset cifar10
    orthomod train --resume runs/NAME            # continue where the last checkpoint left off
    orthomod eval runs/NAME                      # re-evaluate a run's checkpoint
    torchrun --nproc_per_node 2 -m orthomod train ...   # DistributedDataParallel (gloo/NCCL)
    orthomod presets                             # list the presets
    orthomod report runs/A runs/B --out report   # figures and a comparison table
    orthomod analyze bn-jacobian --out figs      # the BN Jacobian's eigenvalues against rho^2
    orthomod analyze propagation --config demo   # per layer: signal up, errors down, at step 0

Exit codes: 0 done; 2 invalid input or an unusable file, folder or machine (a one-line error);
3 the run diverged (summary.json says where; the last good checkpoint, if any, stays); 128 + N
stopped by signal N after writing a checkpoint (130 for Ctrl-C, 143 for SIGTERM).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import signal
import sys
import typing
from pathlib import Path

from .config import ConfigError, TrainConfig, list_presets, load_config_file
from .errors import OrthomodError

__all__ = ["main", "EXIT_INVALID", "EXIT_DIVERGED"]

EXIT_INVALID = 2   # bad input: one line on stderr
EXIT_DIVERGED = 3  # training diverged: summary.json holds the step and per-layer statistics


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("on", "true", "yes", "1"):
        return True
    if lowered in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off, got {text!r}")


def _optional_int(text: str) -> int | None:
    if text.lower() in ("none", "always"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer number of iterations or 'always', got {text!r}")


def _bf16_alias(text: str) -> str:
    return "bf16" if _bool(text) else "fp32"


def _float_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _flag_type(name: str, hint):
    """The argparse type of a config key, from its type hint."""
    if name == "modulation_until":  # None is spelled 'always' on the command line
        return _optional_int
    if hint == list[float]:
        return _float_list
    kind = next(k for k in (bool, int, float, str) if k == hint or k in typing.get_args(hint))
    return _bool if kind is bool else kind


def _train_flags() -> dict[str, tuple[str, object, str]]:
    """flag -> (config key, type, help): one flag per TrainConfig key, described where the key is."""
    hints = typing.get_type_hints(TrainConfig)
    return {"--" + f.name.replace("_", "-"): (f.name, _flag_type(f.name, hints[f.name]), f.metadata["help"])
            for f in dataclasses.fields(TrainConfig)}


_TRAIN_FLAGS = _train_flags()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own convention)
        self.exit(2, f"orthomod: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="orthomod", description="Train extremely deep plain CNNs with orthonormality and modulation.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train one run", description="Train one run. Flags override the config.")
    _add_config_arguments(train)
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--bf16", dest="precision", type=_bf16_alias, default=argparse.SUPPRESS,
                       help="old flag: on = --precision bf16, off = --precision fp32")

    evaluate = sub.add_parser("eval", help="re-evaluate a run's checkpoint on the test set")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--checkpoint", choices=("last", "best"), default="last")
    evaluate.add_argument("--data", help="CIFAR-10 folder, if it moved since training")
    evaluate.add_argument("--device", default="auto")

    sub.add_parser("presets", help="list the preset configs")

    report = sub.add_parser("report", help="figures and a comparison table from run folders")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", required=True, help="folder for report.md, report.html and the PNG figures")

    analyze = sub.add_parser("analyze", help="stand-alone analyses")
    what = analyze.add_subparsers(dest="analysis", required=True, parser_class=_Parser)
    bn = what.add_parser("bn-jacobian", help="eigenvalues of J J^T of one BN component against rho^2")
    bn.add_argument("--batch", type=int, default=64, help="batch size m (>= 3)")
    bn.add_argument("--gamma", type=float, default=1.0)
    bn.add_argument("--eps", type=float, default=1e-5)
    bn.add_argument("--seed", type=int, default=0)
    bn.add_argument("--out", help="folder for bn_jacobian.png (default: print only)")
    propagation = what.add_parser(
        "propagation", help="per layer at step 0 (or a run's checkpoint): the signal's second moment up, the errors' down",
        description="The model and first training batch that `orthomod train` with the same flags starts from: "
                    "one forward and backward pass in fp32 on the CPU, per conv layer the second moment of its "
                    "output and of the loss's gradient at that output (q, as in Figs. 3-4), and the mean norm of its "
                    "filters. Takes train's flags; "
                    "those that build the model, its data and its init matter. With --run, the same on that run's "
                    "first training batch with the weights of its checkpoint: the trained net against its start.")
    _add_config_arguments(propagation)
    propagation.add_argument("--run", metavar="RUN_DIR", help="measure this run's checkpoint instead of step 0 "
                                                             "(its saved config: no other config flag but --data)")
    propagation.add_argument("--checkpoint", choices=("last", "best"), default="last",
                             help="with --run: its last checkpoint or the best evaluation's weights")
    propagation.add_argument("--json", action="store_true", help="print the measurements as one JSON object")
    propagation.add_argument("--figure", metavar="FOLDER", help="also draw FOLDER/propagation.png (train's --out "
                                                                "names its run folder, unused here)")
    return parser


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and one flag per config key: what ``train`` and ``analyze propagation`` build a config from."""
    parser.add_argument("--config", help="a TOML config file or a preset name (see: orthomod presets)")
    for flag, (key, kind, text) in _TRAIN_FLAGS.items():
        parser.add_argument(flag, dest=key, type=kind, default=argparse.SUPPRESS, help=text)


def _train(args: argparse.Namespace) -> int:
    from .distributed import setup

    world = setup(getattr(args, "device", "auto"))  # a world of one unless started by torchrun
    return _train_in(args, world)  # the trainer and its DDP wrapper are gone when it returns


def _leave_process_group(code: int) -> None:
    """End a distributed process: together with its peers, then without C++ static teardown.

    Interpreter shutdown after gloo sometimes aborts ("terminate called without an active
    exception", seen in about one resumed run in six here); every file is written and closed by
    now, so the process leaves with os._exit once its streams are flushed.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _train_in(args: argparse.Namespace, world) -> int:
    from .train import Trainer

    overrides = _overrides(args)
    if args.resume:
        _saved_config_only(args, overrides, "--resume continues a run with its saved config")
        run_dir = Path(args.resume)
        config = _run_config(run_dir)
        trainer = Trainer(config, run_dir=run_dir, resume=True, progress=not args.no_progress, world=world)
    else:
        trainer = Trainer(_new_run_config(args, overrides), progress=not args.no_progress, world=world)
    summary = trainer.run()
    keys = ("status", "step", "final_test_acc", "best_test_acc", "final_train_loss", "wall_time_s")
    if world.is_main:
        print(json.dumps({"run": str(trainer.run_dir)} | {k: summary[k] for k in keys}))
    if summary["status"] == "interrupted":  # the shell's convention for a signal: 128 + its number
        return 128 + signal.Signals[summary["signal"]].value
    return EXIT_DIVERGED if summary["status"] == "diverged" else 0


def _overrides(args: argparse.Namespace) -> dict:
    """The config keys the command line gave, with their values."""
    return {key: getattr(args, key) for _, (key, _, _) in _TRAIN_FLAGS.items() if hasattr(args, key)}


def _saved_config_only(args: argparse.Namespace, overrides: dict, why: str) -> None:
    """Refuse --config and config flags where a run folder's saved config applies."""
    if args.config or overrides:
        given = ["--config"] if args.config else []
        given += [flag for flag, (key, _, _) in _TRAIN_FLAGS.items() if key in overrides]
        raise ConfigError(f"{why}; drop {', '.join(given)}")


def _new_run_config(args: argparse.Namespace, overrides: dict) -> TrainConfig:
    """The config of a new run: ``--config``'s file or preset, then the flags given."""
    values = load_config_file(args.config) if args.config else {}
    config = TrainConfig.from_dict({**values, **overrides})
    if "epochs" in overrides and "iterations" not in overrides:
        config.iterations = None  # a budget flag replaces the config's budget
    if "iterations" in overrides and "epochs" not in overrides:
        config.epochs = None
    return config


def train_config(flags: list[str]) -> TrainConfig:
    """The validated config that ``orthomod train <flags>`` would train (for scripts and benchmarks)."""
    args = _parser().parse_args(["train", *flags])
    return _new_run_config(args, _overrides(args)).validate()


def _run_config(run_dir: Path) -> TrainConfig:
    """The saved config of a run folder, or a one-line error."""
    from .files import RunFolder

    return TrainConfig.from_dict(RunFolder(run_dir).config(), source=str(run_dir / "config.json"))


def _run_checkpoint(run_dir: Path, which: str, device="cpu") -> tuple[Path, dict]:
    """A run folder's last checkpoint or best weights (``which``), loaded, or a one-line error."""
    from .files import RunFolder

    path = run_dir / ("checkpoint.pt" if which == "last" else "best.pt")
    missing = ("best.pt is written at the run's first evaluation (every epoch end); use --checkpoint last"
               if which == "best" else "the run has not written one yet, or this folder holds its records "
               "without its weights (as the collected runs in docs/results/runs do)")
    return path, RunFolder(run_dir).load_checkpoint(path.name, map_location=device, missing=missing)


def _load_weights(model, state: dict, path: Path, config: TrainConfig, run_dir: Path) -> None:
    """Load a checkpoint's weights into the model its run's config builds, or a one-line error."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ConfigError(f"{path} does not hold the weights of {config.model} that {run_dir / 'config.json'} "
                          f"names ({str(exc).splitlines()[0]}); restore the run folder's files") from None


def _eval(args: argparse.Namespace) -> int:
    import torch

    from .hardware import choose_precision, resolve_device
    from .data import make_loaders
    from .train import build_model, evaluate

    run_dir = Path(args.run_dir)
    config = _run_config(run_dir)
    if args.data:
        config.data = args.data
        config.validate()  # a folder for a dataset that reads one
    device = resolve_device(args.device)
    path, state = _run_checkpoint(run_dir, args.checkpoint, device)
    _, test, classes = make_loaders(config, device)
    model = build_model(config, len(classes)).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    _load_weights(model, state, path, config, run_dir)
    loss, acc = evaluate(model, test, device, choose_precision(config.precision, device))
    print(json.dumps({"run": str(run_dir), "checkpoint": path.name, "step": state["step"],
                      "test_loss": round(loss, 5), "test_acc": acc}))
    return 0


def _presets(args: argparse.Namespace) -> int:
    presets = list_presets()
    width = max(map(len, presets))
    for name, description in presets.items():
        print(f"{name:<{width}}  {description}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    _output_folder(args.out)
    out = write_report(args.run_dirs, args.out)
    print(f"wrote {out / 'report.md'}, {out / 'report.html'} and {len(list(out.glob('*.png')))} figures")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    return {"bn-jacobian": _analyze_bn_jacobian, "propagation": _analyze_propagation}[args.analysis](args)


def _analyze_propagation(args: argparse.Namespace) -> int:
    from .diagnostics import signal_propagation
    from .train import initial_model

    overrides = _overrides(args)
    state, where = None, {"step": 0}
    if args.run:  # the run's saved config and weights, loaded before the data; only --data may move it, as for eval
        run_dir = Path(args.run)
        _saved_config_only(args, {k: v for k, v in overrides.items() if k != "data"},
                           "--run measures a run with its saved config")
        config = _run_config(run_dir)
        config.data = overrides.get("data", config.data)
        path, state = _run_checkpoint(run_dir, args.checkpoint)
        where = {"run": args.run, "checkpoint": path.name, "step": state["step"]}
    else:
        config = _new_run_config(args, overrides)
        if config.epochs is None and config.iterations is None:
            config.iterations = 1  # step 0 does not depend on the budget
    out = _output_folder(args.figure, "--figure") if args.figure else None  # checked before the work, used after it
    model, images, labels = initial_model(config.validate())
    if state is not None:
        _load_weights(model, state, path, config, run_dir)
    result = signal_propagation(model, images.float(), labels)
    if args.json:
        print(json.dumps({"model": config.model, "init": config.init, "activation": config.activation,
                          "norm": config.norm, "parametrization": config.parametrization, "seed": config.seed,
                          "batch": len(labels)} | where | result))
    else:
        at = f"step {where['step']} ({where['checkpoint']} of {args.run})" if args.run else "step 0"
        print(f"{config.model}, init {config.init}, activation {config.activation}, norm {config.norm}, "
              f"parametrization {config.parametrization}, seed {config.seed}: {at} on its first training batch "
              f"({len(labels)} images), fp32, training mode")
        width = max(len("layer"), *map(len, result["names"]))
        top = result["errors"][-1]
        print(f"{'layer':<{width}}  {'E[out^2]':>10}  {'q (error)':>10}  {'q / q(last)':>11}  {'filter norm':>11}")
        for name, up, down, norm in zip(result["names"], result["forward"], result["errors"], result["filter_norm"]):
            print(f"{name:<{width}}  {up:>10.3e}  {down:>10.3e}  {down / top if top else math.nan:>11.3e}  {norm:>11.4f}")
        print(f"signal, last layer over first: {result['forward_last_over_first']:.3g}; "
              f"errors, first layer over last: {result['errors_first_over_last']:.3g}")
    if out is not None:
        from .report import propagation_figure

        label = f"{config.model}, init {config.init}" + (f", step {where['step']}" if args.run else "")
        figure = propagation_figure({label: result}, out / "propagation.png")
        print(f"wrote {figure}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _analyze_bn_jacobian(args: argparse.Namespace) -> int:
    import torch

    from .diagnostics import bn_jacobian

    if not 3 <= args.batch <= MAX_JACOBIAN_BATCH:
        raise ConfigError(f"--batch must be between 3 and {MAX_JACOBIAN_BATCH} (the Jacobian has batch^2 float64 "
                          f"entries: {8 * MAX_JACOBIAN_BATCH**2 >> 20} MiB at the limit), got {args.batch}")
    if not math.isfinite(args.gamma):
        raise ConfigError(f"--gamma must be a finite number, got {args.gamma}")
    if not (math.isfinite(args.eps) and args.eps > 0):
        raise ConfigError(f"--eps must be a finite number > 0, got {args.eps}")
    out = _output_folder(args.out) if args.out else None  # checked before the work, used after it
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, dtype=torch.float64, generator=generator)
    result = bn_jacobian(x, gamma=args.gamma, eps=args.eps)
    eig = result["eigenvalues"]
    print(f"BN Jacobian over a batch of {args.batch} (gamma={args.gamma:g}, eps={args.eps:g}, seed {args.seed})")
    print(f"rho^2 = gamma^2 / (sigma_B^2 + eps) = {result['rho2']:.6g}")
    print(f"two smallest eigenvalues of J J^T: {eig[0]:.3g}, {eig[1]:.3g}")
    print(f"the other {args.batch - 2}: {eig[2]:.6g} .. {eig[-1]:.6g}; "
          f"largest |lambda / rho^2 - 1| = {result['relative_deviation']:.3g}")
    if out is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(range(1, args.batch + 1), eig.numpy(), "o", ms=3, label="eigenvalues of J J^T")
        ax.axhline(result["rho2"], color="C1", label="rho^2")
        ax.set(xlabel="index (ascending)", ylabel="eigenvalue", title="BN Jacobian: quasi-isometry")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "bn_jacobian.png", dpi=110)
        print(f"wrote {out / 'bn_jacobian.png'}")
    return 0


MAX_JACOBIAN_BATCH = 4096


def _output_folder(path: str, flag: str = "--out") -> Path:
    """Create the output folder that ``flag`` names, or a one-line error saying why it cannot be."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {folder} is a file; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output folder {folder} ({exc.strerror or exc}); choose another {flag}") from None
    return folder


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"train": _train, "eval": _eval, "presets": _presets, "report": _report, "analyze": _analyze}
    try:
        code = handlers[args.command](args)
    except OrthomodError as exc:
        print(f"orthomod: error: {exc}", file=sys.stderr)
        code = EXIT_INVALID
    except BrokenPipeError:  # the output went into `head` or the like, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        code = 0
    _leave_process_group(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
