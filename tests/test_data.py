"""Invariants of benchmark.data: the registry's loaders, the seeded splits, one-op batches, the three
binarisations, evaluation sharding without padding, and bad input as UsageError.

torchvision's formats are tested on tiny files written here in torchvision's on-disk layout; the network is
never used (every download function torchvision would call is replaced by one that fails, as offline).
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
from types import SimpleNamespace
from urllib.error import URLError

import numpy as np
import pytest
import torch

from benchmark.data import DATASETS, LatentDataModule, ShardSampler, TensorBatches, TensorImages, register_dataset
from benchmark.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS_TRAIN, DIGITS_VAL, DIGITS_TEST = 1797 - 300 - 200, 200, 300


def digits(**kw) -> LatentDataModule:
    dm = LatentDataModule("digits", on_device=False, **kw)
    dm.setup()
    return dm


def rows(x: torch.Tensor) -> set[bytes]:
    """Each image as its exact bytes: the digits have no duplicate images, so equal bytes = same image."""
    return {r.numpy().tobytes() for r in x.reshape(len(x), -1)}


def is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


def by_index(loader) -> dict[int, torch.Tensor]:
    return {int(i): xi for x, _, idx in loader for xi, i in zip(x, idx)}


# --- digits: shapes, values, seeded splits ----------------------------------------------------------------

def test_digits_splits_have_the_documented_sizes_shape_and_range():
    dm = digits()
    assert dm.shape == (1, 8, 8)
    sizes = {name: len(split) for name, split in dm.splits.items()}
    assert sizes == {"train": DIGITS_TRAIN, "val": DIGITS_VAL, "test": DIGITS_TEST}
    for split in dm.splits.values():
        assert split.x.shape[1:] == (1, 8, 8) and split.x.dtype == torch.float32
        assert split.x.min() >= 0 and split.x.max() <= 1
        assert split.y.shape == (len(split.x),) and set(split.y.tolist()) <= set(range(10))
    assert len(rows(torch.cat([s.x for s in dm.splits.values()]))) == 1797  # every image exactly once


def test_same_seed_gives_identical_splits_and_another_seed_another_validation_split():
    a, b, c = digits(seed=0), digits(seed=0), digits(seed=1)
    for name in ("train", "val", "test"):
        assert torch.equal(a.splits[name].x, b.splits[name].x) and torch.equal(a.splits[name].y, b.splits[name].y)
    assert rows(a.splits["val"].x) != rows(c.splits["val"].x)
    assert torch.equal(a.splits["test"].x, c.splits["test"].x)  # the test split does not follow the seed


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_test_split_never_overlaps_train_or_validation(seed):
    dm = digits(seed=seed)
    train, val, test = (rows(dm.splits[n].x) for n in ("train", "val", "test"))
    assert len(train) == DIGITS_TRAIN and len(val) == DIGITS_VAL and len(test) == DIGITS_TEST
    assert not train & val and not train & test and not val & test


# --- a batch is one indexing op ----------------------------------------------------------------------------

def test_a_batch_is_one_indexing_op_and_carries_its_indices(monkeypatch):
    dm = digits(batch_size=64, eval_batch_size=128)
    calls = []
    original = TensorImages.batch

    def spy(self, idx):
        calls.append(len(idx))
        return original(self, idx)

    monkeypatch.setattr(TensorImages, "batch", spy)

    train = dm.splits["train"]
    loader = dm.train_dataloader()
    batches = list(loader)
    assert calls == [64] * (DIGITS_TRAIN // 64) and len(loader) == len(batches)  # last partial batch dropped
    seen = []
    for x, y, idx in batches:
        assert x.shape == (64, 1, 8, 8) and y.shape == (64,) and idx.shape == (64,)
        assert torch.equal(x, train.x[idx]) and torch.equal(y, train.y[idx])
        seen += idx.tolist()
    assert len(set(seen)) == len(seen)  # an epoch draws without replacement
    assert seen != sorted(seen) and seen != [i for _, _, idx in loader for i in idx.tolist()]  # reshuffled

    calls.clear()
    val = dm.splits["val"]
    loader = dm.val_dataloader()
    batches = list(loader)
    assert calls == [128, DIGITS_VAL - 128] and len(loader) == 2  # evaluation keeps every image, in order
    idx = torch.cat([i for _, _, i in batches])
    assert torch.equal(idx, torch.arange(DIGITS_VAL))
    assert torch.equal(torch.cat([x for x, _, _ in batches]), val.x)


def test_the_training_shuffle_follows_the_global_seed():
    dm = digits(batch_size=100)
    order = lambda: torch.cat([idx for _, _, idx in dm.train_dataloader()])  # noqa: E731
    torch.manual_seed(3)
    first = order()
    torch.manual_seed(3)
    assert torch.equal(order(), first)  # a checkpoint restores the generator, so a resumed epoch is the same
    state = torch.get_rng_state()
    iter(dm.train_dataloader())  # Lightning's iterability check must not draw: a resume restores the state first
    assert torch.equal(torch.get_rng_state(), state)


def test_overfitting_trains_on_the_same_first_batches_every_epoch():
    dm = digits(batch_size=50)
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0, overfit_batches=2)
    for _ in range(2):
        first = next(iter(dm.train_dataloader()))[2]
        assert torch.equal(first, torch.arange(50))


def test_ddp_training_shards_are_disjoint_equal_and_reshuffled_each_epoch(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    dm, world = digits(batch_size=50), 3
    epochs = []
    for epoch in range(2):
        shards = []
        for rank in range(world):
            dm.trainer = SimpleNamespace(world_size=world, global_rank=rank, overfit_batches=0)
            loader = dm.train_dataloader()
            loader.sampler.set_epoch(epoch)  # what Lightning does at every epoch start
            shards.append([i for _, _, idx in loader for i in idx.tolist()])
            assert len(loader) == len(shards[-1]) // 50 == DIGITS_TRAIN // world // 50
        flat = sum(shards, [])
        assert len(set(flat)) == len(flat)  # no image on two ranks
        epochs.append(flat)
    assert epochs[0] != epochs[1]


# --- binarisation ------------------------------------------------------------------------------------------

def test_no_binarisation_keeps_continuous_pixels():
    dm = digits(binarize="none")
    assert not dm.binary
    for name, split in dm.splits.items():
        assert not is_binary(split.x) and torch.equal(split.x, dm.grey[name][0])
        x, _, _ = split.batch(torch.arange(32))
        assert torch.equal(x, split.x[:32])  # no resampling either


def test_static_binarisation_binarises_every_split_once():
    dm = digits(binarize="static", batch_size=100)
    assert dm.binary
    first, second = by_index(dm.train_dataloader()), by_index(dm.train_dataloader())  # two epochs
    common = first.keys() & second.keys()
    assert len(common) > 100
    assert all(is_binary(first[i]) and torch.equal(first[i], second[i]) for i in common)
    for name in ("val", "test"):
        loader = getattr(dm, f"{name}_dataloader")
        a, b = by_index(loader()), by_index(loader())
        assert all(is_binary(v) and torch.equal(v, b[i]) for i, v in a.items())
    # each binarisation is a Bernoulli draw of the grey image, seeded: the same seed gives the same one
    assert torch.equal(digits(binarize="static").splits["val"].x, dm.splits["val"].x)
    grey = dm.grey["train"][0]
    assert ((dm.splits["train"].x == 1) <= (grey > 0)).all() and ((dm.splits["train"].x == 0) <= (grey < 1)).all()


def test_dynamic_binarisation_resamples_training_images_and_fixes_evaluation_images():
    dm = digits(binarize="dynamic")
    train = dm.splits["train"]
    idx = torch.arange(64)
    x1, _, _ = train.batch(idx)
    x2, _, _ = train.batch(idx)
    assert is_binary(x1) and is_binary(x2) and not torch.equal(x1, x2)
    # unbiased: the mean of many draws is the grey image (Burda et al. 2016)
    torch.manual_seed(0)
    draws = train.batch(idx.repeat(1000))[0].reshape(1000, 64, 1, 8, 8)  # each row is drawn afresh
    assert (draws.mean(0) - train.x[idx]).abs().max() < 0.1  # 6 standard errors at the worst pixel
    assert not is_binary(train.x)  # the held images stay grey; only the drawn batches are binary
    for name in ("val", "test"):
        loader = getattr(dm, f"{name}_dataloader")
        a, b = by_index(loader()), by_index(loader())
        assert all(is_binary(v) and torch.equal(v, b[i]) for i, v in a.items())
        assert not is_binary(dm.grey[name][0])  # FID's reference images are the grey ones


# --- real MNIST from ../shared ------------------------------------------------------------------------------

def test_real_mnist_pickle_loads_with_the_standard_splits_on_the_8_bit_grid(mnist_pkl):
    dm = LatentDataModule("mnist", path=str(mnist_pkl), on_device=False)
    dm.setup()
    assert dm.levels == 256
    assert {n: len(s) for n, s in dm.splits.items()} == {"train": 50_000, "val": 10_000, "test": 10_000}
    for split in dm.splits.values():
        assert split.x.shape[1:] == (1, 28, 28)
        assert split.x.min() == 0 and split.x.max() == 1  # k/255: white is exactly 1
        assert set(split.y.unique().tolist()) == set(range(10))
    with gzip.open(mnist_pkl) as f:
        _, _, (x_test, y_test) = pickle.load(f, encoding="latin1")
    k_pickle = torch.as_tensor(x_test) * 256  # the pickle stores k/256, k = 0 .. 255
    assert torch.equal(k_pickle, k_pickle.round()) and k_pickle.max() == 255
    assert torch.equal((dm.splits["test"].x.reshape(-1, 784) * 255).round(), k_pickle)
    assert torch.equal(dm.splits["test"].y, torch.as_tensor(y_test).long())


@pytest.mark.parametrize("damage", ["flip_a_byte", "truncate"])
def test_a_corrupted_mnist_pickle_is_a_usage_error_naming_the_checksum(mnist_pkl, tmp_path, damage):
    bad = tmp_path / "mnist.pkl.gz"
    shutil.copyfile(mnist_pkl, bad)
    with open(bad, "r+b") as f:
        if damage == "truncate":
            f.truncate(bad.stat().st_size // 2)
        else:
            f.seek(bad.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    dm = LatentDataModule("mnist", path=str(bad), on_device=False)
    with pytest.raises(UsageError, match="sha256"):
        dm.setup()


def test_a_missing_data_path_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        LatentDataModule("mnist", path=str(tmp_path / "nope" / "mnist.pkl.gz"))


# --- torchvision's on-disk formats, on tiny files -------------------------------------------------------------

@pytest.fixture
def offline(monkeypatch):
    """Every download torchvision could start fails as it does without a network; a test that expects files to
    be read, not fetched, also fails if a download is attempted."""
    import torchvision.datasets.celeba
    import torchvision.datasets.cifar
    import torchvision.datasets.mnist

    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise URLError("offline (test)")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", no_network)
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", no_network)
    monkeypatch.setattr(torchvision.datasets.celeba, "download_file_from_google_drive", no_network)
    return attempts


def write_idx(path, array: np.ndarray):
    """The IDX format of LeCun's MNIST files: magic (0, 0, dtype 0x08 = uint8, ndim), big-endian sizes, data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def write_mnist_raw(root, folder: str, n_train=12, n_test=5):
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x, y = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", x)
        write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", y)
        arrays[prefix] = (x, y)
    return arrays


@pytest.mark.parametrize("dataset, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_style_raw_idx_files_are_read_without_downloading(dataset, folder, tmp_path, offline):
    arrays = write_mnist_raw(tmp_path, folder)
    for root, path in ((tmp_path, None), (tmp_path / "elsewhere", tmp_path)):  # data.root, or data.path a folder
        xtr, ytr, xte, yte = DATASETS[dataset].load(root, path)
        for (x, y), (x_ref, y_ref) in (((xtr, ytr), arrays["train"]), ((xte, yte), arrays["t10k"])):
            assert x.shape == (len(x_ref), 1, 28, 28) and x.dtype == torch.float32
            assert torch.equal(x, torch.as_tensor(x_ref, dtype=torch.float32)[:, None] / 255)
            assert torch.equal(y, torch.as_tensor(y_ref).long())
    assert offline == []


@pytest.mark.parametrize("dataset, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_style_missing_or_corrupt_raw_files_are_usage_errors(dataset, folder, tmp_path, offline):
    with pytest.raises(UsageError, match=f"cannot load {folder} from"):
        DATASETS[dataset].load(tmp_path / "empty", None)  # absent, and no network to fetch it
    assert offline  # it did try to download
    write_mnist_raw(tmp_path, folder)
    images = tmp_path / folder / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])  # truncated
    with pytest.raises(UsageError, match=f"cannot load {folder} from"):
        DATASETS[dataset].load(tmp_path, None)


CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_cifar(root, n_per_batch=3) -> dict[str, tuple[np.ndarray, list[int]]]:
    """cifar-10-batches-py: pickled dicts, 'data' uint8 (N, 3072) as R, G, B planes of 32x32, 'labels'."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    batches = {}
    for name in CIFAR_BATCHES:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        (folder / name).write_bytes(pickle.dumps({"data": data, "labels": labels}))
        batches[name] = (data, labels)
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                            "truck"]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return batches


def test_cifar10_python_batches_are_read_channel_first(tmp_path, offline, monkeypatch):
    """torchvision checks each file's md5 against the real CIFAR-10; that check is torchvision's job, so here
    it only asks that the file exists, and the test checks what our loader makes of the contents."""
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    batches = write_cifar(tmp_path)
    xtr, ytr, xte, yte = DATASETS["cifar10"].load(tmp_path, None)
    train = np.concatenate([batches[n][0] for n in CIFAR_BATCHES[:5]])
    assert xtr.shape == (15, 3, 32, 32) and xte.shape == (3, 3, 32, 32)
    assert torch.equal(xtr, torch.as_tensor(train).reshape(-1, 3, 32, 32).float() / 255)  # planes = channels
    assert torch.equal(xte, torch.as_tensor(batches["test_batch"][0]).reshape(-1, 3, 32, 32).float() / 255)
    assert ytr.tolist() == sum((batches[n][1] for n in CIFAR_BATCHES[:5]), [])
    assert yte.tolist() == batches["test_batch"][1]
    assert offline == []


def test_cifar10_missing_or_corrupt_folder_is_a_usage_error(tmp_path, offline):
    with pytest.raises(UsageError, match="cannot load CIFAR10"):
        DATASETS["cifar10"].load(tmp_path / "empty", None)
    write_cifar(tmp_path)  # right names, wrong contents: the md5 check fails and the re-download cannot run
    with pytest.raises(UsageError, match="cannot load CIFAR10"):
        DATASETS["cifar10"].load(tmp_path, None)
    assert len(offline) == 2


def write_celeba(root, partition: dict[str, int]) -> dict[str, tuple[int, int, int]]:
    """A CelebA folder: img_align_celeba/ and the five annotation lists (count line, header, rows)."""
    from PIL import Image

    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    colours = {}
    for k, name in enumerate(partition):
        colours[name] = (40 * k, 255 - 40 * k, 100)
        Image.new("RGB", (178, 218), colours[name]).save(folder / "img_align_celeba" / name)
    n = len(partition)
    lines = lambda f: "\n".join(f(name) for name in partition) + "\n"  # noqa: E731
    (folder / "list_eval_partition.txt").write_text(lines(lambda f: f"{f} {partition[f]}"))
    (folder / "identity_CelebA.txt").write_text(lines(lambda f: f"{f} 1"))
    (folder / "list_bbox_celeba.txt").write_text(
        f"{n}\nimage_id x_1 y_1 width height\n" + lines(lambda f: f"{f} 1 2 3 4"))
    (folder / "list_landmarks_align_celeba.txt").write_text(
        f"{n}\n" + " ".join(f"p{i}" for i in range(10)) + "\n" + lines(lambda f: f + " 1" * 10))
    (folder / "list_attr_celeba.txt").write_text(
        f"{n}\n" + " ".join(f"a{i}" for i in range(40)) + "\n" + lines(lambda f: f + " -1" * 40))
    return colours


def test_celeba_reads_train_and_valid_as_training_images_at_64(tmp_path, offline, monkeypatch):
    """The annotation files' md5 is torchvision's check (skipped here); the loader's part is the split, the
    crop-and-resize to 64x64, and the scaling."""
    import torchvision.datasets.celeba

    monkeypatch.setattr(torchvision.datasets.celeba, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    # two images a split: torchvision's CelebA cannot index a split of one image
    partition = {"000001.png": 0, "000002.png": 1, "000003.png": 2, "000004.png": 0, "000005.png": 2,
                 "000006.png": 1}
    colours = write_celeba(tmp_path, partition)
    xtr, ytr, xte, yte = DATASETS["celeba64"].load(tmp_path, None)
    assert xtr.shape == (4, 3, 64, 64) and xte.shape == (2, 3, 64, 64) and len(ytr) == 4 and len(yte) == 2

    def colour_of(x):
        return tuple(round(float(c) * 255) for c in x.mean((1, 2)))

    expected = sorted(colours[f] for f, s in partition.items() if s in (0, 1))
    assert sorted(colour_of(x) for x in xtr) == expected
    assert [colour_of(x) for x in xte] == [colours["000003.png"], colours["000005.png"]]
    assert offline == []


def test_celeba_missing_folder_is_a_usage_error(tmp_path, offline):
    with pytest.raises(UsageError, match="cannot load CelebA"):
        DATASETS["celeba64"].load(tmp_path, None)


# --- evaluation under DDP: sharded, never padded ------------------------------------------------------------

@pytest.mark.parametrize("n, world", [(9999, 2), (10_000, 3), (7, 4), (1, 2)])
def test_shard_sampler_gives_disjoint_contiguous_shards_covering_the_split(n, world):
    data = TensorImages(torch.zeros(n, 1, 1, 1), torch.zeros(n))
    shards = [list(ShardSampler(data, num_replicas=world, rank=r, shuffle=False)) for r in range(world)]
    assert [len(ShardSampler(data, num_replicas=world, rank=r)) for r in range(world)] == list(map(len, shards))
    assert sum(shards, []) == list(range(n))  # contiguous, in rank order, each index once, no padding
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_evaluation_loaders_are_sharded_by_rank_without_padding():
    dm = digits(eval_batch_size=64)
    seen = []
    for rank in range(3):
        dm.trainer = SimpleNamespace(world_size=3, global_rank=rank, overfit_batches=0)
        loader = dm.val_dataloader()
        assert isinstance(loader, TensorBatches) and isinstance(loader.sampler, ShardSampler)
        seen += torch.cat([idx for _, _, idx in loader]).tolist()
    assert seen == list(range(DIGITS_VAL))


# --- bad input --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, named", [
    ({"dataset": "mnsit"}, "'mnsit'"),
    ({"binarize": "yes"}, "'yes'"),
    ({"batch_size": 0}, "data.batch_size"),
    ({"eval_batch_size": 0}, "data.eval_batch_size"),
])
def test_bad_arguments_are_usage_errors_naming_the_key(kwargs, named):
    with pytest.raises(UsageError, match=named):
        LatentDataModule(**kwargs)


def test_the_registry_refuses_a_duplicate_name():
    with pytest.raises(KeyError, match="digits"):
        register_dataset("digits", shape=(1, 8, 8), val_size=1)(lambda root, path: None)
    assert DATASETS["digits"].shape == (1, 8, 8)


def test_pad_adds_a_zero_border_and_rejects_negative_sizes():
    data = LatentDataModule("digits", pad=2)
    data.setup()
    x = data.splits["train"].x
    assert data.shape == (1, 12, 12) == tuple(x.shape[1:])
    assert x[..., :2, :].abs().max() == 0 and x[..., :, -2:].abs().max() == 0
    with pytest.raises(UsageError, match="data.pad"):
        LatentDataModule("digits", pad=-1)
