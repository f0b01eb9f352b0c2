"""Schedules that set the lr outright from the epoch's place in a cycle: ``CyclicLR``,
``OneCycleLR`` and ``CosineAnnealingWarmRestarts``. None of them is chainable; the first two also
cycle momentum (SGD's ``momentum`` or the Adam family's ``betas[0]``) against the lr.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from typing import Any, Literal

from .base import LRScheduler
from .closed_form import cosine_weight
from .groups import PerGroup, hyperparameter_names, per_group, require_param_groups, set_group_value

#: A custom amplitude scaling for ``CyclicLR``: cycle number or iteration -> factor in [0, 1].
ScaleFunction = Callable[[float], float]

_SCALE_MODE_OF = {"triangular": "cycle", "triangular2": "cycle", "exp_range": "iterations"}


def _uses_beta1(optimizer: Any) -> bool:
    """Whether momentum lives in ``betas[0]`` (Adam family) rather than ``momentum`` (SGD family)."""
    names = hyperparameter_names(optimizer)
    if "momentum" not in names and "betas" not in names:
        raise ValueError("optimizer must support momentum or beta1 with `cycle_momentum` option enabled")
    return "betas" in names


def _write_momentum(group: dict[str, Any], value: float, use_beta1: bool) -> None:
    if use_beta1:
        group["betas"] = (value, *group["betas"][1:])
    else:
        group["momentum"] = value


def _start_momentum_cycle(
    optimizer: Any, base_momentum: Any, max_momentum: Any, last_epoch: int
) -> tuple[bool, list[Any], list[Any]]:
    """Validate momentum cycling; on a fresh start, set every group's momentum to its maximum and
    record ``base_momentum``/``max_momentum`` in the group. Returns (use_beta1, bases, maxima)."""
    use_beta1 = _uses_beta1(optimizer)
    bases = per_group("base_momentum", optimizer, base_momentum)
    maxima = per_group("max_momentum", optimizer, max_momentum)
    if last_epoch == -1:
        for group, low, high in zip(optimizer.param_groups, bases, maxima, strict=True):
            _write_momentum(group, high, use_beta1)
            group["max_momentum"] = high
            group["base_momentum"] = low
    return use_beta1, bases, maxima


class CyclicLR(LRScheduler):
    """Cycle each group's lr between ``base_lr`` and ``max_lr`` (cyclical learning rates,
    Smith 2017), one step per batch. With ``c = floor(1 + t / (up + down))`` the cycle number,
    ``x = 1 + t / (up + down) - c`` the position in it and ``r = up / (up + down)``:

        rise = x / r if x <= r else (x - 1) / (r - 1)
        lr_t = base_lr + (max_lr - base_lr) * rise * scale_fn(c or t)
        momentum_t = max_momentum - (max_momentum - base_momentum) * rise * scale_fn(c or t)

    ``scale_fn`` is ``1`` ("triangular"), ``1 / 2 ** (c - 1)`` ("triangular2"), ``gamma ** t``
    ("exp_range") or the user's function, of the cycle number (``scale_mode="cycle"``) or of the
    iteration (``"iterations"``). Not chainable.

    Args:
        optimizer: object whose ``param_groups`` are scheduled.
        base_lr: lower lr bound, one value or one per group; set as the groups' lr on a fresh start.
        max_lr: upper lr bound, one value or one per group.
        step_size_up: iterations in the rising half of a cycle. Default: 2000.
        step_size_down: iterations in the falling half; ``None`` means ``step_size_up``.
        mode: "triangular", "triangular2" or "exp_range"; ignored when ``scale_fn`` is given.
        gamma: base of "exp_range". Default: 1.0.
        scale_fn: custom amplitude scaling, with values in [0, 1].
        scale_mode: "cycle" or "iterations": what a custom ``scale_fn`` receives.
        cycle_momentum: cycle momentum/beta1 inversely to the lr. Default: True.
        base_momentum: momentum at the lr's peak. Default: 0.8.
        max_momentum: momentum at the lr's trough. Default: 0.9.
        last_epoch: index of the last batch; ``-1`` starts afresh.
    """

    _not_state = LRScheduler._not_state | {"_scale_fn_custom"}

    def __init__(
        self,
        optimizer: Any,
        base_lr: PerGroup,
        max_lr: PerGroup,
        step_size_up: int = 2000,
        step_size_down: int | None = None,
        mode: Literal["triangular", "triangular2", "exp_range"] = "triangular",
        gamma: float = 1.0,
        scale_fn: ScaleFunction | None = None,
        scale_mode: Literal["cycle", "iterations"] = "cycle",
        cycle_momentum: bool = True,
        base_momentum: PerGroup = 0.8,
        max_momentum: PerGroup = 0.9,
        last_epoch: int = -1,
    ) -> None:
        require_param_groups(optimizer)
        base_lrs = per_group("base_lr", optimizer, base_lr)
        if last_epoch == -1:
            for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                set_group_value(group, "lr", lr)
        self.max_lrs = per_group("max_lr", optimizer, max_lr)
        up = float(step_size_up)
        down = float(step_size_down) if step_size_down is not None else up
        if not up > 0:
            raise ValueError(f"CyclicLR: step_size_up must be positive, got {step_size_up}")
        if down < 0:
            raise ValueError(f"CyclicLR: step_size_down must be non-negative, got {step_size_down}")
        self.total_size = up + down
        self.step_ratio = up / self.total_size
        if scale_fn is None and mode not in _SCALE_MODE_OF:
            raise ValueError(f"CyclicLR: mode {mode!r} is invalid and scale_fn is None")
        if scale_fn is not None and scale_mode not in ("cycle", "iterations"):
            raise ValueError(f"CyclicLR: scale_mode must be 'cycle' or 'iterations', got {scale_mode!r}")
        self.mode = mode
        self.gamma = gamma
        self._scale_fn_custom = scale_fn
        self.scale_mode = scale_mode if scale_fn is not None else _SCALE_MODE_OF[mode]
        self.cycle_momentum = cycle_momentum
        if cycle_momentum:
            self.use_beta1, self.base_momentums, self.max_momentums = _start_momentum_cycle(
                optimizer, base_momentum, max_momentum, last_epoch
            )
        super().__init__(optimizer, last_epoch)
        # Set after the constructor's step, which (as torch's) ran from the groups' initial_lr.
        self.base_lrs = base_lrs

    def scale_fn(self, x: float) -> float:
        """Amplitude scale at ``x`` (a cycle number or an iteration, per ``scale_mode``)."""
        if self._scale_fn_custom is not None:
            return self._scale_fn_custom(x)
        if self.mode == "triangular":
            return 1.0
        if self.mode == "triangular2":
            return 1 / (2.0 ** (x - 1))
        return self.gamma**x

    def get_lr(self) -> list[Any]:
        self._warn_unless_inside_step()
        epoch = self.last_epoch
        cycle = math.floor(1 + epoch / self.total_size)
        x = 1.0 + epoch / self.total_size - cycle
        rise = x / self.step_ratio if x <= self.step_ratio else (x - 1) / (self.step_ratio - 1)
        scale = self.scale_fn(cycle if self.scale_mode == "cycle" else epoch)
        if self.cycle_momentum:
            momentum_bounds = zip(self.base_momentums, self.max_momentums, strict=True)
            for group, (low, high) in zip(self.optimizer.param_groups, momentum_bounds, strict=True):
                _write_momentum(group, high - (high - low) * rise * scale, self.use_beta1)
        return [low + (high - low) * rise * scale for low, high in zip(self.base_lrs, self.max_lrs, strict=True)]

    def state_dict(self) -> dict[str, Any]:
        """State as in ``LRScheduler``; a custom ``scale_fn`` is kept only as a callable object's
        ``__dict__`` (``None`` for a function or lambda)."""
        state = super().state_dict()
        fn = self._scale_fn_custom
        keep = fn is not None and not isinstance(fn, types.FunctionType)
        state["_scale_fn_custom"] = dict(getattr(fn, "__dict__", {})) if keep else None
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "_scale_fn_custom"})
        saved = state_dict.get("_scale_fn_custom")
        if saved is not None and self._scale_fn_custom is not None:
            self._scale_fn_custom.__dict__.update(saved)


def _total_steps(total_steps: int | None, epochs: int | None, steps_per_epoch: int | None) -> int:
    def positive_int(name: str, value: Any) -> int:
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"Expected positive integer {name}, but got {value}")
        return value

    if total_steps is not None:
        return positive_int("total_steps", total_steps)
    if epochs is not None and steps_per_epoch is not None:
        return positive_int("epochs", epochs) * positive_int("steps_per_epoch", steps_per_epoch)
    raise ValueError("You must define either total_steps OR (epochs AND steps_per_epoch)")


def _phase(end_step: float, lr_from: str, lr_to: str, momentum_from: str, momentum_to: str) -> dict[str, Any]:
    """One phase of a 1cycle schedule; the strings name the param-group keys it moves between."""
    return {
        "end_step": end_step,
        "start_lr": lr_from,
        "end_lr": lr_to,
        "start_momentum": momentum_from,
        "end_momentum": momentum_to,
    }


def _strategy_of(anneal_func: Any) -> str:
    """"cos" or "linear" for one of torch's annealing functions (as old torch state dicts hold)."""
    name = getattr(anneal_func, "__name__", "")
    for strategy in ("cos", "linear"):
        if name == f"_annealing_{strategy}":
            return strategy
    raise ValueError(f"anneal_func must be torch's _annealing_cos or _annealing_linear, got {anneal_func!r}")


class OneCycleLR(LRScheduler):
    """The 1cycle policy (Smith & Topin 2018), one step per batch: the lr rises from
    ``max_lr / div_factor`` to ``max_lr`` over the first ``pct_start`` of ``total_steps``, then
    falls to ``max_lr / div_factor / final_div_factor``; momentum moves the opposite way between
    ``max_momentum`` and ``base_momentum``. With ``three_phase`` the fall first mirrors the rise
    back to the initial lr, and a third phase anneals to the minimum.

    Within a phase running from step ``s0`` to ``s1`` with ``p = (t - s0) / (s1 - s0)``, a value
    moves from ``a`` to ``b`` as ``b + (a - b) * (1 + cos(pi * p)) / 2`` ("cos") or
    ``a + (b - a) * p`` ("linear"). The phase end points, and each group's ``initial_lr``,
    ``max_lr``, ``min_lr``, ``max_momentum`` and ``base_momentum``, are what torch stores, under the
    same names. Stepping past ``total_steps`` raises ``ValueError``. Not chainable.

    Args:
        optimizer: object whose ``param_groups`` are scheduled.
        max_lr: peak lr, one value or one per group.
        total_steps: steps in the cycle; or give ``epochs`` and ``steps_per_epoch``.
        epochs: epochs, used with ``steps_per_epoch`` when ``total_steps`` is None.
        steps_per_epoch: steps per epoch, used with ``epochs``.
        pct_start: fraction of the cycle spent rising, a float in [0, 1]. Default: 0.3.
        anneal_strategy: "cos" or "linear". Default: "cos".
        cycle_momentum: cycle momentum/beta1 inversely to the lr. Default: True.
        base_momentum: momentum at the lr's peak. Default: 0.85.
        max_momentum: momentum at the start and end. Default: 0.95.
        div_factor: ``initial_lr = max_lr / div_factor``. Default: 25.
        final_div_factor: ``min_lr = initial_lr / final_div_factor``. Default: 1e4.
        three_phase: use the three-phase variant. Default: False.
        last_epoch: index of the last batch; ``-1`` starts afresh.
    """

    def __init__(
        self,
        optimizer: Any,
        max_lr: PerGroup,
        total_steps: int | None = None,
        epochs: int | None = None,
        steps_per_epoch: int | None = None,
        pct_start: float = 0.3,
        anneal_strategy: Literal["cos", "linear"] = "cos",
        cycle_momentum: bool = True,
        base_momentum: PerGroup = 0.85,
        max_momentum: PerGroup = 0.95,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
        last_epoch: int = -1,
    ) -> None:
        require_param_groups(optimizer)
        self.total_steps = _total_steps(total_steps, epochs, steps_per_epoch)
        if not isinstance(pct_start, float) or not 0 <= pct_start <= 1:
            raise ValueError(f"Expected float between 0 and 1 pct_start, but got {pct_start}")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be one of 'cos' or 'linear', instead got {anneal_strategy}")
        self._anneal_func_type = anneal_strategy
        rise_end = float(pct_start * self.total_steps) - 1
        mirror_end = float(2 * pct_start * self.total_steps) - 2
        last = self.total_steps - 1
        if three_phase:
            self._schedule_phases = [
                _phase(rise_end, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                _phase(mirror_end, "max_lr", "initial_lr", "base_momentum", "max_momentum"),
                _phase(last, "initial_lr", "min_lr", "max_momentum", "max_momentum"),
            ]
        else:
            self._schedule_phases = [
                _phase(rise_end, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                _phase(last, "max_lr", "min_lr", "base_momentum", "max_momentum"),
            ]
        max_lrs = per_group("max_lr", optimizer, max_lr)
        if last_epoch == -1:
            for group, peak in zip(optimizer.param_groups, max_lrs, strict=True):
                group["initial_lr"] = peak / div_factor
                group["max_lr"] = peak
                group["min_lr"] = group["initial_lr"] / final_div_factor
        self.cycle_momentum = cycle_momentum
        if cycle_momentum:
            self.use_beta1, _, _ = _start_momentum_cycle(optimizer, base_momentum, max_momentum, last_epoch)
        super().__init__(optimizer, last_epoch)

    @staticmethod
    def _annealing_cos(start: Any, end: Any, pct: float) -> Any:
        return end + (start - end) * cosine_weight(pct, 1.0)

    @staticmethod
    def _annealing_linear(start: Any, end: Any, pct: float) -> Any:
        return (end - start) * pct + start

    def _anneal(self, start: Any, end: Any, pct: float) -> Any:
        if self._anneal_func_type == "cos":
            return self._annealing_cos(start, end, pct)
        return self._annealing_linear(start, end, pct)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """State as in ``LRScheduler``; also torch's state from before 2.2, which pickled the
        annealing function itself (``anneal_func``) instead of naming it."""
        state = dict(state_dict)
        legacy_function = state.pop("anneal_func", None)
        if legacy_function is not None and "_anneal_func_type" not in state:
            state["_anneal_func_type"] = _strategy_of(legacy_function)
        super().load_state_dict(state)

    def get_lr(self) -> list[Any]:
        self._warn_unless_inside_step()
        step = self.last_epoch
        if step > self.total_steps:
            raise ValueError(f"Tried to step {step} times. The specified number of total steps is {self.total_steps}")
        phases = self._schedule_phases
        start = 0.0
        for index, phase in enumerate(phases):
            if step <= phase["end_step"] or index == len(phases) - 1:
                break
            start = phase["end_step"]
        pct = (step - start) / (phase["end_step"] - start)
        lrs = []
        for group in self.optimizer.param_groups:
            lrs.append(self._anneal(group[phase["start_lr"]], group[phase["end_lr"]], pct))
            if self.cycle_momentum:
                momentum = self._anneal(group[phase["start_momentum"]], group[phase["end_momentum"]], pct)
                _write_momentum(group, momentum, self.use_beta1)
        return lrs


class CosineAnnealingWarmRestarts(LRScheduler):
    """Cosine annealing with warm restarts (SGDR, Loshchilov & Hutter 2017):

        lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * T_cur / T_i)) / 2

    where ``T_cur`` counts epochs since the last restart and ``T_i``, the current period, starts at
    ``T_0`` and is multiplied by ``T_mult`` at each restart. ``step(epoch)`` may be given a
    fractional epoch (e.g. ``epoch + batch / batches``) and places it in its period; this use is
    not deprecated. Not chainable.

    Args:
        optimizer: object whose ``param_groups`` are scheduled.
        T_0: epochs until the first restart, a positive integer.
        T_mult: growth of the period at each restart, an integer >= 1. Default: 1.
        eta_min: lowest lr. Default: 0.
        last_epoch: index of the last epoch; ``-1`` starts afresh.
    """

    def __init__(self, optimizer: Any, T_0: int, T_mult: int = 1, eta_min: float = 0.0, last_epoch: int = -1) -> None:
        if not isinstance(T_0, int) or T_0 <= 0:
            raise ValueError(f"Expected positive integer T_0, but got {T_0}")
        if not isinstance(T_mult, int) or T_mult < 1:
            raise ValueError(f"Expected integer T_mult >= 1, but got {T_mult}")
        if not isinstance(eta_min, (float, int)):
            raise ValueError(f"Expected float or int eta_min, but got {eta_min} of type {type(eta_min).__name__}")
        self.T_0 = T_0
        self.T_i = T_0
        self.T_mult = T_mult
        self.eta_min = eta_min
        self.T_cur = last_epoch
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[Any]:
        self._warn_unless_inside_step()
        weight = cosine_weight(self.T_cur, self.T_i)
        return [self.eta_min + (base - self.eta_min) * weight for base in self.base_lrs]

    def _place(self, epoch: float) -> tuple[float, int]:
        """(T_cur, T_i) of an absolute ``epoch``: the periods before it sum to
        ``T_0 * (T_mult ** n - 1) / (T_mult - 1)``."""
        if epoch < self.T_0:
            return epoch, self.T_0
        if self.T_mult == 1:
            return epoch % self.T_0, self.T_0
        n = int(math.log(epoch / self.T_0 * (self.T_mult - 1) + 1, self.T_mult))
        return epoch - self.T_0 * (self.T_mult**n - 1) / (self.T_mult - 1), self.T_0 * self.T_mult**n

    def step(self, epoch: float | None = None) -> None:
        """Advance one epoch, or move to ``epoch`` (which may be fractional), and write the lrs."""
        if epoch is None and self.last_epoch >= 0:
            epoch = self.last_epoch + 1
            self.T_cur += 1
            if self.T_cur >= self.T_i:  # restart, with a period T_mult times longer
                self.T_cur %= self.T_i
                self.T_i *= self.T_mult
        else:
            epoch = 0 if epoch is None else epoch
            if epoch < 0:
                raise ValueError(f"Expected non-negative epoch, but got {epoch}")
            self.T_cur, self.T_i = self._place(epoch)
        self.last_epoch = math.floor(epoch)
        self._apply(self.get_lr)
