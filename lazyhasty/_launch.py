"""``lazyhasty run NAME --nproc N`` and ``torchrun ... -m lazyhasty run NAME``: one experiment, its
linearity probes split over processes.

Every rank runs the same experiment with the same seeds, so training is replicated (the experiments are
small); each :class:`lazyhasty.train.Trainer` splits its linearity probe set between the ranks
(:class:`lazyhasty._dist.probes_over`), which is where the time goes at large probe sets (the NTK). Rank 0
writes ``--out``; the other ranks work in a scratch copy of it (so that resuming decides the same on every
rank) which is removed at the end: a fresh folder made for it, inside ``LAZYHASTY_SCRATCH`` when that is
set (the variable's folder and anything else in it are left alone). Backend: NCCL with one GPU per rank for ``--device cuda``, gloo otherwise.
"""
from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from pathlib import Path


class RankFailed(RuntimeError):
    """A process of ``--nproc`` raised (its last traceback line is the message) or died."""


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher setting the env:// variables)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def _rank_body(rank: int, size: int, init: str | None, scratch: str, run, ctx):
    """One rank: join the group, run the experiment (rank 0 into ctx.out, others into a scratch copy)."""
    import torch
    import torch.distributed as dist

    from . import _dist

    cuda = str(ctx.device).startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        ctx.device = f"cuda:{local}"
    backend = "nccl" if cuda else "gloo"
    if init is None:
        dist.init_process_group(backend)  # env:// (torchrun)
    else:
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=size)
    rank, size = dist.get_rank(), dist.get_world_size()
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    if rank != 0:
        mine = Path(scratch) / f"rank{rank}"
        if Path(ctx.out).exists():
            shutil.copytree(ctx.out, mine, dirs_exist_ok=True)
        ctx.out, ctx.progress = mine, False
    dist.barrier()  # the copies exist before rank 0 writes anything
    try:
        with _dist.probes_over("world"):
            summary = run(ctx)
        dist.barrier()
        return summary if rank == 0 else None
    finally:
        dist.destroy_process_group()


def _spawned(rank, size, init, scratch, run, ctx, result):
    summary = _rank_body(rank, size, init, scratch, run, ctx)
    if rank == 0:
        with open(result, "wb") as f:
            pickle.dump(summary, f)


def run_over_processes(nproc: int, run, ctx):
    """``run(ctx)`` in ``nproc`` spawned processes (or in this torchrun rank): rank 0's result."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    if under_torchrun():
        # a fresh folder of this rank's own (inside LAZYHASTY_SCRATCH when set): only it is removed after,
        # never the folder the user named nor what else it holds
        parent = os.environ.get("LAZYHASTY_SCRATCH") or None
        if parent is not None:
            os.makedirs(parent, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=f"lazyhasty-rank{os.environ['RANK']}-", dir=parent)
        try:
            return _rank_body(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), None, scratch, run, ctx)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="lazyhasty-nproc") as scratch:
        result = os.path.join(scratch, "summary.pkl")
        init = f"file://{os.path.join(scratch, 'store')}"
        try:
            mp.spawn(_spawned, args=(nproc, init, scratch, run, ctx, result), nprocs=nproc, join=True)
        except ProcessException as exc:  # the others were terminated by spawn
            lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
            raise RankFailed(f"process {exc.error_index} of {nproc} failed: {lines[-1] if lines else exc}") from None
        with open(result, "rb") as f:
            return pickle.load(f)
