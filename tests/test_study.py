"""The study executor: every run of a study leaves one finished record, a rerun skips finished runs and
resumes a killed one to the same numbers, a diverged run is recorded as such and the study goes on, runs go
side by side in worker processes or through submitit, and W&B's offline files read back.

Runs are tiny (8x8 digits, a few batches of two epochs, a small evaluation). Most studies run in this
process through ``benchmark.cli.run_main``; a killed run, the workers and submitit need other processes, and
each of those pays ~8-10 s of imports.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml

from benchmark import executors
from benchmark import study as study_mod
from benchmark.cli import run_main
from benchmark.records import RunRecord, read_record
from helpers import CONFIGS, DATASET, EVALUATION, REPO, markdown_tables, progress_lines, write_study

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH_SIZE = 64  # configs/data/digits_binary.yaml
RECORD_FIELDS = {f.name for f in fields(RunRecord)}
WANDB = [str(REPO / ".venv" / "bin" / "wandb")] if (REPO / ".venv" / "bin" / "wandb").is_file() else \
    [sys.executable, "-m", "wandb"]


def run_study(path: Path, results: Path, work: Path, *extra: str) -> int:
    return run_main([str(path), "--results", str(results), "--work-dir", str(work), *extra])


def run_name(variant: str, seed: int) -> str:
    return f"{DATASET}-{variant}-s{seed}"


def records_of(results: Path, study: str) -> dict[str, dict]:
    return {p.stem: read_record(p) for p in sorted((results / "runs" / study).glob("*.json"))}


def subprocess_env() -> dict:
    """The test's environment (W&B offline, caches in tmp) on one torch thread, like this process."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


# ------------------------------------------------------------------------------------------------------------
# A finished study (3 variants x 2 seeds), tracked by W&B offline; shared by the record and W&B tests
# ------------------------------------------------------------------------------------------------------------

VARIANTS, SEEDS, EPOCHS, BATCHES = ["ae", "vae", "no_info"], [0, 1], 2, 3


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("study")
    path = write_study(root, "tiny", VARIANTS, SEEDS, EPOCHS, BATCHES)
    results, work = root / "results", root / "runs"
    code = run_study(path, results, work, "--wandb", "offline")
    return {"path": path, "results": results, "work": work, "code": code, "study": "tiny"}


def test_a_study_writes_one_finished_self_describing_record_per_run_and_the_leaderboard(finished_study):
    results = finished_study["results"]
    assert finished_study["code"] == 0
    records = records_of(results, "tiny")
    assert set(records) == {run_name(v, s) for v in VARIANTS for s in SEEDS}
    for name, r in records.items():
        assert set(r) == RECORD_FIELDS, name  # every field, and none the record class does not name
        assert r["status"] == "finished" and r["reason"] is None and r["diverged_step"] is None, (name, r["reason"])
        assert (r["study"], r["run"], r["dataset"]) == ("tiny", name, DATASET)
        assert run_name(r["variant"], r["seed"]) == name
        # the resolved config is the object graph that ran
        assert r["config"]["seed_everything"] == r["seed"]
        assert r["config"]["data"]["seed"] == r["seed"]  # the split follows the run seed
        assert r["config"]["model"]["class_path"].startswith("benchmark.variants.")
        assert r["config"]["model"]["init_args"]["data_shape"] == [1, 8, 8]
        assert r["config"]["trainer"]["max_epochs"] == EPOCHS
        assert set(r["code"]) == {"commit", "dirty"} and r["env"]["torch"] and r["env"]["python"]
        assert r["device"] == "cpu"
        t = r["timings"]
        assert t["train_s"] > 0 and t["evaluate_s"] > 0 and t["epochs"] == EPOCHS and t["resumed"] is False
        # throughput counts the images trained on: limit_train_batches full batches an epoch
        assert t["train_images_per_s"] * t["train_s"] == pytest.approx(EPOCHS * BATCHES * BATCH_SIZE)
        m = r["metrics"]
        posthoc = m["elbo_posthoc"]
        assert math.isfinite(posthoc) and posthoc < 0 and m["distortion_posthoc"] > 0, name
        if r["variant"] == "ae":  # a deterministic encoder has no ELBO of its own
            assert "elbo" not in m
        else:
            assert math.isfinite(m["elbo"]) and m["elbo"] < 0 and m["distortion"] > 0, name
        assert m["nll_iw"] == m[f"nll_iw_k{EVALUATION['iw_samples']}"]
        assert r["protocol"]["likelihood_kind"] == "discrete" and {"nll_iw_bpd", "elbo_posthoc_bpd"} <= set(m)
        assert m["codes_n"] == EVALUATION["max_codes"]  # the battery's seeded subset of the test codes
        assert r["protocol"]["iw_samples"] == EVALUATION["iw_samples"]
        assert r["protocol"]["epochs"] == EPOCHS and r["protocol"]["image_size"] == 8
        assert (results / "runs" / "tiny" / r["samples"]).is_file()
    assert {r["protocol"]["nll_iw_proposal"] for r in records.values()} == {"posthoc"}
    tables = markdown_tables((results / "leaderboard.md").read_text())
    likelihood = next(rows for path, rows in tables.items() if path[0] == "tiny / digits_binary"
                      and path[1].startswith("Likelihood"))
    assert sorted(row["variant"] for row in likelihood) == sorted(VARIANTS)
    assert [row["rank"] for row in likelihood] == [str(i + 1) for i in range(len(VARIANTS))]
    paired = tables["Paired differences to vae", "tiny / digits_binary"]
    assert sorted(row["variant"] for row in paired) == sorted(set(VARIANTS) - {"vae"})
    with open(results / "leaderboard.csv") as f:
        posthoc = {r["variant"]: r for r in csv.DictReader(f) if r["metric"] == "elbo_posthoc"}
    assert set(posthoc) == set(VARIANTS) and all(int(r["n"]) == len(SEEDS) for r in posthoc.values())


def test_a_second_invocation_skips_every_finished_run_without_retraining(finished_study, capsys):
    results, work = finished_study["results"], finished_study["work"]
    files = sorted((results / "runs").rglob("*.json")) + sorted(work.rglob("*.ckpt"))
    assert len(files) == 2 * len(VARIANTS) * len(SEEDS)
    before = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files}
    capsys.readouterr()
    assert run_study(finished_study["path"], results, work, "--wandb", "disabled") == 0
    lines = progress_lines(capsys.readouterr().out)
    assert any("6 runs, 6 already finished" in line for line in lines), lines
    assert all("skipped 6" in line for line in lines), lines
    assert not any("started" in line for line in lines), lines
    assert {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files} == before


# ------------------------------------------------------------------------------------------------------------
# Resuming a killed run
# ------------------------------------------------------------------------------------------------------------

def _checkpoint_epoch(path: Path) -> int | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["epoch"]  # as Lightning loads it
    except (OSError, RuntimeError, EOFError, KeyError):
        return None


def test_a_run_killed_after_a_checkpoint_resumes_to_the_numbers_of_an_uninterrupted_run(tmp_path):
    epochs = 12  # epochs 3..11 (~1 s) are the margin between seeing the checkpoint and the kill
    path = write_study(tmp_path, "resume", ["vae"], [0], epochs=epochs, batches=5)
    killed, fresh = tmp_path / "killed", tmp_path / "fresh"
    run = run_name("vae", 0)
    ckpt = killed / "runs" / "resume" / run / "checkpoints" / "last.ckpt"
    cmd = [sys.executable, "-m", "benchmark.cli", "run", str(path), "--results", str(killed / "results"),
           "--work-dir", str(killed / "runs"), "--wandb", "disabled"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while (epoch := _checkpoint_epoch(ckpt) if ckpt.exists() else None) is None or epoch < 2:
            assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before a checkpoint of epoch 2"
            assert time.monotonic() < deadline, "no checkpoint of epoch 2 within 120 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    at_kill = _checkpoint_epoch(ckpt)
    assert 2 <= at_kill < epochs - 1, at_kill  # killed part way: the resume has epochs left to train
    assert read_record(killed / "results" / "runs" / "resume" / f"{run}.json")["status"] == "running"  # not failed

    assert run_study(path, killed / "results", killed / "runs", "--wandb", "disabled") == 0
    assert run_study(path, fresh / "results", fresh / "runs", "--wandb", "disabled") == 0
    resumed = read_record(killed / "results" / "runs" / "resume" / f"{run}.json")
    reference = read_record(fresh / "results" / "runs" / "resume" / f"{run}.json")
    assert resumed["status"] == reference["status"] == "finished"
    assert resumed["timings"]["resumed"] is True and reference["timings"]["resumed"] is False
    assert resumed["timings"]["epochs"] == reference["timings"]["epochs"] == epochs
    assert resumed["metrics"].keys() == reference["metrics"].keys()
    for key, value in reference["metrics"].items():
        assert resumed["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), key
    # only the epochs after the checkpoint were trained in the resumed call
    images = resumed["timings"]["train_images_per_s"] * resumed["timings"]["train_s"]
    assert images == pytest.approx((epochs - at_kill - 1) * 5 * BATCH_SIZE)


# ------------------------------------------------------------------------------------------------------------
# Divergence
# ------------------------------------------------------------------------------------------------------------

def test_diverged_runs_are_recorded_as_diverged_and_the_study_goes_on(tmp_path, capsys):
    # lr 1e6: the weights of the VAE and the AE turn NaN, so does their loss, and the epoch-end guard stops
    # them (distributions are built unchecked, so a NaN mean raises nothing). no_info trains normally.
    huge_lr = {"model.init_args.lr": 1.0e6}
    path = write_study(tmp_path, "diverge", ["vae", "ae", "no_info"], [0],
                       variant_overrides={"vae": huge_lr, "ae": huge_lr})
    results, work = tmp_path / "results", tmp_path / "runs"
    assert run_study(path, results, work, "--wandb", "offline") == 1  # a run did not finish
    records = records_of(results, "diverge")
    assert records[run_name("no_info", 0)]["status"] == "finished"
    for variant in ("vae", "ae"):
        r = records[run_name(variant, 0)]
        assert r["status"] == "diverged", (variant, r["status"], r["reason"])
        assert isinstance(r["diverged_step"], int) and r["diverged_step"] > 0, variant
        assert "\n" not in r["reason"], r["reason"]  # one line, not a NaN tensor's repr
        assert r["metrics"] == {} and r["samples"] is None
    lines = progress_lines(capsys.readouterr().out)
    assert sum(": diverged" in line for line in lines) == 2, lines
    assert any(run_name("no_info", 0) + ": finished" in line for line in lines), lines
    assert records[run_name("vae", 0)]["reason"].startswith("training loss is nan")
    assert records[run_name("ae", 0)]["reason"].startswith("training loss is nan")
    tables = markdown_tables((results / "leaderboard.md").read_text())
    vae = [row for rows in tables.values() for row in rows if row.get("variant") == "vae" and "diverged" in row]
    assert vae and all((row["diverged"], row["failed"]) == ("1", "0") for row in vae), vae
    summary = inspect_summary(offline_run(work / "diverge" / run_name("vae", 0)))
    assert summary["summary"]["status"] == "diverged"
    assert not any(k.startswith("final/") for k in summary["summary"])


@pytest.mark.parametrize("weights, status", [("nan", "diverged"), ("finite", "failed")])
def test_an_error_after_training_counts_as_divergence_only_when_the_weights_are_not_finite(
        tmp_path, monkeypatch, weights, status):
    # NaN weights can pass the epoch-end loss check (the last step's update made them NaN) and then fail
    # the evaluation, e.g. scikit-learn refusing NaN codes for the GMM
    from benchmark import runner

    def evaluate(model, *args):
        if weights == "nan":
            with torch.no_grad():
                next(model.parameters()).fill_(math.nan)
        raise ValueError("Input X contains NaN.")

    monkeypatch.setattr(runner, "evaluate", evaluate)
    path = write_study(tmp_path, "late", ["ae"], [0], epochs=1, batches=2)
    [spec] = study_mod.expand(study_mod.load_study(path), tmp_path / "results", tmp_path / "runs", "disabled", {})
    record = runner.train_and_evaluate(spec)
    assert record["status"] == status and read_record(spec.record_path)["status"] == status
    assert "Input X contains NaN." in record["reason"]
    assert record["reason"].startswith("non-finite weights") == (weights == "nan")
    if weights == "nan":
        assert record["diverged_step"] > 0  # the step training stopped at
    else:
        assert record["diverged_step"] is None


# ------------------------------------------------------------------------------------------------------------
# Bad or stale records
# ------------------------------------------------------------------------------------------------------------

def test_a_finished_record_is_never_rewritten_and_its_run_never_trained(tmp_path, capsys):
    path = write_study(tmp_path, "fake", ["ae"], [0])
    results, work = tmp_path / "results", tmp_path / "runs"
    record = results / "runs" / "fake" / f"{run_name('ae', 0)}.json"
    record.parent.mkdir(parents=True)
    [spec] = study_mod.expand(study_mod.load_study(path), results, work, "disabled")
    record.write_text(json.dumps({"study": "fake", "run": run_name("ae", 0), "dataset": DATASET, "variant": "ae",
                                  "seed": 0, "status": "finished", "metrics": {"elbo": -1.0},
                                  "spec_digest": spec.digest}))
    before = (record.stat().st_mtime_ns, record.read_bytes())
    assert run_study(path, results, work, "--wandb", "disabled") == 0
    assert (record.stat().st_mtime_ns, record.read_bytes()) == before
    assert not (work / "fake" / run_name("ae", 0)).exists()  # no checkpoint, no W&B run: nothing trained
    assert any("1 already finished" in line for line in progress_lines(capsys.readouterr().out))


def test_unreadable_or_unfinished_records_are_rerun_and_replaced(tmp_path):
    path = write_study(tmp_path, "stale", ["no_info"], [0, 1, 2])
    results, work = tmp_path / "results", tmp_path / "runs"
    folder = results / "runs" / "stale"
    folder.mkdir(parents=True)
    (folder / f"{run_name('no_info', 0)}.json").write_text('{"study": "stale", "run": ')  # cut short
    (folder / f"{run_name('no_info', 1)}.json").write_text("[]")  # JSON, not a record
    (folder / f"{run_name('no_info', 2)}.json").write_text(json.dumps(
        {"study": "stale", "run": run_name("no_info", 2), "status": "failed", "reason": "killed"}))
    with pytest.warns(UserWarning, match="replacing unreadable record"):
        assert run_study(path, results, work, "--wandb", "disabled") == 0
    records = records_of(results, "stale")
    assert {name: r["status"] for name, r in records.items()} == {run_name("no_info", s): "finished" for s in (0, 1, 2)}


# ------------------------------------------------------------------------------------------------------------
# Side by side, and through submitit
# ------------------------------------------------------------------------------------------------------------

def test_a_study_is_read_checked_and_expanded_without_loading_torch_or_lightning(tmp_path):
    """A study's parent process dispatches runs to workers that load torch and Lightning (~10 s a process)
    themselves; bad study input is reported before either is loaded."""
    path = write_study(tmp_path, "light", ["ae", "vae"], [0])
    code = ("import sys; from benchmark import cli, study; "
            f"study.expand(study.load_study({str(path)!r})); "
            f"status = cli.main(['run', {str(tmp_path / 'absent.yaml')!r}]); "
            "print(status, sorted(m for m in ('torch', 'lightning') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "2 []"
    assert "absent.yaml does not exist" in proc.stderr


def test_counting_cpu_workers_does_not_load_torch_on_a_machine_without_gpu_device_nodes():
    if executors.gpu_device_nodes():
        pytest.skip("this machine has GPU device nodes, so torch counts the GPUs")
    code = "import sys; from benchmark import executors; print(executors.parse_devices('2'), 'torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['cpu', 'cpu'] False"


def test_a_sequential_study_prints_only_its_own_lines_and_each_run_writes_its_log(tmp_path):
    """Lightning's lines, warnings and bars go to the run's log.txt, as in a worker (fd-level, so a process)."""
    path = write_study(tmp_path, "console", ["ae"], [0])
    proc = subprocess.run([sys.executable, "-m", "benchmark.cli", "run", str(path), "--results", str(tmp_path / "results"),
                           "--work-dir", str(tmp_path / "runs"), "--wandb", "disabled"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines == progress_lines(proc.stdout) and len(lines) == 4, lines  # start, run started/finished, leaderboard
    log = tmp_path / "runs" / "console" / run_name("ae", 0) / "log.txt"
    assert f"output in {log}" in lines[1] and "finished" in lines[2]
    assert "Seed set to 0" in log.read_text() and "Seed set to" not in proc.stdout + proc.stderr


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended while we looked
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from Linux /proc")
def test_workers_end_with_a_killed_study_instead_of_training_on_as_orphans(tmp_path):
    path = write_study(tmp_path, "orphans", ["vae"], [0, 1], epochs=2000, batches=5)  # runs of a minute or more
    proc = subprocess.Popen([sys.executable, "-m", "benchmark.cli", "run", str(path), "--devices", "2", "--results",
                             str(tmp_path / "results"), "--work-dir", str(tmp_path / "runs"), "--wandb", "disabled"],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        started = 0
        while started < 2:
            line = proc.stdout.readline()
            assert line, "the study ended before both runs started"
            started += "started on cpu" in line
        deadline = time.monotonic() + 10  # a worker just started may still be exec'ing into Python
        while True:
            workers = [pid for pid in _children(proc.pid) if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
            if len(workers) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(workers) == 2, workers
        time.sleep(3)  # the workers are into their runs
        proc.kill()  # SIGKILL: the study's process gets no chance to stop its workers itself
        proc.wait()
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers), "a worker outlived its study"
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing left in the group when the workers ended
            os.killpg(proc.pid, signal.SIGKILL)
    assert not list((tmp_path / "results").rglob("*.json"))  # the runs were stopped, not finished


def test_two_cpu_workers_run_three_runs_two_at_a_time(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    path = write_study(tmp_path, "workers", ["no_info"], [0, 1, 2])
    results, work = tmp_path / "results", tmp_path / "runs"
    assert run_study(path, results, work, "--devices", "2", "--wandb", "disabled") == 0
    lines = progress_lines(capsys.readouterr().out)
    assert any("running 2" in line for line in lines), lines
    records = records_of(results, "workers")
    assert {r["status"] for r in records.values()} == {"finished"} and len(records) == 3
    for name in records:  # each run's output went to its own log, not the study's console
        seed = records[name]["seed"]
        assert f"Seed set to {seed}" in (work / "workers" / name / "log.txt").read_text()


def pid_run(spec):
    """A stand-in for a run: says which process did it, and dies hard for seed 1."""
    from benchmark.records import write_record

    if spec.seed == 1:
        os._exit(3)
    write_record(spec.record_path, {"study": spec.study, "run": spec.name, "dataset": spec.dataset,
                                    "variant": spec.variant, "seed": spec.seed, "status": "finished",
                                    "metrics": {"pid": os.getpid()}, "config": {}})


def test_workers_are_reused_across_runs_and_a_dead_worker_fails_only_its_run(tmp_path):
    study = {"name": "pool", "configs": str(CONFIGS), "datasets": [DATASET], "variants": ["no_info"],
             "seeds": [0, 1, 2, 3, 4]}
    specs = study_mod.expand(study, tmp_path / "results", tmp_path / "runs", "disabled")
    progress = executors.Progress(len(specs))
    executors.run_workers(specs, ["cpu", "cpu"], progress, run=pid_run)
    records = records_of(tmp_path / "results", "pool")
    assert set(records) == {run_name("no_info", s) for s in range(5)}
    dead = records.pop(run_name("no_info", 1))  # recorded by the study, as nobody else could
    assert dead["status"] == "failed" and dead["reason"].startswith("worker exited with 3"), dead["reason"]
    assert {r["status"] for r in records.values()} == {"finished"}
    pids = {r["metrics"]["pid"] for r in records.values()}
    assert 1 <= len(pids) <= 3, pids  # 4 runs on 2 slots, one slot restarted once: not a process per run
    assert progress.done == 5 and progress.failed == 1


def test_progress_estimates_the_time_left_from_the_runs_finished_in_this_invocation(monkeypatch, capsys):
    clock = iter([0.0, 10.0, 610.0, 1210.0])
    monkeypatch.setattr(executors.time, "perf_counter", lambda: next(clock))
    progress = executors.Progress(10)  # t = 0
    progress.skipped = progress.done = 4  # finished before this invocation: no rate from them
    progress.event("s", "started")  # t = 10
    progress.finish("r", {"status": "finished"})  # t = 610: 1 run in 610 s, 5 to go
    progress.finish("r", {"status": "finished"})  # t = 1210: 2 runs in 1210 s, 4 to go
    lines = capsys.readouterr().out.splitlines()
    assert "left" not in lines[0], lines[0]
    assert "| ~51 min left]" in lines[1], lines[1]  # 5 x 610 s
    assert "| ~40 min left]" in lines[2], lines[2]  # 4 x 605 s
    progress.done = 5  # 1 run finished here, 5 to go
    assert progress.left(4000) == " | ~5.6 h left"
    progress.done = 9  # 5 finished here, 1 to go
    assert progress.left(5000) == " | ~17 min left"
    assert progress.left(50) == " | ~10 s left"
    progress.done = 10
    assert progress.left(50) == "", "nothing is left once every run is done"


def test_submitit_local_executor_runs_the_study_and_writes_records(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative results/ and runs/, as the CLI's defaults: the jobs must agree
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    path = write_study(tmp_path / "studies", "sub", ["no_info"], [0])
    code = run_main([str(path), "--executor", "submitit-local", "--wandb", "disabled",
                           "--slurm", json.dumps({"timeout_min": 5})])
    out = capsys.readouterr().out
    assert code == 0, out
    assert any("1 jobs submitted (local)" in line for line in progress_lines(out))
    record = read_record(tmp_path / "results" / "runs" / "sub" / f"{run_name('no_info', 0)}.json")
    assert record["status"] == "finished" and math.isfinite(record["metrics"]["elbo"])
    assert any((tmp_path / "runs" / "submitit").glob("*_result.pkl"))


# ------------------------------------------------------------------------------------------------------------
# W&B offline files, read back without a server
# ------------------------------------------------------------------------------------------------------------

def offline_run(folder: Path) -> Path:
    runs = sorted((folder / "wandb").glob("offline-run-*"))
    assert runs, f"no offline W&B run under {folder}"
    return runs[-1]


def inspect_summary(run_dir: Path) -> dict:
    out = subprocess.run(WANDB + ["leet", "inspect", "--summary", "--json", str(run_dir)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return json.loads(out)


def inspect_run_record(run_dir: Path) -> dict:
    out = subprocess.run(WANDB + ["leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return next(json.loads(line)["run"] for line in out.splitlines() if '"type":"run"' in line)


def test_each_run_reads_back_from_its_offline_wandb_files(finished_study):
    work, results = finished_study["work"], finished_study["results"]
    for variant in VARIANTS:
        for seed in SEEDS:
            assert len(list((work / "tiny" / run_name(variant, seed) / "wandb").glob("offline-run-*"))) == 1
    name = run_name("vae", 0)
    run_dir = offline_run(work / "tiny" / name)
    inspected = inspect_summary(run_dir)
    record = read_record(results / "runs" / "tiny" / f"{name}.json")
    summary = inspected["summary"]
    assert inspected["state"] == "finished" and inspected["name"] == name
    assert summary["status"] == "finished"
    for key, value in record["metrics"].items():
        if value is not None and math.isfinite(value):
            assert summary[f"final/{key}"] == pytest.approx(value), key
    assert summary["timings/train_s"] == pytest.approx(record["timings"]["train_s"])
    assert inspected["config"]["model"]["class_path"] == "benchmark.variants.VAE"
    image = summary["samples/prior"]
    assert image["_type"] == "image-file" and (run_dir / "files" / image["path"]).is_file()
    assert list((run_dir / "files" / "media" / "images").rglob("*.png"))
    assert inspect_run_record(run_dir)["run_group"] == "tiny"


def test_the_leaderboard_is_a_wandb_table_in_the_study_group(finished_study):
    work, results = finished_study["work"], finished_study["results"]
    runs = sorted((work / "tiny" / "wandb").glob("offline-run-*"))
    boards = [r for r in runs if inspect_run_record(r).get("job_type") == "leaderboard"]
    assert len(boards) == 1, runs
    run = inspect_run_record(boards[0])
    assert run["run_group"] == "tiny" and run["display_name"] == "tiny-leaderboard"
    tables = list((boards[0] / "files" / "media" / "table").glob("*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    header, *rows = (results / "leaderboard.csv").read_text().splitlines()
    assert table["columns"] == header.split(",")
    assert len(table["data"]) == len(rows)
    first = dict(zip(table["columns"], table["data"][0]))
    assert isinstance(first["mean"], float) and isinstance(first["n"], (int, float))  # numbers, not text
    assert first["mean"] == pytest.approx(float(rows[0].split(",")[4]))


@pytest.mark.parametrize("variant", ["vae", "ae"])
def test_evaluate_rebuilds_a_run_from_its_checkpoint_and_reproduces_its_metrics(finished_study, variant, tmp_path):
    """``latent-bench evaluate CKPT`` with the study's evaluation settings gives the record's numbers."""
    from benchmark.cli import evaluate_main

    name = run_name(variant, SEEDS[0])
    record = records_of(finished_study["results"], finished_study["study"])[name]
    ckpt = finished_study["work"] / finished_study["study"] / name / "checkpoints" / "last.ckpt"
    out = tmp_path / "evaluated.json"
    settings = [a for k, v in {**EVALUATION, "seed": SEEDS[0]}.items() for a in ("--set", f"{k}={v}")]
    evaluate_main([str(ckpt), *settings, "--output", str(out)])
    metrics = read_record(out)["metrics"]
    for key in ("elbo_posthoc", "nll_iw", "gauss_kl"):
        assert metrics[key] == pytest.approx(record["metrics"][key], rel=1e-5), key


def test_evaluate_prints_json_alone_on_stdout_and_loads_a_user_s_own_variant(finished_study, tmp_path):
    """The console script's stdout parses as JSON (Lightning's lines go to stderr), and a checkpoint whose class
    is a user's subclass of a variant, in a module of their own, is rebuilt as that class."""
    from benchmark.runner import load_checkpoint

    ckpt = finished_study["work"] / finished_study["study"] / run_name("vae", SEEDS[0]) / "checkpoints" / "last.ckpt"
    settings = [a for k, v in {**EVALUATION, "seed": SEEDS[0]}.items() for a in ("--set", f"{k}={v}")]
    proc = subprocess.run([sys.executable, "-m", "benchmark.cli", "evaluate", str(ckpt), *settings], cwd=tmp_path,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "nll_iw" in json.loads(proc.stdout)
    (tmp_path / "my_variants.py").write_text("from benchmark.variants import VAE\n\n\nclass MyVAE(VAE):\n    pass\n")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    saved["variant_class"] = saved["hyper_parameters"]["_class_path"] = "my_variants.MyVAE"  # as its own fit saves
    torch.save(saved, tmp_path / "mine.ckpt")
    sys.path.insert(0, str(tmp_path))
    try:
        model, _ = load_checkpoint(tmp_path / "mine.ckpt")
    finally:
        sys.path.remove(str(tmp_path))
    assert type(model).__qualname__ == "MyVAE"
    saved["variant_class"] = "my_variants.Missing"
    torch.save(saved, tmp_path / "gone.ckpt")
    with pytest.raises(study_mod.UsageError, match="my_variants.Missing cannot be imported"):
        load_checkpoint(tmp_path / "gone.ckpt")


def test_members_give_each_run_the_record_it_gets_alone(finished_study, tmp_path, capsys):
    """``--members auto``: the tiny study's two seeds of each variant train as one model, and every run's record
    has the numbers of the same run trained alone (the finished study), to float rounding; its member checkpoint
    evaluates to them too."""
    from benchmark.cli import evaluate_main

    results, work = tmp_path / "results", tmp_path / "runs"
    assert run_study(finished_study["path"], results, work, "--wandb", "disabled", "--members", "auto") == 0
    alone, together = (records_of(r, finished_study["study"]) for r in (finished_study["results"], results))
    assert set(together) == set(alone) and {r["status"] for r in together.values()} == {"finished"}
    assert len([line for line in progress_lines(capsys.readouterr().out) if "as members" in line]) == len(VARIANTS)
    for name, record in together.items():
        assert record["timings"]["members"] == len(SEEDS)
        for key in ("elbo_posthoc", "nll_iw", "gauss_kl", "distortion_posthoc"):
            assert record["metrics"][key] == pytest.approx(alone[name]["metrics"][key], rel=1e-4, abs=1e-6), (name, key)
    name = run_name("vae", SEEDS[1])
    out = tmp_path / "evaluated.json"
    settings = [a for k, v in {**EVALUATION, "seed": SEEDS[1]}.items() for a in ("--set", f"{k}={v}")]
    evaluate_main([str(work / finished_study["study"] / name / "checkpoints" / "member.ckpt"), *settings,
                   "--output", str(out)])
    assert read_record(out)["metrics"]["nll_iw"] == pytest.approx(together[name]["metrics"]["nll_iw"], rel=1e-5)


def test_runs_that_cannot_be_members_train_one_by_one_and_say_why(tmp_path, capsys):
    path = write_study(tmp_path, "gp", ["rae_gp"], seeds=(0, 1), epochs=1, batches=2)
    assert run_study(path, tmp_path / "r", tmp_path / "w", "--wandb", "disabled", "--members", "auto") == 0
    records = records_of(tmp_path / "r", "gp")
    assert len(records) == 2 and all("members" not in r["timings"] for r in records.values())
    # in the group's log.txt (on the console under pytest, which holds sys.stderr)
    said = (tmp_path / "w" / "gp" / f"{DATASET}-rae_gp-s0" / "log.txt").read_text() + capsys.readouterr().err
    assert "training 2 run(s) one by one: RAE's decoder_reg gp differentiates through the decoder" in said


def test_a_group_whose_evaluation_failed_resumes_from_its_checkpoint_without_training_again(tmp_path, monkeypatch):
    from benchmark import runner

    path = write_study(tmp_path, "again", ["vae"], seeds=(0, 1), epochs=2, batches=3)
    args = (path, tmp_path / "r", tmp_path / "w", "--wandb", "disabled", "--members", "auto")
    evaluate_into = runner._evaluate_into

    def crash(*a, **k):
        raise RuntimeError("the machine went away")

    monkeypatch.setattr(runner, "_evaluate_into", crash)
    assert run_study(*args) == 1
    assert {r["status"] for r in records_of(tmp_path / "r", "again").values()} == {"failed"}
    monkeypatch.setattr(runner, "_evaluate_into", evaluate_into)
    assert run_study(*args) == 0
    records = records_of(tmp_path / "r", "again")
    assert {r["status"] for r in records.values()} == {"finished"}
    assert all(r["timings"]["resumed"] and r["timings"]["epochs"] == 2 for r in records.values())
    # a rerun under another protocol never continues that checkpoint: it trains afresh
    monkeypatch.setattr(runner, "_evaluate_into", crash)
    assert run_study(path, tmp_path / "r3", tmp_path / "w", "--wandb", "disabled", "--members", "auto") == 1
    monkeypatch.setattr(runner, "_evaluate_into", evaluate_into)
    assert run_study(path, tmp_path / "r3", tmp_path / "w", "--wandb", "disabled", "--members", "auto",
                     "--set", "trainer.max_epochs=3") == 0
    assert all(not r["timings"]["resumed"] and r["timings"]["epochs"] == 3
               for r in records_of(tmp_path / "r3", "again").values())
    # and the numbers are those of the group trained without the crash
    assert run_study(path, tmp_path / "r2", tmp_path / "w2", "--wandb", "disabled", "--members", "auto") == 0
    for name, record in records_of(tmp_path / "r2", "again").items():
        assert record["metrics"]["nll_iw"] == pytest.approx(records[name]["metrics"]["nll_iw"], rel=1e-6)


def test_member_groups_join_only_runs_that_differ_in_seed_and_weight(tmp_path):
    study = {"name": "g", "configs": str(CONFIGS), "trainer": "cpu", "datasets": [DATASET],
             "variants": ["vae", "ae"], "seeds": [0, 1], "budgets": [1, 2],
             "sweep": {"vae": {"model.init_args.weight": [0.5, 1.0]}, "ae": {"model.init_args.latent_dim": [4, 8]}}}
    specs = study_mod.expand(study, tmp_path / "r", tmp_path / "w", "disabled")
    groups = executors.member_groups(specs, None)
    # vae: seeds x weights in one group per budget; ae: its latent_dim sweep is not a member key
    assert sorted(len(g) for g in groups) == [2, 2, 2, 2, 4, 4]
    for group in groups:
        assert len({(s.variant, s.budget, s.overrides.get("model.init_args.latent_dim")) for s in group}) == 1
    assert sorted(map(len, executors.member_groups(specs, 3))) == [1, 1, 2, 2, 2, 2, 3, 3]


def test_a_group_whose_training_fails_records_each_run_failed_and_the_study_goes_on(tmp_path, monkeypatch):
    from benchmark.members import Members

    def broken(self, batch, batch_idx):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(Members, "training_step", broken)
    path = write_study(tmp_path, "oom", ["vae", "ae"], seeds=(0, 1), epochs=1, batches=2)
    assert run_study(path, tmp_path / "r", tmp_path / "w", "--wandb", "disabled", "--members", "auto") == 1
    records = records_of(tmp_path / "r", "oom")
    assert len(records) == 4 and {r["status"] for r in records.values()} == {"failed"}
    assert all("CUDA out of memory" in r["reason"] for r in records.values())


def test_worker_slots_take_a_group_of_members_each(tmp_path, capsys):
    """``--devices 2 --members 2``: four seeds in two groups, one per slot, each run recorded as a member."""
    path = write_study(tmp_path, "slots", ["vae"], seeds=(0, 1, 2, 3), epochs=1, batches=2)
    assert run_study(path, tmp_path / "r", tmp_path / "w", "--wandb", "disabled", "--devices", "2",
                     "--members", "2") == 0
    records = records_of(tmp_path / "r", "slots")
    assert len(records) == 4 and all(r["timings"]["members"] == 2 for r in records.values())
    assert len([line for line in progress_lines(capsys.readouterr().out) if "with 1 more as members" in line]) == 2


def test_members_train_in_one_process(tmp_path):
    path = write_study(tmp_path, "m", ["vae"])
    with pytest.raises(study_mod.UsageError, match="--members trains each group in one process"):
        run_study(path, tmp_path / "r", tmp_path / "w", "--members", "auto", "--executor", "submitit-local")
    with pytest.raises(study_mod.UsageError, match="--members 0: give auto or a positive number"):
        run_study(path, tmp_path / "r", tmp_path / "w", "--members", "0")
    assert not (tmp_path / "r").exists()


def test_evaluate_rejects_a_file_that_is_not_a_checkpoint(tmp_path):
    from benchmark.errors import UsageError
    from benchmark.cli import evaluate_main

    bad = tmp_path / "last.ckpt"
    bad.write_text("not a checkpoint")
    with pytest.raises(UsageError, match="not a latent-bench checkpoint"):
        evaluate_main([str(bad)])


@pytest.mark.parametrize("field, value, message", [("trainer", "tpu", "unknown trainer 'tpu'; choose one of .*'cpu'"),
                                                    ("datasets", ["mnits"], "unknown dataset 'mnits'; choose one of .*'mnist'"),
                                                    ("variants", ["vea"], "unknown variant 'vea'; choose one of .*'vae'")])
def test_an_unknown_trainer_dataset_or_variant_is_named_with_the_known_ones(tmp_path, field, value, message):
    study = {"name": "s", "configs": str(CONFIGS), "datasets": ["digits_binary"], "variants": ["vae"], "seeds": [0],
             field: value}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study))
    with pytest.raises(study_mod.UsageError, match=message):
        study_mod.expand(study_mod.load_study(path), str(tmp_path))


@pytest.mark.parametrize("field, value, message", [
    ("iw_samples", -1, "evaluation.iw_samples must be an integer of at least 0, got -1"),
    ("fid_samples", "many", "evaluation.fid_samples must be an integer of at least 0, got 'many'"),
    ("max_codes", 1, "evaluation.max_codes must be an integer of at least 2, got 1"),
    ("expost_epochs", 2.5, "evaluation.expost_epochs must be an integer of at least 0, got 2.5"),
    ("iw_ladder", [0, 10], "evaluation.iw_ladder must be a list of positive integers such as [1, 10, 100], "
                           "got [0, 10]"),
    ("iw_ladder", 100, "evaluation.iw_ladder must be a list of positive integers"),
    ("seed", True, "evaluation.seed must be an integer, got True"),
    ("inception_weights", "absent.pt", "evaluation.inception_weights: absent.pt is not a file")])
def test_bad_evaluation_values_are_refused_when_the_study_is_expanded(tmp_path, field, value, message):
    study = study_mod.load_study(write_study(tmp_path, "bad_eval", ["vae"], [0]))
    with pytest.raises(study_mod.UsageError, match=re.escape(message)):
        study_mod.expand(study, str(tmp_path), evaluation={field: value})


def test_the_iwae_ladder_keeps_the_k_up_to_iw_samples_and_always_iw_samples():
    from benchmark.spec import EvaluationConfig

    assert EvaluationConfig(iw_samples=1000).iw_ks == (1, 10, 100, 1000)
    assert EvaluationConfig(iw_samples=50, iw_ladder=[100, 1, 10, 10]).iw_ks == (1, 10, 50)
    assert EvaluationConfig(iw_samples=5000, iw_ladder=[]).iw_ks == (5000,)
    assert EvaluationConfig(iw_samples=0).iw_ks == ()


def test_an_unknown_fid_extractor_stops_a_run_before_it_trains(tmp_path):
    path = write_study(tmp_path, "bad_extractor", ["ae"], [0])
    with pytest.raises(study_mod.UsageError, match="unknown evaluation.fid_extractor 'incep'; choose one of .*domain"):
        run_study(path, tmp_path / "results", tmp_path / "runs", "--wandb", "disabled",
                  "--set", "evaluation.fid_samples=10", "--set", "evaluation.fid_extractor=incep")
    assert not list((tmp_path / "runs").rglob("*.ckpt"))  # no checkpoint: nothing trained
    assert not list((tmp_path / "results").rglob("*.json"))


def test_inception_weights_that_cannot_load_stop_a_run_before_it_trains(tmp_path, monkeypatch):
    """Offline and without a local file, torch-fidelity cannot fetch Inception's weights: found before
    training, not after it."""
    from benchmark.metrics import extractors

    def offline(self, weights_path=None):
        raise study_mod.UsageError("torch-fidelity could not load its Inception weights (no network)")

    monkeypatch.setattr(extractors.TorchFidelityInceptionV3, "__init__", offline)
    path = write_study(tmp_path, "offline_inception", ["ae"], [0])
    with pytest.raises(study_mod.UsageError, match="could not load its Inception weights"):
        run_study(path, tmp_path / "results", tmp_path / "runs", "--wandb", "disabled",
                  "--set", "evaluation.fid_samples=10", "--set", "evaluation.fid_extractor=inception")
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


def test_a_part_of_the_grid_runs_under_the_study_s_own_run_names(tmp_path):
    path = write_study(tmp_path, "part", ["ae", "vae"], [0, 1])
    results = tmp_path / "results"
    assert run_study(path, results, tmp_path / "runs", "--wandb", "disabled", "--variants", "vae", "--seeds", "1") == 0
    assert list(records_of(results, "part")) == [run_name("vae", 1)]
    study = study_mod.load_study(path)
    assert study_mod.select(study, variants="vae,ae")["variants"] == ["ae", "vae"]  # the study's order
    with pytest.raises(study_mod.UsageError, match=r"--seeds 0,2: 2 not in the study's seeds \['0', '1'\]"):
        study_mod.select(study, seeds="0,2")


def test_set_overrides_evaluation_fields_and_rejects_unknown_ones(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "configs": str(CONFIGS), "datasets": ["digits_binary"],
                                    "variants": ["vae"], "seeds": [0], "evaluation": {"iw_samples": 50}}))
    study = study_mod.load_study(path)
    (spec,) = study_mod.expand(study, str(tmp_path), overrides={"trainer.max_epochs": 1},
                               evaluation={"fid_samples": 0})
    assert spec.evaluation == {"iw_samples": 50, "fid_samples": 0}
    assert spec.overrides["trainer.max_epochs"] == 1
    with pytest.raises(study_mod.UsageError, match="unknown evaluation field.*'iw'"):
        study_mod.expand(study, str(tmp_path), evaluation={"iw": 3})


def test_the_data_split_follows_the_run_seed_unless_data_seed_is_set(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "configs": str(CONFIGS), "datasets": ["digits_binary"],
                                    "variants": ["vae", "ae"], "seeds": [0, 3],
                                    "variant_overrides": {"ae": {"data.seed": 11}}}))
    study = study_mod.load_study(path)
    seeds = {(s.variant, s.seed): s.overrides.get("data.seed") for s in study_mod.expand(study, str(tmp_path))}
    assert seeds == {("vae", 0): 0, ("vae", 3): 3, ("ae", 0): 11, ("ae", 3): 11}
    # the user's --set wins over the run seed, as over the study
    specs = study_mod.expand(study, str(tmp_path), overrides={"data.seed": 5})
    assert {s.overrides["data.seed"] for s in specs} == {5}
    # and reaches the CLI as an ordinary override, so the record's resolved config shows it
    vae3 = next(s for s in study_mod.expand(study, str(tmp_path)) if s.name == "digits_binary-vae-s3")
    args = vae3.cli_args()
    assert args[args.index("--data.seed") + 1] == "3"
    # a data config that sets its own seed keeps it
    configs = tmp_path / "configs"
    for kind in ("trainer", "model", "data"):
        (configs / kind).mkdir(parents=True)
    (configs / "trainer" / "cpu.yaml").write_text((CONFIGS / "trainer" / "cpu.yaml").read_text())
    (configs / "model" / "vae.yaml").write_text((CONFIGS / "model" / "vae.yaml").read_text())
    (configs / "data" / "fixed.yaml").write_text(yaml.safe_dump({"data": {"dataset": "digits", "seed": 7}}))
    fixed = {**study, "configs": str(configs), "datasets": ["fixed"], "variants": ["vae"], "variant_overrides": {}}
    assert all("data.seed" not in s.overrides for s in study_mod.expand(fixed, str(tmp_path)))


# ------------------------------------------------------------------------------------------------------------
# Sweeps, budget ladders, and records of another protocol
# ------------------------------------------------------------------------------------------------------------

def swept_study(tmp_path, **fields) -> dict:
    path = tmp_path / "sw.yaml"
    study = {"name": "sw", "configs": str(CONFIGS), "datasets": [DATASET], "variants": ["vae", "wae_mmd"],
             "seeds": [0, 1], "budgets": [2, 4], "sweep": {"wae_mmd": {"model.init_args.weight": [1, 10.0, 100]}},
             **fields}
    path.write_text(yaml.safe_dump(study))
    return study_mod.load_study(path)


def test_a_sweep_and_budgets_expand_into_named_runs_seed_then_budget_with_the_configured_one_marked(tmp_path):
    specs = study_mod.expand(swept_study(tmp_path), tmp_path / "r", tmp_path / "w", "disabled")
    names = [s.name for s in specs]
    assert names[:4] == [f"{DATASET}-vae-e2-s0", f"{DATASET}-wae_mmd-weight1-e2-s0", f"{DATASET}-wae_mmd-weight10-e2-s0",
                         f"{DATASET}-wae_mmd-weight100-e2-s0"]
    assert len(names) == len(set(names)) == 2 * 2 * 4 and names[-1] == f"{DATASET}-wae_mmd-weight100-e4-s1"
    assert names[4] == f"{DATASET}-vae-e4-s0"  # a seed's whole ladder before the next seed
    by_name = {s.name: s for s in specs}
    spec = by_name[f"{DATASET}-wae_mmd-weight100-e4-s1"]
    assert spec.overrides["model.init_args.weight"] == 100 and spec.overrides["trainer.max_epochs"] == 4
    assert spec.setting == {"model.init_args.weight": 100} and spec.budget == 4 and not spec.default_setting
    assert spec.warm_start == str(tmp_path / "w" / "sw" / f"{DATASET}-wae_mmd-weight100-e2-s1")
    assert by_name[f"{DATASET}-wae_mmd-weight10-e2-s0"].default_setting  # configs/model/wae_mmd.yaml: 10.0
    assert by_name[f"{DATASET}-wae_mmd-weight10-e2-s0"].warm_start is None
    assert by_name[f"{DATASET}-vae-e2-s0"].setting == {} and by_name[f"{DATASET}-vae-e2-s0"].default_setting


def test_the_longer_budget_run_on_its_own_still_continues_the_shorter_one(tmp_path):
    """``--budgets 4`` after ``--budgets 2``: the 4-epoch runs start from the 2-epoch checkpoints."""
    specs = study_mod.expand(study_mod.select(swept_study(tmp_path), budgets="4"), tmp_path / "r", tmp_path / "w",
                             "disabled")
    assert {s.budget for s in specs} == {4}
    assert all(s.warm_start == str(tmp_path / "w" / "sw" / s.name.replace("-e4-", "-e2-")) for s in specs)
    shortest = study_mod.expand(study_mod.select(swept_study(tmp_path), budgets="2"), tmp_path / "r", tmp_path / "w",
                                "disabled")
    assert {s.budget for s in shortest} == {2} and all(s.warm_start is None for s in shortest)


@pytest.mark.parametrize("fields,overrides,message", [
    ({"sweep": {"wae_mmd": {"model.init_args.weight": [1, 100]}}}, {}, "leaves out the configured value 10.0"),
    ({"sweep": {"swae": {"model.init_args.weight": [1]}}}, {}, "sweep of 'swae', which is not among"),
    ({"sweep": {"wae_mmd": {"model.init_args.nonexistent": [1]}}}, {}, "no config sets it"),
    ({"sweep": {"wae_mmd": {"model.init_args.weight": [10, 10]}}}, {}, "distinct values"),
    ({"budgets": [4, 2]}, {}, "'budgets' must be increasing"),
    ({}, {"trainer.max_epochs": 3}, "choose budgets with --budgets"),
    ({}, {"model.init_args.weight": 3}, "fixes a key the study sweeps for wae_mmd"),
    ({"seeds": [0, 0.9]}, {}, "'seeds' must be distinct integers"),
])
def test_a_bad_sweep_or_budget_is_refused_before_anything_runs(tmp_path, fields, overrides, message):
    with pytest.raises(study_mod.UsageError, match=message):
        study_mod.expand(swept_study(tmp_path, **fields), tmp_path / "r", tmp_path / "w", "disabled", overrides)


def test_a_finished_record_of_another_protocol_is_refused_and_one_of_the_same_protocol_is_reused(tmp_path):
    from benchmark.records import write_record

    spec = study_mod.expand(swept_study(tmp_path), tmp_path / "r", tmp_path / "w", "disabled")[0]
    write_record(spec.record_path, {"study": spec.study, "run": spec.name, "status": "finished",
                                    "spec_digest": spec.digest})
    assert study_mod._finished(spec)
    moved = study_mod.expand(swept_study(tmp_path), tmp_path / "r", tmp_path / "w", "disabled",
                             {"data.path": "/elsewhere/mnist.pkl.gz"})[0]
    assert moved.digest == spec.digest and study_mod._finished(moved)  # where the data lies is not the protocol
    other = study_mod.expand(swept_study(tmp_path), tmp_path / "r", tmp_path / "w", "disabled",
                             {"model.init_args.latent_dim": 3}, {"iw_samples": 7})[0]
    assert other.record_path == spec.record_path and other.digest != spec.digest
    with pytest.raises(study_mod.UsageError, match="written by another protocol.*--results and --work-dir"):
        study_mod._finished(other)
    write_record(spec.record_path, {"study": spec.study, "run": spec.name, "status": "finished",
                                    "spec_digest": spec.digest, "spec_protocol": spec.protocol()}, overwrite=True)
    with pytest.raises(study_mod.UsageError, match=r"differs in model.init_args.latent_dim \(unset -> 3\), "
                                                   r"iw_samples \(unset -> 7\)\)"):
        study_mod._finished(other)  # the message names what differs
    write_record(spec.record_path, {"study": spec.study, "run": spec.name, "status": "finished"}, overwrite=True)
    with pytest.raises(study_mod.UsageError, match="did not record its protocol"):
        study_mod._finished(spec)  # a record from before the fingerprint: not taken for this run's


def test_a_checkpoint_of_another_protocol_is_never_resumed(tmp_path):
    """A run killed before its record, rerun with another budget: its checkpoint is refused, not continued."""
    from benchmark.records import write_json

    [spec] = study_mod.expand(swept_study(tmp_path, variants=["vae"], seeds=[0], sweep={}, budgets=[2]),
                              tmp_path / "r", tmp_path / "w", "disabled")
    (spec.run_dir / "checkpoints").mkdir(parents=True)
    (spec.run_dir / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    write_json(spec.protocol_path, {"digest": spec.digest, "protocol": spec.protocol()})
    assert not study_mod._finished(spec)  # the same protocol: resumed
    [longer] = study_mod.expand(swept_study(tmp_path, variants=["vae"], seeds=[0], sweep={}, budgets=[2]),
                                tmp_path / "r", tmp_path / "w", "disabled", {"model.init_args.lr": 0.01})
    with pytest.raises(study_mod.UsageError, match=r"checkpoint in .* trained by another protocol "
                                                   r"\(differs in model.init_args.lr \(unset -> 0.01\)\)"):
        study_mod._finished(longer)


def test_a_budget_ladder_run_continues_the_shorter_one_to_the_numbers_of_a_run_trained_straight(tmp_path):
    """The 4-epoch run starts from the 2-epoch run's checkpoint and ends where a run trained 4 epochs in one
    go ends; both record their validation criteria beside the test metrics."""
    evaluation = {**EVALUATION, "fid_samples": 50}
    overrides = {"trainer.limit_train_batches": 3, "trainer.enable_progress_bar": False}
    ladder = swept_study(tmp_path, variants=["vae"], seeds=[0], sweep={}, overrides=overrides, evaluation=evaluation)
    straight = {**ladder, "name": "straight", "budgets": [4]}
    for study in (ladder, straight):
        path = tmp_path / f"{study['name']}.yaml"
        path.write_text(yaml.safe_dump({k: v for k, v in study.items() if k != "configs"} | {"configs": str(CONFIGS)}))
        assert run_study(path, tmp_path / "results", tmp_path / "runs", "--wandb", "disabled") == 0
    continued = read_record(tmp_path / "results" / "runs" / "sw" / f"{DATASET}-vae-e4-s0.json")
    reference = read_record(tmp_path / "results" / "runs" / "straight" / f"{DATASET}-vae-e4-s0.json")
    assert continued["timings"]["continued_from"].endswith(f"{DATASET}-vae-e2-s0")
    assert reference["timings"]["continued_from"] is None and continued["budget"] == 4
    images = continued["timings"]["train_images_per_s"] * continued["timings"]["train_s"]
    assert images == pytest.approx(2 * 3 * BATCH_SIZE)  # only epochs 3 and 4 trained
    for key, value in reference["metrics"].items():
        assert continued["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), key
    assert set(continued["validation"]) >= {"elbo_posthoc", "kid_prior", "fid_prior"}
    assert continued["validation"]["elbo_posthoc"] != continued["metrics"]["elbo_posthoc"]  # another split


def test_members_of_a_budget_ladder_continue_the_group_below_to_the_numbers_of_a_group_trained_straight(tmp_path):
    """With --members the 4-epoch group of two seeds starts from the 2-epoch group's final checkpoint, trains
    only epochs 3 and 4, and ends where the same group trained 4 epochs in one go ends."""
    overrides = {"trainer.limit_train_batches": 3, "trainer.enable_progress_bar": False}
    ladder = swept_study(tmp_path, variants=["vae"], seeds=[0, 1], sweep={}, overrides=overrides,
                         evaluation={**EVALUATION, "fid_samples": 50})
    straight = {**ladder, "name": "straight", "budgets": [4]}
    for study in (ladder, straight):
        path = tmp_path / f"{study['name']}.yaml"
        path.write_text(yaml.safe_dump({k: v for k, v in study.items() if k != "configs"} | {"configs": str(CONFIGS)}))
        assert run_study(path, tmp_path / "results", tmp_path / "runs", "--wandb", "disabled", "--members", "auto") == 0
    for seed in (0, 1):
        continued = read_record(tmp_path / "results" / "runs" / "sw" / f"{DATASET}-vae-e4-s{seed}.json")
        reference = read_record(tmp_path / "results" / "runs" / "straight" / f"{DATASET}-vae-e4-s{seed}.json")
        assert continued["timings"]["members"] == reference["timings"]["members"] == 2
        assert continued["timings"]["continued_from"].endswith(f"{DATASET}-vae-e2-s0")  # the group's first run
        assert reference["timings"]["continued_from"] is None
        images = continued["timings"]["train_images_per_s"] * continued["timings"]["train_s"]
        assert images == pytest.approx(2 * 2 * 3 * BATCH_SIZE)  # 2 members, only epochs 3 and 4 trained
        for key, value in reference["metrics"].items():
            assert continued["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), key


@pytest.mark.parametrize("devices", [None, "2"], ids=["sequential", "workers"])
def test_ctrl_c_prints_one_line_exits_130_and_the_rerun_resumes(tmp_path, devices):
    path = write_study(tmp_path, "stop", ["vae"], [0, 1], epochs=40, batches=5)
    results, work = tmp_path / "results", tmp_path / "runs"
    ckpt = work / "stop" / run_name("vae", 0) / "checkpoints" / "last.ckpt"
    cmd = [sys.executable, "-m", "benchmark.cli", "run", str(path), "--results", str(results), "--work-dir", str(work),
           "--wandb", "disabled", *(["--devices", devices] if devices else [])]
    if devices:  # a progress bar's lock is a semaphore that a killed worker leaves behind
        cmd += ["--set", "trainer.enable_progress_bar=true"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while _checkpoint_epoch(ckpt) is None if ckpt.exists() else True:
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, (out, err)
    assert err.strip().splitlines() == ["latent-bench: interrupted; rerun the same command to resume"], err
    assert read_record(results / "runs" / "stop" / f"{run_name('vae', 0)}.json")["status"] == "running"  # not failed
    extra = ["--set", "trainer.enable_progress_bar=true"] if devices else []
    assert run_study(path, results, work, "--wandb", "disabled", "--seeds", "0", *extra) == 0
    assert read_record(results / "runs" / "stop" / f"{run_name('vae', 0)}.json")["timings"]["resumed"] is True


# ------------------------------------------------------------------------------------------------------------
# The same records for the same runs, before and after the code's reorganisation
# ------------------------------------------------------------------------------------------------------------

def test_the_same_runs_give_the_records_of_the_code_before_its_reorganisation(tmp_path):
    """``tests/data/same_records_1528bdc.json`` holds the metrics of three tiny runs (a deterministic encoder, a
    diagonal and a full-covariance posterior) written by commit 1528bdc, before the stages became files and
    reparametrisation a dispatch: this code gives the same keys and the same numbers.

    The same numbers to a relative 1e-4, not to machine precision: another CPU's kernels round differently, and
    the p-values far in a tail amplify that (forcing SSE kernels here moved mardia_skew_p by 5.5e-6 and hz_p by
    9e-7; a CI machine moved hz_p by 1.7e-6). Scaling a posterior's draw by 1.001 moves the VAE's worst metric
    by 1.5e-2 and 11 of the 98 numbers by more than 1e-4, so the check still sees a 0.1 % change."""
    before = json.loads((REPO / "tests" / "data" / "same_records_1528bdc.json").read_text())
    path = tmp_path / "same_records.yaml"
    path.write_text(yaml.safe_dump({
        "name": "same_records", "trainer": "cpu", "datasets": [DATASET], "variants": ["ae", "vae", "vae_fullcov"],
        "seeds": [0], "evaluation": EVALUATION,
        "overrides": {"trainer.max_epochs": 2, "trainer.limit_train_batches": 3, "trainer.enable_progress_bar": False}}))
    assert run_study(path, tmp_path / "results", tmp_path / "runs", "--wandb", "disabled") == 0
    after = records_of(tmp_path / "results", "same_records")
    assert set(after) == set(before)
    for name, old in before.items():
        for part in ("metrics", "validation"):
            new = after[name][part]
            assert set(new) == set(old[part]), (name, part, set(new) ^ set(old[part]))
            for key, value in old[part].items():
                assert new[key] == pytest.approx(value, rel=1e-4, abs=1e-9, nan_ok=True), (name, part, key)
