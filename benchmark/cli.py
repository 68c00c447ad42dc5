"""The ``latent-bench`` entry point.

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
import sys
import warnings
from argparse import ArgumentError
from contextlib import contextmanager

from lightning.pytorch.cli import LightningCLI

from benchmark.data import LatentDataModule
from benchmark.errors import UsageError
from benchmark.module import LatentVariableModel


class LatentBenchCLI(LightningCLI):
    """LightningCLI whose model's image shape comes from the DataModule."""

    def add_arguments_to_parser(self, parser):
        parser.link_arguments("data.shape", "model.init_args.data_shape", apply_on="instantiate")

    def instantiate_classes(self):
        super().instantiate_classes()
        check_compatible(self.model, self.datamodule)


def check_compatible(model: LatentVariableModel, data: LatentDataModule):
    """Fail before training when the likelihood cannot model the data."""
    if model.hparams.likelihood == "bernoulli" and not data.binary:
        raise UsageError("the Bernoulli likelihood needs binary data but data.binarize is none; "
                         "set data.binarize to dynamic or static, or use model.init_args.likelihood gaussian")

def build_cli(args, run: bool = True, **kwargs) -> LatentBenchCLI:
    """Parse ``args`` (a list of CLI tokens) into the model, data and trainer; bad input -> UsageError."""
    try:
        with warnings.catch_warnings():  # the tokens are always ours; sys.argv belongs to whoever called
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            return LatentBenchCLI(LatentVariableModel, LatentDataModule, subclass_mode_model=True, args=args,
                                  run=run, seed_everything_default=0,
                                  parser_kwargs={"exit_on_error": False, "default_env": False}, **kwargs)
    except ArgumentError as e:
        raise UsageError(_one_line(e)) from e
    except Exception as e:  # jsonargparse wraps errors raised while instantiating classes
        cause = e
        while cause is not None and not isinstance(cause, UsageError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


_NOISE = ("NoneType", "Given value", "Subtypes:", "Errors:", "Does not validate against any", "Parser key")


def _one_line(e: BaseException) -> str:
    """jsonargparse's nested report -> its informative lines, plus where to look up the valid fields."""
    lines = [s.strip(" -") for s in str(e).splitlines()]
    lines = [s for s in lines if s and not any(n in s for n in _NOISE)] or [type(e).__name__]
    return "; ".join(lines[:2]) + " (valid fields: latent-bench fit --model.help CLASS, or --print_config)"


@contextmanager
def _lightning_info_on_stdout():
    """Lightning's INFO lines ("Seed set to 0", "GPU available: ...") go to stdout beside the progress bar, so
    that stderr carries problems only: bad input leaves exactly its one error line there."""
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
    try:
        with _lightning_info_on_stdout():
            if command in ("fit", "validate", "test", "predict"):
                build_cli(None if argv == sys.argv[1:] else argv, save_config_kwargs={"overwrite": True})
            elif command == "run":
                from benchmark.study import main as study_main
                return study_main(argv[1:])  # 1 when a run failed or diverged
            elif command == "evaluate":
                from benchmark.runner import evaluate_checkpoint_main
                evaluate_checkpoint_main(argv[1:])
            elif command == "leaderboard":
                from benchmark.records import leaderboard_main
                leaderboard_main(argv[1:])
            else:
                print(__doc__.strip())
                return 0 if command in ("-h", "--help") else 2
    except UsageError as e:
        print(f"latent-bench: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, always
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
