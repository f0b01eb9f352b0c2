"""torch.optim's algorithms as the checkpoint tools need them: defaults, and telling one from its groups.

:func:`torch_defaults` is what ``torch.optim.<Algorithm>`` puts in a param group (its types too:
``betas`` is a tuple there, a list once it went through JSON); :func:`infer_algorithm` names the
algorithm whose param-group keys fit a state dict's groups best, for ``convert`` of a state dict
that does not say what wrote it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

#: The algorithms the tools know by name (shardoptim's and torch.optim's).
ALGORITHMS = (
    "SGD", "Adam", "AdamW", "Adadelta", "Adagrad", "Adamax", "ASGD", "NAdam", "RAdam", "RMSprop", "Rprop",
    "LBFGS", "SparseAdam", "Adafactor", "Muon",
)
#: Keys a param group may hold that no algorithm defines: parameters, and what schedulers add.
_NOT_ALGORITHM_KEYS = frozenset({
    "params", "param_names", "initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "swa_lr",
})


@functools.lru_cache(maxsize=None)
def _defaults(algorithm: str) -> tuple[tuple[str, Any], ...]:
    cls = getattr(torch.optim, algorithm, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        return ()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tuple(cls([torch.zeros(2, 2, requires_grad=True)]).defaults.items())
    except (TypeError, ValueError, RuntimeError):  # a constructor that needs more than parameters
        return ()


def torch_defaults(algorithm: str) -> dict[str, Any]:
    """``torch.optim.<algorithm>``'s defaults (an empty dict for a name torch does not have)."""
    return dict(_defaults(algorithm))


def with_torch_types(algorithm: str, group: Mapping[str, Any]) -> dict[str, Any]:
    """``group`` with the lists that torch's optimizer keeps as tuples (``betas``, ``etas``) made tuples."""
    defaults = torch_defaults(algorithm)
    return {
        key: tuple(value) if isinstance(defaults.get(key), tuple) and isinstance(value, list) else value
        for key, value in group.items()
    }


def infer_algorithm(param_groups: Sequence[Mapping[str, Any]]) -> str:
    """The algorithm whose defaults' keys match the groups' keys best; ``ValueError`` when none fits
    or two fit equally (Adam and AdamW are told apart by ``decoupled_weight_decay``)."""
    keys = set().union(*(set(group) for group in param_groups)) - _NOT_ALGORITHM_KEYS if param_groups else set()
    scored = []
    for name in ALGORITHMS:
        defaults = set(torch_defaults(name))
        if defaults:
            missing = len(defaults - keys)
            scored.append((2 * len(defaults & keys) - len(defaults), -missing, name))
    scored.sort(reverse=True)
    if not scored or scored[0][1] < -2:
        raise ValueError(f"cannot tell the algorithm from the param groups' keys {sorted(keys)}: pass --algorithm")
    best = [name for score, missing, name in scored if (score, missing) == scored[0][:2]]
    if set(best) == {"Adam", "AdamW"}:
        return "AdamW" if all(group.get("decoupled_weight_decay") for group in param_groups) else "Adam"
    if len(best) > 1:
        raise ValueError(f"the param groups fit {' and '.join(best)} equally: pass --algorithm")
    return best[0]
