"""Train a small character-level transformer language model with a sharded shardoptim optimizer.

One process per rank, started by torchrun (plain ``python launch/train.py`` runs a single process
without a process group)::

    torchrun --nproc-per-node 2 launch/train.py                      # 2 ranks, gloo on CPU
    torchrun --nproc-per-node 2 launch/train.py --optimizer Adam --lr 1e-3 --steps 500
    torchrun --nproc-per-node 4 launch/train.py --ddp on            # DDP averages, reduce_grads=False
    python launch/train.py --help                                    # every option

Two nodes (here both on one machine, c10d rendezvous on 127.0.0.1; run each line in its own shell)::

    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 1 --rdzv-backend c10d \\
        --rdzv-endpoint 127.0.0.1:29400 --rdzv-id demo launch/train.py
    torchrun --nnodes 2 --node-rank 1 --nproc-per-node 1 --rdzv-backend c10d \\
        --rdzv-endpoint 127.0.0.1:29400 --rdzv-id demo launch/train.py

The text is generated here, deterministically, from a small grammar (``--text FILE`` trains on a file
instead). Every rank draws its own random windows of it; the optimizer averages the gradients, keeps
state for its shard of the parameters and gathers the updated parameters (``docs/distributed.md``).
Rank 0 prints the loss averaged over ranks and the last ``--log-every`` steps.

Checkpoints and resuming (``--ckpt-dir``): every ``--save-every`` steps the model, the optimizer (each
rank its own shard), the schedule, the EMA, every rank's generators and the loop's position are saved
with ``shardoptim.checkpoint``; started again with the same ``--ckpt-dir``, the script resumes from the
newest complete checkpoint there and continues exactly as if it had never stopped (each batch is drawn
from a generator seeded by (seed, rank, step), so the data order needs no saved position). Under
``torchrun --max-restarts 1``, a rank that dies is restarted with its peers and the job resumes::

    torchrun --standalone --nproc-per-node 2 --max-restarts 1 launch/train.py --ckpt-dir runs/demo --kill-at-step 170

(``--kill-at-step`` simulates the preemption: rank 1 SIGKILLs itself in that step, first attempt only.)
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import shardoptim
import shardoptim.checkpoint
import shardoptim.ema
import shardoptim.sched


@dataclass(frozen=True)
class Config:
    """Everything a run depends on; each field is a command-line option of the same name."""

    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 16
    """Sequences per rank and step."""
    seq_len: int = 64
    """Characters per sequence."""
    d_model: int = 64
    """Width of the transformer."""
    layers: int = 2
    """Transformer blocks."""
    heads: int = 4
    """Attention heads per block."""
    optimizer: str = "AdamW"
    """Any of shardoptim's algorithms but LBFGS (it needs a closure), SparseAdam (sparse gradients) and
    Muon alone (2-D weights only); MuonAdamW: Muon for the hidden matrices, AdamW for the rest."""
    lr: float = 1e-2
    """Learning rate (MuonAdamW: of its AdamW groups)."""
    muon_lr: float = 0.02
    """MuonAdamW: the learning rate of its Muon groups."""
    weight_decay: float = 0.01
    """Weight decay, for optimizers that take it."""
    clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    warmup: int = 20
    """Steps of linear learning-rate warm-up, then cosine decay to a tenth of --lr."""
    backend: str = "auto"
    """auto (nccl with CUDA, else gloo), gloo or nccl."""
    ddp: str = "off"
    """on: wrap the model in DistributedDataParallel, which averages the gradients (reduce_grads=False)."""
    sharded: str = "on"
    """off: no process group for the optimizer (every rank keeps all state; DDP must average)."""
    threads: int = 1
    """torch threads per rank."""
    shard_grads: str = "off"
    """on: ZeRO-2, each rank keeps only its shard of the averaged gradients (ShardingConfig.shard_grads)."""
    overlap: str = "off"
    """on: average each bucket's gradients during backward (ShardingConfig.overlap_grad_reduce)."""
    grad_accum: int = 1
    """Micro-batches per step, all but the last inside optimizer.no_sync() (or DDP's no_sync())."""
    seed: int = 0
    """Seed of the model, the generated text and the batches."""
    log_every: int = 25
    """Print the loss every this many steps (rank 0)."""
    text: str = ""
    """Train on this text file instead of the generated text."""
    sentences: int = 4000
    """Sentences of generated text."""
    sample: int = 120
    """Characters to generate from the trained model at the end (0: none)."""
    dropout: float = 0.0
    """Dropout in the blocks; its masks come from each rank's own torch generator (checkpoints save it)."""
    ema: float = 0.0
    """Keep a shardoptim.ema.ShardedEMA of the weights with this decay and sample with it (0: none)."""
    ckpt_dir: str = ""
    """Checkpoint under this directory or fsspec URL (s3://...); on start, resume from the newest one there."""
    save_every: int = 50
    """Save a checkpoint every this many steps and after the last one (with --ckpt-dir)."""
    keep: int = 2
    """Keep the newest this many checkpoints (0: all)."""
    async_save: bool = False
    """Write checkpoints in the background while training goes on (waited for before exiting)."""
    kill_at_step: int = 0
    """Simulated preemption: rank 1 (rank 0 alone) SIGKILLs itself in this step, in torchrun's first attempt only."""
    stop_at_step: int = 0
    """End this run after this step with a checkpoint, on --steps' schedule: a later run resumes it."""
    final_state: str = ""
    """Write the final model, optimizer and EMA state to this safetensors file (rank 0), to compare runs."""


#: Options that steer one run and may differ between a run and the one resuming it.
RUN_CONTROL = frozenset({"ckpt_dir", "save_every", "keep", "async_save", "kill_at_step", "stop_at_step", "final_state",
                         "log_every", "sample"})


# -- data -------------------------------------------------------------------------------------------

_SUBJECTS = ("the cat", "a dog", "my sister", "the old sailor", "a small bird", "the teacher", "our neighbour",
             "the baker", "a child", "the captain")
_VERBS = ("sees", "likes", "follows", "finds", "paints", "remembers", "calls", "watches", "helps", "greets")
_OBJECTS = ("the red ball", "a quiet river", "the green door", "an apple", "the tall tree", "a letter",
            "the blue boat", "a warm loaf", "the morning train", "a paper kite")
_PLACES = ("in the garden", "near the harbour", "at the market", "under the bridge", "on the hill",
           "by the window")
_TIMES = ("today", "every morning", "at night", "after lunch", "in winter", "on sunday")


def generated_text(sentences: int, seed: int) -> str:
    """Sentences from a small grammar: structure and agreement a small model learns in minutes."""
    rng = random.Random(seed)
    out = []
    for _ in range(sentences):
        subject, verb, obj = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)
        place, when = rng.choice(_PLACES), rng.choice(_TIMES)
        form = rng.randrange(4)
        if form == 0:
            out.append(f"{subject} {verb} {obj} {place}.")
        elif form == 1:
            out.append(f"{when}, {subject} {verb} {obj}.")
        elif form == 2:
            out.append(f"does {subject} {verb[:-1]} {obj}? yes, {place}.")
        else:
            out.append(f"{subject} {verb} {obj} and {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} it {when}.")
    return " ".join(out) + "\n"


def stream_seed(*parts: object) -> int:
    """A seed of its own for each tuple of ``parts`` (seed, rank, step, ...): streams that need no state."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


class CharData:
    """A text as character ids; ``batch`` draws random windows of it (inputs and next characters)."""

    def __init__(self, text: str) -> None:
        self.alphabet = sorted(set(text))
        index = {ch: i for i, ch in enumerate(self.alphabet)}
        self.ids = torch.tensor([index[ch] for ch in text], dtype=torch.long)

    def batch(self, size: int, seq_len: int, gen: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
        starts = torch.randint(0, self.ids.numel() - seq_len - 1, (size,), generator=gen)
        windows = torch.stack([self.ids[s : s + seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1].to(device), windows[:, 1:].to(device)

    def decode(self, ids: list[int]) -> str:
        return "".join(self.alphabet[i] for i in ids)


# -- model ------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop(self.proj(attended.transpose(1, 2).reshape(batch, length, width)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class CharTransformer(nn.Module):
    """A GPT-style decoder over characters, head tied to the embedding."""

    def __init__(self, vocab: int, config: Config) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, config.d_model)
        self.position = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config.d_model, config.heads, config.dropout) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        for module in self.modules():  # GPT-2's initialisation: small weights keep the first logits near 0
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.embed(ids) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.embed.weight.t()


def build_model(vocab: int, config: Config, device: torch.device) -> CharTransformer:
    """The same initial weights on every rank: seeded before construction."""
    torch.manual_seed(config.seed)
    return CharTransformer(vocab, config).to(device)


def build_optimizer(model: nn.Module, config: Config, process_group: dist.ProcessGroup | None,
                    *, reduce_grads: bool) -> shardoptim.Optimizer:
    """``config.optimizer`` over two groups: weight decay for matrices, none for vectors; the
    sharding options of ``config``."""
    sharding = shardoptim.ShardingConfig(shard_grads=config.shard_grads == "on", overlap_grad_reduce=config.overlap == "on")
    if config.optimizer == "MuonAdamW":  # Muon for the hidden matrices, AdamW (at --lr) for the rest
        groups = shardoptim.muon_param_groups(
            model, muon={"lr": config.muon_lr}, adamw={"lr": config.lr, "weight_decay": config.weight_decay}
        )
        return shardoptim.MuonAdamW(groups, process_group=process_group, reduce_grads=reduce_grads, sharding=sharding)
    cls = getattr(shardoptim, config.optimizer)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    kwargs = {"lr": config.lr}
    groups: list[dict] = [{"params": matrices}, {"params": vectors}]
    if "weight_decay" in cls.__init__.__code__.co_varnames:
        groups[0]["weight_decay"], groups[1]["weight_decay"] = config.weight_decay, 0.0
    return cls(groups, **kwargs, process_group=process_group, reduce_grads=reduce_grads, sharding=sharding)


def build_scheduler(opt: shardoptim.Optimizer, config: Config) -> shardoptim.sched.LRScheduler:
    """Linear warm-up over ``config.warmup`` steps, then cosine decay to a tenth of ``config.lr``."""
    warmup = max(1, config.warmup)
    return shardoptim.sched.SequentialLR(
        opt,
        [
            shardoptim.sched.LinearLR(opt, start_factor=1 / warmup, total_iters=warmup),
            shardoptim.sched.CosineAnnealingLR(opt, T_max=max(1, config.steps - warmup), eta_min=config.lr / 10),
        ],
        milestones=[warmup],
    )


@torch.no_grad()
def sample(model: nn.Module, data: CharData, config: Config, device: torch.device, prompt: str = "the ") -> str:
    model.eval()
    ids = [data.alphabet.index(ch) for ch in prompt if ch in data.alphabet]
    gen = torch.Generator().manual_seed(config.seed)
    for _ in range(config.sample):
        context = torch.tensor([ids[-config.seq_len :]], device=device)
        probs = torch.softmax(model(context)[0, -1].float().cpu(), dim=0)
        ids.append(int(torch.multinomial(probs, 1, generator=gen)))
    model.train()
    return data.decode(ids)


# -- checkpoints ------------------------------------------------------------------------------------


@dataclass
class Progress:
    """The loop's position, saved in a checkpoint's ``extra``: steps done, the logged losses, and each
    rank's loss sum and count since the last log line (so a resumed run logs the same numbers)."""

    step: int
    losses: list[float]
    window: Tensor


def save_checkpoint(manager: shardoptim.checkpoint.CheckpointManager, components: dict, progress: Progress,
                    config: Config, world: int, log) -> None:
    """Every rank: its shards, its generators, and ``progress`` (every rank's loss window) as ``extra``."""
    windows = [progress.window.clone() for _ in range(world)]
    if world > 1:
        dist.all_gather(windows, progress.window)
    extra = {"step": progress.step, "losses": progress.losses, "loss_windows": [w.tolist() for w in windows],
             "config": dataclasses.asdict(config)}
    started = time.perf_counter()
    url = manager.save(progress.step, **components, extra=extra)
    took = (time.perf_counter() - started) * 1e3
    how = "saving in the background to" if config.async_save else "saved to"
    log(f"step {progress.step:5d}  checkpoint {how} {url} ({took:.0f} ms)", flush=True)


def resume(url: str, extra: dict, config: Config, rank: int, world: int, device: torch.device, log) -> Progress:
    """The loop's position saved with the checkpoint at ``url`` (``extra``), for this rank."""
    windows = extra["loss_windows"]
    if len(windows) == world:
        window = torch.tensor(windows[rank], dtype=torch.float64, device=device)
    else:  # another world size: rank 0 carries the whole interval's sums
        window = torch.tensor([sum(w[0] for w in windows), sum(w[1] for w in windows)] if rank == 0 else [0.0, 0.0],
                              dtype=torch.float64, device=device)
    log(f"resumed from {url}: step {extra['step']} of {config.steps}, saved by {len(windows)} rank(s)", flush=True)
    changed = [f"--{name.replace('_', '-')} {getattr(config, name)} (saved: {value})"
               for name, value in extra["config"].items()
               if name not in RUN_CONTROL and hasattr(config, name) and getattr(config, name) != value]
    if changed:
        log(f"note: resuming with other options than the saved run's: {', '.join(changed)}; the schedule, "
            f"optimizer state and weights are the saved ones", flush=True)
    return Progress(extra["step"], list(extra["losses"]), window)


def write_final_state(path: str, model: nn.Module, opt: shardoptim.Optimizer, scheduler: shardoptim.sched.LRScheduler,
                      ema: shardoptim.ema.ShardedEMA | None, rank: int) -> None:
    """The model's, the optimizer's (gathered: collective) and the EMA's tensors in one safetensors file,
    written by rank 0, with the learning rate and the parameter groups in its metadata: two runs ended in
    the same state exactly when their files hold the same tensors."""
    def host_copies(prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}.{key}": value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}

    optimizer_state = opt.state_dict()
    tensors = host_copies("model")
    for index, state in optimizer_state["state"].items():
        for name, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().to("cpu", copy=True)
    metadata = {"lr": json.dumps(scheduler.get_last_lr()),
                "param_groups": json.dumps(optimizer_state["param_groups"], default=repr)}
    if ema is not None:
        with ema.averaged():
            tensors.update(host_copies("ema"))
        metadata["ema_updates"] = str(ema.num_updates)
    if rank == 0:
        save_file(tensors, path, metadata)


# -- the loop ---------------------------------------------------------------------------------------


def init_distributed(backend: str) -> None:
    """``dist.init_process_group(backend)`` from torchrun's environment, in a namespace of the store
    of its own for each start of the ranks.

    torchrun keeps one store for the whole job, across restarts (``--max-restarts``), and a process
    group created in it leaves its keys there: a restarted rank can read the address its dead peer
    published in the attempt before and fail to connect (torch 2.13, about one restart in two here;
    pytorch/pytorch#135712). So each rank counts its starts in the store; the ranks of one attempt
    count the same (torchrun restarts them all together, even where nodes' restart counts differ), and
    the count prefixes the process group's keys.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        dist.init_process_group(backend)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=dist.constants.default_pg_timeout)
    start = store.add(f"launch/train.py/starts/rank{rank}", 1)
    dist.init_process_group(backend, store=dist.PrefixStore(f"launch/train.py/start{start}", store), rank=rank,
                            world_size=world)


def train(config: Config) -> list[float]:
    """Run ``config``; returns the logged losses (averaged over ranks and each log interval)."""
    distributed = "RANK" in os.environ
    torch.set_num_threads(config.threads)
    backend = config.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if distributed:
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        init_distributed(backend)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    log = print if rank == 0 else (lambda *args, **kwargs: None)

    try:
        text = Path(config.text).read_text() if config.text else generated_text(config.sentences, config.seed)
        data = CharData(text)
        model = build_model(len(data.alphabet), config, device)
        torch.manual_seed(stream_seed(config.seed, rank, "dropout"))  # each rank its own dropout masks
        use_ddp = config.ddp == "on" and distributed
        trained: nn.Module = DistributedDataParallel(model) if use_ddp else model
        process_group = dist.group.WORLD if distributed and config.sharded == "on" else None
        if distributed and process_group is None and not use_ddp:
            raise SystemExit("--sharded off needs --ddp on: something must average the gradients")
        opt = build_optimizer(model, config, process_group, reduce_grads=not use_ddp)
        scheduler = build_scheduler(opt, config)
        ema = shardoptim.ema.ShardedEMA(opt, decay=config.ema) if config.ema else None
        params = sum(p.numel() for p in model.parameters())
        log(f"{world} rank(s), {backend} on {device.type}, {config.optimizer} "
            f"(sharded: {process_group is not None}, ddp: {use_ddp}), {params} parameters, "
            f"{len(data.ids)} characters, alphabet of {len(data.alphabet)}", flush=True)
        log(f"optimizer memory per rank (bytes):\n{opt.memory_report()}", flush=True)

        components = {"model": model, "optimizer": opt, "schedulers": [scheduler], "ema": ema}
        progress = Progress(0, [], torch.zeros(2, dtype=torch.float64, device=device))  # loss sum, steps
        manager = None
        if config.ckpt_dir:
            manager = shardoptim.checkpoint.CheckpointManager(config.ckpt_dir, keep_last=config.keep or None,
                                                              async_=config.async_save)
            extra = manager.restore(**components)  # every rank loads the same one (they agree)
            if extra is None:
                log(f"no checkpoint under {config.ckpt_dir} yet: starting at step 0", flush=True)
            else:
                progress = resume(manager.restored, extra, config, rank, world, device, log)
        stop = min(config.steps, config.stop_at_step or config.steps)
        victim = rank == min(1, world - 1) and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"

        if progress.step >= stop:
            log(f"nothing to train: step {progress.step} reached", flush=True)
        first_step = progress.step
        started = last = time.perf_counter()
        timed = 0  # steps since `last`
        for step in range(progress.step, stop):
            for micro in range(config.grad_accum):
                batch_gen = torch.Generator().manual_seed(stream_seed(config.seed, rank, step, micro))
                inputs, targets = data.batch(config.batch_size, config.seq_len, batch_gen, device)
                quiet = micro < config.grad_accum - 1
                with (trained.no_sync() if use_ddp else opt.no_sync()) if quiet else contextlib.nullcontext():
                    logits = trained(inputs)
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
                    (loss / config.grad_accum).backward()
            if step + 1 == config.kill_at_step and victim:
                print(f"rank {rank}: simulated preemption in step {step + 1}: SIGKILL", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            if config.clip > 0:
                opt.clip_grad_norm_(config.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            progress.step, timed = step + 1, timed + 1
            progress.window += torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=device)])
            if progress.step % config.log_every == 0 or progress.step == config.steps:
                if distributed:
                    dist.all_reduce(progress.window)
                mean = (progress.window[0] / progress.window[1]).item()
                progress.losses.append(mean)
                now = time.perf_counter()
                per_step = (now - last) / timed * 1e3
                tokens = world * config.batch_size * config.seq_len * timed / (now - last)
                log(f"step {progress.step:5d}/{config.steps}  loss {mean:.4f}  lr {lr:.2e}  "
                    f"{per_step:6.1f} ms/step  {tokens:8.0f} tokens/s", flush=True)
                progress.window.zero_()
                last, timed = now, 0
            if manager is not None and ((config.save_every > 0 and progress.step % config.save_every == 0)
                                        or progress.step == stop):
                save_checkpoint(manager, components, progress, config, world, log)
        if manager is not None:
            manager.wait()  # the last save, if in the background, must commit before the job ends
        if progress.step < config.steps:
            log(f"stopped after step {progress.step} of {config.steps} (--stop-at-step): run again without it "
                f"to resume", flush=True)
        if progress.losses and progress.step > first_step:
            ran = f"steps {first_step + 1}-{progress.step}" if first_step else f"{progress.step} steps"
            log(f"done: {ran} in {time.perf_counter() - started:.1f} s; loss {progress.losses[0]:.3f} -> "
                f"{progress.losses[-1]:.3f}", flush=True)
        if config.sample:
            with ema.averaged() if ema is not None else contextlib.nullcontext():  # collective: every rank
                if rank == 0:
                    weights = " (EMA weights)" if ema is not None else ""
                    log(f"sample{weights}: {sample(model, data, config, device)!r}", flush=True)
        if config.final_state:
            write_final_state(config.final_state, model, opt, scheduler, ema, rank)
        if distributed:
            dist.barrier()  # tear the group down together: a rank leaving early can abort a peer's exit
        return progress.losses
    finally:
        if distributed:
            dist.destroy_process_group()


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    docs = _field_docs()
    for field in dataclasses.fields(Config):
        on_off = ["on", "off"]
        choices = {"backend": ["auto", "gloo", "nccl"], "ddp": on_off, "sharded": on_off, "shard_grads": on_off,
                   "overlap": on_off, "optimizer": _trainable_algorithms()}.get(field.name)
        flag = f"--{field.name.replace('_', '-')}"
        if isinstance(field.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default,
                                help=docs.get(field.name, ""))
            continue
        parser.add_argument(flag, type=type(field.default), default=field.default, choices=choices,
                            help=docs.get(field.name, ""))
    return Config(**vars(parser.parse_args(argv)))


def _trainable_algorithms() -> list[str]:
    """shardoptim's optimizers this loop can drive (LBFGS needs a closure, SparseAdam sparse gradients,
    Muon matrices only: MuonAdamW gives it the model's matrices)."""
    return [
        name for name in shardoptim.__all__
        if isinstance(getattr(shardoptim, name), type) and issubclass(getattr(shardoptim, name), shardoptim.Optimizer)
        and name not in ("Optimizer", "LBFGS", "SparseAdam", "Muon")
    ]


def _field_docs() -> dict[str, str]:
    """The string under each field of ``Config``, as its --help text."""
    tree = ast.parse(inspect.getsource(Config))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
            docs[node.target.id] = following.value.value
    return docs


if __name__ == "__main__":
    train(parse_args(sys.argv[1:]))
