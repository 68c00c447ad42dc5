"""Clusters, for real: a study through SLURM (``--executor slurm``), a job cancelled mid-run, and one fit over
two nodes, through ``srun -N2`` and through two ``torchrun`` launchers.

The SLURM tests need a cluster that answers ``sinfo`` (``.ci/slurm.sh`` starts one on this host: two slurmd as
nodes n1 and n2 on 127.0.0.1) and skip elsewhere; the torchrun one runs everywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmark.cli import run_main
from benchmark.records import read_record
from helpers import CONFIGS, REPO, TESTS, console_script, free_port, progress_lines, write_study


def _sinfo() -> str | None:
    """Why SLURM cannot be used here, or None when sinfo answers with a node up."""
    if shutil.which("sinfo") is None:
        return "no SLURM here (no sinfo); .ci/slurm.sh starts a single-host one"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo does not answer ({type(e).__name__})"
    if out.returncode != 0 or not out.stdout.strip():
        return f"sinfo does not answer ({out.stderr.strip() or 'no nodes'}); .ci/slurm.sh starts a cluster"
    return None


slurm = pytest.mark.skipif(_sinfo() is not None, reason=_sinfo() or "")


def env(**extra) -> dict:
    out = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{TESTS}{os.pathsep}{REPO}", **extra}
    out.pop("MASTER_ADDR", None)
    return out


@slurm
def test_a_study_runs_through_slurm_with_each_runs_output_in_its_log(tmp_path, capsys):
    path = write_study(tmp_path, "cluster", ["ae", "vae"], epochs=2, batches=3)
    code = run_main([str(path), "--results", str(tmp_path / "results"), "--work-dir", str(tmp_path / "runs"),
                           "--wandb", "disabled", "--executor", "slurm", "--slurm", '{"timeout_min": 10}'])
    out = capsys.readouterr().out
    assert code == 0, out
    assert any("2 jobs submitted (slurm)" in line for line in progress_lines(out)), out
    for variant in ("ae", "vae"):
        name = f"digits_binary-{variant}-s0"
        assert read_record(tmp_path / "results" / "runs" / "cluster" / f"{name}.json")["status"] == "finished"
        log = (tmp_path / "runs" / "cluster" / name / "log.txt").read_text()
        assert "max_epochs=2" in log  # Lightning's lines of that run, in that run's log


@slurm
def test_a_cancelled_job_is_reported_failed_in_bounded_time_and_the_rerun_resumes_it(tmp_path):
    path = write_study(tmp_path, "cancel", ["vae"], epochs=100, batches=20)
    cmd = console_script() + ["run", str(path), "--results", str(tmp_path / "results"), "--work-dir",
                              str(tmp_path / "runs"), "--wandb", "disabled", "--executor", "slurm"]
    study = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    checkpoint = tmp_path / "runs" / "cancel" / "digits_binary-vae-s0" / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + 180
        while not checkpoint.exists() and study.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert checkpoint.exists(), "the job never wrote a checkpoint"
        jobs = subprocess.run(["squeue", "-h", "-n", "submitit", "-o", "%i"], capture_output=True, text=True,
                              check=True).stdout.split()
        assert jobs, "no job in the queue"
        subprocess.run(["scancel", *jobs], check=True)
        cancelled = time.monotonic()
        out, _ = study.communicate(timeout=120)
    finally:
        if study.poll() is None:
            os.killpg(study.pid, signal.SIGKILL)
    took = time.monotonic() - cancelled
    assert study.returncode == 1, out
    failed = [line for line in progress_lines(out) if "digits_binary-vae-s0: failed" in line]
    assert len(failed) == 1, out
    assert "CANCELLED" in failed[0] and "log.txt" in failed[0] and "_log.err" in failed[0], failed[0]
    assert took < 60, f"{took:.0f} s from scancel to the study's report"
    record = read_record(tmp_path / "results" / "runs" / "cancel" / "digits_binary-vae-s0.json")
    assert record["status"] == "failed" and "CANCELLED" in record["reason"]
    assert "leaderboard written" in out  # the failed record is ranked (counted), not a missing folder
    # the same command again: the run resumes from the checkpoint the cancelled job left
    rerun = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    record = read_record(tmp_path / "results" / "runs" / "cancel" / "digits_binary-vae-s0.json")
    assert record["status"] == "finished" and record["timings"]["resumed"] is True
    assert record["protocol"]["epochs"] == 100


def fit_args(folder: Path) -> list[str]:
    callback = {"class_path": "rank_weights.SaveWeights", "init_args": {"folder": str(folder)}}
    return ["fit", "--config", str(CONFIGS / "trainer" / "cpu.yaml"), "--config", str(CONFIGS / "model" / "vae.yaml"),
            "--config", str(CONFIGS / "data" / "digits.yaml"), "--trainer.num_nodes", "2", "--trainer.devices", "1",
            "--trainer.strategy", "ddp", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "5",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(folder / "runs"),
            f"--trainer.callbacks+={json.dumps(callback)}"]


def assert_equal_trained_weights(folder: Path):
    ranks = [torch.load(folder / f"rank{r}.pt") for r in (0, 1)]
    assert set(ranks[0]) == set(ranks[1]) and ranks[0]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key


@slurm
def test_a_two_node_fit_through_srun_ends_with_equal_weights_on_both_ranks(tmp_path):
    """srun -N2 on nodes whose names do not resolve (n1, n2): MASTER_ADDR comes from SLURM's NodeAddr."""
    proc = subprocess.run(["srun", "-N2", "--ntasks-per-node=1", *console_script(), *fit_args(tmp_path)],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_equal_trained_weights(tmp_path)


def test_a_two_node_fit_through_two_torchrun_launchers_ends_with_equal_weights(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    launchers = [subprocess.Popen([*torchrun, "--node-rank", str(rank), "-m", "benchmark.cli", *fit_args(tmp_path)],
                                  cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank in (0, 1)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in launchers]
    finally:
        for p in launchers:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in launchers] == [0, 0], "\n".join(o[-2000:] for o in outs)
    assert_equal_trained_weights(tmp_path)
