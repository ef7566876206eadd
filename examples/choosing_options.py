"""Choosing ``kernel=``, ``dtype=`` and ``block_size=``, and reading ``explain()`` (seconds on a CPU).

    python examples/choosing_options.py [N]      (N examples, default 64)

A small CNN with k = 10 outputs: what each kernel form holds and costs, what float32 costs in accuracy
against float64, what the block size changes (memory, never the value), and how to see the plan a call uses.
"""
import sys
import time

import torch
from torch import nn

from lazyhasty.metrics import kernel_alignment
from lazyhasty.ntk import explain, ntk_gram

n = int(sys.argv[1]) if len(sys.argv) > 1 else 64
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(16, 16, 3, stride=2), nn.ReLU(),
                      nn.Flatten(), nn.Linear(16 * 7 * 7, 10))
x = torch.randn(n, 3, 16, 16)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


# 1. kernel=: "full" [n, k, n, k] (every output pair), "trace" [n, n] (sum over outputs), "diagonal" [n, k, k].
#    The first call on a model also runs its layer check (once per model structure; later calls reuse it).
for kernel in ("full", "trace", "diagonal"):
    K, s = timed(lambda: ntk_gram(model, x, kernel=kernel))
    mib = K.numel() * K.element_size() / 2**20
    print(f"kernel={kernel!r:11} shape {list(K.shape)}, {mib:.2f} MiB, {s:.2f} s")

# 2. dtype=: float32 (the default for a float32 model) against float64 (a float64 copy of the model's math).
K64 = ntk_gram(model, x, kernel="trace", dtype=torch.float64)
K32 = ntk_gram(model, x, kernel="trace")
err = float((K32.double() - K64).norm() / K64.norm())
print(f"dtype: float32 vs float64 relative Frobenius error {err:.1e}")

# 3. block_size=: examples per block of the tiled computation. Smaller blocks hold fewer per-example
#    gradients at once (less memory) and do more, smaller products; the kernel is the same.
for block in (8, 32):
    K, s = timed(lambda: ntk_gram(model, x, kernel="full", block_size=block))
    same = float(kernel_alignment(K, ntk_gram(model, x)))
    print(f"block_size={block}: {s:.2f} s, alignment with the default's kernel {same:.12f}")

# 4. explain(): the plan of a call without running it: the path and why, then per parameter the layer kind,
#    the form it is computed in (ghost / materialized / per-example copies / torch.func) and the cost
#    model's flops per example pair for each form.
print(explain(model, x, kernel="full", block_size=32))
plan = explain(model, x, kernel="trace").to_dict()     # the same as a dict, for code
print("trace kernel path:", plan["path"], "-", plan["why"])
