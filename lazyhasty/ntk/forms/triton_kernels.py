"""Triton kernels of the NTK engine (GPU; CPU only in the interpreter, for tests).

``alignment_partials``: fused ``K_t = F_t[I] F_t[J]^T`` and ``K_0 = F_0[I] F_0[J]^T`` tiles reduced in
registers to partial sums of ``K_t * K_0``, ``K_t^2``, ``K_0^2`` (never written to memory). For a
diagonal block (I = J) only tiles with ``pid_m <= pid_n`` run, off-diagonal ones weighted twice.

``ghost_gram``: ``K[r, c] = sum_{s,t} (a[r // k, s] . a[c // k, t]) (g[r, s] . g[c, t])`` for the ghost
form of a linear layer (rows r = (example, output)); symmetric when both sides are the same block.

Both use ``input_precision="ieee"`` for fp32 (GPUs would otherwise use tf32 in ``tl.dot``), TF32 only inside an
NTK call made with ``tf32=True`` (:func:`lazyhasty._precision.tf32_enabled`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._precision import tf32_enabled


@triton.jit
def _gemm_tile(x_ptr, y_ptr, rows, cols, M, N, P, sxm, sym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, P, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * sxm + ks[None, :],
                    mask=(rows[:, None] < M) & (ks[None, :] < P), other=0.0).to(tl.float32)
        y = tl.load(y_ptr + cols[:, None].to(tl.int64) * sym + ks[None, :],
                    mask=(cols[:, None] < N) & (ks[None, :] < P), other=0.0).to(tl.float32)
        if IEEE:
            acc += tl.dot(x, tl.trans(y), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(y))
    return acc


@triton.jit
def _gemm_tile_outputs(x_ptr, y_ptr, rows, cols, M, N, P, K_OUT, sxm, sym, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    # rows of K_OUT segments of P columns (one per output): one dot product per output, then their sum
    # (a single fp32 dot over all outputs and parameters loses accuracy in the trace kernel)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for a in range(0, K_OUT):
        acc += _gemm_tile(x_ptr + a * P, y_ptr + a * P, rows, cols, M, N, P, sxm, sym, BLOCK_M, BLOCK_N,
                          BLOCK_K, IEEE)
    return acc


@triton.jit
def alignment_partials_kernel(ti_ptr, tj_ptr, zi_ptr, zj_ptr, out_ptr, M, N, Pt, P0, K_OUT, sti, stj, szi, szj,
                              SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_n = tl.num_programs(1)
    pid = pid_m * n_n + pid_n
    if SYMMETRIC and pid_m > pid_n:
        tl.store(out_ptr + pid * 3 + tl.arange(0, 4), tl.zeros((4,), tl.float64), mask=tl.arange(0, 4) < 3)
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kt = _gemm_tile_outputs(ti_ptr, tj_ptr, rows, cols, M, N, Pt, K_OUT, sti, stj, BLOCK_M, BLOCK_N, BLOCK_K,
                            IEEE)
    k0 = _gemm_tile_outputs(zi_ptr, zj_ptr, rows, cols, M, N, P0, K_OUT, szi, szj, BLOCK_M, BLOCK_N, BLOCK_K,
                            IEEE)
    w = 1.0
    if SYMMETRIC and pid_m < pid_n:
        w = 2.0
    # products of fp32 tile entries are exact in fp64; their sums too up to ~1e-16 (no fp32 accumulation)
    kt = kt.to(tl.float64)
    k0 = k0.to(tl.float64)
    c = tl.sum(tl.sum(kt * k0, axis=1), axis=0) * w
    a = tl.sum(tl.sum(kt * kt, axis=1), axis=0) * w
    b = tl.sum(tl.sum(k0 * k0, axis=1), axis=0) * w
    idx = tl.arange(0, 4)
    vals = tl.where(idx == 0, c, tl.where(idx == 1, a, b))
    tl.store(out_ptr + pid * 3 + idx, vals, mask=idx < 3)


@triton.jit
def ghost_gram_kernel(ai_ptr, aj_ptr, gi_ptr, gj_ptr, out_ptr, M, N, BI, BJ, S, K_OUT, DIN, DOUT,
                      sai, saj, sgi, sgj, so, SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if SYMMETRIC and pid_m > pid_n:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (example, output) rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ex_r = rows // K_OUT
    ex_c = cols // K_OUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(0, S):
        for t in range(0, S):
            # a rows of the examples at positions s and t; g rows of (example, output) at s and t
            aa = _gemm_tile(ai_ptr + s * DIN, aj_ptr + t * DIN, ex_r, ex_c, BI, BJ, DIN, sai, saj,
                            BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
            gg = _gemm_tile(gi_ptr + s * DOUT, gj_ptr + t * DOUT, rows, cols, M, N, DOUT, sgi, sgj,
                            BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
            acc += aa * gg
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * so + cols[None, :], acc, mask=mask)
    if SYMMETRIC:
        tl.store(out_ptr + cols[None, :].to(tl.int64) * so + rows[:, None], acc, mask=mask)


@triton.jit
def gram_kernel(x_ptr, y_ptr, out_ptr, M, N, P, K_OUT, sx, sy, so, SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if SYMMETRIC and pid_m > pid_n:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _gemm_tile_outputs(x_ptr, y_ptr, rows, cols, M, N, P, K_OUT, sx, sy, BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * so + cols[None, :], acc, mask=mask)
    if SYMMETRIC:
        tl.store(out_ptr + cols[None, :].to(tl.int64) * so + rows[:, None], acc, mask=mask)


def _blocks(interpreted: bool):
    return (32, 32, 32) if interpreted else (64, 64, 32)


def alignment_partials(ft_i, ft_j, f0_i, f0_j, symmetric: bool, interpreted: bool,
                       outputs: int = 1) -> torch.Tensor:
    """``[3]`` float64: sums of ``Kt*K0``, ``Kt^2``, ``K0^2`` over the tile ``(F_I F_J^T)`` of both models.

    ft_*: ``[M|N, Pt]``, f0_*: ``[M|N, P0]`` row-major (last stride 1), fp32 (or fp16/bf16, upcast).
    ``outputs``: rows are that many equal segments (the trace kernel's per-output gradients), each
    reduced by its own dot product before they are summed.
    """
    M, N = ft_i.shape[0], ft_j.shape[0]
    bm, bn, bk = _blocks(interpreted)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    out = torch.empty(grid[0] * grid[1] * 3, dtype=torch.float64, device=ft_i.device)
    alignment_partials_kernel[grid](ft_i, ft_j, f0_i, f0_j, out, M, N, ft_i.shape[1] // outputs,
                                    f0_i.shape[1] // outputs, outputs, ft_i.stride(0), ft_j.stride(0),
                                    f0_i.stride(0), f0_j.stride(0),
                                    SYMMETRIC=symmetric, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                    IEEE=ft_i.dtype == torch.float32 and not tf32_enabled())
    return out.view(-1, 3).sum(0)


def ghost_gram(a_i, a_j, g_i, g_j, symmetric: bool, interpreted: bool) -> torch.Tensor:
    """``[bI k, bJ k]`` ghost-form Gram of one linear layer (one group).

    a_*: ``[b, S, d_in]``; g_*: ``[b, k, S, d_out]`` (rows (example, output)); contiguous.
    """
    bI, k, S, dout = g_i.shape
    bJ = g_j.shape[0]
    din = a_i.shape[2]
    M, N = bI * k, bJ * k
    out = torch.empty((M, N), dtype=torch.float32, device=g_i.device)
    bm, bn, bk = _blocks(interpreted)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    ghost_gram_kernel[grid](a_i, a_j, g_i, g_j, out, M, N, bI, bJ, S, k, din, dout,
                            S * din, S * din, S * dout, S * dout, N,
                            SYMMETRIC=symmetric, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                            IEEE=g_i.dtype == torch.float32 and not tf32_enabled())
    return out


def gram(x: torch.Tensor, y: torch.Tensor, symmetric: bool, interpreted: bool, outputs: int = 1) -> torch.Tensor:
    """``x @ y.T`` (fp32 accumulation, IEEE fp32); with ``symmetric`` (x is y) only i <= j tiles run.
    ``outputs``: rows are that many equal segments, one dot product each (see :func:`alignment_partials`)."""
    M, N, P = x.shape[0], y.shape[0], x.shape[1] // outputs
    out = torch.empty((M, N), dtype=torch.float32, device=x.device)
    bm, bn, bk = _blocks(interpreted)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    gram_kernel[grid](x, y, out, M, N, P, outputs, x.stride(0), y.stride(0), N, SYMMETRIC=symmetric,
                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IEEE=x.dtype == torch.float32 and not tf32_enabled())
    return out
