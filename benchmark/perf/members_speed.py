"""Training wall time of S runs of one variant as members against the same S runs one after another.

    python -m benchmark.perf.members_speed --variants ae,vae,wae_mmd --members 8 --epochs 5
    python -m benchmark.perf.members_speed --study configs/studies/quick.yaml --variants ae,vae --members 4

Each run is the quick study's (digits, dynamically binarised, the digits network; seeds 0..S-1), built as a
study builds it; only ``Trainer.fit`` is timed, the same trainer for both (no logger, no checkpoints, no
progress bar). Prints per variant the separate runs' wall, the members' wall, their ratio, the aggregate
training images per second of each, and how far apart each member ends from its separate run (the largest
parameter difference and the largest difference of the last epoch's training loss, over members): float
rounding on the device, or a member that drew another run's noise. With ``--study``: that study with seeds 0..S-1 run by ``latent-bench run``
with and without ``--members auto`` (evaluation included), the wall of each and the training and evaluation
seconds its records hold.
"""

from __future__ import annotations

import argparse
import time

import lightning as L

from benchmark.lightning_cli import build_cli
from benchmark.members import Members, rng_state
from benchmark.perf.scaling import CONFIGS


def build(variant: str, seed: int, data: str = "digits_binary", *extra: str):
    """One run as a study builds it (the CPU trainer, the variant's and the data's configs, the seed of the run
    and of its split, then ``extra`` arguments), and its generators' state where its fit would start."""
    args = ["--config", str(CONFIGS / "trainer" / "cpu.yaml"), "--config", str(CONFIGS / "model" / f"{variant}.yaml"),
            "--config", str(CONFIGS / "data" / f"{data}.yaml"), "--seed_everything", str(seed),
            "--data.seed", str(seed), *extra]
    cli = build_cli(args, run=False, save_config_callback=None)
    return cli.model, cli.datamodule, rng_state()


def trainer(epochs: int, accelerator: str) -> L.Trainer:
    return L.Trainer(accelerator=accelerator, devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


def timed_fit(module, epochs: int, accelerator: str, datamodule=None) -> tuple[float, L.Trainer]:
    fitting = trainer(epochs, accelerator)
    start = time.perf_counter()
    fitting.fit(module, datamodule=datamodule)
    return time.perf_counter() - start, fitting


def study_walls(args) -> None:
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import yaml

    from benchmark.records import load_records
    from benchmark.study import load_study

    study = {**load_study(args.study), "seeds": list(range(args.members)), "variants": args.variants.split(","),
             "configs": str(CONFIGS)}
    print(f"{args.study} with seeds 0-{args.members - 1}, variants {args.variants}; 2 CPU threads, W&B disabled")
    print("| runs | --members | wall s | train s (records) | evaluate s (records) |\n| --- | --- | --- | --- | --- |")
    walls = {}
    for members in ("1", "auto"):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "study.yaml"
            path.write_text(yaml.safe_dump(study))
            cmd = [sys.executable, "-m", "benchmark.cli", "run", str(path), "--members", members, "--wandb",
                   "disabled", "--results", f"{tmp}/results", "--work-dir", f"{tmp}/runs"]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            walls[members] = time.perf_counter() - start
            records = [r for r in load_records(Path(tmp) / "results") if r["status"] == "finished"]
            # a group's runs share one training: count its seconds once
            train = sum(t for _, t in {(r["variant"], r["timings"]["train_s"]) for r in records})
            print(f"| {len(records)} | {members} | {walls[members]:.0f} | {train:.0f} | "
                  f"{sum(r['timings']['evaluate_s'] for r in records):.0f} |", flush=True)
    print(f"wall with members / without: {walls['auto'] / walls['1']:.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="ae,vae,wae_mmd")
    p.add_argument("--members", type=int, default=8, help="S, runs of each variant")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--data", default="digits_binary", help="a configs/data YAML")
    p.add_argument("--data-path", default=None, help="the data's local file, e.g. mnist.pkl.gz for --data mnist_binary")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--study", default=None, help="a study YAML to run with and without --members auto")
    args = p.parse_args(argv)
    if args.members < 1 or args.epochs < 1:
        p.error("--members and --epochs must be positive integers")
    if args.study:
        return study_walls(args)
    print("| variant | S | separate s | members s | members / separate | separate img/s | members img/s "
          "| max abs param diff | max abs train loss diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    extra = ["--trainer.accelerator", args.accelerator, *(["--data.path", args.data_path] if args.data_path else [])]
    for variant in args.variants.split(","):
        separate, runs = 0.0, []
        for seed in range(args.members):
            model, data, _ = build(variant, seed, args.data, *extra)
            seconds, fitted = timed_fit(model, args.epochs, args.accelerator, data)
            separate += seconds
            runs.append((model, fitted.callback_metrics["train/loss"].item()))
        batch = data.hparams.batch_size
        images = args.members * args.epochs * (len(data.splits["train"]) // batch * batch)  # full batches only
        members = Members(*zip(*(build(variant, seed, args.data, *extra) for seed in range(args.members))))
        together, fitted = timed_fit(members, args.epochs, args.accelerator)
        param_diff = max((p - q).abs().max().item() for (run, _), member in zip(runs, members.members())
                         for p, q in zip(run.parameters(), member.parameters()))
        loss_diff = max(abs(loss - fitted.callback_metrics[f"train/loss/{i}"].item()) for i, (_, loss) in enumerate(runs))
        print(f"| {variant} | {args.members} | {separate:.1f} | {together:.1f} | {together / separate:.2f} | "
              f"{images / separate:,.0f} | {images / together:,.0f} | {param_diff:.1e} | {loss_diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
