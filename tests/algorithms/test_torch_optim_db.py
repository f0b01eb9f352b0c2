"""torch's own optimizer test tables drive a parity test and an error test of ours.

``torch.testing._internal.common_optimizers.optim_db`` (shipped in the torch wheel) lists, per algorithm,
the hyper-parameter combinations torch tests its optimizers with (``optim_inputs_func``) and the invalid
inputs with the exception or warning torch raises for each (``optim_error_inputs_func``). What torch
tests of its optimizers, we test of ours:

* parity: every listed combination, ours and torch's side by side, parameters and state dicts compared
  with the tolerances of ``tests/oracle.py``;
* errors: every listed invalid input fails (or warns) from ours with torch's exception type and a
  message matching torch's regex, as torch's own ``test_errors`` checks it.

The inputs are read from torch at collection time, so a torch upgrade that adds a combination adds a test.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Mapping, Sequence

import pytest
import torch
import torch._dynamo
from torch.testing._internal.common_optimizers import ErrorOptimizerInput, OptimizerErrorEnum, OptimizerInfo, optim_db

# Importing torch's test harness freezes torch.backends flags for the whole process (its own suite
# wants that); the other tests here run real clients that set them (Lightning sets cudnn.benchmark).
# torch.backends keeps that switch in the globals of its own functions.
torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True

import shardoptim
from tests.algorithms.cases import BY_NAME, OUR_FLAGS
from tests.oracle import (
    assert_same_state, assert_same_trajectory, make_params, run_side_by_side, synthetic_grad, tolerance,
)

DEVICE = "cpu"
ALGORITHM_NAMES = [
    name for name in shardoptim.__all__
    if isinstance(getattr(shardoptim, name), type) and issubclass(getattr(shardoptim, name), shardoptim.Optimizer)
    and name != "Optimizer" and hasattr(torch.optim, name)  # (MuonAdamW combines two of torch's)
]
#: torch's table entries for the algorithms we provide, by name (optim_db also lists Adafactor and Muon).
INFOS: dict[str, OptimizerInfo] = {
    info.optim_cls.__name__: info for info in optim_db if info.optim_cls.__name__ in ALGORITHM_NAMES
}


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_graphs():
    """The default implementation compiles one more graph per algorithm here: release them, so the
    modules after this one start within torch.compile's limit of 8 graphs per update."""
    yield
    torch._dynamo.reset()


def _slug(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z.=]+", "_", text).strip("_")


def test_every_algorithm_has_an_optim_db_entry():
    assert sorted(INFOS) == sorted(ALGORITHM_NAMES)


# --------------------------------------------------------------------------------------------------
# Parity over optim_inputs_func
# --------------------------------------------------------------------------------------------------
#
# optim_inputs_func(device="cpu") already leaves out what torch supports only on other devices
# (``capturable=True`` and the configurations built on it), so every input it returns is run.


def _implementations(info: OptimizerInfo, index: int) -> Sequence[tuple[str, tuple[torch.dtype, ...]]]:
    """Which of our implementations run input ``index``, in which dtypes.

    for-loop and foreach run every input of the algorithms torch ships a foreach implementation of, in
    float32 and float64 (torch's own foreach-vs-for-loop test runs float64); fused runs every input
    where torch has a fused CPU kernel (ours calls it). The default implementation runs the first
    input only: for the algorithms without a torch fused kernel it compiles our update (seconds per
    graph, and torch.compile keeps 8 graphs per function). LBFGS and SparseAdam have one
    implementation, run on every input.
    """
    both = (torch.float32, torch.float64)
    if "foreach" not in info.supported_impls:
        return [("default", both)]
    implementations = [("for-loop", both), ("foreach", both)]
    if "fused" in info.supported_impls and DEVICE in info.supports_fused_on:
        implementations.append(("fused", (torch.float32,)))
    if index == 0:
        implementations.append(("default", (torch.float32,)))
    return implementations


def _parity_cases():
    for name, info in INFOS.items():
        for index, optim_input in enumerate(info.optim_inputs_func(device=DEVICE)):
            for implementation, dtypes in _implementations(info, index):
                for dtype in dtypes:
                    case = f"{name}-{_slug(optim_input.desc)}-{implementation}-{str(dtype).removeprefix('torch.')}"
                    yield pytest.param(name, index, implementation, dtype, id=case)


def _kwargs(name: str, index: int) -> dict:
    """A fresh copy of torch's input ``index`` (a Tensor lr must not be shared between two optimizers)."""
    return copy.deepcopy(INFOS[name].optim_inputs_func(device=DEVICE)[index].kwargs)


def _no_grads(step: int, index: int) -> bool:
    """As torch's own implementation-parity test: no gradients at all on one step, and one parameter
    without a gradient for two more (torch freezes a layer there)."""
    return step == 2 or (index == 0 and step in (3, 4))


def _assert_same_nested(ours, theirs, where: str) -> None:
    """Equal nested state (LBFGS keeps lists of tensors and floats, SparseAdam an int step): the same
    types and structure, tensors within the state tolerances of ``tests/oracle.py``."""
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor), f"{where}: {type(ours).__name__} where torch has a Tensor"
        assert ours.shape == theirs.shape, where
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5, msg=lambda m: f"{where}: {m}")
    elif isinstance(theirs, Mapping):
        assert isinstance(ours, Mapping) and ours.keys() == theirs.keys(), f"{where}: {list(ours)} != {list(theirs)}"
        for key in theirs:
            _assert_same_nested(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, (list, tuple)):
        assert isinstance(ours, (list, tuple)) and len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _assert_same_nested(a, b, f"{where}[{i}]")
    elif isinstance(theirs, float):
        assert isinstance(ours, (int, float)) and math.isclose(ours, theirs, rel_tol=1e-5, abs_tol=1e-5), (
            f"{where}: {ours!r} != {theirs!r}")
    else:
        assert type(ours) is type(theirs) and ours == theirs, f"{where}: {ours!r} != {theirs!r}"


#: Muon takes matrices only.
MATRIX_SHAPES = ((7, 5), (5, 3), (4, 9), (16, 16))


def _run_elementwise(name: str, index: int, implementation: str, dtype: torch.dtype):
    # The matrix algorithms (not in the elementwise table) are compared with the same flags in torch.
    torch_flags = BY_NAME[name].torch_flags(implementation) if name in BY_NAME else OUR_FLAGS[implementation]
    return run_side_by_side(
        lambda ps: getattr(shardoptim, name)(ps, **_kwargs(name, index), **OUR_FLAGS[implementation]),
        lambda ps: INFOS[name].optim_cls(ps, **_kwargs(name, index), **torch_flags),
        dtype=dtype,
        skip=_no_grads,
        **({"shapes": MATRIX_SHAPES} if name == "Muon" else {}),
    )


def _run_with_closure(name: str, index: int, dtype: torch.dtype, *, steps: int = 4):
    """LBFGS: ``step(closure)`` on a smooth, non-quadratic loss of all parameters."""
    ours, theirs = make_params(dtype), make_params(dtype)
    targets = make_params(dtype, seed=5)
    our_opt = getattr(shardoptim, name)(ours, **_kwargs(name, index))
    their_opt = INFOS[name].optim_cls(theirs, **_kwargs(name, index))

    def closure_for(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = sum(((p - t.detach()).square() + 0.1 * p.pow(4)).sum() for p, t in zip(params, targets))
            loss.backward()
            return loss

        return closure

    for _ in range(steps):
        our_loss = our_opt.step(closure_for(our_opt, ours))
        their_loss = their_opt.step(closure_for(their_opt, theirs))
        torch.testing.assert_close(our_loss, their_loss, **tolerance(dtype))
    return ours, theirs, our_opt, their_opt


def _run_sparse(name: str, index: int, dtype: torch.dtype, *, steps: int = 30):
    """SparseAdam: sparse gradients touching a random subset of rows each step."""
    shapes = ((7, 5), (5,), (33,))
    ours, theirs = make_params(dtype, shapes), make_params(dtype, shapes)
    our_opt = getattr(shardoptim, name)(ours, **_kwargs(name, index))
    their_opt = INFOS[name].optim_cls(theirs, **_kwargs(name, index))
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for a, b in zip(ours, theirs):
            rows = torch.rand(b.shape[0], generator=gen) < 0.6
            grad = synthetic_grad(b, gen) * rows.reshape(-1, *([1] * (b.dim() - 1)))
            a.grad, b.grad = grad.to_sparse(), grad.to_sparse()
        our_opt.step()
        their_opt.step()
    return ours, theirs, our_opt, their_opt


@pytest.mark.parametrize("name,index,implementation,dtype", list(_parity_cases()))
def test_optim_db_input_matches_torch(name, index, implementation, dtype):
    info = INFOS[name]
    if info.step_requires_closure:
        ours, theirs, our_opt, their_opt = _run_with_closure(name, index, dtype)
    elif info.only_supports_sparse_grads:
        ours, theirs, our_opt, their_opt = _run_sparse(name, index, dtype)
    else:
        ours, theirs, our_opt, their_opt = _run_elementwise(name, index, implementation, dtype)
    assert_same_trajectory(ours, theirs, dtype)
    if "foreach" in info.supported_impls:
        assert_same_state(our_opt.state_dict(), their_opt.state_dict())
    else:  # LBFGS's lists and floats, SparseAdam's int step: compared as torch keeps them
        _assert_same_nested(our_opt.state_dict(), their_opt.state_dict(), "state_dict")


# --------------------------------------------------------------------------------------------------
# Errors over optim_error_inputs_func
# --------------------------------------------------------------------------------------------------


def _error_inputs(name: str) -> list[ErrorOptimizerInput]:
    """Fresh inputs on every call: ours and torch's must not share the parameters they are given."""
    return INFOS[name].optim_error_inputs_func(device=DEVICE, dtype=torch.float32)


def _error_cases():
    for name, info in INFOS.items():
        if info.optim_error_inputs_func is None:
            continue
        for index, error_input in enumerate(_error_inputs(name)):
            yield pytest.param(name, index, id=f"{name}-{index}-{_slug(error_input.optimizer_error_input.desc)}")


def _fail(cls: type, error_input: ErrorOptimizerInput):
    """What torch's ``test_errors`` does with an error input; returns the raised exception or None (a warning)."""
    optim_input = error_input.optimizer_error_input
    expected = error_input.error_type
    if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        trigger = lambda: cls(optim_input.params, **optim_input.kwargs)  # noqa: E731
    else:
        optimizer = cls(optim_input.params, **optim_input.kwargs)  # must construct; the step fails
        trigger = optimizer.step
    if issubclass(expected, Warning):
        with pytest.warns(expected, match=error_input.error_regex):
            trigger()
        return None
    with pytest.raises(expected, match=error_input.error_regex) as raised:
        trigger()
    return raised.value


@pytest.mark.parametrize("name,index", list(_error_cases()))
def test_optim_db_error_input_fails_as_torch(name, index):
    theirs = _fail(INFOS[name].optim_cls, _error_inputs(name)[index])  # torch itself, as its table says
    ours = _fail(getattr(shardoptim, name), _error_inputs(name)[index])
    assert type(ours) is type(theirs)
