"""L-BFGS (Liu & Nocedal, 1989) with an optional strong-Wolfe line search (Nocedal & Wright, 2006).

Not an elementwise update: every iteration takes dot products over all parameters at once and may call
the closure several times. The parameters are therefore seen as one real vector. On flat buckets that
vector already exists: the single bucket's ``flat_param`` and ``flat_grad``, packed without alignment
gaps, *are* torch's concatenated parameter and gradient vectors. Gradients land there during
``backward()`` (or accumulate there in place), so reading the gradient is a view instead of a
``torch.cat``, and moving or saving the parameters is one kernel instead of one per parameter.
The direction and history in ``state`` are plain vectors of torch's length and layout, so state dicts
move between this class and ``torch.optim.LBFGS`` both ways.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core import BucketLayout, FlatBucket, Optimizer, ParamSpec, ShardingConfig, plan_buckets
from ..core.alias import real_view
from ..core.hparams import learning_rate

#: Numbers that travel through the line search: Python numbers or 0-D tensors, exactly as they arise
#: (a step length becomes a tensor once it is computed from one), which keeps torch's arithmetic.
Scalar = float | Tensor

#: A curvature pair enters the history only when :math:`y^\top s` exceeds this.
CURVATURE_EPS = 1e-10


class ParameterVector:
    """The parameters as the one real vector L-BFGS works on: torch's order, length and layout.

    With one bucket (one dtype and device: the usual case) the vector is the bucket's flat buffers,
    viewed as real. With several (mixed dtypes) the gradient is concatenated in parameter order and
    updates go through per-parameter views, as torch does; a dtype mix promotes as ``torch.cat`` does.
    """

    def __init__(self, buckets: Sequence[FlatBucket], params: Sequence[Tensor]) -> None:
        self._buckets = list(buckets)
        if len(self._buckets) == 1:
            (bucket,) = self._buckets  # its slots are the parameters, in order, without gaps
            numel = bucket.layout.slots[-1].end if bucket.layout.slots else 0
            self._params = [real_view(bucket.flat_param[:numel])]
            self._grads = [real_view(bucket.flat_grad[:numel])]
        else:
            where = {id(p): (b, slot) for b in self._buckets for p, slot in zip(b.params, b.layout.slots)}
            located = [where[id(p)] for p in params]
            self._params = [real_view(b.flat_param[slot.offset : slot.end]) for b, slot in located]
            self._grads = [real_view(b.flat_grad[slot.offset : slot.end]) for b, slot in located]

    def collect_grads(self) -> None:
        """Bring every parameter's gradient into the buckets' ``flat_grad``: None counts as zeros, as in
        torch; a sparse gradient is densified there and stays sparse in ``.grad``."""
        for bucket in self._buckets:
            for position, param in enumerate(bucket.params):
                if param.grad is None:
                    bucket.grad_view(position).zero_()
                elif param.grad.is_sparse:
                    bucket.densify_grad(position)
                else:
                    bucket.take_grad(position)

    def grad(self) -> Tensor:
        """The gradient vector: a view of the bucket when there is one (valid until the next closure call)."""
        return self._grads[0] if len(self._grads) == 1 else torch.cat(self._grads)

    def add_(self, step: Scalar, direction: Tensor) -> None:
        """``x += step * direction``."""
        offset = 0
        for part in self._params:
            part.add_(direction[offset : offset + part.numel()], alpha=step)
            offset += part.numel()

    def copy(self) -> list[Tensor]:
        return [part.clone() for part in self._params]

    def restore(self, saved: Sequence[Tensor]) -> None:
        for part, value in zip(self._params, saved):
            part.copy_(value)


@dataclass
class Trial:
    """A point on the search line: step length ``t``, loss ``f``, gradient ``g`` and slope ``gtd`` there."""

    t: Scalar
    f: float
    g: Tensor
    gtd: Scalar | None


def cubic_minimizer(a: Trial, b: Trial, bounds: tuple[Scalar, Scalar] | None = None) -> Scalar:
    r"""Minimiser of the cubic through two trials' values and slopes (Nocedal & Wright, eq. 3.59).

    .. math::
        d_1 = g_a + g_b - 3\frac{f_a - f_b}{t_a - t_b},\quad d_2 = \sqrt{d_1^2 - g_a g_b},\quad
        t = t_b - (t_b - t_a)\frac{g_b + d_2 - d_1}{g_b - g_a + 2 d_2} \quad (t_a \le t_b)

    clamped to ``bounds`` (default: the interval between the trials); their midpoint when the cubic
    has no minimum (:math:`d_1^2 < g_a g_b`). The formula is symmetric, so the trials may come in any order.
    """
    low, high = bounds if bounds is not None else ((a.t, b.t) if a.t <= b.t else (b.t, a.t))
    if a.t > b.t:
        a, b = b, a
    d1 = a.gtd + b.gtd - 3 * (a.f - b.f) / (a.t - b.t)
    d2_square = d1**2 - a.gtd * b.gtd
    if d2_square >= 0:
        d2 = d2_square.sqrt()
        t = b.t - (b.t - a.t) * ((b.gtd + d2 - d1) / (b.gtd - a.gtd + 2 * d2))
        return min(max(t, low), high)
    return (low + high) / 2.0


def strong_wolfe(
    evaluate: Callable[[Scalar], tuple[float, Tensor]],
    d: Tensor,
    start: Trial,
    t: Scalar,
    *,
    c1: float = 1e-4,
    c2: float = 0.9,
    tolerance_change: float = 1e-9,
    max_ls: int = 25,
) -> tuple[Trial, int]:
    r"""A step length along ``d`` satisfying the strong Wolfe conditions (Nocedal & Wright, Alg. 3.5 and 3.6).

    .. math::
        f(t) \le f(0) + c_1 t f'(0), \qquad |f'(t)| \le -c_2 f'(0)

    ``evaluate(t)`` returns the loss and gradient at ``x + t d`` (a gradient the caller may keep);
    ``start`` is the trial at ``t = 0``. The first phase grows ``t`` by cubic extrapolation (within
    :math:`[t + 0.01 (t - t_{prev}), 10 t]`) until an interval must contain such a point; the second
    ("zoom") shrinks it by cubic interpolation, stepping 10% of its width away from an end when the
    interpolant crowds it twice in a row. At most ``max_ls`` evaluations; returns the best trial found
    and the number of evaluations.
    """
    d_norm = d.abs().max()
    start = Trial(start.t, start.f, start.g.clone(), start.gtd)

    def trial_at(t: Scalar) -> Trial:
        f, g = evaluate(t)
        return Trial(t, f, g, g.dot(d))

    def armijo_fails(trial: Trial) -> bool:
        return trial.f > start.f + c1 * trial.t * start.gtd

    def curvature_met(trial: Trial) -> bool:
        return abs(trial.gtd) <= -c2 * start.gtd

    # Phase 1 (Alg. 3.5): ends with a bracket [previous, current], or a point that satisfies both.
    previous, current = start, trial_at(t)
    evaluations, iterations = 1, 0
    bracket: list[Trial] = []
    done = False
    while iterations < max_ls:
        if armijo_fails(current) or (iterations > 1 and current.f >= previous.f):
            bracket = [previous, current]
            break
        if curvature_met(current):
            bracket, done = [current], True
            break
        if current.gtd >= 0:
            bracket = [previous, current]
            break
        bounds = (current.t + 0.01 * (current.t - previous.t), current.t * 10)
        previous, current = current, trial_at(cubic_minimizer(previous, current, bounds))
        evaluations += 1
        iterations += 1
    if iterations == max_ls:
        bracket = [start, current]

    # Phase 2 (Alg. 3.6): bracket[low] is the best trial so far, bracket[1 - low] the other end.
    low = 0 if bracket[0].f <= bracket[-1].f else 1
    crowded = False
    while not done and iterations < max_ls:
        lo, hi = bracket
        if abs(hi.t - lo.t) * d_norm < tolerance_change:
            break
        t = cubic_minimizer(lo, hi)
        left, right = min(lo.t, hi.t), max(lo.t, hi.t)
        margin = 0.1 * (right - left)
        if min(right - t, t - left) < margin:
            if crowded or t >= right or t <= left:
                t = right - margin if abs(t - right) < abs(t - left) else left + margin
                crowded = False
            else:
                crowded = True
        else:
            crowded = False
        current = trial_at(t)
        evaluations += 1
        iterations += 1
        if armijo_fails(current) or current.f >= bracket[low].f:
            bracket[1 - low] = current
            low = 0 if bracket[0].f <= bracket[1].f else 1
            continue
        if curvature_met(current):
            done = True
        elif current.gtd * (bracket[1 - low].t - bracket[low].t) >= 0:
            bracket[1 - low] = bracket[low]
        bracket[low] = current
    return bracket[low], evaluations


class LBFGS(Optimizer):
    """L-BFGS; the constructor, defaults, errors and state of ``torch.optim.LBFGS``.

    One param group only, and ``step(closure)`` needs the closure: it re-evaluates the loss and
    gradient. ``line_search_fn`` is None (fixed steps of ``lr``) or ``"strong_wolfe"`` (see
    :func:`strong_wolfe`). The history costs ``history_size + 1`` extra copies of the parameters.

    All parameters live in one flat bucket when they share a dtype and device, and the algorithm works
    on its buffers in place (see :class:`ParameterVector`). With a process group the optimizer is
    replicated, not sharded: every rank holds everything and the gradient is averaged across ranks.
    """

    rule = None
    checks = learning_rate()
    shardable = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        history_size: int = 100,
        line_search_fn: str | None = None,
        *,
        process_group: Any = None,
        reduce_grads: bool = True,
        sharding: ShardingConfig | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, max_iter=max_iter, max_eval=max_iter * 5 // 4 if max_eval is None else max_eval,
            tolerance_grad=tolerance_grad, tolerance_change=tolerance_change, history_size=history_size,
            line_search_fn=line_search_fn,
        )
        super().__init__(
            params, defaults, process_group=process_group, reduce_grads=reduce_grads, sharding=sharding,
            state_dtype=state_dtype,
        )
        if len(self.param_groups) != 1:
            raise ValueError("LBFGS doesn't support per-parameter options (parameter groups)")

    def _plan_buckets(self, specs: Sequence[ParamSpec]) -> tuple[BucketLayout, ...]:
        # No alignment gaps: the flat buffer is then exactly torch's concatenated parameter vector.
        return plan_buckets(specs, alignment=1)

    def _evaluation(self, loss: Any) -> tuple[float, Tensor]:
        """A closure call's loss as a number and the gradient vector it left (a view of the bucket).

        Replicated, both are averaged over ranks, the gradient unless ``reduce_grads=False`` (collectives:
        every rank evaluates the closure as often as every other, since all take the same decisions
        from the same averages).
        """
        self._vector.collect_grads()
        comm = self._comm
        if self.reduce_grads and comm.world_size > 1:
            for pending in [comm.launch_average(b.flat_grad, b.flat_grad) for b in self._buckets]:
                pending.wait()
        # The loss is averaged even when DDP averaged the gradients: ranks that saw different data
        # would otherwise take different line-search decisions and fall out of step.
        total = torch.tensor(float(loss), dtype=torch.float64, device=comm.small_device)
        comm.launch_reduce(total, "sum").wait()
        return total.item() / comm.world_size, self._vector.grad()

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], Any]) -> Any:  # type: ignore[override]
        """Up to ``max_iter`` L-BFGS iterations; returns the closure's first loss.

        ``closure`` clears the gradients, computes the loss, calls ``backward()`` and returns the loss.
        """
        if len(self.param_groups) != 1:
            raise AssertionError(f"Expected exactly one param_group, but got {len(self.param_groups)}")
        closure = torch.enable_grad()(closure)
        self._check_params()
        self._vector = ParameterVector(self._buckets, self.param_groups[0]["params"])
        group = self.param_groups[0]
        lr = group["lr"].reshape(()) if isinstance(group["lr"], Tensor) else group["lr"]
        max_iter, max_eval = group["max_iter"], group["max_eval"]
        tolerance_grad, tolerance_change = group["tolerance_grad"], group["tolerance_change"]
        line_search_fn, history_size = group["line_search_fn"], group["history_size"]

        # torch keeps LBFGS's whole state under its first parameter.
        state = self.state[group["params"][0]]
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)

        first_loss = closure()
        loss, g = self._evaluation(first_loss)
        evaluations = 1
        state["func_evals"] += 1
        converged = bool(g.abs().max() <= tolerance_grad)
        if converged:
            return first_loss

        d, t = state.get("d"), state.get("t")
        old_dirs, old_stps, ro = state.get("old_dirs"), state.get("old_stps"), state.get("ro")
        H_diag, prev_flat_grad, prev_loss = state.get("H_diag"), state.get("prev_flat_grad"), state.get("prev_loss")

        for iteration in range(1, max_iter + 1):
            state["n_iter"] += 1
            first_ever = state["n_iter"] == 1
            if first_ever:
                d = g.neg()
                old_dirs, old_stps, ro, H_diag = [], [], [], 1
            else:
                H_diag = _remember(g - prev_flat_grad, d.mul(t), old_dirs, old_stps, ro, history_size, H_diag)
                if "al" not in state:
                    state["al"] = [None] * history_size
                d = _two_loop(g, old_dirs, old_stps, ro, H_diag, state["al"])

            if prev_flat_grad is None:
                prev_flat_grad = g.clone()
            else:
                prev_flat_grad.copy_(g)
            prev_loss = loss

            # The very first step is scaled by the gradient's size; later ones start at lr.
            t = min(1.0, 1.0 / g.abs().sum()) * lr if first_ever else lr
            gtd = g.dot(d)
            if gtd > -tolerance_change:
                break

            spent = 0
            if line_search_fn is not None:
                if line_search_fn != "strong_wolfe":
                    raise RuntimeError("only 'strong_wolfe' is supported")
                origin = self._vector.copy()

                def loss_and_grad_at(step: Scalar) -> tuple[float, Tensor]:
                    self._vector.add_(step, d)
                    value, grad = self._evaluation(closure())
                    self._vector.restore(origin)
                    return value, grad.clone()

                # As in torch, the line search keeps its own tolerance_change, not the group's.
                start = Trial(0, loss, g, gtd)
                best, spent = strong_wolfe(loss_and_grad_at, d, start, t, max_ls=max_eval - evaluations)
                loss, g, t = best.f, best.g, best.t
                self._vector.add_(t, d)
                converged = bool(g.abs().max() <= tolerance_grad)
            else:
                self._vector.add_(t, d)
                if iteration != max_iter:
                    # Not after the last iteration: the next step() evaluates this point anyway.
                    loss, g = self._evaluation(closure())
                    converged = bool(g.abs().max() <= tolerance_grad)
                    spent = 1
            evaluations += spent
            state["func_evals"] += spent

            if (
                iteration == max_iter
                or evaluations >= max_eval
                or converged
                or d.mul(t).abs().max() <= tolerance_change
                or abs(loss - prev_loss) < tolerance_change
            ):
                break

        state.update(
            d=d, t=t, old_dirs=old_dirs, old_stps=old_stps, ro=ro, H_diag=H_diag,
            prev_flat_grad=prev_flat_grad, prev_loss=prev_loss,
        )
        return first_loss


def _remember(
    y: Tensor, s: Tensor, old_dirs: list[Tensor], old_stps: list[Tensor], ro: list[Tensor], history_size: int,
    H_diag: Scalar,
) -> Scalar:
    r"""Add the curvature pair :math:`(y, s)` to the history if :math:`y^\top s > 10^{-10}`, dropping the
    oldest beyond ``history_size``; returns the initial inverse-Hessian scale
    :math:`\gamma = y^\top s / y^\top y` (unchanged when the pair is skipped)."""
    ys = y.dot(s)
    if not ys > CURVATURE_EPS:
        return H_diag
    if len(old_dirs) == history_size:
        del old_dirs[0], old_stps[0], ro[0]
    old_dirs.append(y)
    old_stps.append(s)
    ro.append(1.0 / ys)
    return ys / y.dot(y)


def _two_loop(
    g: Tensor, old_dirs: list[Tensor], old_stps: list[Tensor], ro: list[Tensor], H_diag: Scalar, al: list
) -> Tensor:
    r"""The L-BFGS direction :math:`d = -H g` by the two-loop recursion (Nocedal & Wright, Alg. 7.4).

    .. math::
        q \leftarrow -g;\ \ \alpha_i = \rho_i s_i^\top q,\ q \leftarrow q - \alpha_i y_i \ (i = k-1 \dots 0);\ \
        r \leftarrow \gamma q;\ \ \beta_i = \rho_i y_i^\top r,\ r \leftarrow r + (\alpha_i - \beta_i) s_i \
        (i = 0 \dots k-1)

    with :math:`\rho_i = 1 / y_i^\top s_i`; ``al`` receives the :math:`\alpha_i` (torch keeps them in state).
    """
    q = g.neg()
    for i in reversed(range(len(old_dirs))):
        al[i] = old_stps[i].dot(q) * ro[i]
        q.add_(old_dirs[i], alpha=-al[i])
    r = torch.mul(q, H_diag)
    for i in range(len(old_dirs)):
        beta = old_dirs[i].dot(r) * ro[i]
        r.add_(old_stps[i], alpha=al[i] - beta)
    return r
