"""Pack MNIST and the Inception weights into small compressed files in ``.device/`` (46 MiB: 9 MiB of MNIST,
38 MiB of Inception), so that a GPU machine without internet can run the published-table studies:

    python -m benchmark.perf.device_pack --mnist ../shared/data/mnist.pkl.gz \
        --inception ../shared/models/inception-v3-2015-12-05.torchscript.pt [--out .device] [--check 64]

- MNIST as torchvision's raw files (``MNIST/raw/*-ubyte``, uint8, xz-compressed: ~8 MiB, against the
  pickle's 17 MiB of float32), which ``data.path`` reads as a torchvision folder once unpacked. The check
  loads both copies through the suite's MNIST loader and requires the same images, labels and order.
- Inception-v3 (2015-12-05, TorchScript, 87 MB in float32) with its weights rounded to float16 (44 MB, then
  xz), restored to float32 there. The check measures what the rounding does: on ``--check`` real MNIST
  test images, the largest relative change of a pool feature, and the FID between two halves of them with
  each copy.

On the GPU machine ``benchmark/perf/gpu_repro.sh`` unpacks both with

    python3 -m benchmark.perf.device_pack --unpack .device --to /tmp/device

(MNIST into /tmp/device/MNIST/raw, the float32 network as /tmp/device/inception.pt). Writes nothing outside
``--out`` (or ``--to``).
"""

from __future__ import annotations

import argparse
import lzma
import struct
import sys
import time
from pathlib import Path

import torch

RAW = {"train-images-idx3-ubyte": 0x803, "train-labels-idx1-ubyte": 0x801,
       "t10k-images-idx3-ubyte": 0x803, "t10k-labels-idx1-ubyte": 0x801}


def idx_bytes(a: torch.Tensor, magic: int) -> bytes:
    """The IDX file of a uint8 tensor: a big-endian magic number, the dimensions, then the data."""
    return struct.pack(">I", magic) + struct.pack(f">{a.ndim}I", *a.shape) + a.contiguous().numpy().tobytes()


def pack_mnist(pkl: Path, out: Path) -> list[Path]:
    from benchmark.data import load_mnist

    x, y, x_test, y_test = load_mnist(out, pkl)  # images (N, 1, 28, 28) in [0, 1], exactly k / 255
    images = {"train": (x * 255).round().to(torch.uint8)[:, 0], "t10k": (x_test * 255).round().to(torch.uint8)[:, 0]}
    labels = {"train": y.to(torch.uint8), "t10k": y_test.to(torch.uint8)}
    written = []
    for name, magic in RAW.items():
        split, kind = name.split("-")[0], name.split("-")[1]
        data = images[split] if kind == "images" else labels[split]
        path = out / "MNIST" / "raw" / f"{name}.xz"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(lzma.compress(idx_bytes(data, magic), preset=9))
        written.append(path)
    return written


def unpacked_mnist(out: Path, folder: Path) -> Path:
    """The xz files of ``out`` unpacked into ``folder``/MNIST/raw (what gpu_repro.sh does with ``xz -d``)."""
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in RAW:
        (raw / name).write_bytes(lzma.decompress((out / "MNIST" / "raw" / f"{name}.xz").read_bytes()))
    return folder


def check_mnist(pkl: Path, out: Path, tmp: Path):
    from benchmark.data import load_mnist

    a = load_mnist(tmp, pkl)
    b = load_mnist(tmp, unpacked_mnist(out, tmp / "unpacked"))
    for name, u, v in zip(("train images", "train labels", "test images", "test labels"), a, b):
        if u.shape != v.shape or not torch.equal(u, v):
            raise SystemExit(f"device_pack: the packed MNIST differs from {pkl} in its {name}")
    print(f"MNIST: the packed files give the same {len(a[0])} + {len(a[2])} images and labels, in the same order")


def pack_inception(path: Path, out: Path) -> Path:
    net = torch.jit.load(str(path), map_location="cpu").half()
    half = out / "inception-fp16.pt"
    torch.jit.save(net, str(half))
    packed = half.with_suffix(".pt.xz")
    packed.write_bytes(lzma.compress(half.read_bytes(), preset=6))
    half.unlink()
    return packed


def restored_inception(packed: Path, to: Path) -> Path:
    """The float16 copy back in float32 (what gpu_repro.sh runs before the study)."""
    half = to.with_suffix(".fp16.pt")
    half.write_bytes(lzma.decompress(packed.read_bytes()))
    net = torch.jit.load(str(half), map_location="cpu").float()
    torch.jit.save(net, str(to))
    half.unlink()
    return to


def check_inception(path: Path, packed: Path, pkl: Path, n: int, tmp: Path):
    from benchmark.data import load_mnist
    from benchmark.metrics.extractors import build_feature_extractor
    from benchmark.metrics.fid import frechet_distance, images_to_features

    x_test = load_mnist(tmp, pkl)[2][:n]
    start = time.perf_counter()
    feats, fids = [], []
    for weights in (path, restored_inception(packed, tmp / "inception-restored.pt")):
        extractor = build_feature_extractor("inception", weights_path=weights)
        with torch.no_grad():
            feats.append(images_to_features(x_test, extractor, batch_size=32).double())
            fids.append(frechet_distance(x_test[n // 2:], x_test[: n // 2], extractor, batch_size=32))
    full, rounded = feats
    rel = ((rounded - full).abs().max(dim=1).values / full.abs().max(dim=1).values).max().item()
    print(f"Inception float16 weights: on {n} MNIST test images the largest change of a feature is {rel:.2e} "
          f"of the image's largest feature; FID between their halves {fids[0]:.4f} (float32) vs {fids[1]:.4f} "
          f"(rounded), a difference of {abs(fids[1] - fids[0]):.2e} ({time.perf_counter() - start:.0f} s)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmark.perf.device_pack", description=__doc__.split(":\n")[0] + ".")
    p.add_argument("--mnist", type=Path, help="the path of mnist.pkl.gz (required to pack)")
    p.add_argument("--inception", type=Path,
                   help="the path of inception-v3-2015-12-05.torchscript.pt (required to pack)")
    p.add_argument("--out", type=Path, default=Path(".device"))
    p.add_argument("--check", type=int, default=64, help="real images for the Inception check (0: none)")
    p.add_argument("--unpack", type=Path, help="a packed folder to unpack (on the GPU machine) into --to")
    p.add_argument("--to", type=Path, default=Path("/tmp/device"))
    args = p.parse_args(argv)
    if args.unpack:
        if not (args.unpack / "inception-fp16.pt.xz").is_file():
            p.error(f"{args.unpack} holds no packed files; run device_pack --mnist ... --inception ... first")
        args.to.mkdir(parents=True, exist_ok=True)
        unpacked_mnist(args.unpack, args.to)
        restored_inception(args.unpack / "inception-fp16.pt.xz", args.to / "inception.pt")
        print(f"device_pack: unpacked {args.unpack} into {args.to}")
        return 0
    for name, f, what in (("--mnist", args.mnist, "mnist.pkl.gz"),
                          ("--inception", args.inception, "inception-v3-2015-12-05.torchscript.pt")):
        if f is None:
            p.error(f"{name} is required to pack (the path of {what}), unless --unpack is given")
        if not f.is_file():
            p.error(f"{name} {f}: no such file")
    args.out.mkdir(parents=True, exist_ok=True)
    written = [*pack_mnist(args.mnist, args.out), pack_inception(args.inception, args.out)]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        check_mnist(args.mnist, args.out, Path(tmp))
        if args.check:
            check_inception(args.inception, written[-1], args.mnist, args.check, Path(tmp))
    total = sum(f.stat().st_size for f in written)
    print(f"device_pack: {len(written)} files, {total / 2**20:.1f} MiB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
