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
    sweep: {wae_mmd: {model.init_args.weight: [1, 10, 100]}}  # each value its own run (the grid of a variant)
    budgets: [10, 30]                   # trainer.max_epochs of each run; a longer run continues a shorter one

A swept key's configured value must be among its values: that run is the untuned view's. Runs are named
``<dataset>-<variant>[-<key><value>...][-e<budget>]-s<seed>`` (the key's last dotted part: ``weight10``), in
the order seed, budget, dataset, variant, setting: a study cut short has whole seeds, and a run at a longer
budget starts after the same run at the shorter one, whose checkpoint it continues.

``configs`` names a folder of the user's own keyed YAMLs (default: the folder above the study's own, where that
is a configs folder); a key it lacks comes from the configs that ship with the package, so a study runs from
any folder, and a study is found by key too (``latent-bench run quick``). A run whose record
is finished is skipped; an interrupted one resumes from its last checkpoint. Runs go one after another in
this process, side by side in worker processes (``--devices``: one per GPU, or N CPU workers), or to a
cluster through submitit (``--executor slurm``; ``submitit-local`` runs the same path on this machine).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, fields
from pathlib import Path

import yaml

from benchmark.errors import Interrupted, UsageError, failure_reason
from benchmark.spec import EvaluationConfig, RunSpec, format_value
from benchmark.tracking import offline_note
from benchmark.tracking import resolve as resolve_wandb

STUDY_FIELDS = {"name", "configs", "trainer", "datasets", "variants", "seeds", "overrides", "variant_overrides",
                "evaluation", "sweep", "budgets"}
BUDGET_KEY = "trainer.max_epochs"


def packaged_configs() -> Path:
    """The configs that ship with the package (``configs/`` of a checkout)."""
    from importlib.resources import files

    return Path(str(files("benchmark.configs")))


def study_file(path: str | Path) -> Path:
    """A study YAML by path, or by key (``quick``: the packaged ``studies/quick.yaml``)."""
    path = Path(path)
    packaged = packaged_configs() / "studies" / f"{path}.yaml"
    if not path.is_file() and path.suffix == "" and len(path.parts) == 1 and packaged.is_file():
        return packaged
    if not path.is_file():
        known = sorted(p.stem for p in (packaged_configs() / "studies").glob("*.yaml"))
        raise UsageError(f"study file {path} does not exist; pass a study YAML, or one of the packaged studies "
                         f"by key: {', '.join(known)}")
    return path


def load_study(path: str | Path) -> dict:
    """The study of a YAML (a path or a packaged study's key), checked."""
    path = study_file(path)
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
    seeds = study["seeds"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in seeds) or len(set(seeds)) != len(seeds):
        raise UsageError(f"{path}: 'seeds' must be distinct integers, got {seeds}")
    _check_grid(path, study)
    study.setdefault("name", path.stem)
    if "configs" in study:
        study["configs"] = str(path.parent / study["configs"])
        if not Path(study["configs"]).is_dir():
            raise UsageError(f"{path}: configs folder {study['configs']} does not exist; fix 'configs' or drop it "
                             f"to use the packaged configs")
    elif any((path.parent.parent / kind).is_dir() for kind in CONFIG_KINDS):  # a study in <configs>/studies/
        study["configs"] = str(path.parent.parent)
    return study


def config_folders(configs: str | None) -> list[Path]:
    """Where a study's keys are looked up, the first folder that has the key winning: the study's own configs
    folder (a user's trainers, datasets and variants), then the packaged configs."""
    folders = [Path(configs)] if configs else []
    return folders + [f for f in [packaged_configs()] if all(f.resolve() != g.resolve() for g in folders)]


def _check_grid(path: Path, study: dict):
    """The sweep and the budgets are well-formed, before anything is expanded."""
    sweep = study.get("sweep", {})
    if not isinstance(sweep, dict):
        raise UsageError(f"{path}: 'sweep' maps a variant to {{dotted key: [values]}}, got {sweep!r}")
    for variant, keys in sweep.items():
        if variant not in study["variants"]:
            raise UsageError(f"{path}: sweep of {variant!r}, which is not among the study's variants "
                             f"{study['variants']}; fix the name or add the variant")
        if not isinstance(keys, dict) or not keys:
            raise UsageError(f"{path}: sweep of {variant} must map dotted keys to lists of values, got {keys!r}")
        for key, values in keys.items():
            if not isinstance(values, list) or not values or len({json.dumps(v) for v in values}) != len(values):
                raise UsageError(f"{path}: sweep {variant} {key} must be a non-empty list of distinct values, "
                                 f"got {values!r}")
            if key == BUDGET_KEY:
                raise UsageError(f"{path}: sweep {variant} {key}: the budget is the study's 'budgets' field")
    budgets = study.get("budgets")
    if budgets is not None:
        if (not isinstance(budgets, list) or not budgets
                or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in budgets)
                or budgets != sorted(set(budgets))):
            raise UsageError(f"{path}: 'budgets' must be increasing positive epoch counts such as [10, 30], "
                             f"got {budgets!r}")
        if BUDGET_KEY in study.get("overrides", {}):
            raise UsageError(f"{path}: 'budgets' and overrides {BUDGET_KEY} both set the epochs; drop one")


CONFIG_KINDS = {"trainer": "trainer", "data": "dataset", "model": "variant"}  # config folder -> what a study names


def select(study: dict, **subsets: str | None) -> dict:
    """The study narrowed to a part of its grid, e.g. ``select(study, variants="vae,ae", seeds="0")``: the
    runs keep their names and records, so a part run now and the rest later make the same study."""
    study = dict(study)
    for key, chosen in subsets.items():
        if chosen is None:
            continue
        if not study.get(key):
            raise UsageError(f"--{key} {chosen}: the study has no {key}")
        known = [str(v) for v in study[key]]
        names = [v.strip() for v in str(chosen).split(",") if v.strip()]
        missing = [v for v in names if v not in known]
        if missing or not names:
            raise UsageError(f"--{key} {chosen}: {', '.join(missing) or 'nothing'} not in the study's {key} {known}")
        study[key] = [v for v in study[key] if str(v) in names]
    return study


def _keyed(folders: list[Path], kind: str, key: str) -> str:
    found = [folder / kind / f"{key}.yaml" for folder in folders if (folder / kind / f"{key}.yaml").is_file()]
    if not found:
        known = sorted({p.stem for folder in folders for p in (folder / kind).glob("*.yaml")
                        if kind != "model" or _is_variant(p)})
        raise UsageError(f"unknown {CONFIG_KINDS[kind]} {key!r}; choose one of {known} (or add "
                         f"{folders[0] / kind / f'{key}.yaml'})")
    f = found[0]
    known = sorted(p.stem for p in (f.parent).glob("*.yaml") if kind != "model" or _is_variant(p))
    if kind == "model" and not _is_variant(f):
        raise UsageError(f"{f} names no model.class_path: it is a setting to combine with a variant, not a "
                         f"variant; choose one of {known}, and put its keys in the study's overrides")
    return str(f)


def _is_variant(path: Path) -> bool:
    """A model config is a variant when it names the model's class (``model.class_path``)."""
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return True  # a broken file is reported, with its error, when the run parses it
    return isinstance(cfg.get("model"), dict) and "class_path" in cfg["model"]


def expand(study: dict, results_dir="results", work_dir="runs", wandb="offline", overrides=None,
           evaluation=None) -> list[RunSpec]:
    """The study's runs, in a stable order: seed, budget, dataset, variant, setting of the variant's sweep.

    ``overrides`` (trainer/model/data keys) and ``evaluation`` (EvaluationConfig fields) win over the study's.
    The data split and its fixed binarisations follow the run's seed (``data.seed`` = seed) unless a config
    file, the study or ``overrides`` sets ``data.seed``: otherwise every seed would share seed 0's split, and
    the spread over seeds would leave out the split's share of the variance."""
    evaluation = {**study.get("evaluation", {}), **(evaluation or {})}
    unknown = set(evaluation) - {f.name for f in fields(EvaluationConfig)}
    if unknown:
        raise UsageError(f"unknown evaluation field(s) {sorted(unknown)}; see benchmark.spec.EvaluationConfig")
    EvaluationConfig(**evaluation)  # its values are checked here, before any run trains
    overrides = overrides or {}
    budgets = study.get("budgets") or [None]
    if budgets != [None] and BUDGET_KEY in overrides:
        raise UsageError(f"--set {BUDGET_KEY} on a study with budgets {budgets}: choose budgets with "
                         f"--budgets, or drop the study's 'budgets'")
    configs = config_folders(study.get("configs"))
    trainer = _keyed(configs, "trainer", study.get("trainer", "cpu"))
    grid = []  # (dataset, variant, config files, overrides of the run, setting, default setting, data seed set)
    for dataset in study["datasets"]:
        data = _keyed(configs, "data", dataset)
        for variant in study["variants"]:
            model = _keyed(configs, "model", variant)
            files = [trainer, model, data]
            base = {**study.get("overrides", {}), **study.get("variant_overrides", {}).get(variant, {})}
            sweep = study.get("sweep", {}).get(variant, {})
            clash = sorted(set(sweep) & set(overrides))
            if clash:
                raise UsageError(f"--set {clash[0]} fixes a key the study sweeps for {variant}; drop it, or drop "
                                 f"the sweep")
            configured = {key: _configured_value(key, files, base, variant, values) for key, values in sweep.items()}
            for values in itertools.product(*sweep.values()):
                setting = dict(zip(sweep, values))
                run_overrides = {**base, **setting, **overrides}
                grid.append((dataset, variant, files, run_overrides, setting, setting == configured,
                             DATA_SEED in run_overrides or _sets_data_seed(files)))
    specs = []
    for seed in study["seeds"]:
        for i, budget in enumerate(budgets):
            for dataset, variant, files, run_overrides, setting, default, data_seed_set in grid:
                parts = [dataset, variant, *(f"{k.rsplit('.', 1)[-1]}{format_value(v)}" for k, v in setting.items())]
                name = "-".join(parts + ([f"e{budget}"] if budget else []) + [f"s{seed}"])
                shorter = "-".join(parts + [f"e{budgets[i - 1]}", f"s{seed}"]) if i else None
                run = {**({} if data_seed_set else {DATA_SEED: int(seed)}), **run_overrides,
                       **({BUDGET_KEY: budget} if budget else {})}
                specs.append(RunSpec(
                    study=study["name"], name=name, dataset=dataset, variant=variant, seed=int(seed),
                    config_files=files, overrides=run, evaluation=evaluation, results_dir=str(results_dir),
                    work_dir=str(work_dir), wandb=wandb, setting=setting, default_setting=default,
                    budget=budget, warm_start=str(Path(work_dir) / study["name"] / shorter) if shorter else None))
    return specs


def _configured_value(key: str, config_files: list[str], overrides: dict, variant: str, values: list):
    """The value a swept key has without the sweep (the study's overrides, else the last YAML that sets it);
    it must be one of the swept values, so that the untuned view has its run."""
    found = overrides.get(key, _MISSING)
    if found is _MISSING:
        for f in reversed(config_files):
            node = yaml.safe_load(Path(f).read_text()) or {}
            for part in key.split("."):
                node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
            if node is not _MISSING:
                found = node
                break
    if found is _MISSING:
        raise UsageError(f"sweep {variant} {key}: no config sets it, so the untuned run is unknown; set it in "
                         f"configs/model/{variant}.yaml or in the study's variant_overrides")
    if not any(json.dumps(v) == json.dumps(found) or v == found for v in values):
        raise UsageError(f"sweep {variant} {key}: {values} leaves out the configured value {found!r}; add it, "
                         f"so that the untuned view has its run")
    return next(v for v in values if v == found or json.dumps(v) == json.dumps(found))


_MISSING = object()


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
    workers = int(parts[0]) if len(parts) == 1 else len(parts)
    cores = os.cpu_count() or 1
    if not 1 <= workers <= cores:
        raise UsageError(f"--devices {devices}: this machine has no GPU and {cores} CPU cores; give 1 to {cores} "
                         f"workers, or auto")
    return ["cpu"] * workers


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
                   + (f": {record['reason']}" if record.get("reason") else "")
                   + (f"; {record['wandb_offline']}" if record.get("wandb_offline") else ""))


def _finished(spec: RunSpec) -> bool:
    """Whether the run has a finished record. A record or a checkpoint of another protocol (another budget,
    setting, evaluation or config), or a record from before records named theirs, is refused, never reused:
    its numbers would be taken for this run's, or its training continued under other settings."""
    from benchmark.records import read_record

    try:
        record = read_record(spec.record_path) if spec.record_path.exists() else {}
    except ValueError:
        record = {}
    finished = record.get("status") == "finished"
    trained = spec.protocol_path  # written when the run's training starts
    if finished:
        theirs, what = record, f"{spec.record_path} was written"
    elif trained.is_file() and (spec.run_dir / "checkpoints" / "last.ckpt").exists():
        theirs, what = json.loads(trained.read_text()), f"the checkpoint in {spec.run_dir} was trained"
        theirs = {"spec_digest": theirs.get("digest"), "spec_protocol": theirs.get("protocol")}
    else:
        return False
    if theirs.get("spec_digest") != spec.digest:
        if theirs.get("spec_digest") is None:
            why = "by a version that did not record its protocol"
        else:
            diff = spec.differences(theirs.get("spec_protocol") or {})
            why = "by another protocol" + (f" (differs in {', '.join(diff)})" if diff else "")
        raise UsageError(f"{what} {why}; pass --results and --work-dir NEW_FOLDERS to run the study apart, or "
                         f"delete it to rerun here")
    return finished


def check_runs(specs: list[RunSpec], results_dir: str, work_dir: str):
    """Every bad input of the runs to do, found before any of them trains: the folders are writable, and each
    distinct configuration (the seeds aside) parses, type-checks and builds its model, data and trainer (an
    unknown class_path, a negative batch size, a missing data file). The first problem is raised, named by
    its run."""
    for name, folder in (("--results", results_dir), ("--work-dir", work_dir)):
        _check_writable(name, Path(folder))
    if not specs:
        return
    import logging
    import warnings

    from benchmark.lightning_cli import build_cli

    seen = set()
    quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.WARNING)  # "GPU available: ..." once a configuration
    try:
        for spec in specs:
            key = json.dumps([spec.config_files, {k: v for k, v in spec.overrides.items() if k != DATA_SEED}],
                             sort_keys=True, default=str)
            if key in seen:
                continue
            seen.add(key)
            try:
                with warnings.catch_warnings():  # a run's warnings belong in its log, when it runs
                    warnings.simplefilter("ignore")
                    build_cli(spec.cli_args(), run=False, save_config_callback=None)
            except UsageError as e:
                hint = ("; a variant's module is found next to the study YAML, in the working folder or on "
                        "PYTHONPATH") if "No module named" in str(e) else ""
                raise UsageError(f"run {spec.name}: {e}{hint}") from None
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


def _check_writable(option: str, folder: Path):
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {folder}: {existing} is not a writable folder; choose another {option}")


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
    # A worker killed mid-run (Ctrl-C, a crash) leaves its semaphores (tqdm's lock) to the resource tracker,
    # which removes them and warns on the console after the study's last line; the tracker takes its warning
    # filters from this process's when it starts, on the first spawn.
    quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
    if quiet not in sys.warnoptions:
        sys.warnoptions.append(quiet)
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
    except BaseException:  # interrupted: the runs stop now, and resume from their checkpoints on a rerun
        for proc, _ in workers.values():
            proc.kill()
        raise
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
    else:  # the run raised before its record (a bad config) or its process died: nobody else records it
        from benchmark.runner import record_failure

        progress.finish(spec.name, record_failure(spec, f"{error or 'no record written'}; see {log}"))


def _slot_worker(slot: str, threads: int, pipe, run=None):
    """A worker's loop: take a run, do it with its output in the run's log.txt, say how it ended."""
    import traceback

    _exit_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent ends the runs
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


# SLURM job states after which a job never writes its result (and COMPLETED: it ended, result or not)
SLURM_ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
               "PREEMPTED", "TIMEOUT"}
POLL_S = 2.0
RESULT_GRACE_S = 15.0  # for submitit's result file after SLURM says the job ended (a shared filesystem lags)


def run_submitit(specs: list[RunSpec], cluster: str, work_dir: str, progress: Progress, slurm: dict):
    """Many runs as one job array through submitit (SLURM, or its local executor on this machine). Each job's
    state comes from ``scontrol`` (submitit's own watcher asks ``sacct``, which fails on a cluster without an
    accounting database, and then waits for ever on a job that died): a job that ended without a result is
    recorded as failed, with SLURM's state, the end of its error stream and its log."""
    import submitit

    executor = submitit.AutoExecutor(folder=str(Path(work_dir) / "submitit"), cluster=cluster)
    executor.update_parameters(timeout_min=int(slurm.get("timeout_min", 240)), **{
        k: v for k, v in slurm.items() if k != "timeout_min"})
    jobs = executor.map_array(run_logged, specs)
    progress.running = len(jobs)
    progress.event("submitit", f"{len(jobs)} jobs submitted ({cluster}): "
                               f"{', '.join(str(j.job_id) for j in jobs[:4])}{' ...' if len(jobs) > 4 else ''}")
    pending, ended = dict(zip(jobs, specs)), {}
    while pending:
        for job, spec in list(pending.items()):
            record = None
            if job.paths.result_pickle.exists() or (cluster != "slurm" and job.done()):
                try:
                    record = job.result()
                except Exception as e:  # the run raised in the job, or the job died (local executor)
                    record = _job_failed(spec, job, e)
            elif cluster == "slurm":
                state = _slurm_state(str(job.job_id))
                if state in SLURM_ENDED or state == "GONE":
                    if time.monotonic() - ended.setdefault(job, time.monotonic()) > RESULT_GRACE_S:
                        record = _job_failed(spec, job, None, state)
            if record is not None:
                del pending[job]
                progress.running = len(pending)
                progress.finish(spec.name, record)
        if pending:
            time.sleep(POLL_S)


def run_logged(spec: RunSpec) -> dict:
    """One run as a cluster job, its own output in the run's log.txt as under workers; returns its record."""
    from benchmark.runner import train_and_evaluate

    spec.run_dir.mkdir(parents=True, exist_ok=True)
    with _output_to(spec.log_path):
        return train_and_evaluate(spec)


def _slurm_state(job_id: str) -> str | None:
    """A job's state as ``scontrol`` reports it (``RUNNING``, ``CANCELLED``, ...), ``GONE`` once SLURM has
    forgotten it, None where scontrol does not answer (the next poll asks again)."""
    import re
    import subprocess

    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return "GONE" if "invalid job id" in out.stderr.lower() else None
    found = re.search(r"JobState=(\S+)", out.stdout)
    return found.group(1) if found else None


def _job_failed(spec: RunSpec, job, error: Exception | None, state: str | None = None) -> dict:
    """The failed record of a cluster job, its reason on one line: what failed (the run's exception, or SLURM's
    state and the last lines of the job's error stream) and where the logs are."""
    from benchmark.runner import record_failure

    if error is not None:
        lines = [line.strip() for line in str(error).splitlines() if line.strip().strip("-")]
        what = f"{type(error).__name__}: {lines[-1] if lines else ''}"  # the job's traceback ends in its error
    else:
        tail = [line.strip() for line in (job.stderr() or "").splitlines() if line.strip()][-2:]
        what = f"SLURM job {job.job_id} {state} without a result" + (f" ({' | '.join(tail)})" if tail else "")
    return record_failure(spec, f"{what}; see {spec.log_path} and {job.paths.stderr}")


@contextlib.contextmanager
def user_modules(*folders: Path):
    """A user's own modules (a variant's class_path) in these folders import as under ``python -m``: in this
    process, in its workers (a spawned process copies ``sys.path``) and in its cluster jobs (they inherit
    ``PYTHONPATH``)."""
    extra = [str(Path(f).resolve()) for f in folders]
    path, env = list(sys.path), os.environ.get("PYTHONPATH")
    sys.path[:0] = [f for f in extra if f not in sys.path]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(extra + [p for p in (env or "").split(os.pathsep) if p]))
    try:
        yield
    finally:
        sys.path[:] = path
        if env is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = env


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
    for key in ("datasets", "variants", "seeds", "budgets"):
        parser.add_argument(f"--{key}", default=None, metavar="A,B", help=f"only these of the study's {key}")
    args = parser.parse_args(argv)
    with user_modules(study_file(args.study).parent, Path.cwd()):
        return _run_study(args)


def _run_study(args) -> int:
    from benchmark.cli import parse_assignments

    overrides = parse_assignments(args.set)
    evaluation = {k.removeprefix("evaluation."): overrides.pop(k) for k in list(overrides) if k.startswith("evaluation.")}
    wandb, unreachable = resolve_wandb(args.wandb or ("online" if os.environ.get("WANDB_API_KEY") else "offline"))
    study = select(load_study(args.study), datasets=args.datasets, variants=args.variants, seeds=args.seeds,
                   budgets=args.budgets)
    specs = expand(study, args.results, args.work_dir, wandb, overrides, evaluation)
    progress = Progress(len(specs))
    todo = []
    for spec in specs:
        if _finished(spec):
            progress.skipped += 1
            progress.done += 1
        else:
            todo.append(spec)
    slots = parse_devices(args.devices)
    if args.per_device < 1:
        raise UsageError(f"--per-device {args.per_device}: give a positive number of runs per device")
    slots = [s for s in slots for _ in range(args.per_device)] if slots else None
    try:
        slurm = json.loads(args.slurm)
    except json.JSONDecodeError as e:
        raise UsageError(f"--slurm {args.slurm!r} is not JSON ({e.msg}); write e.g. '{{\"gpus_per_node\": 1}}'") from e
    if unreachable:
        folder = Path(args.work_dir, study["name"])
        progress.event(study["name"], offline_note(unreachable, f"{folder}/*/wandb/offline-run-* "
                                                                f"{folder}/wandb/offline-run-*"))
    progress.event(study["name"], f"{len(specs)} runs, {progress.skipped} already finished; checking the "
                                  f"configurations of the {len(todo)} to run")
    check_runs(todo, args.results, args.work_dir)
    previous = signal.signal(signal.SIGINT, _interrupt)  # Lightning would turn a KeyboardInterrupt into exit(1)
    try:
        if args.executor != "local":
            run_submitit(todo, "local" if args.executor == "submitit-local" else "slurm", args.work_dir, progress,
                         slurm)
        elif slots and len(slots) > 1:
            run_workers(todo, slots, progress)
        else:
            run_sequential(todo, progress)
    finally:
        signal.signal(signal.SIGINT, previous)
    from benchmark.leaderboard import write_leaderboard

    try:
        md = write_leaderboard(args.results)
    except UsageError as e:  # the runs are recorded; a leaderboard that cannot be made is one line, not the end
        progress.event(study["name"], f"no leaderboard: {e}")
        return 1
    progress.event(study["name"], f"leaderboard written to {md}")
    _log_leaderboard(study["name"], Path(args.results), args.work_dir, wandb, progress)
    return 0 if progress.failed == 0 else 1


def _interrupt(signum, frame):
    raise Interrupted()


def _log_leaderboard(study: str, results: Path, work_dir: str, mode: str, progress: Progress):
    """The study's leaderboard as a ``wandb.Table`` in the study's W&B group; a failure to log it is one line,
    never the study's end: the leaderboard files are written already."""
    if mode == "disabled" or not (results / "leaderboard.csv").is_file():
        return
    import csv

    import wandb

    from benchmark.tracking import start

    with (results / "leaderboard.csv").open() as f:
        header, *rows = csv.reader(f)
    numeric = {"mean", "std", "ci95", "n"}  # text in the CSV, numbers in the table: W&B sorts and plots them
    data = [[(float(v) if v else None) if c in numeric else v for c, v in zip(header, row)] for row in rows]
    Path(work_dir, study).mkdir(parents=True, exist_ok=True)
    try:
        run, offline = start(lambda m: wandb.init(
            project=os.environ.get("WANDB_PROJECT", "latent-bench"), group=study, name=f"{study}-leaderboard",
            job_type="leaderboard", dir=str(Path(work_dir, study)), mode=m, reinit="create_new",
            settings=wandb.Settings(silent=True)), mode)
        run.log({"leaderboard": wandb.Table(columns=header, data=data)})
        run.finish()
    except Exception as e:  # noqa: BLE001 -- W&B's own errors and anything its service raises
        progress.event(study, f"leaderboard not logged to W&B: {failure_reason(e)}")
        return
    if offline:
        progress.event(study, offline)
