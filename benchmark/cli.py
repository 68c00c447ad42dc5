"""latent-bench: train, evaluate and compare latent-variable models.

    latent-bench fit  --config configs/trainer/cpu.yaml --config configs/model/vae.yaml --config configs/data/digits.yaml
    latent-bench test --config ... --ckpt_path CKPT
    latent-bench run STUDY.yaml [--devices 0,1 | auto] [--wandb online|offline|disabled]
    latent-bench evaluate CKPT
    latent-bench leaderboard [RESULTS_DIR]

Bad input (an unknown key or field, a bad value, a missing or corrupt file) prints one line naming the
problem and the fix, and exits with status 2.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager

from benchmark.errors import INTERRUPTED, Interrupted, UsageError, plain


@contextmanager
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


def parse_assignments(items: list[str], fields=None) -> dict:
    """``--set KEY=VALUE`` options -> {KEY: VALUE}, values read as YAML; ``fields`` limits the keys."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or (fields is not None and key not in fields):
            allowed = f" with KEY one of {sorted(fields)}" if fields is not None else ", e.g. trainer.max_epochs=2"
            raise UsageError(f"--set {item!r}: write KEY=VALUE{allowed}")
        out[key] = yaml.safe_load(value)
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else "-h"
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a user's variant module in the working folder imports, as under python -m
    try:
        # Lightning is imported only by the commands that need it: a study's parent process stays light.
        if command in ("fit", "validate", "test", "predict"):
            from benchmark.lightning_cli import build_cli
            with lightning_info_on_stdout():
                build_cli(None if argv == sys.argv[1:] else argv, save_config_kwargs={"overwrite": True})
        elif command == "run":
            from benchmark.study import main as study_main
            return study_main(argv[1:])  # 1 when a run failed or diverged
        elif command == "evaluate":  # Lightning's lines stay on stderr: stdout is the JSON alone
            from benchmark.runner import evaluate_checkpoint_main
            evaluate_checkpoint_main(argv[1:])
        elif command == "leaderboard":
            from benchmark.leaderboard import leaderboard_main
            leaderboard_main(argv[1:])
        else:
            print(plain(__doc__).strip())
            return 0 if command in ("-h", "--help") else 2
    except UsageError as e:
        print(f"latent-bench: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, always
        return 2
    except (Interrupted, KeyboardInterrupt):
        print(f"latent-bench: {INTERRUPTED}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
