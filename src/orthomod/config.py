"""One training run's settings: a typed, closed config (TOML files, presets, flag overrides).

Unknown keys and wrong types are rejected with a message naming the key; the resolved config is
saved in every run folder as ``config.json``. Presets are TOML files shipped in
``orthomod/presets``; ``orthomod presets`` lists them.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .data import DATASETS
from .errors import OrthomodError
from .hardware import PRECISIONS
from .init import DATA_INIT_SCHEMES, INIT_SCHEMES, MODEL_INIT_SCHEMES
from .models import ACTIVATIONS, EVERY_MODEL, NORMS, plain_only_settings
from .modulation import MODULATION_RULES
from .regularizers import DEFAULT_COEFF, REGULARIZERS

__all__ = ["TrainConfig", "ConfigError", "load_config_file", "list_presets", "OPTIMIZERS"]

OPTIMIZERS = ("sgd", "nesterov", "adagrad", "adadelta", "rmsprop", "adam")
# Learning rates used when none is given: He et al. for SGD, each method's customary default
# otherwise; AdaDelta's lr is a pure multiplier kept at 1 ("ignored" in the paper's Table 2).
DEFAULT_LR = {"sgd": 0.1, "nesterov": 0.1, "adagrad": 0.01, "adadelta": 1.0, "rmsprop": 1e-3, "adam": 1e-3}


class ConfigError(OrthomodError, ValueError):
    """A config value or key is invalid; the message says which and what is allowed."""


def _opt(default, help: str, **kw):
    """A config key: its default and its one description (the CLI flag's help comes from here)."""
    if callable(default):
        return field(default_factory=default, metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TrainConfig:
    """Every setting of a run; each key is also the flag ``--key-with-dashes`` (``orthomod train --help``)."""

    # model and data
    model: str = _opt("plain20", "plain<d> or resnet<d>, d = 6n+2 (e.g. plain44, resnet110), or "
                                 "imagenet-plain<d> / imagenet-resnet<d>, d in 34, 50, 101")
    dataset: str = _opt("shapes", "shapes (built in, no download), cifar10, or folder (<data>/{train,val}/<class>/)")
    data: str | None = _opt(None, "folder holding cifar-10-batches-py (default: $ORTHOMOD_DATA, then the cache), "
                                  "or the image-folder root")
    shapes_train: int = _opt(10000, "images in the built-in shapes set's train split")
    shapes_test: int = _opt(2000, "images in the shapes set's test split")
    shapes_seed: int = _opt(0, "the shapes set's own seed (fixed across run seeds)")
    val_split: str = _opt("val", "folder datasets: the evaluation subfolder")
    image_size: int = _opt(224, "folder datasets: crop size")
    resize: int = _opt(256, "folder datasets: shorter side before cropping")
    workers: int = _opt(4, "folder datasets: DataLoader worker processes")
    on_bad_image: str = _opt("skip", "folder datasets: skip (and count) or error")
    augment: str = _opt("flip", "flip (the paper), flip-crop (He et al.) or none")
    normalize: str = _opt("pixel", "pixel (the paper) or channel")
    # budget: exactly one of epochs / iterations; the lr milestones scale with it
    epochs: float | None = _opt(None, "budget in epochs (the lr milestones scale with it)")
    iterations: int | None = _opt(None, "budget in iterations")
    batch_size: int = _opt(128, "mini-batch size, global over processes (paper: 128)")
    # optimization
    optimizer: str = _opt("sgd", "sgd (momentum), nesterov, adagrad, adadelta, rmsprop or adam")
    lr: float | None = _opt(None, "base learning rate (default: per optimizer; SGD 0.1)")
    momentum: float = _opt(0.9, "momentum of sgd and nesterov")
    schedule: str = _opt("step", "step (x lr_decay at the milestones; the paper), cosine or constant")
    milestones: list[float] = _opt(lambda: [0.5, 0.75], "lr drops as fractions of the run, comma-separated "
                                                        "(paper: 32k, 48k of 64k = 0.5,0.75)")
    lr_decay: float = _opt(0.1, "factor of each lr drop")
    warmup_steps: int = _opt(0, "linear lr warm-up from lr/10 over this many steps")
    # the method
    init: str = _opt("msra", "msra, orthonormal, delta-orthogonal, dirac, suo-delta (TAT's), lsuv (orthonormal, "
                             "then unit output variance per layer on the first batch), looks-linear (with "
                             "activation crelu) or default")
    reg: str = _opt("l2", "l2 (weight decay), ortho (the paper's orthonormality), srip, conv-ortho or none")
    reg_coeff: float | None = _opt(None, "weight decay / lambda (default per reg: l2, ortho 1e-4; srip 1e-2; "
                                         "conv-ortho 1e-4)")
    l2_beside: float = _opt(0.0, "L2 weight decay on conv/linear weights beside an orthogonality reg (ortho, "
                                 "srip, conv-ortho); ISONet keeps 1e-4 beside its penalty (0: the reg replaces it)")
    decay_bn_bias: bool = _opt(False, "also L2-decay BN parameters and biases (off: docs/METHOD-NOTES.md)")
    activation: str = _opt(EVERY_MODEL["activation"],
                           "relu, srelu (ISONet), tat (needs orthomod[tat] and norm none), crelu "
                           "([relu(x), relu(-x)]: twice the channels) or tanh; plain nets")
    norm: str = _opt(EVERY_MODEL["norm"], "bn or none (without BN the convs get a bias); plain nets")
    parametrization: str = _opt("none", "none or dirac (DiracNets: W = a delta + b W/|W|; train with reg l2)")
    modulation: bool = _opt(False, "backward error modulation on/off")
    modulation_tau: float = _opt(1.0, "modulate when consecutive moments differ by more than tau (1: every layer)")
    modulation_until: int | None = _opt(None, "modulate during the first N iterations ('always': all)")
    modulation_rule: str = _opt("consecutive", "consecutive (the paper) or top")
    # run
    seed: int = _opt(0, "seed for init, data order and augmentation")
    device: str = _opt("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    precision: str = _opt("auto", "auto (bf16 where native: AMX/AVX512-BF16 CPUs, GPUs from compute capability "
                                  "8.0; fp16 + grad scaler on older GPUs; else fp32), fp32, bf16 or fp16")
    channels_last: bool = _opt(True, "channels_last memory format on/off")
    deterministic: bool = _opt(False, "deterministic kernels on/off: GPU runs repeat bit for bit, somewhat slower "
                                      "(CPU runs repeat already)")
    sync_bn: bool = _opt(False, "distributed runs: BN statistics over the global batch on/off")
    log_every: int = _opt(50, "steps between metrics lines")
    diagnostics_every: int = _opt(100, "steps between diagnostics lines (0: none)")
    checkpoint_every: int = _opt(500, "steps between checkpoints (and at every epoch end)")
    eval_batch_size: int = _opt(1000, "batch size of evaluation")
    name: str | None = _opt(None, "run folder name (default: derived from the settings and the time)")
    out: str = _opt("runs", "parent folder of run folders")

    def validate(self) -> "TrainConfig":
        _check_types(self)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            for number in value if isinstance(value, list) else [value]:
                if isinstance(number, float) and not math.isfinite(number):
                    raise ConfigError(f"{f.name} must be a finite number, got {number}")
        if self.name is not None and (not self.name or self.name in (".", "..") or "/" in self.name
                                      or "\\" in self.name):
            raise ConfigError(f"name = {self.name!r} must be a plain folder name (no path separators); "
                              "use --out for the parent folder")
        choices = {
            "dataset": DATASETS, "augment": ("flip", "flip-crop", "none"), "normalize": ("pixel", "channel"),
            "optimizer": OPTIMIZERS, "schedule": ("step", "cosine", "constant"),
            "init": INIT_SCHEMES + DATA_INIT_SCHEMES + MODEL_INIT_SCHEMES,
            "reg": ("l2", *REGULARIZERS, "none"), "modulation_rule": MODULATION_RULES,
            "on_bad_image": ("skip", "error"), "precision": PRECISIONS, "activation": ACTIVATIONS, "norm": NORMS,
            "parametrization": ("none", "dirac"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} = {getattr(self, key)!r} is not valid; choose one of {', '.join(allowed)}")
        if self.dataset == "shapes" and self.data is not None:
            raise ConfigError(f"data = {self.data!r} names a folder, but the shapes dataset is generated, not read; "
                              "add --dataset cifar10 (or folder) to train on that folder's data")
        try:
            plain_only = plain_only_settings(self.model, self.activation, self.norm)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if plain_only:
            fix = " ".join(f"--{k} {v}" for k, v in EVERY_MODEL.items() if getattr(self, k) != v)
            raise ConfigError(f"{plain_only}; use {fix}")
        if self.activation == "tat" and self.norm != "none":
            raise ConfigError("activation tat is for nets without normalization: add --norm none "
                              "(and --init suo-delta, its init)")
        if self.init == "looks-linear" and self.activation != "crelu":
            raise ConfigError(f"init looks-linear mirrors the weights that a CReLU feeds; activation {self.activation} "
                              "has none: add --activation crelu")
        if self.init == "suo-delta" and self.norm != "none":
            raise ConfigError("init suo-delta (DKS/TAT) is for nets without normalization: add --norm none")
        if self.parametrization == "dirac" and self.reg in REGULARIZERS:
            raise ConfigError(f"reg {self.reg} acts on each conv's weight, which the dirac parametrization computes "
                              "from a, b and W; DiracNets train W with weight decay: use --reg l2 (or none)")
        if self.reg_coeff is None:
            self.reg_coeff = DEFAULT_COEFF.get(self.reg, 1e-4)
        if self.l2_beside and self.reg not in REGULARIZERS:
            raise ConfigError(f"l2_beside adds weight decay beside an orthogonality regularizer "
                              f"({', '.join(REGULARIZERS)}); with reg {self.reg} use --reg l2 --reg-coeff for "
                              "weight decay")
        if self.epochs is None and self.iterations is None:
            raise ConfigError("no training length: give --epochs N or --iterations N, or a --config that sets one "
                              "('orthomod presets' lists them; --config demo for a first run)")
        if self.epochs is not None and self.iterations is not None:
            raise ConfigError("give one of epochs or iterations, not both (--epochs N or --iterations N)")
        positive = {"batch_size": self.batch_size, "log_every": self.log_every, "eval_batch_size": self.eval_batch_size,
                    "checkpoint_every": self.checkpoint_every, "epochs": self.epochs, "iterations": self.iterations,
                    "shapes_train": self.shapes_train, "shapes_test": self.shapes_test,
                    "image_size": self.image_size, "resize": self.resize}
        for key, value in positive.items():
            if value is not None and not value > 0:
                raise ConfigError(f"{key} must be > 0, got {value}")
        nonnegative = {"reg_coeff": self.reg_coeff, "l2_beside": self.l2_beside, "momentum": self.momentum,
                       "warmup_steps": self.warmup_steps, "modulation_until": self.modulation_until,
                       "diagnostics_every": self.diagnostics_every, "workers": self.workers}
        for key, value in nonnegative.items():
            if value is not None and value < 0:
                raise ConfigError(f"{key} must be >= 0, got {value}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.modulation_tau < 1:
            raise ConfigError(f"modulation_tau must be >= 1 (1 modulates every layer), got {self.modulation_tau}")
        if any(not 0 < m < 1 for m in self.milestones) or self.milestones != sorted(self.milestones):
            raise ConfigError(f"milestones must be increasing fractions of the run in (0, 1), got {self.milestones}")
        return self

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "TrainConfig":
        values = _legacy_bf16(values, source)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown config key {unknown[0]!r} in {source}; valid keys: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def replace(self, **changes) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def _legacy_bf16(values: dict, source: str) -> dict:
    """The old key ``bf16 = true/false`` (run folders before 2026-11-25) as ``precision``."""
    if "bf16" not in values:
        return values
    if "precision" in values:
        raise ConfigError(f"{source} gives both bf16 and precision; keep precision (bf16 is its old name)")
    values = dict(values)
    flag = values.pop("bf16")
    if not isinstance(flag, bool):
        raise ConfigError(f"bf16 = {flag!r} has the wrong type; expected bool (better: precision = \"bf16\" or \"fp32\")")
    values["precision"] = "bf16" if flag else "fp32"
    return values


def _check_types(config: TrainConfig) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        if not _matches(value, hint):
            raise ConfigError(f"{f.name} = {value!r} has the wrong type; expected {_describe(hint)}")


def _matches(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "none"
    return getattr(hint, "__name__", str(hint))


def _preset_files() -> dict[str, Path]:
    folder = resources.files("orthomod") / "presets"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml")}


def list_presets() -> dict[str, str]:
    """Preset name -> its one-line description (the first comment line of the file)."""
    out = {}
    for name, path in sorted(_preset_files().items()):
        first = path.read_text().splitlines()[0] if path.stat().st_size else ""
        out[name] = first.lstrip("# ").strip()
    return out


def _config_path(path_or_preset: str) -> Path:
    path = Path(path_or_preset)
    if path.is_file():
        return path
    presets = _preset_files()
    if path_or_preset not in presets:
        raise ConfigError(f"config {path_or_preset!r} is neither a file nor a preset; see 'orthomod presets' for the presets")
    return presets[path_or_preset]


def _read_config(path_or_preset: str, seen: tuple[str, ...] = ()) -> dict:
    """A config file's values, on top of those of its ``base`` (a preset or file) if it names one."""
    if path_or_preset in seen:
        raise ConfigError(f"config {path_or_preset!r} is its own base ({' -> '.join(seen + (path_or_preset,))})")
    path = _config_path(path_or_preset)
    try:
        values = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    if "null" in values.values():
        raise ConfigError(f"config file {path}: TOML has no null; leave a key out to keep its default")
    base = values.pop("base", None)
    values = _legacy_bf16(values, str(path))
    if base is None:
        return values
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: base must be the name of a preset or a file, got {base!r}")
    inherited = _read_config(base, seen + (path_or_preset,))
    for budget, other in (("epochs", "iterations"), ("iterations", "epochs")):
        if budget in values and other not in values:
            inherited.pop(other, None)  # a budget in the file replaces the base's, as a budget flag does
    return {**inherited, **values}


def load_config_file(path_or_preset: str) -> dict:
    """Values of a TOML config file, or of a preset by name. ``base = "NAME"`` in a file starts
    from the values of that preset (or file) and overrides them with the file's own; a budget
    (``epochs`` or ``iterations``) in the file replaces the base's budget of either kind."""
    values = _read_config(path_or_preset)
    TrainConfig.from_dict(values, source=str(_config_path(path_or_preset)))  # unknown keys fail, naming the file
    return values
