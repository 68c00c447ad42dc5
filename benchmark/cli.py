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

import argparse
import json
import os
import sys
from pathlib import Path

from benchmark.errors import INTERRUPTED, Interrupted, UsageError, plain


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


def run_main(argv: list[str]) -> int:
    """``latent-bench run STUDY``: 0 when every run finished, 1 when one failed or diverged."""
    from benchmark import study

    parser = argparse.ArgumentParser(prog="latent-bench run", description=plain(study.__doc__.split("\n\n")[0]))
    parser.add_argument("study", help="a study YAML such as configs/studies/quick.yaml, or a packaged study's key")
    parser.add_argument("--devices", default=None,
                        help="run side by side: 'auto', GPU indices '0,1', or a number of CPU workers")
    parser.add_argument("--per-device", type=int, default=1,
                        help="runs side by side on each device (small models leave a GPU idle)")
    parser.add_argument("--members", default=None, metavar="auto|N",
                        help="train runs of a variant that differ in seed and weight as one batched model, in this "
                             "process: auto, or at most N a model")
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
    overrides = parse_assignments(args.set)
    try:
        slurm = json.loads(args.slurm)
    except json.JSONDecodeError as e:
        raise UsageError(f"--slurm {args.slurm!r} is not JSON ({e.msg}); write e.g. '{{\"gpus_per_node\": 1}}'") from e
    return study.run(args.study, results=args.results, work_dir=args.work_dir, devices=args.devices,
                     per_device=args.per_device, executor=args.executor, slurm=slurm, wandb=args.wandb,
                     overrides=overrides, members=args.members, datasets=args.datasets, variants=args.variants,
                     seeds=args.seeds, budgets=args.budgets)


def evaluate_main(argv: list[str]):
    """``latent-bench evaluate CKPT [--set FIELD=VALUE ...] [--output FILE]``: evaluate a run's checkpoint
    (the model and DataModule are rebuilt from the hyperparameters it holds) and print the metrics as JSON.
    Run records are never rewritten; ``--output`` writes the result to a new JSON file."""
    from benchmark.runner import evaluate_checkpoint
    from benchmark.spec import EvaluationConfig

    parser = argparse.ArgumentParser(prog="latent-bench evaluate", description=plain(evaluate_main.__doc__))
    parser.add_argument("checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="an EvaluationConfig field, e.g. --set iw_samples=5000")
    parser.add_argument("--output", default=None, help="write {metrics, protocol} to this JSON file")
    args = parser.parse_args(argv)
    cfg = EvaluationConfig(**parse_assignments(args.set, EvaluationConfig.__dataclass_fields__))
    out = evaluate_checkpoint(args.checkpoint, cfg, args.output)
    print(json.dumps(out["metrics"], indent=2))


def leaderboard_main(argv: list[str] | None = None) -> Path:
    """``latent-bench leaderboard [RESULTS_DIR] [--references FILE] [--reference-variant VARIANT] [--beside
    FOLDER ...]``: prints and returns the .md path."""
    from benchmark.leaderboard import REFERENCE_VARIANT, write_leaderboard

    parser = argparse.ArgumentParser(prog="latent-bench leaderboard",
                                     description="Tables and plots from the run records in RESULTS_DIR.")
    parser.add_argument("results_dir", nargs="?", default="results", metavar="RESULTS_DIR")
    parser.add_argument("--references", default=None,
                        help="published values to compare with (default: RESULTS_DIR/references.yaml)")
    parser.add_argument("--reference-variant", default=REFERENCE_VARIANT, metavar="VARIANT",
                        help="the variant every other one is compared with, paired by seed (default: vae)")
    parser.add_argument("--beside", action="append", default=[], metavar="FOLDER",
                        help="another results folder (e.g. the committed results) whose rows are ranked with these, "
                             "each marked with the protocol fields that differ; repeatable")
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    md = write_leaderboard(args.results_dir, args.references, args.reference_variant, args.beside)
    print(md)
    return md


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else "-h"
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a user's variant module in the working folder imports, as under python -m
    try:
        # Lightning is imported only by the commands that need it: a study's parent process stays light.
        if command in ("fit", "validate", "test", "predict"):
            from benchmark.executors import lightning_info_on_stdout
            from benchmark.lightning_cli import build_cli
            with lightning_info_on_stdout():
                build_cli(None if argv == sys.argv[1:] else argv, save_config_kwargs={"overwrite": True})
        elif command == "run":
            return run_main(argv[1:])
        elif command == "evaluate":  # Lightning's lines stay on stderr: stdout is the JSON alone
            evaluate_main(argv[1:])
        elif command == "leaderboard":
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
