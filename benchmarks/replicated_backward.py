"""The k output gradients of a small block three ways (a measurement for the next engine step, not a path yet).

    python benchmarks/replicated_backward.py OUT.json [case ...]

Per model of ``benchmarks/outside_models.py`` (at the benchmark's n, float32, eval mode), the gradients of each of
the k outputs at every Linear / Conv2d / Conv1D output, with a forward each time:

* ``batched``: one forward on the b examples, one ``autograd.grad(..., is_grads_batched=True)`` (the engine's
  batched backward today: a legacy vmap, which loops over k where an op has no batching rule);
* ``loop``: one forward, k backward passes;
* ``replicated``: one forward on the block repeated k times (``[k b, ...]``), one backward of the one-hot
  ``sum_r f_r(x^(r))``: replica r's gradients are output r's (exact: the examples are independent).

Median of 9 calls after one warm-up, at 1 and 2 threads, in one process; ratios within a row only.
"""
import json
import os
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from outside_models import cases  # noqa: E402


def _capture(model, layers, x):
    outs = []
    hooks = [m.register_forward_hook(lambda mod, a, o: outs.append(o)) for m in layers]
    try:
        y = model(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)
    finally:
        for h in hooks:
            h.remove()
    return getattr(y, "logits", y).reshape(x.shape[0], -1), outs


def ways(model, x):
    layers = [m for m in model.modules()
              if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) or type(m).__name__ == "Conv1D"]
    b = x.shape[0]
    k = _capture(model, layers, x)[0].shape[1]

    def batched():
        y, outs = _capture(model, layers, x)
        return torch.autograd.grad(y, outs, torch.eye(k)[:, None, :].expand(k, b, k), is_grads_batched=True)

    def loop():
        y, outs = _capture(model, layers, x)
        return [torch.autograd.grad(y[:, a].sum(), outs, retain_graph=a + 1 < k) for a in range(k)]

    def replicated():
        y, outs = _capture(model, layers, x.repeat(k, *([1] * (x.dim() - 1))))
        E = torch.zeros(k, b, k)
        for r in range(k):
            E[r, :, r] = 1
        return torch.autograd.grad(y, outs, E.view(k * b, k))

    return {"batched": batched, "loop": loop, "replicated": replicated}, k


def _median_ms(f, reps=9):
    f()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[reps // 2] * 1e3


def main(out_path, wanted):
    rows = {}
    for name, (make_model, make_x, n) in cases().items():
        if wanted and name not in wanted:
            continue
        torch.manual_seed(0)
        model, x = make_model().eval(), make_x(n)
        fs, k = ways(model, x)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            ms = {w: _median_ms(f) for w, f in fs.items()}
            rows[f"{name} threads={threads}"] = {"n": n, "k": k, **{f"{w}_ms": round(v, 2) for w, v in ms.items()},
                                                 "replicated_over_batched": round(ms["replicated"] / ms["batched"], 3)}
            print(f"{name:20s} threads={threads} n={n:3d} k={k:3d} " + "  ".join(f"{w} {v:6.1f} ms" for w, v in ms.items())
                  + f"  replicated/batched {ms['replicated'] / ms['batched']:.2f}", flush=True)
    meta = {"torch": torch.__version__, "cpu_count": os.cpu_count()}
    with open(out_path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
