"""Capability flags and the one dispatch rule every lazyhasty op uses.

The backends:

- `cuda`: kernels in `lazyhasty._cuda` (CUDA tensors; built when nvcc was found at install time);
- `triton`: Triton kernels (CUDA tensors; CPU tensors only under `TRITON_INTERPRET=1`, for tests);
- `cpp`: OpenMP kernels in `lazyhasty._C` (CPU tensors);
- `torch`: plain torch, any device: always available, the slowest.

The rule ([`select`][lazyhasty._backend.select]): an explicit `backend=` argument, else the `LAZYHASTY_BACKEND`
environment variable, else the fastest backend available for the tensor's device (CUDA: cuda > triton > torch;
CPU: cpp > torch). A request that cannot run on that device raises
[`BackendUnavailable`][lazyhasty._backend.BackendUnavailable].
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("torch", "cpp", "cuda", "triton")


class BackendUnavailable(RuntimeError):
    """A backend was requested that cannot run here (not built, not installed, or the wrong device).

    Raised by [`select`][lazyhasty._backend.select] and so by every op given such a `backend=`; a subclass of
    `RuntimeError`.
    """


def _try_import(name: str):
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # noqa: BLE001 - any failure means "not available", reported once below
        return None, exc


_C, _C_error = _try_import("lazyhasty._C")
_cuda, _cuda_error = _try_import("lazyhasty._cuda")
has_cpp: bool = _C is not None
has_cuda_ext: bool = _cuda is not None
try:
    import triton  # noqa: F401

    has_triton: bool = True
except Exception:  # noqa: BLE001
    has_triton = False


def cuda_available() -> bool:
    """Whether torch sees a usable CUDA device (checked at call time, never at import).

    Returns:
        `torch.cuda.is_available()`.
    """
    return torch.cuda.is_available()


def triton_interpreted() -> bool:
    """Whether Triton kernels run in its CPU interpreter.

    Returns:
        True when the environment variable `TRITON_INTERPRET` is set to anything but `""` or `"0"`.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _warn_missing_once() -> None:
    missing = []
    if not has_cpp:
        missing.append(f"lazyhasty._C (CPU kernels): {_C_error}")
    if not has_cuda_ext and os.environ.get("LAZYHASTY_CUDA", "AUTO").upper() != "OFF" and cuda_available():
        missing.append(f"lazyhasty._cuda (CUDA kernels): {_cuda_error}")
    if missing:
        warnings.warn(
            "lazyhasty: compiled backend(s) missing, falling back to slower ones: " + "; ".join(missing)
            + ". Reinstall with `pip install .` where a C++ compiler (and nvcc for CUDA) is present.",
            RuntimeWarning,
            stacklevel=3,
        )


_warn_missing_once()


def available(device: torch.device | str) -> list[str]:
    """Backends that can run on tensors of `device`, fastest first.

    Args:
        device: a `torch.device` or its name (`"cpu"`, `"cuda"`, `"cuda:1"`, ...).

    Returns:
        Backend names, e.g. `["cpp", "torch"]` on a CPU with the compiled extension; `"torch"` is always last.

    Example:
        >>> available("cpu")[-1]
        'torch'
    """
    device = torch.device(device)
    if device.type == "cuda":
        out = ["cuda"] if has_cuda_ext else []
        if has_triton:
            out.append("triton")
        return out + ["torch"]
    if device.type == "cpu":
        out = ["cpp"] if has_cpp else []
        if has_triton and triton_interpreted():
            out.append("triton")
        return out + ["torch"]
    return ["torch"]


def _why_not(backend: str, device: torch.device) -> str:
    if backend == "cpp":
        if not has_cpp:
            return f"lazyhasty._C failed to import ({_C_error})"
        return f"it runs on CPU tensors only, got a tensor on {device}"
    if backend == "cuda":
        if not has_cuda_ext:
            return f"lazyhasty._cuda is not built or failed to import ({_cuda_error})"
        return f"it runs on CUDA tensors only, got a tensor on {device}"
    if backend == "triton":
        if not has_triton:
            return "triton is not installed (pip install 'lazyhasty[triton]')"
        if device.type == "cpu":
            return "Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before importing lazyhasty"
        return f"it does not run on {device.type} tensors"
    return "unknown reason"


def select(device: torch.device | str, backend: str | None = None) -> str:
    """The backend an op runs on for tensors on `device`.

    Args:
        device: a `torch.device` or its name.
        backend: `"cuda"`, `"triton"`, `"cpp"` or `"torch"` to force one; `None` or `"auto"`: the environment
            variable `LAZYHASTY_BACKEND` if set, else the fastest of [`available`][lazyhasty._backend.available].

    Returns:
        The backend's name.

    Raises:
        ValueError: `backend` is not one of the four names (or `"auto"`).
        BackendUnavailable: the requested backend cannot run on `device` here (not built, not installed,
            or the wrong device); the message says which and why.

    Example:
        >>> select("cpu") in ("cpp", "torch")        # 'cpp' when lazyhasty._C is built
        True
        >>> select("cpu", backend="torch")
        'torch'
    """
    device = torch.device(device)
    requested = backend if backend not in (None, "auto") else os.environ.get("LAZYHASTY_BACKEND") or None
    avail = available(device)
    if requested in (None, "auto"):
        return avail[0]
    requested = requested.lower()
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; choose one of {BACKENDS} (or 'auto')")
    if requested not in avail:
        source = "backend=" if backend not in (None, "auto") else "LAZYHASTY_BACKEND="
        raise BackendUnavailable(f"{source}{requested!r} cannot run here: {_why_not(requested, device)}")
    return requested


def summary() -> dict:
    """What this installation can do, for bug reports and benchmark records (`lazyhasty info` prints it).

    Returns:
        A dict: `has_cpp`, `cpp_openmp`, `has_cuda_ext`, `cuda_ext_architectures`, `cuda_ext_runtime`,
        `cuda_available`, `has_triton`, `triton_interpreted`, `torch` (its version) and `cpu_heap_retained`
        (whether NTK calls keep freed CPU buffers in the heap, and why not).
    """
    return {
        "has_cpp": has_cpp,
        "cpp_openmp": bool(getattr(_C, "openmp", False)),
        "has_cuda_ext": has_cuda_ext,
        "cuda_ext_architectures": getattr(_cuda, "architectures", None),
        "cuda_ext_runtime": getattr(_cuda, "cuda_runtime_version", None),
        "cuda_available": cuda_available(),
        "has_triton": has_triton,
        "triton_interpreted": triton_interpreted(),
        "torch": torch.__version__,
        "cpu_heap_retained": _malloc_status(),
    }


def _malloc_status() -> str:
    from . import _malloc  # whether NTK calls keep freed CPU buffers mapped (glibc), and why not

    return _malloc.status()
