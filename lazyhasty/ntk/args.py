"""The arguments of an NTK call: the kernels and implementations, their validation, the engine's backend."""
from __future__ import annotations

import torch

from .. import _backend

KERNELS = ("full", "trace", "diagonal")
IMPLEMENTATIONS = ("auto", "naive", "jacobian", "layerwise")
DEFAULT_CACHE_BYTES = 1 << 30



def ntk_backend(device: torch.device, backend: str | None, dtype: torch.dtype = torch.float32) -> str:
    """The NTK engine's path: ``"triton"`` (CUDA, or CPU in the interpreter) or ``"torch"`` (BLAS/cuBLAS tiles).

    The C++ and CUDA extensions have no NTK kernels, so ``backend="cpp"`` / ``"cuda"`` are errors, not
    silently another path. Default (None / "auto"): torch on every device. Measured on an H100 (the paper's
    ResNet18, float32 without tf32, ``benchmarks/results/README.md``), cuBLAS tiles beat the Triton Gram
    kernels: trace-kernel alignment on 1,000 examples 0.70 vs 1.17 s, the full kernel of 200 examples 0.64
    vs 1.63 s; ``backend="triton"`` still runs them. The Triton kernels accumulate in float32, so float64
    always runs the torch path: it must not lose digits.
    """
    if backend not in (None, "auto", "torch", "triton"):
        raise ValueError(f"backend={backend!r}: the NTK engine has 'torch' and 'triton' paths (or None / 'auto'); "
                         "the C++ and CUDA extensions hold no NTK kernels")
    if dtype == torch.float64:
        return "torch"
    if backend == "triton":
        return _backend.select(device, "triton")  # BackendUnavailable, with the reason, where it cannot run
    return "torch"


def check_args(kernel: str, implementation: str, block_size, max_cache_bytes=0, dtype=None) -> None:
    """Validates the arguments every NTK entry point shares.

    Raises:
        ValueError: a kernel, implementation, block size or cache budget out of its range (named).
        TypeError: a dtype that is not a floating torch.dtype.
    """
    if not isinstance(kernel, str) or kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if block_size is not None and (not isinstance(block_size, int) or isinstance(block_size, bool)
                                   or block_size < 1):
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
    if not isinstance(max_cache_bytes, int) or isinstance(max_cache_bytes, bool) or max_cache_bytes < 0:
        raise ValueError(f"max_cache_bytes must be a non-negative int, got {max_cache_bytes!r}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.float64) or None, got {dtype!r}")
