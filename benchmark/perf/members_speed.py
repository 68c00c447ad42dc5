"""Training wall time of S runs of one variant as members against the same S runs one after another.

    python -m benchmark.perf.members_speed --variants ae,vae,wae_mmd --members 8 --epochs 5

Each run is the quick study's (digits, dynamically binarised, the digits network; seeds 0..S-1), built as a
study builds it; only ``Trainer.fit`` is timed, the same trainer for both (no logger, no checkpoints, no
progress bar). Prints per variant the separate runs' wall, the members' wall, their ratio and the aggregate
training images per second of each.
"""

from __future__ import annotations

import argparse
import time

import lightning as L

from benchmark.lightning_cli import build_cli
from benchmark.members import Members, rng_state
from benchmark.perf.scaling import CONFIGS


def build(variant: str, seed: int, data: str, accelerator: str):
    args = ["--config", str(CONFIGS / "trainer" / "cpu.yaml"), "--config", str(CONFIGS / "model" / f"{variant}.yaml"),
            "--config", str(CONFIGS / "data" / f"{data}.yaml"), "--seed_everything", str(seed),
            "--data.seed", str(seed), "--trainer.accelerator", accelerator]
    cli = build_cli(args, run=False, save_config_callback=None)
    return cli.model, cli.datamodule, rng_state()


def trainer(epochs: int, accelerator: str) -> L.Trainer:
    return L.Trainer(accelerator=accelerator, devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


def timed_fit(module, epochs: int, accelerator: str, datamodule=None) -> float:
    start = time.perf_counter()
    trainer(epochs, accelerator).fit(module, datamodule=datamodule)
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="ae,vae,wae_mmd")
    p.add_argument("--members", type=int, default=8, help="S, runs of each variant")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--data", default="digits_binary", help="a configs/data YAML")
    p.add_argument("--accelerator", default="cpu")
    args = p.parse_args(argv)
    if args.members < 1 or args.epochs < 1:
        p.error("--members and --epochs must be positive integers")
    print(f"| variant | S | separate s | members s | members / separate | separate img/s | members img/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for variant in args.variants.split(","):
        separate = 0.0
        for seed in range(args.members):
            model, data, _ = build(variant, seed, args.data, args.accelerator)
            separate += timed_fit(model, args.epochs, args.accelerator, data)
        images = args.members * args.epochs * len(data.splits["train"]) // data.hparams.batch_size * data.hparams.batch_size
        members = Members(*zip(*(build(variant, seed, args.data, args.accelerator) for seed in range(args.members))))
        together = timed_fit(members, args.epochs, args.accelerator)
        print(f"| {variant} | {args.members} | {separate:.1f} | {together:.1f} | {together / separate:.2f} | "
              f"{images / separate:,.0f} | {images / together:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
