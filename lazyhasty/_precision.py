"""The one tf32 guard: fp32 stays fp32 on GPUs that could silently use tf32, unless a call asks for TF32.

:func:`exact_fp32` is for everything that must be exact (the engine's layer checks, the reference, the metrics).
:func:`product_precision` is for an NTK call's own products, backward passes and convolutions: exact fp32
too, unless the call was made with ``tf32=True`` (:func:`tf32_requested`, set by ``ntk_gram`` /
``ntk_alignment``), where cuBLAS / cuDNN may use TF32 tensor cores (10 of fp32's 23 mantissa bits, unit
roundoff 2^-11 ~ 4.9e-4) and the Triton kernels' ``tl.dot`` take ``input_precision="tf32"``. The flags are
torch's process-wide ``torch.backends.cuda.matmul.allow_tf32`` / ``torch.backends.cudnn.allow_tf32``; both are
put back as they were when the block ends. On the CPU and for float64 / 16-bit dtypes nothing changes.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

_TF32 = contextvars.ContextVar("lazyhasty_tf32", default=False)


@contextlib.contextmanager
def _fp32_flags(tf32: bool):
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def exact_fp32(when: bool = True):
    """No silent tf32: fp32 GEMMs and convolutions in full fp32 precision on GPUs that could use tf32.
    ``when=False``: nothing changes (a check still to run decides, e.g. ``exact_fp32(not verified)``)."""
    return _fp32_flags(False) if when else contextlib.nullcontext()


def product_precision():
    """An NTK call's products and passes: TF32 where the call asked for it (``tf32=True``), else exact fp32."""
    return _fp32_flags(_TF32.get())


def tf32_enabled() -> bool:
    """Whether the NTK call in progress asked for TF32 (the Triton kernels' ``input_precision``)."""
    return _TF32.get()


@contextlib.contextmanager
def tf32_requested(enabled: bool):
    """The body of an NTK call made with ``tf32=enabled`` (a bool: anything else is an error)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"tf32 must be True or False, got {enabled!r}")
    token = _TF32.set(enabled)
    try:
        yield
    finally:
        _TF32.reset(token)
