"""Metrics over a probe set sharded across processes, with ``torch.distributed`` (gloo on CPU, NCCL on GPUs).

Every metric that takes ``process_group=`` follows one contract: each rank passes **its own shard** of the
probe set (what a ``DistributedSampler`` gives; a rank may have none), and every rank gets the value over
the union of the shards, identical on all of them. ``process_group=None`` (the default) is one process,
even when ``torch.distributed`` is initialized: a DDP script does not change meaning silently.

Before any work the ranks compare what defines the call (:func:`agree`): a different metric, kernel, model
structure or dtype on one rank is an error naming the rank and the difference, not a wrong number.
Partial sums travel as float64 (``all_reduce``); shards are put together in rank order.
:func:`check_same_parameters` compares the models' parameter values (a checksum) the same way.

Every collective here runs asynchronously and is waited on while polling the group's store: a rank that
raises inside :class:`failing_together` (and stays alive) posts its rank and exception there, and the
ranks waiting for it raise :class:`RankFailed` naming both within a fraction of a second, not at the
group's timeout.
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


class RankFailed(CollectiveFailed):
    """Another rank raised inside a call (and stays alive): named with its exception, within ~0.1 s."""


def raised_together(error: BaseException) -> BaseException:
    """Mark ``error`` as raised by every rank at the same point, after a collective that completed (the ranks
    disagree on arguments or values, or :func:`settle` shares one rank's failure): the group stays in step, so
    :class:`failing_together` does not post it and later calls on the group work.

    Args:
        error: the exception about to be raised.

    Returns:
        ``error``, marked.
    """
    error._lazyhasty_raised_together = True
    return error


# -- failing together: a rank that raises tells the others through the group's store -----------------------
_ABORT_KEY = "lazyhasty/abort"
_POLL_S = 0.02


def _store():
    """The default group's key-value store (what ``init_process_group`` rendezvoused on), or None."""
    try:
        from torch.distributed import distributed_c10d as c10d

        return c10d._get_default_store()
    except Exception:  # noqa: BLE001 - a private API: without it, failures fall back to the group's timeout
        return None


def _abort_key(group) -> str:
    import torch.distributed as dist

    world = group is None or group is dist.group.WORLD
    name = None if world else getattr(group, "group_name", None)
    return f"{_ABORT_KEY}/{name or 'default'}"


def posted_failure(group) -> str | None:
    """The failure a rank posted on ``group`` (``"rank R: Type: message"``), or None."""
    store = _store()
    key = _abort_key(group)
    try:
        if store is not None and store.check([key]):
            return store.get(key).decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - a store that is gone: nothing posted that we can read
        return None
    return None


def post_failure(group, error: BaseException) -> None:
    """Tell every rank that this one raised ``error`` (they raise :class:`RankFailed` in their collective)."""
    import torch.distributed as dist

    store = _store()
    if store is None:
        return
    try:
        msg = f"rank {dist.get_rank(group)}: {type(error).__name__}: {str(error)[:500]}"
        store.compare_set(_abort_key(group), "", msg)  # the first failure is the one named
    except Exception:  # noqa: BLE001 - best effort: the others then fall back to the group's timeout
        pass


class failing_together:
    """``with failing_together(group, what):`` around a call made on every rank: when this rank raises inside
    (and stays alive), the other ranks, waiting in a collective of lazyhasty's, raise :class:`RankFailed`
    naming this rank and its exception within a fraction of a second instead of at the group's timeout.

    After such a failure the group is out of step (the failed rank left collectives the others entered):
    every later lazyhasty collective on it raises at once. ``group=None`` (one process): does nothing.
    """

    def __init__(self, group, what: str):
        self.group, self.what = group, what

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if self.group is not None and error is not None and isinstance(error, Exception) and \
                not isinstance(error, CollectiveFailed) and not getattr(error, "_lazyhasty_raised_together", False):
            post_failure(self.group, error)
        return False


def _wait(work, what: str, group) -> None:
    """Wait for an async collective, raising :class:`RankFailed` as soon as another rank posts a failure."""
    while not work.is_completed():
        failed = posted_failure(group)
        if failed is not None:
            raise RankFailed(f"{what}: {failed} (raised there, while this rank waited for it in a collective)")
        import time

        time.sleep(_POLL_S)
    work.wait()


def _collective(what: str, fn, *args, **kwargs):
    group = kwargs.get("group")
    failed = posted_failure(group)
    if failed is not None:
        raise RankFailed(f"{what}: {failed} (the group is out of step since: start it again)")
    try:
        work = fn(*args, async_op=True, **kwargs)
        if work is None:  # a collective that ran synchronously
            return None
        _wait(work, what, group)
        return None
    except CollectiveFailed:
        raise
    except (RuntimeError, ValueError, ConnectionError) as exc:  # gloo / NCCL errors, closed connections, timeouts
        failed = posted_failure(group)
        if failed is not None:
            raise RankFailed(f"{what}: {failed}") from exc
        raise CollectiveFailed(
            f"{what}: the exchange between ranks failed — another rank raised, died or did not reach the same "
            f"call within the process group's timeout (init_process_group(timeout=...)): {exc}") from exc


def _all_gather_bytes(data: bytes, group, what: str) -> list[bytes]:
    """Every rank's ``data`` in rank order (async tensor collectives, so that a posted failure is seen)."""
    import torch.distributed as dist

    _, size = rank_and_size(group)
    dev = _device(group)
    n = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(size)]
    _collective(what, dist.all_gather, sizes, n, group=group)
    top = max(int(t) for t in sizes)
    buf = torch.zeros(top, dtype=torch.uint8, device=dev)
    if data:
        buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
    parts = [torch.empty_like(buf) for _ in range(size)]
    _collective(what, dist.all_gather, parts, buf, group=group)
    return [bytes(p[:int(c)].cpu().numpy().tobytes()) for p, c in zip(parts, sizes)]


def _all_gather_object(obj, group, what: str) -> list:
    import pickle

    return [pickle.loads(b) for b in _all_gather_bytes(pickle.dumps(obj), group, what)]


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


def parameter_checksum(*models: nn.Module) -> str:
    """SHA-256 (hex, 16 digits) over the parameter and buffer values of ``models`` (names, dtypes, bytes).

    Args:
        *models: the modules whose values a call combines (e.g. the model and its reference).

    Returns:
        16 hex digits; equal on two ranks exactly when every value is bitwise equal.
    """
    import hashlib

    h = hashlib.sha256()
    for i, model in enumerate(models):
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            flat = t.detach().cpu().contiguous().reshape(-1)
            h.update(f"{i}:{name}:{t.dtype}:{tuple(t.shape)};".encode())
            if flat.numel():
                h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_same_parameters(group, what: str, *models: nn.Module) -> None:
    """Raise on every rank, naming the rank, when a rank's models hold other values than rank 0's.

    Ranks that combine their shards must measure the same model: structure alone (:func:`agree`) lets two
    ranks with different weights return one mixed number. One small collective (a 16-digit checksum).

    Args:
        group: the process group (``None``: one process, nothing to check).
        what: the call, for the message.
        *models: the modules the call uses.

    Raises:
        ValueError: naming the ranks whose parameter values differ from rank 0's.
    """
    if group is None:
        return
    mine = parameter_checksum(*models)
    everyone = _all_gather_object(mine, group, what)
    differ = [r for r, c in enumerate(everyone) if c != everyone[0]]
    if differ:
        raise raised_together(ValueError(
            f"{what}: the model's parameter values on rank(s) {', '.join(map(str, differ))} differ from rank 0's "
            "(checksums " + ", ".join(f"rank {r}: {c}" for r, c in enumerate(everyone))
            + "): every rank must measure the same model (broadcast it from one rank first)"))


def agree(group, what: str, **facts) -> list[dict]:
    """Every rank's ``facts`` (strings, numbers); an error naming the first rank that differs from rank 0."""
    _count(_pickled_size(facts))
    everyone = _all_gather_object(facts, group, what)
    for r, theirs in enumerate(everyone[1:], start=1):
        diff = [f"{k}: {everyone[0].get(k)!r} on rank 0, {theirs.get(k)!r} on rank {r}"
                for k in sorted(set(facts) | set(theirs)) if theirs.get(k) != everyone[0].get(k)]
        if diff:
            raise raised_together(ValueError(
                f"{what}: the ranks were called with different arguments (" + "; ".join(diff) + ")"))
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
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    _count(_pickled_size(obj))
    return _all_gather_object(obj, group, "all_gather")


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

    import pickle

    rank, _ = rank_and_size(group)
    root = dist.get_global_rank(group, src)
    dev = _device(group)
    data = pickle.dumps(obj) if rank == src else b""
    if rank == src:
        _count(len(data) if nbytes is None else nbytes)
    n = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    _collective("broadcast", dist.broadcast, n, src=root, group=group)
    buf = torch.zeros(int(n), dtype=torch.uint8, device=dev)
    if rank == src and data:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev))
    _collective("broadcast", dist.broadcast, buf, src=root, group=group)
    return pickle.loads(buf.cpu().numpy().tobytes())


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
        raise raised_together(error)
    for r, msg in enumerate(everyone):
        if msg is not None:
            raise raised_together(ValueError(f"{what}: rank {r} failed ({msg})"))


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
