"""Triton kernels for bit-packed sign patterns (imported only when triton is installed).

A program owns a [BLOCK_N, 32 * BLOCK_W] tile of activations: it reads them through an integer view
(``x > 0`` for IEEE floats is ``int_view > 0``), reshapes to [BLOCK_N, BLOCK_W, 32], and ORs the bits
of each 32-unit group into one word. The mismatch kernel XORs those words with the stored reference
words and popcounts them (SWAR: no libdevice, so the same code runs in the CPU interpreter).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_words(x_ptr, rows, pid_w, n, u, sx0, sx1, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = pid_w * (BLOCK_W * 32) + tl.arange(0, BLOCK_W * 32)
    mask = (rows[:, None] < n) & (cols[None, :] < u)
    offs = rows[:, None].to(tl.int64) * sx0 + cols[None, :].to(tl.int64) * sx1
    v = tl.load(x_ptr + offs, mask=mask, other=0)
    pos = (v > 0).to(tl.uint32)
    pos = tl.reshape(pos, (BLOCK_N, BLOCK_W, 32))
    shifts = tl.arange(0, 32).to(tl.uint32)
    return tl.sum(pos << shifts[None, None, :], axis=2)  # distinct bits: the sum is the OR


@triton.jit
def _popcount32(v):
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return (v * 0x01010101) >> 24


@triton.jit
def pack_signs_kernel(x_ptr, out_ptr, n, u, words, sx0, sx1, so0,
                      BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_w = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w = _tile_words(x_ptr, rows, pid_w, n, u, sx0, sx1, BLOCK_W, BLOCK_N)
    wcols = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = (rows[:, None] < n) & (wcols[None, :] < words)
    offs = rows[:, None].to(tl.int64) * so0 + wcols[None, :]
    tl.store(out_ptr + offs, w.to(tl.int32, bitcast=True), mask=mask)


@triton.jit
def sign_mismatch_kernel(x_ptr, ref_ptr, part_ptr, n, u, words, sx0, sx1, sr0, n_chunks,
                         BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_w = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w = _tile_words(x_ptr, rows, pid_w, n, u, sx0, sx1, BLOCK_W, BLOCK_N)
    wcols = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = (rows[:, None] < n) & (wcols[None, :] < words)
    ref = tl.load(ref_ptr + rows[:, None].to(tl.int64) * sr0 + wcols[None, :], mask=mask, other=0)
    # Bits past u in the last word are ignored (reference words may carry garbage there).
    rem = u - wcols * 32
    valid = tl.where(rem >= 32, 0xFFFFFFFF, (tl.full([BLOCK_W], 1, tl.uint32) << tl.minimum(rem, 31).to(tl.uint32)) - 1)
    diff = _popcount32((w ^ ref.to(tl.uint32, bitcast=True)) & valid.to(tl.uint32)[None, :])
    # Per-(row, chunk) partial sums instead of atomics: deterministic, and summed by torch after.
    partial = tl.sum(diff.to(tl.int32), axis=1)
    tl.store(part_ptr + rows.to(tl.int64) * n_chunks + pid_w, partial, mask=rows < n)


def _blocks(n: int, words: int, interpreted: bool) -> tuple[int, int]:
    if interpreted:  # the interpreter pays per program: few programs with large tiles, no larger than needed
        return min(64, triton.next_power_of_2(n)), min(32, triton.next_power_of_2(words))
    return 32, 4


def launch_pack(xi, out, interpreted: bool):
    n, u = xi.shape
    words = out.shape[1]
    block_n, block_w = _blocks(n, words, interpreted)
    grid = (triton.cdiv(n, block_n), triton.cdiv(words, block_w))
    pack_signs_kernel[grid](xi, out, n, u, words, xi.stride(0), xi.stride(1), out.stride(0),
                            BLOCK_N=block_n, BLOCK_W=block_w)


def launch_mismatch(xi, ref, interpreted: bool):
    import torch

    n, u = xi.shape
    words = ref.shape[1]
    block_n, block_w = _blocks(n, words, interpreted)
    n_chunks = triton.cdiv(words, block_w)
    part = torch.empty((n, n_chunks), dtype=torch.int32, device=xi.device)
    grid = (triton.cdiv(n, block_n), n_chunks)
    sign_mismatch_kernel[grid](xi, ref, part, n, u, words, xi.stride(0), xi.stride(1), ref.stride(0), n_chunks,
                               BLOCK_N=block_n, BLOCK_W=block_w)
    return part.sum(1, dtype=torch.int64)
