"""A run as plain data: what a study expands into and hands to a worker process.

Nothing here imports torch or Lightning (about 10 s a process on a CPU), so a study's parent process can
read, check and dispatch its runs before any worker has loaded them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from benchmark.errors import UsageError
from benchmark.metrics.keys import IW_LADDER


def format_value(value) -> str:
    """A swept value as run names and tables show it: 10.0 -> 10, 0.001 -> 0.001, 'l2' -> l2."""
    return f"{value:g}" if isinstance(value, float) else str(value)


LOCATION_KEYS = ("data.path", "data.init_args.path", "cache_dir", "inception_weights", "trainer.enable_progress_bar")


@dataclass
class RunSpec:
    """Everything a run needs, small enough to travel to a worker process as JSON."""

    study: str
    name: str                       # e.g. "digits-vae-s0"
    dataset: str                    # dataset key of the study (the data config's name)
    variant: str                    # variant key (the model config's name)
    seed: int
    config_files: list[str]         # trainer, model, data YAMLs, in that order
    overrides: dict[str, Any] = field(default_factory=dict)   # dotted keys, e.g. {"trainer.max_epochs": 5}
    evaluation: dict[str, Any] = field(default_factory=dict)  # EvaluationConfig fields
    results_dir: str = "results"
    work_dir: str = "runs"
    wandb: str = "offline"          # online | offline | disabled
    setting: dict[str, Any] = field(default_factory=dict)     # the swept keys' values, e.g. {"model.init_args.weight": 10}
    default_setting: bool = True    # whether ``setting`` is the configured one (the untuned view's run)
    budget: Optional[int] = None    # the study's budget (epochs) of this run, when the study has a ladder
    warm_start: Optional[str] = None  # the run folder of the same run at a smaller budget, to continue from

    @property
    def record_path(self) -> Path:
        return Path(self.results_dir) / "runs" / self.study / f"{self.name}.json"

    @property
    def run_dir(self) -> Path:
        return Path(self.work_dir) / self.study / self.name

    @property
    def protocol_path(self) -> Path:
        """Beside the run's checkpoints: the protocol they were trained by."""
        return self.run_dir / "protocol.json"

    @property
    def evaluation_config(self) -> "EvaluationConfig":
        """The run's evaluation settings, seeded by the run's seed."""
        return EvaluationConfig(**{"seed": self.seed, **self.evaluation})

    @property
    def log_path(self) -> Path:
        """Where the run's own output goes (Lightning's lines, progress bars, a failed run's traceback)."""
        return self.run_dir / "log.txt"

    def protocol(self) -> dict[str, Any]:
        """What the run trains and evaluates by: the configs' contents, the overrides, the evaluation and the
        seed, without what names only where files are (``data.path``, cache folders)."""
        import yaml

        return {"configs": [yaml.safe_load(Path(f).read_text()) if Path(f).is_file() else f for f in self.config_files],
                "overrides": {k: v for k, v in self.overrides.items() if k not in LOCATION_KEYS},
                "evaluation": {k: v for k, v in self.evaluation.items() if k not in LOCATION_KEYS},
                "seed": self.seed}

    @property
    def digest(self) -> str:
        """A fingerprint of ``protocol()``, so that a finished record or a checkpoint is reused only by a run of
        the same protocol."""
        import hashlib

        p = self.protocol()
        text = json.dumps([p["configs"], p["overrides"], p["evaluation"], p["seed"]], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def differences(self, protocol: dict[str, Any]) -> list[str]:
        """How ``protocol`` (another run's) differs from this run's: ``key (theirs -> this run's)`` for each
        override and evaluation field, and whether the config files' contents differ."""
        mine, out = self.protocol(), []
        for part in ("overrides", "evaluation"):
            theirs, ours = protocol.get(part) or {}, mine[part]
            for key in sorted(set(theirs) | set(ours)):
                if json.dumps(theirs.get(key), default=str) != json.dumps(ours.get(key), default=str):
                    out.append(f"{key} ({theirs.get(key, 'unset')} -> {ours.get(key, 'unset')})")
        if json.dumps(protocol.get("configs"), sort_keys=True, default=str) != json.dumps(
                mine["configs"], sort_keys=True, default=str):
            out.append("the config files' contents")
        return out

    def cli_args(self) -> list[str]:
        args = []
        for f in self.config_files:
            args += ["--config", f]
        for k, v in {**self.overrides, "seed_everything": self.seed}.items():
            args += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
        return args


@dataclass
class EvaluationConfig:
    """What to measure after training and how much of it.

    Args:
        iw_samples: K of the importance-weighted bound ``nll_iw``, the largest of the ladder (0 skips it).
        iw_ladder: the smaller K also reported, as ``nll_iw_k{K}``, from the first K of the same samples;
            values above ``iw_samples`` are dropped, ``iw_samples`` is always included (see ``iw_ks``).
        fid_samples: images decoded from the prior (and from the GMM) for FID; 0 skips FID.
        fid_extractor: ``domain`` (a small classifier trained on the dataset, for CPUs) or ``inception``.
        inception_weights: a local Inception file (a TorchScript ``.pt`` or torch-fidelity's ``.pth``).
        gmm_components: components of the full-covariance mixture fitted to training codes (RAE protocol).
        max_codes: codes kept for the Gaussianity battery (a seeded subset; see ``LatentGaussianity``).
        expost_epochs: epochs of the post-hoc fit: the amortised full-covariance Gaussian posterior fitted on the
            training split's ELBO for every decoder, with the model frozen (``PosthocPosterior``); it gives
            ``elbo_posthoc`` and is the proposal of ``nll_iw``.
        seed: seeds every sample drawn by the evaluation.
        cache_dir: where extractors and reference statistics are cached.
    """

    iw_samples: int = 1000
    iw_ladder: tuple[int, ...] = IW_LADDER
    fid_samples: int = 10_000
    fid_extractor: str = "domain"
    inception_weights: Optional[str] = None
    gmm_components: int = 10
    max_codes: int = 10_000
    expost_epochs: int = 5
    seed: int = 0
    cache_dir: Optional[str] = None

    def __post_init__(self):
        # Checked where the config is made (a study's parent, before any run trains): a bad value found by
        # the evaluation itself would surface only after a run's whole training.
        for name, least in (("iw_samples", 0), ("fid_samples", 0), ("gmm_components", 0), ("expost_epochs", 0),
                            ("max_codes", 2), ("seed", None)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or (least is not None and value < least):
                kind = "an integer" if least is None else f"an integer of at least {least}"
                raise UsageError(f"evaluation.{name} must be {kind}, got {value!r}")
        ladder = self.iw_ladder
        if (not isinstance(ladder, (list, tuple))
                or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ladder)):
            raise UsageError(f"evaluation.iw_ladder must be a list of positive integers such as [1, 10, 100], "
                             f"got {ladder!r}")
        self.iw_ladder = tuple(ladder)  # a record's JSON gives a list
        if not isinstance(self.fid_extractor, str):
            raise UsageError(f"evaluation.fid_extractor must be a name such as domain or inception, "
                             f"got {self.fid_extractor!r}")
        if self.inception_weights is not None and not Path(self.inception_weights).is_file():
            raise UsageError(f"evaluation.inception_weights: {self.inception_weights} is not a file; fix the path, "
                             "or drop it to let torch-fidelity download the weights")

    @property
    def iw_ks(self) -> tuple[int, ...]:
        """The K of the IWAE ladder, ascending: ``iw_ladder`` up to ``iw_samples``, and ``iw_samples``;
        empty when ``iw_samples`` is 0."""
        if self.iw_samples == 0:
            return ()
        return tuple(sorted({k for k in self.iw_ladder if k <= self.iw_samples} | {self.iw_samples}))
