"""Empirical NTK: lazyhasty vs naive autograd, torch.func vmap(jacrev), nngeometry and neural-tangents
(the last two when installed; neural-tangents gets a JAX twin of each model with the same weights).

Cases (CPU sizes the issue anchored its targets on):
  mlp-full     MLP 2-256-256-256-1, n = 1000, kernel="full"
  cnn-full     3 convs + linear on 3x32x32, n = 256, k = 10, "full"   (+ the J @ J.T and symmetric floors)
  cnn-trace    same, "trace"
  plain-cnn-full  issue 12's plain CNN (3 convs, global average pool, linear), n = 256, k = 10 (+ both floors)
  plain-cnn-trace same, "trace"
                  (the full CNN cases also time ``lazyhasty-features``: the engine's per-example work, no products)
  resnet-full  ResNet18 layout at width 16 without BatchNorm (0.7M params), n = 128, k = 10, "full"
  resnet-trace same, "trace"
  mlp-align    ntk_alignment of the MLP with its init on n = 20,000 (peak memory recorded)
Slow providers run one round; compare medians as ratios within one JSON.
"""
import copy

import pytest
import torch
from torch.func import functional_call, jacrev, vmap

from lazyhasty import reference as R
from lazyhasty.metrics import ntk_alignment, ntk_gram
from lazyhasty.ntk.forms import symmetric_gram
from memory import peak_bytes
from ntk_models import cnn3, mlp_256, resnet18_w16
from zoo_models import plain_cnn

try:
    from nngeometry.backend import TorchHooksJacobianBackend
    from nngeometry.object import FMatDense
except Exception:  # noqa: BLE001
    FMatDense = None

try:  # neural-tangents 0.6.5 runs with jax 0.4.23 (numpy < 2, tensorflow 2.15): see results/README.md
    import jax
    import neural_tangents as nt

    jax.config.update("jax_default_matmul_precision", "highest")
except Exception:  # noqa: BLE001
    nt = None

CASES = {
    "mlp-full": (mlp_256, (1000, 2), "full"),
    "cnn-full": (cnn3, (256, 3, 32, 32), "full"),
    "cnn-trace": (cnn3, (256, 3, 32, 32), "trace"),
    "plain-cnn-full": (plain_cnn, (256, 3, 32, 32), "full"),
    "plain-cnn-trace": (plain_cnn, (256, 3, 32, 32), "trace"),
    "resnet-full": (resnet18_w16, (128, 3, 32, 32), "full"),
    "resnet-trace": (resnet18_w16, (128, 3, 32, 32), "trace"),
}


def torchfunc_jacobian(model, x):
    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).reshape(-1)

    J = vmap(jacrev(f), in_dims=(None, 0))(params, x)
    return torch.cat([J[n].reshape(x.shape[0], J[n].shape[1], -1) for n in params], -1)


def torchfunc_ntk(model, x, kernel):
    J = torchfunc_jacobian(model, x)
    if kernel == "full":
        return torch.einsum("iap,jbp->iajb", J, J)
    return sum(J[:, a] @ J[:, a].T for a in range(J.shape[1]))


def nngeometry_ntk(model, x):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=256)
    return FMatDense(TorchHooksJacobianBackend(model), examples=loader).data


PROVIDERS = ["lazyhasty", "lazyhasty-jacobian", "torch.func", "naive", "nngeometry", "nt-jacobian", "nt-structured",
             "jjt-floor", "sym-floor", "lazyhasty-features"]


def engine_features(model, x, kernel):
    """What ``ntk_gram`` computes before its products: the per-example factors of every block of its plan
    (forward, the k backward passes, per-example gradients), none of the Gram. ``lazyhasty`` minus this is the
    time of the products; this alone bounds the ratio to the symmetric floor from below."""
    from lazyhasty._malloc import retained_heap
    from lazyhasty.ntk import Featurizer, explain

    block = explain(model, x, kernel=kernel).block_size
    fz = Featurizer(model, "auto", kernel, None)
    fz.plan_for_pairs((x.shape[0] + 1) / 2)  # as ntk_gram sets it: the same cost model, the same forms

    @retained_heap()
    def fn():
        return [fz(xb) for xb in x.split(block)]
    return fn


def neural_tangents_ntk(model, x, kernel, provider, benchmark):
    """neural-tangents' empirical NTK of the same function (JAX twin with the same weights), jitted; its
    agreement with lazyhasty is recorded beside the time."""
    import numpy as np

    from ntk_models_jax import as_numpy, jax_model

    f, params = jax_model(model)
    impl = {"nt-jacobian": nt.NtkImplementation.JACOBIAN_CONTRACTION,
            "nt-structured": nt.NtkImplementation.STRUCTURED_DERIVATIVES}[provider]
    kfn = jax.jit(nt.empirical_ntk_fn(f, trace_axes=() if kernel == "full" else (-1,), vmap_axes=0,
                                      implementation=impl))
    xj = as_numpy(x)

    def fn():
        return kfn(xj, None, params).block_until_ready()

    K = np.asarray(fn())  # compiles
    # neural-tangents' trace_axes average over the outputs: its trace kernel is ours / k
    K = K.transpose(0, 2, 1, 3) if kernel == "full" else K * model(x[:1]).shape[1]
    ours = ntk_gram(model, x, kernel=kernel).numpy()
    benchmark.extra_info["rel_err_vs_lazyhasty"] = float(np.linalg.norm(K - ours) / np.linalg.norm(ours))
    return fn


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_ntk_gram(benchmark, case, provider, device):
    make, shape, kernel = CASES[case]
    torch.manual_seed(0)
    model = make().to(device)
    x = torch.rand(shape, device=device) * 2 - 1
    # the anchors that take tens of seconds run once; lazyhasty always gets a warm-up round
    slow = provider in ("naive", "nngeometry") or (case.startswith("resnet") and provider != "lazyhasty")
    warmup = 0 if slow or provider.startswith("nt-") else 1  # neural-tangents: compiled before timing
    if provider == "lazyhasty":
        fn = lambda: ntk_gram(model, x, kernel=kernel)  # noqa: E731
    elif provider == "lazyhasty-jacobian":
        fn = lambda: ntk_gram(model, x, kernel=kernel, implementation="jacobian")  # noqa: E731
    elif provider == "torch.func":
        fn = lambda: torchfunc_ntk(model, x, kernel)  # noqa: E731
    elif provider == "naive":
        fn = lambda: R.ntk_gram(model, [x], kernel=kernel)  # noqa: E731
    elif provider == "nngeometry":
        if FMatDense is None:
            pytest.skip("nngeometry not installed (pip install --no-deps nngeometry)")
        if kernel != "full":
            pytest.skip("nngeometry computes the full kernel only")
        fn = lambda: nngeometry_ntk(model, x)  # noqa: E731
    elif provider.startswith("nt-"):
        if nt is None:
            pytest.skip("neural-tangents not installed (it needs jax 0.4.x)")
        if device.type != "cpu":
            pytest.skip("neural-tangents runs on the CPU here")
        fn = neural_tangents_ntk(model, x, kernel, provider, benchmark)
    elif provider == "lazyhasty-features":
        if case not in ("cnn-full", "plain-cnn-full"):  # (the trace kernels reduce inside one pass instead)
            pytest.skip("the per-example work alone is recorded for the full kernels of the CNNs only")
        fn = engine_features(model, x, kernel)
    else:
        if case not in ("cnn-full", "plain-cnn-full"):
            pytest.skip("the J @ J.T floors are recorded for the full kernels of the CNNs only")
        J = torchfunc_jacobian(model, x).reshape(-1, sum(p.numel() for p in model.parameters()))
        # sym-floor: the upper block triangle of J Jᵀ (8 row blocks here), lazyhasty's own symmetric product
        fn = (lambda: J @ J.T) if provider == "jjt-floor" else (lambda: symmetric_gram(J))  # noqa: E731
    benchmark.group = f"ntk {case} {device.type}"
    benchmark.extra_info["n"] = shape[0]
    benchmark.pedantic(fn, rounds=1 if slow else 3, warmup_rounds=warmup)


@pytest.mark.parametrize("provider", ["lazyhasty", "lazyhasty-nocache"])
def test_ntk_alignment_n20000(benchmark, provider, device):
    torch.manual_seed(0)
    m0 = mlp_256().to(device)
    m = copy.deepcopy(m0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(20000, 2, device=device) * 2 - 1
    kw = {"max_cache_bytes": 0} if provider.endswith("nocache") else {}
    fn = lambda: ntk_alignment(m, x, m0, **kw)  # noqa: E731
    benchmark.extra_info["peak_mem_bytes"] = peak_bytes(fn, device)
    benchmark.group = f"ntk_alignment mlp n=20000 {device.type}"
    benchmark.pedantic(fn, rounds=1, warmup_rounds=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU case: ResNet18 on 10,000 CIFAR-shaped inputs")
@pytest.mark.parametrize("provider", ["lazyhasty", "torch.func-materialized"])
def test_resnet18_trace_alignment_gpu(benchmark, provider):
    """The paper's ResNet18 (ImageNet stem, no BatchNorm, 10 outputs): trace-kernel alignment with init.

    torch.func materializes J ([n, 10, 11M] floats: 440 MB per example), so it runs on 40 examples and its
    time at 10,000 is extrapolated (extra_info, labelled): between linear (forming J dominates) and
    quadratic (the J J^T products dominate) in n.
    """
    import time

    from memory import pedantic_with_peak, peak_bytes
    from ntk_models import ResNet18

    torch.manual_seed(0)
    m0 = ResNet18(64, 10, "imagenet").cuda()
    m = copy.deepcopy(m0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    n = 10000 if provider == "lazyhasty" else 40
    x = torch.rand(n, 3, 32, 32, device="cuda")
    if provider == "lazyhasty":
        fn = lambda: ntk_alignment(m, x, m0, kernel="trace")  # noqa: E731
    else:
        def fn():
            Ks = []
            for mod in (m, m0):
                J = torchfunc_jacobian(mod, x)
                Ks.append(sum(J[:, a] @ J[:, a].T for a in range(J.shape[1])))
                del J
            return (Ks[0] * Ks[1]).sum() / (Ks[0].norm() * Ks[1].norm())
    benchmark.extra_info["n"] = n
    benchmark.group = "ntk_alignment resnet18 trace cuda"
    if provider == "lazyhasty":  # one call (~40 s on an H100): its time and its peak
        pedantic_with_peak(benchmark, fn, "cuda", rounds=1, warmup_rounds=0)
        return
    benchmark.extra_info["peak_mem_bytes"] = peak_bytes(fn, "cuda")
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter() - t
    benchmark.extra_info["extrapolated_10000_s_linear_to_quadratic"] = [t * 10000 / n, t * (10000 / n) ** 2]
    benchmark.pedantic(fn, rounds=1, warmup_rounds=0)


def test_ntk_eigh_n20000(benchmark, device):
    """Top-20 eigenpairs of the MLP's trace NTK on 20,000 examples: streamed (the kernel would be 3.2 GB)."""
    from lazyhasty.kernels import ntk_eigh

    torch.manual_seed(0)
    m = mlp_256().to(device)
    x = torch.rand(20000, 2, device=device) * 2 - 1
    fn = lambda: ntk_eigh(m, x, 20, tol=1e-6)  # noqa: E731
    benchmark.extra_info["peak_mem_bytes"] = peak_bytes(fn, device)
    lam, _ = fn()
    benchmark.extra_info["top_eigenvalues"] = lam[:5].tolist()
    benchmark.group = f"ntk_eigh mlp n=20000 r=20 {device.type}"
    benchmark.pedantic(fn, rounds=1, warmup_rounds=0)


def test_cross_kernel_speed_per_entry(benchmark, device):
    """The cross kernel K(X1, X2) at the Gram's speed per entry: 1,000 x 1,000 cross vs the 1,000 Gram."""
    torch.manual_seed(0)
    m = cnn3().to(device)
    x1, x2 = torch.rand(128, 3, 32, 32, device=device), torch.rand(128, 3, 32, 32, device=device)
    t = {}
    import time as _time
    for name, fn in (("gram", lambda: ntk_gram(m, x1, kernel="trace")),
                     ("cross", lambda: ntk_gram(m, x1, loader2=x2, kernel="trace"))):
        fn()
        t0 = _time.perf_counter()
        fn()
        t[name] = _time.perf_counter() - t0
    # the Gram computes i <= j only: half the entries of the cross kernel of the same size
    benchmark.extra_info.update(gram_s=t["gram"], cross_s=t["cross"], cross_per_entry_over_gram=t["cross"] / t["gram"])
    benchmark.group = f"ntk cross vs gram cnn n=128 {device.type}"
    benchmark.pedantic(lambda: ntk_gram(m, x1, loader2=x2, kernel="trace"), rounds=1, warmup_rounds=0)
