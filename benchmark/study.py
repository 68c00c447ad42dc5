"""Studies: datasets x variants x seeds (x overrides), run where the user has compute, resumable.

A study YAML names configs by key::

    name: quick
    trainer: cpu                        # configs/trainer/cpu.yaml
    datasets: [digits]                  # configs/data/<key>.yaml
    variants: [ae, vae, no_info]        # configs/model/<key>.yaml
    seeds: [0, 1]
    overrides: {trainer.max_epochs: 20} # dotted keys, applied to every run
    variant_overrides: {vae: {model.init_args.weight: 0.5}}
    evaluation: {iw_samples: 100, fid_samples: 1000}

``configs`` (default: the folder above the study's own) says where the keyed YAMLs live. A run whose record
is finished is skipped; an interrupted one resumes from its last checkpoint. Runs go one after another in
this process, side by side in worker processes (``--devices``: one per GPU, or N CPU workers), or to a
cluster through submitit (``--executor slurm``; ``submitit-local`` runs the same path on this machine).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import multiprocessing
import multiprocessing.connection
import os
import sys
import threading
import time
from dataclasses import asdict, fields
from pathlib import Path

import yaml

from benchmark.errors import UsageError, failure_reason
from benchmark.spec import EvaluationConfig, RunSpec

STUDY_FIELDS = {"name", "configs", "trainer", "datasets", "variants", "seeds", "overrides", "variant_overrides",
                "evaluation"}


def load_study(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"study file {path} does not exist; pass a YAML such as configs/studies/quick.yaml")
    try:
        study = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"{path} is not valid YAML ({str(e).splitlines()[0]}); fix the file") from e
    unknown = set(study) - STUDY_FIELDS
    if unknown:
        raise UsageError(f"{path}: unknown field(s) {sorted(unknown)}; a study has {sorted(STUDY_FIELDS)}")
    for key in ("datasets", "variants", "seeds"):
        if not study.get(key) or not isinstance(study[key], list):
            raise UsageError(f"{path}: '{key}' must be a non-empty list")
    study.setdefault("name", path.stem)
    study["configs"] = str((path.parent / study["configs"]) if "configs" in study else path.parent.parent)
    return study


CONFIG_KINDS = {"trainer": "trainer", "data": "dataset", "model": "variant"}  # config folder -> what a study names


def select(study: dict, **subsets: str | None) -> dict:
    """The study narrowed to a part of its grid, e.g. ``select(study, variants="vae,ae", seeds="0")``: the
    runs keep their names and records, so a part run now and the rest later make the same study."""
    study = dict(study)
    for key, chosen in subsets.items():
        if chosen is None:
            continue
        known = [str(v) for v in study[key]]
        names = [v.strip() for v in str(chosen).split(",") if v.strip()]
        missing = [v for v in names if v not in known]
        if missing or not names:
            raise UsageError(f"--{key} {chosen}: {', '.join(missing) or 'nothing'} not in the study's {key} {known}")
        study[key] = [v for v in study[key] if str(v) in names]
    return study


def _keyed(configs: Path, kind: str, key: str) -> str:
    f = configs / kind / f"{key}.yaml"
    if not f.is_file():
        known = sorted(p.stem for p in (configs / kind).glob("*.yaml"))
        raise UsageError(f"unknown {CONFIG_KINDS[kind]} {key!r}; choose one of {known} (or add {f})")
    return str(f)


def expand(study: dict, results_dir="results", work_dir="runs", wandb="offline", overrides=None,
           evaluation=None) -> list[RunSpec]:
    """The study's runs, in a stable order: dataset, then variant, then seed.

    ``overrides`` (trainer/model/data keys) and ``evaluation`` (EvaluationConfig fields) win over the study's.
    The data split and its fixed binarisations follow the run's seed (``data.seed`` = seed) unless a config
    file, the study or ``overrides`` sets ``data.seed``: otherwise every seed would share seed 0's split, and
    the spread over seeds would leave out the split's share of the variance."""
    evaluation = {**study.get("evaluation", {}), **(evaluation or {})}
    unknown = set(evaluation) - {f.name for f in fields(EvaluationConfig)}
    if unknown:
        raise UsageError(f"unknown evaluation field(s) {sorted(unknown)}; see benchmark.spec.EvaluationConfig")
    EvaluationConfig(**evaluation)  # its values are checked here, before any run trains
    configs = Path(study["configs"])
    trainer = _keyed(configs, "trainer", study.get("trainer", "cpu"))
    specs = []
    for dataset in study["datasets"]:
        data = _keyed(configs, "data", dataset)
        for variant in study["variants"]:
            model = _keyed(configs, "model", variant)
            run_overrides = {**study.get("overrides", {}), **study.get("variant_overrides", {}).get(variant, {}),
                             **(overrides or {})}
            data_seed_set = DATA_SEED in run_overrides or _sets_data_seed([trainer, model, data])
            for seed in study["seeds"]:
                specs.append(RunSpec(
                    study=study["name"], name=f"{dataset}-{variant}-s{seed}", dataset=dataset, variant=variant,
                    seed=int(seed), config_files=[trainer, model, data],
                    overrides=run_overrides if data_seed_set else {DATA_SEED: int(seed), **run_overrides},
                    evaluation=evaluation, results_dir=str(results_dir),
                    work_dir=str(work_dir), wandb=wandb))
    return specs


DATA_SEED = "data.seed"


def _sets_data_seed(config_files: list[str]) -> bool:
    """Whether one of the YAMLs sets ``data.seed`` (``data: {seed: ...}`` or a dotted ``data.seed`` key)."""
    for f in config_files:
        cfg = yaml.safe_load(Path(f).read_text()) or {}
        data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
        init_args = data.get("init_args") if isinstance(data.get("init_args"), dict) else {}
        if DATA_SEED in cfg or "seed" in data or "seed" in init_args:
            return True
    return False


GPU_DEVICE_NODES = ("/dev/nvidia[0-9]*", "/dev/dxg", "/dev/kfd", "/dev/nvhost-ctrl-gpu")  # NVIDIA, WSL, ROCm, Jetson


def gpu_device_nodes() -> list[str]:
    return [node for pattern in GPU_DEVICE_NODES for node in glob.glob(pattern)]


def gpu_count() -> int:
    """The GPUs torch would see. On Linux without a GPU device node there are none, and the parent of a study
    is spared torch's import (3-4 s on a small CPU); otherwise torch counts them (CUDA_VISIBLE_DEVICES too)."""
    if sys.platform.startswith("linux") and not gpu_device_nodes():
        return 0
    import torch

    return torch.cuda.device_count()


def parse_devices(devices: str | None) -> list[str] | None:
    """'auto' -> every GPU (else every CPU core); '0,1' -> those GPUs; 'N' (no GPU) -> N CPU workers."""
    if devices is None:
        return None
    n_gpu = gpu_count()
    if devices == "auto":
        return [str(i) for i in range(n_gpu)] if n_gpu else ["cpu"] * (os.cpu_count() or 1)
    parts = [p.strip() for p in devices.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise UsageError(f"--devices {devices!r}: give 'auto', a GPU list such as 0,1, or a worker count")
    if n_gpu:
        bad = [p for p in parts if int(p) >= n_gpu]
        if bad:
            raise UsageError(f"--devices {devices}: no GPU {bad[0]} (this machine has {n_gpu}); fix the list")
        return parts
    if len(parts) == 1:
        return ["cpu"] * int(parts[0])
    return ["cpu"] * len(parts)


class Progress:
    """One line per event: runs done / running / failed, what just happened."""

    def __init__(self, total: int):
        self.total, self.done, self.failed, self.running, self.skipped = total, 0, 0, 0, 0
        self.start = time.perf_counter()

    def event(self, name: str, what: str):
        print(f"[{time.perf_counter() - self.start:7.1f}s | done {self.done}/{self.total} running {self.running} "
              f"failed {self.failed} skipped {self.skipped}] {name}: {what}", flush=True)

    def finish(self, name: str, record: dict):
        self.done += 1
        self.failed += record.get("status") != "finished"
        took = record.get("timings", {}).get("train_s")
        self.event(name, record["status"] + (f" ({took:.1f} s training)" if took else "")
                   + (f": {record['reason']}" if record.get("reason") else ""))


def _finished(spec: RunSpec) -> bool:
    from benchmark.records import read_record

    try:
        return spec.record_path.exists() and read_record(spec.record_path).get("status") == "finished"
    except ValueError:
        return False


def run_sequential(specs: list[RunSpec], progress: Progress):
    """One run after another in this process. As in a worker, a run's own output (Lightning's lines, progress
    bars, warnings, a failed run's traceback) goes to its log.txt, and the console keeps the study's lines."""
    from benchmark.cli import lightning_info_on_stdout
    from benchmark.runner import train_and_evaluate

    with lightning_info_on_stdout():
        for spec in specs:
            log = spec.log_path
            spec.run_dir.mkdir(parents=True, exist_ok=True)
            progress.running = 1
            progress.event(spec.name, f"started, output in {log}")
            with _output_to(log):
                record = train_and_evaluate(spec)
            progress.running = 0
            if record["status"] == "failed":
                record = {**record, "reason": f"{record['reason']}; see {log}"}
            progress.finish(spec.name, record)


def run_workers(specs: list[RunSpec], slots: list[str], progress: Progress, run=None):
    """Side by side: one long-lived worker process per device slot (a GPU index, or a share of the CPU cores)
    takes runs one after another, so Python, torch and Lightning load once per slot, not once per run. A
    worker that dies takes only its current run with it: that run is recorded as failed, the slot restarts."""
    ctx = multiprocessing.get_context("spawn")  # a fork would copy this process's torch threads and CUDA state
    threads = max(1, (os.cpu_count() or 1) // len(slots))  # the cores are shared by every slot
    pending, workers, running = list(specs), {}, {}  # slot -> (process, pipe); slot -> spec
    try:
        while pending or running:
            for i, slot in enumerate(slots):
                if i in running or not pending:
                    continue
                if i not in workers or not workers[i][0].is_alive():
                    here, there = ctx.Pipe()
                    proc = ctx.Process(target=_slot_worker, args=(slot, threads, there, run))
                    proc.start()
                    there.close()
                    workers[i] = (proc, here)
                spec = running[i] = pending.pop(0)
                spec.run_dir.mkdir(parents=True, exist_ok=True)
                workers[i][1].send(asdict(spec))
                progress.running = len(running)
                progress.event(spec.name, f"started on {'cpu' if slot == 'cpu' else 'cuda:' + slot}")
            busy = [workers[i][1] for i in running] + [workers[i][0].sentinel for i in running]
            multiprocessing.connection.wait(busy)
            for i in list(running):
                proc, pipe = workers[i]
                if not pipe.poll() and proc.is_alive():
                    continue
                try:
                    error = pipe.recv()
                except EOFError:  # the worker died mid-run (killed, out of memory, a crash in native code)
                    proc.join()
                    error = f"worker exited with {proc.exitcode}"
                spec = running.pop(i)
                progress.running = len(running)
                _report(spec, error, progress)
    finally:
        for proc, pipe in workers.values():
            if proc.is_alive():
                pipe.send(None)
        for proc, _ in workers.values():
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


def _report(spec: RunSpec, error: str | None, progress: Progress):
    from benchmark.records import read_record

    log = spec.log_path
    if error is None and spec.record_path.exists():
        progress.finish(spec.name, read_record(spec.record_path))
    else:
        progress.finish(spec.name, {"status": "failed", "reason": f"{error or 'no record written'}; see {log}"})


def _slot_worker(slot: str, threads: int, pipe, run=None):
    """A worker's loop: take a run, do it with its output in the run's log.txt, say how it ended."""
    import traceback

    _exit_with_parent()
    import torch

    if slot != "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = slot  # read when CUDA starts, which no import has done yet
    torch.set_num_threads(threads)
    if run is None:
        from benchmark.runner import train_and_evaluate as run
    while (spec := pipe.recv()) is not None:
        spec = RunSpec(**spec)
        error = None
        with _output_to(spec.log_path):
            try:
                run(spec)
            except Exception as e:  # a bad config (UsageError) fails this run only; the study goes on
                traceback.print_exc()
                error = failure_reason(e)
        pipe.send(error)


def _exit_with_parent():
    """End this worker as soon as the study's process ends, however it ends (killed, timed out, cancelled):
    an orphan would go on training on a device the next job uses, and write records that nobody waits for.
    The run it leaves resumes from its last checkpoint."""
    parent = multiprocessing.parent_process()
    if parent is None:  # not a worker process
        return

    def watch():
        parent.join()  # returns when the parent's end of the spawn pipe closes
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


@contextlib.contextmanager
def _output_to(path: Path):
    """Everything written to stdout and stderr, by Python or native code, goes to ``path`` (appended)."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


def run_submitit(specs: list[RunSpec], cluster: str, work_dir: str, progress: Progress, slurm: dict):
    """Many runs as one job array through submitit (SLURM, or its local executor on this machine)."""
    import submitit

    from benchmark.runner import train_and_evaluate

    executor = submitit.AutoExecutor(folder=str(Path(work_dir) / "submitit"), cluster=cluster)
    executor.update_parameters(timeout_min=int(slurm.get("timeout_min", 240)), **{
        k: v for k, v in slurm.items() if k != "timeout_min"})
    jobs = executor.map_array(train_and_evaluate, specs)
    progress.running = len(jobs)
    progress.event("submitit", f"{len(jobs)} jobs submitted ({cluster})")
    for spec, job in zip(specs, jobs):
        try:
            record = job.result()
        except Exception as e:  # a job that died: the run is recorded as failed by nobody else
            record = {"status": "failed", "reason": failure_reason(e)}
        progress.running -= 1
        progress.finish(spec.name, record)


def main(argv: list[str]):
    parser = argparse.ArgumentParser(prog="latent-bench run", description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="a study YAML, e.g. configs/studies/quick.yaml")
    parser.add_argument("--devices", default=None,
                        help="run side by side: 'auto', GPU indices '0,1', or a number of CPU workers")
    parser.add_argument("--per-device", type=int, default=1,
                        help="runs side by side on each device (small models leave a GPU idle)")
    parser.add_argument("--executor", default="local", choices=["local", "submitit-local", "slurm"])
    parser.add_argument("--slurm", default="{}", help="submitit parameters as JSON, e.g. '{\"gpus_per_node\": 1}'")
    parser.add_argument("--wandb", default=None, choices=["online", "offline", "disabled"],
                        help="default: online with WANDB_API_KEY set, else offline")
    parser.add_argument("--results", default="results", help="where run records and the leaderboard go")
    parser.add_argument("--work-dir", default="runs", help="checkpoints and W&B files (not results)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every run, e.g. --set trainer.max_epochs=2 or --set evaluation.iw_samples=100")
    for key in ("datasets", "variants", "seeds"):
        parser.add_argument(f"--{key}", default=None, metavar="A,B", help=f"only these of the study's {key}")
    args = parser.parse_args(argv)
    from benchmark.cli import parse_assignments

    overrides = parse_assignments(args.set)
    evaluation = {k.removeprefix("evaluation."): overrides.pop(k) for k in list(overrides) if k.startswith("evaluation.")}
    wandb = args.wandb or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    study = select(load_study(args.study), datasets=args.datasets, variants=args.variants, seeds=args.seeds)
    specs = expand(study, args.results, args.work_dir, wandb, overrides, evaluation)
    progress = Progress(len(specs))
    todo = []
    for spec in specs:
        if _finished(spec):
            progress.skipped += 1
            progress.done += 1
        else:
            todo.append(spec)
    progress.event(study["name"], f"{len(specs)} runs, {progress.skipped} already finished")
    slots = parse_devices(args.devices)
    if args.per_device < 1:
        raise UsageError(f"--per-device {args.per_device}: give a positive number of runs per device")
    slots = [s for s in slots for _ in range(args.per_device)] if slots else None
    if args.executor != "local":
        run_submitit(todo, "local" if args.executor == "submitit-local" else "slurm", args.work_dir, progress,
                     json.loads(args.slurm))
    elif slots and len(slots) > 1:
        run_workers(todo, slots, progress)
    else:
        run_sequential(todo, progress)
    from benchmark.records import write_leaderboard

    md = write_leaderboard(args.results)
    progress.event(study["name"], f"leaderboard written to {md}")
    _log_leaderboard(study["name"], Path(args.results), args.work_dir, wandb)
    return 0 if progress.failed == 0 else 1


def _log_leaderboard(study: str, results: Path, work_dir: str, mode: str):
    """The study's leaderboard as a ``wandb.Table`` in the study's W&B group."""
    if mode == "disabled" or not (results / "leaderboard.csv").is_file():
        return
    import csv

    import wandb

    with (results / "leaderboard.csv").open() as f:
        header, *rows = csv.reader(f)
    numeric = {"mean", "std", "ci95", "n"}  # text in the CSV, numbers in the table: W&B sorts and plots them
    data = [[(float(v) if v else None) if c in numeric else v for c, v in zip(header, row)] for row in rows]
    Path(work_dir, study).mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "latent-bench"), group=study, name=f"{study}-leaderboard",
                     job_type="leaderboard", dir=str(Path(work_dir, study)), mode=mode, reinit="create_new")
    run.log({"leaderboard": wandb.Table(columns=header, data=data)})
    run.finish()
