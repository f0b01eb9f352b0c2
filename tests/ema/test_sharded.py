"""ShardedEMA: numbers against AveragedModel's EMA, swapping, sharding contract, state dicts."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
import torch.optim.swa_utils as theirs
from torch import Tensor, nn

import shardoptim
import shardoptim.ema.sharded as sharded_module
from shardoptim.ema import ShardedEMA

from .models import mlp

#: Parameter shapes of the fake optimizer's buckets; sizes chosen to leave padding at each end.
BUCKET_SHAPES = (((5, 3), (7,), ()), ((4, 4), (9,)))


@dataclass
class FakeBucket:
    flat_param: Tensor
    shard_param: Tensor
    is_sharded: bool


class FakeOptimizer:
    """The bucket contract of a shardoptim optimizer on one rank, with parameters as views of flat buffers.

    Buckets are padded to divide by ``world_size``; ``rank=None`` owns the whole buffer (unsharded).
    """

    def __init__(self, seed: int = 0, rank: int | None = 0, world_size: int = 1, dtype=torch.float32, device="cpu"):
        gen = torch.Generator().manual_seed(seed)
        self.buckets = []
        self.params: list[Tensor] = []
        for shapes in BUCKET_SHAPES:
            used = sum(math.prod(shape) for shape in shapes)
            padded = -(-(used + 3) // (4 * world_size)) * 4 * world_size
            flat = torch.zeros(padded, dtype=dtype, device=device)
            offset = 0
            for shape in shapes:
                numel = math.prod(shape)
                view = flat[offset : offset + numel].view(shape)
                view.copy_(torch.randn(shape, generator=gen, dtype=dtype))
                self.params.append(view)
                offset += numel
            size = padded // world_size
            shard = flat if rank is None else flat[rank * size : (rank + 1) * size]
            self.buckets.append(FakeBucket(flat, shard, world_size > 1 and rank is not None))

    def fake_step(self, gen: torch.Generator) -> None:
        """Move every parameter (the padding stays zero), as an optimizer step would."""
        for param in self.params:
            param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype).to(param.device))


def _reference(params: list[Tensor], decay: float) -> theirs.AveragedModel:
    holder = nn.ParameterList([nn.Parameter(p.detach().clone()) for p in params])
    return theirs.AveragedModel(holder, multi_avg_fn=theirs.get_ema_multi_avg_fn(decay))


def _sync(holder: nn.ParameterList, params: list[Tensor]) -> None:
    with torch.no_grad():
        for target, source in zip(holder, params):
            target.copy_(source)


@pytest.mark.parametrize("decay", [0.9, 0.999, 0.0, 1.0])
def test_matches_averaged_model_ema(decay):
    optimizer = FakeOptimizer()
    ema = ShardedEMA(optimizer, decay=decay)
    holder = nn.ParameterList([nn.Parameter(p.clone()) for p in optimizer.params])
    reference = theirs.AveragedModel(holder, multi_avg_fn=theirs.get_ema_multi_avg_fn(decay))
    gen = torch.Generator().manual_seed(1)
    for _ in range(7):
        optimizer.fake_step(gen)
        _sync(holder, optimizer.params)
        ema.update()
        reference.update_parameters(holder)
    with ema.averaged():
        for ours_param, their_param in zip(optimizer.params, reference.module):
            assert torch.equal(ours_param, their_param)
    assert ema.num_updates == int(reference.n_averaged) == 7


def test_first_update_copies_later_updates_lerp():
    optimizer = FakeOptimizer()
    ema = ShardedEMA(optimizer, decay=0.5)
    gen = torch.Generator().manual_seed(1)
    optimizer.fake_step(gen)
    ema.update()
    assert all(torch.equal(a, b.shard_param) for a, b in zip(ema.shards, optimizer.buckets))
    before = [a.clone() for a in ema.shards]
    optimizer.fake_step(gen)
    ema.update()
    for a, old, bucket in zip(ema.shards, before, optimizer.buckets):
        assert torch.equal(a, old.lerp(bucket.shard_param, 0.5))


def test_warmup_decay():
    optimizer = FakeOptimizer()
    ema = ShardedEMA(optimizer, decay=0.9, warmup=True)
    assert [ema.decay_at(t) for t in (0, 1, 5, 100)] == [0.1, 2 / 11, 6 / 15, 0.9]
    gen = torch.Generator().manual_seed(1)
    expected = None
    for t in range(4):
        optimizer.fake_step(gen)
        ema.update()
        live = [b.shard_param.clone() for b in optimizer.buckets]
        if expected is None:
            expected = live
        else:
            weight = 1.0 - min(0.9, (1 + t) / (10 + t))
            expected = [e.lerp(p, weight) for e, p in zip(expected, live)]
    for a, b in zip(ema.shards, expected):
        assert torch.equal(a, b)
    assert ShardedEMA(optimizer, decay=0.9).decay_at(0) == 0.9


def test_swap_is_exact_and_reversible(monkeypatch):
    monkeypatch.setattr(sharded_module, "SWAP_CHUNK_NUMEL", 5)  # several chunks and a short last one
    optimizer = FakeOptimizer()
    ema = ShardedEMA(optimizer, decay=0.7)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        optimizer.fake_step(gen)
        ema.update()
    live = [b.flat_param.clone() for b in optimizer.buckets]
    averaged = [a.clone() for a in ema.shards]
    storages = [b.flat_param.data_ptr() for b in optimizer.buckets]
    ema.swap()
    assert ema.swapped
    assert all(torch.equal(b.shard_param, a) for b, a in zip(optimizer.buckets, averaged))
    assert all(torch.equal(a, l) for a, l in zip(ema.shards, live))
    ema.swap()
    assert not ema.swapped
    assert all(torch.equal(b.flat_param, l) for b, l in zip(optimizer.buckets, live))
    assert all(torch.equal(a, b) for a, b in zip(ema.shards, averaged))
    assert [b.flat_param.data_ptr() for b in optimizer.buckets] == storages
    assert all(s.numel() <= 5 for s in ema._scratch.values())


def test_averaged_context_restores_on_error():
    optimizer = FakeOptimizer()
    ema = ShardedEMA(optimizer)
    optimizer.fake_step(torch.Generator().manual_seed(1))
    live = [p.clone() for p in optimizer.params]
    with pytest.raises(KeyError):
        with ema.averaged():
            raise KeyError("inside")
    assert not ema.swapped
    assert all(torch.equal(p, l) for p, l in zip(optimizer.params, live))


def test_misuse_while_swapped_raises():
    ema = ShardedEMA(FakeOptimizer())
    with ema.averaged():
        with pytest.raises(RuntimeError, match="swapped in"):
            ema.update()
        with pytest.raises(RuntimeError, match="swapped in"):
            ema.state_dict()
        with pytest.raises(RuntimeError, match="already swapped"):
            with ema.averaged():
                pass


class SimulatedWorld:
    """Runs the all-gather of every rank's shards once the last rank has asked for it."""

    def __init__(self, world_size: int) -> None:
        self.ranks = [FakeOptimizer(rank=r, world_size=world_size) for r in range(world_size)]
        self.calls = 0
        for optimizer in self.ranks:
            optimizer.gather_params = self._gather

    def _gather(self) -> None:
        self.calls += 1
        if self.calls % len(self.ranks):
            return
        for index in range(len(BUCKET_SHAPES)):
            full = torch.cat([optimizer.buckets[index].shard_param for optimizer in self.ranks])
            for optimizer in self.ranks:
                optimizer.buckets[index].flat_param.copy_(full)


@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_ranks_average_their_shards_and_gather_on_swap(world_size):
    world = SimulatedWorld(world_size)
    emas = [ShardedEMA(optimizer, decay=0.8) for optimizer in world.ranks]
    whole = FakeOptimizer(rank=None, world_size=world_size)
    whole_ema = ShardedEMA(whole, decay=0.8)
    gens = [torch.Generator().manual_seed(1) for _ in range(world_size + 1)]
    for _ in range(4):
        for optimizer, gen in zip([*world.ranks, whole], gens):
            optimizer.fake_step(gen)  # every rank sees the same full update, as after a real gather
        for ema in [*emas, whole_ema]:
            ema.update()
    for bucket_index, bucket in enumerate(whole.buckets):
        shard_numel = bucket.flat_param.numel() // world_size
        assert all(ema.shards[bucket_index].numel() == shard_numel for ema in emas)  # 1/N of the memory
    for ema in emas:
        ema.swap()
    assert world.calls == world_size
    with whole_ema.averaged():
        for optimizer in world.ranks:
            for mine, full in zip(optimizer.buckets, whole.buckets):
                assert torch.equal(mine.flat_param, full.flat_param)
    for ema in emas:
        ema.swap()
    for optimizer in world.ranks:
        for mine, full in zip(optimizer.buckets, whole.buckets):
            assert torch.equal(mine.flat_param, full.flat_param)


def test_sharded_swap_without_gather_hook_raises_and_changes_nothing():
    optimizer = FakeOptimizer(rank=1, world_size=2)
    ema = ShardedEMA(optimizer)
    optimizer.fake_step(torch.Generator().manual_seed(1))
    before = [b.flat_param.clone() for b in optimizer.buckets]
    with pytest.raises(RuntimeError, match="gather_params"):
        ema.swap()
    assert not ema.swapped
    assert all(torch.equal(b.flat_param, x) for b, x in zip(optimizer.buckets, before))


def test_state_dict_round_trip_resumes_exactly():
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a, b = FakeOptimizer(), FakeOptimizer()
    ema_a, ema_b = ShardedEMA(a, decay=0.9, warmup=True), ShardedEMA(b, decay=0.5)
    for _ in range(3):
        a.fake_step(gen_a)
        b.fake_step(gen_b)
        ema_a.update()
        ema_b.update()
    state = ema_a.state_dict()
    json.dumps({k: v for k, v in state.items() if k != "shards"})
    assert state["num_updates"] == 3 and state["decay"] == 0.9 and state["warmup"] is True
    assert len(state["shards"]) == len(a.buckets)
    ema_b.load_state_dict({**state, "shards": [s.clone() for s in state["shards"]]})
    for _ in range(3):
        a.fake_step(gen_a)
        b.fake_step(gen_b)
        ema_a.update()
        ema_b.update()
    assert all(torch.equal(x, y) for x, y in zip(ema_a.shards, ema_b.shards))
    assert ema_b.num_updates == 6 and ema_b.decay == 0.9 and ema_b.warmup


@pytest.mark.parametrize(
    "change,error,message",
    [
        (lambda s: s.pop("shards"), KeyError, "shards"),
        (lambda s: s.update(decay=1.5), ValueError, "Invalid decay value"),
        (lambda s: s.update(decay="0.9"), TypeError, "decay"),
        (lambda s: s.update(num_updates=-1), ValueError, "num_updates"),
        (lambda s: s.update(num_updates=2.0), ValueError, "num_updates"),
        (lambda s: s.update(shards=s["shards"][:1]), ValueError, "1 shards"),
        (lambda s: s.update(shards=[s["shards"][0], torch.zeros(3)]), ValueError, "shard 1 has 3 elements"),
        (lambda s: s.update(shards=[s["shards"][0], [0.0]]), TypeError, "shard 1 must be a tensor"),
    ],
)
def test_load_state_dict_checks_before_changing(change, error, message):
    ema = ShardedEMA(FakeOptimizer())
    ema.update()
    state = ema.state_dict()
    state = {**state, "shards": [s.clone().add_(1) for s in state["shards"]], "num_updates": 9}
    change(state)
    before = [s.clone() for s in ema.shards]
    with pytest.raises(error, match=message):
        ema.load_state_dict(state)
    assert ema.num_updates == 1
    assert all(torch.equal(x, y) for x, y in zip(ema.shards, before))


def test_invalid_construction():
    with pytest.raises(ValueError, match="Invalid decay value"):
        ShardedEMA(FakeOptimizer(), decay=1.2)
    with pytest.raises(TypeError, match="buckets"):
        ShardedEMA(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1))


def test_buckets_added_later_are_reported():
    optimizer = FakeOptimizer()
    ema = ShardedEMA(optimizer)
    optimizer.buckets.append(optimizer.buckets[0])
    with pytest.raises(RuntimeError, match="add_param_group"):
        ema.update()


def _two_group_adam(model: nn.Module) -> torch.optim.Optimizer:
    first, second = list(model[0].parameters()), list(model[2].parameters())
    return shardoptim.Adam([{"params": first}, {"params": second, "lr": 3e-3}], lr=1e-2)


@pytest.mark.parametrize("decay", [0.9, 0.99])
def test_with_shardoptim_adam_matches_full_model_ema(decay):
    model = mlp(0)
    optimizer = _two_group_adam(model)
    assert len(optimizer.buckets) == 2
    ema = ShardedEMA(optimizer, decay=decay)
    reference = theirs.AveragedModel(model, multi_avg_fn=theirs.get_ema_multi_avg_fn(decay))
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        loss = model(torch.randn(16, 6, generator=gen)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update()
        reference.update_parameters(model)
    live = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(4, 6, generator=gen)
    with ema.averaged():
        for ours_param, their_param in zip(model.parameters(), reference.module.parameters()):
            assert torch.equal(ours_param, their_param)
        assert torch.equal(model(x), reference(x))
    assert all(torch.equal(p, l) for p, l in zip(model.parameters(), live))
    assert sum(s.numel() for s in ema.shards) == sum(b.shard_param.numel() for b in optimizer.buckets)


def test_with_shardoptim_adam_training_continues_unchanged_after_swaps():
    runs = []
    for swap_every_step in (False, True):
        model = mlp(0)
        optimizer = _two_group_adam(model)
        ema = ShardedEMA(optimizer, decay=0.9)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            loss = model(torch.randn(16, 6, generator=gen)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ema.update()
            if swap_every_step:
                with ema.averaged():
                    model(torch.randn(2, 6))
        runs.append(([p.detach().clone() for p in model.parameters()], ema.shards))
    (plain, plain_ema), (swapped, swapped_ema) = runs
    assert all(torch.equal(a, b) for a, b in zip(plain, swapped))
    assert all(torch.equal(a, b) for a, b in zip(plain_ema, swapped_ema))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_averaged_model_ema():
    optimizer = FakeOptimizer(device="cuda")
    ema = ShardedEMA(optimizer, decay=0.9)
    reference = _reference(optimizer.params, 0.9)
    holder = reference.module
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        optimizer.fake_step(gen)
        _sync(holder, optimizer.params)
        ema.update()
        reference.update_parameters(holder)
    with ema.averaged():
        for ours_param, their_param in zip(optimizer.params, reference.module):
            assert torch.equal(ours_param, their_param)
