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

The pieces (``Config``, ``build_model``, ``build_optimizer``, ``train``) are separate functions so
checkpointing and resuming can be added around ``train``'s loop.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import shardoptim
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
    """Any of shardoptim's algorithms but LBFGS (it needs a closure) and SparseAdam (sparse gradients)."""
    lr: float = 1e-2
    """Learning rate."""
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
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.ln_2(x))


class CharTransformer(nn.Module):
    """A GPT-style decoder over characters, head tied to the embedding."""

    def __init__(self, vocab: int, config: Config) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, config.d_model)
        self.position = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config.d_model, config.heads) for _ in range(config.layers))
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
    cls = getattr(shardoptim, config.optimizer)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    kwargs = {"lr": config.lr}
    groups: list[dict] = [{"params": matrices}, {"params": vectors}]
    if "weight_decay" in cls.__init__.__code__.co_varnames:
        groups[0]["weight_decay"], groups[1]["weight_decay"] = config.weight_decay, 0.0
    sharding = shardoptim.ShardingConfig(shard_grads=config.shard_grads == "on", overlap_grad_reduce=config.overlap == "on")
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


# -- the loop ---------------------------------------------------------------------------------------


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
        dist.init_process_group(backend)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    log = print if rank == 0 else (lambda *args, **kwargs: None)

    try:
        text = Path(config.text).read_text() if config.text else generated_text(config.sentences, config.seed)
        data = CharData(text)
        model = build_model(len(data.alphabet), config, device)
        use_ddp = config.ddp == "on" and distributed
        trained: nn.Module = DistributedDataParallel(model) if use_ddp else model
        process_group = dist.group.WORLD if distributed and config.sharded == "on" else None
        if distributed and process_group is None and not use_ddp:
            raise SystemExit("--sharded off needs --ddp on: something must average the gradients")
        opt = build_optimizer(model, config, process_group, reduce_grads=not use_ddp)
        scheduler = build_scheduler(opt, config)
        params = sum(p.numel() for p in model.parameters())
        log(f"{world} rank(s), {backend} on {device.type}, {config.optimizer} "
            f"(sharded: {process_group is not None}, ddp: {use_ddp}), {params} parameters, "
            f"{len(data.ids)} characters, alphabet of {len(data.alphabet)}", flush=True)

        gen = torch.Generator().manual_seed(config.seed * 1000 + rank + 1)
        losses: list[float] = []
        window = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, steps
        started = last = time.perf_counter()
        log(f"optimizer memory per rank (bytes):\n{opt.memory_report()}", flush=True)
        for step in range(config.steps):
            for micro in range(config.grad_accum):
                inputs, targets = data.batch(config.batch_size, config.seq_len, gen, device)
                quiet = micro < config.grad_accum - 1
                with (trained.no_sync() if use_ddp else opt.no_sync()) if quiet else contextlib.nullcontext():
                    logits = trained(inputs)
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
                    (loss / config.grad_accum).backward()
            if config.clip > 0:
                opt.clip_grad_norm_(config.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            window += torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=device)])
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                if distributed:
                    dist.all_reduce(window)
                mean = (window[0] / window[1]).item()
                losses.append(mean)
                now = time.perf_counter()
                per_step = (now - last) / config.log_every * 1e3
                tokens = world * config.batch_size * config.seq_len * config.log_every / (now - last)
                log(f"step {step + 1:5d}/{config.steps}  loss {mean:.4f}  lr {lr:.2e}  "
                    f"{per_step:6.1f} ms/step  {tokens:8.0f} tokens/s", flush=True)
                window.zero_()
                last = now
        log(f"done in {time.perf_counter() - started:.1f} s; loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
        if config.sample and rank == 0:
            log(f"sample: {sample(model, data, config, device)!r}", flush=True)
        if distributed:
            dist.barrier()  # tear the group down together: a rank leaving early can abort a peer's exit
        return losses
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
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default,
                            choices=choices, help=docs.get(field.name, ""))
    return Config(**vars(parser.parse_args(argv)))


def _trainable_algorithms() -> list[str]:
    """shardoptim's optimizers this loop can drive (LBFGS needs a closure, SparseAdam sparse gradients)."""
    return [
        name for name in shardoptim.__all__
        if isinstance(getattr(shardoptim, name), type) and issubclass(getattr(shardoptim, name), shardoptim.Optimizer)
        and name not in ("Optimizer", "LBFGS", "SparseAdam")
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
