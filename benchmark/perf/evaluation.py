"""Seconds per metric of a full evaluation of one trained MNIST model, and the evaluation / training ratio.

    python -m benchmark.perf.evaluation --data ../shared/data/mnist.pkl.gz --epochs 1 --variant vae

Trains the headline study's model for ``--epochs`` (timed), then times each part of the evaluation on the
10,000 test images: ELBO, the ex-post posterior fit (deterministic variants), IWAE at K, FID of prior
samples with the domain extractor (cached after the first call), and the Gaussianity battery.
"""

from __future__ import annotations

import argparse
import resource
import time

import lightning as L
import torch

from benchmark.data import LatentDataModule
from benchmark.evaluation import ExPostPosterior, is_deterministic
from benchmark.metrics.fid import FrechetDistanceToReference, build_feature_extractor, reference_statistics
from benchmark.metrics.gaussianity import gaussianity
from benchmark.metrics.likelihood import elbo_terms, index_noise, iw_log_likelihood
from benchmark.variants import VARIANTS


class Clock:
    def __init__(self, device):
        self.device, self.rows = device, []

    def __call__(self, name, fn):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.rows.append((name, time.perf_counter() - start))
        print(f"  {name:28s} {self.rows[-1][1]:8.2f} s", flush=True)
        return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None)
    p.add_argument("--variant", default="vae")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--iw-samples", type=int, default=1000)
    p.add_argument("--fid-samples", type=int, default=10_000)
    p.add_argument("--max-codes", type=int, default=10_000)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clock = Clock(device)
    L.seed_everything(0)
    data = LatentDataModule("mnist", path=args.data, binarize="dynamic")
    model = VARIANTS[args.variant](data_shape=data.shape, latent_dim=16, hidden=(500, 500))
    trainer = L.Trainer(accelerator="auto", devices=1, max_epochs=args.epochs, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    clock("train", lambda: trainer.fit(model, datamodule=data))
    train_s = clock.rows[-1][1]
    model = model.to(device).eval()
    x_test = data.splits["test"].x.to(device)
    index = torch.arange(len(x_test))
    q = model.posterior
    if is_deterministic(model, x_test[:1]):
        expost = ExPostPosterior(model)
        fit = L.Trainer(accelerator="auto", devices=1, max_epochs=5, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
        clock("ex-post posterior (5 epochs)", lambda: fit.fit(expost, datamodule=data))
        q = expost.to(device).eval()

    @torch.no_grad()
    def over_test(fn):
        return [fn(x_test[i: i + 1000], index[i: i + 1000]) for i in range(0, len(x_test), 1000)]

    d = model.hparams.latent_dim
    clock("elbo", lambda: over_test(lambda x, i: elbo_terms(x, q(x), model.decode, model.prior(x, x.shape[:1]),
                                                            index_noise(i, (d,), 0))))
    clock(f"nll_iw (K={args.iw_samples})", lambda: over_test(lambda x, i: iw_log_likelihood(
        x, q(x), model.decode, model.prior(x, x.shape[:1]), args.iw_samples,
        eps=index_noise(i, (args.iw_samples, d), 1))))
    x_train, y_train = data.grey["train"]
    extractor = clock("fid extractor (cached?)", lambda: build_feature_extractor(
        "domain", dataset="mnist", train_images=x_train, train_labels=y_train).to(device))
    ref = clock("fid reference (cached?)", lambda: reference_statistics("mnist", data.grey["test"][0], extractor))

    @torch.no_grad()
    def fid():
        metric = FrechetDistanceToReference(extractor, ref).to(device)
        for _ in range(0, args.fid_samples, 1000):
            metric.update(model.sample(1000))
        return float(metric.compute())

    clock(f"fid_prior ({args.fid_samples} samples)", fid)
    with torch.no_grad():
        codes = torch.cat([model.posterior(x_test[i: i + 1000]).mean for i in range(0, len(x_test), 1000)])
    clock(f"gaussianity ({args.max_codes} codes)", lambda: gaussianity(codes[: args.max_codes].cpu()))
    eval_s = sum(t for name, t in clock.rows if name != "train")
    print(f"\nevaluation {eval_s:.1f} s / training {train_s:.1f} s ({args.epochs} epochs) = {eval_s / train_s:.2f}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
