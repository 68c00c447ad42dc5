"""Runs of one variant trained as one batched model.

S members that differ only in their seed (initialisation, data split and order, noise) and in the regulariser's
``weight`` train in one process: their parameters are stacked (``torch.func.stack_module_state``), one member's
objective terms (``LatentVariableModel.forward``) are mapped over the stack with ``torch.func.vmap``, and one
Adam steps all of them (Adam is elementwise, so each member gets its own update). Small networks are bound by
Python and kernel launches, not arithmetic: S members cost about one step's overhead instead of S.

Each member's random draws (the epoch's shuffle, dynamic binarisation, the step's noise) are made under its own
generator state, restored around them, in the order its own run makes them; so after any number of steps a
member's parameters and losses are those of the run of its seed and weight, to float rounding
(tests/test_members.py).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from benchmark.data import LatentDataModule
from benchmark.errors import UsageError
from benchmark.module import TERMS, LatentVariableModel, TermMeans

MEMBER_HPARAMS = ("weight",)  # what may differ between members besides the seed


def why_not_members(models: Sequence[LatentVariableModel]) -> str | None:
    """Why these runs cannot train as one batched model, or None when they can."""
    first = models[0]
    if any(type(m) is not type(first) for m in models):
        return "the runs are of different variants"
    differ = sorted(k for m in models for k in set(m.hparams) | set(first.hparams)
                    if k not in MEMBER_HPARAMS and m.hparams.get(k) != first.hparams.get(k))
    if differ:
        return f"the runs differ in {', '.join(dict.fromkeys(differ))} (members may differ in seed and weight only)"
    return first.why_not_members()


def rng_state() -> dict[str, Tensor]:
    """The generators a run's data and steps draw from: torch's CPU generator and, where there is a GPU, the
    current GPU's. (Lightning's full collection, NumPy's and Python's too, costs 0.4 ms a swap, more than a
    digits step; nothing a run draws comes from those.)"""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Tensor]):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


@contextmanager
def _generator(states: list[dict[str, Tensor]], i: int):
    """Draws made inside come from member i's generators, which advance."""
    outside = rng_state()
    set_rng_state(states[i])
    try:
        yield
    finally:
        states[i] = rng_state()
        set_rng_state(outside)


def _stack_noise(noises: list[tuple]) -> tuple:
    eps = None if noises[0][0] is None else torch.stack([n[0] for n in noises])  # (S, B, D)
    return eps, tuple(torch.stack(draws) for draws in zip(*(n[1] for n in noises)))


class MemberBatches:
    """The members' loaders as one: each batch is (x (S, B, ...), noise stacked over members), member i's
    images and noise drawn under its generator state. While ``isolated()`` (Lightning's sanity check, which
    a single run makes inside ``isolate_rng``) the draws leave the members' states as they were."""

    batch_sampler = sampler = None  # Lightning reads both attributes of a loader

    def __init__(self, loaders: Sequence, states: list[dict[str, Tensor]],
                 draw_noise: Callable[[Tensor], tuple], isolated: Callable[[], bool]):
        self.loaders, self.states, self.draw_noise, self.isolated = loaders, states, draw_noise, isolated

    def __len__(self):
        return len(self.loaders[0])

    def __iter__(self):
        # A generator, as a single run's loader: nothing is drawn until the first batch.
        states = list(self.states) if self.isolated() else self.states
        iterators = [None] * len(self.loaders)
        for _ in range(len(self)):
            xs, noises = [], []
            for i, loader in enumerate(self.loaders):
                with _generator(states, i):
                    if iterators[i] is None:
                        iterators[i] = iter(loader)  # the epoch's shuffle
                    x = next(iterators[i])[0]  # dynamic binarisation
                    noises.append(self.draw_noise(x))
                xs.append(x)
            yield torch.stack(xs), _stack_noise(noises)


class Members(L.LightningModule):
    """S runs of one variant as one model.

    Args:
        models: each member's model, as its own run builds it (``build_cli`` under the member's seed).
        data: each member's DataModule (its seed sets its split and fixed binarisations).
        states: each member's generator states when its run would start training (``rng_state()`` right
            after building it).
    """

    def __init__(self, models: Sequence[LatentVariableModel], data: Sequence[LatentDataModule],
                 states: Sequence[dict[str, Tensor]]):
        super().__init__()
        if not len(models) == len(data) == len(states) > 0:
            raise UsageError("members need one model, one DataModule and one generator state each")
        why = why_not_members(models)
        if why is not None:
            raise UsageError(f"these runs cannot train as members: {why}; run them separately")
        self.runs = list(models)  # a list, not submodules: the trained slices are copied back into them
        self.data, self.states = list(data), [dict(s) for s in states]
        self.template = [copy.deepcopy(models[0]).to("meta")]  # the structure functional_call fills
        params, buffers = stack_module_state(list(models))
        self.param_names, self.buffer_names = list(params), list(buffers)
        self.stacked = nn.ParameterList([nn.Parameter(params[k]) for k in self.param_names])  # (S, ...) each
        for i, name in enumerate(self.buffer_names):
            self.register_buffer(f"stacked_buffer_{i}", buffers[name])
        self.register_buffer("weights", torch.tensor([float(m.hparams.weight) for m in models]))  # (S,)
        self.terms = nn.ModuleDict({f"{stage}_terms": TermMeans(len(models) * len(TERMS))
                                    for stage in ("train", "val")})

    @property
    def size(self) -> int:
        return len(self.runs)

    # --- data -----------------------------------------------------------------------------------------
    def setup(self, stage: str):
        if self.trainer.world_size > 1:
            raise UsageError("members train in one process; run them with devices 1")
        for dm in self.data:
            dm.trainer = self.trainer  # its tensors go to this trainer's device
            dm.setup(stage)

    def _loader(self, split: str) -> MemberBatches:
        loaders = [getattr(dm, f"{split}_dataloader")() for dm in self.data]
        return MemberBatches(loaders, self.states, self.runs[0].draw_noise, lambda: self.trainer.sanity_checking)

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    # --- the loop -------------------------------------------------------------------------------------
    def _stacked_state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        buffers = [getattr(self, f"stacked_buffer_{i}") for i in range(len(self.buffer_names))]
        return dict(zip(self.param_names, self.stacked)), dict(zip(self.buffer_names, buffers))

    def member_terms(self, x: Tensor, noise: tuple) -> Tensor:
        """(S, T) terms in ``TERMS`` order: each member's objective, distortion and regulariser."""
        template = self.template[0].train(self.training)

        def one(params, buffers, x, noise):
            return functional_call(template, (params, buffers), (x, noise))

        eps_dim = None if noise[0] is None else 0  # a deterministic head draws no eps
        distortion, reg, decoder_reg = vmap(one, in_dims=(0, 0, 0, (eps_dim, 0)))(*self._stacked_state(), x, noise)
        return torch.stack([distortion + self.weights * reg + decoder_reg, distortion, reg], dim=1)

    def _common_step(self, batch, stage: str) -> Tensor:
        x, noise = batch
        terms = self.member_terms(x, noise)
        self.terms[f"{stage}_terms"].update(terms.detach().flatten(), x.shape[1])
        return terms[:, 0].sum()  # each member's gradient reaches its own slice only

    def training_step(self, batch, batch_idx):
        return self._common_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._common_step(batch, "val")

    def _log_terms(self, stage: str):
        means = self.terms[f"{stage}_terms"].compute().view(self.size, len(TERMS))
        self.terms[f"{stage}_terms"].reset()
        self.log_dict({f"{stage}/{term}/{i}": means[i, t] for i in range(self.size) for t, term in enumerate(TERMS)})

    def on_train_epoch_end(self):
        self._log_terms("train")

    def on_validation_epoch_end(self):
        self._log_terms("val")

    def configure_optimizers(self):
        """The members' own optimizer (``configure_optimizers`` of the first), over the stacked tensors:
        the same groups (RAE's decoder weight decay), class and options."""
        reference = self.runs[0].configure_optimizers()
        if not isinstance(reference, torch.optim.Optimizer):
            raise UsageError("members take a plain optimizer; a schedule is per run")
        names = {id(p): n for n, p in self.runs[0].named_parameters()}
        stacked = dict(zip(self.param_names, self.stacked))
        groups = [{**{k: v for k, v in group.items() if k != "params"},
                   "params": [stacked[names[id(p)]] for p in group["params"]]} for group in reference.param_groups]
        return type(reference)(groups, **reference.defaults)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["member_states"] = self.states  # where each member's generator is: a resumed group goes on

    def on_load_checkpoint(self, checkpoint):
        self.states[:] = checkpoint["member_states"]  # in place: the loaders hold this list

    # --- the runs -------------------------------------------------------------------------------------
    @torch.no_grad()
    def members(self) -> list[LatentVariableModel]:
        """Each member as the model of its own run, with its trained parameters (on this module's device)."""
        params, buffers = self._stacked_state()
        for i, model in enumerate(self.runs):
            model.to(self.device)
            own = {**{k: v[i] for k, v in params.items()}, **{k: v[i] for k, v in buffers.items()}}
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                tensor.copy_(own[name])
        return self.runs
