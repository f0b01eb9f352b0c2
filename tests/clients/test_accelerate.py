"""accelerate's training loop with our optimizer and scheduler, against the same loop on torch.optim.

What accelerate does with them: ``prepare`` recognises an optimizer by
``isinstance(obj, torch.optim.Optimizer)`` and wraps it in an ``AcceleratedOptimizer`` (which runs
``opt.load_state_dict(opt.state_dict())`` to place the state on the device), and a scheduler only
by ``isinstance(obj, torch.optim.lr_scheduler.LRScheduler)``: anything else is handed back
unwrapped and left out of ``save_state``. The wrapped scheduler reads the private
``scheduler._step_count`` (and ``total_steps`` for OneCycleLR). ``save_state`` writes the model
with safetensors after dropping every tensor that shares storage with an earlier one (with a
warning only), and the optimizer's and scheduler's ``state_dict()`` with ``torch.save``;
``load_state`` reads them back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .arms import EXACT, ORACLE, TOLERANCE, Arm, assert_same_tensors
from .environment import require_client, reset_accelerate_state

accelerate = require_client("accelerate")
from accelerate import Accelerator  # noqa: E402

VOCAB, SEQUENCE, BATCH, STEPS, SAVE_AT, CLIP = 48, 12, 4, 8, 4, 0.5


class TinyLM(nn.Module):
    """An embedding, one residual MLP block, and an output head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.norm = nn.LayerNorm(16)
        self.block = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return self.head(h + self.block(self.norm(h)))


def loader() -> DataLoader:
    ids = torch.randint(0, VOCAB, (STEPS * BATCH, SEQUENCE), generator=torch.Generator().manual_seed(1234))
    return DataLoader(TensorDataset(ids), batch_size=BATCH, shuffle=False)


def build(arm: Arm, seed: int):
    torch.manual_seed(seed)
    model = TinyLM()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = arm.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2
    )
    # OneCycleLR also writes the groups' betas: a scheduler that drives more than lr.
    sched = arm.sched.OneCycleLR(opt, max_lr=2e-2, total_steps=STEPS, pct_start=0.25)
    return model, opt, sched


class Run:
    """One training job: its losses, lrs, pre-clipping gradient norms, and the model at the end."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.lrs: list[float] = []
        self.grad_norms: list[torch.Tensor] = []
        self.model: nn.Module | None = None
        self.saved: dict[str, torch.Tensor] = {}


def train(arm: Arm, *, seed: int = 0, save_to=None, resume_from=None) -> Run:
    run = Run()
    accelerator = Accelerator(cpu=True)
    model, opt, sched = build(arm, seed)
    model, opt, data, sched = accelerator.prepare(model, opt, loader(), sched)
    first = 0
    if resume_from is not None:
        accelerator.load_state(resume_from)
        data, first = accelerator.skip_first_batches(data, SAVE_AT), SAVE_AT
    model.train()
    for step, (ids,) in enumerate(data, start=first):
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        accelerator.backward(loss)
        run.grad_norms.append(accelerator.clip_grad_norm_(model.parameters(), CLIP).detach().clone())
        run.lrs.append(float(opt.param_groups[0]["lr"]))
        opt.step()
        sched.step()
        opt.zero_grad()
        run.losses.append(loss.detach().clone())
        if save_to is not None and step + 1 == SAVE_AT:
            accelerator.save_state(save_to)
            run.saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    arm.assert_drove(opt, sched)
    run.model = accelerator.unwrap_model(model)
    return run


def parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same_training(candidate: Run, oracle: Run, **tolerance) -> None:
    assert len(candidate.losses) == len(oracle.losses) == STEPS
    torch.testing.assert_close(torch.stack(candidate.losses), torch.stack(oracle.losses), **tolerance)
    torch.testing.assert_close(candidate.lrs, oracle.lrs)
    assert_same_tensors(parameters(candidate.model), parameters(oracle.model), **tolerance)


def assert_file_holds_every_parameter(path, model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Each distinct parameter is in the file under one of its names (a tied one under either)."""
    names = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        names[id(p)].append(name)
    saved = load_file(path)
    for aliases in names.values():
        present = [name for name in aliases if name in saved]
        assert present, f"{path.name} lacks parameter {' / '.join(aliases)} (it has {sorted(saved)})"
        torch.testing.assert_close(saved[present[0]], values[aliases[0]], **EXACT)


def test_prepare_clip_save_state_load_state_equals_uninterrupted_run(tmp_path, candidate):
    whole, resumed = {}, {}
    for arm in (ORACLE, candidate):
        state = tmp_path / arm.name / "state"
        whole[arm.name] = train(arm, save_to=state)
        assert (state / "scheduler.bin").is_file(), "accelerate did not take the scheduler for one"
        # A new process: another Accelerator, a fresh model with other weights, load, continue.
        reset_accelerate_state()
        run = train(arm, seed=99, resume_from=state)
        run.losses[:0], run.lrs[:0] = whole[arm.name].losses[:SAVE_AT], whole[arm.name].lrs[:SAVE_AT]
        resumed[arm.name] = run
    oracle = whole[ORACLE.name]
    assert max(oracle.grad_norms) > CLIP  # the clipping is exercised, not vacuous
    assert oracle.model.head.weight is oracle.model.embed.weight
    assert_same_training(resumed[ORACLE.name], oracle, **EXACT)
    assert_same_training(whole[candidate.name], oracle, **TOLERANCE)
    torch.testing.assert_close(torch.stack(whole[candidate.name].grad_norms), torch.stack(oracle.grad_norms),
                               **TOLERANCE)
    assert_same_training(resumed[candidate.name], whole[candidate.name], **EXACT)
    assert whole[candidate.name].model.head.weight is whole[candidate.name].model.embed.weight


def test_save_state_writes_every_parameter(tmp_path, candidate):
    for arm in (ORACLE, candidate):
        state = tmp_path / arm.name / "state"
        run = train(arm, save_to=state)
        assert_file_holds_every_parameter(state / "model.safetensors", run.model, run.saved)
