"""Training throughput of the suite against a plain PyTorch loop over the same tensors (and pythae when
installed), side by side, interleaved rounds, medians.

    python -m benchmark.perf.throughput --data ../shared/data/mnist.pkl.gz --epochs 3 --rounds 3

Prints images/s per (model, loop) and the ratios suite / plain and suite / pythae, and the median of
each round's own suite / plain (paired: drift between rounds cancels). The plain loop is the
limit for the model on the hardware: the same modules, the same loss, batches by one indexing operation,
no framework. Timings exclude the first epoch of each fit (warm-up, lazy initialisation, compilation).
``--compile`` (torch.compile of encoder and decoder) and ``--precision bf16-mixed`` apply to the suite and the
plain loop; pythae runs as it ships (eager, float32).
"""

from __future__ import annotations

import argparse
import collections
import resource
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch

from benchmark.callbacks import ImageCount
from benchmark.data import LatentDataModule
from benchmark.runner import run_callbacks
from benchmark.variants import VARIANTS

MODELS = {  # name -> (variant, network, hidden)
    "vae-mlp": ("vae", "mlp", (500, 500)),
    "ae-mlp": ("ae", "mlp", (500, 500)),
    "vae-conv": ("vae", "conv", (128, 256, 512, 1024)),
    "ae-conv": ("ae", "conv", (128, 256, 512, 1024)),
    "ae-tiny": ("ae", "mlp", (8,)),  # a network too small to matter: what is left is the loop's own cost
}


def make_model(name: str, shape, compile: bool = False) -> L.LightningModule:
    variant, network, hidden = MODELS[name]
    torch.manual_seed(0)
    return VARIANTS[variant](data_shape=shape, latent_dim=20 if network == "mlp" else 16, network=network,
                             hidden=hidden, likelihood="bernoulli", compile=compile)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_loop(name, x, epochs, batch_size, device, compile=False, precision="32-true") -> float:
    """The limit: the suite's own modules and loss in a bare loop; returns images/s after epoch 1."""
    model = make_model(name, tuple(x.shape[1:]), compile).to(device)
    opt = model.configure_optimizers()
    n = len(x) // batch_size * batch_size
    times = []
    for _ in range(epochs):
        _sync(device)
        start = time.perf_counter()
        for idx in torch.randperm(len(x), device=device)[:n].split(batch_size):
            xb = torch.bernoulli(x[idx])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
                loss = model.objective(xb)[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return n / statistics.median(times[1:])


class _EpochTimer(L.Callback):
    def __init__(self):
        self.times, self.start = [], None

    def on_train_epoch_start(self, trainer, pl_module):
        _sync(pl_module.device)
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        _sync(pl_module.device)
        self.times.append(time.perf_counter() - self.start)


def _fit(model, data: LatentDataModule, device, epochs, callbacks=(), **kwargs) -> L.Trainer:
    """Train as a run does, with a run's callbacks (checkpoint, generator state, divergence check, image
    count), without validation, logger or progress bar; the checkpoints go to a scratch folder."""
    with tempfile.TemporaryDirectory() as scratch:
        trainer = L.Trainer(accelerator=device.type, devices=1, max_epochs=epochs, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, callbacks=[*callbacks, *run_callbacks(Path(scratch), ImageCount())],
                            **kwargs)
        trainer.fit(model, datamodule=data)
    return trainer


def _images_per_s(model, data: LatentDataModule, device, epochs, precision) -> float:
    """Fit ``model`` as a run does and return its training images/s, the median of the epochs after the
    first. The epoch timer stops before the epoch's checkpoint is written (Lightning runs checkpoint
    callbacks last)."""
    timer = _EpochTimer()
    _fit(model, data, device, epochs, callbacks=[timer], precision=precision)
    n = len(data.splits["train"]) // data.hparams.batch_size * data.hparams.batch_size
    return n / statistics.median(timer.times[1:])


def suite_loop(name, data: LatentDataModule, epochs, device, compile=False, precision="32-true") -> float:
    """The suite as users run it: Lightning Trainer, the shared DataModule and a run's callbacks."""
    return _images_per_s(make_model(name, data.shape, compile), data, device, epochs, precision)


def k_step_loop(name, data: LatentDataModule, epochs, device, k: int, compile=False, precision="32-true") -> float:
    """A design option measured, not a mode of the suite: the suite's module and Trainer, but each
    ``training_step`` takes k batches at once (one indexing op) and makes k optimiser steps of one batch each
    by manual optimisation, so Lightning's per-step loop is paid once for k steps. The same images, batch size
    and number of optimiser steps as the suite; it would cost the Trainer's gradient clipping and accumulation
    flags, and ``limit_train_batches`` would count k-batches."""
    model = make_model(name, data.shape, compile)
    model.automatic_optimization = False

    def training_step(batch, batch_idx):
        optimizer, total = model.optimizers(), 0
        for x in batch[0].chunk(k):
            loss = model._common_step((x,), "train")  # the suite's step: objective and epoch-mean terms
            optimizer.zero_grad()
            model.manual_backward(loss)
            optimizer.step()
            total = total + loss.detach()
        return {"loss": total / k}

    model.training_step = training_step
    k_batches = LatentDataModule("mnist", path=data.hparams.path, binarize="dynamic",
                                 batch_size=k * data.hparams.batch_size)
    k_batches.splits, k_batches.grey = data.splits, data.grey  # the same tensors, already set up
    return _images_per_s(model, k_batches, device, epochs, precision)


def pythae_loop(name, x, epochs, batch_size, device) -> float | None:
    """pythae's trainer on the same MLP (optional extra: skipped with a message when pythae is absent)."""
    try:
        import pythae  # noqa: F401
    except ImportError:
        print("  pythae: not installed, skipped (pip install 'latent-bench[pythae]' to compare)")
        return None
    from benchmark.perf.pythae_compare import pythae_throughput

    return pythae_throughput(name, x, epochs, batch_size, device)


def host_syncs(name, data: LatentDataModule, device) -> None:
    """Where one epoch of the suite's training waits on the GPU: torch's sync debug mode reports every
    synchronising call, grouped here by the Python line that made it. A line reported about once a step is
    a per-step synchronisation; the epoch's end has a few by design (the divergence check, the logged means)."""
    if device.type != "cuda":
        print(f"host syncs of {name}: needs a CUDA device, skipped")
        return
    model = make_model(name, data.shape)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer = _fit(model, data, device, 1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = collections.Counter(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    steps = trainer.global_step
    print(f"host syncs of {name}: {sum(where.values())} in {steps} training steps")
    for line, n in where.most_common(10):
        print(f"  {n:7d} ({n / steps:5.2f} a step)  {line}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="mnist.pkl.gz or torchvision folder (default: download)")
    p.add_argument("--models", default="vae-mlp,ae-mlp,vae-conv,ae-conv")
    p.add_argument("--epochs", type=int, default=3, help="epochs per fit; the first is not timed")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--train-size", type=int, default=None, help="use only the first N training images")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--compile", action="store_true", help="torch.compile encoder and decoder, in both loops")
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    p.add_argument("--steps-per-call", type=int, default=1, metavar="K",
                   help="also time K optimiser steps in each training_step (a design option, see k_step_loop)")
    p.add_argument("--host-syncs", action="store_true",
                   help="instead of timing, list where a training epoch synchronises with the GPU")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; lightning {L.__version__}; compile {args.compile}; "
          f"precision {args.precision}")
    data = LatentDataModule("mnist", path=args.data, binarize="dynamic", batch_size=args.batch_size)
    data.setup("fit")
    if args.train_size:
        data.splits["train"].x = data.splits["train"].x[: args.train_size]
        data.splits["train"].y = data.splits["train"].y[: args.train_size]
    data.splits["train"].x = data.splits["train"].x.to(device)  # resident on the device, as in a run
    data.splits["train"].y = data.splits["train"].y.to(device)
    x = data.splits["train"].x
    if args.host_syncs:
        for name in args.models.split(","):
            host_syncs(name, data, device)
        return
    results = {}
    for name in args.models.split(","):
        for r in range(args.rounds):
            options = {"compile": args.compile, "precision": args.precision}
            k = args.steps_per_call
            loops = [("plain", lambda: plain_loop(name, x, args.epochs, args.batch_size, device, **options)),
                     ("suite", lambda: suite_loop(name, data, args.epochs, device, **options))]
            if k > 1:
                loops.append((f"k{k}", lambda: k_step_loop(name, data, args.epochs, device, k, **options)))
            loops.append(("pythae", lambda: pythae_loop(name, x, args.epochs, args.batch_size, device)))
            for loop, fn in loops:
                if loop == "pythae" and (r > 0 and not results.get((name, "pythae"))):
                    continue
                value = fn()
                if value is not None:
                    results.setdefault((name, loop), []).append(value)
                    print(f"  {name:9s} round {r} {loop:6s} {value:10.0f} img/s", flush=True)
    print("\nmodel      plain img/s  suite img/s  pythae img/s  suite/plain  suite/pythae  suite-plain ms/step"
          "  paired suite/plain")
    for name in args.models.split(","):
        med = {loop: statistics.median(results[(name, loop)]) for loop in ("plain", "suite", "pythae")
               if results.get((name, loop))}
        py = med.get("pythae")
        extra_ms = 1e3 * args.batch_size * (1 / med["suite"] - 1 / med["plain"])  # the suite's cost per step
        # each round's own ratio, then the median: the machine's drift between rounds cancels out
        rounds = zip(results[(name, "suite")], results[(name, "plain")])
        paired = statistics.median(suite / plain for suite, plain in rounds)
        print(f"{name:9s} {med['plain']:12.0f} {med['suite']:12.0f} {py or float('nan'):13.0f} "
              f"{med['suite'] / med['plain']:12.3f} {med['suite'] / py if py else float('nan'):13.3f} "
              f"{extra_ms:20.2f} {paired:19.3f}")
        if args.steps_per_call > 1:
            k_runs = results[(name, f"k{args.steps_per_call}")]
            k_paired = statistics.median(ks / plain for ks, plain in zip(k_runs, results[(name, "plain")]))
            print(f"{'':9s} {args.steps_per_call} optimiser steps a training_step: "
                  f"{statistics.median(k_runs):.0f} img/s, paired / plain {k_paired:.3f}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = f", GPU peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if device.type == "cuda" else ""
    print(f"peak RSS {rss:.0f} MiB{gpu}")


if __name__ == "__main__":
    main()
