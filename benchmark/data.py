"""The shared DataModule and the dataset registry.

Every split is held as one tensor in memory (on the training device where possible), so a batch is one
indexing operation. Dynamic binarisation (Burda et al. 2016, Section 5) resamples a training image every
time it is drawn; validation and test images are binarised once, with a fixed seed.

Every dataset states its number of intensity levels L (256 for 8-bit sources, 17 for ``digits``), and its
images are stored on one grid: x = k / (L - 1), k = 0 .. L - 1, in [0, 1]. Uniform dequantisation (Theis et
al. 2016; Ho et al. 2019, Section 3.1) serves x = (k + u) / L, u ~ U[0, 1)^D instead, resampled each draw for
training and drawn once, seeded, for validation and test; a density p on [0, 1]^D then bounds the discrete
likelihood, log P(k) >= E_u[log p((k + u) / L)] - D log L.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DistributedSampler, RandomSampler, Sampler, SequentialSampler

from benchmark.errors import UsageError
from benchmark.likelihoods import on_grid

Arrays = tuple[Tensor, Tensor, Tensor, Tensor]  # train images, train labels, test images, test labels

MNIST_PKL_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


@dataclass(frozen=True)
class DatasetSpec:
    shape: tuple[int, int, int]  # (C, H, W)
    load: Callable[[Path, Optional[Path]], Arrays]
    val_size: int
    levels: int  # intensity levels of the source; its images are k / (levels - 1)
    folder: Optional[str] = None  # what a data.path folder must hold (torchvision's folder of the dataset)


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, shape: tuple[int, int, int], val_size: int, levels: int = 256,
                     folder: Optional[str] = None):
    def wrap(load):
        if name in DATASETS:
            raise KeyError(f"dataset {name!r} is already registered")
        if levels < 2:
            raise ValueError(f"dataset {name!r} needs at least 2 intensity levels, got {levels}")
        DATASETS[name] = DatasetSpec(shape, load, val_size, levels, folder)
        return load
    return wrap


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _as_images(x, shape) -> Tensor:
    """Any array of N images -> float32 (N, C, H, W) in [0, 1] (uint8 sources are scaled by 1/255)."""
    x = torch.as_tensor(x)
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    return x.reshape(-1, *shape)


def _pickle_images(x, shape) -> Tensor:
    """The classic pickle's pixels are k / 256 (k = 0 .. 255, so white is 0.996): -> k / 255, the grid every
    8-bit source is on."""
    return (_as_images(x, shape) * 256).round() / 255


@register_dataset("digits", shape=(1, 8, 8), val_size=200, levels=17)
def load_digits(root: Path, path: Optional[Path]) -> Arrays:
    """scikit-learn's bundled 8x8 digits (1,797 images, values 0..16): embedded, needs no download.
    The last 300 images of a seeded permutation form the test split."""
    from sklearn.datasets import load_digits as sk_load

    d = sk_load()
    x = _as_images(d.images / 16.0, (1, 8, 8))
    y = torch.as_tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    train, test = perm[:-300], perm[-300:]
    return x[train], y[train], x[test], y[test]


@register_dataset("mnist", shape=(1, 28, 28), val_size=10_000, folder="MNIST")
def load_mnist(root: Path, path: Optional[Path]) -> Arrays:
    """MNIST from, in order: a local `mnist.pkl.gz` (the classic pickle: its train and valid parts are the
    standard 60k training set), a local folder of torchvision's raw files, else torchvision's download."""
    if path is not None and path.is_file():
        if sha256(path) != MNIST_PKL_SHA256:
            raise UsageError(f"{path} is not the expected mnist.pkl.gz (sha256 mismatch); "
                             "re-download it or point data.path at a good copy")
        try:
            with gzip.open(path) as f:
                (xtr, ytr), (xva, yva), (xte, yte) = pickle.load(f, encoding="latin1")
        except (OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
            raise UsageError(f"cannot read {path} as mnist.pkl.gz ({e}); re-download it") from e
        shape = (1, 28, 28)
        x = torch.cat([_pickle_images(xtr, shape), _pickle_images(xva, shape)])
        y = torch.cat([torch.as_tensor(ytr), torch.as_tensor(yva)]).long()
        return x, y, _pickle_images(xte, shape), torch.as_tensor(yte).long()
    return _torchvision("MNIST", root, path, (1, 28, 28))


@register_dataset("fashion_mnist", shape=(1, 28, 28), val_size=10_000, folder="FashionMNIST")
def load_fashion_mnist(root: Path, path: Optional[Path]) -> Arrays:
    return _torchvision("FashionMNIST", root, path, (1, 28, 28))


@register_dataset("cifar10", shape=(3, 32, 32), val_size=5_000, folder="cifar-10-batches-py")
def load_cifar10(root: Path, path: Optional[Path]) -> Arrays:
    return _torchvision("CIFAR10", root, path, (3, 32, 32))


@register_dataset("celeba64", shape=(3, 64, 64), val_size=10_000, folder="celeba")
def load_celeba64(root: Path, path: Optional[Path]) -> Arrays:
    """CelebA aligned faces, centre-cropped to 140 and resized to 64 (the usual 64x64 protocol);
    its official train+valid splits form the training set here, test is the official test split."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.CenterCrop(140), transforms.Resize(64), transforms.PILToTensor()])

    def split(name):
        with _reading("CelebA", path or root):
            ds = datasets.CelebA(str(path or root), split=name, transform=tf, download=True)
            x = torch.stack([ds[i][0] for i in range(len(ds))])  # uint8 (N, 3, 64, 64)
        return _as_images(x, (3, 64, 64)), torch.zeros(len(ds), dtype=torch.long)

    (xtr, ytr), (xva, yva), (xte, yte) = split("train"), split("valid"), split("test")
    return torch.cat([xtr, xva]), torch.cat([ytr, yva]), xte, yte


@contextmanager
def _reading(name: str, root: Path):
    """torchvision's failures (files absent and no network, a checksum or format check failed, a truncated
    file) -> one UsageError line naming the folder."""
    try:
        yield
    except (RuntimeError, OSError, AssertionError, ValueError, EOFError, pickle.UnpicklingError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UsageError(f"cannot load {name} from {root} ({type(e).__name__}: {reason}); put torchvision's "
                         "files there (checksums must match) or check the network, then retry") from e


def _torchvision(name: str, root: Path, path: Optional[Path], shape) -> Arrays:
    """A torchvision dataset read whole into tensors: from ``path`` (a folder with torchvision's files; never
    downloaded into, so a wrong folder is an error, not a download), else from ``root``, downloaded there if
    its files are absent."""
    from torchvision import datasets

    cls = getattr(datasets, name)
    out = []
    for train in (True, False):
        with _reading(name, path or root):
            try:
                ds = cls(str(path or root), train=train, download=path is None)
            except RuntimeError as e:
                if path is None:
                    raise
                raise UsageError(f"no {name} files under data.path {path} (torchvision's {name}/ folder); fix "
                                 f"data.path, or drop it to download to data.root") from e
        x = ds.data if isinstance(ds.data, Tensor) else torch.as_tensor(ds.data)
        if x.ndim == 4 and x.shape[-1] == 3:  # CIFAR stores (N, H, W, C)
            x = x.permute(0, 3, 1, 2)
        out += [_as_images(x.contiguous(), shape), torch.as_tensor(ds.targets).long()]
    return tuple(out)


def dequantize(x: Tensor, levels: int, generator: torch.Generator | None = None) -> Tensor:
    """Grid images k / (levels - 1) -> (k + u) / levels, u ~ U[0, 1) per pixel (Theis et al. 2016;
    Ho et al. 2019, Section 3.1)."""
    k = (x * (levels - 1)).round()
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return (k + u) / levels


class TensorImages:
    """Images and labels held as tensors; ``batch`` serves a whole batch with one indexing op. A batch is
    (x, y, index): the index lets sample-based metrics order codes the same way under DDP. Dynamic
    binarisation, or dequantisation onto ``dequantize_levels``, redraws the batch's pixels at every draw."""

    def __init__(self, x: Tensor, y: Tensor, dynamic_binarization: bool = False,
                 dequantize_levels: int | None = None):
        self.x, self.y, self.dynamic, self.dequantize_levels = x, y, dynamic_binarization, dequantize_levels

    def __len__(self):
        return len(self.x)

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.x[idx]
        if self.dynamic:
            x = torch.bernoulli(x)
        elif self.dequantize_levels is not None:
            x = dequantize(x, self.dequantize_levels)
        return x, self.y[idx], idx


class TensorBatches:
    """A DataLoader's batches without its per-batch machinery: each epoch the sampler's order becomes one
    index tensor on the data's device, and each batch is one indexing operation of the split.

    The sampler is the one a DataLoader would take (shuffling, DDP sharding), exposed as ``sampler`` so that
    Lightning sets its epoch. Against a ``DataLoader`` over the same one-op batches this saved 0.15-1.5 ms a
    step on a CPU, about 3% of an MLP step there (results/performance.md); a GPU step is shorter."""

    batch_sampler = None  # as in a DataLoader that batches its sampler itself: Lightning reads both attributes

    def __init__(self, data: TensorImages, sampler: Sampler[int], batch_size: int, drop_last: bool = False):
        self.data, self.sampler, self.batch_size, self.drop_last = data, sampler, batch_size, drop_last

    def __len__(self):
        n, b = len(self.sampler), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self):
        # A generator: nothing is drawn until the first batch. Lightning calls iter() once to check that the
        # loader is iterable, and a shuffle drawn then would shift the global generator a resumed run restores.
        idx = torch.as_tensor(list(self.sampler), dtype=torch.long).to(self.data.x.device)
        if self.drop_last:
            idx = idx[: len(self) * self.batch_size]
        yield from map(self.data.batch, idx.split(self.batch_size))


class ShardSampler(DistributedSampler):
    """Evaluation sharding without padding: rank r of w gets the contiguous slice [r n / w, (r+1) n / w).

    ``DistributedSampler`` repeats items to even out the ranks, which biases a metric over the split."""

    def __iter__(self):
        n = len(self.dataset)
        return iter(range(self.rank * n // self.num_replicas, (self.rank + 1) * n // self.num_replicas))

    def __len__(self):
        n = len(self.dataset)
        return (self.rank + 1) * n // self.num_replicas - self.rank * n // self.num_replicas


Binarize = Literal["none", "dynamic", "static"]


class LatentDataModule(L.LightningDataModule):
    """One DataModule for every variant.

    Args:
        dataset: registry key (``digits``, ``mnist``, ``fashion_mnist``, ``cifar10``, ``celeba64``).
        root: where torchvision datasets are downloaded to or read from.
        path: a local file or folder with the data (e.g. ``mnist.pkl.gz``), checked against its checksum.
        binarize: ``none`` (continuous pixels), ``dynamic`` (training images resampled at every draw;
            val/test binarised once) or ``static`` (every split binarised once).
        dequantize: serve (k + u) / levels, u ~ U[0, 1)^D, instead of the grid values k / (levels - 1):
            redrawn every time for training images, drawn once (seeded) for val/test. For a density
            likelihood (``gaussian``), whose value then bounds the probability of the discrete data.
        batch_size: training batch size; evaluation uses ``eval_batch_size``.
        seed: seeds the train/val split and the fixed binarisations.
        pad: zero pixels added on every side (2 makes MNIST 32x32, as the RAE protocol has it).
        on_device: hold the tensors on the training device (GPU), so batches never cross the bus.
    """

    def __init__(self, dataset: str = "digits", root: str = "data", path: Optional[str] = None,
                 binarize: Binarize = "none", dequantize: bool = False, batch_size: int = 128,
                 eval_batch_size: int = 1000, seed: int = 0, pad: int = 0, on_device: bool = True):
        super().__init__()
        if dataset not in DATASETS:
            raise UsageError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
        if binarize not in ("none", "dynamic", "static"):
            raise UsageError(f"unknown binarize {binarize!r}; choose none, dynamic or static")
        if dequantize and binarize != "none":
            raise UsageError("data.dequantize applies to grey images but data.binarize is set; "
                             "set data.binarize none or data.dequantize false")
        for key, size in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if size < 1:
                raise UsageError(f"data.{key} must be a positive integer, got {size}")
        if pad < 0:
            raise UsageError(f"data.pad must be a non-negative number of pixels, got {pad}")
        if path is not None and dataset == "digits":
            raise UsageError("the digits dataset is embedded (scikit-learn's 8x8 digits) and reads no data.path; "
                             "drop data.path, or choose a dataset that has files")
        if path is not None and not Path(path).exists():
            raise UsageError(f"data file {path} does not exist; fix data.path or drop it to download")
        folder = DATASETS[dataset].folder
        if path is not None and Path(path).is_dir() and folder and not (Path(path) / folder).is_dir():
            raise UsageError(f"data.path {path} holds no {folder}/ folder, where torchvision keeps {dataset}'s "
                             f"files; point data.path at the folder above it (or at mnist.pkl.gz for mnist), or "
                             f"drop it to download to data.root")
        self.save_hyperparameters()
        self.spec = DATASETS[dataset]
        self.splits: dict[str, TensorImages] = {}
        self.grey: dict[str, tuple[Tensor, Tensor]] = {}  # CPU images in [0, 1] and labels, never binarised

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.spec.shape
        p = self.hparams.pad
        return c, h + 2 * p, w + 2 * p

    @property
    def binary(self) -> bool:
        return self.hparams.binarize != "none"

    @property
    def levels(self) -> int:
        """The number of values a pixel takes: the source's levels, 2 once binarised. Dequantised images
        are continuous, but their likelihood is still that of this many levels."""
        return 2 if self.binary else self.spec.levels

    def prepare_data(self):
        path = self.hparams.path
        if self.hparams.dataset != "digits" and not (path and Path(path).is_file()):
            self._load()  # downloads once, on one process; a local file needs no download (setup reads it)

    def _load(self) -> Arrays:
        path = Path(self.hparams.path) if self.hparams.path else None
        return self.spec.load(Path(self.hparams.root), path)

    def setup(self, stage: Optional[str] = None):
        if self.splits:
            return
        xtr, ytr, xte, yte = self._load()
        for split, images in (("train", xtr), ("test", xte)):
            if not on_grid(images[:10_000], self.spec.levels):  # a wrongly declared grid shows in any 10k
                raise UsageError(f"the {self.hparams.dataset} {split} images are not on the grid k/"
                                 f"{self.spec.levels - 1} of its {self.spec.levels} levels; register the dataset "
                                 "with its true levels, or store its pixels as k / (levels - 1)")
        if self.hparams.pad:
            xtr, xte = (F.pad(x, [self.hparams.pad] * 4) for x in (xtr, xte))
        g = torch.Generator().manual_seed(self.hparams.seed)
        perm = torch.randperm(len(xtr), generator=g)
        val, train = perm[: self.spec.val_size], perm[self.spec.val_size:]
        x = {"train": xtr[train], "val": xtr[val], "test": xte}
        y = {"train": ytr[train], "val": ytr[val], "test": yte}
        self.grey = {name: (x[name], y[name]) for name in x}  # before binarisation: FID's reference images
        mode = self.hparams.binarize
        for name in x:
            if mode == "static" or (mode == "dynamic" and name != "train"):
                x[name] = torch.bernoulli(x[name], generator=g)
            elif self.hparams.dequantize and name != "train":
                x[name] = dequantize(x[name], self.spec.levels, generator=g)
        device = self._device()
        for name in x:
            train = name == "train"
            levels = self.spec.levels if self.hparams.dequantize and train else None
            self.splits[name] = TensorImages(x[name].to(device), y[name].to(device), mode == "dynamic" and train,
                                             levels)

    def _device(self) -> torch.device:
        if self.hparams.on_device and self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cpu")

    def _loader(self, split: str) -> TensorBatches:
        data = self.splits[split]
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        overfit = self.trainer is not None and self.trainer.overfit_batches > 0  # the same first batches each epoch
        if split != "train" or overfit:  # in order; one process's is the sampler Lightning knows as unshuffled
            sampler = SequentialSampler(data) if world == 1 else ShardSampler(data, world, rank, shuffle=False)
        elif world > 1:  # every rank gets the same number of batches, or DDP's gradient sync would hang
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # the seed Lightning's own DDP sampler takes
            sampler = DistributedSampler(data, world, rank, shuffle=True, seed=seed, drop_last=True)
        else:
            sampler = RandomSampler(data)  # drawn from the global generator, which checkpoints restore
        bs = self.hparams.batch_size if split == "train" else self.hparams.eval_batch_size
        return TensorBatches(data, sampler, bs, drop_last=split == "train" and len(sampler) > bs)

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader(self.test_split)

    test_split = "test"  # the split ``trainer.test`` evaluates: the evaluation's validation pass sets "val"
