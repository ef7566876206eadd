"""Large CPU buffers without page faults: glibc's malloc thresholds raised while lazyhasty computes.

Why. glibc serves an allocation above its mmap threshold (adaptive, never above 32 MiB) by a fresh ``mmap``
and unmaps it on ``free``: every later allocation of that size faults in each of its pages again (~0.4 ms per
MiB here). An NTK on the CPU runs ``k`` backward passes whose activation gradients are tens of MiB each
(issue 12's plain CNN, n = 256: ``[256, 32, 32, 32]`` float32 is 32 MiB + the header), so the faults, not
the arithmetic, bound them: its trace kernel took 1.36 s with glibc's defaults and 1.05 s with the thresholds
raised (same run, 2-core CPU; torch.func's own time on it falls 3.17 s -> 1.36 s the same way when the whole
process runs with ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set — see the README's CPU table).

What. :func:`retained_heap` (a decorator and context manager; re-entrant, thread-safe) sets
``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to :data:`RETAIN_BYTES` on entry, so freed buffers stay in the
heap and are reused, and on the outermost exit sets them to :data:`CEILING_MMAP_BYTES` /
:data:`CEILING_TRIM_BYTES` — the values glibc's adaptive thresholds settle on once a large buffer was freed
(glibc cannot be put back into adaptive mode), so code running between lazyhasty's calls sees glibc as usual.
What a call freed stays in the heap for the next call, as torch's CUDA caching allocator keeps GPU memory:
the process's resident memory stays near the call's peak (the plain CNN above: 740 MB vs 370 MB) until
:func:`release` (``malloc_trim(0)``, ~35 ms there) gives it back. Returning it after every call instead would
cost each call its first backward pass's faults again (measured: 1.12 s -> 1.20 s per call there).

Left alone (:func:`status` says why) where the allocator is not glibc's or is preloaded (jemalloc, tcmalloc,
mimalloc), where the user set glibc's malloc tunables (``MALLOC_*_`` variables, ``GLIBC_TUNABLES`` with
``glibc.malloc``), or with ``LAZYHASTY_MALLOC=0``. GPU tensors are not affected (torch's caching allocator).

Example::

    >>> from lazyhasty import _malloc
    >>> with _malloc.retained_heap():      # what ntk_gram / ntk_alignment do around their work
    ...     pass
    >>> _malloc.status()                   # e.g. 'on (glibc 2.36)'
    >>> _malloc.release()                  # the heap's free pages back to the system
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading

RETAIN_BYTES = 1 << 30  # thresholds during a call: buffers up to 1 GiB are kept and reused
CEILING_MMAP_BYTES = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
CEILING_TRIM_BYTES = 64 << 20  # glibc sets the trim threshold to twice the mmap threshold when it adapts
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)

_lock = threading.Lock()
_depth = 0


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _load() -> tuple[object, str]:
    """(glibc handle or None, why) — decided once per process."""
    if os.environ.get("LAZYHASTY_MALLOC", "1").strip().lower() in ("0", "off", "false", "no"):
        return None, "off (LAZYHASTY_MALLOC=0)"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return None, f"off (a preloaded allocator: LD_PRELOAD={preload})"
    user = sorted(k for k in os.environ if k.startswith("MALLOC_") and k.endswith("_"))
    if user or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return None, f"off (the user's malloc settings: {', '.join(user) or 'GLIBC_TUNABLES'})"
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
        version.restype = ctypes.c_char_p
        libc.mallopt, libc.malloc_trim, libc.mallinfo2  # noqa: B018 (all three must exist: glibc >= 2.33)
    except (OSError, AttributeError):
        return None, "off (not glibc >= 2.33)"
    libc.mallinfo2.restype = _Mallinfo2
    return libc, f"on (glibc {version().decode()})"


_LIBC, _STATUS = _load()


def status() -> str:
    """Whether :func:`retained_heap` changes anything in this process, and why not if it does not."""
    return _STATUS


def _enter() -> None:
    global _depth
    with _lock:
        _depth += 1
        if _depth == 1:
            _LIBC.mallopt(_M_MMAP_THRESHOLD, RETAIN_BYTES)
            _LIBC.mallopt(_M_TRIM_THRESHOLD, RETAIN_BYTES)


def _exit() -> None:
    global _depth
    with _lock:
        _depth -= 1
        if _depth == 0:
            _LIBC.mallopt(_M_MMAP_THRESHOLD, CEILING_MMAP_BYTES)
            _LIBC.mallopt(_M_TRIM_THRESHOLD, CEILING_TRIM_BYTES)


class _RetainedHeap:
    def __enter__(self):
        if _LIBC is not None:
            _enter()
        return self

    def __exit__(self, *exc):
        if _LIBC is not None:
            _exit()
        return False

    def __call__(self, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with self:
                return fn(*args, **kwargs)
        return wrapper


def retained_heap() -> _RetainedHeap:
    """Context manager (or decorator: ``@retained_heap()``) keeping freed CPU buffers mapped for its duration."""
    return _RetainedHeap()


def release() -> None:
    """Give the CPU memory that lazyhasty's calls left free in the heap back to the system (``malloc_trim(0)``;
    nothing when off)."""
    if _LIBC is not None:
        with _lock:
            _LIBC.malloc_trim(0)


def heap_state() -> dict:
    """glibc's view of the heap (bytes): ``in_use``, ``free`` (kept for reuse), ``mmapped``; {} when off."""
    if _LIBC is None:
        return {}
    info = _LIBC.mallinfo2()
    return {"in_use": info.uordblks, "free": info.fordblks, "mmapped": info.hblkhd}
