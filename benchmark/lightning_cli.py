"""The model, the data and the trainer, built from YAML configs by LightningCLI (``latent-bench fit`` and
every run of a study)."""

from __future__ import annotations

import re
import warnings
from argparse import ArgumentError

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningCLI

import benchmark.variants  # noqa: F401  (imported, the variants are the subclasses that --help lists)
from benchmark.data import LatentDataModule
from benchmark.errors import UsageError
from benchmark.module import LatentVariableModel

# Lightning (2.6) still builds torch's deprecated LeafSpec when it moves a batch: a FutureWarning in every run's
# output that is Lightning's to fix and changes nothing here.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
# On a machine with SLURM installed (a cluster's login node) Lightning hints at srun for every Trainer made
# outside a job; a study's jobs go through submitit, which runs them under srun itself.
warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")
# The epoch's objective terms are TermMeans metrics, reduced over the processes before they are logged: the
# advice to log them with sync_dist=True, once per term under DDP, does not apply.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(train|val|test)/")


class LatentBenchCLI(LightningCLI):
    """LightningCLI whose model's image shape comes from the DataModule."""

    def add_arguments_to_parser(self, parser):
        parser.link_arguments("data.shape", "model.init_args.data_shape", apply_on="instantiate")
        parser.link_arguments("data.levels", "model.init_args.levels", apply_on="instantiate")

    def instantiate_classes(self):
        super().instantiate_classes()
        check_compatible(self.model, self.datamodule)


def check_compatible(model: LatentVariableModel, data: LatentDataModule):
    """Fail before training when the likelihood cannot model the data."""
    name, discrete, binary = model.hparams.likelihood, model.likelihood.discrete, model.likelihood.binary
    if binary and not data.binary:
        raise UsageError(f"the {name} likelihood needs binary data but data.binarize is none; "
                         "set data.binarize to dynamic or static, or use model.init_args.likelihood "
                         "discretized_gaussian")
    if discrete and data.hparams.dequantize:
        raise UsageError(f"the {name} likelihood is a probability of grid pixels but data.dequantize is true; "
                         "set data.dequantize false, or use model.init_args.likelihood gaussian")
    if discrete and not binary and model.hparams.levels != data.levels:
        raise UsageError(f"the {name} likelihood has {model.hparams.levels} levels but the data has "
                         f"{data.levels}; drop model.init_args.levels (it is linked from the data)")


class PlainHelpFormatter(DefaultHelpFormatter):
    """--help without reST's double backticks (Lightning's and this package's docstrings use them)."""

    def _expand_help(self, action) -> str:
        return super()._expand_help(action).replace("``", "")


def slurm_main_address():
    """Under a SLURM job of several nodes, ``MASTER_ADDR`` for Lightning where the first node's name does not
    resolve (a cluster whose node names are not host names): that node's address as SLURM knows it
    (``NodeAddr``). Otherwise every rank would hang resolving the name. A value already set is kept."""
    import os
    import socket
    import subprocess

    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes or "MASTER_ADDR" in os.environ or int(os.environ.get("SLURM_NNODES", "1")) < 2:
        return
    try:
        first = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                               timeout=30, check=True).stdout.split()[0]
        try:
            socket.getaddrinfo(first, None)
            return  # Lightning resolves it itself
        except OSError:
            pass
        info = subprocess.run(["scontrol", "show", "node", "-o", first], capture_output=True, text=True,
                              timeout=30, check=True).stdout
    except (OSError, IndexError, subprocess.SubprocessError):
        return
    found = re.search(r"NodeAddr=(\S+)", info)
    if found:
        os.environ["MASTER_ADDR"] = found.group(1)


def build_cli(args, run: bool = True, **kwargs) -> LatentBenchCLI:
    """Parse ``args`` (a list of CLI tokens) into the model, data and trainer; bad input -> UsageError."""
    slurm_main_address()
    try:
        with warnings.catch_warnings():  # the tokens are always ours; sys.argv belongs to whoever called
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            return LatentBenchCLI(LatentVariableModel, LatentDataModule, subclass_mode_model=True, args=args,
                                  run=run, seed_everything_default=0,
                                  parser_kwargs={"exit_on_error": False, "default_env": False,
                                                 "formatter_class": PlainHelpFormatter}, **kwargs)
    except ArgumentError as e:
        raise UsageError(_one_line(e)) from e
    except Exception as e:  # jsonargparse wraps errors raised while instantiating classes
        cause = e
        while cause is not None and not isinstance(cause, UsageError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}
_NOISE = ("NoneType", "Given value", "Subtypes:", "Errors:", "Does not validate against any", "Parser key")


def _one_line(e: BaseException) -> str:
    """jsonargparse's nested report -> the key and the value it refused, its informative lines, and where to
    look up the valid fields."""
    text = str(e)
    key, value = re.search(r'Parser key "([^"]+)"', text), re.search(r"Given value: (.*)", text)
    lines = [s.strip(" -") for s in text.splitlines()]
    lines = [s for s in lines if s and not any(n in s for n in _NOISE)] or [type(e).__name__]
    where = f"{key.group(1)}={value.group(1).strip()}: " if key and value else (f"{key.group(1)}: " if key else "")
    lines = [re.sub(r"an? <class '([\w.]+)'>", lambda m: _TYPE_WORDS.get(m.group(1), f"a {m.group(1)}"), s)
             for s in lines]  # "Expected a <class 'int'>" -> "Expected an integer"
    return where + "; ".join(lines[:2]) + " (valid fields: latent-bench fit --model.help CLASS, or --print_config)"
