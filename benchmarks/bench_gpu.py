"""GPU benchmark cases (issue: the CUDA-backed engine on real hardware). They skip without CUDA.

Run by ``bash benchmarks/device.sh bench`` (``pytest benchmarks -m gpu``). Each records its median time and
the peak GPU memory (``torch.cuda.max_memory_allocated`` above what was allocated before the call):

  resnet18-trace-10k   the paper's ResNet18 (ImageNet stem, no BatchNorm, 10 outputs): trace-kernel
                       ntk_alignment with its init on 10,000 CIFAR-shaped inputs (bench_ntk.py has the same
                       case with torch.func on a 40-example subset, extrapolated; see extra_info)
  resnet18-full-1k     the full [n, 10, n, 10] kernel on 1,000 inputs (torch.func on 20, extrapolated)
  ntk backends         the same model on 200 inputs, trace and full, by backend="torch" / "triton" and naive
  ntk precision        the same, tf32=True vs the exact-fp32 default: time and error against float64
  signs-1m             sign similarity on 1,000,000 examples of a 4-layer MLP with 4,096 ReLUs, per backend
  repr-1m              representation alignment on 1,000,000 examples of the same MLP
  epoch-probes         one training epoch (10,000 CIFAR-shaped examples, batch 128, SGD) of the ResNet18
                       with and without one probe round (sign similarity, representation and trace-NTK
                       alignment on 1,000 examples): the probe's overhead as a percentage of the epoch
Extrapolations are labelled as such in extra_info; nothing extrapolated is reported as measured.
"""
import copy
import time

import pytest
import torch
from torch import nn

from lazyhasty import _backend
from lazyhasty.metrics import LinearityProbe, ntk_alignment, ntk_gram, representation_alignment, sign_similarity
from memory import pedantic_with_peak, peak_bytes

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs a CUDA device")]


def _resnet_pair(scale=0.01):
    from ntk_models import ResNet18

    torch.manual_seed(0)
    m0 = ResNet18(64, 10, "imagenet").cuda()
    m = copy.deepcopy(m0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn_like(p))
    return m0, m


def _mlp_4096():
    torch.manual_seed(0)
    layers, d = [], 2
    for _ in range(4):
        layers += [nn.Linear(d, 1024), nn.ReLU()]
        d = 1024
    m0 = nn.Sequential(*layers, nn.Linear(d, 1)).cuda()
    m = copy.deepcopy(m0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m0, m


def _timed(fn, rounds=1):
    fn()  # warm-up (compilation, autotuning, allocator)
    torch.cuda.synchronize()
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


@pytest.mark.parametrize("provider", ["lazyhasty", "torch.func-materialized"])
def test_resnet18_full_kernel_1k(benchmark, provider):
    from bench_ntk import torchfunc_ntk

    m0, _ = _resnet_pair()
    n = 1000 if provider == "lazyhasty" else 20  # J of 20 examples: [20, 10, 11M] floats = 8.8 GB
    x = torch.rand(n, 3, 32, 32, device="cuda")
    if provider == "lazyhasty":
        fn = lambda: ntk_gram(m0, x, kernel="full")  # noqa: E731
    else:
        fn = lambda: torchfunc_ntk(m0, x, "full")  # noqa: E731
    benchmark.extra_info["n"] = n
    benchmark.group = "ntk full resnet18 n=1000 cuda"
    if provider == "lazyhasty":  # a warm-up (the first call compiles and plans) and one timed call, its peak
        pedantic_with_peak(benchmark, fn, "cuda", rounds=1, warmup_rounds=1)
        return
    benchmark.extra_info["peak_mem_bytes"] = peak_bytes(fn, "cuda")
    t = _timed(fn)
    # J is linear in n, J J^T quadratic: the two bounds of a 1,000-example run
    benchmark.extra_info["extrapolated_1000_s_linear_to_quadratic"] = [t * 1000 / n, t * (1000 / n) ** 2]
    benchmark.pedantic(fn, rounds=1, warmup_rounds=1)


@pytest.mark.parametrize("provider", ["torch", "triton", "naive"])
@pytest.mark.parametrize("kernel", ["trace", "full"])
def test_ntk_backends_resnet18(benchmark, kernel, provider):
    """The NTK engine's tile backends on the device, the evidence for its CUDA default (torch: measured
    0.70 vs 1.17 s trace, 0.64 vs 1.63 s full on an H100): the paper's ResNet18, 200 examples, with the
    naive autograd loop (lazyhasty.reference) beside them."""
    from lazyhasty import reference as R

    if provider == "triton" and "triton" not in _backend.available("cuda"):
        pytest.skip(f"triton not available: {_backend._why_not('triton', torch.device('cuda'))}")
    m0, _ = _resnet_pair()
    x = torch.rand(200, 3, 32, 32, device="cuda")
    if provider == "naive":
        fn = lambda: R.ntk_gram(m0, [x], kernel=kernel)  # noqa: E731
    else:
        fn = lambda: ntk_gram(m0, x, kernel=kernel, backend=provider)  # noqa: E731
    benchmark.group = f"ntk {kernel} backends resnet18 n=200 cuda"
    pedantic_with_peak(benchmark, fn, "cuda", rounds=1 if provider == "naive" else 3,
                       warmup_rounds=0 if provider == "naive" else 1)


_FLOAT64_KERNELS: dict = {}


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
@pytest.mark.parametrize("kernel", ["trace", "full"])
def test_ntk_tf32_resnet18(benchmark, kernel, precision):
    """``tf32=True`` against the float32 default (exact fp32, no TF32) on the paper's ResNet18, 200 examples:
    the time, and each kernel's relative Frobenius error against the float64 kernel of the same model and
    inputs (``extra_info["rel_err_vs_float64"]``; README's precision line)."""
    m0, _ = _resnet_pair()
    x = torch.rand(200, 3, 32, 32, device="cuda")
    if kernel not in _FLOAT64_KERNELS:
        _FLOAT64_KERNELS[kernel] = ntk_gram(copy.deepcopy(m0).double(), x.double(), kernel=kernel)
    want = _FLOAT64_KERNELS[kernel]
    fn = lambda: ntk_gram(m0, x, kernel=kernel, tf32=precision == "tf32")  # noqa: E731
    K = fn().double()
    benchmark.extra_info["rel_err_vs_float64"] = float((K - want).norm() / want.norm())
    benchmark.group = f"ntk {kernel} precision resnet18 n=200 cuda"
    pedantic_with_peak(benchmark, fn, "cuda", rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("provider", ["cuda", "triton", "torch", "naive"])
def test_sign_similarity_1m(benchmark, provider):
    from lazyhasty import reference as R

    if provider in ("cuda", "triton") and provider not in _backend.available("cuda"):
        pytest.skip(f"backend {provider} not available: {_backend._why_not(provider, torch.device('cuda'))}")
    m0, m = _mlp_4096()
    n = 1_000_000 if provider != "naive" else 100_000  # the naive masks of 1M x 4096 do not fit
    x = torch.rand(n, 2, device="cuda") * 2 - 1
    loader = list(x.split(65536))
    if provider == "naive":
        fn = lambda: R.sign_similarity(m, loader, m0)  # noqa: E731
    else:
        fn = lambda: sign_similarity(m, loader, m0, backend=provider)  # noqa: E731
    benchmark.extra_info["peak_mem_bytes"] = peak_bytes(fn, "cuda")
    benchmark.extra_info["n"] = n
    benchmark.group = "sign_similarity mlp 4x1024 n=1e6 cuda"
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("centered", [False, True])
def test_representation_alignment_1m(benchmark, centered):
    m0, m = _mlp_4096()
    x = torch.rand(1_000_000, 2, device="cuda") * 2 - 1
    loader = list(x.split(65536))
    fn = lambda: representation_alignment(m, loader, m0, centered=centered)  # noqa: E731
    benchmark.extra_info["peak_mem_bytes"] = peak_bytes(fn, "cuda")
    benchmark.group = "representation_alignment mlp 4x1024 n=1e6 cuda"
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)


def test_epoch_with_and_without_probes(benchmark):
    """Probe overhead: one probe round as a percentage of one training epoch (both measured here)."""
    m0, m = _resnet_pair(scale=0.0)
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(10_000, 3, 32, 32, device="cuda", generator=g)
    y = torch.randint(0, 10, (10_000,), device="cuda", generator=g)
    probe_x = x[:1000]
    probe = LinearityProbe.capture(m0, probe_x)

    def epoch():
        m.train()
        for xb, yb in zip(x.split(128), y.split(128)):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(m(xb), yb).backward()
            opt.step()

    def probe_round():
        out = probe.measure(m)
        out["ntk_alignment"] = ntk_alignment(m, probe_x, m0, kernel="trace")
        return out

    t_epoch = _timed(epoch)
    t_probe = _timed(probe_round)
    benchmark.extra_info.update(epoch_s=t_epoch, probe_round_s=t_probe,
                                probe_overhead_percent=100 * t_probe / t_epoch,
                                probe_peak_mem_bytes=peak_bytes(probe_round, "cuda"),
                                epoch_peak_mem_bytes=peak_bytes(epoch, "cuda"))
    benchmark.group = "epoch vs probe round resnet18 cuda"
    benchmark.pedantic(probe_round, rounds=3, warmup_rounds=0)
