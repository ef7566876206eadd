"""Peak memory of one call: host RSS high-water mark (Linux) or CUDA allocator peak."""
import ctypes
import gc

import torch

# glibc keeps freed blocks and raises its mmap threshold dynamically, so RSS would hide later peaks.
# While measuring, a fixed low mmap threshold returns every large buffer to the OS on free, so RSS tracks
# live memory; afterwards the thresholds go back up (near glibc's own dynamic maxima) so that timings
# are not charged a page fault for every large allocation.
try:
    _libc = ctypes.CDLL("libc.so.6")
except OSError:
    _libc = None
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _malloc_for_measuring(on: bool) -> None:
    if _libc is None:
        return
    _libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024 if on else 32 * 2**20)
    _libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024 if on else 64 * 2**20)
    if on:
        _libc.malloc_trim(0)  # give free heap pages back, so that reusing them shows up in RSS


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_bytes(fn, device) -> int:
    """Bytes above the memory in use before ``fn()`` at its peak (host RSS or CUDA allocations)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    _malloc_for_measuring(True)
    try:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = _status("VmRSS")
        fn()
        return _status("VmHWM") - before
    finally:
        _malloc_for_measuring(False)


def pedantic_with_peak(benchmark, fn, device, **pedantic_kwargs):
    """``benchmark.pedantic(fn, ...)`` with ``extra_info["peak_mem_bytes"]`` measured over those same calls
    on CUDA (the allocator's peak above what was allocated before); on the CPU one extra call measures it
    (``peak_bytes``). The GPU cases take tens of seconds a call: measuring the peak in a call of its own
    doubled the 10,000-example ResNet18 case."""
    if torch.device(device).type != "cuda":
        benchmark.extra_info["peak_mem_bytes"] = peak_bytes(fn, device)
        return benchmark.pedantic(fn, **pedantic_kwargs)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = benchmark.pedantic(fn, **pedantic_kwargs)
    torch.cuda.synchronize()
    benchmark.extra_info["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - before
    return out
