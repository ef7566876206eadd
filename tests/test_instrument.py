"""The tangent kernel as an instrument: captured reference, cross kernels, predictions, spectra (issue 14)."""
import copy

import pytest
import torch
from torch import nn

from lazyhasty import reference as R
from lazyhasty.metrics import LinearityProbe, NTKReference, ntk_alignment, ntk_gram


def _pair(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m0 = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).to(dtype)
    m = copy.deepcopy(m0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m0, m, torch.randn(13, 2, 6, 6, dtype=dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("kernel", ["trace", "full"])
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("block_size", [None, 5])
def test_ntk_reference_equals_ntk_alignment(dtype, tol, kernel, centered, block_size):
    m0, m, x = _pair(dtype)
    ref = NTKReference.capture(m0, x, kernel=kernel, centered=centered, block_size=block_size)
    assert ref.stored and ref.nbytes > 0
    want = ntk_alignment(m, x, m0, kernel=kernel, centered=centered, block_size=block_size)
    assert abs(ref.alignment(m) - want) <= tol
    assert ref.alignment(m0) == pytest.approx(1.0, abs=tol)
    lean = NTKReference.capture(m0, x, kernel=kernel, centered=centered, block_size=block_size, max_bytes=0)
    assert not lean.stored and abs(lean.alignment(m) - want) <= tol


def test_ntk_reference_of_a_frozen_init_and_the_probe():
    m0, m, x = _pair()
    frozen = copy.deepcopy(m0).requires_grad_(False)  # as AlphaScaled's f0
    names = {n for n, _ in m.named_parameters()}
    ref = NTKReference.capture(frozen, x, kernel="trace", trainable=names)
    assert ref.alignment(m) == pytest.approx(ntk_alignment(m, x, frozen, kernel="trace"), abs=1e-12)
    probe = LinearityProbe.capture(frozen, x, ntk="trace", trainable=names)
    got = probe.measure(m)
    assert got["ntk_alignment"] == pytest.approx(ntk_alignment(m, x, frozen, kernel="trace"), abs=1e-12)
    with pytest.raises(ValueError, match="trace' or 'full"):
        NTKReference.capture(m0, x, kernel="diagonal")
    m.requires_grad_(False)
    m[0].weight.requires_grad_(True)
    with pytest.raises(ValueError, match="trainable parameters differ"):
        NTKReference.capture(m0, x).alignment(m)


@pytest.mark.parametrize("implementation", ["auto", "jacobian", "naive"])
@pytest.mark.parametrize("kernel", ["full", "trace"])
@pytest.mark.parametrize("block_size", [None, 4])
def test_cross_kernel_against_explicit_jacobians(implementation, kernel, block_size):
    m0, _, x = _pair()
    x2 = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    K = ntk_gram(m0, x, loader2=x2, kernel=kernel, implementation=implementation, block_size=block_size)
    want = R.ntk_cross(m0, [x], [x2], kernel=kernel)
    assert K.shape == want.shape
    assert float((K - want).abs().max()) <= 1e-12 * float(want.abs().max())
    # the same examples on both sides: the Gram
    assert torch.allclose(ntk_gram(m0, x, loader2=x, kernel=kernel, block_size=block_size),
                          ntk_gram(m0, x, kernel=kernel), atol=1e-12)
    with pytest.raises(ValueError, match="no diagonal"):
        ntk_gram(m0, x, loader2=x2, kernel="diagonal", implementation=implementation)
    with pytest.raises(ValueError, match="differ in shape"):
        ntk_gram(m0, x, loader2=torch.randn(3, 2, 7, 7, dtype=torch.float64))
