"""Where a study's runs go: one after another in this process, side by side in worker processes (one per GPU
or a share of the CPU cores), or to a cluster through submitit; and the console's one line per event.

Every executor gives each run's own output (Lightning's lines, progress bars, a failed run's traceback) to the
run's ``log.txt``, and records a run whose process died before it wrote its record as failed.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from benchmark.errors import UsageError, failure_reason
from benchmark.spec import RunSpec


@contextlib.contextmanager
def lightning_info_on_stdout():
    """Lightning's INFO lines ("Seed set to 0", "GPU available: ...") go to stdout beside the progress bar, so
    that stderr carries problems only: bad input leaves exactly its one error line there. Lightning makes its
    handlers when it is imported, so enter this after the import."""
    handlers = [h for name in ("lightning.pytorch", "lightning.fabric") for h in logging.getLogger(name).handlers
                if type(h) is logging.StreamHandler]
    streams = [h.stream for h in handlers]
    for h in handlers:
        h.setStream(sys.stdout)
    try:
        yield
    finally:
        for h, stream in zip(handlers, streams):
            h.setStream(stream)


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
    """One line per event: runs done / running / failed, what just happened, and once a run has finished here,
    the time left at this invocation's rate (runs already finished before it, the skipped ones, do not count)."""

    def __init__(self, total: int):
        self.total, self.done, self.failed, self.running, self.skipped = total, 0, 0, 0, 0
        self.start = time.perf_counter()

    def event(self, name: str, what: str):
        elapsed = time.perf_counter() - self.start
        print(f"[{elapsed:7.1f}s | done {self.done}/{self.total} running {self.running} "
              f"failed {self.failed} skipped {self.skipped}{self.left(elapsed)}] {name}: {what}", flush=True)

    def left(self, elapsed: float) -> str:
        """' | ~N min left': the runs to go at the rate of those finished in ``elapsed`` seconds; '' before the
        first or after the last. The rate is wall time per finished run, so runs side by side shorten it."""
        ran, to_go = self.done - self.skipped, self.total - self.done
        if ran <= 0 or to_go <= 0:
            return ""
        seconds = to_go * elapsed / ran
        if seconds < 90:
            return f" | ~{seconds:.0f} s left"
        if seconds < 5400:
            return f" | ~{seconds / 60:.0f} min left"
        return f" | ~{seconds / 3600:.1f} h left"

    def finish(self, name: str, record: dict):
        self.done += 1
        self.failed += record.get("status") != "finished"
        took = record.get("timings", {}).get("train_s")
        self.event(name, record["status"] + (f" ({took:.1f} s training)" if took else "")
                   + (f": {record['reason']}" if record.get("reason") else "")
                   + (f"; {record['wandb_offline']}" if record.get("wandb_offline") else ""))


def run_sequential(specs: list[RunSpec], progress: Progress, members: int | None = 1):
    """One run after another in this process; with ``members`` other than 1, one group of runs after another,
    each trained as members (``member_groups``; None: groups of any size). As in a worker, a run's own output
    (Lightning's lines, progress bars, warnings, a failed run's traceback) goes to its log.txt, a group's to its
    first run's, and the console keeps the study's lines."""
    with lightning_info_on_stdout():
        for group in groups_of(specs, members):
            log = group[0].log_path
            group[0].run_dir.mkdir(parents=True, exist_ok=True)
            progress.running = len(group)
            progress.event(group[0].name, f"started{_more(group)}, output in {log}")
            error = train_group(group)
            for spec in group:
                progress.running -= 1
                _report(spec, error, progress, log)


def train_group(group: list[RunSpec], run=None) -> str | None:
    """Train and evaluate one run (with ``run``, default ``runner.train_and_evaluate``) or a group of members
    (``runner.train_members_and_evaluate``), output in the first run's log.txt; the reason it raised, or None.
    A bad config (UsageError) fails these runs only; the study goes on."""
    from benchmark import runner

    with _output_to(group[0].log_path):
        try:
            if len(group) == 1:
                (run or runner.train_and_evaluate)(group[0])
            else:
                runner.train_members_and_evaluate(group)
        except Exception as e:
            traceback.print_exc()
            return failure_reason(e)
    return None


def _more(group: list[RunSpec]) -> str:
    return f" with {len(group) - 1} more as members" if len(group) > 1 else ""


MEMBER_KEYS = ("seed_everything", "data.seed", "model.init_args.weight")  # what members may differ in


def groups_of(specs: list[RunSpec], members: int | None) -> list[list[RunSpec]]:
    """Each run alone (``members`` 1), or ``member_groups`` of at most ``members`` runs (None: no limit)."""
    return [[spec] for spec in specs] if members == 1 else member_groups(specs, members)


def member_groups(specs: list[RunSpec], size: int | None) -> list[list[RunSpec]]:
    """The runs in groups that may train as members: the same dataset, variant, configs, budget, evaluation and
    overrides but for the seed and the regulariser's weight; at most ``size`` a group (None: no limit)."""
    groups: dict[str, list[RunSpec]] = {}
    for spec in specs:
        rest = {k: v for k, v in spec.overrides.items() if k not in MEMBER_KEYS}
        key = json.dumps([spec.dataset, spec.variant, spec.config_files, rest, spec.evaluation, spec.budget],
                         sort_keys=True, default=str)
        groups.setdefault(key, []).append(spec)
    size = size or len(specs)
    return [group[i: i + size] for group in groups.values() for i in range(0, len(group), size)]


def run_workers(specs: list[RunSpec], slots: list[str], progress: Progress, run=None, members: int | None = 1):
    """Side by side: one long-lived worker process per device slot (a GPU index, or a share of the CPU cores)
    takes runs one after another, so Python, torch and Lightning load once per slot, not once per run. A
    worker that dies takes only its current run with it: that run is recorded as failed, the slot restarts.
    With ``members`` other than 1 a slot takes a group of runs at a time and trains it as members
    (``member_groups``; None: groups of any size)."""
    ctx = multiprocessing.get_context("spawn")  # a fork would copy this process's torch threads and CUDA state
    # A worker killed mid-run (Ctrl-C, a crash) leaves its semaphores (tqdm's lock) to the resource tracker,
    # which removes them and warns on the console after the study's last line; the tracker takes its warning
    # filters from this process's when it starts, on the first spawn.
    quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
    if quiet not in sys.warnoptions:
        sys.warnoptions.append(quiet)
    threads = max(1, (os.cpu_count() or 1) // len(slots))  # the cores are shared by every slot
    pending = groups_of(specs, members)
    workers, running = {}, {}  # slot -> (process, pipe); slot -> the runs it trains
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
                group = running[i] = pending.pop(0)
                for spec in group:
                    spec.run_dir.mkdir(parents=True, exist_ok=True)
                workers[i][1].send([asdict(spec) for spec in group])
                progress.running = sum(map(len, running.values()))
                progress.event(group[0].name, f"started on {'cpu' if slot == 'cpu' else 'cuda:' + slot}{_more(group)}")
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
                group = running.pop(i)
                for spec in group:
                    progress.running = sum(map(len, running.values()))
                    _report(spec, error, progress, group[0].log_path)
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


def _report(spec: RunSpec, error: str | None, progress: Progress, log: Path | None = None):
    from benchmark.records import read_record

    log = log or spec.log_path
    try:
        record = read_record(spec.record_path) if spec.record_path.exists() else None
    except ValueError:
        record = None
    if record is not None and (error is None or record.get("status") == "finished"):
        if record.get("status") == "failed":
            record = {**record, "reason": f"{record['reason']}; see {log}"}
        progress.finish(spec.name, record)  # or a member finished before its group's process failed
    else:  # the run raised before its record (a bad config) or its process died: nobody else records it
        from benchmark.runner import record_failure

        progress.finish(spec.name, record_failure(spec, f"{error or 'no record written'}; see {log}"))


def _slot_worker(slot: str, threads: int, pipe, run=None):
    """A worker's loop: take a run, do it with its output in the run's log.txt, say how it ended."""
    _exit_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent ends the runs
    import torch

    if slot != "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = slot  # read when CUDA starts, which no import has done yet
    torch.set_num_threads(threads)
    while (group := pipe.recv()) is not None:
        error = train_group([RunSpec(**spec) for spec in group], run)
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


