"""Metrics over a probe set sharded across processes, with ``torch.distributed`` (gloo on CPU, NCCL on GPUs).

Every metric that takes ``process_group=`` follows one contract: each rank passes **its own shard** of the
probe set (what a ``DistributedSampler`` gives; a rank may have none), and every rank gets the value over
the union of the shards, identical on all of them. ``process_group=None`` (the default) is one process,
even when ``torch.distributed`` is initialized: a DDP script does not change meaning silently.

Before any work the ranks compare what defines the call (:func:`agree`): a different metric, kernel, model
structure or dtype on one rank is an error naming the rank and the difference, not a wrong number.
Partial sums travel as float64 (``all_reduce``); shards are put together in rank order.
"""
from __future__ import annotations

import torch
from torch import nn

WORLD = "world"  # process_group="world": the default group


def resolve(process_group):
    """``None`` (one process) or the group to use; a clear error when torch.distributed is not set up."""
    if process_group is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group= needs torch.distributed initialized (dist.init_process_group): "
                         "or pass process_group=None for one process")
    return dist.group.WORLD if isinstance(process_group, str) and process_group == WORLD else process_group


# bytes this process contributed to collectives (tensors: their size; objects: their pickled size), for the
# communication-volume records of benchmarks/scaling_distributed.py
traffic = {"bytes": 0, "collectives": 0}


def _count(nbytes: int) -> None:
    traffic["bytes"] += int(nbytes)
    traffic["collectives"] += 1


def _pickled_size(obj) -> int:
    import pickle

    return len(pickle.dumps(obj))


class CollectiveFailed(RuntimeError):
    """A collective did not complete: another rank raised, died, or did not reach it within the group's timeout."""


def _collective(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except CollectiveFailed:
        raise
    except (RuntimeError, ValueError, ConnectionError) as exc:  # gloo / NCCL errors, closed connections, timeouts
        raise CollectiveFailed(
            f"{what}: the exchange between ranks failed — another rank raised, died or did not reach the same "
            f"call within the process group's timeout (init_process_group(timeout=...)): {exc}") from exc


def rank_and_size(group) -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def _device(group) -> torch.device:
    """Where collective tensors live: CUDA for NCCL, CPU otherwise."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")


def structure(model: nn.Module) -> str:
    """A short fingerprint of a model's structure (module types, parameter names, shapes and dtypes)."""
    import hashlib

    text = "|".join(f"{n}:{type(m).__name__}" for n, m in model.named_modules())
    text += "|" + "|".join(f"{n}:{tuple(p.shape)}:{p.dtype}:{p.requires_grad}" for n, p in model.named_parameters())
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def agree(group, what: str, **facts) -> list[dict]:
    """Every rank's ``facts`` (strings, numbers); an error naming the first rank that differs from rank 0."""
    import torch.distributed as dist

    _, size = rank_and_size(group)
    everyone: list = [None] * size
    _count(_pickled_size(facts))
    _collective(what, dist.all_gather_object, everyone, facts, group=group)
    for r, theirs in enumerate(everyone[1:], start=1):
        diff = [f"{k}: {everyone[0].get(k)!r} on rank 0, {theirs.get(k)!r} on rank {r}"
                for k in sorted(set(facts) | set(theirs)) if theirs.get(k) != everyone[0].get(k)]
        if diff:
            raise ValueError(f"{what}: the ranks were called with different arguments (" + "; ".join(diff) + ")")
    return everyone


def sum_f64(t: torch.Tensor, group) -> torch.Tensor:
    """``t`` summed over the ranks, in float64, returned on ``t``'s device."""
    import torch.distributed as dist

    buf = t.detach().to(_device(group), torch.float64).clone()
    _count(buf.numel() * 8)
    _collective("all_reduce", dist.all_reduce, buf, group=group)
    return buf.to(t.device)


def sum_i64(t: torch.Tensor, group) -> torch.Tensor:
    import torch.distributed as dist

    buf = t.detach().to(_device(group), torch.int64).clone()
    _count(buf.numel() * 8)
    _collective("all_reduce", dist.all_reduce, buf, group=group)
    return buf.to(t.device)


def gather_objects(obj, group) -> list:
    """Every rank's ``obj`` (picklable; tensors are moved to CPU first), in rank order, on every rank."""
    import torch.distributed as dist

    _, size = rank_and_size(group)
    out: list = [None] * size
    _count(_pickled_size(obj))
    _collective("all_gather", dist.all_gather_object, out, obj, group=group)
    return out


def gather_inputs(x: torch.Tensor | None, group, device) -> torch.Tensor:
    """All ranks' input shards ``[n_r, ...]`` concatenated in rank order ``[sum n_r, ...]`` on every rank.

    A rank with no examples passes ``None`` (or an empty tensor). The shapes after dim 0 and the dtype must
    agree (checked). Inputs, not features, travel: they are what is cheap to move."""
    import torch.distributed as dist

    local = None if x is None or x.shape[0] == 0 else x
    meta = None if local is None else (tuple(local.shape[1:]), str(local.dtype), int(local.shape[0]))
    metas = gather_objects(meta, group)
    shapes = {m[:2] for m in metas if m is not None}
    if not shapes:
        raise ValueError("the probe set is empty on every rank")
    if len(shapes) > 1:
        raise ValueError(f"the ranks' probe shards differ in example shape or dtype: {sorted(shapes)}")
    (shape, dtype_name), = shapes
    dtype = getattr(torch, dtype_name.replace("torch.", ""))
    counts = [0 if m is None else m[2] for m in metas]
    dev = _device(group)
    top = max(counts)
    buf = torch.zeros((top, *shape), dtype=dtype, device=dev)
    if local is not None:
        buf[: local.shape[0]] = local.to(dev)
    parts = [torch.empty_like(buf) for _ in counts]
    _count(buf.numel() * buf.element_size())
    _collective("gathering the probe inputs", dist.all_gather, parts, buf, group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(device)


def balanced_tiles(sizes: list[int], size: int, weight=None) -> list[list[tuple[int, int]]]:
    """Tile pairs ``(I, J)``, ``I <= J``, of blocks with ``sizes`` examples, split over ``size`` ranks so that
    each rank's work is balanced: largest first, each to the least-loaded rank (a tile's work is
    ``b_I b_J``, half that on the diagonal: ``I <= J`` symmetric products). Deterministic: every rank computes
    the same assignment."""
    weight = weight or (lambda I, J: sizes[I] * sizes[J] * (0.5 if I == J else 1.0))
    pairs = [(I, J) for I in range(len(sizes)) for J in range(I, len(sizes))]
    pairs.sort(key=lambda p: (-weight(*p), p))
    load = [0.0] * size
    out: list[list] = [[] for _ in range(size)]
    for p in pairs:
        r = min(range(size), key=lambda i: (load[i], i))
        out[r].append(p)
        load[r] += weight(*p)
    for tiles in out:
        tiles.sort()
    return out


def _gather_tensor(t: torch.Tensor, group) -> list[torch.Tensor]:
    import torch.distributed as dist

    _, size = rank_and_size(group)
    buf = t.detach().to(_device(group)).contiguous()
    parts = [torch.empty_like(buf) for _ in range(size)]
    _count(buf.numel() * buf.element_size())
    _collective("all_gather", dist.all_gather, parts, buf, group=group)
    return [p.to(t.device) for p in parts]


def reduce_alignment_sums(sums, group) -> None:
    """Sum every rank's :class:`lazyhasty._exact.AlignmentSums` into ``sums``, exactly: each
    double-double field is gathered and added in rank order (the same result on every rank)."""
    from ._exact import DD

    fields = ["cross", "sq_t", "sq_0"] + (["R_t", "R_0"] if sums.centered else [])
    for name in fields:
        dd = getattr(sums, name)
        parts = _gather_tensor(torch.stack([dd.hi, dd.lo]), group)
        acc = DD(parts[0][0].clone(), parts[0][1].clone())
        for p in parts[1:]:
            acc = acc + DD(p[0], p[1])
        setattr(sums, name, acc)
    sums.eps = max(float(e) for e in gather_objects(float(sums.eps), group))


def barrier(group) -> None:
    import torch.distributed as dist

    _collective("barrier", dist.barrier, group=group)


def broadcast_object(obj, src: int, group, nbytes: int | None = None):
    """``obj`` from rank ``src`` (a rank of ``group``) on every rank (picklable; tensors keep their device).
    ``nbytes``: its size for the traffic count (default: pickled once more to measure it)."""
    import torch.distributed as dist

    box = [obj]
    rank, _ = rank_and_size(group)
    if rank == src:
        _count(_pickled_size(obj) if nbytes is None else nbytes)
    _collective("broadcast", dist.broadcast_object_list, box, src=dist.get_global_rank(group, src), group=group)
    return box[0]


def gather_loader(loader, group, device) -> torch.Tensor:
    """Every rank's shard of a probe set (a loader, a tensor, or an empty one) as the union ``[n, ...]`` in
    rank order, on every rank."""
    from ._loaders import iter_inputs

    xs = list(iter_inputs(loader, device, allow_empty=True))
    return gather_inputs(torch.cat(xs) if xs else None, group, device)


def settle(group, error: BaseException | None, what: str) -> None:
    """Every rank learns whether any rank failed in its local part of a call: a rank's own error is raised
    there; the others raise a ``ValueError`` naming that rank and its message, at once rather than at the
    group's timeout in the next collective."""
    mine = None if error is None else f"{type(error).__name__}: {error}"
    everyone = gather_objects(mine, group)
    if error is not None:
        raise error
    for r, msg in enumerate(everyone):
        if msg is not None:
            raise ValueError(f"{what}: rank {r} failed ({msg})")


def own_shard(loader, group, device) -> torch.Tensor:
    """This rank's shard of a probe set as one ``[n_r, ...]`` tensor; an empty shard is ``[0, ...]`` with the
    example shape and dtype of the other ranks' (a collective: every rank calls it)."""
    from ._loaders import iter_inputs

    xs = list(iter_inputs(loader, device, allow_empty=True))
    local = torch.cat(xs) if xs else None
    meta = None if local is None else (tuple(local.shape[1:]), str(local.dtype))
    metas = [m for m in gather_objects(meta, group) if m is not None]
    if not metas:
        raise ValueError("the probe set is empty on every rank")
    if local is not None:
        return local
    shape, dtype = metas[0]
    return torch.zeros((0, *shape), dtype=getattr(torch, dtype.replace("torch.", "")), device=device)


# -- the probe group of a whole run (lazyhasty run --nproc N, torchrun) --------------------------------------
_RUN_GROUP: list = [None]


class probes_over:
    """``with probes_over(group):`` every :class:`lazyhasty.train.Trainer` created inside shards its linearity
    probe set over ``group`` (``"world"`` or a group) unless given ``process_group=`` itself. What
    ``lazyhasty run --nproc N`` and a torchrun launch of it use; outside such a block nothing changes."""

    def __init__(self, group):
        self.group = resolve(group)

    def __enter__(self):
        self.saved, _RUN_GROUP[0] = _RUN_GROUP[0], self.group
        return self.group

    def __exit__(self, *exc):
        _RUN_GROUP[0] = self.saved


def run_group():
    """The group set by an enclosing :class:`probes_over` (None outside one)."""
    return _RUN_GROUP[0]


def shard_rows(n: int, group) -> slice:
    """This rank's contiguous share of ``n`` rows (sizes differ by at most one; a rank may get none)."""
    rank, size = rank_and_size(group)
    return slice(rank * n // size, (rank + 1) * n // size)


def broadcast_module(module: nn.Module, into: nn.Module, group, src: int = 0) -> None:
    """Rank ``src``'s parameters and buffers of ``module`` copied into ``into`` (same structure) on every
    rank. ``into`` is a separate replica, so a pending autograd graph through ``module`` is not disturbed."""
    import torch.distributed as dist

    root = dist.get_global_rank(group, src)
    dev = _device(group)
    pairs = list(zip(list(module.parameters()) + list(module.buffers()),
                     list(into.parameters()) + list(into.buffers())))
    for t, dst in pairs:
        buf = t.detach().to(dev).clone()
        _count(buf.numel() * buf.element_size())
        _collective("broadcast of the model", dist.broadcast, buf, src=root, group=group)
        with torch.no_grad():
            dst.copy_(buf.to(dst.device))
