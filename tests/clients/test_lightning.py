"""Lightning's Trainer driving our optimizer and scheduler, against the same run on torch.optim.

What Lightning does with them: ``configure_optimizers``' return value is checked against
``torch.optim.lr_scheduler.LRScheduler`` / ``ReduceLROnPlateau`` (anything else is refused unless
``lr_scheduler_step`` is overridden); the optimizer is wrapped in a ``LightningOptimizer`` whose
class is made a subclass of the optimizer's own class, and stepped as ``step(closure)`` with the
forward and backward inside the closure; ``gradient_clip_val`` runs ``clip_grad_norm_`` over
``param_groups``' parameters; ``ModelCheckpoint`` pickles ``optimizer.state_dict()`` and
``scheduler.state_dict()`` with ``torch.save`` and a resume loads them with ``torch.load``
(``weights_only`` by default in torch 2.13).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .arms import EXACT, ORACLE, TOLERANCE, Arm, assert_same_tensors
from .environment import require_client

L = require_client("lightning")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

BATCHES_PER_EPOCH = 8
CLIP = 0.5

Configure = Callable[[Arm, nn.Module], object]


def two_groups(arm: Arm, module: nn.Module) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (the split HF and most recipes make)."""
    decay = [p for p in module.parameters() if p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.ndim < 2]
    return arm.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=0.02, betas=(0.9, 0.99)
    )


def lists_with_epoch_scheduler(arm: Arm, module: nn.Module) -> object:
    opt = two_groups(arm, module)
    return [opt], [arm.sched.StepLR(opt, step_size=1, gamma=0.5)]


def warmup_cosine(arm: Arm, opt: torch.optim.Optimizer) -> object:
    return arm.sched.SequentialLR(
        opt,
        [arm.sched.LinearLR(opt, start_factor=0.1, total_iters=4), arm.sched.CosineAnnealingLR(opt, T_max=40)],
        milestones=[4],
    )


def dict_with_step_scheduler(arm: Arm, module: nn.Module) -> object:
    opt = two_groups(arm, module)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup_cosine(arm, opt), "interval": "step"}}


def all_parameters(arm: Arm, module: nn.Module) -> object:
    """``model.parameters()`` as it is, frozen ones included (every fine-tuning script)."""
    return arm.optim.AdamW(module.parameters(), lr=0.02)


class Regressor(L.LightningModule):
    def __init__(self, arm: Arm, configure: Configure, *, seed: int = 0, freeze_encoder: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.Tanh())
        self.head = nn.Linear(32, 1)
        if freeze_encoder:
            self.encoder.requires_grad_(False)
        self.arm, self.configure = arm, configure
        self.losses: list[torch.Tensor] = []
        self.lrs: list[float] = []
        self.grad_norms: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.losses.append(loss.detach().clone())
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # Lightning clips after this hook: the norm before clipping, and the lr this step uses.
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.grad_norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))

    def configure_optimizers(self):
        return self.configure(self.arm, self)


def loader() -> DataLoader:
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(8 * BATCHES_PER_EPOCH, 8, generator=gen)
    y = torch.tanh(x @ torch.randn(8, 1, generator=gen)) + 0.1 * torch.randn(len(x), 1, generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def fit(module: Regressor, root, *, max_epochs: int, ckpt_path=None, callbacks=(), **trainer_kwargs) -> Regressor:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(callbacks),
        callbacks=list(callbacks),
        num_sanity_val_steps=0,
        deterministic=True,
        default_root_dir=root,
        **trainer_kwargs,
    )
    trainer.fit(module, train_dataloaders=loader(), ckpt_path=ckpt_path)
    schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
    module.arm.assert_drove(trainer.optimizers[0], *schedulers)
    return module


def parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def assert_same_training(candidate: Regressor, oracle: Regressor, **tolerance) -> None:
    assert len(candidate.losses) == len(oracle.losses) > 0
    torch.testing.assert_close(torch.stack(candidate.losses), torch.stack(oracle.losses), **tolerance)
    torch.testing.assert_close(candidate.lrs, oracle.lrs)
    assert_same_tensors(parameters(candidate), parameters(oracle), **tolerance)


def test_lists_form_epoch_scheduler_and_gradient_clipping(tmp_path, candidate):
    runs = {
        arm.name: fit(Regressor(arm, lists_with_epoch_scheduler), tmp_path / arm.name, max_epochs=3,
                      gradient_clip_val=CLIP)
        for arm in (ORACLE, candidate)
    }
    oracle, ours = runs[ORACLE.name], runs[candidate.name]
    assert max(oracle.grad_norms) > CLIP  # the clipping is exercised, not vacuous
    assert oracle.lrs[-1] == 0.02 * 0.5**2  # the epoch scheduler stepped once per epoch
    assert_same_training(ours, oracle, **TOLERANCE)


def test_dict_form_step_interval_scheduler(tmp_path, candidate):
    runs = {
        arm.name: fit(Regressor(arm, dict_with_step_scheduler), tmp_path / arm.name, max_epochs=3)
        for arm in (ORACLE, candidate)
    }
    oracle, ours = runs[ORACLE.name], runs[candidate.name]
    assert len(set(oracle.lrs)) == len(oracle.lrs)  # stepped every batch: no two lrs alike
    assert_same_training(ours, oracle, **TOLERANCE)


def test_model_checkpoint_resume_equals_uninterrupted_run(tmp_path, candidate):
    uninterrupted, resumed = {}, {}
    for arm in (ORACLE, candidate):
        root = tmp_path / arm.name
        uninterrupted[arm.name] = fit(Regressor(arm, dict_with_step_scheduler), root / "whole", max_epochs=4,
                                      gradient_clip_val=CLIP)
        checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)
        first = fit(Regressor(arm, dict_with_step_scheduler), root / "first", max_epochs=2, callbacks=[checkpoint],
                    gradient_clip_val=CLIP)
        # A new process would build the module afresh, with other initial weights: the checkpoint
        # must bring back the model, the optimizer's state and the scheduler's position.
        second = fit(Regressor(arm, dict_with_step_scheduler, seed=99), root / "second", max_epochs=4,
                     ckpt_path=checkpoint.last_model_path, gradient_clip_val=CLIP)
        second.losses[:0], second.lrs[:0] = first.losses, first.lrs
        resumed[arm.name] = second
    assert_same_training(resumed[ORACLE.name], uninterrupted[ORACLE.name], **EXACT)
    assert_same_training(uninterrupted[candidate.name], uninterrupted[ORACLE.name], **TOLERANCE)
    assert_same_training(resumed[candidate.name], uninterrupted[candidate.name], **EXACT)


def test_fine_tuning_with_frozen_encoder(tmp_path, candidate):
    initial = parameters(Regressor(ORACLE, all_parameters, freeze_encoder=True))
    runs = {
        arm.name: fit(Regressor(arm, all_parameters, freeze_encoder=True), tmp_path / arm.name, max_epochs=2)
        for arm in (ORACLE, candidate)
    }
    for module in runs.values():
        for name, p in module.encoder.named_parameters(prefix="encoder"):
            assert p.grad is None
            torch.testing.assert_close(p.detach(), initial[name], **EXACT)
    assert_same_training(runs[candidate.name], runs[ORACLE.name], **TOLERANCE)
