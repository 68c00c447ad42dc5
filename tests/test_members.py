"""Runs trained as one batched model equal the runs trained one by one: the test that makes members safe."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from benchmark.errors import UsageError
from benchmark.lightning_cli import build_cli
from benchmark.members import Members, why_not_members
from benchmark.perf.members_speed import build as build_run
from helpers import CONFIGS

pytestmark = pytest.mark.usefixtures("one_thread")

EPOCHS = 2  # with a validation epoch between them: its noise comes from the same generators
MEMBER_VARIANTS = ["ae", "ae_moments", "wae_mmd", "swae", "aae", "rae", "mean_only", "vae", "vae_fullcov", "no_info"]


def build(variant: str, seed: int, weight: float | None = None, data: str = "digits_binary", *extra: str):
    """One run as the study builds it, with a small network, and its generator states at the start of training."""
    return build_run(variant, seed, data, "--model.init_args.hidden", "[32, 32]", "--model.init_args.latent_dim", "4",
                     *(["--model.init_args.weight", str(weight)] if weight is not None else []), *extra)


def trainer(**kw) -> L.Trainer:
    kw = {"max_epochs": EPOCHS, "enable_checkpointing": False, **kw}
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, **kw)


def same_to_rounding(p: torch.Tensor, q: torch.Tensor) -> bool:
    """Equal to float rounding, allowing for Adam: an element whose gradient is near zero moves by about the
    learning rate in the direction of the sign of its rounding noise, so a handful of elements in a tensor
    (3 of the discriminator's 262,144 weights in one AAE run, by 2e-3) part by a few steps. A member that drew
    another's noise or saw another's gradient parts in every element."""
    if p.numel() == 0:  # no_info's encoder has no output
        return p.shape == q.shape
    gap = (p - q).abs()
    return bool((gap > 1e-4).float().mean() < 1e-4) and float(gap.max()) < 1e-2


def separate(variant: str, seed: int, weight: float | None):
    model, data, _ = build(variant, seed, weight)
    t = trainer()
    t.fit(model, datamodule=data)
    return model, float(t.callback_metrics["val/loss"])


@pytest.mark.parametrize("variant", MEMBER_VARIANTS)
def test_every_member_equals_its_own_run_after_training(variant):
    """Three members (seeds 0-2, two weights) after 2 epochs, each against the run of its seed and weight
    trained alone: the same parameters and the same validation loss, to float rounding. A member that drew
    from another's generator, or saw another's gradient, would be off by far more."""
    runs = [(0, None), (1, None), (2, 2.0)]
    built = [build(variant, seed, weight) for seed, weight in runs]
    members = Members(*zip(*built))
    t = trainer()
    t.fit(members)
    for i, ((seed, weight), model) in enumerate(zip(runs, members.members())):
        alone, val_loss = separate(variant, seed, weight)
        for (name, p), q in zip(model.named_parameters(), alone.parameters()):
            assert same_to_rounding(p, q), (variant, seed, name, (p - q).abs().max())
        assert float(t.callback_metrics[f"val/loss/{i}"]) == pytest.approx(val_loss, rel=1e-4), (variant, seed)
    # and the members differ from one another: each has its own initialisation and data
    a, b = (dict(m.named_parameters()) for m in members.members()[:2])
    assert not torch.allclose(a["decoder.0.0.weight"], b["decoder.0.0.weight"])


def null_directions(model) -> set[str]:
    """The biases just before a batch norm, which subtracts their value: their gradient is zero up to rounding,
    so Adam, which normalises it, moves them by about the learning rate in the direction of the rounding noise,
    differently in any two runs, and the network's output does not depend on them."""
    out = set()
    for prefix, module in model.named_modules():
        children = list(module.named_children())
        for (name, layer), (_, after) in zip(children, children[1:]):
            if isinstance(after, torch.nn.modules.batchnorm._BatchNorm) and getattr(layer, "bias", None) is not None:
                out.add(f"{prefix}.{name}.bias" if prefix else f"{name}.bias")
    return out


def test_conv_members_with_batch_norm_equal_their_runs():
    """The convolutional network's batch norm updates its running statistics in place, member by member;
    its members after 3 steps and a validation pass equal their runs, but for the biases it cancels."""
    conv = ("--model.init_args.network", "conv")
    runs = [build("vae", seed, None, "digits_binary", *conv) for seed in (0, 1)]
    members = Members(*zip(*runs))
    t = trainer(limit_train_batches=3, limit_val_batches=2)
    t.fit(members)
    for i, model in enumerate(members.members()):
        alone, data, _ = build("vae", i, None, "digits_binary", *conv)
        t_alone = trainer(limit_train_batches=3, limit_val_batches=2)
        t_alone.fit(alone, datamodule=data)
        null = null_directions(alone)
        assert len(null) == 3  # two encoder convolutions, one decoder one
        compared = [(n, p, q) for (n, p), q in zip(model.named_parameters(), alone.parameters()) if n not in null]
        assert [n for n, p, q in compared if not same_to_rounding(p, q)] == []
        # training mode normalises the biases away; the running means of validation absorb them at the rate
        # of batch norm's momentum, so after 3 steps the validation losses part by about 1e-4 of their value
        for stage, rel in (("train", 1e-5), ("val", 1e-3)):
            assert float(t.callback_metrics[f"{stage}/loss/{i}"]) == pytest.approx(
                float(t_alone.callback_metrics[f"{stage}/loss"]), rel=rel), stage


def test_the_runs_that_cannot_be_members_are_named_with_the_reason():
    vae0, vae1 = build("vae", 0)[0], build("vae", 1, None, "digits_binary", "--model.init_args.lr", "0.01")[0]
    assert "lr" in why_not_members([vae0, vae1])
    assert "different variants" in why_not_members([vae0, build("ae", 0)[0]])
    assert "seed and weight only" in why_not_members([build("mean_only", 0)[0],
                                                      build("mean_only", 1, None, "digits_binary",
                                                            "--model.init_args.sigma0", "0.5")[0]])
    for config, reason in (("rae_gp", "differentiates"), ("rae_sn", "in place")):
        model = build(config, 0)[0]
        assert reason in why_not_members([model, model]), config
    plateau = build("vae", 0, None, "digits_binary", "--model.init_args.lr_plateau", "{factor: 0.5, patience: 2}")
    assert "lr_plateau" in why_not_members([plateau[0]])
    with pytest.raises(UsageError, match="cannot train as members: .*run them separately"):
        Members([vae0, vae1], [build("vae", 0)[1]] * 2, [build("vae", 0)[2]] * 2)
    assert why_not_members([vae0, build("vae", 1, 4.0)[0]]) is None  # seed and weight may differ


def test_a_group_resumed_from_its_checkpoint_ends_where_an_uninterrupted_one_does(tmp_path):
    """Stopped after one epoch and resumed for the second from the checkpoint (stacked parameters, Adam's
    moments, each member's generator state), the members end bitwise where two uninterrupted epochs end."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def group():
        return Members(*zip(*[build("vae", seed) for seed in (0, 1)]))

    straight = group()
    trainer().fit(straight)
    first = group()
    trainer(max_epochs=1, callbacks=[ModelCheckpoint(tmp_path, "last")], enable_checkpointing=True).fit(first)
    resumed = group()  # a fresh process's group: its own states until the checkpoint's are loaded
    trainer().fit(resumed, ckpt_path=str(tmp_path / "last.ckpt"))
    for a, b in zip(straight.members(), resumed.members()):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("flag, value, reason", [("gradient_clip_val", "1.0", "clipping by norm"),
                                                  ("precision", "16-mixed", "loss scaler")])
def test_trainer_settings_that_couple_members_send_the_runs_one_by_one(flag, value, reason):
    """Norm clipping and float16's loss scaler act on all stacked parameters at once, so members would not be
    their runs; bf16 and plain float32 leave each member's update its own."""
    from benchmark.runner import _coupling

    configs = [a for name in ("trainer/cpu", "model/vae", "data/digits_binary")
               for a in ("--config", str(CONFIGS / f"{name}.yaml"))]
    cli = build_cli([*configs, f"--trainer.{flag}", value], run=False, save_config_callback=None)
    assert reason in _coupling(cli)
    plain = build_cli([*configs, "--trainer.precision", "bf16-mixed"], run=False, save_config_callback=None)
    assert _coupling(plain) is None
