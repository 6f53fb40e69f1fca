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
