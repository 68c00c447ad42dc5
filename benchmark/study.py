"""Studies: datasets x variants x seeds (x overrides), run where the user has compute, resumable.

A study YAML names configs by key::

    name: quick
    trainer: auto                       # configs/trainer/auto.yaml (the default): a GPU where there is one
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

import contextlib
import itertools
import json
import os
import signal
import sys
from dataclasses import fields
from pathlib import Path

import yaml

from benchmark.errors import Interrupted, UsageError, failure_reason
from benchmark.executors import Progress, parse_devices, run_sequential, run_submitit, run_workers
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
        if key == "budgets":  # a longer budget run on its own still continues the one below it
            study.setdefault("ladder", study["budgets"])
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
    ladder = study.get("ladder", budgets)  # the study's budgets, also those a --budgets selection left out
    below = dict(zip(ladder[1:], ladder))  # each budget's next-shorter one, whose checkpoint it continues
    if budgets != [None] and BUDGET_KEY in overrides:
        raise UsageError(f"--set {BUDGET_KEY} on a study with budgets {budgets}: choose budgets with "
                         f"--budgets, or drop the study's 'budgets'")
    configs = config_folders(study.get("configs"))
    trainer = _keyed(configs, "trainer", study.get("trainer", "auto"))
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
        for budget in budgets:
            for dataset, variant, files, run_overrides, setting, default, data_seed_set in grid:
                parts = [dataset, variant, *(f"{k.rsplit('.', 1)[-1]}{format_value(v)}" for k, v in setting.items())]
                name = "-".join(parts + ([f"e{budget}"] if budget else []) + [f"s{seed}"])
                shorter = "-".join(parts + [f"e{below[budget]}", f"s{seed}"]) if budget in below else None
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
    unknown class_path, a negative batch size, a missing data file), and each distinct evaluation's feature
    extractor is one that can be built (``evaluation.check_extractor``). The first problem is raised, named by
    its run."""
    for name, folder in (("--results", results_dir), ("--work-dir", work_dir)):
        _check_writable(name, Path(folder))
    if not specs:
        return
    import logging
    import warnings

    from benchmark.evaluation import check_extractor
    from benchmark.lightning_cli import build_cli

    evaluations = {json.dumps(spec.evaluation, sort_keys=True, default=str): spec for spec in specs}
    for spec in evaluations.values():
        try:
            check_extractor(spec.evaluation_config)
        except UsageError as e:
            raise UsageError(f"run {spec.name}: {e}") from None

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


def run(study_path: str | Path, results: str = "results", work_dir: str = "runs", devices: str | None = None,
        per_device: int = 1, executor: str = "local", slurm: dict | None = None, wandb: str | None = None,
        overrides: dict | None = None, members: str | None = None, **subsets: str | None) -> int:
    """Run a study (a YAML path or a packaged study's key): skip its finished runs, check every configuration
    of the others, run them (in this process, on ``devices`` side by side, or through submitit), then write
    the leaderboard. ``overrides``: dotted keys for every run, ``evaluation.<field>`` ones for the evaluation;
    ``members``: train runs that differ in seed and weight as one batched model, "auto" (every such group) or
    at most N a group (``benchmark.members``); ``subsets``: datasets, variants, seeds, budgets as "A,B".
    0 when every run finished, 1 otherwise."""
    with user_modules(study_file(study_path).parent, Path.cwd()):
        return _run(study_path, results, work_dir, devices, per_device, executor, slurm or {}, wandb,
                    dict(overrides or {}), subsets, members)


def parse_members(members: str | None) -> int | None:
    """``--members``: None or "1" (off) -> 1, "auto" -> None (no limit), N -> N."""
    if members in (None, "auto"):
        return 1 if members is None else None
    if not members.isdigit() or int(members) < 1:
        raise UsageError(f"--members {members}: give auto or a positive number of runs to train as one model")
    return int(members)


def _run(study_path, results, work_dir, devices, per_device, executor, slurm, wandb, overrides, subsets,
         members=None) -> int:
    evaluation = {k.removeprefix("evaluation."): overrides.pop(k) for k in list(overrides) if k.startswith("evaluation.")}
    wandb, unreachable = resolve_wandb(wandb or ("online" if os.environ.get("WANDB_API_KEY") else "offline"))
    study = select(load_study(study_path), **subsets)
    specs = expand(study, results, work_dir, wandb, overrides, evaluation)
    progress = Progress(len(specs))
    todo = []
    for spec in specs:
        if _finished(spec):
            progress.skipped += 1
            progress.done += 1
        else:
            todo.append(spec)
    slots = parse_devices(devices)
    group_size = parse_members(members)
    if group_size != 1 and executor != "local":
        raise UsageError("--members trains each group in one process, here or in a worker slot: drop --executor "
                         "or --members")
    if per_device < 1:
        raise UsageError(f"--per-device {per_device}: give a positive number of runs per device")
    slots = [s for s in slots for _ in range(per_device)] if slots else None
    if unreachable:
        folder = Path(work_dir, study["name"])
        progress.event(study["name"], offline_note(unreachable, f"{folder}/*/wandb/offline-run-* "
                                                                f"{folder}/wandb/offline-run-*"))
    progress.event(study["name"], f"{len(specs)} runs, {progress.skipped} already finished; checking the "
                                  f"configurations of the {len(todo)} to run")
    check_runs(todo, results, work_dir)
    previous = signal.signal(signal.SIGINT, _interrupt)  # Lightning would turn a KeyboardInterrupt into exit(1)
    try:
        if executor != "local":
            run_submitit(todo, "local" if executor == "submitit-local" else "slurm", work_dir, progress, slurm)
        elif slots and len(slots) > 1:
            run_workers(todo, slots, progress, members=group_size)
        else:
            run_sequential(todo, progress, members=group_size)
    finally:
        signal.signal(signal.SIGINT, previous)
    from benchmark.leaderboard import write_leaderboard

    try:
        md = write_leaderboard(results)
    except UsageError as e:  # the runs are recorded; a leaderboard that cannot be made is one line, not the end
        progress.event(study["name"], f"no leaderboard: {e}")
        return 1
    progress.event(study["name"], f"leaderboard written to {md}")
    _log_leaderboard(study["name"], Path(results), work_dir, wandb, progress)
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
