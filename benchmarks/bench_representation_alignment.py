"""representation_alignment (streamed d x d) vs the naive version (n x n Gram matrices).

MLP 2-256-256-256-1; phi = input of the last Linear (d = 256); n = 1,000 and 20,000; batches of 1,000.
"""
import pytest
import torch
from lazyhasty.metrics import representation_alignment
from memory import peak_bytes
from ntk_models import perturbed_pair


def naive_representation_alignment(model, loader, reference):
    """What one writes first: keep all features, form both n x n Grams, reduce in float64."""
    def feats(mod):
        got = []
        h = mod[-1].register_forward_pre_hook(lambda m, a: got.append(a[0].detach()))
        with torch.no_grad():
            for x in loader:
                mod(x)
        h.remove()
        return torch.cat(got)
    phi, phi0 = feats(model), feats(reference)
    K, K0 = phi @ phi.T, phi0 @ phi0.T
    cross = (K.double() * K0.double()).sum()
    return (cross / (K.double().norm() * K0.double().norm())).item()


def _setup(n, device):
    torch.manual_seed(0)
    return perturbed_pair(n, device)


@pytest.mark.parametrize("n", [1000, 20000])
@pytest.mark.parametrize("provider", ["naive", "lazyhasty"])
def test_representation_alignment(benchmark, provider, n, device):
    m0, m, loader = _setup(n, device)
    if provider == "naive":
        fn = lambda: naive_representation_alignment(m, loader, m0)  # noqa: E731
    else:
        fn = lambda: representation_alignment(m, loader, m0)  # noqa: E731
    value = fn()
    benchmark.extra_info["peak_mem_bytes"] = peak_bytes(fn, device)
    benchmark.extra_info["value"] = value
    benchmark.group = f"representation_alignment n={n} {device.type}"
    benchmark.pedantic(fn, rounds=3 if n > 5000 else 5, warmup_rounds=0 if n > 5000 else 1)
    if provider == "lazyhasty" and n <= 1000:
        assert value == pytest.approx(naive_representation_alignment(m, loader, m0), rel=1e-5)
