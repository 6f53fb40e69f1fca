import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cifar10_dir():
    """The CIFAR-10 copy .ci/run prepares from ../shared (ORTHOMOD_DATA); skipped where absent."""
    root = os.environ.get("ORTHOMOD_DATA")
    if not root or not (Path(root) / "cifar-10-batches-py" / "test_batch").is_file():
        pytest.skip("CIFAR-10 not prepared: set ORTHOMOD_DATA to a folder made by ../shared/data/cifar10.py --out")
    return Path(root)


def tiny_config(tmp_path, **changes):
    from orthomod.config import TrainConfig

    values = dict(model="plain8", dataset="shapes", shapes_train=1000, shapes_test=200, iterations=30,
                  batch_size=50, log_every=5, checkpoint_every=10, out=str(tmp_path), name="run")
    values.update(changes)
    return TrainConfig(**values)


def make_image_folder(root, bad=True):
    """A tiny <root>/{train,val}/{cat,dog}/ folder: images of several sizes, a .txt, one broken JPEG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for c, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(count):
                size = (40 + 3 * i, 48 - 2 * i)  # different sizes and aspect ratios
                pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (size[1], size[0], 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "train" / "cat" / "notes.txt").write_text("not an image, ignored by extension")
    if bad:
        (root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root
