"""Datasets held in memory as uint8 tensors, with batched augmentation (docs/METHOD-NOTES.md, Training protocol).

- ``cifar10``: the official python format (``cifar-10-batches-py``), found in ``--data DIR``,
  else ``$ORTHOMOD_DATA``, else the cache folder (``~/.cache/orthomod``); downloaded there from
  the official address with its published md5 checked when missing and online.
- ``shapes``: a built-in, procedurally generated 10-class set of 32x32 RGB images (one shape
  per image, random colour, size, position, tilt, clutter and noise), made from a seed in
  seconds. It needs no download, and it is hard enough that a small net needs several epochs.

The paper normalizes per pixel (subtract the per-pixel mean, divide by the per-pixel std of
the training set) and augments with random horizontal flips only; pad-4 random crops (He et al.)
are an option. Augmentation randomness is drawn from ``(seed, step)`` and the order of each
epoch from ``(seed, epoch)``, so a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import OrthomodError

__all__ = ["Dataset", "load_dataset", "load_cifar10", "make_shapes", "BatchLoader", "DataError", "DATASETS",
           "dataset_for", "make_loaders"]

DATASETS = ("shapes", "cifar10", "folder")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # published on the CIFAR-10 page
CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
SHAPE_CLASSES = ("disk", "ring", "square", "frame", "triangle", "plus", "cross", "ellipse", "diamond", "crescent")


class DataError(OrthomodError):
    """A dataset is missing, unreadable or misconfigured; the message says how to fix it."""


@dataclass
class Dataset:
    train_images: torch.Tensor  # (N, 3, 32, 32) uint8
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    name: str


# -- CIFAR-10 ---------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "orthomod"


def _cifar_candidates(data_dir: str | os.PathLike | None) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir)]
    if os.environ.get("ORTHOMOD_DATA"):
        return [Path(os.environ["ORTHOMOD_DATA"])]
    return [default_cache_dir()]


def _batches_folder(root: Path) -> Path | None:
    for folder in (root / CIFAR10_FOLDER, root):
        if all((folder / name).is_file() for name in _CIFAR10_FILES):
            return folder
    return None


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_cifar10(root: Path, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5) -> Path:
    """Download and unpack CIFAR-10 into ``root`` (md5 checked); return the batches folder."""
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        archive = Path(tmp) / "cifar-10-python.tar.gz"
        try:
            with urllib.request.urlopen(url, timeout=30) as response, open(archive, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as exc:
            raise DataError(
                f"CIFAR-10 not found in {root} and the download from {url} failed ({exc}); "
                f"put {CIFAR10_FOLDER}/ (the official python version) in {root}, or pass --data DIR"
            ) from None
        if _md5(archive) != md5:
            raise DataError(f"the CIFAR-10 archive downloaded from {url} fails its md5 check; try again")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        target = root / CIFAR10_FOLDER
        if target.exists():
            shutil.rmtree(target)
        os.replace(Path(tmp) / CIFAR10_FOLDER, target)
    return target


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry["labels"], dtype=np.int64)
    except Exception as exc:  # any unpickling/shape problem means the file is not usable
        raise DataError(
            f"CIFAR-10 file {path} is corrupt or not in the official python format ({type(exc).__name__}); "
            "delete the folder and download it again (or re-create it)"
        ) from None
    if len(data) != len(labels):
        raise DataError(f"CIFAR-10 file {path} has {len(data)} images but {len(labels)} labels; it is corrupt")
    return {"data": data, "labels": labels}


def load_cifar10(data_dir: str | os.PathLike | None = None, download: bool = True) -> Dataset:
    """CIFAR-10 as uint8 tensors, from ``data_dir``, ``$ORTHOMOD_DATA`` or the cache folder."""
    (root,) = _cifar_candidates(data_dir)
    if root.exists() and not root.is_dir():
        raise DataError(f"data path {root} is a file; give the folder that holds {CIFAR10_FOLDER}/")
    folder = _batches_folder(root)
    if folder is None:
        for partial in (root / CIFAR10_FOLDER, root):
            missing = [name for name in _CIFAR10_FILES if not (partial / name).is_file()]
            if len(missing) < len(_CIFAR10_FILES):
                raise DataError(f"CIFAR-10 folder {partial} lacks {', '.join(missing)}; re-create it from the "
                                "official python version (or delete it to download again)")
        if data_dir is not None and not root.exists():
            raise DataError(f"data folder {root} does not exist; pass --data DIR holding {CIFAR10_FOLDER}/")
        if not download:
            raise DataError(f"CIFAR-10 not found: put {CIFAR10_FOLDER}/ (the official python version) in {root}")
        folder = download_cifar10(root)
    parts = [_unpickle(folder / name) for name in _CIFAR10_FILES]
    train, test = parts[:5], parts[5]
    meta = folder / "batches.meta"
    classes = tuple(f"class{i}" for i in range(10))
    if meta.is_file():
        with open(meta, "rb") as f:
            classes = tuple(pickle.load(f, encoding="latin1")["label_names"])
    return Dataset(
        train_images=torch.from_numpy(np.concatenate([p["data"] for p in train])),
        train_labels=torch.from_numpy(np.concatenate([p["labels"] for p in train])),
        test_images=torch.from_numpy(test["data"]),
        test_labels=torch.from_numpy(test["labels"]),
        classes=classes,
        name="cifar10",
    )


# -- shapes: the built-in dataset ----------------------------------------------------------
def _shape_masks(u: np.ndarray, v: np.ndarray) -> list[np.ndarray]:
    """Inside-masks of the 10 classes in shape coordinates (u right, v down, unit radius)."""
    r = np.hypot(u, v)
    box = np.maximum(np.abs(u), np.abs(v))
    a, b = (u + v) / np.sqrt(2), (u - v) / np.sqrt(2)
    return [
        r < 1.0,                                                         # disk
        (r > 0.6) & (r < 1.0),                                           # ring
        box < 0.8,                                                       # square
        (box > 0.5) & (box < 0.85),                                      # frame
        (v < 0.6) & (np.abs(u) < (v + 0.95) * 0.62),                     # triangle
        ((np.abs(u) < 0.28) & (np.abs(v) < 0.95)) | ((np.abs(v) < 0.28) & (np.abs(u) < 0.95)),  # plus
        ((np.abs(a) < 0.28) & (np.abs(b) < 0.95)) | ((np.abs(b) < 0.28) & (np.abs(a) < 0.95)),  # cross
        (u / 1.0) ** 2 + (v / 0.45) ** 2 < 1.0,                          # ellipse
        np.abs(u) + np.abs(v) < 1.0,                                     # diamond
        (r < 1.0) & (np.hypot(u - 0.5, v) > 0.75),                       # crescent
    ]


def _render_shapes(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32) + 0.5
    center = rng.uniform(11, 21, size=(n, 2)).astype(np.float32)
    radius = rng.uniform(5.5, 11.0, size=n).astype(np.float32)
    tilt = rng.uniform(-np.pi / 9, np.pi / 9, size=n).astype(np.float32)  # +-20 deg keeps plus != cross
    dx, dy = xx[None] - center[:, 0, None, None], yy[None] - center[:, 1, None, None]
    cos, sin = np.cos(tilt)[:, None, None], np.sin(tilt)[:, None, None]
    u = (cos * dx + sin * dy) / radius[:, None, None]
    v = (-sin * dx + cos * dy) / radius[:, None, None]
    masks = _shape_masks(u, v)
    inside = np.zeros((n, 32, 32), dtype=bool)
    for k, mask in enumerate(masks):
        inside |= mask & (labels == k)[:, None, None]
    # Colours: foreground and background differ by at least 0.25 in mean intensity, so the shape
    # is visible but colour alone says nothing about the class.
    background = rng.uniform(0, 1, size=(n, 3)).astype(np.float32)
    foreground = rng.uniform(0, 1, size=(n, 3)).astype(np.float32)
    gap = foreground.mean(1) - background.mean(1)
    push = np.where(np.abs(gap) < 0.25, np.sign(gap + 1e-6) * (0.25 - np.abs(gap)), 0)[:, None]
    foreground = np.clip(foreground + push, 0, 1)
    background = np.clip(background - push, 0, 1)
    # Background: a linear gradient in a random direction.
    angle = rng.uniform(0, 2 * np.pi, size=n)
    ramp = (np.cos(angle)[:, None, None] * (xx - 16) + np.sin(angle)[:, None, None] * (yy - 16)) / 32
    strength = rng.uniform(0, 0.35, size=(n, 1, 1, 1)).astype(np.float32)
    image = background[:, :, None, None] + strength * ramp[:, None].astype(np.float32)
    image = np.where(inside[:, None], foreground[:, :, None, None], image)
    # Clutter: three small blobs of random colour anywhere, over or under the shape's edge.
    for _ in range(3):
        c = rng.uniform(0, 32, size=(n, 2)).astype(np.float32)
        rad = rng.uniform(1.0, 2.6, size=n).astype(np.float32)
        blob = np.hypot(xx[None] - c[:, 0, None, None], yy[None] - c[:, 1, None, None]) < rad[:, None, None]
        colour = rng.uniform(0, 1, size=(n, 3, 1, 1)).astype(np.float32)
        image = np.where(blob[:, None], colour, image)
    image = image + rng.normal(0, 0.08, size=image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def make_shapes(num_train: int = 10000, num_test: int = 2000, seed: int = 0) -> Dataset:
    """The built-in 10-class shapes dataset (balanced classes), generated from ``seed``."""
    if num_train < 10 or num_test < 10:
        raise DataError(f"shapes needs at least 10 train and 10 test images, got {num_train} and {num_test}")
    rng = np.random.default_rng(seed)
    parts = []
    for count in (num_train, num_test):
        labels = rng.permutation(np.arange(count) % 10)
        images = np.concatenate([_render_shapes(labels[i : i + 2000], rng) for i in range(0, count, 2000)])
        parts += [torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))]
    return Dataset(*parts, classes=SHAPE_CLASSES, name="shapes")


def load_dataset(name: str, data_dir: str | None = None, shapes_train: int = 10000, shapes_test: int = 2000,
                 seed: int = 0) -> Dataset:
    if name == "shapes":
        return make_shapes(shapes_train, shapes_test, seed)
    if name == "cifar10":
        return load_cifar10(data_dir)
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


# -- batches ----------------------------------------------------------------------------------
def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (so (seed, epoch) and (seed, step) streams never collide)."""
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def check_split(batch_size: int, world_size: int) -> None:
    """A global batch must divide evenly among the processes."""
    if batch_size % world_size:
        raise DataError(f"batch size {batch_size} is not divisible by {world_size} processes")


def train_batches(n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This process's index batches for one training epoch of ``n`` items, from a
    :class:`torch.utils.data.DistributedSampler` (shuffled from ``seed``, tail dropped).

    ``batch_size`` is the global batch. Local batch ``k`` of rank ``r`` is every
    ``world_size``-th index of the ``k``-th global batch of one process with the same seed, so the
    processes together see exactly the batches one process would.
    """
    check_split(batch_size, world_size)
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True,
                                                  seed=seed, drop_last=True)
    share, local = list(sampler), batch_size // world_size
    return [share[k * local : (k + 1) * local] for k in range(n // batch_size)]


def eval_batches(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This process's index batches for evaluation: every global batch (in order, the last one
    partial) split the same way, without the sampler's padding, so every item counts once."""
    return [list(range(i, min(n, i + batch_size)))[rank::world_size] for i in range(0, n, batch_size)]


class BatchLoader:
    """Batches of normalized float images from uint8 tensors kept on ``device``.

    Args:
        images, labels: the split, uint8 ``(N, 3, H, W)`` and int64 ``(N,)``.
        mean, std: normalization statistics, shape ``(3, H, W)`` (per pixel) or ``(3, 1, 1)``.
        train: shuffle each epoch, augment, and drop the last partial batch.
        augment: ``"flip"``, ``"flip-crop"`` (pad 4 and crop) or ``"none"``.
        rank, world_size: this process's share of every (global) batch in a distributed run.
    """

    def __init__(self, images, labels, batch_size, mean, std, train=False, augment="flip", seed=0,
                 device="cpu", channels_last=True, rank=0, world_size=1):
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size = batch_size
        self.mean = mean.to(self.device, torch.float32)
        self.std = std.to(self.device, torch.float32)
        self.train = train
        self.augment = augment if train else "none"
        self.seed = seed
        self.channels_last = channels_last
        # In a distributed run each process takes its share of every global batch (train_batches,
        # eval_batches), augmented exactly as one process would augment it.
        self.rank, self.world_size = rank, world_size
        check_split(batch_size, world_size)
        if batch_size > len(images) and train:
            raise DataError(f"batch size {batch_size} is larger than the training set ({len(images)} images)")

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def epoch(self, epoch: int = 0, start_batch: int = 0, first_step: int = 0):
        """Yield ``(images, labels)`` of ``epoch`` from batch ``start_batch`` on.

        ``first_step`` is the global step of the first yielded batch (it seeds augmentation).
        """
        n = len(self.images)
        if self.train:
            batches = train_batches(n, self.batch_size, mix_seed(self.seed, epoch), self.rank, self.world_size)
        else:
            batches = eval_batches(n, self.batch_size, self.rank, self.world_size)
        for b in range(start_batch, len(self)):
            idx = torch.tensor(batches[b], dtype=torch.long, device=self.device)
            x = self.images[idx]
            if self.augment != "none":
                x = self._augment(x, first_step + b - start_batch)
            yield self._normalize(x), self.labels[idx]

    def close(self) -> None:
        """Nothing to release (the images are in memory); the folder loader stops its workers here."""

    def _augment(self, x: torch.Tensor, step: int) -> torch.Tensor:
        # the draws of the whole global batch, of which this process keeps its share: every
        # image gets the flip and crop it would get in a one-process run
        gen = torch.Generator().manual_seed(mix_seed(self.seed, "augment", step))
        share = slice(self.rank, None, self.world_size)
        flip = (torch.rand(self.batch_size, generator=gen) < 0.5)[share].to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if self.augment == "flip-crop":
            shifts = torch.randint(0, 9, (self.batch_size, 2), generator=gen)[share].to(x.device)
            padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
            h, w = x.shape[2:]
            rows = shifts[:, 0, None] + torch.arange(h, device=x.device)  # (n, h)
            cols = shifts[:, 1, None] + torch.arange(w, device=x.device)  # (n, w)
            batch = torch.arange(len(x), device=x.device)[:, None, None]
            x = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        return x

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def normalization(images: torch.Tensor, mode: str = "pixel") -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of a uint8 training set, per pixel ``(3, H, W)`` or per channel ``(3, 1, 1)``."""
    x = images.float()
    dims = (0,) if mode == "pixel" else (0, 2, 3)
    if mode not in ("pixel", "channel"):
        raise DataError(f"unknown normalization {mode!r}; choose pixel or channel")
    mean = x.mean(dim=dims, keepdim=True)[0]
    std = x.std(dim=dims, keepdim=True)[0].clamp_min(1e-3)
    return mean, std


# -- a run's loaders --------------------------------------------------------------------------
def dataset_for(config) -> Dataset:
    """The dataset a config trains on (the shapes set depends on ``shapes_seed``, not ``seed``)."""
    return load_dataset(config.dataset, config.data, config.shapes_train, config.shapes_test, seed=config.shapes_seed)


def make_loaders(config, device: torch.device, rank: int = 0,
                 world_size: int = 1) -> tuple[BatchLoader, BatchLoader, tuple[str, ...]]:
    """Train and test loaders of a run's config (a :class:`orthomod.config.TrainConfig`), and the class names."""
    if config.data and Path(config.data).exists() and not Path(config.data).is_dir():
        raise DataError(f"--data {config.data} is a file; give the folder that holds the data set")
    if config.dataset == "folder":
        from .folder_data import FolderLoader, ImageFolder

        if not config.data:
            raise DataError("dataset = folder needs --data ROOT holding train/<class>/ and "
                            f"{config.val_split}/<class>/ image folders")
        common = dict(image_size=config.image_size, resize=config.resize, on_bad_image=config.on_bad_image,
                      seed=config.seed)
        train_set = ImageFolder(config.data, "train", train=True, **common)
        test_set = ImageFolder(config.data, config.val_split, train=False, classes=train_set.classes, **common)
        loader = dict(workers=config.workers, seed=config.seed, device=device, channels_last=config.channels_last,
                      rank=rank, world_size=world_size)
        return (FolderLoader(train_set, config.batch_size, train=True, **loader),
                FolderLoader(test_set, config.eval_batch_size, train=False, **loader), tuple(train_set.classes))
    dataset = dataset_for(config)
    mean, std = normalization(dataset.train_images, config.normalize)
    common = dict(mean=mean, std=std, device=device, channels_last=config.channels_last, rank=rank,
                  world_size=world_size)
    train = BatchLoader(dataset.train_images, dataset.train_labels, config.batch_size, train=True,
                        augment=config.augment, seed=config.seed, **common)
    test = BatchLoader(dataset.test_images, dataset.test_labels, config.eval_batch_size, **common)
    return train, test, dataset.classes
