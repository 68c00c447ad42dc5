"""Wall time of one study of identical runs done by 1, 2, ... side-by-side workers, and the speed-up.

    python -m benchmark.perf.scaling --data ../shared/data/mnist.pkl.gz --settings 1x1,1x2,2x1  # workers x threads
    python -m benchmark.perf.scaling --data mnist.pkl.gz --devices auto --per-device 1,2,4,8      # runs per GPU

Each setting runs the same N runs (one variant, seeds 0..N-1, short training, a light evaluation) as
``latent-bench run`` does, process start-up included, into its own scratch folder. Prints the wall time,
the speed-up over the first setting and the peak RSS of one run process. On a CPU, ``1x1`` against ``2x1``
is how well side-by-side workers scale (each on a core of its own); ``1x2`` against ``2x1`` is what a user
with two cores gains from ``--devices 2`` over one run at a time on both cores.
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
from benchmark.study import parse_devices

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


def run_study(args, devices: str, per_device: int, threads: int | None = None) -> tuple[float, float]:
    """Wall seconds of the study, and the seconds its runs spent training and evaluating (summed)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cmd = [sys.executable, "-m", "benchmark.cli", "run", str(study_yaml(tmp, args)), "--devices", devices,
               "--per-device", str(per_device), "--wandb", "disabled", "--results", str(tmp / "results"),
               "--work-dir", str(tmp / "runs")]
        if args.data:
            cmd += ["--set", f"data.path={Path(args.data).resolve()}"]
        if args.gpu:
            cmd += ["--set", "trainer.accelerator=gpu"]
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
        wall = time.perf_counter() - start
        records = [r for r in load_records(tmp / "results") if r["status"] == "finished"]
        if len(records) != args.runs:
            raise RuntimeError(f"{len(records)} of {args.runs} runs finished; the timing would be meaningless")
        return wall, sum(r["timings"]["train_s"] + r["timings"]["evaluate_s"] for r in records)


def _workers_threads(setting: str, cores: int) -> tuple[str, int, int]:
    """'2x1' -> --devices 2 at 1 thread each (a worker count shares the cores: the threads must agree)."""
    workers, _, threads = setting.partition("x")
    if not (workers.isdigit() and threads.isdigit()) or int(workers) < 1 or int(threads) < 1:
        raise SystemExit(f"--settings {setting!r}: give WORKERSxTHREADS, e.g. 1x2 or 2x1")
    if int(workers) > 1 and int(threads) != max(1, cores // int(workers)):
        raise SystemExit(f"--settings {setting}: {workers} workers run at {max(1, cores // int(workers))} "
                         f"thread(s) each on {cores} cores")
    return workers, 1, int(threads)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="mnist.pkl.gz or torchvision folder (default: download)")
    p.add_argument("--dataset", default="mnist_binary", help="a data config key")
    p.add_argument("--variant", default="vae")
    p.add_argument("--runs", type=int, default=4, help="identical runs in the study (seeds 0..N-1)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--settings", default=None,
                   help="CPU: WORKERSxTHREADS to compare (default 1x1,1xN,Nx1 for N cores); more than one worker "
                        "shares the cores equally, as latent-bench run --devices does")
    p.add_argument("--devices", default=None, help="GPU: the --devices of every setting (e.g. auto)")
    p.add_argument("--per-device", default="1", help="GPU: runs per device to compare, e.g. 1,2,4,8")
    args = p.parse_args(argv)
    import torch

    args.gpu = args.devices is not None and torch.cuda.is_available()
    if args.devices is not None:
        settings = [(args.devices, int(k), None) for k in args.per_device.split(",")]
        device = torch.cuda.get_device_name() if args.gpu else "cpu"
    else:
        n = os.cpu_count() or 1
        settings = [_workers_threads(s, n) for s in (args.settings or f"1x1,1x{n},{n}x1").split(",")]
        device = f"cpu ({n} cores)"
    print(f"device: {device}; {args.runs} runs of {args.variant} on {args.dataset}, {args.epochs} epochs each")
    print("run s: training + evaluation of one run, mean; start-up s: wall time outside the runs' own work")
    print(f"{'devices':>8s} {'per-device':>10s} {'threads':>8s} {'wall s':>8s} {'run s':>7s} {'start-up s':>10s} "
          f"{'speed-up':>9s}")
    base = None
    for devices, k, threads in settings:
        wall, busy = run_study(args, devices, k, threads)
        at_once = k * len(parse_devices(devices))
        base = base or wall
        other = wall - busy / at_once
        print(f"{devices:>8s} {k:10d} {threads or '-':>8} {wall:8.1f} {busy / args.runs:7.1f} {other:10.1f} "
              f"{base / wall:9.2f}", flush=True)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak RSS of one run process {rss:.0f} MiB")


if __name__ == "__main__":
    main()
