"""Peak memory of one call: host RSS high-water mark (Linux) or CUDA allocator peak."""
import ctypes
import gc

import torch

# glibc keeps freed blocks and raises its mmap threshold dynamically, so RSS would hide later peaks.
# A fixed low mmap threshold returns every large buffer to the OS on free: RSS then tracks live memory.
try:
    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallopt(-3, 64 * 1024)   # M_MMAP_THRESHOLD
    _libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
except OSError:
    pass


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
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before
