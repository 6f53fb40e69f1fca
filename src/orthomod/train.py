"""The training engine: the paper's CIFAR-10 protocol, resumable, with append-only results.

A run folder holds:
  config.json      the resolved config
  metrics.jsonl    one JSON line per logging interval ({"kind": "train", ...}) and per
                   evaluation ({"kind": "eval", ...}); never duplicated across resumes
  summary.json     status (running/completed/interrupted/diverged), final and best accuracy,
                   wall time, and the device, precision and CPU of each session (a run resumed
                   on another machine); rewritten atomically at every evaluation and at the end
  diagnostics.jsonl  every ``diagnostics_every`` steps: per conv layer filter correlation,
                   error second moments (before/after modulation) and modulation factors,
                   orthogonality residual and gradient norm (see orthomod.diagnostics)
  checkpoint.pt    the latest checkpoint (atomic); best.pt: weights of the best evaluation

Protocol (docs/METHOD-NOTES.md, Training protocol): SGD momentum 0.9, batch 128, lr 0.1 divided by 10 at 32k and
48k of 64k iterations; given a budget in epochs or iterations the milestones keep their
fractions (0.5, 0.75) of the run.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import math
import os
import platform
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from . import diagnostics
from .data import BatchLoader, make_loaders
from .distributed import World, convert_sync_batchnorm
from .errors import OrthomodError
from .files import RunFolder, RunFolderError, RunLock
from .hardware import Precision, choose_precision, deterministic_kernels, resolve_device
from .init import DATA_INIT_SCHEMES, lsuv_
from .layers import dirac_parametrize_
from .models import create
from .modulation import ErrorModulator
from .regularizers import REGULARIZERS, OrthonormalRegularizer, make_regularizer, split_decay_parameters

__all__ = ["Trainer", "RunError", "evaluate", "train_step", "build_model", "build_optimizer", "lr_factor"]


class RunError(OrthomodError):
    """A run cannot start or resume; the message says why and what to do."""


def build_model(config: TrainConfig, num_classes: int | None, init: str | None = None) -> nn.Module:
    """The config's network: architecture, activation, norm and parametrization; ``init`` is a
    scheme of :func:`orthomod.init.init_model_` (None: PyTorch's, for weights about to be loaded)
    or of ``DATA_INIT_SCHEMES``, whose data-free start (orthonormal) is built here and finished by
    :func:`init_from_data_`."""
    if init in DATA_INIT_SCHEMES:
        init = "orthonormal"  # LSUV's start
    try:
        model = create(config.model, num_classes=num_classes, init=init, activation=config.activation,
                       norm=config.norm)
        if config.parametrization == "dirac":
            dirac_parametrize_(model)  # after init: the raw W starts as the init scheme drew it
    except (ValueError, ImportError) as exc:  # a layer an option cannot handle, or dks missing
        raise RunError(f"cannot build {config.model}: {exc}") from None
    return model


def init_from_data_(config: TrainConfig, model: nn.Module, batch) -> None:
    """The data-dependent part of ``config.init`` on a model :func:`build_model` has just built:
    :func:`orthomod.init.lsuv_` on ``batch()`` for ``lsuv`` (``batch`` is called only then);
    nothing for the other schemes."""
    if config.init not in DATA_INIT_SCHEMES:
        return
    try:
        lsuv_(model, batch())
    except ValueError as exc:
        raise RunError(f"--init {config.init}: {exc}") from None


def first_batch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels of a run's first training step, from its train loader."""
    return next(iter(loader.epoch(0, 0, first_step=0)))


def initial_model(config: TrainConfig) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model a new run of ``config`` starts from, and the images and labels of its first
    training batch, on the CPU in one process: seed, loaders, model and data-dependent init in
    the trainer's order, so the weights are the run's at step 0 (tested against :class:`Trainer`)."""
    torch.manual_seed(config.seed)
    train, _, classes = make_loaders(config, torch.device("cpu"))
    model = build_model(config, len(classes), init=config.init)
    images, labels = first_batch(train)
    init_from_data_(config, model, lambda: images)
    return model, images, labels


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The config's optimizer; L2 decay only on conv/linear weights unless ``decay_bn_bias``.

    With ``reg`` one of the orthogonality regularizers the regularizer's gradient takes the place of
    weight decay (docs/METHOD-NOTES.md, Orthonormality regularizer), unless ``l2_beside`` asks for
    both (ISONet's recipe).
    """
    weights, others = split_decay_parameters(model)
    l2 = config.reg_coeff if config.reg == "l2" else config.l2_beside
    groups = [{"params": weights, "weight_decay": l2},
              {"params": others, "weight_decay": l2 if config.decay_bn_bias else 0.0}]
    lr = config.learning_rate
    name = config.optimizer
    if name in ("sgd", "nesterov"):
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=name == "nesterov")
    if name == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr)
    if name == "adadelta":
        return torch.optim.Adadelta(groups, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    raise RunError(f"unknown optimizer {name!r}; choose one of sgd, nesterov, adagrad, adadelta, rmsprop, adam")


def build_regularizer(config: TrainConfig, model: nn.Module):
    """The config's orthogonality regularizer over ``model``, or None (L2 lives in the optimizer)."""
    return make_regularizer(config.reg, model, config.reg_coeff) if config.reg in REGULARIZERS else None


def build_modulator(config: TrainConfig, model: nn.Module) -> ErrorModulator | None:
    """The config's error modulator on ``model``, or None without modulation."""
    if not config.modulation:
        return None
    return ErrorModulator(model, tau=config.modulation_tau, until_step=config.modulation_until,
                          rule=config.modulation_rule)


def lr_factor(config: TrainConfig, step: int, total_steps: int) -> float:
    """Multiplier of the base lr at ``step`` (0-based) of ``total_steps``."""
    if config.schedule == "step":
        passed = sum(step >= round(m * total_steps) for m in config.milestones)
        factor = config.lr_decay**passed
    elif config.schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * step / total_steps))
    else:
        factor = 1.0
    if step < config.warmup_steps:
        factor *= 0.1 + 0.9 * step / config.warmup_steps
    return factor


def train_step(network: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer, *,
               precision: Precision, regularizer: OrthonormalRegularizer | None = None,
               modulator: ErrorModulator | None = None, scaler: torch.amp.GradScaler | None = None,
               before_update=None, check_loss=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One iteration of the method; returns the logits and the (unscaled) loss.

    ``check_loss(loss)`` may end the step before any gradient is computed (the trainer's
    divergence and stop check); ``before_update()`` runs where the gradients of the loss are
    complete and unscaled, before the regularizer's (the trainer's diagnostics probe).
    """
    device = x.device
    with precision.autocast(device):
        out = network(x)                           # the modulator's forward hooks note the conv order
    loss = F.cross_entropy(out.float(), y)
    if check_loss is not None and not check_loss(loss):
        return out, loss
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:                         # fp16: scale the loss so small errors do not flush to zero
        scaler.scale(loss).backward()              # modulation factors are ratios of moments: scale-free
        scaler.unscale_(optimizer)                 # the regularizer's gradient joins *unscaled* gradients
    else:
        loss.backward()                            # modulation happens here, in the backward hooks
    if before_update is not None:
        before_update()
    if regularizer is not None:
        regularizer.add_grad_()                    # 2 lambda (V V^T - I) V, in place of weight decay
    if scaler is not None:
        scaler.step(optimizer)                     # skipped when the fp16 gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    if modulator is not None:
        modulator.step()                           # counts iterations for until_step
    return out, loss


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, device: torch.device, precision: Precision,
             world: World | None = None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` over ``loader`` (summed over the processes)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in loader.epoch():
        with precision.autocast(device):
            out = model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        count += len(y)
    model.train(was_training)
    if world is not None:
        loss_sum, correct, count = world.all_reduce_sum([loss_sum, correct, count])
    return loss_sum / count, correct / count


def _tensor_statistics(name: str, t: torch.Tensor) -> dict:
    t = t.detach().float()
    return {"name": name, "shape": list(t.shape), "norm": float(t.norm()), "max_abs": float(t.abs().max()),
            "finite": bool(torch.isfinite(t).all())}


def layer_statistics(model: nn.Module) -> list[dict]:
    """Norm, largest magnitude and finiteness of every parameter and its gradient."""
    stats = []
    for name, p in model.named_parameters():
        entry = _tensor_statistics(name, p)
        if p.grad is not None:
            entry["grad_norm"] = float(p.grad.float().norm())
            entry["grad_finite"] = bool(torch.isfinite(p.grad).all())
        stats.append(entry)
    return stats


def buffer_statistics(model: nn.Module) -> list[dict]:
    """The same for every floating-point buffer (BN running means and variances)."""
    return [_tensor_statistics(name, b) for name, b in model.named_buffers() if b.is_floating_point() and b.numel()]


def default_run_name(config: TrainConfig) -> str:
    """model-init-reg[-mod tau]-optimizer-seed-time, with the activation, norm and parametrization
    where they are not the plain net's defaults (so a Dirac or a CReLU run is told apart by name)."""
    parts = [config.model, config.init, config.reg]
    plain = TrainConfig()  # the defaults: a plain ReLU net with BN and no reparametrization
    parts += [f"norm-{value}" if key == "norm" else value for key in ("activation", "norm", "parametrization")
              if (value := getattr(config, key)) != getattr(plain, key)]
    if config.modulation:
        parts.append(f"mod{config.modulation_tau:g}")
    parts += [config.optimizer, f"s{config.seed}", datetime.datetime.now().strftime("%Y%m%d-%H%M%S")]
    return "-".join(parts)


class Trainer:
    """Run one config to completion, divergence or interruption, resumably.

    >>> import tempfile
    >>> config = TrainConfig(model="plain8", shapes_train=200, shapes_test=100, batch_size=50, iterations=4,
    ...                      out=tempfile.mkdtemp(), name="doctest")
    >>> Trainer(config, progress=False).run()["status"]
    'completed'
    """

    def __init__(self, config: TrainConfig, run_dir: str | Path | None = None, resume: bool = False,
                 progress: bool = True, world: World | None = None):
        self.config = config.validate()
        self.world = world or World()
        if self.config.batch_size % self.world.world_size:
            raise RunError(f"batch size {self.config.batch_size} (the global batch) must divide among "
                           f"{self.world.world_size} processes")
        name = self.world.broadcast(config.name or default_run_name(config))  # one folder for all ranks
        self.run_dir = Path(run_dir) if run_dir is not None else Path(config.out) / name
        self.folder = RunFolder(self.run_dir)
        self.resume = resume
        self.progress = progress and self.world.is_main
        self._stop_signal: int | None = None
        self.device = resolve_device(config.device)
        if self.world.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", self.world.local_rank)
        self.precision = choose_precision(config.precision, self.device)
        self._lock: RunLock | None = None
        problem = self._open_run_folder() if self.world.is_main else None
        problem = self.world.broadcast(problem)  # every process stops, not only the one that looked
        if problem is not None:
            raise RunError(problem)
        try:  # model, loaders, optimizer, regularizer, modulator: ready before run()
            self._build()
        except OSError as exc:  # an unreadable data file or folder
            self._release_lock()
            raise RunError(f"cannot read the data: {exc.filename or ''}: {exc.strerror or exc}") from None
        except BaseException:
            self._release_lock()
            raise

    # -- setup --------------------------------------------------------------------------------
    def _open_run_folder(self) -> str | None:
        """Create and lock the run folder before any data is built; the problem, if any, as text."""
        folder = self.run_dir
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-test.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            return f"cannot write the run folder {folder} ({exc.strerror or exc}); choose another --out"
        try:
            self._lock = RunLock(folder)
        except RunFolderError as exc:
            return str(exc)
        except OSError as exc:
            return f"cannot lock the run folder {folder} ({exc.strerror or exc}); choose another --out"
        if not self.resume and (folder / "checkpoint.pt").exists():
            problem = "already has a checkpoint"
        elif not self.resume and self.folder.is_run():
            problem = "already holds a run (config.json)"
        else:
            return None
        self._release_lock()
        return f"run folder {folder} {problem}; continue it with --resume {folder}, or choose another --name"

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _build(self) -> None:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        world = self.world
        self.train_loader, self.test_loader, self.classes = make_loaders(cfg, self.device, world.rank,
                                                                         world.world_size)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = cfg.iterations or max(1, round(cfg.epochs * self.steps_per_epoch))
        model = build_model(cfg, len(self.classes), init=cfg.init)
        if cfg.sync_bn:
            model = convert_sync_batchnorm(model)
        model = model.to(self.device)
        if not self.resume:  # a resumed run loads its weights
            init_from_data_(cfg, model, lambda: first_batch(self.train_loader)[0])
        self.model = model.to(memory_format=torch.channels_last) if cfg.channels_last else model
        self.network = self.model  # what the forward pass calls: the model, or its DDP wrapper
        if world.distributed:
            # every rank builds the same initial weights from the seed; DDP also broadcasts rank 0's
            self.network = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = build_optimizer(cfg, self.model)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision.needs_grad_scaler else None
        self.regularizer = build_regularizer(cfg, self.model)
        self.modulator = build_modulator(cfg, self.model)
        if self.modulator is None and cfg.diagnostics_every:
            # measures error moments on the recorded steps, never modulates
            self.modulator = ErrorModulator(self.model, until_step=0)
        self.step = 0
        self._window = {"loss": 0.0, "correct": 0, "count": 0, "time": 0.0, "steps": 0}
        self._checkpoint_step: int | None = None  # the step of the checkpoint on disk
        self.best_acc, self.best_step = -1.0, None
        self.last_eval: dict | None = None
        self.last_train: dict | None = None
        self.wall_time_before = 0.0
        # one entry per start of the process: a run resumed on another machine says where each part ran
        self.sessions: list[dict] = []

    def _restore(self) -> None:
        state = self.folder.load_checkpoint(map_location=self.device)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scaler is not None and state.get("grad_scaler"):
                self.scaler.load_state_dict(state["grad_scaler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise RunError(f"checkpoint {self.run_dir / 'checkpoint.pt'} does not match this run's model or "
                           f"optimizer ({str(exc).splitlines()[0]})") from None
        if self.config.modulation and state.get("modulator"):
            self.modulator.load_state_dict(state["modulator"])
        if self.regularizer is not None and state.get("regularizer"):
            self.regularizer.load_state_dict(state["regularizer"])  # SRIP's power-iteration vectors
        self.step = state["step"]
        self.best_acc, self.best_step = state["best_acc"], state["best_step"]
        self.last_eval, self.last_train = state.get("last_eval"), state.get("last_train")
        # the running sums of a logging window that a checkpoint cut in two (SIGTERM, or a
        # checkpoint interval that is not a multiple of the log interval)
        self._window.update(state.get("log_window") or {})
        if not self.world.is_main:  # the checkpoint holds the window's sums over every process
            self._window.update(correct=0, count=0)
        self._checkpoint_step = self.step
        self.wall_time_before = state["wall_time"]
        self.sessions = list(state.get("sessions") or [])
        torch.set_rng_state(state["torch_rng"].cpu())  # map_location took it to the run's device with the rest
        if self.world.is_main:
            self.folder.truncate_records(self.step)  # lines after the checkpoint are written again

    # -- bookkeeping --------------------------------------------------------------------------
    def _wall_time(self) -> float:
        return self.wall_time_before + time.perf_counter() - self._session_start

    def _checkpoint(self) -> None:
        self._checkpoint_step = self.step
        window = dict(self._window)
        if self.world.distributed:  # accuracy counts are per process until a metrics line sums them
            window["correct"], window["count"] = map(int, self.world.all_reduce_sum([window["correct"],
                                                                                     window["count"]]))
        if not self.world.is_main:
            return
        self.folder.save_checkpoint({
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "modulator": self.modulator.state_dict() if self.config.modulation else None,
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "regularizer": self.regularizer.state_dict() if self.regularizer is not None else None,
            "step": self.step, "best_acc": self.best_acc, "best_step": self.best_step,
            "last_eval": self.last_eval, "last_train": self.last_train, "log_window": window,
            "wall_time": self._wall_time(), "torch_rng": torch.get_rng_state(), "sessions": self.sessions,
            "config": self.config.to_dict(),
        })

    def _log(self, record: dict, file: str = "metrics.jsonl") -> None:
        if not self.world.is_main:
            return
        self.folder.append(record, file)

    def _summary(self, status: str, **extra) -> dict:
        cfg = self.config
        summary = {
            "status": status, "step": self.step, "total_steps": self.total_steps,
            "epoch": round(self.step / self.steps_per_epoch, 4),
            "final_test_acc": self.last_eval["test_acc"] if self.last_eval else None,
            "final_test_loss": self.last_eval["test_loss"] if self.last_eval else None,
            "best_test_acc": self.best_acc if self.best_step is not None else None,
            "best_step": self.best_step,
            "final_train_loss": self.last_train["loss"] if self.last_train else None,
            "final_train_acc": self.last_train["train_acc"] if self.last_train else None,
            "wall_time_s": round(self._wall_time(), 1),
            "diverged": status == "diverged",
            "settings": {k: getattr(cfg, k) for k in ("model", "dataset", "init", "reg", "reg_coeff", "l2_beside",
                                                      "modulation", "modulation_tau", "modulation_until",
                                                      "modulation_rule", "optimizer", "batch_size", "seed")}
                        | {"lr": cfg.learning_rate},
            **self._where(), "precision_reason": self.precision.reason,
            "channels_last": cfg.channels_last, "machine": platform.machine(), "sessions": self.sessions,
            "skipped_images": getattr(self.train_loader, "skipped", 0) + getattr(self.test_loader, "skipped", 0),
            "updated": datetime.datetime.now().isoformat(timespec="seconds"),
            **extra,
        }
        if self.world.distributed:
            summary["world_size"] = self.world.world_size
        if self.world.is_main:
            self.folder.write_summary(summary)
        return summary

    def _where(self) -> dict:
        """Where and in which arithmetic this process trains (the summary's fields, and each session's)."""
        return {"device": str(self.device), "precision": self.precision.name,
                **({"gpu": torch.cuda.get_device_name(self.device)} if self.device.type == "cuda" else {}),
                "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}

    def _evaluate(self) -> None:
        loss, acc = evaluate(self.model, self.test_loader, self.device, self.precision, self.world)
        self.last_eval = {"kind": "eval", "step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
                          "test_loss": loss, "test_acc": acc}
        self._log(self.last_eval)
        if acc > self.best_acc:
            self.best_acc, self.best_step = acc, self.step
            if self.world.is_main:
                self.folder.save_checkpoint({"model": self.model.state_dict(), "step": self.step, "test_acc": acc,
                                             "config": self.config.to_dict()}, "best.pt")
        self._summary("running")

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = self._stop_signal or signum
        if signum == signal.SIGINT:
            # a second Ctrl-C ends the process at once; a repeated SIGTERM does not, because
            # launchers (torchrun, cluster schedulers) forward one to processes that got one already
            signal.signal(signum, signal.SIG_DFL)

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train; return the summary (also written to ``summary.json``)."""
        self._session_start = time.perf_counter()
        try:
            return self._run()
        except OSError as exc:  # disk full, folder removed or made read-only mid-run
            problem = exc.strerror or str(exc)
            with contextlib.suppress(OSError, AttributeError):
                self._summary("failed", error=f"{problem} ({exc.filename})")
            then = (f"continue with: orthomod train --resume {self.run_dir}" if self._checkpoint_step is not None
                    else "start the run again")
            raise RunError(f"stopped by the operating system: {exc.filename or self.run_dir}: {problem}; fix that, "
                           f"then {then}") from None
        finally:
            self._release_lock()

    def _run(self) -> dict:
        if self.resume:
            self._restore()
        elif self.world.is_main:
            self.folder.write_config(self.config.to_dict())
            self.folder.clear_records()
            if self.config.diagnostics_every:
                names = [name for name, _ in diagnostics.weighted_layers(self.model)]
                self._log({"kind": "layers", "step": 0, "names": names}, "diagnostics.jsonl")
        self.sessions.append({"from_step": self.step, **self._where(),
                              "started": datetime.datetime.now().isoformat(timespec="seconds")})
        self._say(f"run folder: {self.run_dir} (step {self.step} of {self.total_steps}, "
                  f"{self.steps_per_epoch} per epoch"
                  + (f", {self.world.world_size} processes)" if self.world.distributed else ")"), None)
        self._say(f"precision: {self.precision.name} ({self.precision.reason}); channels_last "
                  f"{'on' if self.config.channels_last else 'off'}; device {self.device}"
                  + ("; deterministic kernels" if self.config.deterministic else ""), None)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            with deterministic_kernels(self.config.deterministic):
                return self._train()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.modulator is not None:
                self.modulator.remove()
            for loader in (self.train_loader, self.test_loader):
                loader.close()  # DataLoader worker processes of image folders

    def _train(self) -> dict:
        cfg, model = self.config, self.model
        model.train()
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc=self.run_dir.name, unit="step",
                       dynamic_ncols=True)
        window = self._window
        try:
            # images/s counts everything a step costs, batch preparation included, and nothing
            # of evaluation or checkpointing: the clock restarts after those.
            tick = time.perf_counter()
            while self.step < self.total_steps:
                epoch, start = divmod(self.step, self.steps_per_epoch)
                for x, y in self.train_loader.epoch(epoch, start, first_step=self.step):
                    lr = cfg.learning_rate * lr_factor(cfg, self.step, self.total_steps)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    record = cfg.diagnostics_every and (self.step + 1) % cfg.diagnostics_every == 0
                    if self.modulator is not None:
                        self.modulator.monitor = bool(record)
                    self._seen = {}
                    out, _ = train_step(self.network, x, y, self.optimizer, precision=self.precision,
                                        regularizer=self.regularizer, modulator=self.modulator, scaler=self.scaler,
                                        before_update=self._probe_backward if record else None,
                                        check_loss=self._agree_on_loss)
                    loss_value, stop, probe = self._seen["loss"], self._seen["stop"], self._seen.get("probe")
                    if not math.isfinite(loss_value):
                        return self._diverged(self.step + 1, f"loss is {loss_value}", bar)
                    self.step += 1
                    if probe is not None:
                        self._log(self._probe_weights(probe), "diagnostics.jsonl")
                    window["loss"] += loss_value  # the mean over the global batch
                    window["correct"] += (out.argmax(1) == y).sum().item()
                    window["count"] += len(y)
                    window["steps"] += 1
                    window["time"] += time.perf_counter() - tick
                    if bar is not None:
                        bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        self._log_window(window, lr, bar)
                    epoch_end = self.step % self.steps_per_epoch == 0
                    save = epoch_end or self.step % cfg.checkpoint_every == 0 or self.step == self.total_steps or stop
                    # a finite loss can come with non-finite BN statistics: never evaluate or keep those
                    if save and (bad := self._nonfinite_state()):
                        return self._diverged(self.step, f"the loss is finite but {bad} are not", bar)
                    if epoch_end or self.step == self.total_steps:
                        self._evaluate()
                    if save:
                        self._checkpoint()
                    tick = time.perf_counter()
                    if stop:
                        return self._interrupted(bar)
                    if self.step == self.total_steps:
                        break
        finally:
            if bar is not None:
                bar.close()
        return self._summary("completed", **self._rank_consistency())

    def _rank_consistency(self) -> dict:
        """In a distributed run: whether every process ends with bit-identical weights, and the
        unreadable images skipped by all processes together (each decodes its own share)."""
        if not self.world.distributed:
            return {}
        digest = hashlib.sha256()
        for p in self.model.parameters():
            digest.update(p.detach().float().cpu().numpy().tobytes())
        digests = self.world.gather(digest.hexdigest())
        local = getattr(self.train_loader, "skipped", 0) + getattr(self.test_loader, "skipped", 0)
        return {"weights_identical_across_ranks": len(set(digests)) == 1,
                "skipped_images": int(self.world.all_reduce_sum([float(local)])[0])}

    def _agree_on_loss(self, loss: torch.Tensor) -> bool:
        """The step goes on if the loss is finite; every process agrees on it and on stopping."""
        loss_value = loss.item()
        stop = self._stop_signal is not None
        if self.world.distributed:
            total, stops = self.world.all_reduce_sum([loss_value, float(stop)])
            loss_value, stop = total / self.world.world_size, stops > 0
        self._seen.update(loss=loss_value, stop=stop)
        return math.isfinite(loss_value)

    def _nonfinite_state(self) -> str | None:
        """Which parameters or buffers hold a nan or inf, or None (read before every checkpoint)."""
        named = list(self.model.named_parameters()) + [(n, b) for n, b in self.model.named_buffers()
                                                        if b.is_floating_point()]
        finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in named]).tolist()
        bad = [name for (name, _), ok in zip(named, finite) if not ok]
        if self.world.distributed:  # every process takes the same branch
            if self.world.all_reduce_sum([float(len(bad))])[0] and not bad:
                bad = ["a tensor of another process"]
        if not bad:
            return None
        return f"{len(bad)} parameter or buffer tensors (first: {bad[0]})"

    def _probe_backward(self) -> None:
        """What only exists between backward() and the update: error moments, loss gradients."""
        stats = self.modulator.statistics()  # one device-to-host transfer
        if self.scaler is not None:  # fp16: moments of the scaled loss; the factors are scale-free
            square = self.scaler.get_scale() ** 2
            for key in ("moments_before", "moments_after"):
                stats[key] = [q / square for q in stats[key]]
        self._seen["probe"] = {"error_moments_before": stats["moments_before"],
                               "error_moments_after": stats["moments_after"], "modulation_scales": stats["scales"],
                               "grad_norm": diagnostics.gradient_norms(self.model)}

    def _probe_weights(self, probe: dict) -> dict:
        correlation = diagnostics.filter_correlation(self.model)
        ratios = diagnostics.moment_ratios(probe["error_moments_after"])
        return {"kind": "diagnostics", "step": self.step, "filter_correlation_mean": correlation["mean"],
                "moment_ratio_first_last": ratios["first_over_last"], **probe,
                "filter_correlation": correlation["layers"],
                "ortho_residual": diagnostics.orthogonality_residuals(self.model)}

    def _log_window(self, window: dict, lr: float, bar) -> None:
        if self.world.distributed:  # accuracy and images over every process's share
            window["correct"], window["count"] = self.world.all_reduce_sum([window["correct"], window["count"]])
        record = {"kind": "train", "step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
                  "loss": window["loss"] / window["steps"], "train_acc": window["correct"] / window["count"],
                  "lr": lr, "images_per_s": window["count"] / max(window["time"], 1e-9)}
        self._log(record)
        self.last_train = record
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['train_acc']:.3f}", lr=f"{lr:.3g}",
                            img_s=f"{record['images_per_s']:.0f}")
        window.update(loss=0.0, correct=0, count=0, time=0.0, steps=0)

    def _say(self, message: str, bar) -> None:
        if not self.world.is_main:
            return
        if bar is not None:
            bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def _diverged(self, step: int, what: str, bar) -> dict:
        """Record a divergence at ``step`` (1-based, like metrics): ``what`` went non-finite."""
        stats, buffers = layer_statistics(self.model), buffer_statistics(self.model)
        bad = [s["name"] for s in stats if not s["finite"]]
        bad_buffers = [s["name"] for s in buffers if not s["finite"]]
        largest = max(stats, key=lambda s: s["max_abs"] if s["finite"] else -math.inf)
        if self._checkpoint_step is not None:
            kept = f"the last good checkpoint (step {self._checkpoint_step}) stays in {self.run_dir}"
        else:
            kept = "no checkpoint was written before it, so there is nothing to resume"
        message = (f"diverged at step {step}: {what}; "
                   f"{len(bad)} of {len(stats)} parameter tensors and {len(bad_buffers)} of {len(buffers)} "
                   f"buffers are non-finite" + (f" (first: {(bad + bad_buffers)[0]})" if bad or bad_buffers else "")
                   + f", largest finite |weight| {largest['max_abs']:.3g} in {largest['name']}; {kept}")
        self._say(message, bar)
        moments = self.modulator.moments_after if self.modulator is not None else None
        return self._summary("diverged", diverged_at_step=step, last_checkpoint_step=self._checkpoint_step,
                             divergence={"reason": what, "message": message, "layers": stats, "buffers": buffers,
                                         "error_moments": moments})

    def _interrupted(self, bar) -> dict:
        # a process of a distributed run may stop because another one got the signal
        name = signal.Signals(self._stop_signal or signal.SIGTERM).name
        message = (f"{name} received: stopped at step {self.step} after writing a checkpoint; "
                   f"continue with: orthomod train --resume {self.run_dir}")
        self._say(message, bar)
        return self._summary("interrupted", signal=name)
