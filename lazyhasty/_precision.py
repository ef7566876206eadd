"""The one tf32 guard: fp32 stays fp32 on GPUs that could silently use tf32."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def exact_fp32():
    """No silent tf32: fp32 GEMMs and convolutions in full fp32 precision on GPUs that could use tf32."""
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
