"""LBFGS against torch.optim.LBFGS: both line searches, option settings, dtypes, state dicts, errors."""

from __future__ import annotations

import copy

import pytest
import torch

import shardoptim
from tests.oracle import SHAPES, assert_same_trajectory, make_params, tolerance

OPTIONS = {
    "fixed-step": dict(lr=0.05),
    "fixed-step-short-history": dict(lr=0.1, history_size=3, max_iter=7),
    "fixed-step-loose-tolerances": dict(lr=0.05, tolerance_grad=1e-2, tolerance_change=1e-3),
    "wolfe": dict(line_search_fn="strong_wolfe"),
    "wolfe-short-history": dict(line_search_fn="strong_wolfe", history_size=2, max_iter=10),
    "wolfe-few-evals": dict(line_search_fn="strong_wolfe", max_iter=8, max_eval=5, lr=0.5),
    "wolfe-loose-tolerances": dict(line_search_fn="strong_wolfe", tolerance_grad=1e-3, tolerance_change=1e-4),
    # The settings below reach the line search's other branches: extrapolation from a short first
    # step, the evaluation budget running out mid-search, zooming in from a long one.
    "wolfe-short-steps": dict(line_search_fn="strong_wolfe", lr=0.01),
    "wolfe-tight-budget": dict(line_search_fn="strong_wolfe", lr=1e-3, max_eval=4, max_iter=3),
    "wolfe-long-steps": dict(line_search_fn="strong_wolfe", lr=30.0),
    "wolfe-long-steps-short-history": dict(line_search_fn="strong_wolfe", lr=5.0, history_size=2),
}


class Problem:
    """A least-squares fit of all parameters (as one vector) plus a Rosenbrock valley on a few entries."""

    def __init__(self, numel: int, dtype: torch.dtype, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        real = dtype.to_real() if dtype.is_complex else dtype
        width = 2 * numel if dtype.is_complex else numel
        self.A = torch.randn(width + 20, width, generator=gen, dtype=real) / width**0.5
        self.b = torch.randn(width + 20, generator=gen, dtype=real)

    def loss(self, params) -> torch.Tensor:
        x = torch.cat([(torch.view_as_real(p) if p.is_complex() else p).reshape(-1).to(self.A.dtype) for p in params])
        fit = 0.5 * (self.A @ x - self.b).square().sum()
        valley = 10 * (x[1:6] - x[:5].square()).square().sum() + (1 - x[:5]).square().sum()
        return fit + valley


def _closure(opt, params, problem, *, set_to_none=True):
    def closure():
        opt.zero_grad(set_to_none=set_to_none)
        loss = problem.loss(params)
        loss.backward()
        return loss

    return closure


def run_both(options, *, dtype=torch.float32, shapes=SHAPES, steps=6, make_params_fn=None, set_to_none=True):
    """Step ours and torch's LBFGS on equal parameters; returns parameters, losses and optimizers."""
    make = make_params_fn or (lambda: make_params(dtype, shapes))
    ours, theirs = make(), make()
    problem = Problem(sum(p.numel() for p in ours), ours[0].dtype)
    our_opt, their_opt = shardoptim.LBFGS(ours, **options), torch.optim.LBFGS(theirs, **options)
    our_losses, their_losses = [], []
    for _ in range(steps):
        our_losses.append(our_opt.step(_closure(our_opt, ours, problem, set_to_none=set_to_none)).item())
        their_losses.append(their_opt.step(_closure(their_opt, theirs, problem)).item())
    return ours, theirs, our_losses, their_losses, our_opt, their_opt


def assert_same_state(ours: dict, theirs: dict, dtype: torch.dtype) -> None:
    """Same keys, same kinds of values (int, float, tensor, list of ...) and close values."""
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert type(ours[key]) is type(value), key
        if isinstance(value, list):
            assert len(ours[key]) == len(value), key
            for a, b in zip(ours[key], value):
                assert type(a) is type(b), key
                if isinstance(b, torch.Tensor):
                    torch.testing.assert_close(a, b, **tolerance(dtype), msg=lambda m: f"{key}: {m}")
        elif isinstance(value, torch.Tensor):
            torch.testing.assert_close(ours[key], value, **tolerance(dtype), msg=lambda m: f"{key}: {m}")
        elif isinstance(value, float):
            assert ours[key] == pytest.approx(value, rel=1e-5), key
        else:
            assert ours[key] == value, key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(OPTIONS))
def test_matches_torch(name, dtype):
    ours, theirs, our_losses, their_losses, our_opt, their_opt = run_both(OPTIONS[name], dtype=dtype)
    assert_same_trajectory(ours, theirs, dtype)
    assert our_losses == pytest.approx(their_losses, rel=1e-5)
    assert_same_state(our_opt.state_dict()["state"][0], their_opt.state_dict()["state"][0], dtype)
    assert our_opt.state_dict()["param_groups"] == their_opt.state_dict()["param_groups"]
    assert list(our_opt.state) == [ours[0]], "torch keeps LBFGS's state under the first parameter"


def test_line_search_moves_the_parameters():
    """Guards the parity tests against a problem too easy to tell implementations apart."""
    ours, _, losses, _, opt, _ = run_both(OPTIONS["wolfe"])
    assert losses[-1] < 0.5 * losses[0]
    assert opt.state[ours[0]]["func_evals"] > opt.state[ours[0]]["n_iter"] > 6


@pytest.mark.parametrize("options", ["fixed-step", "wolfe"])
def test_complex_parameters_match_torch(options):
    ours, theirs, _, _, our_opt, their_opt = run_both(OPTIONS[options], dtype=torch.complex64)
    assert_same_trajectory(ours, theirs, torch.complex64)
    assert_same_state(our_opt.state_dict()["state"][0], their_opt.state_dict()["state"][0], torch.complex64)


@pytest.mark.parametrize("options", ["fixed-step", "wolfe"])
def test_mixed_dtypes_match_torch(options):
    """Two flat buckets: the vector is stitched in parameter order and promoted, as torch.cat does."""

    def make():
        params = make_params(torch.float32, [(7, 5), (5,), (33,)])
        params.insert(1, make_params(torch.float64, [(3, 4)], seed=5)[0])
        return params

    ours, theirs, _, _, our_opt, their_opt = run_both(OPTIONS[options], make_params_fn=make)
    assert len(our_opt.buckets) == 2
    assert_same_trajectory(ours, theirs, torch.float32)
    assert our_opt.state[ours[0]]["d"].dtype == torch.float64
    assert_same_state(our_opt.state_dict()["state"][0], their_opt.state_dict()["state"][0], torch.float32)


def test_one_bucket_is_the_parameter_vector_and_gradients_stay_in_it():
    ours, theirs, _, _, opt, _ = run_both(OPTIONS["wolfe"], steps=2, set_to_none=False)
    (bucket,) = opt.buckets
    assert bucket.layout.numel == sum(p.numel() for p in ours), "no alignment gaps"
    start, stop = bucket.flat_grad.data_ptr(), bucket.flat_grad.data_ptr() + bucket.flat_grad.nbytes
    assert all(start <= p.grad.data_ptr() < stop for p in ours)
    assert_same_trajectory(ours, theirs, torch.float32)


def test_unused_and_sparse_gradients_match_torch():
    """A parameter outside the loss has no gradient (zeros, as torch); an embedding's is sparse."""

    def build():
        torch.manual_seed(0)
        embedding = torch.nn.Embedding(10, 3, sparse=True)
        linear, unused = torch.nn.Linear(3, 1), torch.nn.Linear(2, 2)
        return embedding, linear, unused

    x, y = torch.tensor([[1, 4, 4], [7, 0, 2]]), torch.tensor([[0.5], [-1.0]])
    results = []
    for cls in (shardoptim.LBFGS, torch.optim.LBFGS):
        embedding, linear, unused = build()
        params = [*embedding.parameters(), *unused.parameters(), *linear.parameters()]
        opt = cls(params, line_search_fn="strong_wolfe", max_iter=5)

        def closure():
            opt.zero_grad()
            loss = (linear(embedding(x).mean(1)) - y).square().mean()
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure)
        assert embedding.weight.grad.is_sparse, "the user's .grad keeps its layout"
        assert unused.weight.grad is None
        results.append(params)
    assert_same_trajectory(*results, torch.float32)


@pytest.mark.parametrize("options", ["fixed-step", "wolfe-long-steps"])
def test_gradient_missing_at_some_evaluations_counts_as_zero(options):
    """Every third closure call leaves parameter 2 without a gradient; its old one must not linger."""
    results = []
    for cls in (shardoptim.LBFGS, torch.optim.LBFGS):
        params = make_params()
        problem = Problem(sum(p.numel() for p in params), torch.float32)
        opt = cls(params, **OPTIONS[options])
        calls = []

        def closure():
            calls.append(None)
            opt.zero_grad()
            used = [p.detach() if i == 2 and len(calls) % 3 == 0 else p for i, p in enumerate(params)]
            loss = problem.loss(used)
            loss.backward()
            return loss

        for _ in range(4):
            opt.step(closure)
        results.append(params)
    assert_same_trajectory(*results, torch.float32)


def test_tensor_learning_rate():
    ours, theirs, _, _, our_opt, their_opt = run_both(dict(lr=torch.tensor(0.05)))
    assert_same_trajectory(ours, theirs, torch.float32)
    assert_same_state(our_opt.state_dict()["state"][0], their_opt.state_dict()["state"][0], torch.float32)


@pytest.mark.parametrize("direction", ["torch->ours", "ours->torch", "ours->ours"])
@pytest.mark.parametrize("options", ["fixed-step-short-history", "wolfe-short-history"])
def test_state_dict_round_trip_then_continue(options, direction):
    """Three steps in one optimizer, three more in a fresh one loaded from its state dict."""
    make = {"ours": shardoptim.LBFGS, "torch": torch.optim.LBFGS}
    source, target = direction.split("->")
    reference = make_params()
    problem = Problem(sum(p.numel() for p in reference), torch.float32)
    reference_opt = torch.optim.LBFGS(reference, **OPTIONS[options])
    params = make_params()
    opt = make[source](params, **OPTIONS[options])
    for step in range(6):
        if step == 3:
            saved = copy.deepcopy(opt.state_dict())
            params = [torch.nn.Parameter(p.detach().clone()) for p in params]
            opt = make[target](params, **OPTIONS[options])
            opt.load_state_dict(saved)
        opt.step(_closure(opt, params, problem))
        reference_opt.step(_closure(reference_opt, reference, problem))
    assert_same_trajectory(params, reference, torch.float32)
    assert_same_state(opt.state_dict()["state"][0], reference_opt.state_dict()["state"][0], torch.float32)


def test_model_training_matches_torch():
    torch.manual_seed(0)
    ours_model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    torch_model = copy.deepcopy(ours_model)
    x, y = torch.randn(64, 6), torch.randn(64, 1)
    ours = shardoptim.LBFGS(ours_model.parameters(), line_search_fn="strong_wolfe", history_size=10)
    theirs = torch.optim.LBFGS(torch_model.parameters(), line_search_fn="strong_wolfe", history_size=10)
    for _ in range(4):
        losses = []
        for model, opt in ((ours_model, ours), (torch_model, theirs)):

            def closure(model=model, opt=opt):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            losses.append(opt.step(closure))
        torch.testing.assert_close(*losses)
    assert_same_trajectory(list(ours_model.parameters()), list(torch_model.parameters()), torch.float32)


# -- errors -------------------------------------------------------------------------------------


def _raises_like_torch(make, exception):
    with pytest.raises(exception) as theirs:
        make(torch.optim.LBFGS)
    with pytest.raises(exception, match=f"^{theirs.value}$".replace("(", r"\(").replace(")", r"\)")):
        make(shardoptim.LBFGS)


@pytest.mark.parametrize(
    "kwargs", [dict(lr=-1.0), dict(lr=torch.tensor([0.1, 0.2]))], ids=["negative-lr", "two-element-lr"]
)
def test_invalid_hyper_parameters_raise_like_torch(kwargs):
    _raises_like_torch(lambda cls: cls(make_params(), **kwargs), ValueError)


def test_parameter_groups_are_rejected_like_torch():
    _raises_like_torch(lambda cls: cls([{"params": make_params()[:2]}, {"params": make_params()[2:]}]), ValueError)


def test_step_needs_a_closure_like_torch():
    _raises_like_torch(lambda cls: cls(make_params()).step(), TypeError)
    _raises_like_torch(lambda cls: cls(make_params()).step(None), TypeError)


def test_unknown_line_search_raises_like_torch():
    def make(cls):
        params = make_params()
        opt = cls(params, line_search_fn="backtracking")
        opt.step(_closure(opt, params, Problem(sum(p.numel() for p in params), torch.float32)))

    _raises_like_torch(make, RuntimeError)


def test_added_param_group_fails_at_step_like_torch():
    def make(cls):
        params = make_params()
        opt = cls(params[:2])
        opt.add_param_group({"params": params[2:]})
        opt.step(_closure(opt, params, Problem(sum(p.numel() for p in params), torch.float32)))

    _raises_like_torch(make, AssertionError)


def test_invalid_loaded_hyper_parameters_change_nothing():
    _, _, _, _, opt, _ = run_both(OPTIONS["fixed-step"], steps=2)
    before = copy.deepcopy(opt.state_dict())
    saved = copy.deepcopy(before)
    saved["param_groups"][0]["lr"] = -0.5
    with pytest.raises(ValueError, match="Invalid learning rate: -0.5"):
        opt.load_state_dict(saved)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert_same_state(after["state"][0], before["state"][0], torch.float64)
