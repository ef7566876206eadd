"""Centred alignments stay exact when the centred kernel is small against the uncentred one (issue 11.1).

The reference is exact: rational arithmetic (fractions) for small kernels, and numpy's extended
precision (64-bit significand) centring of the very same float values otherwise. Kernels dominated by
a constant or a rank-one part (a large bias, inputs clustered around one point) are where one-pass
centring ``sum K K0 - (2/n) sum r r0 + S S0 / n^2`` loses every digit.
"""
import copy
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazyhasty import reference as R
from lazyhasty.metrics import (LinearityProbe, kernel_alignment, ntk_alignment, ntk_gram,
                               representation_alignment)
from lazyhasty._exact import AlignmentSums, CentredMoments, exact_dot, exact_sum

LD = np.longdouble
pytestmark = pytest.mark.skipif(np.finfo(LD).eps > 1e-18, reason="needs x86 extended precision for the reference")


def _ld_center(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        return a - a.mean(0, keepdims=True) - a.mean(1, keepdims=True) + a.mean()
    return a - a.mean(0, keepdims=True) - a.mean(2, keepdims=True) + a.mean((0, 2), keepdims=True)


def exact_alignment(K1: torch.Tensor, K2: torch.Tensor, centered: bool) -> float:
    """KA of the given entries, centred in extended precision (error ~1e-19 of |K| per entry)."""
    a, b = (np.asarray(K.detach().double().cpu().numpy(), dtype=LD) for K in (K1, K2))
    # symmetric parts: a GEMM's K is symmetric only up to rounding (which centring would magnify)
    a, b = ((m + (m.T if m.ndim == 2 else m.transpose(2, 3, 0, 1))) / 2 for m in (a, b))
    if centered:
        a, b = _ld_center(a), _ld_center(b)
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def exact_feature_alignment(phi: torch.Tensor, phi0: torch.Tensor, centered: bool) -> float:
    a, b = (np.asarray(p.detach().double().cpu().numpy(), dtype=LD) for p in (phi, phi0))
    if centered:
        a, b = a - a.mean(0), b - b.mean(0)
    ka, kb = a @ a.T, b @ b.T
    return float((ka * kb).sum() / np.sqrt((ka * ka).sum() * (kb * kb).sum()))


def fraction_alignment(K1: torch.Tensor, K2: torch.Tensor, centered: bool) -> float:
    """Exact rational KA of two [n, n] kernels (slow: small n only)."""
    def rat(K):
        return [[Fraction(float(v)) for v in row] for row in K.double().tolist()]

    def center(M):
        n = len(M)
        r = [sum(row) / n for row in M]
        tot = sum(r) / n
        return [[M[i][j] - r[i] - r[j] + tot for j in range(n)] for i in range(n)]

    A, B = rat(K1), rat(K2)
    A, B = ([[(M[i][j] + M[j][i]) / 2 for j in range(len(M))] for i in range(len(M))] for M in (A, B))
    if centered:
        A, B = center(A), center(B)
    ab = sum(x * y for ra, rb in zip(A, B) for x, y in zip(ra, rb))
    aa = sum(x * x for r in A for x in r)
    bb = sum(x * x for r in B for x in r)
    return float(ab) / (float(aa) * float(bb)) ** 0.5  # exact sums, one rounding each


def fraction_feature_alignment(phi: torch.Tensor, phi0: torch.Tensor, centered: bool) -> float:
    """Exact rational KA of the Gram matrices of two small feature sets."""
    def rat(p):
        rows = [[Fraction(float(v)) for v in r] for r in p.double().tolist()]
        if centered:
            n = len(rows)
            mean = [sum(c) / n for c in zip(*rows)]
            rows = [[v - mu for v, mu in zip(r, mean)] for r in rows]
        return [[sum(x * y for x, y in zip(r1, r2)) for r2 in rows] for r1 in rows]

    A, B = rat(phi), rat(phi0)
    ab = sum(x * y for ra, rb in zip(A, B) for x, y in zip(ra, rb))
    aa = sum(x * x for r in A for x in r)
    bb = sum(x * x for r in B for x in r)
    return float(ab) / (float(aa) * float(bb)) ** 0.5


def dominated_kernels(n: int, dtype, ratio: float, seed: int = 0):
    """Two PSD kernels c 11^T + u 1^T + 1 u^T + G with |H K H| / |K| ~ ratio (G small, PSD)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        phi = torch.randn(n, 6, generator=g, dtype=torch.float64)
        base = torch.randn(6, generator=g, dtype=torch.float64)
        feats = base / ratio ** 0.5 + phi  # shared large component: the kernel is dominated by rank one
        out.append((feats @ feats.T).to(dtype))
    return out


# --- the primitives --------------------------------------------------------------------------------
def test_exact_sum_and_dot_against_fractions():
    g = torch.Generator().manual_seed(1)
    big = torch.randn(500, generator=g, dtype=torch.float64) * 1e16
    x = torch.cat([big, -big, torch.randn(300, generator=g, dtype=torch.float64)])[torch.randperm(1300, generator=g)]
    hi, lo = exact_sum(x)
    want = sum(Fraction(v) for v in x.tolist())
    assert float(hi) + float(lo) == pytest.approx(float(want), rel=1e-15, abs=1e-300)
    assert float(x.sum()) != pytest.approx(float(want), rel=1e-3)  # plain float64 loses it
    y = torch.randn(1300, generator=g, dtype=torch.float64)
    hi, lo = exact_dot(x, y)
    want = sum(Fraction(a) * Fraction(b) for a, b in zip(x.tolist(), y.tolist()))
    assert float(hi) + float(lo) == pytest.approx(float(want), rel=1e-14)
    # along a dimension
    X = x.reshape(13, 100)
    hi, lo = exact_sum(X, 1)
    for i in range(13):
        assert float(hi[i]) + float(lo[i]) == pytest.approx(float(sum(Fraction(v) for v in X[i].tolist())),
                                                            rel=1e-15, abs=1e-300)


# --- kernel_alignment ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ratio", [1e-2, 1e-4])
def test_kernel_alignment_centred_dominated_kernels_are_exact(dtype, ratio):
    K1, K2 = dominated_kernels(12, dtype, ratio)
    want = fraction_alignment(K1, K2, centered=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # float32 at 1e-4: the accuracy warning
        got = kernel_alignment(K1, K2, centered=True)
    assert abs(got - want) <= 1e-13
    assert -1.0 <= got <= 1.0
    assert kernel_alignment(K1, K2) == pytest.approx(fraction_alignment(K1, K2, centered=False), abs=1e-14)


def test_kernel_alignment_float32_warns_when_rounding_limits_the_centred_value():
    K1, K2 = dominated_kernels(12, torch.float32, 1e-4)
    with pytest.warns(RuntimeWarning, match="float64"):
        kernel_alignment(K1, K2, centered=True)


def test_kernel_alignment_full_kernel_centred_exact():
    g = torch.Generator().manual_seed(3)
    J = torch.randn(9, 3, 20, generator=g, dtype=torch.float64) + 1e3 * torch.randn(1, 3, 20, generator=g,
                                                                                      dtype=torch.float64)
    J0 = J + 0.3 * torch.randn(9, 3, 20, generator=g, dtype=torch.float64)
    K, K0 = (torch.einsum("iap,jbp->iajb", j, j) for j in (J, J0))
    assert kernel_alignment(K, K0, centered=True) == pytest.approx(exact_alignment(K, K0, True), abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_centred_alignment_of_duplicated_rows_is_undefined_not_a_number(dtype):
    phi = torch.randn(1, 7, dtype=dtype).repeat(10, 1)
    K = phi @ phi.T
    with pytest.raises(ValueError, match="undefined"):
        kernel_alignment(K, K * 2, centered=True)
    one = torch.randn(1, 7, dtype=dtype)
    with pytest.raises(ValueError, match="single example"):
        kernel_alignment(one @ one.T, one @ one.T, centered=True)


def test_kernel_alignment_refuses_asymmetric_input():
    A = torch.randn(5, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="not symmetric"):
        kernel_alignment(A, A @ A.T)


# --- representation alignment and the probe -------------------------------------------------------
def _biased_mlp(dtype, bias=1000.0, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                            torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)).to(dtype)
    with torch.no_grad():
        m[0].bias += bias
    return m


def _perturbed(m, scale=0.05, seed=1):
    out = copy.deepcopy(m)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.mul_(1 + scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return out


def _features(m, x):
    return R._features(m, "6", "input", x, torch.device("cpu"))  # the model's own values, as float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["bias1000", "clustered1e-4", "clustered1e-2"])
def test_representation_alignment_centred_exact(dtype, case):
    g = torch.Generator().manual_seed(5)
    if case == "bias1000":
        ref = _biased_mlp(dtype)
        x = (torch.rand(64, 2, generator=g) * 2 - 1).to(dtype)
    else:
        ref = _biased_mlp(dtype, bias=0.0)
        noise = float(case.removeprefix("clustered"))
        x = (torch.tensor([0.3, -0.7]) + noise * torch.randn(64, 2, generator=g)).to(dtype)
    model = _perturbed(ref)
    want = exact_feature_alignment(_features(model, x), _features(ref, x), centered=True)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for bs in (64, 7):  # one batch, and batches that do not divide n
        loader = list(x.split(bs))
        assert abs(representation_alignment(model, loader, ref, centered=True) - want) <= tol
    probe = LinearityProbe.capture(ref, x, batch_size=13)
    assert abs(probe.measure(model, centered=True)["repr_alignment"] - want) <= tol
    unc = exact_feature_alignment(_features(model, x), _features(ref, x), centered=False)
    assert abs(representation_alignment(model, x, ref) - unc) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_representation_alignment_of_identical_examples_is_undefined(dtype):
    ref = _biased_mlp(dtype, bias=0.0)
    model = _perturbed(ref)
    x = torch.randn(1, 2, dtype=dtype).repeat(16, 1)
    with pytest.raises(ValueError, match="undefined"):
        representation_alignment(model, x, ref, centered=True)
    with pytest.raises(ValueError, match="single example"):
        representation_alignment(model, x[:1], ref, centered=True)
    assert 0.0 <= representation_alignment(model, x, ref) <= 1.0  # uncentred: defined


# --- the NTK: every path ---------------------------------------------------------------------------
def _clustered(dtype, noise, n=40, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.tensor([0.3, -0.7]) + noise * torch.randn(n, 2, generator=g)).to(dtype)


@pytest.mark.parametrize("kernel,block_size", [("trace", None), ("trace", 16), ("full", 16), ("full", None)])
@pytest.mark.parametrize("case", ["bias1000", "clustered1e-2", "clustered1e-4"])
def test_ntk_alignment_centred_float64_exact_on_every_path(kernel, block_size, case):
    dtype = torch.float64
    if case == "bias1000":
        ref = _biased_mlp(dtype)
        x = (torch.rand(40, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(dtype)
    else:
        ref = _biased_mlp(dtype, bias=0.0)
        x = _clustered(dtype, float(case.removeprefix("clustered")))
    model = _perturbed(ref)
    # the same tiles the alignment forms (same block size: the same GEMMs)
    K = ntk_gram(model, x, kernel=kernel, block_size=block_size)
    K0 = ntk_gram(ref, x, kernel=kernel, block_size=block_size)
    want = exact_alignment(K, K0, centered=True)
    got = ntk_alignment(model, x, ref, kernel=kernel, centered=True, block_size=block_size)
    assert abs(got - want) <= 1e-12
    assert 0.0 <= got <= 1.0


def test_ntk_alignment_centred_float32_clustered():
    ref = _biased_mlp(torch.float32, bias=0.0)
    model = _perturbed(ref)
    x = _clustered(torch.float32, 1e-2)
    K, K0 = ntk_gram(model, x, kernel="trace"), ntk_gram(ref, x, kernel="trace")
    want = exact_alignment(K, K0, centered=True)
    with pytest.warns(RuntimeWarning, match="limit the centred alignment"):  # |HKH| / |K| ~ 4e-4 here
        assert abs(ntk_alignment(model, x, ref, kernel="trace", centered=True) - want) <= 1e-6
    # and the float32 answer is close to the float64 model's (the kernel's own rounding is small here)
    want64 = ntk_alignment(model.double(), x.double(), ref.double(), kernel="trace", centered=True)
    assert abs(want - want64) <= 1e-3


def test_ntk_alignment_centred_float32_unresolvable_is_an_error_naming_float64():
    ref = _biased_mlp(torch.float32)  # |HKH| / |K| ~ 1e-7: below float32's resolution
    model = _perturbed(ref)
    x = torch.rand(40, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with pytest.raises(ValueError, match="float64"):
        ntk_alignment(model, x, ref, kernel="trace", centered=True)
    got = ntk_alignment(model, x, ref, kernel="trace", centered=True, dtype=torch.float64)
    assert 0.9 < got <= 1.0


def test_ntk_alignment_centred_single_example_is_undefined():
    ref = _biased_mlp(torch.float64, bias=0.0)
    with pytest.raises(ValueError, match="single example"):
        ntk_alignment(_perturbed(ref), torch.randn(1, 2, dtype=torch.float64), ref, kernel="trace", centered=True)


# --- properties ------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 14), d=st.integers(1, 6), shift=st.sampled_from([0.0, 1.0, 1e3, 1e6]),
       spread=st.sampled_from([1.0, 1e-2, 1e-4, 0.0]), dup=st.integers(1, 3),
       f32=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_property_centred_alignment_exact_or_undefined(n, d, shift, spread, dup, f32, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, d, generator=g, dtype=torch.float64) * shift
    phi = base + spread * torch.randn(n, d, generator=g, dtype=torch.float64)
    phi = phi.repeat_interleave(dup, 0)  # duplicated rows
    phi0 = phi + 0.1 * spread * torch.randn(phi.shape, generator=g, dtype=torch.float64)
    dtype = torch.float32 if f32 else torch.float64
    K1, K2 = (phi @ phi.T).to(dtype), (phi0 @ phi0.T).to(dtype)
    for centered in (False, True):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                got = kernel_alignment(K1, K2, centered=centered)
        except ValueError as exc:
            assert "undefined" in str(exc)
            continue
        assert -1.0 <= got <= 1.0
        # double-double sums: ~1e-32 of |K|_F^2, i.e. 1e-32 / rel^2 of the centred products (rel =
        # |HKH| / |K|); below rel ~ 1e-9 the kernel's own values (eps / rel) are the tighter limit anyway
        rel2 = min(float(torch.linalg.vector_norm(R._center(K.double())) ** 2 / torch.linalg.vector_norm(
            K.double()) ** 2) for K in (K1, K2)) if centered else 1.0
        assert abs(got - fraction_alignment(K1, K2, centered)) <= max(1e-12, 1e-30 / max(rel2, 1e-300))
    # the streamed moments: any batching, same value as the exact alignment of these features
    feats = phi.to(dtype), phi0.to(dtype)
    for centered in (False, True):
        m = CentredMoments(centered, None, lambda a, b: None)
        for a, b in zip(feats[0].split(max(1, n // 2)), feats[1].split(max(1, n // 2))):
            m.add(a, b)
        try:
            got = m.alignment()
        except ValueError as exc:
            assert "undefined" in str(exc)
            continue
        assert 0.0 <= got <= 1.0
        want = fraction_feature_alignment(*feats, centered)
        assert abs(got - want) <= (1e-6 if f32 else 1e-12)


def test_alignment_sums_tiles_equal_one_block():
    K1, K2 = dominated_kernels(30, torch.float64, 1e-4, seed=4)
    one = AlignmentSums(30, 1, "trace", True, "cpu")
    one.add(K1, K2, slice(0, 30), slice(0, 30), False)
    tiled = AlignmentSums(30, 1, "trace", True, "cpu")
    edges = [0, 7, 19, 30]
    for I in range(3):
        for J in range(I, 3):
            si, sj = slice(edges[I], edges[I + 1]), slice(edges[J], edges[J + 1])
            tiled.add(K1[si, sj], K2[si, sj], si, sj, I != J)
    want = exact_alignment(K1, K2, True)
    assert abs(one.alignment() - want) <= 1e-13
    assert abs(tiled.alignment() - want) <= 1e-13


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bias=st.sampled_from([0.0, 10.0, 1000.0]), noise=st.sampled_from([1.0, 1e-2, 1e-4]),
       dup=st.integers(1, 2), kernel=st.sampled_from(["trace", "full"]), block=st.sampled_from([None, 7]),
       seed=st.integers(0, 1000))
def test_property_ntk_alignment_centred_exact_or_undefined(bias, noise, dup, kernel, block, seed):
    ref = _biased_mlp(torch.float64, bias=bias, seed=seed % 7)
    model = _perturbed(ref, seed=seed)
    x = _clustered(torch.float64, noise, n=12, seed=seed).repeat_interleave(dup, 0)
    K = ntk_gram(model, x, kernel=kernel, block_size=block)
    K0 = ntk_gram(ref, x, kernel=kernel, block_size=block)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            got = ntk_alignment(model, x, ref, kernel=kernel, centered=True, block_size=block)
    except ValueError as exc:
        assert "undefined" in str(exc)
        return
    assert 0.0 <= got <= 1.0
    rel2 = min(float(torch.linalg.vector_norm(R._center(k)) ** 2 / torch.linalg.vector_norm(k) ** 2) for k in (K, K0))
    assert abs(got - exact_alignment(K, K0, True)) <= max(1e-12, 1e-30 / rel2)
