"""TensorList runs Tensor code over many tensors with the same results as a per-tensor loop."""

import torch

from shardoptim.core import TensorList


def _math(p, g, m):
    m.mul_(0.9).add_(g, alpha=0.1)
    denom = (m * m).sqrt().add_(1e-3)
    p.addcdiv_(m, denom, value=-0.5)
    p.sub_(1.0 - (g.abs() / 2.0))
    return (-p).sign() + p.clamp(-0.1, 0.1)


def test_same_results_as_per_tensor_loop():
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), ()]
    ps = [torch.randn(s, generator=gen) for s in shapes]
    gs = [torch.randn(s, generator=gen) for s in shapes]
    ms = [torch.randn(s, generator=gen) for s in shapes]
    loop = [_math(p.clone(), g, m.clone()) for p, g, m in zip(ps, gs, ms)]
    p_list, m_list = TensorList(p.clone() for p in ps), TensorList(m.clone() for m in ms)
    batched = _math(p_list, TensorList(gs), m_list)
    assert len(batched) == len(loop)
    for a, b in zip(batched, loop):
        torch.testing.assert_close(a, b)


def test_in_place_methods_return_the_list_itself():
    tl = TensorList([torch.ones(2), torch.ones(3)])
    assert tl.mul_(2.0) is tl and tl.clamp_(0, 1) is tl
