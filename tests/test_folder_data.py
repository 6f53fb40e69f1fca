"""The image-folder pipeline: a tiny generated folder, and CIFAR-10 as JPEG folders."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image_folder
from orthomod.cli import main
from orthomod.data import DataError
from orthomod.folder_data import MEAN_RGB, SCALE, FolderLoader, ImageFolder


def test_folder_split_classes_and_eval_transform(tmp_path):
    root = make_image_folder(tmp_path)
    val = ImageFolder(root, "val", train=False, image_size=32, resize=36)
    assert val.classes == ["cat", "dog"] and len(val) == 4
    x, y = val[0]
    assert x.shape == (3, 32, 32) and y == 0
    # eval: centre crop, then (pixel - mean RGB) * 0.017
    with Image.open(val.samples[0][0]) as image:
        w, h = image.size
        ratio = 36 / min(w, h)
        resized = image.convert("RGB").resize((round(w * ratio), round(h * ratio)), Image.BILINEAR)
    left, top = (resized.size[0] - 32) // 2, (resized.size[1] - 32) // 2
    crop = np.asarray(resized.crop((left, top, left + 32, top + 32)), dtype=np.float32)
    expected = (crop - np.array(MEAN_RGB, dtype=np.float32)) * SCALE
    assert torch.allclose(x, torch.from_numpy(expected.transpose(2, 0, 1)), atol=2e-3)


def test_train_augmentation_is_deterministic_per_epoch_and_index(tmp_path):
    root = make_image_folder(tmp_path, bad=False)
    train = ImageFolder(root, "train", train=True, image_size=32, resize=40, seed=3)
    a, _ = train[1]
    b, _ = train[1]
    train.epoch = 1
    c, _ = train[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_unreadable_images_skipped_and_counted_or_error(tmp_path):
    root = make_image_folder(tmp_path)
    train = ImageFolder(root, "train", train=True, image_size=32, resize=36)
    assert len(train) == 13  # 12 images + the broken one, no .txt
    loader = FolderLoader(train, batch_size=13, train=True, workers=0)
    batches = list(loader.epoch(0))
    assert len(batches) == 1 and batches[0][0].shape == (12, 3, 32, 32) and loader.skipped == 1
    strict = ImageFolder(root, "train", train=True, image_size=32, resize=36, on_bad_image="error")
    with pytest.raises(DataError, match=r"unreadable image .*broken.jpg .*on_bad_image"):
        list(FolderLoader(strict, batch_size=13, train=True, workers=0).epoch(0))


@pytest.mark.slow
def test_loader_resume_and_rank_shards(tmp_path):
    root = make_image_folder(tmp_path, bad=False)
    train = ImageFolder(root, "train", train=True, image_size=32, resize=36, seed=1)
    loader = FolderLoader(train, batch_size=2, train=True, workers=2, seed=1, channels_last=True)
    full = list(loader.epoch(4))
    tail = list(loader.epoch(4, start_batch=2))
    assert len(full) == 6 and len(tail) == 4
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[2:], tail))
    assert full[0][0].is_contiguous(memory_format=torch.channels_last)
    whole = FolderLoader(train, batch_size=4, train=True, workers=0, seed=1)._batches(4)
    shards = [FolderLoader(train, batch_size=4, train=True, workers=0, seed=1, rank=r, world_size=2)._batches(4)
              for r in (0, 1)]
    for batch, first, second in zip(whole, *shards):  # each global batch split between the ranks
        assert first == batch[0::2] and second == batch[1::2]
    # the same with three ranks, a new order each epoch, and evaluation counting every image once
    whole = FolderLoader(train, batch_size=6, train=True, workers=0, seed=1)._batches(5)
    thirds = [FolderLoader(train, batch_size=6, train=True, workers=0, seed=1, rank=r, world_size=3)._batches(5)
              for r in range(3)]
    assert len(whole) == 2 and all(len(shard) == 2 for shard in thirds)
    assert [[s[k] for s in thirds] for k in range(2)] == [[b[r::3] for r in range(3)] for b in whole]
    assert sorted(i for b in whole for i in b) == list(range(12))
    assert whole != FolderLoader(train, batch_size=6, train=True, workers=0, seed=1)._batches(6)
    test = [FolderLoader(train, batch_size=9, train=False, workers=0, rank=r, world_size=3)._batches(0)
            for r in range(3)]
    assert sorted(i for shard in test for b in shard for i in b) == list(range(12))
    with pytest.raises(DataError, match="batch size 4 is not divisible by 3 processes"):
        FolderLoader(train, batch_size=4, train=True, workers=0, world_size=3)


@pytest.mark.slow
def test_workers_start_once_by_spawn_and_follow_the_epoch(tmp_path):
    # workers serve every epoch (the sampler hands them the epoch with each index), are started
    # with spawn rather than fork (forking the threaded trainer deadlocked), and close() stops them
    import multiprocessing

    root = make_image_folder(tmp_path, bad=False)
    train = ImageFolder(root, "train", train=True, image_size=32, resize=40, seed=2)
    served = FolderLoader(train, batch_size=4, train=True, workers=2, seed=2)
    inline = FolderLoader(train, batch_size=4, train=True, workers=0, seed=2)
    before = {p.pid for p in multiprocessing.active_children()}  # any left by other tests

    def children():
        return {p.pid: type(p).__name__ for p in multiprocessing.active_children() if p.pid not in before}

    started = None
    for epoch in (0, 1, 2):
        got, want = list(served.epoch(epoch)), list(inline.epoch(epoch))
        assert len(got) == len(want) == 3
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want))
        assert started is None or children() == started
        started = children()
    assert len(started) == 2 and set(started.values()) == {"SpawnProcess"}
    assert not torch.equal(list(inline.epoch(0))[0][0], list(inline.epoch(1))[0][0])  # a new crop each epoch
    served.close()
    assert children() == {}


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match=r"image folder .*train does not exist"):
        ImageFolder(tmp_path, "train", train=True)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        ImageFolder(tmp_path, "train", train=True)


def test_train_cli_on_generated_folder(tmp_path, capsys):
    root = make_image_folder(tmp_path / "data")
    code = main(["train", "--dataset", "folder", "--data", str(root), "--model", "plain8", "--batch-size", "4",
                 "--iterations", "6", "--out", str(tmp_path), "--name", "f", "--no-progress",
                 "--image-size", "32", "--resize", "36", "--workers", "0"])
    assert code == 0
    summary = json.loads((tmp_path / "f" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_test_acc"] is not None
    assert summary["skipped_images"] >= 1  # broken.jpg, met at least once in 6 steps of 4 of 13 images


@pytest.mark.slow
def test_cifar10_jpeg_folders_end_to_end(cifar10_dir, tmp_path, capsys):
    root = cifar10_dir / "cifar10-images"
    if not (root / "train").is_dir():
        pytest.skip("CIFAR-10 JPEG folders not prepared (../shared/data/cifar10.py --imagefolder)")
    code = main(["train", "--dataset", "folder", "--data", str(root), "--val-split", "test", "--model", "plain8",
                 "--image-size", "32", "--resize", "32", "--batch-size", "64", "--iterations", "40",
                 "--workers", "2", "--out", str(tmp_path), "--name", "c", "--no-progress"])
    assert code == 0
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 40
    assert summary["final_test_acc"] > 0.12  # 40 steps of plain-8 from the JPEG folders: above chance
