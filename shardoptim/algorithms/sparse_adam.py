"""SparseAdam: Adam on only the entries a sparse gradient holds (``nn.Embedding(sparse=True)`` rows).

Per parameter by nature: the work is a gather, a few small kernels and a scatter over the gradient's
rows, so flat buckets would bring nothing and their dense gradient buffer would cost a copy of every
parameter. The parameters therefore stay where they are (no buckets), and ``state`` is torch's own:
``step`` a Python int, ``exp_avg`` and ``exp_avg_sq`` dense tensors shaped like the parameter.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..core import BucketLayout, Check, Comm, HyperParams, Optimizer, ParamSpec, ShardingConfig
from ..core.hparams import betas, learning_rate
from .blocks import split_arguments


def state(h: HyperParams) -> dict[str, float]:
    return {"exp_avg": 0.0, "exp_avg_sq": 0.0}


def scalars(h: HyperParams, step: int) -> types.SimpleNamespace:
    # A tensor lr stays a tensor, as in torch, so the step size is rounded as torch rounds it.
    lr = h.lr.reshape(()) if isinstance(h.lr, Tensor) else h.lr
    beta1, beta2 = h.betas
    return types.SimpleNamespace(
        beta1=beta1, beta2=beta2, step_size=lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    )


class Rows:
    """The entries of dense tensors shaped like a parameter that a coalesced sparse gradient holds.

    A gradient sparse in its first dimension only (``nn.Embedding``'s) selects whole rows, read with
    ``index_select`` and written with ``index_add_``, the fastest gather and scatter here; any other
    goes through advanced indexing. Indices are unique, so adding an increment is exactly ``x + dx``.
    """

    def __init__(self, indices: Tensor) -> None:
        self._index = indices[0] if len(indices) == 1 else tuple(indices)

    def take(self, t: Tensor) -> Tensor:
        return t.index_select(0, self._index) if isinstance(self._index, Tensor) else t[self._index]

    def add_(self, t: Tensor, increment: Tensor) -> None:
        if isinstance(self._index, Tensor):
            t.index_add_(0, self._index, increment)
        else:
            t.index_put_(self._index, increment, accumulate=True)


def update(p: Tensor, g: Tensor, s: types.SimpleNamespace, h: HyperParams, c: types.SimpleNamespace) -> None:
    r"""One SparseAdam step of dense ``p`` and its state on the entries :math:`I` of sparse gradient ``g``.

    .. math::
        g &\leftarrow \pm g \text{ (duplicates summed)};\quad
        m_I \leftarrow m_I + (1-\beta_1)(g_I - m_I), \quad v_I \leftarrow v_I + (1-\beta_2)(g_I^2 - v_I) \\
        p_I &\leftarrow p_I - \eta \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t} \frac{m_I}{\sqrt{v_I} + \epsilon}

    Entries outside :math:`I` keep their values and moments. (:math:`-g` when maximizing.)
    """
    g = g.coalesce()  # the update is not linear in g: repeated indices must be summed first
    values = -g._values() if h.maximize else g._values()
    rows = Rows(g._indices())
    m, v = rows.take(s.exp_avg), rows.take(s.exp_avg_sq)
    dm = (values - m).mul_(1 - c.beta1)
    dv = values.square().sub_(v).mul_(1 - c.beta2)
    rows.add_(s.exp_avg, dm)
    rows.add_(s.exp_avg_sq, dv)
    m, v = dm.add_(m), dv.add_(v)  # the moments just stored, for the entries I
    rows.add_(p, m.div_(v.sqrt_().add_(h.eps)).mul_(-c.step_size))


CHECKS = (
    learning_rate()[0],  # a Tensor lr must have one element
    Check("lr", lambda v: 0.0 < v, "Invalid learning rate: {value}"),
    Check("eps", lambda v: 0.0 < v, "Invalid epsilon value: {value}"),
    *betas(),
)


class SparseAdam(Optimizer):
    """SparseAdam; the constructor, defaults, errors and state of ``torch.optim.SparseAdam``.

    For dense parameters whose gradients are sparse tensors (``nn.Embedding(sparse=True)``): only
    the rows a gradient touches move, and only their moments decay; the update is :func:`update`.
    A dense gradient raises ``RuntimeError`` (use :class:`~shardoptim.Adam`); sparse or complex
    parameters raise ``ValueError``.

    Parameters are not packed into flat buckets, so nothing is sharded: with a process group the
    optimizer is replicated, the sparse gradients averaged across ranks (the union of their rows) and
    the same update applied on every rank.
    """

    rule = None
    checks = CHECKS
    shardable = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        maximize: bool = False,
        *,
        process_group: Any = None,
        reduce_grads: bool = True,
        sharding: ShardingConfig | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        defaults, runtime = split_arguments(locals())
        super().__init__(params, defaults, **runtime)
        sparse = _positions(self.param_groups, lambda p: p.is_sparse)
        if sparse:
            raise ValueError(f"Sparse params at indices {sparse}: SparseAdam requires dense parameter tensors")
        complex_ = _positions(self.param_groups, torch.is_complex)
        if complex_:
            raise ValueError(f"Complex params at indices {complex_}: SparseAdam does not support complex parameters")

    def _plan_buckets(self, specs: Sequence[ParamSpec]) -> tuple[BucketLayout, ...]:
        return ()

    def _after_construction(self) -> None:
        super()._after_construction()
        self._grads_averaged = False  # by clip_grad_norm_, for the step to come

    def _prepare_unbucketed_grads(self) -> None:
        if self.reduce_grads and not self._grads_averaged:
            average_sparse_grads(self._comm, [p for group in self.param_groups for p in group["params"]])
            self._grads_averaged = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._grads_averaged = False
        super().zero_grad(set_to_none)

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Update every parameter that has a (sparse) gradient; returns ``closure()``'s value if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        # Checked before anything moves (torch raises midway, after updating earlier groups).
        if not all(p.grad.is_sparse for _, p in work):
            raise RuntimeError("SparseAdam does not support dense gradients, please consider Adam instead")
        if self.reduce_grads and not self._grads_averaged:
            # Replicated: a collective; a parameter with a gradient on any rank moves.
            average_sparse_grads(self._comm, [p for group in self.param_groups for p in group["params"]])
            work = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        self._grads_averaged = False
        for group, p in work:
            h = HyperParams.of(group, keep_tensors=True)
            entry = self.state[p]
            if not entry:
                entry["step"] = 0
                entry.update({name: torch.zeros_like(p, memory_format=torch.preserve_format) for name in state(h)})
            entry["step"] += 1
            s = types.SimpleNamespace(**{name: entry[name] for name in state(h)})
            update(p, p.grad, s, h, scalars(h, entry["step"]))
        return loss


def average_sparse_grads(comm: Comm, params: Sequence[Tensor]) -> None:
    """Replace each parameter's sparse ``.grad`` by its average over ranks (its rows: the union).

    A parameter with a gradient on some rank gets one on every rank (an empty one stands in where a
    rank has none, with one sparse dimension as ``nn.Embedding(sparse=True)`` produces); one without
    anywhere keeps None. Collective when ``comm`` spans several ranks.
    """
    if comm.world_size == 1:
        return
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=comm.small_device)
    comm.launch_reduce(present, "max").wait()
    for param, anywhere in zip(params, present.tolist()):
        if not anywhere:
            continue
        grad = param.grad
        if grad is None:
            grad = torch.sparse_coo_tensor(
                torch.empty(1, 0, dtype=torch.long, device=param.device),
                torch.empty(0, *param.shape[1:], dtype=param.dtype, device=param.device),
                param.shape,
            )
        comm.launch_reduce(grad, "sum").wait()
        param.grad = grad.coalesce().div_(comm.world_size)


def _positions(groups: Sequence[dict[str, Any]], predicate: Callable[[Tensor], bool]) -> list[list[int]]:
    """``[group, index]`` of every parameter for which ``predicate`` holds, as torch reports them."""
    return [[g, i] for g, group in enumerate(groups) for i, p in enumerate(group["params"]) if predicate(p)]
