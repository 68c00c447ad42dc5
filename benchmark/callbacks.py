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
    """Stops the run when an epoch's mean training loss is not finite. Checked once an epoch, so the
    training step never waits on the host; a NaN step makes the epoch's mean NaN."""

    def on_train_epoch_end(self, trainer, pl_module):
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None and not torch.isfinite(loss):
            raise Diverged(trainer.global_step, float(loss))


class RNGState(L.Callback):
    """Saves the Python, NumPy and torch (CPU and CUDA) generators in every checkpoint and restores them
    when training resumes, after the sanity check, so a resumed run draws the same shuffles, binarisations
    and reparametrisation noise as an uninterrupted one."""

    def __init__(self):
        self._pending = None

    def state_dict(self):
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict):
        self._pending = state_dict

    def on_train_start(self, trainer, pl_module):
        if self._pending is None:
            return
        s, self._pending = self._pending, None
        random.setstate(s["python"])
        np.random.set_state(s["numpy"])
        torch.set_rng_state(s["torch"])
        if "cuda" in s and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["cuda"])
