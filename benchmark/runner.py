"""One run of a study: build from configs, train (resuming from the last checkpoint), evaluate, record.

A run leaves exactly one JSON record under ``results/runs/<study>/<run>.json``; checkpoints and W&B files
live in a work folder outside ``results`` (``runs/`` by default, ignored by git).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import torch

from benchmark.callbacks import Diverged, DivergenceGuard, ImageCount, RNGState
from benchmark.errors import UsageError, failure_reason
from benchmark.evaluation import check_extractor, evaluate
from benchmark.records import (DIVERGED, FAILED, FINISHED, FinishedRecordError, RunRecord, code_version, environment,
                               read_record, write_json, write_record)
from benchmark.spec import EvaluationConfig, RunSpec


def _device_name(trainer) -> str:
    root = trainer.strategy.root_device
    name = torch.cuda.get_device_name(root) if root.type == "cuda" else "cpu"
    return f"{name} x{trainer.world_size}" if trainer.world_size > 1 else name


def _logger(spec: RunSpec, config: dict):
    """The run's WandbLogger, its W&B run started (offline where the server cannot be reached), and the line
    that says so; (False, None) with W&B disabled."""
    if spec.wandb == "disabled":
        return False, None
    from lightning.pytorch.loggers import WandbLogger

    from benchmark.tracking import start

    spec.run_dir.mkdir(parents=True, exist_ok=True)
    return start(lambda mode: WandbLogger(
        project=os.environ.get("WANDB_PROJECT", "latent-bench"), group=spec.study, name=spec.name,
        id=f"{spec.study}-{spec.name}".replace("/", "-"), resume="allow", save_dir=str(spec.run_dir), mode=mode,
        config=config), spec.wandb)


def run_callbacks(ckpt_dir: Path, counter: ImageCount) -> list:
    """The callbacks of every run's Trainer: the checkpoint it resumes from, the generators' state in it,
    the divergence check, and ``counter`` for the throughput in the record."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    # One file, overwritten at every epoch end. Not save_last=True with save_top_k=0: Lightning then writes
    # last.ckpt only when training ends, so a killed run had nothing to resume from.
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="last", enable_version_counter=False)
    return [checkpoint, RNGState(), DivergenceGuard(), counter]


def train_and_evaluate(spec: RunSpec) -> dict:
    """Train (or resume) and evaluate one run; write and return its record. Never raises for a run that
    fails or diverges: that is recorded as such, so a study goes on."""
    from benchmark.lightning_cli import build_cli

    previous = _finished(spec)
    if previous is not None:
        return previous
    # a UsageError propagates: the caller fails the run (a study finds bad input before anything trains)
    cli = build_cli(spec.cli_args(), run=False, save_config_callback=None)
    model, data = cli.model, cli.datamodule
    config = _config(cli)
    eval_cfg = spec.evaluation_config
    check_extractor(eval_cfg)
    logger, offline = _logger(spec, config)
    ckpt_dir = spec.run_dir / "checkpoints"
    counter = ImageCount()

    trainer = cli.instantiate_trainer(logger=logger, callbacks=run_callbacks(ckpt_dir, counter))
    record = _start_record(spec, config, _device_name(trainer), offline, write=trainer.global_rank == 0)
    last = ckpt_dir / "last.ckpt"
    continued = _continue_shorter_budget(spec, last)
    resumed = last.exists()
    try:
        start = time.perf_counter()
        trainer.fit(model, datamodule=data, ckpt_path=str(last) if resumed else None)
        train_s = time.perf_counter() - start
        # Images trained on in this call: a resumed run's earlier epochs are not in train_s, and
        # limit_train_batches shortens an epoch. None where unknown (ddp_spawn counts in its workers).
        images = counter.images * trainer.world_size
        record.timings = {"train_s": train_s, "train_images_per_s": images / train_s if images else None,
                             "epochs": trainer.current_epoch, "resumed": resumed, "continued_from": continued}
        _evaluate_into(record, model, data, eval_cfg, _evaluation_trainer(cli), trainer)
    except Diverged as e:
        record.status, record.reason, record.diverged_step = DIVERGED, str(e), e.step
    except UsageError:
        raise
    except Exception as e:  # a failed run is recorded with its reason; the study goes on
        _record_error(record, e, model, trainer)
    if trainer.global_rank == 0:
        _write(record, spec, model, data, eval_cfg, logger)
    return record.as_dict()


def _start_record(spec: RunSpec, config: dict, device: str, offline: str | None, write: bool = True) -> RunRecord:
    """The run's record as training starts, written as running (a leaderboard made meanwhile counts it apart)
    unless ``write`` is false (a DDP rank other than 0), beside its protocol."""
    if offline:
        print(offline, file=sys.stderr, flush=True)
    record = RunRecord.of(spec, config=config, code=code_version(), env=environment(), device=device,
                          wandb_offline=offline)
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    write_json(spec.protocol_path, {"digest": spec.digest, "protocol": spec.protocol()})
    if write:
        write_record(spec.record_path, record)
    return record


def _evaluate_into(record: RunRecord, model, data, eval_cfg: EvaluationConfig, make_trainer, trainer):
    """Evaluate the trained model; the record becomes finished, with its metrics and protocol."""
    start = time.perf_counter()
    out = evaluate(model, data, eval_cfg, make_trainer)
    record.timings.update(evaluate_s=time.perf_counter() - start, evaluate_parts=out["timings"])
    record.status, record.metrics, record.validation = FINISHED, out["metrics"], out["validation"]
    record.protocol = _protocol(model, data, trainer, out)


def _record_error(record: RunRecord, e: Exception, model, trainer):
    traceback.print_exc()
    reason = failure_reason(e)
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        # Non-finite weights that surface as an error in a step (a variant's own check refusing a NaN)
        # before the epoch-end loss check sees them: that run diverged.
        record.status, record.reason = DIVERGED, f"non-finite weights ({reason})"
        record.diverged_step = trainer.global_step
    else:
        record.status, record.reason = FAILED, reason


def _write(record: RunRecord, spec: RunSpec, model, data, eval_cfg: EvaluationConfig, logger):
    """The record and, for a finished run, its sample grid and latent map beside it; W&B's summary."""
    if record.status == FINISHED:
        record.samples = _save_samples(model, spec)
        if model.hparams.latent_dim == 2:
            record.latent_map = _save_latent_map(model, data, spec, eval_cfg.seed)
    write_record(spec.record_path, record)
    _log_to_wandb(logger, record.as_dict(), spec)


def train_members_and_evaluate(specs: list[RunSpec]) -> list[dict]:
    """Train runs of one variant that differ in seed and weight as one batched model (``benchmark.members``),
    then evaluate and record each as its own run; runs that cannot be members (the reason is printed), and a
    group one of whose members diverges, train one by one. Never raises for a group that fails: each of its
    runs is recorded as failed. Returns the records.

    The group checkpoints every epoch in its first run's folder (``checkpoints/members.ckpt``: the stacked
    weights, Adam's moments, each member's generator state), and a rerun of the same runs under the same
    protocols resumes from it. Each member's own checkpoint (``checkpoints/member.ckpt``) holds its model and data
    hyperparameters and its weights, for ``latent-bench evaluate``. A group of a budget ladder continues the
    same group's final checkpoint at the budget below where there is one (``_continue_shorter_group``).
    Members log no training curves to W&B, only each run's final summary."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from benchmark.lightning_cli import build_cli
    from benchmark.members import Members, rng_state, why_not_members

    done = {s.name: r for s in specs if (r := _finished(s)) is not None}
    todo = [s for s in specs if s.name not in done]
    built = []
    for spec in todo:  # each run built as it would be alone, its generators' state taken where its fit would start
        cli = build_cli(spec.cli_args(), run=False, save_config_callback=None)
        eval_cfg = spec.evaluation_config
        check_extractor(eval_cfg)
        built.append((spec, cli, eval_cfg, rng_state()))
    why = (why_not_members([cli.model for _, cli, *_ in built]) or _coupling(built[0][1])) if len(built) > 1 \
        else "one run to train"
    if why is not None:
        print(f"training {len(todo)} run(s) one by one: {why}", file=sys.stderr, flush=True)
        return [train_and_evaluate(s) for s in specs]
    members = Members([cli.model for _, cli, *_ in built], [cli.datamodule for _, cli, *_ in built],
                      [state for *_, state in built])
    first = built[0][1]
    ckpt_dir = todo[0].run_dir / "checkpoints"
    last, group_file = ckpt_dir / "members.ckpt", ckpt_dir / "members.json"
    group = {spec.name: spec.digest for spec in todo}  # the runs, each under its protocol
    resume = last.is_file() and group_file.is_file() and json.loads(group_file.read_text()) == group
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    continued = None
    if not resume:
        last.unlink(missing_ok=True)  # another group's, or another protocol's: never this group's start
        continued = _continue_shorter_group(todo, last)
    write_json(group_file, group)
    counter = ImageCount()  # S a step: a step is one stacked batch of every member
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="members", enable_version_counter=False)
    trainer = first.instantiate_trainer(logger=False, callbacks=[checkpoint, DivergenceGuard(), counter],
                                        enable_checkpointing=True)
    device = _device_name(trainer)
    records, loggers = [], []
    for spec, cli, *_ in built:
        config = _config(cli)
        logger, offline = _logger(spec, config)
        records.append(_start_record(spec, config, device, offline))
        loggers.append(logger)
    try:
        start = time.perf_counter()
        trainer.fit(members, ckpt_path=str(last) if resume or continued else None)
        train_s = time.perf_counter() - start
    except Diverged:
        print("a member diverged: the group's runs train one by one", file=sys.stderr, flush=True)
        return [train_and_evaluate(s) for s in specs]
    except UsageError:
        raise
    except Exception as e:  # the group's runs are recorded as failed; the study goes on
        for (spec, cli, eval_cfg, _), record, logger in zip(built, records, loggers):
            _record_error(record, e, members, trainer)
            _write(record, spec, cli.model, cli.datamodule, eval_cfg, logger)
            done[spec.name] = record.as_dict()
        return [done[s.name] for s in specs]
    # the counter counts a step's stacked batch as its S members; each is a full batch (drop_last)
    images = counter.images * first.datamodule.hparams.batch_size
    for (spec, cli, eval_cfg, _), model, record, logger in zip(built, members.members(), records, loggers):
        data = cli.datamodule
        record.timings = {"train_s": train_s, "train_images_per_s": images / train_s if images else None,
                          "epochs": trainer.current_epoch, "resumed": resume or continued is not None,
                          "continued_from": continued, "members": len(built)}
        _save_member(model, data, spec.run_dir / "checkpoints" / "member.ckpt", trainer)
        try:
            _evaluate_into(record, model, data, eval_cfg, _evaluation_trainer(cli), trainer)
        except Exception as e:  # as a run alone: recorded, and the other members are still evaluated
            _record_error(record, e, model, trainer)
        _write(record, spec, model, data, eval_cfg, logger)
        done[spec.name] = record.as_dict()
    return [done[s.name] for s in specs]


def _coupling(cli) -> str | None:
    """Trainer settings that would tie members' updates together, so that they are not the runs alone."""
    t = cli.config.trainer
    if t.get("gradient_clip_val"):
        return "gradient clipping by norm would clip every member by the norm of all of them"
    if "16" in str(t.get("precision")) and "bf16" not in str(t.get("precision")):
        return "float16's loss scaler would skip every member's step when one of them overflows"
    return None


def _evaluation_trainer(cli):
    """The run's trainer config, progress bar included, without its callbacks, for the evaluation's passes."""
    def make_trainer(**overrides):
        return cli.instantiate_trainer(**{"logger": False, "callbacks": [], "enable_checkpointing": False,
                                          **overrides})
    return make_trainer


def _finished(spec: RunSpec) -> dict | None:
    """The run's finished record, or None (no record, another status, or a file that is not a record)."""
    return _finished_record(spec.record_path)


def _finished_record(path: Path) -> dict | None:
    try:
        record = read_record(path) if path.exists() else None
    except ValueError:  # not a run record (empty, hand-edited): rerun; write_record replaces it
        return None
    return record if record is not None and record.get("status") == FINISHED else None


def _config(cli) -> dict:
    """The run's resolved config as the record holds it."""
    config = json.loads(json.dumps(cli.config.as_dict(), default=str))
    # Linked from the data at instantiation: the parsed config still holds the class default (1, 28, 28).
    config["model"]["init_args"]["data_shape"] = list(cli.model.hparams.data_shape)
    return config


def _save_member(model, data, path: Path, trainer):
    """A checkpoint that ``load_checkpoint`` (and ``latent-bench evaluate``) reads: the weights and the model's
    and the data's hyperparameters, as Lightning writes them, without training state."""
    import lightning as L

    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                  "datamodule_hyper_parameters": dict(data.hparams), "epoch": trainer.current_epoch,
                  "global_step": trainer.global_step, "pytorch-lightning_version": L.__version__}
    model.on_save_checkpoint(checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def record_failure(spec: RunSpec, reason: str) -> dict:
    """The record of a run whose process died before it wrote one (a killed worker, a cancelled cluster job),
    so that the leaderboard counts it and a rerun trains it; a finished record is left as it is."""
    record = RunRecord.of(spec, status=FAILED, reason=reason).as_dict()
    try:
        write_record(spec.record_path, record)
    except FinishedRecordError:
        pass
    return record


def _continue_shorter_budget(spec: RunSpec, last: Path) -> Optional[str]:
    """A run of a budget ladder without a checkpoint of its own starts from the same run's checkpoint at the
    budget below (the first epochs are the same run), so that the ladder costs the longest budget's training
    once; returns that run folder, or None where there is none (a fresh machine: it trains from scratch)."""
    if last.exists() or spec.warm_start is None:
        return None
    shorter = Path(spec.warm_start) / "checkpoints" / "last.ckpt"
    record = spec.record_path.with_name(f"{Path(spec.warm_start).name}.json")  # that run's checkpoint is final
    if not shorter.is_file() or not record.is_file():
        return None
    _copy_checkpoint(shorter, last)
    return spec.warm_start


def _copy_checkpoint(source: Path, last: Path):
    """``source`` copied to ``last`` whole or not at all (a copy killed midway leaves only a .tmp file)."""
    import shutil

    last.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, last.with_suffix(".tmp"))
    os.replace(last.with_suffix(".tmp"), last)


def _continue_shorter_group(specs: list[RunSpec], last: Path) -> Optional[str]:
    """As ``_continue_shorter_budget`` for members: a group whose runs are, in order, the runs of a finished
    group at the budget below starts from that group's final ``members.ckpt``, copied to ``last``; returns
    that group's first run folder, or None where there is none (it trains from the start)."""
    shorter = [spec.warm_start for spec in specs]
    if None in shorter:
        return None
    folder = Path(shorter[0]) / "checkpoints"
    saved, group = folder / "members.ckpt", folder / "members.json"
    if not saved.is_file() or not group.is_file() or list(json.loads(group.read_text())) != \
            [Path(w).name for w in shorter]:
        return None
    records = [spec.record_path.with_name(f"{Path(w).name}.json") for spec, w in zip(specs, shorter)]
    if any(_finished_record(r) is None for r in records):  # every run of that group finished: it is final
        return None
    _copy_checkpoint(saved, last)
    return shorter[0]


def _protocol(model, data, trainer, out) -> dict:
    hp = model.hparams
    return {**out["protocol"], "likelihood": hp.likelihood, "binarize": data.hparams.binarize,
            "network": hp.network, "hidden": list(hp.hidden), "latent_dim": hp.latent_dim,
            "image_size": data.shape[-1],
            "epochs": trainer.current_epoch, "batch_size": data.hparams.batch_size}


def _save_samples(model, spec: RunSpec, n: int = 64) -> Optional[str]:
    """A grid of prior samples next to the record (PNG), for the report's sample panel."""
    from torchvision.utils import save_image

    path = spec.record_path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    images = model.sample(n, generator=torch.Generator(device=model.device).manual_seed(spec.seed)).cpu()
    save_image(images, path, nrow=8, padding=1)
    return path.name


def _save_latent_map(model, data, spec: RunSpec, seed: int) -> str:
    """The latent plane of a 2-D model next to the record (PNG): codes of the test images as the model is
    evaluated on them (binarised once for binary data), beside the decoder on the same square."""
    from benchmark.latent_map import save_latent_map

    test = data.splits["test"]
    return save_latent_map(model, test.x, test.y, spec.record_path.with_suffix(".latent.png"), seed).name


def _log_to_wandb(logger, record: dict, spec: RunSpec):
    if not logger:
        return
    import wandb

    run = logger.experiment
    run.summary.update({f"final/{k}": v for k, v in record["metrics"].items() if v is not None})
    run.summary.update({f"validation/{k}": v for k, v in (record.get("validation") or {}).items() if v is not None})
    run.summary.update({"status": record["status"], **{f"timings/{k}": v for k, v in record["timings"].items()}})
    if record["samples"]:
        run.log({"samples/prior": wandb.Image(str(spec.record_path.with_suffix(".png")))})
    if record.get("latent_map"):
        run.log({"latent_map": wandb.Image(str(spec.record_path.with_name(record["latent_map"])))})
    artifact = wandb.Artifact(f"record-{spec.study}-{spec.name}".replace("/", "-"), type="run-record")
    artifact.add_file(str(spec.record_path))
    run.log_artifact(artifact)
    run.finish()


def load_checkpoint(ckpt: str | Path, map_location="cpu"):
    """The model and the DataModule (set up) of a run's checkpoint, rebuilt from the hyperparameters it holds."""
    from benchmark.data import LatentDataModule

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise UsageError(f"checkpoint {ckpt} does not exist; pass runs/<study>/<run>/checkpoints/last.ckpt")
    try:
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        cls = _variant_class(saved["variant_class"])
        model = cls.load_from_checkpoint(ckpt, map_location=map_location)
        data = LatentDataModule.load_from_checkpoint(ckpt)
    except (KeyError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise UsageError(f"{ckpt} is not a latent-bench checkpoint ({type(e).__name__}); pass a run's last.ckpt") from e
    data.prepare_data()
    data.setup("fit")
    return model, data


def _variant_class(name: str):
    """The LatentVariableModel subclass a checkpoint names (``module.Class``), a user's own included."""
    import importlib

    from benchmark.module import LatentVariableModel

    module, _, qualname = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), qualname)
    except (ImportError, AttributeError, ValueError) as e:
        raise UsageError(f"the checkpoint's model class {name} cannot be imported ({e}); put its module on "
                         f"PYTHONPATH") from e
    if not (isinstance(cls, type) and issubclass(cls, LatentVariableModel)):
        raise UsageError(f"the checkpoint's model class {name} is not a LatentVariableModel")
    return cls


def evaluate_checkpoint(ckpt: str | Path, cfg: EvaluationConfig, output: str | Path | None = None) -> dict:
    """Evaluate a run's checkpoint (the model and DataModule rebuilt from the hyperparameters it holds); returns
    ``{metrics, validation, protocol, timings}``. Run records are never rewritten; ``output`` names a new JSON
    file for the result."""
    import lightning as L

    ckpt = Path(ckpt)
    model, data = load_checkpoint(ckpt)

    def make_trainer(**overrides):
        return L.Trainer(**{"accelerator": "auto", "devices": 1, "logger": False, "enable_checkpointing": False,
                            "enable_model_summary": False, **overrides})  # with progress bars: minutes on a CPU

    with contextlib.redirect_stdout(sys.stderr):  # progress bars too: the caller's stdout is the JSON alone
        out = evaluate(model, data, cfg, make_trainer)
    if output:
        write_record(output, {"study": "evaluate", "run": ckpt.parent.parent.name, "status": FINISHED,
                              "checkpoint": str(ckpt), **out})
    return out
