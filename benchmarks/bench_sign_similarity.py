"""sign_similarity vs the naive version (boolean masks of all examples kept in memory).

MLP 2-256-256-256-1, probe sets of n = 1,000 and 20,000 examples in batches of 1,000.
"""
import pytest
import torch
from lazyhasty import reference as R
from lazyhasty.metrics import SignPatterns, sign_similarity
from memory import peak_bytes
from ntk_models import perturbed_pair


def _setup(n, device):
    torch.manual_seed(0)
    return perturbed_pair(n, device)


PROVIDERS = ["naive", "lazyhasty", "lazyhasty-torch-backend", "lazyhasty-patterns"]


@pytest.mark.parametrize("n", [1000, 20000])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_sign_similarity(benchmark, provider, n, device):
    m0, m, loader = _setup(n, device)
    if provider == "naive":
        fn = lambda: R.sign_similarity(m, loader, m0)  # noqa: E731
    elif provider == "lazyhasty":
        fn = lambda: sign_similarity(m, loader, m0)  # noqa: E731
    elif provider == "lazyhasty-torch-backend":
        fn = lambda: sign_similarity(m, loader, m0, backend="torch")  # noqa: E731
    else:
        patterns = SignPatterns.capture(m0, loader)
        fn = lambda: patterns.similarity(m, loader)  # noqa: E731
        benchmark.extra_info["stored_bytes"] = patterns.nbytes
    value = fn()
    benchmark.extra_info["peak_mem_bytes"] = peak_bytes(fn, device)
    benchmark.extra_info["value"] = value
    benchmark.group = f"sign_similarity n={n} {device.type}"
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
    assert value == pytest.approx(R.sign_similarity(m, loader, m0), abs=1e-9)
