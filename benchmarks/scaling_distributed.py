"""Strong scaling of the sharded NTK alignment on CPU with gloo (issue 15): 1 vs 2 processes of one thread.

    python benchmarks/scaling_distributed.py [--n 512] [--repeats 3] [--out benchmarks/results/...json]

The trace-NTK alignment of the ResNet-shaped benchmark model (resnet18_w16) against a perturbed copy on n
CIFAR-shaped inputs; each process gets n / P examples and one thread. Efficiency = T1 / (P T_P). The bytes
each process put into collectives per call are recorded, against the kernel's flops-equivalent work
(n^2 / 2 tile entries of a per-example gradient inner product over all parameters, 4 bytes a flop).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))


def _pair():
    from ntk_models import resnet18_w16

    torch.manual_seed(0)
    m0 = resnet18_w16().eval()
    m = resnet18_w16().eval()
    m.load_state_dict(m0.state_dict())
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * p.std() * torch.randn_like(p))
    return m, m0


def _worker(rank, size, init, n, repeats, block, out):
    torch.set_num_threads(1)
    if size > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    from lazyhasty import _dist
    from lazyhasty.metrics import ntk_alignment

    m, m0 = _pair()
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mine = x[rank::size]
    group = "world" if size > 1 else None
    value = ntk_alignment(m, mine, m0, kernel="trace", block_size=block, process_group=group)  # warm-up
    times = []
    for _ in range(repeats):
        _dist.traffic.update(bytes=0, collectives=0)
        if size > 1:
            dist.barrier()
        t0 = time.perf_counter()
        value = ntk_alignment(m, mine, m0, kernel="trace", block_size=block, process_group=group)
        if size > 1:
            dist.barrier()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"times": times, "value": value, "bytes": _dist.traffic["bytes"],
                       "collectives": _dist.traffic["collectives"],
                       "params": sum(p.numel() for p in m.parameters())}, f)
    if size > 1:
        dist.barrier()
        dist.destroy_process_group()


def run(size, n, repeats, block, tmp):
    out = os.path.join(tmp, f"p{size}.json")
    init = f"file://{os.path.join(tmp, f'store{size}')}"
    mp.spawn(_worker, args=(size, init, n, repeats, block, out), nprocs=size, join=True)
    return json.load(open(out))


def main():
    import tempfile

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, a.n, a.repeats, a.block, tmp)
        two = run(2, a.n, a.repeats, a.block, tmp)
    t1, t2 = sorted(one["times"])[len(one["times"]) // 2], sorted(two["times"])[len(two["times"]) // 2]
    work_bytes = 4 * (a.n * (a.n + 1) / 2) * 10 * one["params"]  # k = 10 outputs, trace: one product per output
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    rec = {"what": "ntk_alignment trace, resnet18_w16, 1 vs 2 gloo processes of 1 thread", "n": a.n,
           "block_size": a.block, "median_s": {"1": t1, "2": t2}, "efficiency": t1 / (2 * t2),
           "alignment": {"1": one["value"], "2": two["value"]}, "bytes_per_call_rank0": two["bytes"],
           "collectives_per_call": two["collectives"], "flops_equivalent_bytes": work_bytes,
           "bytes_over_work": two["bytes"] / work_bytes, "machine": platform.machine(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "commit": commit}
    print(json.dumps(rec, indent=1))
    out = a.out or os.path.join(os.path.dirname(__file__), "results",
                                f"distributed-scaling-cpu-{os.cpu_count()}core-{commit[:10]}.json")
    with open(out, "w") as f:
        json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
