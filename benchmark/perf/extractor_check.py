"""Does the domain feature space rank corrupted real images the way a person would?

FID, KID, precision and recall of real images under graded corruptions against a clean reference, in the
domain extractor's features (``benchmark.metrics.fid``, ``benchmark.metrics.sample_quality``):

    python -m benchmark.perf.extractor_check --data ../shared/data/mnist.pkl.gz

The reference is one half of the test split; the compared sets hold as many images, drawn without
replacement from the other half and the validation split (neither seen by the extractor's training):
"clean" is such a draw, the pixel corruptions (Gaussian noise, salt noise, Gaussian blur, dimming) are
applied to it, and "drop k" draws from the images of 10 - k classes only. A trustworthy space orders each
family monotonically in its strength (FID and KID up, precision and recall down; recall down as classes go).
Writes a markdown table per extractor recipe and prints which metric is monotone in which family. On a
shared CPU, ``OMP_NUM_THREADS=1`` avoids threads waiting on each other (a table: minutes either way).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from benchmark.data import LatentDataModule
from benchmark.metrics.extractors import RECIPES, build_feature_extractor, gaussian_blur
from benchmark.metrics.fid import frechet_distance, images_to_features, images_to_reference_statistics
from benchmark.metrics.sample_quality import sample_quality_from_features

METRICS = ("fid", "kid", "precision", "recall")
WORSE_IS_HIGHER = {"fid": True, "kid": True, "precision": False, "recall": False}
FAMILIES = {  # name -> (strengths, corruption(x, strength, generator), label)
    "noise": ((0.05, 0.1, 0.2, 0.3), lambda x, s, g: (x + s * torch.randn(x.shape, generator=g)).clamp(0, 1),
              "Gaussian noise sigma {}"),
    "salt": ((0.01, 0.05, 0.10), lambda x, s, g: torch.where(torch.rand(x.shape, generator=g) < s, 1.0, x),
             "salt {:.0%} of pixels"),
    "blur": ((0.5, 1.0, 1.5), lambda x, s, g: gaussian_blur(x, s), "Gaussian blur sigma {}"),
    "dim": ((0.9, 0.7, 0.5), lambda x, s, g: x * s, "dimmed to {:.0%}"),
}
DROPPED = (1, 3, 5)


def corrupted_sets(pool: tuple[Tensor, Tensor], n: int, seed: int) -> list[tuple[str, str, float, Tensor]]:
    """(family, label, strength, images) rows: clean, each pixel corruption, then dropped classes."""
    g = torch.Generator().manual_seed(seed)
    x, y = pool
    clean = x[torch.randperm(len(x), generator=g)[:n]]
    rows = [("clean", "clean (another half of the real data)", 0.0, clean)]
    for family, (strengths, corrupt, label) in FAMILIES.items():
        rows += [(family, label.format(s), s, corrupt(clean, s, g)) for s in strengths]
    order = torch.randperm(10, generator=g)
    for k in DROPPED:
        kept = torch.isin(y, order[k:]).nonzero().squeeze(1)
        if len(kept) < n:
            raise ValueError(f"only {len(kept)} images remain without {k} classes, fewer than {n}")
        rows.append(("drop", f"{k} class(es) removed", float(k), x[kept[torch.randperm(len(kept), generator=g)[:n]]]))
    return rows


def measure(extractor, reference: Tensor, rows, seed: int) -> list[dict]:
    stats = images_to_reference_statistics(reference, extractor)
    real = images_to_features(reference, extractor)
    out = []
    for family, label, strength, images in rows:
        fake = images_to_features(images, extractor)
        values = {"fid": frechet_distance(images, stats, extractor),
                  **sample_quality_from_features(fake, real, seed=seed)}
        out.append({"family": family, "label": label, "strength": strength, **values})
    return out


def monotone(results: list[dict]) -> dict[str, dict[str, bool]]:
    """For each family and metric: does it get worse (never better) from clean through each strength?"""
    clean = next(r for r in results if r["family"] == "clean")
    verdict = {}
    for family in [*FAMILIES, "drop"]:
        chain = [clean, *[r for r in results if r["family"] == family]]
        verdict[family] = {}
        for m in METRICS:
            values = [r[m] for r in chain]
            sign = 1 if WORSE_IS_HIGHER[m] else -1
            verdict[family][m] = all(sign * (b - a) >= 0 for a, b in zip(values, values[1:]))
    return verdict


def markdown(recipe: str, meta: dict, results: list[dict], verdict: dict, seconds: float) -> list[str]:
    lines = [f"### recipe = {recipe}", "",
             f"Validation accuracy {meta['val_accuracy']:.4f}; trained in {meta.get('train_seconds', '?')} s "
             f"(cached network tag in the record's protocol); this table took {seconds:.0f} s.", "",
             "| set | FID ↓ | KID ↓ | precision ↑ | recall ↑ |", "|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['fid']:.2f} | {r['kid']:.4f} | {r['precision']:.3f} | {r['recall']:.3f} |"
              for r in results]
    lines += ["", "Monotone in the strength (worse never better):", "",
              "| family | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    lines += [f"| {family} | " + " | ".join("yes" if ok[m] else "**no**" for m in METRICS) + " |"
              for family, ok in verdict.items()]
    return lines + [""]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="mnist.pkl.gz (or a torchvision MNIST folder)")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES,
                        help="domain extractor recipes to compare")
    parser.add_argument("--n", type=int, default=5000, help="images per set (default: half the test split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="extractor cache (default: $LATENT_BENCH_CACHE)")
    parser.add_argument("--out", default="results/extractor_check_mnist.md",
                        help="where the tables are written (the chosen-recipe paragraph is kept if present)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    data = LatentDataModule("mnist", path=args.data)
    data.setup("test")
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (data.grey[s] for s in ("train", "val", "test"))
    order = torch.randperm(len(x_test), generator=torch.Generator().manual_seed(args.seed))
    reference, rest = order[: args.n], order[args.n:]
    pool = torch.cat([x_test[rest], x_val]), torch.cat([y_test[rest], y_val])
    rows = corrupted_sets(pool, args.n, args.seed)

    sections = []
    for recipe in args.recipes:
        extractor = build_feature_extractor("domain", dataset="mnist", train_images=x_train, train_labels=y_train,
                                            cache_dir=args.cache_dir, **RECIPES[recipe])
        start = time.perf_counter()
        results = measure(extractor, x_test[reference], rows, args.seed)
        verdict = monotone(results)
        section = markdown(recipe, extractor.meta, results, verdict, time.perf_counter() - start)
        print("\n".join(section))  # each table as soon as it is measured: a table takes minutes on a busy CPU
        sections += section
        print(f"recipe={recipe} ({extractor.tag}):")
        for family, ok in verdict.items():
            print(f"  {family:6s} " + "  ".join(f"{m}={'monotone' if ok[m] else 'NOT monotone'}" for m in METRICS))

    out = Path(args.out)
    head = ["# Extractor check: MNIST", "",
            f"`python -m benchmark.perf.extractor_check --data {args.data} --n {args.n} --seed {args.seed}`", "",
            f"Reference: {args.n} test images; each set: {args.n} other real images (test half and validation "
            "split), corrupted as named. KID and precision/recall (k = 3) in the features centred on the "
            "reference's and divided by one scale (`sample_quality.standardize`); KID averages 100 subsets of 1000.",
            ""]
    keep = []
    if out.is_file():  # the written verdict on which recipe was chosen survives a rerun of the tables
        text = out.read_text().split("## Choice", 1)
        keep = ["## Choice" + text[1].split("## Tables", 1)[0].rstrip("\n"), ""] if len(text) > 1 else []
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(head + keep + ["## Tables", ""] + sections))
    print(out)


if __name__ == "__main__":
    main()
