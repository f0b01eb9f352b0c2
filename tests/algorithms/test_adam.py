"""Adam and AdamW beyond the generic table: hyper-parameters changed by hand, and a real model."""

from __future__ import annotations

import torch

import shardoptim
from tests.oracle import assert_same_trajectory, run_side_by_side


def test_learning_rate_changed_between_steps_is_used():
    def decay(step, ours, theirs):
        for opt in (ours, theirs):
            opt.param_groups[0]["lr"] *= 0.9
            opt.param_groups[0]["betas"] = (0.85, 0.995)

    ours, theirs, _, _ = run_side_by_side(
        lambda ps: shardoptim.Adam(ps, lr=0.05), lambda ps: torch.optim.Adam(ps, lr=0.05), between=decay
    )
    assert_same_trajectory(ours, theirs, torch.float32)


def test_model_training_matches_torch_with_zero_grad_and_closure():
    torch.manual_seed(0)
    ours_model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    torch_model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    torch_model.load_state_dict(ours_model.state_dict())
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    ours = shardoptim.AdamW(ours_model.parameters(), lr=0.01)
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=0.01)
    for step in range(50):
        losses = []
        for model, opt in ((ours_model, ours), (torch_model, theirs)):
            def closure(model=model, opt=opt):
                opt.zero_grad(set_to_none=step % 2 == 0)
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss
            losses.append(opt.step(closure))
        torch.testing.assert_close(losses[0], losses[1])
    for a, b in zip(ours_model.parameters(), torch_model.parameters()):
        torch.testing.assert_close(a, b)
