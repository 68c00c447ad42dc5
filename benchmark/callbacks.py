"""Callbacks that make a run exactly resumable and stop it cleanly when it diverges."""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"training loss is {loss} at step {step}")
        self.step = step


class DivergenceGuard(L.Callback):
    """Stops the run when an epoch's training loss is not finite. The step losses are summed on the device
    and checked once an epoch, so the training step never waits on the host; one NaN step makes the sum NaN."""

    def __init__(self):
        self._sum = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"].detach()  # automatic optimisation hands the step's output over as a dict
        self._sum = loss if self._sum is None else self._sum + loss

    def on_train_epoch_end(self, trainer, pl_module):
        total, self._sum = self._sum, None
        if total is not None and not torch.isfinite(total):
            raise Diverged(trainer.global_step, float(total))


class ImageCount(L.Callback):
    """Counts the training images this process trains on in one ``fit`` (after a resume: since the resume),
    for the throughput in the run record."""

    def __init__(self):
        self.images = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.images += len(batch[0])


class RNGState(L.Callback):
    """Saves the Python, NumPy and torch (CPU and CUDA) generators in every checkpoint and restores them
    when training resumes, so a resumed run draws the same shuffles, binarisations and reparametrisation
    noise as an uninterrupted one.

    Restored at ``on_fit_start``: the last hook before Lightning creates the training loader's iterator,
    which draws a seed from the global generator (an uninterrupted run makes that draw at the start of the
    same epoch). The sanity check in between runs inside Lightning's ``isolate_rng``."""

    def __init__(self):
        self._pending = None

    def state_dict(self):
        # NumPy's key array as a list: Lightning loads checkpoints with torch.load(weights_only=True),
        # which refuses a checkpoint holding an ndarray (every resume failed with an UnpicklingError).
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
                 "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict):
        self._pending = state_dict

    def on_fit_start(self, trainer, pl_module):
        self._restore()

    def on_train_start(self, trainer, pl_module):
        self._restore()  # strategies that load checkpoints after setup (DeepSpeed, FSDP) load this state late

    def _restore(self):
        if self._pending is None:
            return
        s, self._pending = self._pending, None
        random.setstate(s["python"])
        np.random.set_state(s["numpy"])
        torch.set_rng_state(s["torch"])
        if "cuda" in s and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["cuda"])
