"""Cutting examples into blocks: the default block size, the one-block trace test, the output size, and the
finiteness check of a kernel (shared by every path)."""
from __future__ import annotations

import torch


def default_block_size(n: int, k: int) -> int:
    """About four blocks a side (tiles with i <= j only: ~half the pair work of one n x n tile), at least
    32 examples (GEMM efficiency), at most 1024 and ``8192 / k`` (a [b k, b k] tile stays <= 256 MB)."""
    return int(max(1, min(max(32, -(-n // 4)), 1024, max(1, 8192 // max(1, k)))))


def one_trace_block(fz, x_all: torch.Tensor, block_size: int | None) -> bool:
    """Whether the trace kernel is computed as one block (see :meth:`Featurizer.trace_block_limit`)."""
    n = x_all.shape[0]
    return block_size >= n if block_size is not None else n <= fz.trace_block_limit(x_all)


def output_size(fz, x: torch.Tensor) -> int:
    """``k``: the number of outputs of ``fz``'s model on one example of ``x`` (a forward without grad)."""
    with torch.no_grad():
        return int(fz._call(fz._prepare(x[:1], check=False)).reshape(1, -1).shape[1])


def finite(K: torch.Tensor) -> torch.Tensor:
    """``K`` detached, or a ValueError when it has NaN/inf entries."""
    K = K.detach()  # a kernel, not a node of an autograd graph (that would keep the graph alive)
    # NaN and inf reach the sum (inf - inf is NaN); a finite sum clears every entry, and a sum that overflowed
    # while all entries are finite is told apart by the elementwise check
    if not bool(torch.isfinite(K.sum(dtype=torch.float64))) and not bool(torch.isfinite(K).all()):
        raise ValueError("the tangent kernel has NaN/inf entries (non-finite inputs, parameters or activations)")
    return K
