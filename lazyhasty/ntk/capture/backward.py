"""The backward passes of a block: batched vector-Jacobian products (:func:`batched_vjp`, chunked by
``limits`` ``vjp_chunk_elements``) and gradients through a parametrization (:func:`through_parametrization`).
"""
from __future__ import annotations


import torch
from torch import nn

from .. import tuning





def batched_vjp(outputs: tuple, inputs: list, grads: tuple, extra: int = 0) -> torch.Tensor:
    """``[R, sum(numel(input)) + extra]``: the vector-Jacobian products of ``outputs`` for the ``R`` rows of
    ``grads``, each input's flattened in ``inputs`` order (one batched backward; one backward per row where an
    op has no batching rule), then ``extra`` columns left for the caller. Unused inputs get zeros. The chunks'
    results are written into that one buffer: no concatenation over chunks, then over parameters (two copies
    of the whole ``[R, P]`` before; 25% of a cosine MLP's trace kernel)."""
    R = grads[0].shape[0]
    sizes = [t.numel() for t in inputs]
    flat = grads[0].new_empty(R, sum(sizes) + extra)
    per_row = sum(g[0].numel() for g in grads) + sum(sizes)
    chunk = max(1, min(R, tuning.current().vjp_chunk_elements // max(1, per_row)))

    def put(rows: slice, got) -> None:
        off = 0
        for g, n in zip(got, sizes):
            dst = flat[rows, off: off + n]
            dst.zero_() if g is None else dst.copy_(g.reshape(dst.shape))
            off += n

    try:
        # rows in cache-sized chunks: each op of the batched backward then streams from cache, not memory
        for s in range(0, R, chunk):
            put(slice(s, s + chunk), torch.autograd.grad(
                outputs, inputs, tuple(g[s:s + chunk] for g in grads), is_grads_batched=True, allow_unused=True,
                retain_graph=True))
    except RuntimeError:
        for r in range(R):
            put(slice(r, r + 1), torch.autograd.grad(outputs, inputs, tuple(g[r] for g in grads), retain_graph=True,
                                                     allow_unused=True))
    return flat


def split_rows(flat: torch.Tensor, like: list) -> list[torch.Tensor]:
    """Views ``[R, *t.shape]`` of :func:`batched_vjp`'s columns, one per tensor of ``like``."""
    out, off = [], 0
    for t in like:
        out.append(flat[:, off: off + t.numel()].view(flat.shape[0], *t.shape))
        off += t.numel()
    return out


@torch.enable_grad()
def through_parametrization(m: nn.Module, grads: torch.Tensor) -> list[torch.Tensor]:
    """Gradients ``[R, *weight.shape]`` with respect to a parametrized module's effective weight, mapped to
    its parametrization's originals: ``[R, *original.shape]`` each, by one batched vector-Jacobian product
    of ``weight(originals)`` (exact: the map does not depend on the example)."""
    return split_rows(parametrized_flat(m, grads), list(m.parametrizations.weight.parameters()))


@torch.enable_grad()
def parametrized_flat(m: nn.Module, grads: torch.Tensor, extra: int = 0) -> torch.Tensor:
    """:func:`through_parametrization` as one ``[R, numel(originals) + extra]`` buffer."""
    # m.weight: recomputed from the originals
    return batched_vjp((m.weight,), list(m.parametrizations.weight.parameters()), (grads,), extra)
