"""What the distributed tests run on every rank of a ``World``: sharded training next to its oracle.

Every scenario builds the same tiny model on every rank. The sharded optimizer trains it with each
rank on its slice of the batch; the oracle, on the same rank, is torch.optim on a copy of the model
fed every rank's slice in turn with the gradients summed and divided by the world size, which is the
average the sharded step computes (a rank's missing gradient counting as zero, as under DDP).
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import shardoptim
from shardoptim.core.distributed import ProcessGroupComm

STEPS = 6
BATCH = 8  # rows per step, split evenly across ranks (2 or 4)

#: Options that leave each algorithm's defaults for its less common paths.
KWARGS: dict[str, dict[str, Any]] = {
    "SGD": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    "Adam": {"lr": 0.01, "weight_decay": 0.01, "amsgrad": True},
    "AdamW": {"lr": 0.01},
    "Adadelta": {"lr": 0.5, "weight_decay": 0.01},
    "Adagrad": {"lr": 0.05, "lr_decay": 0.01, "initial_accumulator_value": 0.1},
    "Adamax": {"lr": 0.01},
    "ASGD": {"lr": 0.01, "t0": 2},
    "NAdam": {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.01},
    "RAdam": {"lr": 0.01},
    "RMSprop": {"lr": 0.01, "momentum": 0.5, "centered": True},
    "Rprop": {"lr": 0.01},
}


def shardable_algorithms() -> list[str]:
    """shardoptim's public elementwise algorithms that shard (not LBFGS and SparseAdam, which run
    replicated, nor the matrix algorithms, whose tests are ``matrix_scenarios``)."""
    names = []
    for name in shardoptim.__all__:
        cls = getattr(shardoptim, name)
        if isinstance(cls, type) and issubclass(cls, shardoptim.Optimizer) and cls is not shardoptim.Optimizer:
            if cls.shardable and cls.rule is not None and hasattr(torch.optim, name):
                names.append(name)
    return names


def is_compiled(name: str) -> bool:
    """Whether ``name``'s fused implementation is its update compiled (rather than a torch kernel)."""
    return getattr(shardoptim, name).rule.kernel is None


class Tiny(nn.Module):
    """Uneven sizes, two dtypes, a layer some steps skip and a matrix only rank 0 uses on odd steps."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(7, 13)
        self.out = nn.Linear(13, 5)
        self.skip = nn.Linear(7, 5, bias=False)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 5, dtype=torch.float64))
        self.rare = nn.Parameter(0.1 * torch.randn(3, 5))

    def forward(self, x: torch.Tensor, use_skip: bool = True, use_rare: bool = False) -> torch.Tensor:
        y = self.out(torch.tanh(self.inp(x)))
        if use_skip:
            y = y + self.skip(x)
        y = y * self.scale.to(y.dtype)
        if use_rare:
            y = y + x[:, :3] @ self.rare
        return y

    def groups(self, lr: float | None) -> list[dict[str, Any]]:
        second: dict[str, Any] = {"params": [self.out.weight, self.out.bias, self.scale, self.rare]}
        if lr is not None:
            second["lr"] = lr / 2
        return [{"params": [self.inp.weight, self.inp.bias, self.skip.weight]}, second]


def usage(step: int, rank: int, *, static: bool = False) -> dict[str, bool]:
    """Which optional parts of ``Tiny`` rank ``rank``'s forward uses at ``step``."""
    if static:
        return {"use_skip": True, "use_rare": False}
    return {"use_skip": step % 3 != 1, "use_rare": rank == 0 and step % 2 == 1}


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 7, generator=gen), torch.randn(BATCH, 5, generator=gen)


def rank_slice(tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    rows = tensor.shape[0] // world
    return tensor[rank * rows : (rank + 1) * rows]


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, flags: dict[str, bool]) -> torch.Tensor:
    return ((model(x, **flags) - y) ** 2).mean()


def oracle_backward(model: nn.Module, step: int, world: int, *, static: bool = False) -> None:
    """Leave in ``model``'s ``.grad`` the average over ranks of each rank's gradient (None if nobody's)."""
    x, y = batch(step)
    for rank in range(world):
        loss_of(model, rank_slice(x, rank, world), rank_slice(y, rank, world), usage(step, rank, static=static)).backward()
    for param in model.parameters():
        if param.grad is not None:
            param.grad.div_(world)


def own_backward(model: nn.Module, step: int, *, static: bool = False) -> torch.Tensor:
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = batch(step)
    loss = loss_of(model, rank_slice(x, rank, world), rank_slice(y, rank, world), usage(step, rank, static=static))
    loss.backward()
    return loss


def models(seed: int = 0) -> tuple[Tiny, Tiny]:
    torch.manual_seed(seed)
    model = Tiny()
    return model, copy.deepcopy(model)


def assert_close(ours: Iterator[torch.Tensor], theirs: Iterator[torch.Tensor], what: str, *, atol: float = 1e-6,
                 rtol: float = 1e-5) -> None:
    for index, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        torch.testing.assert_close(a.detach(), b.detach(), atol=atol, rtol=rtol, msg=lambda m: f"{what}, tensor {index}: {m}")


def build(name: str, params: Any, *, sharded: bool, sharding: dict[str, Any] | None = None,
          **extra: Any) -> torch.optim.Optimizer:
    """``name`` with ``KWARGS``: shardoptim's over the whole world (with ``ShardingConfig(**sharding)``),
    or torch's.

    Algorithms whose fused implementation is compiled run foreach here unless told otherwise: compiling
    costs seconds per process and the sharded logic does not depend on the implementation
    (``test_compiled_update_sharded`` covers the compiled one).
    """
    kwargs = {**KWARGS.get(name, {}), **extra}
    if sharded:
        cls = getattr(shardoptim, name)
        if is_compiled(name) and "fused" not in kwargs and "foreach" not in kwargs:
            kwargs["foreach"] = True
        config = shardoptim.ShardingConfig(**(sharding or {}))
        return cls(params, **kwargs, process_group=dist.group.WORLD, sharding=config)
    return getattr(torch.optim, name)(params, **kwargs)


# -- scenarios: each runs on every rank --------------------------------------------------------------


def training_parity(name: str, sharding: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> float:
    """Sharded training of ``Tiny`` with ``name`` (``ShardingConfig(**sharding)``, our ``extra`` options)
    matches the oracle after every step; returns the largest difference."""
    extra = extra or {}
    world = dist.get_world_size()
    model, reference = models()
    lr = KWARGS.get(name, {}).get("lr")
    opt = build(name, model.groups(lr), sharded=True, sharding=sharding, **extra)
    ref_opt = build(name, reference.groups(lr), sharded=False)
    worst = 0.0
    for step in range(STEPS):
        own_backward(model, step)
        oracle_backward(reference, step, world)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        assert_close(model.parameters(), reference.parameters(), f"{name} step {step}")
        worst = max(worst, max((a - b).abs().max().item() for a, b in zip(model.parameters(), reference.parameters())))
    return worst


def ddp_parity(name: str, gradient_as_bucket_view: bool) -> None:
    """Under DDP (gradients already averaged) with ``reduce_grads=False``, training matches the oracle."""
    world = dist.get_world_size()
    model, reference = models()
    ddp = DistributedDataParallel(model, find_unused_parameters=True, gradient_as_bucket_view=gradient_as_bucket_view)
    lr = KWARGS.get(name, {}).get("lr")
    opt = build(name, model.groups(lr), sharded=True, reduce_grads=False)
    ref_opt = build(name, reference.groups(lr), sharded=False)
    rank = dist.get_rank()
    for step in range(STEPS):
        x, y = batch(step)
        loss_of(ddp, rank_slice(x, rank, world), rank_slice(y, rank, world), usage(step, rank)).backward()
        oracle_backward(reference, step, world)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        assert_close(model.parameters(), reference.parameters(), f"DDP {name} step {step}")


def clip_parity(max_norm: float, norm_type: float, reduce_grads: bool = True) -> None:
    """``opt.clip_grad_norm_`` returns torch's total norm and clips as torch does, step after step."""
    world = dist.get_world_size()
    model, reference = models()
    trained: nn.Module = model if reduce_grads else DistributedDataParallel(model, find_unused_parameters=True)
    opt = shardoptim.SGD(model.groups(0.1), lr=0.1, momentum=0.9, process_group=dist.group.WORLD,
                         reduce_grads=reduce_grads)
    ref_opt = torch.optim.SGD(reference.groups(0.1), lr=0.1, momentum=0.9)
    rank = dist.get_rank()
    for step in range(STEPS):
        x, y = batch(step)
        loss_of(trained, rank_slice(x, rank, world), rank_slice(y, rank, world), usage(step, rank)).backward()
        oracle_backward(reference, step, world)
        total = opt.clip_grad_norm_(max_norm, norm_type)
        ref_total = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm, norm_type)
        torch.testing.assert_close(total.to(ref_total.dtype), ref_total, atol=1e-6, rtol=1e-5)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        assert_close(model.parameters(), reference.parameters(), f"clip {norm_type} step {step}")


def clip_then_zero_grad_discards() -> None:
    """Gradients averaged by clip_grad_norm_ are not reused after zero_grad() (a skipped step)."""
    world = dist.get_world_size()
    model, reference = models()
    opt = shardoptim.SGD(model.parameters(), lr=0.1, process_group=dist.group.WORLD)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    own_backward(model, 0, static=True)
    opt.clip_grad_norm_(1e-3)
    opt.zero_grad()
    own_backward(model, 1, static=True)
    oracle_backward(reference, 1, world, static=True)
    opt.step()
    ref_opt.step()
    assert_close(model.parameters(), reference.parameters(), "step after a discarded clip")


def state_dict_round_trips(name: str) -> None:
    """Gathered state equals torch's; a torch state dict loads into shards; the result loads into torch."""
    world = dist.get_world_size()
    rank = dist.get_rank()
    model, reference = models()
    lr = KWARGS.get(name, {}).get("lr")
    opt = build(name, model.groups(lr), sharded=True)
    ref_opt = build(name, reference.groups(lr), sharded=False)

    def train(steps: range) -> None:
        for step in steps:
            own_backward(model, step)
            oracle_backward(reference, step, world)
            opt.step()
            ref_opt.step()
            opt.zero_grad()
            ref_opt.zero_grad()

    train(range(3))
    ours, theirs = opt.state_dict(), ref_opt.state_dict()
    assert_state_equal(ours, theirs, f"{name} gathered on every rank")
    on_rank0 = opt.state_dict(rank0_only=True)
    if rank == 0:
        assert_state_equal(on_rank0, theirs, f"{name} gathered on rank 0")
    else:
        assert on_rank0 == {}, "rank0_only=True must give other ranks an empty dict"

    # torch -> shards: a fresh sharded optimizer on a copy of the reference continues like torch.
    resumed_model = copy.deepcopy(reference)
    resumed = build(name, resumed_model.groups(lr), sharded=True)
    resumed.load_state_dict(copy.deepcopy(theirs))
    assert_state_equal(resumed.state_dict(), theirs, f"{name} after load")
    # shards -> torch: torch loads the gathered dict and continues like the sharded optimizer.
    torch_model = copy.deepcopy(model)
    torch_opt = build(name, torch_model.groups(lr), sharded=False)
    torch_opt.load_state_dict(copy.deepcopy(ours))
    for step in range(3, 5):
        own_backward(resumed_model, step)
        oracle_backward(torch_model, step, world)
        resumed.step()
        torch_opt.step()
        resumed.zero_grad()
        torch_opt.zero_grad()
    assert_close(resumed_model.parameters(), torch_model.parameters(), f"{name} resumed both ways")


def assert_state_equal(ours: dict[str, Any], theirs: dict[str, Any], what: str) -> None:
    assert [g["params"] for g in ours["param_groups"]] == [g["params"] for g in theirs["param_groups"]], what
    assert ours["state"].keys() == theirs["state"].keys(), f"{what}: {ours['state'].keys()} != {theirs['state'].keys()}"
    for index, entry in theirs["state"].items():
        mine = ours["state"][index]
        assert mine.keys() == entry.keys(), f"{what}, param {index}: {mine.keys()} != {entry.keys()}"
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert mine[key].shape == value.shape, f"{what}, param {index} {key}"
                torch.testing.assert_close(mine[key], value, atol=1e-6, rtol=1e-5, check_dtype=False,
                                           msg=lambda m: f"{what}, param {index} {key}: {m}")
            else:
                assert math.isclose(float(mine[key]), float(value), rel_tol=1e-6), f"{what}, param {index} {key}"


def memory_of_adam(shard_grads: bool) -> dict[str, Any]:
    """Per-rank bytes of fp32 Adam over a ragged parameter list after a step: the report and what the
    tensors themselves hold, against the unsharded totals."""
    torch.manual_seed(0)
    shapes = [(257, 33), (33,), (1000,), (17, 3, 5), (1,), (64, 64), (4099,)]
    params = [nn.Parameter(torch.randn(shape)) for shape in shapes]
    opt = shardoptim.Adam(params, lr=1e-3, process_group=dist.group.WORLD,
                          sharding=shardoptim.ShardingConfig(shard_grads=shard_grads, bucket_cap_numel=4000))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    report = opt.memory_report()
    mine = report.ranks[dist.get_rank()]
    state = sum(t.untyped_storage().nbytes() for b in opt.buckets for t in b.state.tensors.values())
    state += sum(b.state.steps.nbytes for b in opt.buckets)
    grads = sum(b.flat_grad.untyped_storage().nbytes() for b in opt.buckets if b.flat_grad is not None)
    if shard_grads:
        grads += sum(b.shard_grad.untyped_storage().nbytes() for b in opt.buckets)
    return {
        "report": [(r.params, r.grads, r.state, r.padding) for r in report.ranks], "mine": (mine.grads, mine.state),
        "measured": (grads, state), "elements": sum(p.numel() for p in params), "slots": len(params),
        "buckets": len(opt.buckets), "largest": report.largest_state_share,
        "grads_after_step": [p.grad is None for p in params],
    }


def mismatched_params(kind: str) -> None:
    """A rank given other parameters makes every rank raise ValueError at once, naming the ranks."""
    rank = dist.get_rank()
    params = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5))]
    last = dist.get_world_size() - 1
    if rank == last:
        if kind == "count":
            params.append(nn.Parameter(torch.randn(2)))
        elif kind == "shape":
            params[1] = nn.Parameter(torch.randn(5, 1))
        elif kind == "order":
            params.reverse()
    if kind == "add_param_group":
        opt = shardoptim.Adam(params, process_group=dist.group.WORLD)
        extra = [nn.Parameter(torch.randn(3 if rank == last else 2))]
        with _raises(ValueError, f"ranks \\[{last}\\] differ"):
            opt.add_param_group({"params": extra})
        assert len(opt.param_groups) == 1
        return
    with _raises(ValueError, f"ranks \\[{last}\\] differ"):
        shardoptim.Adam(params, process_group=dist.group.WORLD)


@contextlib.contextmanager
def _raises(kind: type[Exception], pattern: str) -> Iterator[None]:
    try:
        yield
    except kind as error:
        assert re.search(pattern, str(error)), f"{error!s} does not match {pattern!r}"
    else:
        raise AssertionError(f"{kind.__name__} not raised")


def add_param_group_later(name: str) -> None:
    """A group added after some steps (on every rank) trains like torch's add_param_group."""
    world = dist.get_world_size()
    model, reference = models()
    lr = KWARGS.get(name, {}).get("lr")
    first = [model.inp.weight, model.inp.bias, model.skip.weight, model.scale, model.rare]
    ref_first = [reference.inp.weight, reference.inp.bias, reference.skip.weight, reference.scale, reference.rare]
    opt = build(name, first, sharded=True)
    ref_opt = build(name, ref_first, sharded=False)
    for step in range(STEPS):
        if step == 2:
            opt.add_param_group({"params": [model.out.weight, model.out.bias], "lr": 0.02})
            ref_opt.add_param_group({"params": [reference.out.weight, reference.out.bias], "lr": 0.02})
        own_backward(model, step)
        oracle_backward(reference, step, world)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        if step < 2:  # not in an optimizer yet: drop what zero_grad() did not
            model.out.weight.grad = model.out.bias.grad = None
            reference.out.weight.grad = reference.out.bias.grad = None
        assert_close(model.parameters(), reference.parameters(), f"{name} step {step}")


def lbfgs_parity(line_search_fn: str | None) -> None:
    """Replicated LBFGS: averaged gradients and losses, so every rank steps as torch does on the whole batch."""
    world = dist.get_world_size()
    model, reference = models()
    kwargs = {"lr": 0.5, "max_iter": 5, "history_size": 3, "line_search_fn": line_search_fn}
    opt = shardoptim.LBFGS(model.parameters(), **kwargs, process_group=dist.group.WORLD)
    ref_opt = torch.optim.LBFGS(reference.parameters(), **kwargs)
    for step in range(3):
        def closure() -> torch.Tensor:
            opt.zero_grad()
            return own_backward(model, step, static=True)

        def oracle_closure() -> torch.Tensor:
            ref_opt.zero_grad()
            x, y = batch(step)
            losses = []
            for rank in range(world):
                loss = loss_of(reference, rank_slice(x, rank, world), rank_slice(y, rank, world), usage(step, rank, static=True))
                (loss / world).backward()
                losses.append(loss.detach())
            return torch.stack(losses).mean()

        opt.step(closure)
        ref_opt.step(oracle_closure)
        assert_close(model.parameters(), reference.parameters(), f"LBFGS {line_search_fn} step {step}",
                     atol=1e-5, rtol=1e-4)


def sparse_adam_parity() -> None:
    """Replicated SparseAdam: sparse gradients averaged over ranks (union of rows), torch's update."""
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    model = nn.Embedding(12, 3, sparse=True)
    reference = copy.deepcopy(model)
    opt = shardoptim.SparseAdam(model.parameters(), lr=0.05, process_group=dist.group.WORLD)
    ref_opt = torch.optim.SparseAdam(reference.parameters(), lr=0.05)

    def rows(step: int, r: int) -> torch.Tensor:
        return torch.tensor([(step + r) % 12, (3 * step + 2 * r) % 12, 5])  # overlapping and disjoint rows

    for step in range(STEPS):
        if step != 2 or rank == 0:  # at step 2 only rank 0 has a gradient
            (model(rows(step, rank)) ** 2).sum().backward()
        for r in range(world):
            if step != 2 or r == 0:
                (reference(rows(step, r)) ** 2).sum().backward()
        reference.weight.grad.div_(world)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        assert_close(model.parameters(), reference.parameters(), f"SparseAdam step {step}")


def sparse_sum_as_dense_matches_sparse_all_reduce() -> None:
    """The path for backends that cannot all-reduce sparse tensors (NCCL), run on gloo against gloo's own."""
    rank = dist.get_rank()
    rows = torch.tensor([[rank, 5, 5, 7 + rank]])
    values = torch.arange(8.0).reshape(4, 2) + rank
    native = torch.sparse_coo_tensor(rows, values, (12, 2))
    dense_path = native.clone()
    comm = ProcessGroupComm(dist.group.WORLD, shardoptim.ShardingConfig())
    comm._reduce_sparse_as_dense(dense_path).wait()
    dist.all_reduce(native)
    torch.testing.assert_close(dense_path.to_dense(), native.to_dense())
    assert sorted(dense_path.coalesce().indices()[0].tolist()) == sorted(set(native.coalesce().indices()[0].tolist()))


def gather_params_refreshes_every_rank() -> None:
    """``opt.gather_params()`` after shards were changed outside ``step()`` (as an EMA swap does)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model, _ = models()
    opt = shardoptim.Adam(model.parameters(), process_group=dist.group.WORLD)
    for bucket in opt.buckets:
        bucket.shard_param.fill_(rank + 1)
    opt.gather_params()
    for bucket in opt.buckets:
        expected = torch.arange(1, world + 1, dtype=bucket.flat_param.dtype).repeat_interleave(bucket.layout.shard_numel(0))
        assert torch.equal(bucket.flat_param, expected), "flat parameters not gathered from every shard"


def accumulation_parity(name: str, ddp: bool, sharding: dict[str, Any] | None = None, micro_batches: int = 4) -> None:
    """Gradients accumulated over micro-batches, averaged once: inside ``opt.no_sync()`` (ours average)
    or DDP's ``model.no_sync()`` with ``reduce_grads=False``; parameters skip gradients in some
    micro-batches and steps. Matches torch on the whole batch."""
    world, rank = dist.get_world_size(), dist.get_rank()
    model, reference = models()
    lr = KWARGS.get(name, {}).get("lr")
    trained: nn.Module = DistributedDataParallel(model, find_unused_parameters=True) if ddp else model
    opt = build(name, model.groups(lr), sharded=True, sharding=sharding, reduce_grads=not ddp)
    ref_opt = build(name, reference.groups(lr), sharded=False)
    for step in range(STEPS):
        for micro in range(micro_batches):
            x, y = batch(100 * step + micro)
            last = micro == micro_batches - 1
            quiet = contextlib.nullcontext() if last else (trained.no_sync() if ddp else opt.no_sync())
            with quiet:
                loss_of(trained, rank_slice(x, rank, world), rank_slice(y, rank, world), usage(step + micro, rank)).backward()
            for r in range(world):
                loss_of(reference, rank_slice(x, r, world), rank_slice(y, r, world), usage(step + micro, r)).backward()
        for param in reference.parameters():
            if param.grad is not None:
                param.grad.div_(world)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        assert_close(model.parameters(), reference.parameters(), f"{name} accumulated, step {step}")


def shard_state_round_trip(name: str, sharding: dict[str, Any] | None = None) -> None:
    """``shard_state_dict()`` -> a fresh optimizer's ``load_shard_state_dict()``: training goes on bit for bit."""
    model, _ = models()
    lr = KWARGS.get(name, {}).get("lr")
    opt = build(name, model.groups(lr), sharded=True, sharding=sharding)
    for step in range(3):
        own_backward(model, step)
        opt.step()
        opt.zero_grad()
    saved = opt.shard_state_dict()
    assert all(t.data_ptr() == live.data_ptr() for b, saved_b in zip(opt.buckets, saved["buckets"])
               for t, live in zip(saved_b["state"].values(), b.state.tensors.values())), "views, not copies"
    saved = copy.deepcopy(saved)
    resumed_model = copy.deepcopy(model)
    resumed = build(name, resumed_model.groups(lr), sharded=True, sharding=sharding)
    resumed.load_shard_state_dict(saved)
    for step in range(3, 6):
        for m, o in ((model, opt), (resumed_model, resumed)):
            own_backward(m, step)
            o.step()
            o.zero_grad()
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b), f"{name}: resumed parameters differ"
    for a, b in zip(opt.buckets, resumed.buckets, strict=True):
        assert a.state.tensors.keys() == b.state.tensors.keys()
        assert all(torch.equal(a.state.tensors[k], b.state.tensors[k]) for k in a.state.tensors)
        assert torch.equal(a.state.steps, b.state.steps)


def late_gradient_under_overlap_raises() -> None:
    """With overlap, a second backward outside no_sync() into buckets already launched raises on every
    rank (nothing is written into a buffer being averaged); no_sync() accumulation is fine."""
    model, _ = models()
    opt = shardoptim.SGD(model.parameters(), lr=0.1, process_group=dist.group.WORLD,
                         sharding=shardoptim.ShardingConfig(overlap_grad_reduce=True, bucket_cap_numel=32))
    own_backward(model, 0, static=True)
    with _raises(RuntimeError, "no_sync"):
        own_backward(model, 1, static=True)
    opt.zero_grad()
    with opt.no_sync():
        own_backward(model, 2, static=True)
    own_backward(model, 3, static=True)
    opt.step()


def overlap_launches_during_backward() -> dict[str, int]:
    """How many buckets backward itself launched (all of them, when every parameter gets a gradient:
    ``rare`` gets none in a static step, so it stays out)."""
    model, _ = models()
    params = [p for name, p in model.named_parameters() if name != "rare"]
    opt = shardoptim.Adam(params, process_group=dist.group.WORLD,
                          sharding=shardoptim.ShardingConfig(overlap_grad_reduce=True, bucket_cap_numel=32))
    own_backward(model, 0, static=True)
    launched = len(opt._sync._finished)
    opt.step()
    return {"launched_in_backward": launched, "buckets": len(opt.buckets)}


def grad_scaler_with_an_inf_on_one_rank(scaler_kind: str, differentiable_inp: bool = False) -> dict[str, Any]:
    """AMP on a sharded optimizer, an inf injected into rank 1's gradient at step 1: every rank must
    skip that step together; with shardoptim's scaler every rank also lowers its scale alike.
    ``differentiable_inp``: the layer that gets the inf in a ``differentiable=True`` group of its own
    (updated per parameter, outside the buckets)."""
    import warnings

    rank, world = dist.get_rank(), dist.get_world_size()
    model, _ = models()
    params: Any = model.parameters()
    if differentiable_inp:
        inp = list(model.inp.parameters())
        params = [{"params": inp, "differentiable": True},
                  {"params": [p for p in model.parameters() if all(p is not q for q in inp)]}]
    opt = shardoptim.SGD(params, lr=0.1, momentum=0.9, process_group=dist.group.WORLD)
    scaler_class = shardoptim.amp.GradScaler if scaler_kind == "shardoptim" else torch.amp.GradScaler
    scaler = scaler_class("cpu", init_scale=2.0**10, growth_interval=1)
    scales, skipped = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            x, y = batch(step)
            loss = loss_of(model, rank_slice(x, rank, world), rank_slice(y, rank, world), usage(step, rank, static=True))
            scaler.scale(loss).backward()
            if step == 1 and rank == 1:
                model.inp.weight.grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
            before += [t.clone() for b in opt.buckets for t in b.state.tensors.values()]
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            scales.append(scaler.get_scale())
            after = [*model.parameters(), *(t for b in opt.buckets for t in b.state.tensors.values())]
            skipped.append(len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after)))
    warned = any("shardoptim.amp.GradScaler" in str(w.message) for w in caught)
    return {"scales": scales, "skipped": skipped, "warned": warned,
            "params": [p.detach().clone() for p in model.parameters()]}


def a_peer_that_never_comes(timeout_s: float) -> str:
    """Rank 1 never takes its step: rank 0's step fails within the timeout, naming the collective."""
    import time

    model, _ = models()
    opt = shardoptim.SGD(model.parameters(), lr=0.1, process_group=dist.group.WORLD,
                         sharding=shardoptim.ShardingConfig(collective_timeout_s=timeout_s))
    own_backward(model, 0, static=True)
    if dist.get_rank() == 1:
        time.sleep(timeout_s + 3)
        return "absent"
    started = time.monotonic()
    try:
        opt.step()
    except RuntimeError as error:
        return f"{time.monotonic() - started:.1f}|{type(error).__name__}|{error}"
    return "no error"
