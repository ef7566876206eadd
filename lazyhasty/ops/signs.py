"""Bit-packed ReLU sign patterns: the hot path of [`sign_similarity`][lazyhasty.metrics.sign_similarity].

Two ops, each on four backends (torch, cpp, cuda, triton; the rule that picks one:
[`select`][lazyhasty._backend.select]):

- `pack_signs(x) -> bits`: `x` `[n, u]` float (fp16 / bf16 / fp32 / fp64, any strides) to `[n, ceil(u / 32)]`
  int32 words, bit `b` of word `w` being `x[:, 32 w + b] > 0`; bits past `u` are zero.
- `sign_mismatch(x, bits) -> counts`: `[n]` int64, the number of units whose sign `x > 0` differs from the
  stored bit: `popcount(pack(x) XOR bits)` per row (bits past `u` ignored), without writing `pack(x)`.

Both are `torch.library.custom_op`s (`lazyhasty::pack_signs`, `lazyhasty::sign_mismatch`) with fake
implementations, so they trace under `torch.compile`.
"""
from __future__ import annotations

import torch

from .. import _backend

_FLOAT_TO_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16,
                 torch.float32: torch.int32, torch.float64: torch.int64}


def sign_words(units: int) -> int:
    """Number of 32-bit words holding `units` sign bits.

    Args:
        units: sign bits per row (`u`).

    Returns:
        `ceil(units / 32)`, the width of [`pack_signs`][lazyhasty.ops.pack_signs]'s output.

    Example:
        >>> sign_words(33)
        2
    """
    return (units + 31) // 32


def _check_x(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [n, units], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_TO_INT:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _check_bits(x: torch.Tensor, bits: torch.Tensor) -> None:
    if not isinstance(bits, torch.Tensor) or bits.dtype != torch.int32:
        raise TypeError(f"bits must be an int32 tensor from pack_signs, got {getattr(bits, 'dtype', type(bits))}")
    expected = (x.shape[0], sign_words(x.shape[1]))
    if tuple(bits.shape) != expected:
        raise ValueError(f"bits must have shape {expected} for x of shape {tuple(x.shape)}, got {tuple(bits.shape)}")
    if bits.device != x.device:
        raise ValueError(f"bits are on {bits.device} but x is on {x.device}")


def _int_view(x: torch.Tensor) -> torch.Tensor:
    # Same-width integer view: for IEEE floats, x > 0 exactly when the signed integer view is > 0.
    return x.view(_FLOAT_TO_INT[x.dtype])


# --- torch backend --------------------------------------------------------------------------------
_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    if device not in _SHIFTS:
        _SHIFTS[device] = torch.arange(32, device=device, dtype=torch.int64)
    return _SHIFTS[device]


def _pack_torch(x: torch.Tensor) -> torch.Tensor:
    n, u = x.shape
    words = sign_words(u)
    pos = torch.nn.functional.pad((x > 0).to(torch.int64), (0, words * 32 - u))
    w = (pos.view(n, words, 32) << _shifts(x.device)).sum(-1)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def _popcount32_torch(v: torch.Tensor) -> torch.Tensor:
    v = v.to(torch.int64) & 0xFFFFFFFF
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return ((v * 0x01010101) & 0xFFFFFFFF) >> 24


def _mismatch_torch(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    diff = _pack_torch(x) ^ bits
    rem = x.shape[1] % 32
    if rem:  # ignore whatever the reference words hold past u
        diff[:, -1] &= (1 << rem) - 1
    return _popcount32_torch(diff).sum(1)


# --- compiled backends ----------------------------------------------------------------------------
def _pack_cpp(x: torch.Tensor, out: torch.Tensor) -> None:
    xi = _int_view(x)
    _backend._C.pack_signs(xi.element_size(), xi.data_ptr(), xi.shape[0], xi.shape[1], xi.stride(0), xi.stride(1),
                           out.data_ptr(), out.stride(0))


def _mismatch_cpp(x: torch.Tensor, bits: torch.Tensor, counts: torch.Tensor) -> None:
    xi = _int_view(x)
    _backend._C.sign_mismatch(xi.element_size(), xi.data_ptr(), xi.shape[0], xi.shape[1], xi.stride(0),
                              xi.stride(1), bits.data_ptr(), bits.stride(0), counts.data_ptr())


def _stream(x: torch.Tensor) -> int:
    return torch.cuda.current_stream(x.device).cuda_stream


def _pack_cuda(x: torch.Tensor, out: torch.Tensor) -> None:
    xi = _int_view(x)
    with torch.cuda.device(x.device):
        _backend._cuda.pack_signs(xi.element_size(), xi.data_ptr(), xi.shape[0], xi.shape[1], xi.stride(0),
                                  xi.stride(1), out.data_ptr(), out.stride(0), _stream(x))


def _mismatch_cuda(x: torch.Tensor, bits: torch.Tensor, counts: torch.Tensor) -> None:
    xi = _int_view(x)
    with torch.cuda.device(x.device):
        _backend._cuda.sign_mismatch(xi.element_size(), xi.data_ptr(), xi.shape[0], xi.shape[1], xi.stride(0),
                                     xi.stride(1), bits.data_ptr(), bits.stride(0), counts.data_ptr(), _stream(x))


# --- custom ops -----------------------------------------------------------------------------------
@torch.library.custom_op("lazyhasty::pack_signs", mutates_args=())
def _pack_signs_op(x: torch.Tensor, backend: str) -> torch.Tensor:
    n, u = x.shape
    if backend == "torch":
        return _pack_torch(x)
    out = torch.empty((n, sign_words(u)), dtype=torch.int32, device=x.device)
    if n == 0 or u == 0:
        return out
    if backend == "cpp":
        _pack_cpp(x, out)
    elif backend == "cuda":
        _pack_cuda(x, out)
    elif backend == "triton":
        from . import _triton_signs

        _triton_signs.launch_pack(_int_view(x), out, _backend.triton_interpreted())
    else:
        raise ValueError(f"unknown backend {backend!r}")
    return out


@_pack_signs_op.register_fake
def _(x, backend):
    return x.new_empty((x.shape[0], sign_words(x.shape[1])), dtype=torch.int32)


@torch.library.custom_op("lazyhasty::sign_mismatch", mutates_args=())
def _sign_mismatch_op(x: torch.Tensor, bits: torch.Tensor, backend: str) -> torch.Tensor:
    n, u = x.shape
    if backend == "torch":
        return _mismatch_torch(x, bits)
    if n == 0 or u == 0:
        return torch.zeros(n, dtype=torch.int64, device=x.device)
    if backend == "triton":
        from . import _triton_signs

        return _triton_signs.launch_mismatch(_int_view(x), bits, _backend.triton_interpreted())
    counts = torch.zeros(n, dtype=torch.int64, device=x.device)
    if backend == "cpp":
        _mismatch_cpp(x, bits, counts)
    elif backend == "cuda":
        _mismatch_cuda(x, bits, counts)
    else:
        raise ValueError(f"unknown backend {backend!r}")
    return counts


@_sign_mismatch_op.register_fake
def _(x, bits, backend):
    return x.new_empty((x.shape[0],), dtype=torch.int64)


# --- public functions -----------------------------------------------------------------------------
def pack_signs(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Pack the signs `x > 0` of `x` `[n, u]` into `[n, ceil(u / 32)]` int32 words.

    Bit `b` of word `w` of row `r` is `x[r, 32 w + b] > 0`; padding bits are zero. NaN is not checked here
    (callers check it once per batch); a NaN with a clear sign bit packs as 1.

    Args:
        x: `[n, u]` float16, bfloat16, float32 or float64, any strides, on any device.
        backend: `"cuda"`, `"triton"`, `"cpp"` or `"torch"` to force one; default: the rule of
            [`select`][lazyhasty._backend.select].

    Returns:
        `[n, ceil(u / 32)]` int32 words on `x`'s device.

    Raises:
        TypeError: `x` is not a float16, bfloat16, float32 or float64 tensor.
        ValueError: `x` is not 2-D.
        BackendUnavailable: the requested backend cannot run on `x`'s device.

    Example:
        >>> pack_signs(torch.tensor([[1.0, -1.0, 0.0, 2.0]]))
        tensor([[9]], dtype=torch.int32)
    """
    _check_x(x)
    return _pack_signs_op(x, _backend.select(x.device, backend))


def sign_mismatch(x: torch.Tensor, bits: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Per-row count of units whose sign `x > 0` differs from the stored `bits`.

    Equals `popcount(pack_signs(x) ^ bits).sum(1)`, without materializing `pack_signs(x)`.

    Args:
        x: `[n, u]` float16, bfloat16, float32 or float64, any strides.
        bits: `[n, ceil(u / 32)]` int32 words from [`pack_signs`][lazyhasty.ops.pack_signs], on `x`'s device.
        backend: as for [`pack_signs`][lazyhasty.ops.pack_signs].

    Returns:
        `[n]` int64 counts.

    Raises:
        TypeError: `x` is not a floating tensor, or `bits` is not int32.
        ValueError: `x` is not 2-D, or `bits` does not have the shape or device that `x` needs.
        BackendUnavailable: the requested backend cannot run on `x`'s device.

    Example:
        >>> x = torch.tensor([[1.0, -1.0, 0.0, 2.0]])
        >>> sign_mismatch(-x, pack_signs(x))
        tensor([3])
    """
    _check_x(x)
    _check_bits(x, bits)
    if bits.stride(-1) != 1 and bits.numel() > 0:
        bits = bits.contiguous()
    return _sign_mismatch_op(x, bits, _backend.select(x.device, backend))
