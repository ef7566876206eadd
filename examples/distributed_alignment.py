"""The linearity metrics over several processes: each rank passes its shard of the probe set, every rank gets
the value over the union (CPU gloo here; NCCL with one GPU per process works the same way).

    torchrun --standalone --nproc-per-node 2 examples/distributed_alignment.py [N]   (N examples, default 2000)

Rank 0 also computes each value in one process and prints both: they agree to the float32 rounding of the
model's outputs (features formed in other batches round differently; the sums themselves are exact).
"""
import copy
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from lazyhasty.metrics import ntk_alignment, representation_alignment, sign_similarity

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
torch.manual_seed(0)                                    # the same model, init and probe set on every rank
init = nn.Sequential(nn.Linear(2, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))
model = copy.deepcopy(init)
with torch.no_grad():                                   # stands in for training
    for p in model.parameters():
        p.add_(0.1 * torch.randn_like(p))
x = torch.rand(n, 2) * 2 - 1
shard = x[rank::world]                                  # what a DistributedSampler would give this rank

values = {
    "sign_similarity": sign_similarity(model, shard, init, process_group="world"),
    "repr_alignment": representation_alignment(model, shard, init, process_group="world"),
    "ntk_alignment": ntk_alignment(model, shard, init, kernel="trace", process_group="world"),
}
if rank == 0:
    one_process = {"sign_similarity": sign_similarity(model, x, init),
                   "repr_alignment": representation_alignment(model, x, init),
                   "ntk_alignment": ntk_alignment(model, x, init, kernel="trace")}
    for name, value in values.items():
        print(f"{name}: {world} processes {float(value):.12f}, "
              f"one process {float(one_process[name]):.12f}")
dist.destroy_process_group()
