"""save/load/latest/CheckpointManager in one process: every backend, damaged and incomplete checkpoints,
what a failed load must not change, async saves, retention, mismatched models, torch.optim."""

from __future__ import annotations

import copy
import random
import threading
import time

import numpy
import pytest
import torch
from torch import nn

import shardoptim
from shardoptim import checkpoint
from shardoptim.checkpoint import CheckpointError, IncompleteCheckpointError, open_checkpoint
from shardoptim.checkpoint import staging
from shardoptim.checkpoint.manifest import MANIFEST
from shardoptim.checkpoint.storage import Storage


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 5)
        self.body = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Dropout(0.3), nn.Linear(7, 5))
        self.head = nn.Linear(5, 9, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(tokens).mean(1)))


def setup(seed: int = 0, optimizer: str = "AdamW", module=shardoptim):
    torch.manual_seed(seed)
    model = Net()
    opt = getattr(module, optimizer)(model.parameters(), lr=0.01)
    sched = shardoptim.sched.CosineAnnealingLR(opt, T_max=20)
    ema = shardoptim.ema.ShardedEMA(opt, decay=0.8) if module is shardoptim else None
    return model, opt, sched, ema


def train(model, opt, sched, ema, steps):
    """Random data and dropout drawn from the global generators: a resume must restore them."""
    for _ in steps:
        tokens = torch.randint(0, 9, (6, 3))
        target = random.randrange(9)
        loss = nn.functional.cross_entropy(model(tokens), torch.full((6,), target)) + float(numpy.random.rand())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            ema.update()


def components(model, opt, sched, ema):
    return {"model": model, "optimizer": opt, "schedulers": [sched], "ema": ema}


def snapshot(model, opt, sched, ema):
    state = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(opt.state_dict()),
             "sched": sched.state_dict()}
    if ema is not None:
        state["ema"] = [s.clone() for s in ema.shards]
    return state


def assert_equal(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal(x, y)
    else:
        assert a == b


def test_resume_is_bitwise_on_every_backend(storage_root):
    url, options = storage_root
    random.seed(1)
    numpy.random.seed(1)
    reference = setup()
    train(*reference, range(3))
    checkpoint.save(url, **components(*reference), extra={"epoch": 1, "position": [3, "x"]}, storage_options=options)
    train(*reference, range(3, 6))  # the uninterrupted run, generators included

    resumed = setup(seed=123)  # other weights, other generator states: everything must come back
    random.seed(99)
    numpy.random.seed(99)
    assert checkpoint.load(url, **components(*resumed), storage_options=options) == {"epoch": 1, "position": [3, "x"]}
    assert resumed[1].param_groups[0]["betas"] == reference[1].param_groups[0]["betas"]
    assert isinstance(resumed[1].param_groups[0]["betas"], tuple), "a tuple, as torch keeps it (JSON has lists)"
    train(*resumed, range(3, 6))
    assert_equal(snapshot(*resumed), snapshot(*reference))
    assert resumed[0].head.weight is resumed[0].embed.weight


def test_a_sharded_checkpoint_loads_into_a_plain_optimizer(worlds, tmp_path):
    from tests.checkpoint import scenarios

    url = str(tmp_path / "two-ranks")
    saved = worlds.get(2).run(scenarios.save_after_training, "AdamW", url)[0]
    model, opt, sched, ema = scenarios.build("AdamW", world=False)
    assert checkpoint.load(url, model=model, optimizer=opt, schedulers=[sched], ema=ema) == {"step": scenarios.STEPS}
    mine = scenarios.full_state(model, opt, sched, ema)
    for key in ("model", "lr", "sched", "ema", "ema_updates"):
        assert_equal(mine[key], saved[key])
    assert_equal(mine["optimizer"], saved["optimizer"])


def test_incomplete_checkpoints_are_refused_and_ignored(tmp_path):
    model, opt, sched, ema = setup()
    train(model, opt, sched, ema, range(2))
    root = tmp_path / "run"
    checkpoint.save(str(root / "step-000000000001"), **components(model, opt, sched, ema), step=1)
    checkpoint.save(str(root / "step-000000000002"), **components(model, opt, sched, ema), step=2)
    (root / "step-000000000002" / MANIFEST).unlink()  # as if the writer died before the commit
    assert checkpoint.latest(str(root)) == str(root / "step-000000000001")
    with pytest.raises(IncompleteCheckpointError, match="no MANIFEST.json"):
        checkpoint.load(str(root / "step-000000000002"), optimizer=opt)
    with pytest.raises(FileNotFoundError):
        checkpoint.load(str(root / "nothing-here"), optimizer=opt)
    assert checkpoint.latest(str(tmp_path / "empty")) is None


def _saved(tmp_path):
    model, opt, sched, ema = setup()
    train(model, opt, sched, ema, range(2))
    url = str(tmp_path / "ckpt")
    checkpoint.save(url, **components(model, opt, sched, ema))
    return url


@pytest.mark.parametrize("damage", ["flip-byte", "truncate", "remove-file"])
def test_a_damaged_checkpoint_is_refused_and_changes_nothing(tmp_path, damage):
    url = _saved(tmp_path)
    files = sorted(p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("rank"))
    target = files[0]
    data = bytearray(target.read_bytes())
    if damage == "flip-byte":
        data[len(data) // 2] ^= 0x10
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[: len(data) - 100]))
    else:
        target.unlink()
    live = setup(seed=5)
    before = snapshot(*live)
    with pytest.raises((CheckpointError, FileNotFoundError), match=target.name):
        checkpoint.load(url, **components(*live))
    assert_equal(snapshot(*live), before)


def test_a_manifest_pointing_outside_the_checkpoint_is_refused(tmp_path):
    url = _saved(tmp_path)
    manifest = tmp_path / "ckpt" / MANIFEST
    text = manifest.read_text()
    name = next(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("rank"))
    for evil in (f"../{name}", f"/etc/{name}", f"s3:{name}"):
        manifest.write_text(text.replace(f'"{name}"', f'"{evil}"'))
        with pytest.raises(ValueError, match="unsafe file name"):
            open_checkpoint(url)


def test_overwriting_a_committed_checkpoint_needs_the_flag(tmp_path):
    url = _saved(tmp_path)
    model, opt, sched, ema = setup(seed=3)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        checkpoint.save(url, **components(model, opt, sched, ema))
    checkpoint.save(url, **components(model, opt, sched, ema), overwrite=True)
    loaded = setup(seed=9)
    checkpoint.load(url, **components(*loaded))
    assert_equal(snapshot(*loaded)["model"], snapshot(model, opt, sched, ema)["model"])
    names = [p.name for p in (tmp_path / "ckpt").iterdir()]
    assert len([n for n in names if n.startswith("rank")]) == 1, "the replaced checkpoint's files are gone"


def test_a_different_model_is_refused_naming_the_parameter(tmp_path):
    url = _saved(tmp_path)

    class Wider(Net):
        def __init__(self) -> None:
            super().__init__()
            self.body[0] = nn.Linear(5, 8)
            self.body[1] = nn.BatchNorm1d(8)
            self.body[3] = nn.Linear(8, 5)

    model = Wider()
    opt = shardoptim.AdamW(model.named_parameters())
    with pytest.raises(CheckpointError, match=r"parameter 1 \('body.0.weight'\) has shape \[8, 5\]"):
        checkpoint.load(url, model=model, optimizer=opt)


def test_async_save_copies_first_and_commits_in_the_background(tmp_path):
    model, opt, sched, ema = setup()
    train(model, opt, sched, ema, range(2))
    expected = snapshot(model, opt, sched, ema)
    url = str(tmp_path / "async")
    checkpoint.save(url, **components(model, opt, sched, ema), async_=True)
    train(model, opt, sched, ema, range(2, 4))  # goes on while the save is written
    checkpoint.wait()
    loaded = setup(seed=4)
    checkpoint.load(url, **components(*loaded))
    assert_equal(snapshot(*loaded)["model"], expected["model"])
    assert_equal(snapshot(*loaded)["optimizer"], expected["optimizer"])


@pytest.fixture
def slow_background_copy(monkeypatch):
    """The save's thread pauses before it copies the optimizer's shard, so training reaches its next
    step (or a stray write) first: what a big model's copy looks like to a small one's loop."""
    copies = staging.HostBuffers.copies

    def slowly(self, tensors):
        if threading.current_thread().name == "shardoptim-checkpoint":
            time.sleep(0.3)
        return copies(self, tensors)

    monkeypatch.setattr(staging.HostBuffers, "copies", slowly)


def test_the_step_after_an_async_save_waits_for_its_copy(tmp_path, slow_background_copy):
    model, opt, sched, ema = setup()
    train(model, opt, sched, ema, range(2))
    for round_ in range(2):  # the second save reuses the first one's host buffers
        expected = snapshot(model, opt, sched, ema)
        url = str(tmp_path / f"async-{round_}")
        checkpoint.save(url, **components(model, opt, sched, ema), async_=True)
        train(model, opt, sched, ema, range(2, 4))  # its step() is held until the copy is made
        checkpoint.wait()
        loaded = setup(seed=4)
        checkpoint.load(url, **components(*loaded))
        assert_equal(snapshot(*loaded), expected)


def test_a_write_to_the_parameters_during_the_copy_fails_the_save(tmp_path, slow_background_copy):
    model, opt, sched, ema = setup()
    train(model, opt, sched, ema, range(2))
    url = str(tmp_path / "torn")
    checkpoint.save(url, **components(model, opt, sched, ema), async_=True)
    with torch.no_grad():
        model.body[0].weight.mul_(2)  # not through step(): nothing holds it
    with pytest.raises(CheckpointError, match="written to in place while the background save copied them"):
        checkpoint.wait()
    with pytest.raises(IncompleteCheckpointError):
        checkpoint.load(url, **components(model, opt, sched, ema))
    checkpoint.save(url, **components(model, opt, sched, ema), async_=True)  # the next one is whole
    checkpoint.wait()
    checkpoint.load(url, **components(*setup(seed=3)))


def test_an_async_save_error_surfaces_at_the_next_call(tmp_path):
    model, opt, sched, ema = setup()
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the checkpoint directory should be")
    checkpoint.save(str(blocker / "ckpt"), **components(model, opt, sched, ema), async_=True)
    with pytest.raises(CheckpointError, match="background save"):
        checkpoint.wait()
    checkpoint.wait()  # reported once


def test_manager_keeps_the_last_and_the_best_and_restores_the_newest(tmp_path):
    model, opt, sched, ema = setup()
    manager = checkpoint.CheckpointManager(str(tmp_path / "run"), keep_last=2, keep_best=1, metric_mode="min")
    metrics = [5.0, 1.0, 4.0, 3.0, 6.0]
    for step, metric in enumerate(metrics):
        train(model, opt, sched, ema, range(step, step + 1))
        manager.save(step, metric=metric, **components(model, opt, sched, ema), extra={"step": step})
    kept = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert kept == ["step-000000000001", "step-000000000003", "step-000000000004"]
    fresh = setup(seed=8)
    assert manager.restore(**components(*fresh)) == {"step": 4}
    assert checkpoint.CheckpointManager(str(tmp_path / "nothing")).restore(optimizer=fresh[1]) is None


def test_torch_optim_checkpoints_round_trip_with_shardoptim(tmp_path):
    """A checkpoint of torch.optim.AdamW loads into shardoptim.AdamW (and back) and continues alike."""
    torch_run, our_run = setup(module=torch.optim), setup()
    train(*torch_run, range(2))
    url = str(tmp_path / "from-torch")
    checkpoint.save(url, model=torch_run[0], optimizer=torch_run[1], schedulers=[torch_run[2]])
    checkpoint.load(url, model=our_run[0], optimizer=our_run[1], schedulers=[our_run[2]])
    generators = torch.get_rng_state(), random.getstate(), numpy.random.get_state()
    train(torch_run[0], torch_run[1], torch_run[2], None, range(2, 4))
    torch.set_rng_state(generators[0])
    random.setstate(generators[1])
    numpy.random.set_state(generators[2])
    train(our_run[0], our_run[1], our_run[2], None, range(2, 4))
    for a, b in zip(our_run[0].parameters(), torch_run[0].parameters()):
        torch.testing.assert_close(a, b)

    url = str(tmp_path / "from-shardoptim")
    back = setup(module=torch.optim)
    checkpoint.save(url, model=our_run[0], optimizer=our_run[1], schedulers=[our_run[2]])
    checkpoint.load(url, model=back[0], optimizer=back[1], schedulers=[back[2]])
    assert_equal(back[1].state_dict()["state"], our_run[1].state_dict()["state"])


def test_extra_must_be_json_data(tmp_path):
    model, opt, sched, ema = setup()
    with pytest.raises(TypeError, match="extra"):
        checkpoint.save(str(tmp_path / "bad"), optimizer=opt, extra={"loader": object()})
    assert not Storage(str(tmp_path / "bad")).exists(), "refused before anything was written"
