"""Run records: one JSON file per run, written by the run at ``results/runs/<study>/<run>.json``.

``RunRecord`` names every field once; the runner creates one as ``running`` and writes it, then ``finished``,
``diverged`` or ``failed``; a study records a run whose process died (a killed worker, a cancelled job) as
``failed``. The leaderboard (``benchmark.leaderboard``) reads the records, which it can rebuild from at any time.

Writes are atomic (temp file in the same folder, fsync, ``os.replace``), serialised per folder by a lock
file, and a finished record is never overwritten unless asked.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from benchmark.errors import UsageError

try:
    import fcntl
except ImportError:  # not POSIX: writes stay atomic, only the finished-record check is unserialised
    fcntl = None

STATUSES = ("finished", "diverged", "failed", "running")
REQUIRED_FIELDS = ("study", "run", "status")
LOCK_FILE = ".records.lock"


FINISHED, DIVERGED, FAILED, RUNNING = STATUSES


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunRecord:
    """One run's record: every field a record has, named here once (the JSON is ``as_dict()``).

    ``metrics`` are the test split's, ``validation`` the selection criteria on the validation split
    (``benchmark.selection``); ``setting`` the swept keys' values and ``default_setting`` whether they are the
    configured ones; ``spec_digest`` and ``spec_protocol`` what the run trains and evaluates by
    (``RunSpec.protocol``); ``samples`` and ``latent_map`` PNG paths relative to the record's folder."""
    study: str
    run: str
    dataset: str | None = None
    variant: str | None = None
    seed: int | None = None
    setting: dict = field(default_factory=dict)
    default_setting: bool = True
    budget: int | None = None
    spec_digest: str | None = None
    spec_protocol: dict | None = None
    status: str = RUNNING
    reason: str | None = None
    diverged_step: int | None = None
    config: dict | None = None
    code: dict | None = None
    env: dict | None = None
    device: str | None = None
    timings: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    protocol: dict = field(default_factory=dict)
    samples: str | None = None
    latent_map: str | None = None
    wandb_offline: str | None = None  # why a run asked to log online logged offline, and how to upload it
    created: str = field(default_factory=_now)

    @classmethod
    def of(cls, spec, **fields) -> "RunRecord":
        """The record of the run ``spec`` (a ``RunSpec``) as it starts, ``fields`` filled in."""
        return cls(study=spec.study, run=spec.name, dataset=spec.dataset, variant=spec.variant, seed=spec.seed,
                   setting=dict(spec.setting or {}), default_setting=spec.default_setting, budget=spec.budget,
                   spec_digest=spec.digest, spec_protocol=spec.protocol(), **fields)

    def as_dict(self) -> dict:
        return asdict(self)


class FinishedRecordError(UsageError):
    """Raised instead of overwriting a finished record."""


# ----------------------------------------------------------------------------------------------------------------
# Writing and reading records
# ----------------------------------------------------------------------------------------------------------------

@contextmanager
def _folder_lock(folder: Path):
    """Exclusive lock on ``folder/.records.lock`` (flock: also excludes threads of this process)."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _json_default(obj):
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_record(path: str | Path, record: dict | RunRecord, overwrite: bool = False) -> Path:
    """Write ``record`` to ``path`` atomically: readers see the old file or the new one, never a part.

    Refuses (``FinishedRecordError``) to replace a record whose status is ``finished`` unless ``overwrite``.
    Non-finite floats are written as JSON's common extension ``NaN`` / ``-Infinity`` (Python reads them).
    """
    if isinstance(record, RunRecord):
        record = record.as_dict()
    if any(k not in record for k in REQUIRED_FIELDS) or record["status"] not in STATUSES:
        raise ValueError(f"not a run record: needs {', '.join(REQUIRED_FIELDS)} and a status in {STATUSES}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, default=_json_default) + "\n"  # fail before touching the disk
    with _folder_lock(path.parent):
        if not overwrite and _is_finished(path):
            raise FinishedRecordError(f"{path} holds a finished run; move it away to rerun that run "
                                      "(or pass overwrite=True)")
        atomic_write(path, text)
    return path


def write_json(path: str | Path, obj) -> Path:
    """Any JSON-able ``obj`` to ``path``, atomically (the run's protocol beside its checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(obj, indent=2, default=_json_default) + "\n")
    return path


def atomic_write(path: str | Path, data: str | bytes):
    """Temp file in the same folder, fsync, rename over ``path``, fsync the folder (the rename is durable):
    a reader, another rank or a study beside this one sees the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_finished(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        return read_record(path)["status"] == "finished"
    except (OSError, ValueError) as e:
        warnings.warn(f"replacing unreadable record {path}: {e}")
        return False


def read_record(path: str | Path) -> dict:
    """One record; ``ValueError`` if the file is not JSON or not a run record."""
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    if not isinstance(record, dict) or any(k not in record for k in REQUIRED_FIELDS):
        raise ValueError(f"{path} is not a run record (needs the fields {', '.join(REQUIRED_FIELDS)})")
    return record


def load_records(results_dir: str | Path) -> list[dict]:
    """Every record under ``results_dir/runs/**/*.json``, in path order; unreadable files are skipped
    with a warning."""
    records = []
    for path in sorted(Path(results_dir).glob("runs/**/*.json")):
        try:
            records.append(read_record(path))
        except (OSError, ValueError) as e:
            warnings.warn(f"skipping unreadable record {path}: {e}")
    return records


def code_version(repo: str | Path | None = None) -> dict:
    """``{"commit": sha, "dirty": bool}`` of the git checkout holding ``repo`` (default: this package);
    both None outside a git repository. Untracked files do not count as dirty."""
    cwd = Path(repo) if repo is not None else Path(__file__).resolve().parent

    def git(*args):
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def environment() -> dict:
    """Versions of Python and the packages that change numbers, the platform and the CPU count.
    Reads package metadata only (imports nothing)."""

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    env = {"python": platform.python_version()}
    env.update({name: version(name) for name in
                ("torch", "lightning", "torchmetrics", "wandb", "torch-fidelity", "numpy", "scipy")})
    env.update(platform=platform.platform(), cpu_count=os.cpu_count())
    return env
