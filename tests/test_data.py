import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch

from orthomod.data import (BatchLoader, DataError, download_cifar10, eval_batches, load_cifar10, make_shapes,
                           normalization, train_batches)


def test_shapes_deterministic_balanced_and_uint8():
    a = make_shapes(500, 100, seed=3)
    b = make_shapes(500, 100, seed=3)
    c = make_shapes(500, 100, seed=4)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert not torch.equal(a.train_images, c.train_images)
    assert a.train_images.shape == (500, 3, 32, 32) and a.train_images.dtype == torch.uint8
    assert torch.bincount(a.train_labels).tolist() == [50] * 10
    assert len(a.classes) == 10


def test_shapes_classes_are_not_colour_statistics():
    # a nearest-centroid classifier on an image's mean colour is near chance (10%): the class is
    # in the shape, not in colour statistics
    d = make_shapes(2000, 1000, seed=0)
    feats = lambda images: images.float().mean(dim=(2, 3))
    centroids = torch.stack([feats(d.train_images[d.train_labels == k]).mean(0) for k in range(10)])
    predicted = torch.cdist(feats(d.test_images), centroids).argmin(1)
    assert (predicted == d.test_labels).float().mean().item() < 0.16


def _loader(d, **kw):
    mean, std = normalization(d.train_images, "pixel")
    return BatchLoader(d.train_images, d.train_labels, 64, mean, std, **kw)


def test_pixel_normalization_zero_mean_unit_std():
    d = make_shapes(1000, 10, seed=0)
    x = torch.cat([b for b, _ in _loader(d, train=False).epoch()])
    assert x.shape == (1000, 3, 32, 32)
    assert torch.allclose(x.mean(0), torch.zeros(3, 32, 32), atol=1e-4)
    assert torch.allclose(x.std(0), torch.ones(3, 32, 32), atol=1e-3)
    mean, std = normalization(d.train_images, "channel")
    assert mean.shape == (3, 1, 1) and std.shape == (3, 1, 1)


def test_train_epoch_is_a_permutation_and_drops_last():
    d = make_shapes(1000, 10, seed=0)
    loader = _loader(d, train=True, augment="none", seed=1)
    labels = torch.cat([y for _, y in loader.epoch(0)])
    assert len(loader) == 1000 // 64 and len(labels) == 15 * 64
    other = torch.cat([y for _, y in loader.epoch(1)])
    assert not torch.equal(labels, other)


def test_resumed_epoch_yields_the_same_batches():
    d = make_shapes(1000, 10, seed=0)
    loader = _loader(d, train=True, augment="flip-crop", seed=5)
    full = list(loader.epoch(2, first_step=30))
    tail = list(loader.epoch(2, start_batch=6, first_step=36))
    assert len(tail) == len(full) - 6
    for (x0, y0), (x1, y1) in zip(full[6:], tail):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_rank_shares_rebuild_the_one_process_batches():
    # DistributedSampler shares: local batch k of rank r is global batch k [r::world], augmented
    # as in one process, for the training and the evaluation split
    d = make_shapes(1000, 130, seed=0)
    for train, split in ((True, d.train_images), (False, d.test_images)):
        labels = d.train_labels if train else d.test_labels
        mean, std = normalization(d.train_images, "pixel")
        make = lambda rank, world: BatchLoader(split, labels, 64, mean, std, train=train, augment="flip-crop",
                                               seed=2, rank=rank, world_size=world)
        whole = list(make(0, 1).epoch(3, first_step=7))
        shares = [list(make(r, 4).epoch(3, first_step=7)) for r in range(4)]
        assert all(len(shard) == len(whole) for shard in shares)
        for k, (x, y) in enumerate(whole):
            for r in range(4):
                assert torch.equal(shares[r][k][0], x[r::4]) and torch.equal(shares[r][k][1], y[r::4])
    assert sorted(i for b in eval_batches(130, 64, 1, 4) + eval_batches(130, 64, 3, 4) for i in b) == \
        [i for i in range(130) if i % 64 % 4 in (1, 3)]
    assert train_batches(1000, 64, seed=5) != train_batches(1000, 64, seed=6)
    with pytest.raises(DataError, match="batch size 64 is not divisible by 3 processes"):
        train_batches(1000, 64, seed=5, world_size=3)


def test_flip_and_crop_move_pixels_as_stated():
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).reshape(2, 3, 32, 32) % 251
    images = images.to(torch.uint8)
    loader = BatchLoader(images, torch.zeros(2, dtype=torch.int64), 2, torch.zeros(3, 1, 1), torch.ones(3, 1, 1),
                         train=True, augment="flip-crop", seed=0, channels_last=False)
    for step in range(10):
        out = loader._augment(images, step)
        for i in range(2):
            padded = torch.nn.functional.pad(images[i].int(), (4, 4, 4, 4))
            windows = [padded[:, r:r + 32, c:c + 32] for r in range(9) for c in range(9)]
            candidates = windows + [w.flip(2) for w in windows]
            assert any(torch.equal(out[i].int(), w) for w in candidates)


def _write_fake_cifar(root, n=20, corrupt=None):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        path = folder / name
        if name == corrupt:
            path.write_bytes(b"not a pickle")
            continue
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}
        path.write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return folder


def test_cifar_python_format_loaded_from_folder(tmp_path):
    folder = _write_fake_cifar(tmp_path)
    d = load_cifar10(tmp_path, download=False)
    with open(folder / "data_batch_2", "rb") as f:
        raw = pickle.load(f)
    assert d.train_images.shape == (100, 3, 32, 32) and d.test_images.shape == (20, 3, 32, 32)
    # channel-planar rows: the first 1024 values are the red plane
    assert torch.equal(d.train_images[20, 0].flatten(), torch.from_numpy(raw["data"][0, :1024]))
    assert d.classes[3] == "c3"
    assert torch.equal(load_cifar10(folder, download=False).train_images, d.train_images)  # the folder itself


def test_cifar_errors_are_one_line_and_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"data folder .*nowhere does not exist; pass --data DIR"):
        load_cifar10(tmp_path / "nowhere")
    monkeypatch.setenv("ORTHOMOD_DATA", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="put cifar-10-batches-py/ .* in .*empty"):
        load_cifar10(download=False)
    _write_fake_cifar(tmp_path / "bad", corrupt="data_batch_3")
    with pytest.raises(DataError, match=r"data_batch_3 is corrupt.*download it again") as info:
        load_cifar10(tmp_path / "bad")
    assert "\n" not in str(info.value)


def _archive(tmp_path):
    source = tmp_path / "src"
    _write_fake_cifar(source)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(buffer.getvalue())
    return path, hashlib.md5(buffer.getvalue()).hexdigest()


def test_download_checks_md5_and_unpacks(tmp_path):
    archive, md5 = _archive(tmp_path)
    folder = download_cifar10(tmp_path / "cache", url=archive.as_uri(), md5=md5)
    assert (folder / "test_batch").is_file()
    assert load_cifar10(tmp_path / "cache", download=False).train_images.shape == (100, 3, 32, 32)
    with pytest.raises(DataError, match="fails its md5 check"):
        download_cifar10(tmp_path / "cache2", url=archive.as_uri(), md5="0" * 32)
    with pytest.raises(DataError, match=r"download from .* failed .*put cifar-10-batches-py/"):
        download_cifar10(tmp_path / "cache3", url=(tmp_path / "missing.tar.gz").as_uri())
