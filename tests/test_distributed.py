"""Metrics over a probe set sharded across processes (gloo, 2 and 3 ranks on CPU): each rank its own shard,
the value over the union identical on every rank and equal to the single-process value."""
import copy
import os
import pickle
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _setup():
    """A small CNN with ReLUs (one functional), its init, and 11 probe inputs."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.act = nn.ReLU()
            self.fc1 = nn.Linear(4 * 5 * 5, 16)
            self.fc2 = nn.Linear(16, 3)

        def forward(self, x):
            h = self.act(self.conv(x)).flatten(1)
            return self.fc2(torch.relu(self.fc1(h)))

    m0 = Net().double()
    m = copy.deepcopy(m0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(11, 2, 5, 5, dtype=torch.float64)
    return m, m0, x


def _metrics(m, m0, x, group, kernel_block):
    from lazyhasty.metrics import ntk_alignment, representation_alignment, sign_similarity

    out = {"sign": sign_similarity(m, [x] if x.shape[0] else [], m0, process_group=group)}
    for centered in (False, True):
        out[f"repr{int(centered)}"] = representation_alignment(m, [x] if x.shape[0] else [], m0, centered=centered,
                                                               process_group=group)
        for kernel in ("trace", "full"):
            out[f"ntk-{kernel}{int(centered)}"] = ntk_alignment(
                m, [x] if x.shape[0] else [], m0, kernel=kernel, centered=centered, block_size=kernel_block,
                process_group=group)
    out["ntk-diagonal"] = ntk_alignment(m, [x] if x.shape[0] else [], m0, kernel="diagonal", block_size=kernel_block,
                                        process_group=group)
    for kernel in ("trace", "full"):  # per parameter group
        for name, v in ntk_alignment(m, [x] if x.shape[0] else [], m0, kernel=kernel, by_layer=True, block_size=4,
                                     process_group=group).items():
            out[f"by-layer-{kernel}-{name}"] = v
    # no block features kept (max_cache_bytes=0): the recompute regime, row-major runs of tiles per rank
    out["ntk-full-recompute"] = ntk_alignment(m, [x] if x.shape[0] else [], m0, kernel="full", block_size=2,
                                              max_cache_bytes=0, process_group=group)
    return out


def _labels(x):
    return torch.arange(x.shape[0]) % 3


def _probes(m, m0, x, group, y):
    """The captured-once probes: SignPatterns, NTKReference (stored tiles and recomputed), LinearityProbe,
    Monitor with a labelled group."""
    from lazyhasty.metrics import LinearityProbe, SignPatterns
    from lazyhasty.monitor import Monitor
    from lazyhasty.ntk import NTKReference

    out = {}
    signs = SignPatterns.capture(m0, [x], process_group=group)
    out["signs"] = signs.similarity(m, [x])
    for kernel in ("trace", "full"):
        for centered in (False, True):
            ref = NTKReference.capture(m0, x, kernel=kernel, centered=centered, block_size=2, process_group=group)
            assert ref.stored
            for key, v in ref.measure(m).items():
                out[f"ref-{kernel}{int(centered)}-{key}"] = v
        lean = NTKReference.capture(m0, x, kernel=kernel, max_bytes=0, block_size=3, process_group=group)
        assert not lean.stored
        out[f"lean-{kernel}"] = lean.alignment(m)
    probe = LinearityProbe.capture(m0, x, batch_size=4, ntk="full", process_group=group)
    for key, v in probe.measure(m).items():
        out[f"probe-{key}"] = v
    mon = Monitor(m0, x, groups={"g": (x, y)}, metrics=("sign_similarity", "repr_alignment", "ntk_alignment",
                                                         "ntk_rel_change"), process_group=group)
    for key, v in mon.measure(m).items():
        out[f"monitor-{key}"] = v
    return out


def _worker(rank, size, init, shards, out_dir, mode):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        m, m0, x = _setup()
        lo, hi = shards[rank]
        mine = x[lo:hi]
        if mode == "metrics":
            res = _metrics(m, m0, mine, "world", 3)
        elif mode == "gram":
            from lazyhasty.metrics import ntk_gram

            res = {}
            for kernel in ("full", "trace", "diagonal"):
                mm = ntk_gram(m, mine, kernel=kernel, block_size=3, process_group="world",
                              out=os.path.join(out_dir, f"K-{kernel}.npy"))
                res[f"out-{kernel}"] = torch.from_numpy(mm.copy())
                res[f"rank0-{kernel}"] = ntk_gram(m, mine, kernel=kernel, block_size=3, process_group="world",
                                                  gather="rank0")
                res[f"all-{kernel}"] = ntk_gram(m, mine, kernel=kernel, block_size=4, process_group="world",
                                                gather="all")
                res[f"recompute-{kernel}"] = ntk_gram(m, mine, kernel=kernel, block_size=2, process_group="world",
                                                      gather="all", max_cache_bytes=0)
        elif mode == "probes":
            res = _probes(m, m0, mine, "world", _labels(x)[lo:hi])
        elif mode == "named":  # dict batches (ids, mask, labels): the ranks gather the named inputs
            res = _named(lo, hi, "world")
        elif mode == "naive":  # the naive spec with a group: an error, not each rank's own shard
            from lazyhasty.metrics import ntk_alignment

            try:
                ntk_alignment(m, mine, m0, implementation="naive", process_group="world")
                res = "no error"
            except ValueError as exc:
                res = str(exc)
        elif mode == "local-error":  # rank 1's own shard breaks its forward: every rank learns of it at once
            from lazyhasty.metrics import representation_alignment, sign_similarity

            bad = mine if rank == 0 else torch.randn(2, 3, 5, 5, dtype=torch.float64)  # 3 channels, not 2
            res = {}
            for name, fn in (("sign_similarity", sign_similarity), ("representation_alignment",
                                                                    representation_alignment)):
                try:
                    fn(m, [bad], m0, process_group="world")
                    res[name] = "no error"
                except (ValueError, RuntimeError) as exc:
                    res[name] = f"{type(exc).__name__}: {exc}"
        elif mode == "mismatch":  # rank 1 asks for another kernel: an error naming it, on every rank
            from lazyhasty.metrics import ntk_alignment

            try:
                ntk_alignment(m, mine, m0, kernel="trace" if rank == 0 else "full", process_group="world")
                res = "no error"
            except ValueError as exc:
                res = str(exc)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(res, f)
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()
    # results are on disk: leave without the interpreter's teardown, where gloo's threads sometimes abort
    # ("terminate called without an active exception", seen in ~1 of 3 fresh-venv runs) after the work is done
    os._exit(0)


def _run(tmp_path, shards, mode="metrics"):
    size = len(shards)
    init = f"file://{tmp_path / 'store'}"
    mp.spawn(_worker, args=(size, init, shards, str(tmp_path), mode), nprocs=size, join=True)
    return [pickle.load(open(tmp_path / f"rank{r}.pkl", "rb")) for r in range(size)]


@pytest.mark.parametrize("shards", [[(0, 6), (6, 11)], [(0, 2), (2, 9), (9, 11)], [(0, 0), (0, 4), (4, 11)]],
                         ids=["2-ranks", "3-ranks-uneven", "3-ranks-one-empty"])
def test_every_metric_over_ranks_equals_one_process(tmp_path, shards):
    m, m0, x = _setup()
    want = _metrics(m, m0, x, None, 3)
    got = _run(tmp_path, shards)
    for r, res in enumerate(got):
        assert res == got[0], f"rank {r} differs from rank 0"  # identical on every rank, bit for bit
        for key, value in want.items():
            assert res[key] == pytest.approx(value, abs=1e-12, rel=0), key


@pytest.mark.parametrize("shards", [[(0, 6), (6, 11)], [(0, 0), (0, 4), (4, 11)]], ids=["2-ranks", "3-ranks-one-empty"])
def test_captured_probes_over_ranks_equal_one_process(tmp_path, shards):
    m, m0, x = _setup()
    want = _probes(m, m0, x, None, _labels(x))
    got = _run(tmp_path, shards, mode="probes")
    assert set(got[0]) == set(want)
    for r, res in enumerate(got):
        assert res == got[0], f"rank {r} differs from rank 0"
        for key, value in want.items():
            assert res[key] == pytest.approx(value, abs=1e-12, rel=0), key


def _named(lo, hi, group):
    """ntk_alignment and ntk_gram of a two-input model on dict batches, this rank's rows ``lo:hi`` (an empty
    shard: no batch at all)."""
    from lazyhasty.metrics import ntk_alignment, ntk_gram
    from test_named_inputs import batches, two_inputs

    m, m0 = two_inputs()
    dicts, _ = batches(n=11, size=11)
    mine = [{k: v[lo:hi] for k, v in dicts[0].items()}] if hi > lo else []
    out = {f"ntk-{kernel}": ntk_alignment(m, mine, m0, kernel=kernel, block_size=3, process_group=group)
           for kernel in ("trace", "full")}
    out["gram"] = ntk_gram(m, mine, kernel="trace", block_size=3, process_group=group, gather="all")
    return out


@pytest.mark.parametrize("shards", [[(0, 6), (6, 11)], [(0, 0), (0, 11)]], ids=["2-ranks", "2-ranks-one-empty"])
def test_ntk_alignment_of_named_inputs_over_ranks_equals_one_process(tmp_path, shards):
    want = _named(0, 11, None)
    got = _run(tmp_path, shards, mode="named")
    for r, res in enumerate(got):
        for kernel in ("trace", "full"):
            assert res[f"ntk-{kernel}"] == got[0][f"ntk-{kernel}"], f"rank {r} differs from rank 0"
            assert res[f"ntk-{kernel}"] == pytest.approx(want[f"ntk-{kernel}"], abs=1e-12, rel=0)
        assert torch.allclose(res["gram"], want["gram"], rtol=1e-12, atol=1e-12)


def test_ntk_gram_over_ranks_to_a_memory_mapped_file_or_gathered(tmp_path):
    from lazyhasty.metrics import ntk_gram

    m, m0, x = _setup()
    got = _run(tmp_path, [(0, 2), (2, 2), (2, 11)], mode="gram")
    for kernel in ("full", "trace", "diagonal"):
        want = ntk_gram(m, x, kernel=kernel)
        for r, res in enumerate(got):
            assert torch.allclose(res[f"out-{kernel}"], want, rtol=1e-12, atol=1e-12)
            assert torch.equal(res[f"all-{kernel}"], got[0][f"all-{kernel}"])
            assert torch.allclose(res[f"all-{kernel}"], want, rtol=1e-12, atol=1e-12)
            assert torch.allclose(res[f"recompute-{kernel}"], want, rtol=1e-12, atol=1e-12)
            if r == 0:
                assert torch.allclose(res[f"rank0-{kernel}"], want, rtol=1e-12, atol=1e-12)
            else:
                assert res[f"rank0-{kernel}"] is None


def test_memory_mapped_kernel_in_one_process(tmp_path):
    import numpy as np

    from lazyhasty.metrics import ntk_gram

    m, m0, x = _setup()
    for kernel in ("full", "trace", "diagonal"):
        want = ntk_gram(m, x, kernel=kernel)
        mm = ntk_gram(m, x, kernel=kernel, out=tmp_path / f"K-{kernel}.npy", block_size=4)
        assert isinstance(mm, np.memmap) and not mm.flags.writeable
        assert mm.shape == tuple(want.shape) and mm.dtype == np.float64
        assert np.allclose(np.asarray(mm), want.numpy(), rtol=1e-12, atol=1e-12)
        assert np.array_equal(np.load(tmp_path / f"K-{kernel}.npy"), np.asarray(mm))  # a plain .npy file
    with pytest.raises(ValueError, match="float32 or float64"):
        ntk_gram(m.to(torch.bfloat16), x.to(torch.bfloat16), out=tmp_path / "bf.npy")
    # the naive spec runs in one process into memory: out= is an error, not silently ignored
    with pytest.raises(ValueError, match="implementation='naive'"):
        ntk_gram(m.double(), x, implementation="naive", out=tmp_path / "naive.npy")
    assert not (tmp_path / "naive.npy").exists()


def test_inconsistent_arguments_are_named(tmp_path):
    got = _run(tmp_path, [(0, 5), (5, 11)], mode="mismatch")
    for res in got:
        assert "different arguments" in res and "kernel: 'trace' on rank 0, 'full' on rank 1" in res


def test_a_local_error_on_one_rank_is_raised_on_every_rank(tmp_path):
    """sign_similarity / representation_alignment: a rank whose own forward fails raises its error, the
    others a ValueError naming it (not a hang until the group's timeout in the next collective)."""
    rank0, rank1 = _run(tmp_path, [(0, 5), (5, 11)], mode="local-error")
    for name in ("sign_similarity", "representation_alignment"):
        assert rank1[name].startswith("RuntimeError")
        assert rank0[name].startswith(f"ValueError: {name}: rank 1 failed (RuntimeError")


def test_naive_with_a_group_is_an_error(tmp_path):
    for res in _run(tmp_path, [(0, 5), (5, 11)], mode="naive"):
        assert "implementation='naive'" in res and "process_group=" in res


def test_balanced_tiles_split_work_evenly_and_cover_every_pair():
    from lazyhasty._dist import balanced_tiles

    sizes = [64, 64, 64, 64, 64, 17]
    for ranks in (1, 2, 3, 4):
        parts = balanced_tiles(sizes, ranks)
        every = sorted(p for part in parts for p in part)
        assert every == [(i, j) for i in range(6) for j in range(i, 6)]
        work = [sum(sizes[i] * sizes[j] * (0.5 if i == j else 1) for i, j in part) for part in parts]
        assert max(work) <= 1.1 * sum(work) / ranks + max(sizes) ** 2  # within one tile of even


def test_row_major_runs_are_contiguous_balanced_and_cover_every_pair():
    from lazyhasty.ntk.sharding import row_major_runs

    sizes = [64] * 8 + [17]
    order = [(i, j) for i in range(9) for j in range(i, 9)]
    for ranks in (1, 2, 3, 5):
        parts = row_major_runs(sizes, ranks)
        assert [p for part in parts for p in part] == order  # contiguous runs, in row-major order
        rows = [len({i for i, _ in part}) for part in parts]
        assert sum(rows) <= 9 + ranks - 1  # a row is split between at most two neighbouring ranks
        work = [sum(sizes[i] * sizes[j] * (0.5 if i == j else 1) for i, j in part) for part in parts]
        assert max(work) <= sum(work) / ranks + 2 * max(sizes) ** 2


def test_recompute_regime_in_one_process_walks_rows_once():
    """One process, no feature cache: each row's features are formed once, each column block once per tile."""
    from lazyhasty.ntk.api import Featurizer
    from lazyhasty.ntk.sharding import RECOMPUTE, RankTiles

    m, m0, x = _setup()
    fz = Featurizer(m, "auto", "full", None)
    calls = []
    real = fz.__call__
    fz_call = lambda xb: (calls.append(xb.shape[0]), real(xb))[1]  # noqa: E731

    class Counting:
        device, dtype = fz.device, fz.dtype

        def __call__(self, xb):
            return fz_call(xb)

    work = RankTiles([Counting()], x, "full", 4, None, max_cache_bytes=0)
    assert work.regime == RECOMPUTE and work.tiles == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
    assert len(list(work)) == 6
    assert len(calls) == 3 + 3  # three rows (the first also measured the size) + three off-diagonal columns


def test_without_an_initialized_group_process_group_is_an_error():
    from lazyhasty.metrics import sign_similarity

    m, m0, x = _setup()
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(ValueError, match="init_process_group"):
        sign_similarity(m, x, m0, process_group="world")


def _dies(rank, size, init, out_dir):
    import datetime
    import time

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size,
                             timeout=datetime.timedelta(seconds=20))
    if rank == 1:
        os._exit(3)  # a rank that dies (or raises and exits) before the call
    from lazyhasty._dist import CollectiveFailed
    from lazyhasty.metrics import ntk_alignment

    m, m0, x = _setup()
    t0 = time.time()
    try:
        ntk_alignment(m, x[:5], m0, kernel="trace", process_group="world")
        res = ("no error", 0.0)
    except CollectiveFailed as exc:
        res = (str(exc), time.time() - t0)
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(res, f)


def test_a_rank_that_dies_makes_the_others_fail_clearly_not_hang(tmp_path):
    ctx = mp.get_context("spawn")
    init = f"file://{tmp_path / 'store'}"
    procs = [ctx.Process(target=_dies, args=(r, 2, init, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(not p.is_alive() for p in procs)
    msg, waited = pickle.load(open(tmp_path / "rank0.pkl", "rb"))
    assert "another rank raised, died or did not reach the same call" in msg
    assert waited < 60


def _collective_calls(group, m):
    """Every collective helper of lazyhasty._dist, each as one call made on every rank."""
    from lazyhasty import _dist

    x = torch.randn(3, 2, dtype=torch.float64)
    replica = copy.deepcopy(m)
    return {
        "sum_f64": lambda: _dist.sum_f64(torch.ones(3), group),
        "sum_i64": lambda: _dist.sum_i64(torch.ones(3), group),
        "gather_objects": lambda: _dist.gather_objects({"a": 1}, group),
        "agree": lambda: _dist.agree(group, "agree", kernel="trace"),
        "gather_inputs": lambda: _dist.gather_inputs(x, group, "cpu"),
        "own_shard": lambda: _dist.own_shard(x, group, "cpu"),
        "barrier": lambda: _dist.barrier(group),
        "broadcast_object": lambda: _dist.broadcast_object({"b": 2}, 0, group),
        "broadcast_module": lambda: _dist.broadcast_module(m, replica, group),
        "check_same_parameters": lambda: _dist.check_same_parameters(group, "check", m),
        "settle": lambda: _dist.settle(group, None, "settle"),
    }


def _raises_alive(rank, size, init, out_dir):
    import datetime
    import time

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size,
                             timeout=datetime.timedelta(seconds=120))
    from lazyhasty import _dist

    m, _, _ = _setup()
    res = {}
    names = list(_collective_calls(None, m))
    for name in names:
        group = dist.new_group(list(range(size)))  # a fresh group: the failed one is out of step after
        call = _collective_calls(group, m)[name]
        t0 = time.time()
        if rank == 1:  # raises in its local part, and stays alive (caught, as a training loop would)
            try:
                with _dist.failing_together(group, name):
                    raise ZeroDivisionError(f"rank 1's own failure in {name}")
            except ZeroDivisionError:
                pass
            res[name] = ("raised", 0.0)
            time.sleep(0.5)
        else:
            try:
                call()
                res[name] = ("no error", time.time() - t0)
            except _dist.RankFailed as exc:
                res[name] = (str(exc), time.time() - t0)
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(res, f)
    os._exit(0)  # the groups are out of step by design: no teardown handshake


def test_a_rank_that_raises_and_stays_alive_makes_the_others_raise_at_once_naming_it(tmp_path):
    ctx = mp.get_context("spawn")
    init = f"file://{tmp_path / 'store'}"
    procs = [ctx.Process(target=_raises_alive, args=(r, 3, init, str(tmp_path))) for r in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert all(not p.is_alive() for p in procs)
    for r in (0, 2):
        res = pickle.load(open(tmp_path / f"rank{r}.pkl", "rb"))
        assert len(res) == 11
        for name, (msg, waited) in res.items():
            assert "rank 1: ZeroDivisionError: rank 1's own failure in " + name in msg, (r, name, msg)
            assert waited < 20, (r, name, waited)  # generous: the group's timeout here is 120 s


def _different_weights(rank, size, init, out_dir):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    from lazyhasty import _dist

    m, _, _ = _setup()
    if rank == 2:
        with torch.no_grad():
            next(m.parameters()).view(-1)[0] += 1e-12  # one value, one ulp-scale change
    try:
        _dist.check_same_parameters(dist.group.WORLD, "ntk_alignment", m)
        res = "no error"
    except ValueError as exc:
        res = str(exc)
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(res, f)
    dist.barrier()
    os._exit(0)


def test_ranks_with_different_parameter_values_are_an_error_naming_the_rank(tmp_path):
    init = f"file://{tmp_path / 'store'}"
    mp.spawn(_different_weights, args=(3, init, str(tmp_path)), nprocs=3, join=True)
    for r in range(3):
        msg = pickle.load(open(tmp_path / f"rank{r}.pkl", "rb"))
        assert "ntk_alignment: the model's parameter values on rank(s) 2 differ from rank 0's" in msg, msg


def _trainer_rank_fails(rank, size, init, out_dir):
    import datetime
    import time

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size,
                             timeout=datetime.timedelta(seconds=120))
    sys.path.insert(0, os.path.dirname(__file__))
    from test_train import small_setup

    from lazyhasty import _dist
    from lazyhasty.train import TrainConfig, Trainer

    net, ds = small_setup()
    cfg = TrainConfig(steps=20, lr=0.5, loss="logistic", log_every=2, probe_every=1,
                      probes=("sign_similarity", "repr_alignment"))

    def on_log(row, net):
        if rank == 1 and row["step"] == 4:
            raise ZeroDivisionError("rank 1's on_log")

    t0 = time.time()
    try:
        with _dist.probes_over("world"):
            Trainer(net, ds, cfg, os.path.join(out_dir, f"run{rank}"), probe_set=ds[:40], on_log=on_log).fit()
        res = ("no error", time.time() - t0)
    except (ZeroDivisionError, _dist.RankFailed) as exc:
        res = (f"{type(exc).__name__}: {exc}", time.time() - t0)
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(res, f)
    os._exit(0)


def test_a_trainer_rank_that_raises_makes_the_others_raise_at_once(tmp_path):
    ctx = mp.get_context("spawn")
    init = f"file://{tmp_path / 'store'}"
    procs = [ctx.Process(target=_trainer_rank_fails, args=(r, 2, init, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert all(not p.is_alive() for p in procs)
    mine, _ = pickle.load(open(tmp_path / "rank1.pkl", "rb"))
    assert mine.startswith("ZeroDivisionError")
    msg, waited = pickle.load(open(tmp_path / "rank0.pkl", "rb"))
    assert "RankFailed" in msg and "rank 1: ZeroDivisionError: rank 1's on_log" in msg, msg
    assert waited < 60  # training included; the wait itself is a fraction of a second (group timeout: 120 s)


# the public entry points that combine ranks' shards, each called with rank 2's model one ulp away from rank 0's
def _public_entry_points(m, m0, x, group):
    from lazyhasty.metrics import (LinearityProbe, SignPatterns, ntk_alignment, representation_alignment,
                                   sign_similarity)

    calls = {
        "sign_similarity": lambda: sign_similarity(m, x, m0, process_group=group),
        "representation_alignment": lambda: representation_alignment(m, x, m0, process_group=group),
        "SignPatterns.similarity": lambda: SignPatterns.capture(m0, x, process_group=group).similarity(m, x),
        "LinearityProbe.measure": lambda: LinearityProbe.capture(m0, x, process_group=group).measure(m),
        "ntk_alignment": lambda: ntk_alignment(m, x, m0, kernel="trace", process_group=group),
    }
    return calls


def _different_weights_public(rank, size, init, out_dir):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    m, m0, x = _setup()
    same = copy.deepcopy(m)
    if rank == 2:
        with torch.no_grad():
            next(m.parameters()).view(-1)[0] += 1e-12
    shard = x[rank::size]
    res = {}
    for name, call in _public_entry_points(m, m0, shard, dist.group.WORLD).items():
        try:
            call()
            res[name] = "no error"
        except ValueError as exc:
            res[name] = str(exc)
    # an error every rank raised together leaves the group in step: the next call works
    from lazyhasty.metrics import sign_similarity
    res["after"] = sign_similarity(same, shard, m0, process_group=dist.group.WORLD)
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(res, f)
    dist.barrier()
    os._exit(0)


def test_public_calls_over_ranks_with_different_parameter_values_raise_naming_the_rank(tmp_path):
    # before: structure was compared, values not: one mixed number came back on every rank
    init = f"file://{tmp_path / 'store'}"
    mp.spawn(_different_weights_public, args=(3, init, str(tmp_path)), nprocs=3, join=True)
    for r in range(3):
        res = pickle.load(open(tmp_path / f"rank{r}.pkl", "rb"))
        after = res.pop("after")
        assert after == pickle.load(open(tmp_path / "rank0.pkl", "rb"))["after"] and 0 < after <= 1
        assert set(res) == {"sign_similarity", "representation_alignment", "SignPatterns.similarity",
                            "LinearityProbe.measure", "ntk_alignment"}
        for name, msg in res.items():
            assert "parameter values on rank(s) 2 differ from rank 0's" in msg, (r, name, msg)


def _public_raises_alive(rank, size, init, out_dir):
    # rank 1 raises inside the local part of each public call (and stays alive, as a training loop catching it
    # would); the others must raise at once, naming rank 1 and its exception, not at the group's timeout
    import datetime
    import time
    from unittest import mock

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=120))
    from lazyhasty import _dist
    from lazyhasty.metrics import LinearityProbe, ntk_alignment, ntk_gram
    from lazyhasty.monitor import Monitor
    from lazyhasty.ntk import NTKReference
    from lazyhasty.ntk.featurize import Featurizer

    m, m0, x = _setup()
    shard = x[rank::size]

    def boom(*a, **k):
        raise ZeroDivisionError("rank 1's own failure")

    calls = {  # name: (the call, what rank 1's local part raises in)
        "ntk_alignment exchange": (lambda g: ntk_alignment(m, shard, m0, kernel="full", block_size=2,
                                                            process_group=g), (Featurizer, "__call__")),
        "ntk_alignment recompute": (lambda g: ntk_alignment(m, shard, m0, kernel="full", block_size=2,
                                                             max_cache_bytes=0, process_group=g),
                                    (Featurizer, "__call__")),
        "ntk_gram gather": (lambda g: ntk_gram(m, shard, kernel="trace", block_size=2, gather="all",
                                               process_group=g), (Featurizer, "__call__")),
    }
    res = {}
    for name, (call, (owner, attr)) in calls.items():
        group = dist.new_group(list(range(size)))
        t0 = time.time()
        try:
            if rank == 1:
                with mock.patch.object(owner, attr, boom):
                    call(group)
            else:
                call(group)
            res[name] = ("no error", time.time() - t0)
        except (ZeroDivisionError, _dist.RankFailed) as exc:
            res[name] = (f"{type(exc).__name__}: {exc}", time.time() - t0)
        if rank == 1:
            time.sleep(0.5)
    # the measuring objects: captured together, then rank 1 fails in its part of measure()
    for name in ("NTKReference.measure", "LinearityProbe.measure", "Monitor.measure"):
        group = dist.new_group(list(range(size)))
        if name == "NTKReference.measure":
            obj = NTKReference.capture(m0, shard, kernel="trace", block_size=2, process_group=group)
            owner, attr = Featurizer, "__call__"
        elif name == "LinearityProbe.measure":
            obj = LinearityProbe.capture(m0, shard, process_group=group)
            owner, attr = LinearityProbe, "_measure"
        else:
            obj = Monitor(m0, shard, metrics=("sign_similarity", "repr_alignment"), process_group=group)
            owner, attr = Monitor, "_measure"
        t0 = time.time()
        try:
            if rank == 1:
                with mock.patch.object(owner, attr, boom):
                    obj.measure(m)
            else:
                obj.measure(m)
            res[name] = ("no error", time.time() - t0)
        except (ZeroDivisionError, _dist.RankFailed) as exc:
            res[name] = (f"{type(exc).__name__}: {exc}", time.time() - t0)
        if rank == 1:
            time.sleep(0.5)
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(res, f)
    os._exit(0)  # the failed groups are out of step by design: no teardown handshake


def test_public_calls_where_a_rank_raises_and_stays_alive_raise_at_once_naming_it(tmp_path):
    ctx = mp.get_context("spawn")
    init = f"file://{tmp_path / 'store'}"
    procs = [ctx.Process(target=_public_raises_alive, args=(r, 3, init, str(tmp_path))) for r in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    assert all(not p.is_alive() for p in procs)
    names = {"ntk_alignment exchange", "ntk_alignment recompute", "ntk_gram gather", "NTKReference.measure",
             "LinearityProbe.measure", "Monitor.measure"}
    own = pickle.load(open(tmp_path / "rank1.pkl", "rb"))
    assert set(own) == names and all(msg.startswith("ZeroDivisionError") for msg, _ in own.values()), own
    for r in (0, 2):
        res = pickle.load(open(tmp_path / f"rank{r}.pkl", "rb"))
        assert set(res) == names
        for name, (msg, waited) in res.items():
            assert msg.startswith("RankFailed") and "rank 1: ZeroDivisionError: rank 1's own failure" in msg, \
                (r, name, msg)
            assert waited < 20, (r, name, waited)  # generous: the group's timeout here is 120 s
