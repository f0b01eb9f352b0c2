"""``state_dtype``: a bfloat16 model trained with float32 optimizer state and a float32 master copy.

The oracle: with a master copy, the master is exactly torch.optim run on float32 parameters fed the
same gradients (the bfloat16 model's, upcast), and the bfloat16 parameters are that master rounded.
So every test trains our optimizer on a bfloat16 model next to torch.optim on float32 copies of its
parameters, feeds torch the gradients our model computed, and compares: bit for bit where our
implementation computes each element as torch's does (for-loop and foreach), within torch's float32
tolerance where it does not (default and fused: with a master, the update compiled, since torch's
fused kernels take one dtype for parameters, gradients and state).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.distributed as dist
from torch import nn

import shardoptim
from shardoptim import checkpoint
from tests.distributed.scenarios import KWARGS
from tests.oracle import tolerance

BF16, F32 = torch.bfloat16, torch.float32
STEPS = 5

#: Our implementation -> (our flags, torch.optim's flags, whether they agree bit for bit).
ADAMW_IMPLEMENTATIONS = {
    "default": ({}, {"fused": True}, False),
    "fused": ({"fused": True}, {"fused": True}, False),
    "foreach": ({"foreach": True}, {"foreach": True}, True),
    "for-loop": ({"foreach": False}, {"foreach": False}, True),
}


class Net(nn.Module):
    """bfloat16 layers around a float32 LayerNorm (kept wide, as mixed-precision recipes do)."""

    def __init__(self, dtype: torch.dtype = BF16) -> None:
        super().__init__()
        self.inp = nn.Linear(7, 13).to(dtype)
        self.norm = nn.LayerNorm(13)
        self.out = nn.Linear(13, 5).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x.to(self.inp.weight.dtype)))
        return self.out(self.norm(h.to(self.norm.weight.dtype)).to(self.out.weight.dtype)).float()


def make_model(seed: int = 0, dtype: torch.dtype = BF16) -> Net:
    torch.manual_seed(seed)
    return Net(dtype)


def batch(step: int, rows: int = 8) -> torch.Tensor:
    return torch.randn(rows, 7, generator=torch.Generator().manual_seed(100 + step))


def backward(model: nn.Module, step: int, rows: slice = slice(None)) -> None:
    model(batch(step)[rows]).pow(2).mean().backward()


def float_copy(model: nn.Module) -> list[torch.Tensor]:
    """torch.optim's parameters: the model's, in float32."""
    return [p.detach().to(F32, copy=True).requires_grad_() for p in model.parameters()]


def feed(model: nn.Module, reference: list[torch.Tensor]) -> None:
    """Give torch.optim's parameters the gradients the model computed, upcast (None stays None)."""
    for p, q in zip(model.parameters(), reference):
        q.grad = None if p.grad is None else p.grad.to(F32)


def master_of(opt: shardoptim.Optimizer, p: torch.Tensor) -> torch.Tensor:
    """The float32 values ``opt`` trains for ``p``: its master, or ``p`` itself when it is float32."""
    return opt.state[p]["master_param"] if p.dtype != F32 else p


def assert_tracks(opt: shardoptim.Optimizer, model: nn.Module, reference: list[torch.Tensor], **tolerance) -> None:
    """The masters equal torch's float32 parameters (exactly, unless a tolerance is given), and
    every parameter is its own master rounded."""
    for index, (p, q) in enumerate(zip(model.parameters(), reference)):
        master = master_of(opt, p)
        if tolerance:
            torch.testing.assert_close(master, q.detach(), **tolerance, msg=lambda m: f"parameter {index}: {m}")
        else:
            assert torch.equal(master, q), f"parameter {index}: master differs from torch.optim in float32"
        assert master.dtype == F32
        assert torch.equal(p, master.to(p.dtype)), f"parameter {index} is not its master rounded"


def train_side_by_side(opt, model, theirs, reference, steps, **tolerance) -> None:
    for step in steps:
        backward(model, step)
        if step == 2:  # a parameter without a gradient is not touched, in either
            model.out.bias.grad = None
        feed(model, reference)
        opt.step()
        theirs.step()
        opt.zero_grad()
        theirs.zero_grad()
        assert_tracks(opt, model, reference, **tolerance)


# -- the oracle ------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", list(ADAMW_IMPLEMENTATIONS))
def test_adamw_master_is_torch_in_float32(implementation):
    ours_flags, torch_flags, bitwise = ADAMW_IMPLEMENTATIONS[implementation]
    model = make_model()
    reference = float_copy(model)
    opt = shardoptim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1, state_dtype=F32, **ours_flags)
    theirs = torch.optim.AdamW(reference, lr=0.01, weight_decay=0.1, **torch_flags)
    close = {} if bitwise else tolerance(F32)
    train_side_by_side(opt, model, theirs, reference, range(STEPS), **close)
    for p, q in zip(model.parameters(), reference):
        for name in ("exp_avg", "exp_avg_sq"):
            assert opt.state[p][name].dtype == F32
            if bitwise:
                assert torch.equal(opt.state[p][name], theirs.state[q][name])
            else:
                torch.testing.assert_close(opt.state[p][name], theirs.state[q][name], **close)
    assert "master_param" not in opt.state[model.norm.weight]  # float32 already: nothing to keep


@pytest.mark.parametrize("implementation", ["default", "foreach"])
@pytest.mark.parametrize("name", list(KWARGS))
def test_every_algorithm_trains_its_master_like_torch_in_float32(name, implementation):
    """Default is the update compiled, which must keep the rounding of the master that it compares
    with the parameters (inductor would otherwise fuse the cast away and restart the master every step)."""
    model = make_model()
    reference = float_copy(model)
    flags = {} if implementation == "default" else {"foreach": True}
    opt = getattr(shardoptim, name)(model.parameters(), **KWARGS[name], **flags, state_dtype=F32)
    # torch's foreach ASGD arranges its arithmetic differently from its for-loop, which ours follows
    theirs = getattr(torch.optim, name)(reference, **KWARGS[name], foreach=name != "ASGD")
    train_side_by_side(opt, model, theirs, reference, range(STEPS), **tolerance(F32))


def test_small_updates_add_up_in_the_master_and_vanish_without_it():
    """The reason for the option: a step below half a bfloat16 unit rounds away every time."""
    finals = {}
    for state_dtype in (None, F32):
        weight = nn.Parameter(torch.ones(64, dtype=BF16))
        opt = shardoptim.SGD([weight], lr=1e-4, state_dtype=state_dtype)
        reference = torch.ones(64, requires_grad=True)
        theirs = torch.optim.SGD([reference], lr=1e-4)
        for _ in range(50):
            weight.grad = torch.ones_like(weight)
            reference.grad = torch.ones_like(reference)
            opt.step()
            theirs.step()
        finals[state_dtype] = weight.detach().clone()
    assert torch.equal(finals[None], torch.ones(64, dtype=BF16))
    assert torch.equal(finals[F32], reference.detach().to(BF16))
    assert torch.equal(opt.state[weight]["master_param"], reference.detach())
    assert finals[F32][0].item() < 1


def test_a_parameter_written_from_outside_restarts_its_master():
    """``model.load_state_dict``, an in-place edit: where the parameter changed, the master follows it."""
    model = make_model()
    reference = float_copy(model)
    opt = shardoptim.NAdam(model.parameters(), lr=0.01, state_dtype=F32)  # compiled: the check is in the kernel
    theirs = torch.optim.NAdam(reference, lr=0.01, foreach=True)
    train_side_by_side(opt, model, theirs, reference, range(2), **tolerance(F32))
    with torch.no_grad():
        model.inp.weight.fill_(3.0)
        reference[0].fill_(3.0)
        model.load_state_dict({**model.state_dict(), "out.bias": torch.full((5,), -2.0, dtype=BF16)})
        reference[-1].fill_(-2.0)
    train_side_by_side(opt, model, theirs, reference, range(3, 5), **tolerance(F32))  # (step 2 skips a gradient)
    assert (model.inp.weight - 3).abs().max() < 0.1


def test_sparse_gradients_train_the_master():
    weights = torch.randn(10, 4)
    ours = nn.Embedding.from_pretrained(weights.to(BF16), freeze=False, sparse=True)
    reference = nn.Parameter(weights.to(BF16).to(F32))
    opt = shardoptim.SGD(ours.parameters(), lr=0.1, momentum=0.9, state_dtype=F32)
    theirs = torch.optim.SGD([reference], lr=0.1, momentum=0.9)
    for step in range(3):
        ours(torch.tensor([1, 3, 3, step])).float().pow(2).sum().backward()
        reference.grad = ours.weight.grad.to(F32)
        opt.step()
        theirs.step()
        opt.zero_grad()
        theirs.zero_grad()
        master = opt.state[ours.weight]["master_param"]
        torch.testing.assert_close(master, reference.detach(), **tolerance(F32))
        assert torch.equal(ours.weight.detach(), master.to(BF16))


def test_complex_parameters_keep_complex_state_of_the_wider_dtype():
    values = torch.randn(6, 3, dtype=torch.complex64)
    param = nn.Parameter(values.clone())
    reference = nn.Parameter(values.to(torch.complex128))
    opt = shardoptim.Adam([param], lr=0.01, state_dtype=torch.float64, foreach=True)
    theirs = torch.optim.Adam([reference], lr=0.01, foreach=True)
    for step in range(3):
        grad = torch.randn(6, 3, dtype=torch.complex64, generator=torch.Generator().manual_seed(step))
        param.grad, reference.grad = grad, grad.to(torch.complex128)
        opt.step()
        theirs.step()
    assert opt.state[param]["exp_avg"].dtype == torch.complex128
    assert torch.equal(opt.state[param]["master_param"], reference.detach())
    assert torch.equal(param.detach(), reference.detach().to(torch.complex64))


# -- nothing changes without it ----------------------------------------------------------------------


@pytest.mark.parametrize("state_dtype", [None, BF16], ids=["none", "the-parameters-own"])
def test_without_a_wider_state_dtype_nothing_changes(state_dtype):
    """Without ``state_dtype`` (or with the parameters' own), a bfloat16 model trains exactly as
    torch.optim on the same bfloat16 parameters, with bfloat16 state and no master."""
    model = make_model()
    model.norm.to(BF16)
    theirs_model = copy.deepcopy(model)
    opt = shardoptim.AdamW(model.parameters(), lr=0.01, state_dtype=state_dtype)
    theirs = torch.optim.AdamW(theirs_model.parameters(), lr=0.01, fused=True)
    for step in range(STEPS):
        backward(model, step)
        backward(theirs_model, step)
        opt.step()
        theirs.step()
        opt.zero_grad()
        theirs.zero_grad()
    for p, q in zip(model.parameters(), theirs_model.parameters()):
        assert torch.equal(p, q)
        assert set(opt.state[p]) == set(theirs.state[q]) == {"step", "exp_avg", "exp_avg_sq"}
        assert opt.state[p]["exp_avg"].dtype == p.dtype
        assert torch.equal(opt.state[p]["exp_avg"], theirs.state[q]["exp_avg"])


def test_float32_parameters_are_unaffected():
    runs = []
    for state_dtype in (None, F32):
        model = make_model(dtype=F32)
        opt = shardoptim.Adam(model.parameters(), lr=0.01, state_dtype=state_dtype)
        for step in range(3):
            backward(model, step)
            opt.step()
            opt.zero_grad()
        runs.append((model, opt))
    (a, opt_a), (b, opt_b) = runs
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        assert set(opt_b.state[q]) == {"step", "exp_avg", "exp_avg_sq"}


# -- refused ---------------------------------------------------------------------------------------


def params(dtype: torch.dtype = BF16) -> list[nn.Parameter]:
    return [nn.Parameter(torch.randn(3, 4).to(dtype))]


@pytest.mark.parametrize("value", [torch.int32, torch.bool, torch.complex64])
def test_a_dtype_that_is_not_floating_point_is_refused(value):
    with pytest.raises(ValueError, match=rf"state_dtype={value}"):
        shardoptim.AdamW(params(), state_dtype=value)


def test_a_non_dtype_is_refused():
    with pytest.raises(TypeError, match="state_dtype must be a torch.dtype"):
        shardoptim.AdamW(params(), state_dtype="float32")


@pytest.mark.parametrize(("param_dtype", "state_dtype"), [
    (torch.float64, F32), (F32, BF16), (torch.float16, BF16), (BF16, torch.float16),
])
def test_a_dtype_narrower_than_a_parameter_is_refused_naming_it(param_dtype, state_dtype):
    with pytest.raises(ValueError, match=rf"parameter 0 of param group 0.*state_dtype={state_dtype} is narrower"):
        shardoptim.Adam(params(param_dtype), state_dtype=state_dtype)


def test_a_narrower_parameter_added_later_is_refused_and_not_added():
    opt = shardoptim.Adam(params(), state_dtype=F32)
    with pytest.raises(ValueError, match="parameter 0 of param group 1.*narrower"):
        opt.add_param_group({"params": params(torch.float64)})
    assert len(opt.param_groups) == 1


def test_a_parameter_converted_to_a_wider_dtype_before_training_is_refused_at_step():
    param = params()[0]
    opt = shardoptim.Adam([param], state_dtype=F32)
    param.data = param.data.double()
    param.grad = torch.ones_like(param)
    with pytest.raises(ValueError, match="parameter 0 of param group 0.*narrower"):
        opt.step()


@pytest.mark.parametrize("name", ["LBFGS", "SparseAdam"])
def test_algorithms_without_an_elementwise_rule_refuse_it(name):
    with pytest.raises(ValueError, match=rf"{name} does not support state_dtype=torch.float32"):
        getattr(shardoptim, name)(params(), state_dtype=F32)


def test_differentiable_groups_refuse_it():
    with pytest.raises(ValueError, match="state_dtype=torch.float32 is not supported with differentiable=True"):
        shardoptim.Adam(params(), differentiable=True, state_dtype=F32)


# -- state dicts, copies, memory -------------------------------------------------------------------


def trained(seed: int = 0, steps: range = range(3), **kwargs) -> tuple[Net, shardoptim.AdamW]:
    model = make_model(seed)
    opt = shardoptim.AdamW(model.parameters(), lr=0.01, **{"state_dtype": F32, **kwargs})
    for step in steps:
        backward(model, step)
        opt.step()
        opt.zero_grad()
    return model, opt


def assert_same_run(a: tuple[Net, shardoptim.Optimizer], b: tuple[Net, shardoptim.Optimizer], steps: range) -> None:
    """Training both on from here keeps them equal, bit for bit, parameters and state."""
    for model, opt in (a, b):
        for step in steps:
            backward(model, step)
            opt.step()
            opt.zero_grad()
    (model_a, opt_a), (model_b, opt_b) = a, b
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
        assert opt_a.state[p].keys() == opt_b.state[q].keys()
        for name, value in opt_a.state[p].items():
            assert value.dtype == opt_b.state[q][name].dtype and torch.equal(value, opt_b.state[q][name]), name


def test_state_dict_round_trip_carries_the_master():
    model, opt = trained()
    saved = copy.deepcopy(opt.state_dict())
    weight = saved["state"][0]
    assert weight["master_param"].dtype == F32 and weight["master_param"].shape == model.inp.weight.shape
    assert weight["exp_avg"].dtype == F32
    fresh_model, fresh = trained(seed=1, steps=range(0))
    fresh_model.load_state_dict(model.state_dict())
    fresh.load_state_dict(saved)
    assert_same_run((model, opt), (fresh_model, fresh), range(3, 6))


@pytest.mark.parametrize("source", ["torch.optim", "shardoptim without state_dtype"])
def test_a_state_dict_without_a_master_starts_it_from_the_parameters(source):
    model = make_model()
    if source == "torch.optim":
        plain = torch.optim.AdamW(model.parameters(), lr=0.01)
    else:
        plain = shardoptim.AdamW(model.parameters(), lr=0.01)
    for step in range(3):
        backward(model, step)
        plain.step()
        plain.zero_grad()
    saved = plain.state_dict()
    opt_model = make_model(seed=1)
    opt = shardoptim.AdamW(opt_model.parameters(), lr=0.01, state_dtype=F32)
    opt_model.load_state_dict(model.state_dict())
    opt.load_state_dict(saved)
    for p, q in zip(opt_model.parameters(), model.parameters()):
        assert torch.equal(master_of(opt, p), q.detach().to(F32))
        assert opt.state[p]["exp_avg"].dtype == F32
        assert torch.equal(opt.state[p]["exp_avg"], plain.state[q]["exp_avg"].to(F32))


def test_loading_over_an_existing_master_from_a_state_dict_without_one():
    model, opt = trained()
    plain_model, plain = trained(seed=1, state_dtype=None)
    model.load_state_dict(plain_model.state_dict())
    opt.load_state_dict(plain.state_dict())
    for p, q in zip(model.parameters(), plain_model.parameters()):
        assert torch.equal(master_of(opt, p), q.detach().to(F32))


def test_a_state_dict_with_a_master_loads_where_there_is_none():
    """Into shardoptim without state_dtype, and into torch.optim: the master is not needed there."""
    model, opt = trained()
    saved = opt.state_dict()
    for build in (lambda ps: shardoptim.AdamW(ps, lr=0.01), lambda ps: torch.optim.AdamW(ps, lr=0.01)):
        other_model = make_model(seed=1)
        other_model.load_state_dict(model.state_dict())
        other = build(other_model.parameters())
        other.load_state_dict(saved)
        backward(other_model, 3)
        other.step()
    plain = shardoptim.AdamW(make_model().parameters(), lr=0.01)
    plain.load_state_dict(saved)
    assert all("master_param" not in entry for entry in plain.state_dict()["state"].values())


def test_deepcopy_and_pickle_keep_the_state_dtype():
    model, opt = trained()
    assert copy.deepcopy(opt).state_dtype == F32
    pickled = pickle.loads(pickle.dumps({"model": model, "opt": opt}))
    assert pickled["opt"].state_dtype == F32
    assert_same_run((model, opt), (pickled["model"], pickled["opt"]), range(3, 5))
    together = copy.deepcopy({"model": model, "opt": opt})
    assert_same_run((model, opt), (together["model"], together["opt"]), range(5, 7))


def test_shard_state_dict_round_trip():
    model, opt = trained()
    own = opt.shard_state_dict()
    bf16_bucket = next(b for b in own["buckets"] if b["layout"]["dtype"] == "bfloat16")
    assert set(bf16_bucket["state"]) == {"exp_avg", "exp_avg_sq", "master_param"}
    assert all(t.dtype == F32 for t in bf16_bucket["state"].values())
    saved = copy.deepcopy(own)
    fresh_model = make_model(seed=1)
    fresh_model.load_state_dict(model.state_dict())
    fresh = shardoptim.AdamW(fresh_model.parameters(), lr=0.01, state_dtype=F32)
    fresh.load_shard_state_dict(saved)
    assert_same_run((model, opt), (fresh_model, fresh), range(3, 6))


def test_memory_report_counts_the_wider_state_and_the_master():
    model, opt = trained()
    report = opt.memory_report().ranks[0]
    assert report.state == sum(
        sum(t.nbytes for t in b.state.tensors.values()) + b.state.steps.nbytes for b in opt.buckets
    )
    bf16 = next(b for b in opt.buckets if b.layout.dtype == BF16)
    assert sum(t.nbytes for t in bf16.state.tensors.values()) == 3 * 4 * bf16.layout.numel


def test_adagrad_shows_its_master_from_construction():
    model = make_model()
    opt = shardoptim.Adagrad(model.parameters(), state_dtype=F32)
    assert torch.equal(opt.state[model.inp.weight]["master_param"], model.inp.weight.detach().to(F32))
    assert opt.state[model.inp.weight]["sum"].dtype == F32


# -- checkpoints -----------------------------------------------------------------------------------


def test_checkpoint_round_trip_is_bitwise(tmp_path):
    model, opt = trained()
    url = str(tmp_path / "ckpt")
    checkpoint.save(url, model=model, optimizer=opt)
    other_model, other = trained(seed=1)
    checkpoint.load(url, model=other_model, optimizer=other)
    assert_same_run((model, opt), (other_model, other), range(3, 6))


def test_a_checkpoint_without_a_master_starts_it_from_the_loaded_parameters(tmp_path):
    plain_model, plain = trained(state_dtype=None)
    url = str(tmp_path / "plain")
    checkpoint.save(url, model=plain_model, optimizer=plain)
    loaded_model, loaded = trained(seed=1)  # a master of other values, which must not survive
    checkpoint.load(url, model=loaded_model, optimizer=loaded)
    expected_model = make_model(seed=2)
    expected_model.load_state_dict(plain_model.state_dict())
    expected = shardoptim.AdamW(expected_model.parameters(), lr=0.01, state_dtype=F32)
    expected.load_state_dict(plain.state_dict())
    assert_same_run((loaded_model, loaded), (expected_model, expected), range(3, 5))


# -- sharded ---------------------------------------------------------------------------------------

SHARDINGS = {
    "default": {"bucket_cap_numel": 40},
    "zero2-overlap": {"bucket_cap_numel": 40, "shard_grads": True, "overlap_grad_reduce": True},
    "reduce_scatter-all_gather": {"bucket_cap_numel": 40, "average": "reduce_scatter", "gather": "all_gather"},
}


def sharded_against_torch(sharding: dict) -> dict:
    """On every rank: 2-rank sharded AdamW (foreach: bit for bit) with float32 state on its half of each batch, against
    torch.optim in float32 fed the average the sharded step computes (each half's bfloat16 gradient,
    summed in bfloat16, halved: what 2 ranks' exchange gives, exactly)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    reference = float_copy(model)
    opt = shardoptim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1, state_dtype=F32, foreach=True,
                           process_group=dist.group.WORLD, sharding=shardoptim.ShardingConfig(**sharding))
    theirs = torch.optim.AdamW(reference, lr=0.01, weight_decay=0.1, foreach=True)
    rows = 8 // world
    for step in range(STEPS):
        oracle = copy.deepcopy(model)
        for other in range(world):
            backward(oracle, step, slice(other * rows, (other + 1) * rows))
        for p in oracle.parameters():
            p.grad.div_(world)
        feed(oracle, reference)
        backward(model, step, slice(rank * rows, (rank + 1) * rows))
        opt.step()
        theirs.step()
        opt.zero_grad()
        theirs.zero_grad()
        full = opt.state_dict()["state"]
        for index, (p, q) in enumerate(zip(model.parameters(), reference)):
            master = full[index].get("master_param", p)
            assert torch.equal(master, q), f"step {step}: parameter {index}'s master differs"
            assert torch.equal(p, q.detach().to(p.dtype)), f"step {step}: parameter {index} differs"
    report = opt.memory_report().ranks[rank]
    mine = sum(sum(t.nbytes for t in b.state.tensors.values()) + b.state.steps.nbytes for b in opt.buckets)
    return {"state": report.state, "tensors": mine, "buckets": len(opt.buckets),
            "sharded": all(b.is_sharded for b in opt.buckets)}


@pytest.mark.parametrize("sharding", list(SHARDINGS))
def test_two_ranks_shard_the_master_and_match_torch_in_float32(worlds, sharding):
    for numbers in worlds.get(2).run(sharded_against_torch, SHARDINGS[sharding]):
        assert numbers["state"] == numbers["tensors"]
        assert numbers["buckets"] > 1 and numbers["sharded"]


def save_sharded(url: str) -> dict:
    """On every rank: train 2-rank sharded AdamW with float32 state, save, return the full state."""
    model = make_model()
    opt = shardoptim.AdamW(model.parameters(), lr=0.01, state_dtype=F32, process_group=dist.group.WORLD,
                           sharding=shardoptim.ShardingConfig(bucket_cap_numel=40))
    rows = 8 // dist.get_world_size()
    for step in range(3):
        backward(model, step, slice(dist.get_rank() * rows, (dist.get_rank() + 1) * rows))
        opt.step()
        opt.zero_grad()
    checkpoint.save(url, model=model, optimizer=opt)
    state = opt.state_dict()["state"]
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "state": {i: {k: v.clone() for k, v in entry.items()} for i, entry in state.items()}}


def test_a_two_rank_checkpoint_loads_in_one_process_bit_for_bit(worlds, tmp_path):
    url = str(tmp_path / "two-ranks")
    saved = worlds.get(2).run(save_sharded, url)[0]
    model, opt = trained(seed=1)
    checkpoint.load(url, model=model, optimizer=opt)
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved["model"][key]), key
    state = opt.state_dict()["state"]
    assert state.keys() == saved["state"].keys()
    for index, entry in saved["state"].items():
        for name, value in entry.items():
            assert value.dtype == state[index][name].dtype and torch.equal(state[index][name], value), (index, name)


def mismatched_state_dtype() -> str:
    """On every rank: rank 0 asks for float32 state, rank 1 for none; every rank must refuse."""
    state_dtype = F32 if dist.get_rank() == 0 else None
    try:
        shardoptim.AdamW(make_model().parameters(), state_dtype=state_dtype, process_group=dist.group.WORLD)
    except ValueError as error:
        return str(error)
    return "built"


def test_ranks_with_different_state_dtypes_are_refused_everywhere(worlds):
    for message in worlds.get(2).run(mismatched_state_dtype):
        assert "state_dtype" in message and "differ from rank 0" in message
