"""Image-folder datasets (``<root>/{train,val}/<class>/<image>``) read with Pillow.

The paper's ImageNet protocol: images resized (shorter side) to 256, random 224 crops and
horizontal flips, colour and lighting augmentation, then the mean RGB value subtracted and the
result scaled by 0.017; evaluation on the centre 224 crop. Images are decoded by DataLoader
worker processes. Augmentation draws from ``(seed, epoch, index)``, so an image gets the same
crop whatever worker decodes it, and a resumed epoch is the same as an uninterrupted one.

The workers are started once per loader and serve every epoch (the sampler hands them
``(epoch, index)`` keys), and they are started with ``spawn``, not ``fork``: forking the
trainer, which has gloo and DataLoader queue threads, deadlocked 2 of 17 runs of the 2-process
test job here (the new worker hung in CPython's after-fork clean-up, waiting for a lock that a
thread of the parent held at the moment of the fork); with this, 50 of 50 completed.

An unreadable image is either skipped and counted (``on_bad_image="skip"``; the count is in
``FolderLoader.skipped``) or stops the run with its path (``"error"``).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .data import DataError, mix_seed, check_split, eval_batches, train_batches

__all__ = ["ImageFolder", "FolderLoader", "IMAGE_EXTENSIONS", "MEAN_RGB", "SCALE"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
MEAN_RGB = (123.68, 116.78, 103.94)  # ImageNet mean pixel (0-255), as in the ResNet/Caffe protocol
SCALE = 0.017                        # ~1/58.8, the paper's scaling after mean subtraction
# PCA of ImageNet RGB pixels (Krizhevsky et al. 2012 "lighting" noise; the values published
# with fb.resnet.torch): eigenvalues and eigenvectors (columns) of the RGB covariance, 0-1 scale.
_PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
_PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


class ImageFolder(torch.utils.data.Dataset):
    """One split of an image folder; items are ``(image, label)`` or None for an unreadable file."""

    def __init__(self, root: str | os.PathLike, split: str, train: bool, image_size: int = 224, resize: int = 256,
                 on_bad_image: str = "skip", seed: int = 0, classes: list[str] | None = None):
        folder = Path(root) / split
        if not folder.is_dir():
            raise DataError(f"image folder {folder} does not exist; expected <root>/{split}/<class>/<image>")
        found = sorted(p.name for p in folder.iterdir() if p.is_dir())
        self.classes = classes if classes is not None else found
        if not self.classes:
            raise DataError(f"image folder {folder} has no class subfolders; expected <root>/{split}/<class>/<image>")
        index = {name: i for i, name in enumerate(self.classes)}
        unknown = sorted(set(found) - set(index))
        if unknown:
            raise DataError(f"{folder} has classes that the train split lacks: {', '.join(unknown[:5])}")
        self.samples = [(str(path), index[c]) for c in found
                        for path in sorted((folder / c).iterdir()) if path.suffix.lower() in IMAGE_EXTENSIONS]
        if not self.samples:
            raise DataError(f"image folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        if on_bad_image not in ("skip", "error"):
            raise DataError(f"on_bad_image must be skip or error, got {on_bad_image!r}")
        self.train, self.image_size, self.resize = train, image_size, resize
        self.on_bad_image, self.seed, self.epoch = on_bad_image, seed, 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        # an (epoch, index) key from FolderLoader; a plain index uses the ``epoch`` attribute
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        path, label = self.samples[i]
        try:
            with Image.open(path) as f:
                image = f.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            if self.on_bad_image == "error":
                raise DataError(f"unreadable image {path} ({type(exc).__name__}); remove it or use "
                                "on_bad_image = \"skip\"") from None
            return None
        rng = np.random.default_rng(mix_seed(self.seed, epoch, i)) if self.train else None
        return self.transform(image, rng), label

    def transform(self, image: Image.Image, rng: np.random.Generator | None) -> torch.Tensor:
        """Resize, crop (random or centre), flip, colour and lighting; then (x - mean) * 0.017."""
        w, h = image.size
        ratio = self.resize / min(w, h)
        image = image.resize((max(self.image_size, round(w * ratio)), max(self.image_size, round(h * ratio))),
                             Image.BILINEAR)
        w, h = image.size
        s = self.image_size
        if rng is None:
            left, top = (w - s) // 2, (h - s) // 2
        else:
            left, top = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        x = np.asarray(image.crop((left, top, left + s, top + s)), dtype=np.float32) / 255.0  # H, W, 3
        if rng is not None:
            if rng.random() < 0.5:
                x = x[:, ::-1]
            x = self._colour(x, rng)
        x = (x * 255.0 - np.array(MEAN_RGB, dtype=np.float32)) * SCALE
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

    @staticmethod
    def _colour(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # brightness, contrast and saturation jitter of +-0.4 in random order, then PCA lighting
        grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        for op in rng.permutation(3):
            alpha = 1.0 + rng.uniform(-0.4, 0.4)
            if op == 0:
                x = x * alpha
            elif op == 1:
                x = (x - grey.mean()) * alpha + grey.mean()
            else:
                x = (x - grey[..., None]) * alpha + grey[..., None]
            grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        shift = _PCA_EIGVEC @ (rng.normal(0, 0.1, 3) * _PCA_EIGVAL)
        return np.clip(x + shift.astype(np.float32), 0.0, 1.0)


def _collate(items):
    kept = [item for item in items if item is not None]
    skipped = len(items) - len(kept)
    if not kept:
        return None, None, skipped
    return torch.stack([x for x, _ in kept]), torch.tensor([y for _, y in kept]), skipped


class _EpochBatches(torch.utils.data.Sampler):
    """The batch sampler of a persistent DataLoader: the batches of the epoch being read, set
    before each pass, as ``(epoch, index)`` keys so that workers need no epoch of their own."""

    def __init__(self):
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class FolderLoader:
    """Batches of an :class:`ImageFolder`, with the interface of :class:`orthomod.data.BatchLoader`.

    ``batch_size`` is the global batch. Training batches come from a
    :class:`torch.utils.data.DistributedSampler` (``world_size`` replicas, this process's
    ``rank``, shuffled from ``seed`` and the epoch, tail dropped), cut into local batches of
    ``batch_size // world_size``: local batch ``k`` of rank ``r`` is every ``world_size``-th image
    of the ``k``-th global batch of one process, so the processes together see exactly the
    batches one process would. Evaluation splits each global batch the same way without the
    sampler's padding, so every test image is counted once.
    """

    def __init__(self, dataset: ImageFolder, batch_size: int, train: bool, workers: int = 4, seed: int = 0,
                 device="cpu", channels_last=True, rank: int = 0, world_size: int = 1):
        self.dataset, self.batch_size, self.train = dataset, batch_size, train
        self.workers, self.seed, self.device = workers, seed, torch.device(device)
        self.channels_last, self.rank, self.world_size = channels_last, rank, world_size
        self.skipped = 0
        self._sampler = _EpochBatches()
        self._loader: torch.utils.data.DataLoader | None = None  # made at first use, kept: see close()
        if train and len(dataset) < batch_size:
            raise DataError(f"batch size {batch_size} is larger than the training set ({len(dataset)} images)")
        check_split(batch_size, world_size)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def _batches(self, epoch: int) -> list[list[int]]:
        n = len(self.dataset)
        if self.train:
            return train_batches(n, self.batch_size, mix_seed(self.seed, "order", epoch), self.rank, self.world_size)
        return eval_batches(n, self.batch_size, self.rank, self.world_size)

    def epoch(self, epoch: int = 0, start_batch: int = 0, first_step: int = 0):
        self._sampler.batches = [[(epoch, i) for i in batch] for batch in self._batches(epoch)[start_batch:] if batch]
        if self._loader is None:
            spawn = self.workers > 0
            self._loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=self._sampler, num_workers=self.workers, collate_fn=_collate,
                pin_memory=self.device.type == "cuda", persistent_workers=spawn,
                multiprocessing_context="spawn" if spawn else None)
        for x, y, skipped in self._loader:
            self.skipped += skipped
            if x is None:
                continue
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)

    def close(self) -> None:
        """Stop the worker processes; the next :meth:`epoch` starts new ones."""
        loader, self._loader = self._loader, None
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()  # what the iterator's __del__ does, now rather than at collection
