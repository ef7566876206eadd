"""Triton NTK kernels (interpreter on CPU) against torch twins, on sizes that do not divide the tiles."""
import copy

import pytest
import torch

from lazyhasty import _backend
from lazyhasty.metrics import ntk_alignment, ntk_gram
from lazyhasty.ntk.forms import twins as twin

from conftest import TRITON_DEVICES
from ntk_zoo import ZOO

pytestmark = pytest.mark.parametrize("device", TRITON_DEVICES)


def _interp() -> bool:
    return _backend.triton_interpreted()


@pytest.mark.parametrize("M,N,Pt,P0,outputs", [(1, 1, 1, 1, 1), (33, 7, 45, 70, 1), (40, 40, 33, 31, 1),
                                                (9, 5, 12, 6, 3)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_alignment_partials(M, N, Pt, P0, outputs, symmetric, device):
    from lazyhasty.ntk.forms.triton_kernels import alignment_partials

    g = torch.Generator().manual_seed(M + N)
    ft_i, f0_i = torch.randn(M, Pt, generator=g), torch.randn(M, P0, generator=g)
    if symmetric:
        ft_j, f0_j = ft_i, f0_i
    else:
        ft_j, f0_j = torch.randn(N, Pt, generator=g), torch.randn(N, P0, generator=g)
    want = twin.alignment_partials(ft_i, ft_j, f0_i, f0_j, symmetric, outputs)
    ft_i, ft_j, f0_i, f0_j = (t.to(device) for t in (ft_i, ft_j, f0_i, f0_j))
    got = alignment_partials(ft_i, ft_j, f0_i, f0_j, symmetric, _interp(), outputs)
    assert got.dtype == torch.float64
    assert torch.allclose(got.cpu(), want, rtol=1e-5)


@pytest.mark.parametrize("M,N,P,outputs", [(1, 1, 1, 1), (33, 7, 45, 1), (40, 40, 70, 1), (7, 7, 36, 4), (5, 3, 20, 2)])
def test_gram(M, N, P, outputs, device):
    from lazyhasty.ntk.forms.triton_kernels import gram

    x = torch.randn(M, P, device=device)
    y = x if M == N else torch.randn(N, P, device=device)
    want = twin.gram(x, y, M == N, outputs).float()
    assert torch.allclose(gram(x, y, M == N, _interp(), outputs), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("b_i,b_j,k,S,din,dout", [(1, 1, 1, 1, 1, 1), (5, 3, 2, 3, 7, 5), (9, 9, 1, 2, 33, 4)])
def test_ghost_gram(b_i, b_j, k, S, din, dout, device):
    from lazyhasty.ntk.forms.triton_kernels import ghost_gram

    g = torch.Generator().manual_seed(S)
    a_i, g_i = torch.randn(b_i, S, din, generator=g), torch.randn(b_i, k, S, dout, generator=g)
    sym = b_i == b_j
    a_j, g_j = (a_i, g_i) if sym else (torch.randn(b_j, S, din, generator=g), torch.randn(b_j, k, S, dout, generator=g))
    want = twin.ghost_gram(a_i, a_j, g_i, g_j, sym).float()
    a_i, a_j, g_i, g_j = (t.to(device) for t in (a_i, a_j, g_i, g_j))
    got = ghost_gram(a_i, a_j, g_i, g_j, sym, _interp())
    assert torch.allclose(got.cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["mlp_paper", "cnn_strided", "shared_linear"])
@pytest.mark.parametrize("kernel", ["full", "trace"])
def test_engine_with_triton_backend_matches_torch(name, kernel, device):
    torch.manual_seed(0)
    m, x = ZOO[name]()
    m, x = m.to(device), x.to(device)
    want = ntk_gram(m, x, kernel=kernel, backend="torch")
    for impl in ("layerwise", "jacobian"):
        for bs in (4, None):  # tiles; one block (for the trace: one output at a time)
            got = ntk_gram(m, x, kernel=kernel, backend="triton", block_size=bs, implementation=impl)
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    m1 = copy.deepcopy(m)
    with torch.no_grad():
        for p in m1.parameters():
            p.mul_(1.2)
    a_torch = ntk_alignment(m1, x, m, kernel=kernel, backend="torch", block_size=3)
    for impl in ("layerwise", "jacobian"):
        a_triton = ntk_alignment(m1, x, m, kernel=kernel, backend="triton", block_size=3, implementation=impl)
        assert a_triton == pytest.approx(a_torch, rel=1e-5)


def test_float64_never_runs_the_float32_triton_kernels(device):
    from lazyhasty import reference as R

    torch.manual_seed(0)
    m, x = ZOO["cnn_strided"]()
    m, x = m.double().to(device), x.double().to(device)
    want = R.ntk_gram(m, [x], kernel="trace")
    for bs in (2, None):
        got = ntk_gram(m, x, kernel="trace", backend="triton", block_size=bs)
        assert float((got - want).norm() / want.norm()) <= 1e-12


def test_torch_twins_are_the_math(device):
    """The twins themselves against the definitions, on float64 inputs (no Triton needed)."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 12, generator=g, dtype=torch.float64), torch.randn(4, 12, generator=g, dtype=torch.float64)
    assert torch.allclose(twin.gram(x, y, False, 3), x @ y.T)
    a_i, g_i = torch.randn(3, 2, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 2, 5, generator=g, dtype=torch.float64)
    # ghost form = the Gram of the materialized per-example gradients sum_s g[s] a[s]^T
    Fm = torch.einsum("iasd,isc->iadc", g_i, a_i).reshape(6, -1)
    assert torch.allclose(twin.ghost_gram(a_i, a_i, g_i, g_i, True), Fm @ Fm.T)
    parts = twin.alignment_partials(x, y, 2 * x, 2 * y)  # K0 = 4 Kt
    s2 = (x @ y.T).pow(2).sum()
    assert torch.allclose(parts, torch.stack([4 * s2, s2, 16 * s2]))


@pytest.mark.parametrize("M,N,P,outputs", [(33, 7, 45, 1), (7, 7, 36, 4)])
def test_gram_under_tf32_request(M, N, P, outputs, device):
    """Inside a tf32=True call the Triton Gram takes tl.dot's default precision (TF32 on a GPU that has it,
    exact in the interpreter): within TF32's error of the torch twin (unit roundoff 2^-11 per input)."""
    from lazyhasty._precision import tf32_enabled, tf32_requested
    from lazyhasty.ntk.forms.triton_kernels import gram

    x = torch.randn(M, P, device=device)
    y = x if M == N else torch.randn(N, P, device=device)
    want = twin.gram(x, y, M == N, outputs).float()
    with tf32_requested(True):
        assert tf32_enabled()
        got = gram(x, y, M == N, _interp(), outputs)
    assert not tf32_enabled()
    scale = (x.norm(dim=1)[:, None] * y.norm(dim=1)[None, :]).cpu()
    assert ((got.cpu() - want.cpu()).abs() <= 2e-3 * scale + 1e-5).all()
