"""Wall time of one study of identical runs done by 1, 2, ... side-by-side workers, and the speed-up.

    python -m benchmark.perf.scaling --data ../shared/data/mnist.pkl.gz --workers 1,2          # CPU cores
    python -m benchmark.perf.scaling --data mnist.pkl.gz --devices auto --per-device 1,2,4,8   # runs per GPU

Each setting runs the same N runs (one variant, seeds 0..N-1, short training, a light evaluation) as
``latent-bench run`` does, process start-up included, into its own scratch folder. Prints the wall time,
the speed-up over the first setting and the peak RSS of one run process.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmark.records import load_records

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def study_yaml(folder: Path, args) -> Path:
    study = {"name": "scaling", "configs": str(CONFIGS), "trainer": "cpu", "datasets": [args.dataset],
             "variants": [args.variant], "seeds": list(range(args.runs)),
             "overrides": {"trainer.max_epochs": args.epochs, "trainer.enable_progress_bar": False,
                           "model.init_args.latent_dim": 16, "model.init_args.hidden": [500, 500]},
             "evaluation": {"iw_samples": 10, "fid_samples": 0, "max_codes": 1000, "expost_epochs": 1}}
    path = folder / "scaling.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def run_study(args, devices: str, per_device: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cmd = [sys.executable, "-m", "benchmark.cli", "run", str(study_yaml(tmp, args)), "--devices", devices,
               "--per-device", str(per_device), "--wandb", "disabled", "--results", str(tmp / "results"),
               "--work-dir", str(tmp / "runs")]
        if args.data:
            cmd += ["--set", f"data.path={Path(args.data).resolve()}"]
        if args.gpu:
            cmd += ["--set", "trainer.accelerator=gpu"]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        finished = sum(r["status"] == "finished" for r in load_records(tmp / "results"))
        if finished != args.runs:
            raise RuntimeError(f"{finished} of {args.runs} runs finished; the timing would be meaningless")
        return wall


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="mnist.pkl.gz or torchvision folder (default: download)")
    p.add_argument("--dataset", default="mnist_binary", help="a data config key")
    p.add_argument("--variant", default="vae")
    p.add_argument("--runs", type=int, default=4, help="identical runs in the study (seeds 0..N-1)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", default="1,2", help="CPU: side-by-side worker counts to compare")
    p.add_argument("--devices", default=None, help="GPU: the --devices of every setting (e.g. auto)")
    p.add_argument("--per-device", default="1", help="GPU: runs per device to compare, e.g. 1,2,4,8")
    args = p.parse_args(argv)
    import torch

    args.gpu = args.devices is not None and torch.cuda.is_available()
    if args.devices is not None:
        settings = [(args.devices, int(k)) for k in args.per_device.split(",")]
        device = torch.cuda.get_device_name() if args.gpu else "cpu"
    else:
        settings = [(w, 1) for w in args.workers.split(",")]
        device = f"cpu ({os.cpu_count()} cores)"
    print(f"device: {device}; {args.runs} runs of {args.variant} on {args.dataset}, {args.epochs} epochs each")
    print(f"{'devices':>8s} {'per-device':>10s} {'wall s':>8s} {'speed-up':>9s}")
    base = None
    for devices, k in settings:
        wall = run_study(args, devices, k)
        base = base or wall
        print(f"{devices:>8s} {k:10d} {wall:8.1f} {base / wall:9.2f}", flush=True)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak RSS of one run process {rss:.0f} MiB")


if __name__ == "__main__":
    main()
