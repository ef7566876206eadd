"""The backward passes of a block: each output's gradients at the captured tensors (:func:`output_gradient_passes`:
one batched backward or k passes), batched vector-Jacobian products (:func:`batched_vjp`, chunked by ``limits``
``vjp_chunk_elements``) and gradients through a parametrization (:func:`through_parametrization`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import tuning
from ..._precision import exact_fp32
from .check import check_floor, check_scale, grads_close


def output_gradient_passes(out: torch.Tensor, every: list, retain: bool, structure: Callable[[], tuple], seen: dict):
    """``(passes, used)``: ``passes`` yields, for each of ``out``'s ``[b, k]`` columns in turn, the gradients of
    its batch sum with respect to each tensor of ``every`` (zeros where unused), from one batched backward where
    :func:`output_gradients` takes the block, else one backward pass per output (the graph freed after the last
    one unless ``retain``); ``used`` says which, for ``explain()``. The one loop over outputs of the tile path,
    the one-block trace path and the per-example copies. ``structure()``: the model's structure key, and
    ``seen``: its record of checked block shapes (``caches.BATCHED_CHECKED``)."""
    batched, used = output_gradients(out, every, structure, seen)
    return _passes(out, every, retain, batched), used


def _passes(out: torch.Tensor, every: list, retain: bool, batched: list | None):
    k = out.shape[1]
    for a in range(k):
        if batched is not None:
            yield [g[a] for g in batched]
            continue
        gs = torch.autograd.grad(out[:, a].sum(), every, retain_graph=retain or a + 1 < k, allow_unused=True)
        yield [torch.zeros_like(t) if g is None else g for g, t in zip(gs, every)]


def output_gradients(out: torch.Tensor, every: list, structure: Callable[[], tuple], seen: dict):
    """``(grads, used)``: ``grads`` ``[k, *t.shape]`` per tensor of ``every``, the gradients of each of ``out``'s
    ``[b, k]`` columns' batch sums, from one batched backward (autograd's ``is_grads_batched``, a vmap over the
    output axis), where those gradients take at most ``limits`` ``batched_backward_bytes``; None otherwise (the
    caller then runs its k backward passes). Small models are bound by the per-op overheads of k passes, which one
    batched pass pays once. vmap over backward can be silently wrong for some sizes (torch.func's PReLU rule when
    the batch equals the batched axis): once per model structure and block shape (``seen``) the v-weighted sum of
    the k gradients is checked against one plain backward; a shape that fails (or has no batching rule) keeps the
    k passes. The graph is retained (the caller may still need it)."""
    b, k = out.shape
    need = k * sum(t.numel() * t.element_size() for t in every)
    if k < 2 or need > tuning.current().batched_backward_bytes:
        return None, (f"{k} backward passes (block of {b}: "
                      + ("one output)" if k < 2 else
                         f"the k gradients take {need / 2**20:.3g} MiB > limits batched_backward_bytes)"))
    failed = (f"{k} backward passes (block of {b}: the batched backward failed its check or has no batching rule)")
    key = (structure(), tuple(out.shape), out.dtype, tuple(tuple(t.shape) for t in every))
    if seen.get(key) is False:
        return None, failed
    # a block shape's first batched backward is checked, and computed, in exact fp32 (tf32=True calls too)
    with exact_fp32(key not in seen):
        got = _batched_output_gradients(out, every, key, seen)
    return got, (f"one batched backward over the {k} outputs (block of {b})" if got is not None else failed)


def _batched_output_gradients(out: torch.Tensor, every: list, key: tuple, seen: dict) -> list | None:
    """One batched backward over the k outputs (None: no batching rule, or it failed its first check)."""
    b, k = out.shape
    E = torch.eye(k, dtype=out.dtype, device=out.device)[:, None, :].expand(k, b, k)
    try:
        gs = torch.autograd.grad(out, every, E, is_grads_batched=True, retain_graph=True, allow_unused=True)
    except RuntimeError as exc:  # an op without a batching rule for its backward
        if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc):
            raise
        seen[key] = False
        return None
    gs = [t.new_zeros(k, *t.shape) if g is None else g for g, t in zip(gs, every)]
    if key not in seen:
        gen = torch.Generator(device="cpu").manual_seed(2468)
        v = torch.randn(k, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
        ref = torch.autograd.grad((out * v).sum(), every, retain_graph=True, allow_unused=True)
        ref = [(torch.zeros_like(t) if r is None else r) for r, t in zip(ref, every)]
        largest = check_scale(ref)
        ok = all(grads_close(torch.einsum("k,k...->...", v, g).reshape(-1), r.reshape(-1),
                             check_floor([r], largest))
                 for g, r in zip(gs, ref))
        if len(seen) > 64:  # a bounded record (block shapes vary little within a run)
            seen.clear()
        seen[key] = ok
        if not ok:
            return None
    return gs


def replicated_output_gradients(out: torch.Tensor, every: list, reps: int) -> list:
    """Every output's gradients at ``every`` from one backward of a block captured ``reps`` (= k) times over:
    ``out`` ``[k b, k]`` replica-major, replica r's rows weighed by output r (``sum_r f_r(x^(r))``), so
    replica r's gradients are output r's (exact when the examples are independent). Returns per tensor of
    ``every`` (``[k b, ...]``) its ``[b, k, ...]`` gradients (views); the graph is freed."""
    b = out.shape[0] // reps
    idx = torch.arange(reps, device=out.device)
    E = out.new_zeros(reps, b, out.shape[1])
    E[idx, :, idx] = 1  # replica r's rows weigh output r
    gs = torch.autograd.grad(out, every, E.view(reps * b, -1), allow_unused=True)
    return [(torch.zeros_like(t) if g is None else g).view(reps, b, *t.shape[1:]).transpose(0, 1)
            for g, t in zip(gs, every)]


def replication_turn(record: dict | None, cap: int) -> str:
    """Which way the next verified block of one model, shape and thread count takes, from its ``record``
    (``caches.REPLICATED``: ``{"k", "bytes", "batched": [s], "replicated": [s], "first", "never"?}``): ``"batched"``,
    ``"replicated"``, or ``"check"`` (the replicated way's first turn: the caller compares its outputs with the
    block's own first). Two measured calls each way, alternating, the replicated way first (a record begun before
    any block ran, :func:`begin_measurement`, starts there; one begun by a batched block goes on from it), then the
    faster; only while ``k`` times the block's captured ``bytes`` fit ``cap``."""
    if record is None or record.get("never") or record["k"] < 2 or record["k"] * record["bytes"] > cap:
        return "batched"
    batched, replicated = record["batched"], record["replicated"]
    if len(batched) < 2 or len(replicated) < 2:  # measuring: the ways alternate from the record's first
        order = ("replicated", "batched") if record.get("first") == "replicated" else ("batched", "replicated")
        way = order[(len(batched) + len(replicated)) % 2]
        if len(record[way]) >= 2:
            way = order[1] if way == order[0] else order[0]
        return ("check" if not replicated else "replicated") if way == "replicated" else "batched"
    return "replicated" if min(replicated) < min(batched) else "batched"


def begin_measurement(known: dict, key: tuple, k: int, size: int, first: str = "replicated") -> dict:
    """The empty record of one model, block shape and thread count in ``known`` (``caches.REPLICATED``, bounded):
    ``k`` outputs, ``size`` the block's captured bytes (measured, or estimated from the layer check's capture),
    ``first`` the way measured first."""
    if len(known) > 16:  # a bounded record (block shapes vary little within a run)
        known.clear()
    record = known[key] = {"k": k, "bytes": size, "batched": [], "replicated": [], "first": first}
    return record


def note_backward_time(known: dict, key: tuple, way: str, seconds: float, k: int, size: int) -> None:
    """Add one measured block time (``way``: ``"batched"`` / ``"replicated"``) to ``known[key]`` for
    :func:`replication_turn` (at most two each; ``size``: the block's captured bytes)."""
    record = known.get(key)
    if record is None:
        record = begin_measurement(known, key, k, size, first=way)
    if len(record[way]) < 2:
        record[way].append(seconds)


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
