"""pack_signs / sign_mismatch on every backend against reference.py (awkward sizes, dtypes, strides)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyhasty import _backend
from lazyhasty import reference as R
from lazyhasty.ops import pack_signs, sign_mismatch
from lazyhasty.ops.signs import _pack_signs_op, _sign_mismatch_op

from conftest import CPU_BACKENDS, CUDA_BACKENDS

SHAPES = [(1, 1), (1, 31), (1, 1007), (513, 1), (513, 31), (513, 1007), (7, 32), (3, 64), (2, 33)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def activations(n, u, dtype=torch.float32, device="cpu"):
    x = torch.randn(n, u)
    x[x.abs() < 0.2] = 0.0          # exact zeros are "off"
    x[(x.abs() > 0.2) & (x.abs() < 0.25)] = -0.0   # so is -0.0
    x[x > 2.5] = float("inf")
    x[x < -2.5] = float("-inf")
    return x.to(device=device, dtype=dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pack_matches_reference(backend, shape):
    x = activations(*shape)
    assert torch.equal(pack_signs(x, backend=backend), R.pack_signs(x))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_mismatch_matches_reference(backend, shape):
    x, y = activations(*shape), activations(*shape)
    bits = R.pack_signs(y)
    got = sign_mismatch(x, bits, backend=backend)
    assert got.dtype == torch.int64
    assert torch.equal(got, R.sign_mismatch(x, bits))
    assert torch.equal(sign_mismatch(y, bits, backend=backend), torch.zeros(shape[0], dtype=torch.int64))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_float_dtypes(backend, dtype):
    x, y = activations(37, 100, dtype), activations(37, 100, dtype)
    assert torch.equal(pack_signs(x, backend=backend), R.pack_signs(x))
    assert torch.equal(sign_mismatch(x, R.pack_signs(y), backend=backend), R.sign_mismatch(x, R.pack_signs(y)))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_inputs(backend):
    base = activations(80, 130)
    for x in (base.T, base[::3, 1::2], base[:, :77]):
        assert not x.is_contiguous()
        assert torch.equal(pack_signs(x, backend=backend), R.pack_signs(x))
        bits = R.pack_signs(torch.randn(x.shape))
        assert torch.equal(sign_mismatch(x, bits, backend=backend), R.sign_mismatch(x, bits))
    # strided reference words too (a row slice of a wider array keeps a row stride > words)
    wide = R.pack_signs(activations(80, 200))[:, : (130 + 31) // 32]
    assert torch.equal(sign_mismatch(base, wide, backend=backend), R.sign_mismatch(base, wide))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_rows(backend):
    x = torch.empty(0, 40)
    assert pack_signs(x, backend=backend).shape == (0, 2)
    assert sign_mismatch(x, torch.empty(0, 2, dtype=torch.int32), backend=backend).shape == (0,)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_cuda_paths_match_reference(backend, shape):
    for dtype in DTYPES:
        x, y = activations(*shape, dtype=dtype, device="cuda"), activations(*shape, dtype=dtype, device="cuda")
        assert torch.equal(pack_signs(x, backend=backend).cpu(), R.pack_signs(x.cpu()))
        bits = R.pack_signs(y).cuda()
        assert torch.equal(sign_mismatch(x, bits, backend=backend).cpu(), R.sign_mismatch(x.cpu(), bits.cpu()))
        xt = x.T  # strided
        assert torch.equal(pack_signs(xt, backend=backend).cpu(), R.pack_signs(xt.cpu()))


def test_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        pack_signs(torch.randn(3))
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        pack_signs(torch.ones(2, 3, dtype=torch.int32))
    x = torch.randn(4, 40)
    with pytest.raises(ValueError, match=r"shape \(4, 2\)"):
        sign_mismatch(x, torch.zeros(4, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="int32"):
        sign_mismatch(x, torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="tensor"):
        pack_signs([[1.0]])


@pytest.mark.skipif(not _backend.has_cpp, reason="lazyhasty._C not built")
def test_custom_ops_pass_opcheck():
    x = activations(9, 45)
    torch.library.opcheck(_pack_signs_op, (x, "cpp"))
    torch.library.opcheck(_sign_mismatch_op, (x, R.pack_signs(x), "cpp"))


@pytest.mark.skipif(not _backend.has_cpp, reason="lazyhasty._C not built")
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), u=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_cpp_property(n, u, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, u, generator=g)
    y = torch.randn(n, u, generator=g)
    assert torch.equal(pack_signs(x, backend="cpp"), R.pack_signs(x))
    bits = R.pack_signs(y)
    assert torch.equal(sign_mismatch(x, bits, backend="cpp"), R.sign_mismatch(x, bits))
