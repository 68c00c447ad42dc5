"""Feature extractors for the sample metrics (FID, KID, precision/recall), their registry, and the on-disk
cache of what they compute once (a trained domain classifier, reference statistics).

- ``inception``: the standard protocol, as torch-fidelity runs it: 8-bit RGB (grayscale replicated), the
  TensorFlow-1 bilinear resize to 299x299 on 0..255 values, then (x - 128) / 128. Two backends with that same
  preprocessing: torch-fidelity's own network (downloads its weights unless given a ``.pth`` file), or the
  TorchScript port in ``../shared/models`` (a ``.pt`` file), for machines without internet.
- ``domain``: a small classifier trained once on the dataset's training split (128-d penultimate features),
  cached on disk. Fast on a CPU; its values are comparable only with other values of the same cached network.

Given the same weights (the TorchScript file's, copied into torch-fidelity's module), the two Inception backends
gave the same features to 1e-6 on 8x8, 28x28 and 32x32 images, so they can differ only through their weights
files, both converted from the same TensorFlow graph. Floats become 8-bit by rounding, as image writers do.
A new extractor is a ``FeatureExtractor`` subclass whose builder is registered with
``@register_feature_extractor("name")``. A run builds it with those keywords of its context (``RUN_CONTEXT``)
that the builder's signature names, so a builder takes only what it uses, and a required parameter that no run
gives is reported before the run trains.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from benchmark.errors import UsageError
from benchmark.records import atomic_write

INCEPTION_SIZE = 299
INCEPTION_TORCHSCRIPT_FILE = "inception-v3-2015-12-05.torchscript.pt"
CACHE_ENV = "LATENT_BENCH_CACHE"


# ----------------------------------------------------------------------------------------------------------------
# Cache locations and checksums
# ----------------------------------------------------------------------------------------------------------------

def fid_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $LATENT_BENCH_CACHE, else ~/.cache/latent-bench; FID files live in its `fid/`."""
    root = cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "latent-bench"
    return Path(root).expanduser() / "fid"


def tensors_checksum(*tensors: Tensor) -> str:
    """sha256 of the shapes, dtypes and bytes of `tensors`: the identity of a data split in cache keys."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def atomic_save(obj: object, path: Path) -> None:
    """``torch.save`` of ``obj``, written atomically: concurrent writers (ranks, studies) never leave half a file."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


# ----------------------------------------------------------------------------------------------------------------
# Feature extractors and their registry
# ----------------------------------------------------------------------------------------------------------------

class FeatureExtractor(nn.Module):
    """Frozen map from images (N, C, H, W) in [0, 1] to features (N, num_features); never leaves eval mode.

    `tag` names the network and its weights; reference statistics are cached under it.
    """

    num_features: int
    tag: str

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)  # a LightningModule's .train() must not unfreeze batch norm statistics


def _check_unit_range(x: Tensor) -> None:
    if not x.is_floating_point() or x.dim() != 4:
        raise ValueError(f"expected float images (N, C, H, W) in [0, 1], got {x.dtype} {tuple(x.shape)}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"images must lie in [0, 1], got [{x.min().item():.3g}, {x.max().item():.3g}]")


def to_uint8_rgb(x: Tensor) -> Tensor:
    """(N, 1 or 3, H, W) floats in [0, 1] -> (N, 3, H, W) uint8: the 8-bit RGB images FID is defined on."""
    _check_unit_range(x)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {x.shape[1]}")
    x = (x * 255).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class TorchFidelityInceptionV3(FeatureExtractor):
    """torch-fidelity's Inception-v3 ('inception-v3-compat', feature '2048'); it resizes internally."""

    num_features = 2048
    tag = "inception-torch-fidelity"

    def __init__(self, weights_path: str | Path | None = None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"],
                feature_extractor_weights_path=None if weights_path is None else str(weights_path))
        except OSError as error:  # urllib's URLError is an OSError
            raise UsageError(
                f"torch-fidelity could not load its Inception weights ({error}); offline, pass a local "
                f"'weights-inception-2015-12-05-6726825d.pth' or the TorchScript '{INCEPTION_TORCHSCRIPT_FILE}' "
                "as weights_path (evaluation.inception_weights in a study)") from error
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(to_uint8_rgb(x))[0]  # (N, 2048)


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=FutureWarning)
        net = torch.jit.load(str(path), map_location="cpu")
    for parameter in net.parameters():  # a ScriptModule has no requires_grad_()
        parameter.requires_grad_(False)
    return net.eval()


class TorchScriptInceptionV3(FeatureExtractor):
    """The Inception-v3 2015-12-05 graph as TorchScript, fed exactly as torch-fidelity feeds its own port.

    The file takes (N, 3, 299, 299) already scaled to [-1, 0.9921875]; the uint8 conversion, the TensorFlow-1
    bilinear resize (torch-fidelity's own function) and (x - 128) / 128 are applied here.
    """

    num_features = 2048
    tag = "inception-torchscript"

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        self.net = _load_torchscript(self.path)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

        x = to_uint8_rgb(x).float()  # (N, 3, H, W), 0..255
        x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), align_corners=False)
        return self.net((x - 128) / 128)  # (N, 2048)

    # A ScriptModule does not pickle (ddp_spawn pickles the LightningModule): ship the path, reload on arrival.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_modules"] = {k: v for k, v in self._modules.items() if k != "net"}
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.net = _load_torchscript(self.path)


class MaxNormalize(nn.Module):
    """Each image divided by its largest pixel (an all-black image stays black): a network behind it sees a
    digit dimmed to any brightness as the digit itself, by construction."""

    def forward(self, x: Tensor) -> Tensor:
        return x / x.amax((1, 2, 3), keepdim=True).clamp_min(1e-3)


class DomainClassifier(nn.Module):
    """Two conv layers + fc 1024-128 + a class head; any input size (8x8 digits to 32x32 CIFAR) via pooling.
    ``normalize``: the images are max-normalised first (``MaxNormalize``), in training and in the features."""

    def __init__(self, in_channels: int, num_classes: int, num_features: int = 128, normalize: bool = False):
        super().__init__()
        self.features = nn.Sequential(
            *([MaxNormalize()] if normalize else []),
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(inplace=True),                # (N, 32, H, W)
            nn.MaxPool2d(2, ceil_mode=True),                                                 # (N, 32, H/2, W/2)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True),  # H/4, W/4
            nn.AdaptiveMaxPool2d(4),  # (N, 64, 4, 4): 28x28 -> 7x7 pooled; 8x8 -> 2x2 replicated
            nn.Flatten(), nn.Linear(64 * 4 * 4, num_features), nn.ReLU(inplace=True),       # (N, 128)
        )
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # (N, num_classes) logits


class DomainFeatureExtractor(FeatureExtractor):
    """The penultimate 128-d layer of a `DomainClassifier` trained on the dataset's training split.

    Runs channels-last, and on a CPU a few hundred images at a time: convolutions and pooling then take
    oneDNN's vectorised paths and the activations stay in cache, 5x faster there than one NCHW batch of
    1000 (features equal to 1e-6)."""

    cpu_chunk = 256

    def __init__(self, classifier: DomainClassifier, tag: str, meta: dict):
        super().__init__()
        self.classifier = classifier.requires_grad_(False).to(memory_format=torch.channels_last)
        self.num_features = classifier.head.in_features
        self.tag = tag
        self.meta = meta
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        _check_unit_range(x)
        x = x.contiguous(memory_format=torch.channels_last)
        chunks = x.split(self.cpu_chunk) if x.device.type == "cpu" else (x,)
        return torch.cat([self.classifier.features(c) for c in chunks])  # (N, 128)


FEATURE_EXTRACTORS: dict[str, Callable[..., FeatureExtractor]] = {}
# What a run's evaluation knows when it builds its extractor, offered to every builder by these names.
RUN_CONTEXT = ("dataset", "train_images", "train_labels", "cache_dir", "weights_path")


def register_feature_extractor(name: str) -> Callable:
    """Register a builder of a `FeatureExtractor` under a user-facing name; a duplicate name is an error.

    A run's evaluation passes a builder the keywords of ``RUN_CONTEXT`` that its signature names (all of them
    to a builder with ``**kwargs``); its other parameters need defaults."""

    def register(builder: Callable[..., FeatureExtractor]) -> Callable[..., FeatureExtractor]:
        if name in FEATURE_EXTRACTORS:
            raise ValueError(f"feature extractor {name!r} is already registered")
        FEATURE_EXTRACTORS[name] = builder
        return builder

    return register


def _taken(builder: Callable, keywords: dict) -> dict:
    """The entries of `keywords` that `builder`'s signature names (all of them if it takes ``**kwargs``)."""
    parameters = inspect.signature(builder).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return dict(keywords)
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in keywords.items() if k in names}


def unmet_parameters(name: str) -> list[str]:
    """The required parameters of `name`'s builder that a run's context (``RUN_CONTEXT``) does not give."""
    return [p.name for p in inspect.signature(FEATURE_EXTRACTORS[name]).parameters.values()
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and p.name not in RUN_CONTEXT]


def build_feature_extractor(name: str, context: dict | None = None, **kwargs) -> FeatureExtractor:
    """The extractor registered as `name` ('domain', 'inception'), built with `kwargs` as given (a name the
    builder does not take is a TypeError) and those keywords of a run's `context` that the builder takes."""
    if name not in FEATURE_EXTRACTORS:
        raise KeyError(f"unknown feature extractor {name!r}; registered: {sorted(FEATURE_EXTRACTORS)}")
    builder = FEATURE_EXTRACTORS[name]
    extractor = builder(**{**_taken(builder, context or {}), **kwargs})
    if not isinstance(extractor, FeatureExtractor):
        raise TypeError(f"builder of {name!r} returned {type(extractor).__name__}, not a FeatureExtractor")
    return extractor


@register_feature_extractor("inception")
def inception_feature_extractor(weights_path: str | Path | None = None) -> FeatureExtractor:
    """Inception-v3 pool3 features: a `.pt` TorchScript file, else torch-fidelity (a `.pth` or a download)."""
    if weights_path is not None and Path(weights_path).suffix == ".pt":
        return TorchScriptInceptionV3(weights_path)
    return TorchFidelityInceptionV3(weights_path)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Images (N, C, H, W) blurred by a Gaussian of standard deviation `sigma` pixels (kernel +-3 sigma)."""
    from torchvision.transforms.functional import gaussian_blur as tv_blur

    if sigma <= 0:
        return x
    size = 2 * math.ceil(3 * sigma) + 1
    return tv_blur(x, [size, size], [sigma, sigma])


AUGMENTATIONS = ("none", "intensity")
# The recipes ``benchmark.perf.extractor_check`` compares: name -> keyword arguments of the domain extractor.
RECIPES = {"none": {"augment": "none", "normalize": False},
           "intensity": {"augment": "intensity", "normalize": False},
           "max_normalized": {"augment": "none", "normalize": True}}


def _augment(x: Tensor, kind: str, generator: torch.Generator) -> Tensor:
    """``intensity``: each image's strokes scaled by a factor drawn from U(0.3, 1) (dimming, lower contrast).

    A classifier that has seen dim digits classifies them by shape, so its features no longer move with the
    stroke brightness: a dimmed but legible sample scores as mild, while blur and noise, which destroy shape,
    still register."""
    if kind == "none":
        return x
    scale = torch.empty(len(x), 1, 1, 1).uniform_(0.3, 1.0, generator=generator)  # (B, 1, 1, 1)
    return x * scale.to(x)


def _train_domain_classifier(images: Tensor, labels: Tensor, *, epochs: int, min_steps: int, batch_size: int,
                             val_fraction: float, seed: int, augment: str = "none",
                             normalize: bool = False) -> tuple[DomainClassifier, dict]:
    """Adam on cross-entropy; the last `val_fraction` of a seeded permutation is held out for accuracy."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    n_val = max(1, int(len(images) * val_fraction))
    train_idx, val_idx = order[:-n_val], order[-n_val:]
    num_classes = int(labels.max()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = DomainClassifier(images.shape[1], num_classes, normalize=normalize)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    steps_per_epoch = math.ceil(len(train_idx) / batch_size)
    epochs = max(epochs, math.ceil(min_steps / steps_per_epoch))  # tiny datasets (8x8 digits) need more passes
    start = time.perf_counter()
    for _ in range(epochs):
        shuffled = train_idx[torch.randperm(len(train_idx), generator=generator)]
        for batch in shuffled.split(batch_size):
            x = _augment(images[batch], augment, generator)
            loss = nn.functional.cross_entropy(classifier(x), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        logits = torch.cat([classifier(images[b]) for b in val_idx.split(1024)])
        val_accuracy = (logits.argmax(1) == labels[val_idx]).float().mean().item()
    meta = {"val_accuracy": val_accuracy, "epochs": epochs, "num_train": len(train_idx), "num_val": n_val,
            "num_classes": num_classes, "train_seconds": round(time.perf_counter() - start, 2)}
    return classifier.eval(), meta


@register_feature_extractor("domain")
def domain_feature_extractor(dataset: str, train_images: Tensor, train_labels: Tensor, *,
                             cache_dir: str | Path | None = None, epochs: int = 3, min_steps: int = 1000,
                             batch_size: int = 128, val_fraction: float = 0.1, seed: int = 0,
                             augment: str = "none", normalize: bool = True) -> DomainFeatureExtractor:
    """A `DomainClassifier` trained once on (train_images, train_labels) and cached by (dataset, checksum).

    The checksum covers the data and the training recipe, so a change of either trains a new network.
    The recipe's default, max-normalised inputs (``normalize``, see ``MaxNormalize``) and no augmentation, was
    chosen with ``python -m benchmark.perf.extractor_check`` (results/extractor_check_mnist.md): of the three
    recipes it alone scores a dimmed but intact digit as intact, and weighs blur against noise and missing
    classes; ``augment="intensity"`` trains on randomly dimmed digits instead, which did not make the
    features brightness-invariant.
    """
    if augment not in AUGMENTATIONS:
        raise UsageError(f"unknown domain extractor augmentation {augment!r}; choose one of {AUGMENTATIONS}")
    recipe = {"arch": "conv32-pool-conv64-pool-maxpool4-fc128/v1", "epochs": epochs, "min_steps": min_steps,
              "batch_size": batch_size, "val_fraction": val_fraction, "seed": seed, "augment": augment}
    if normalize:  # only when set: the cache keys of the other recipes stay as they were
        recipe["normalize"] = True
    checksum = tensors_checksum(train_images, train_labels)
    key = hashlib.sha256(f"{checksum}|{json.dumps(recipe, sort_keys=True)}".encode()).hexdigest()[:16]
    path = fid_cache_dir(cache_dir) / f"domain-{dataset}-{key}.pt"
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        meta = saved["meta"]
        classifier = DomainClassifier(meta["in_channels"], meta["num_classes"], normalize=meta.get("normalize", False))
        classifier.load_state_dict(saved["state_dict"])
    else:
        classifier, meta = _train_domain_classifier(
            train_images.float().cpu(), train_labels.long().cpu(), epochs=epochs, min_steps=min_steps,
            batch_size=batch_size, val_fraction=val_fraction, seed=seed, augment=augment, normalize=normalize)
        meta = {"dataset": dataset, "data_checksum": checksum, "in_channels": train_images.shape[1],
                "image_size": list(train_images.shape[2:]), **recipe, **meta, "torch": str(torch.__version__)}
        atomic_save({"state_dict": classifier.state_dict(), "meta": meta}, path)
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return DomainFeatureExtractor(classifier, tag=f"domain-{dataset}-{key}", meta=meta)
