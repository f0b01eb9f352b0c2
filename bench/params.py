"""Parameter lists and a small model shared by the benchmarks in ``bench/``.

Every benchmark that compares an optimizer-side cost (step, EMA, sharded step, checkpoint) runs on the
same parameter lists, so their figures can be read side by side:

- ``gpt``: the parameters of a GPT-2-style decoder (6 layers, width 384, vocabulary 8192, context
  512, tied head): 76 tensors, 13.9M elements, from 384-element LayerNorm vectors up to the 3.1M
  element token embedding. Per-tensor overhead matters little; memory bandwidth decides.
- ``small``: 400 small tensors (256 to 4096 elements, 0.68M in all): per-tensor and per-call overhead
  decides.

``make_params`` builds the tensors from a seed, ``make_grads`` gradients for them, and
``clone_with_grads`` gives each competitor its own copy of both, equal value for value.
``MODELS`` are the small models of the training-loop benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

Shape = tuple[int, ...]


def gpt_like_shapes(
    *, vocab: int = 8192, context: int = 512, width: int = 384, layers: int = 6
) -> list[Shape]:
    """Parameter shapes of a GPT-2-style decoder, in ``named_parameters()`` order (head tied to ``wte``)."""
    shapes: list[Shape] = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [
            (width,), (width,),  # ln_1
            (3 * width, width), (3 * width,),  # attention qkv
            (width, width), (width,),  # attention output projection
            (width,), (width,),  # ln_2
            (4 * width, width), (4 * width,),  # mlp up
            (width, 4 * width), (width,),  # mlp down
        ]
    shapes += [(width,), (width,)]  # ln_f
    return shapes


def small_shapes(count: int = 400) -> list[Shape]:
    """``count`` small tensors: bias-like vectors and small matrices in turn, 256 to 4096 elements."""
    cycle: tuple[Shape, ...] = ((256,), (64, 64), (512,), (32, 64), (1024,), (48, 48))
    return [cycle[i % len(cycle)] for i in range(count)]


#: Workload name -> its parameter shapes.
WORKLOADS: dict[str, Callable[[], list[Shape]]] = {"gpt": gpt_like_shapes, "small": small_shapes}


def numel(shapes: Sequence[Shape]) -> int:
    """Total number of elements of a shape list."""
    total = 0
    for shape in shapes:
        n = 1
        for size in shape:
            n *= size
        total += n
    return total


def make_params(
    shapes: Sequence[Shape], *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> list[nn.Parameter]:
    """Seeded parameters of the given shapes, scaled like a freshly initialised network (std 0.02)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        nn.Parameter((0.02 * torch.randn(shape, generator=gen, dtype=dtype)).to(device)) for shape in shapes
    ]


def make_grads(
    shapes: Sequence[Shape], *, seed: int = 1, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> list[Tensor]:
    """Seeded gradients of the given shapes (std 1e-3, no zeros, no denormals)."""
    gen = torch.Generator().manual_seed(seed)
    return [(1e-3 * torch.randn(shape, generator=gen, dtype=dtype)).to(device) for shape in shapes]


def clone_with_grads(params: Sequence[Tensor], grads: Sequence[Tensor]) -> list[nn.Parameter]:
    """A fresh copy of ``params``, each with a copy of its gradient in ``.grad``."""
    copies = []
    for param, grad in zip(params, grads):
        copy = nn.Parameter(param.detach().clone())
        copy.grad = grad.clone()
        copies.append(copy)
    return copies


class MLP(nn.Module):
    """LayerNorm, then ``layers`` Linear layers with GELU between; ``forward(inputs, targets)`` is the MSE loss.

    3.2M parameters in 10 tensors by default: few, large tensors.
    """

    def __init__(self, *, inputs: int = 512, hidden: int = 1024, outputs: int = 512, layers: int = 4) -> None:
        super().__init__()
        widths = [inputs] + [hidden] * (layers - 1) + [outputs]
        blocks: list[nn.Module] = [nn.LayerNorm(inputs)]
        for i, (fan_in, fan_out) in enumerate(zip(widths, widths[1:])):
            blocks.append(nn.Linear(fan_in, fan_out))
            if i < layers - 1:
                blocks.append(nn.GELU())
        self.net = nn.Sequential(*blocks)

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return nn.functional.mse_loss(self.net(inputs), targets)

    def example_batch(self, size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        inputs = torch.randn(size, self.net[0].normalized_shape[0], generator=gen)
        return inputs, torch.randn(size, self.net[-1].out_features, generator=gen)


class TinyGPT(nn.Module):
    """A small causal decoder (pre-LayerNorm ``nn.TransformerEncoderLayer`` blocks, tied head);
    ``forward(tokens, targets)`` is the next-token cross-entropy.

    3.7M parameters in 52 tensors by default: a GPT's mix of large matrices and many small vectors.
    """

    def __init__(self, *, vocab: int = 2048, context: int = 64, width: int = 256, heads: int = 4,
                 layers: int = 4) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.ln_f = nn.LayerNorm(width)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: Tensor, targets: Tensor) -> Tensor:
        length = tokens.shape[1]
        x = self.wte(tokens) + self.wpe.weight[:length]
        for block in self.blocks:
            x = block(x, src_mask=self.mask[:length, :length], is_causal=True)
        logits = self.ln_f(x) @ self.wte.weight.T
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def example_batch(self, size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        vocab, context = self.wte.num_embeddings, self.wpe.num_embeddings
        tokens = torch.randint(vocab, (size, context + 1), generator=gen)
        return tokens[:, :-1], tokens[:, 1:]


#: Training-loop model name -> a factory; every model's ``forward(*model.example_batch(...))`` is its loss.
MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": MLP, "tinygpt": TinyGPT}
