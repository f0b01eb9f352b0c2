"""Muon for a model's hidden matrices and AdamW for everything else, in one optimizer.

The usual recipe for Muon: it is made for the 2-D weights of hidden layers; embeddings, output heads,
biases and norms train with AdamW. ``muon_param_groups(model)`` splits a model's parameters so;
``MuonAdamW`` steps both kinds in one step (the AdamW groups on flat partitions, the Muon groups on
whole-tensor ones), with one torch-format ``state_dict``, per-group learning rates for the
schedulers, one ``ShardedEMA`` and one checkpoint.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..core import Optimizer, ShardingConfig
from ..core.hparams import validate
from ..core.dispatch import check_flags
from . import adam, muon
from .blocks import RUNTIME_ARGUMENTS

#: What marks a param group as Muon's (``True``) or AdamW's (``False``), as in Muon's reference code.
USE_MUON = "use_muon"
#: Names of parameters that are 2-D but belong to AdamW: embeddings and output heads.
ADAMW_NAMES = r"(^|\.)(embed\w*|wte|wpe|lm_head|head|classifier|output_projection)(\.|$)"


def _defaults_of(cls: type[Optimizer], **fixed: Any) -> dict[str, Any]:
    """The torch defaults of ``cls``'s constructor (its keyword defaults, ours left out), and ``fixed``."""
    signature = inspect.signature(cls.__init__)
    defaults = {
        name: parameter.default for name, parameter in signature.parameters.items()
        if parameter.default is not inspect.Parameter.empty and name not in RUNTIME_ARGUMENTS
    }
    return {**defaults, **fixed}


MUON_DEFAULTS = _defaults_of(muon.Muon)
ADAMW_DEFAULTS = _defaults_of(adam.AdamW, decoupled_weight_decay=True)


def muon_param_groups(
    model: nn.Module,
    *,
    adamw_names: str | Callable[[str], bool] = ADAMW_NAMES,
    muon: Mapping[str, Any] | None = None,
    adamw: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """``model``'s parameters as ``MuonAdamW``'s two param groups, named (``param_names``).

    Muon gets the 2-D parameters, except those of ``nn.Embedding`` modules and those whose name
    matches ``adamw_names`` (a regular expression searched in the name, or a predicate; by default
    embeddings and output heads); AdamW gets the rest (biases, norms, embeddings, heads, and any
    tensor that is not 2-D). ``muon`` and ``adamw`` are extra entries of each group (``lr``, ...).
    A parameter shared by several modules (tied weights) is listed once, under its first name.
    """
    is_adamw_name = adamw_names if callable(adamw_names) else re.compile(adamw_names).search
    embeddings = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    chosen: dict[bool, list[tuple[str, nn.Parameter]]] = {True: [], False: []}
    for name, param in model.named_parameters():
        use_muon = param.ndim == 2 and id(param) not in embeddings and not is_adamw_name(name)
        chosen[use_muon].append((name, param))
    groups = []
    for use_muon, extra in ((True, muon), (False, adamw)):
        if chosen[use_muon]:
            groups.append({
                "params": [param for _, param in chosen[use_muon]],
                "param_names": [name for name, _ in chosen[use_muon]],
                USE_MUON: use_muon,
                **(extra or {}),
            })
    return groups


class MuonAdamW(Optimizer):
    """Muon and AdamW in one optimizer: each param group says which by ``"use_muon"``.

    ``params`` are param groups, each with ``"use_muon": True`` (2-D hidden weights: torch's Muon,
    its defaults from ``muon``) or ``False`` (anything: torch's AdamW, its defaults from ``adamw``);
    ``shardoptim.muon_param_groups(model)`` builds them. Each group's update is exactly the
    algorithm's (``torch.optim.Muon`` or ``torch.optim.AdamW`` on the same groups, stepped
    together). Sharded, the AdamW groups are cut into flat slices and the Muon groups are owned
    whole, matrix by matrix, balanced on orthogonalisation cost; both take one ``step()``, one
    gradient average per bucket and one parameter gather per bucket.

    ``state_dict()`` is torch's format over all groups (the groups keep ``use_muon``);
    ``add_param_group`` takes a group with ``use_muon`` too. ``state_dtype`` is not supported.
    """

    rule = adam.RULE
    tensor_rule = muon.TENSOR_RULE

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        *,
        muon: Mapping[str, Any] | None = None,
        adamw: Mapping[str, Any] | None = None,
        process_group: Any = None,
        reduce_grads: bool = True,
        sharding: ShardingConfig | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        if state_dtype is not None:
            raise ValueError(f"MuonAdamW does not support state_dtype={state_dtype}")
        self._group_defaults = {
            True: _with_overrides(MUON_DEFAULTS, muon, "muon"),
            False: _with_overrides(ADAMW_DEFAULTS, adamw, "adamw"),
        }
        for use_muon, defaults in self._group_defaults.items():
            self._validate(defaults, use_muon)
        super().__init__(params, {}, process_group=process_group, reduce_grads=reduce_grads, sharding=sharding)

    @classmethod
    def owns_whole_tensors(cls, group: Mapping[str, Any]) -> bool:
        return bool(group.get(USE_MUON))

    def _portable_state(self) -> dict[str, Any]:
        return {**super()._portable_state(), "group_defaults": self._group_defaults}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._group_defaults = state["group_defaults"]  # what add_param_group, rebuilding the groups, reads
        super().__setstate__(state)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; it must say ``"use_muon"``, and gets that algorithm's defaults."""
        if not isinstance(param_group, dict) or USE_MUON not in param_group:
            raise ValueError(
                f"every param group of MuonAdamW needs {USE_MUON!r}: True for Muon's 2-D hidden weights, False "
                f"for AdamW's parameters (shardoptim.muon_param_groups(model) splits a model so)"
            )
        use_muon = param_group[USE_MUON]
        if not isinstance(use_muon, bool):
            raise TypeError(f"{USE_MUON!r} must be True or False, got {use_muon!r}")
        super().add_param_group({**self._group_defaults[use_muon], **param_group})

    def _check_group(self, group: dict[str, Any]) -> None:
        if USE_MUON not in group:
            return  # the constructor's defaults, {}: each algorithm's were checked in __init__
        self._validate(group, group[USE_MUON])
        if group[USE_MUON]:
            muon.check_matrices(group.get("params", ()))

    @staticmethod
    def _validate(group: Mapping[str, Any], use_muon: bool) -> None:
        validate(group, muon.CHECKS if use_muon else adam.RULE.checks)
        if not use_muon:
            check_flags(group)


def _with_overrides(defaults: dict[str, Any], overrides: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    unknown = set(overrides or {}) - set(defaults)
    if unknown:
        raise TypeError(f"{what}= got unknown hyper-parameters {sorted(unknown)}; it takes {sorted(defaults)}")
    return {**defaults, **(overrides or {})}
