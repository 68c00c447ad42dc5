"""A callback for the multi-node tests, named by class_path on the command line: each rank saves its weights
when training ends, so that a test can compare the ranks."""

import torch
from lightning.pytorch.callbacks import Callback


class SaveWeights(Callback):
    def __init__(self, folder: str):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        torch.save({k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                   f"{self.folder}/rank{trainer.global_rank}.pt")
