"""In-process A/B of two source trees of lazyhasty (AB_OLD, AB_NEW: tree roots; the old one imported as
lazyhasty_old): per case both engines alternate call by call in one process, so each pair of calls shares the
machine's load; the median of the pairs' ratios new / old (after two warm-up calls of each; a timing runs
enough calls to last ~0.25 s). AB_CASES: comma-separated case names (default: all). Usage: AB_OLD=... AB_NEW=... python ab_inprocess.py REPS OUT.json"""
import copy, importlib.util, sys, time, statistics, json, os
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

def load(name, root):
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "lazyhasty", "__init__.py"),
                                                  submodule_search_locations=[os.path.join(root, "lazyhasty")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod

old = load("lazyhasty_old", os.environ["AB_OLD"])
new = load("lazyhasty", os.environ["AB_NEW"])
import zoo_models, ntk_models
torch.set_num_threads(int(os.environ.get("AB_THREADS", "2")))
cases = {
    "bench_zoo:lstm full n=64": (zoo_models.Recurrent, lambda: torch.rand(64, 10, 8) * 2 - 1, "full"),
    "bench_zoo:transformer-text trace n=32": (zoo_models.TextClassifier, lambda: torch.randint(0, 100, (32, 12)), "trace"),
    "bench_zoo:multihead-attention trace n=64": (zoo_models.Attention, lambda: torch.rand(64, 10, 8) * 2 - 1, "trace"),
    "bench_zoo:plain-cnn full n=32": (zoo_models.plain_cnn, lambda: torch.rand(32, 3, 32, 32) * 2 - 1, "full"),
    "bench_ntk:cnn-trace n=128": (ntk_models.cnn3, lambda: torch.rand(128, 3, 32, 32) * 2 - 1, "trace"),
    "bench_ntk:mlp-full n=1000": (ntk_models.mlp_256, lambda: torch.rand(1000, 2) * 2 - 1, "full"),
    "bench_ntk:resnet-trace n=32": (ntk_models.resnet18_w16, lambda: torch.rand(32, 3, 32, 32) * 2 - 1, "trace"),
    # the other walks (issue 26's tile walker): alignment tiles, cross kernel, by-layer, K @ Q
    "mlp-align n=2000 (tiles of 500)": (ntk_models.mlp_256, lambda: torch.rand(2000, 2) * 2 - 1, "full", "alignment"),
    "mlp-cross n=600 x 400 (tiles of 200)": (ntk_models.mlp_256, lambda: torch.rand(1000, 2) * 2 - 1, "full", "cross"),
    "plain-cnn by_layer trace n=64": (zoo_models.plain_cnn, lambda: torch.rand(64, 3, 32, 32) * 2 - 1, "trace", "by_layer"),
    "mlp-operator trace n=1000 (tiles of 250)": (ntk_models.mlp_256, lambda: torch.rand(1000, 2) * 2 - 1, "trace",
                                                 "operator"),
}


def call(lib, model, x, kernel, kind, m0):
    if kind == "alignment":
        return lambda: lib.metrics.ntk_alignment(model, x, m0, kernel=kernel, block_size=500)
    if kind == "cross":
        return lambda: lib.metrics.ntk_gram(model, x[:600], kernel=kernel, loader2=x[600:], block_size=200)
    if kind == "by_layer":
        return lambda: lib.metrics.ntk_gram(model, x, kernel=kernel, by_layer=True)
    if kind == "operator":
        Q = torch.randn(x.shape[0], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        # a fresh operator per call: its block features formed, then one product
        return lambda: lib.ntk.KernelOperator(model, x, kernel=kernel, block_size=250)(Q)
    return lambda: lib.metrics.ntk_gram(model, x, kernel=kernel)


def same(a, b):
    if isinstance(a, dict):
        return set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float):
        return abs(a - b) <= 1e-9
    return torch.equal(a, b) or float((a - b).norm() / a.norm()) < 1e-6
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 7
out = {}
only = [c for c in os.environ.get("AB_CASES", "").split(",") if c]
for name, (make, inp, kernel, *kind) in cases.items():
    if only and name not in only:
        continue
    kind = kind[0] if kind else "gram"
    torch.manual_seed(0)
    m_old, x = make().eval(), inp()
    torch.manual_seed(0)
    m_new = make().eval()
    m0_old, m0_new = copy.deepcopy(m_old), copy.deepcopy(m_new)
    with torch.no_grad():
        for p in list(m_old.parameters()) + list(m_new.parameters()):
            p.mul_(1.1)
    fo = call(old, m_old, x, kernel, kind, m0_old)
    fn = call(new, m_new, x, kernel, kind, m0_new)
    Ko, Kn = fo(), fn()
    assert same(Ko, Kn), name
    for _ in range(2):  # warm-up beyond the first call (allocator, caches), both trees
        fo(), fn()
    t = time.perf_counter(); fo(); fn(); both = time.perf_counter() - t
    inner = max(1, min(20, int(round(0.5 / max(both, 1e-3)))))  # calls per timing: each timing ~0.25 s or more
    ratios, to, tn = [], [], []
    for r in range(reps):
        pair = {}
        for which, f in ((("old", fo), ("new", fn)) if r % 2 == 0 else (("new", fn), ("old", fo))):
            t = time.perf_counter()
            for _ in range(inner):
                f()
            pair[which] = (time.perf_counter() - t) / inner
        ratios.append(pair["new"] / pair["old"]); to.append(pair["old"]); tn.append(pair["new"])
    out[name] = {"calls_per_timing": inner, "median_pair_ratio_new_over_old": statistics.median(ratios), "pair_ratios": ratios,
                 "old_s": to, "new_s": tn, "ratio_of_medians": statistics.median(tn) / statistics.median(to),
                 "ratio_of_minima": min(tn) / min(to)}
    print(f"{name:45s} median pair ratio {statistics.median(ratios):.3f}  ratio of medians "
          f"{statistics.median(tn) / statistics.median(to):.3f}  ratio of minima {min(tn) / min(to):.3f}", flush=True)
    json.dump(out, open(sys.argv[2], "w"), indent=1)
