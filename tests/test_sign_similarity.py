"""sign_similarity / SignPatterns against reference.sign_similarity on every backend."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lazyhasty import reference as R
from lazyhasty.metrics import SignPatterns, sign_similarity

from conftest import CPU_BACKENDS, CUDA_BACKENDS
from models import SmallCNN, batches, mlp, perturbed


def _pair(kind):
    if kind == "mlp":  # units 1, 31, 1007 per layer: none divides a 32-bit word evenly but 31 < 32
        m0 = mlp((2, 1, 31, 1007, 1))
        x = torch.randn(513, 2)
    else:
        m0 = SmallCNN()
        x = torch.randn(513, 1, 9, 9)
    return m0, perturbed(m0), x


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("n", [1, 513])
def test_matches_reference(backend, kind, n):
    m0, m, x = _pair(kind)
    x = x[:n]
    want = R.sign_similarity(m, [x], m0)
    assert 0.3 < want < 0.99 or n == 1  # the perturbation flips a real fraction of signs
    got = sign_similarity(m, batches(x, 200), m0, backend=backend)
    assert got == pytest.approx(want, abs=1e-12)
    per = sign_similarity(m, batches(x, 200), m0, reduction="none", backend=backend)
    assert torch.allclose(per, R.sign_similarity(m, [x], m0, reduction="none"), atol=1e-12)
    patterns = SignPatterns.capture(m0, batches(x, 100), backend=backend)
    assert patterns.similarity(m, batches(x, 100), backend=backend) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_matches_reference(backend):
    m0, m, x = _pair("cnn")
    want = R.sign_similarity(m, [x], m0)
    got = sign_similarity(m.cuda(), batches(x, 100), m0.cuda(), backend=backend)
    assert got == pytest.approx(want, abs=1e-6)  # GPU convs may round a few near-zero units differently
    patterns = SignPatterns.capture(m0.cuda(), batches(x, 100), backend=backend)
    assert patterns.similarity(m.cuda(), batches(x, 100), backend=backend) == pytest.approx(got, abs=1e-12)


def test_reused_relu_module_counts_every_call():
    m0, m, x = _pair("cnn")
    # SmallCNN calls self.relu twice: both calls (5*9*9 and 5*5*5 units) plus act (7 units) are pooled.
    patterns = SignPatterns.capture(m0, x)
    assert patterns.sites == ["relu", "relu#1", "act"]
    assert patterns.units == [5 * 9 * 9, 5 * 5 * 5, 7]
    assert patterns.nbytes == 513 * 4 * sum(math.ceil(u / 32) for u in patterns.units)


@pytest.mark.parametrize("size", [1, 7, 100, 513])
@pytest.mark.parametrize("form", ["tensor", "tuple", "dict"])
def test_batching_and_batch_forms_do_not_matter(size, form):
    m0, m, x = _pair("mlp")
    want = R.sign_similarity(m, [x], m0)
    assert sign_similarity(m, batches(x, size, form), m0) == pytest.approx(want, abs=1e-12)


def test_dataloader_shuffled_is_fine_for_the_paired_form():
    m0, m, x = _pair("mlp")
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=64, shuffle=True)
    assert sign_similarity(m, loader, m0) == pytest.approx(R.sign_similarity(m, [x], m0), abs=1e-12)


def test_state_dict_reference_and_identity():
    m0, m, x = _pair("cnn")
    assert sign_similarity(m, x, m0.state_dict()) == sign_similarity(m, x, m0)
    assert sign_similarity(m, x, m) == 1.0
    assert SignPatterns.capture(m, x).similarity(m, x) == 1.0


def test_modules_subset_by_module_and_name():
    m0, m, x = _pair("cnn")
    got = sign_similarity(m, x, m0, modules=[m.act])
    assert got == sign_similarity(m, x, m0, modules=["act"])
    assert got == pytest.approx(R.sign_similarity(m, [x], m0, modules=["act"]), abs=1e-12)


def test_eval_mode_is_used_and_restored():
    m0 = nn.Sequential(nn.Linear(3, 50), nn.Dropout(0.5), nn.ReLU(), nn.Linear(50, 1))
    m0.train()
    x = torch.randn(64, 3)
    assert sign_similarity(m0, x, copy.deepcopy(m0)) == 1.0  # dropout off: deterministic patterns
    assert m0.training and m0[1].training


def test_bad_inputs():
    m0, m, x = _pair("mlp")
    with pytest.raises(ValueError, match="empty"):
        sign_similarity(m, [], m0)
    with pytest.raises(ValueError, match="empty"):
        sign_similarity(m, [x[:0]], m0)
    with pytest.raises(ValueError, match="architecture"):
        sign_similarity(m, x, mlp((2, 1, 31, 1006, 1)))
    with pytest.raises(ValueError, match="architecture"):
        sign_similarity(m, x, {"0.weight": torch.zeros(1, 2)})
    with pytest.raises(ValueError, match="no ReLU ran"):
        sign_similarity(nn.Linear(2, 3), x, nn.Linear(2, 3))
    with pytest.raises(ValueError, match="no submodule named"):
        sign_similarity(m, x, m0, modules=["nope"])
    with pytest.raises(ValueError, match="NaN"):
        sign_similarity(m, torch.full((4, 2), float("nan")), m0)
    with pytest.raises(TypeError, match="reference must be"):
        sign_similarity(m, x, 3)
    with pytest.raises(ValueError, match="'x'"):
        sign_similarity(m, [{"inputs": x}], m0)
    with pytest.raises(ValueError, match="reduction"):
        sign_similarity(m, x, m0, reduction="sum")


def test_sign_patterns_refuse_a_different_probe_set():
    m0, m, x = _pair("mlp")
    patterns = SignPatterns.capture(m0, batches(x, 100))
    with pytest.raises(ValueError, match="same order"):
        patterns.similarity(m, batches(x[torch.randperm(len(x))], 100))
    with pytest.raises(ValueError, match="yielded 500"):
        patterns.similarity(m, batches(x[:500], 100))
    with pytest.raises(ValueError, match="more than"):
        patterns.similarity(m, batches(torch.cat([x, x[:3]]), 100))
    other = mlp((2, 1, 31, 1006, 1))
    with pytest.raises(ValueError, match="same architecture"):
        patterns.similarity(other, batches(x, 100))


def test_linearity_probe_shares_one_forward_and_matches_the_separate_metrics():
    from lazyhasty.metrics import LinearityProbe, representation_alignment

    m0, m, x = _pair("cnn")
    probe = LinearityProbe.capture(m0, x, batch_size=100)
    calls = []
    h = m.register_forward_hook(lambda *a: calls.append(1))
    got = probe.measure(m)
    h.remove()
    assert len(calls) == len(x.split(100))  # one forward of the model per batch for both probes
    assert got["sign_similarity"] == pytest.approx(sign_similarity(m, x, m0), abs=1e-12)
    assert got["repr_alignment"] == pytest.approx(representation_alignment(m, batches(x, 100), m0), rel=1e-6)
    no_relu = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1))
    only_repr = LinearityProbe.capture(no_relu, torch.randn(10, 2)).measure(no_relu)
    assert set(only_repr) == {"repr_alignment"} and only_repr["repr_alignment"] == pytest.approx(1.0)


class _FunctionalReLUs(nn.Module):
    """ReLUs written every way people write them: F.relu, torch.relu, Tensor.relu_, clamp(min=0), clamp_min,
    an nn.ReLU module (whose own F.relu must not count twice), and a clamp with an upper bound (not a ReLU)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d, self.e = (nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8),
                                                  nn.Linear(8, 2))
        self.act = nn.ReLU()

    def forward(self, x):
        h = torch.nn.functional.relu(self.a(x))
        h = torch.relu(self.b(h))
        h = self.c(h).relu_()
        h = self.act(self.d(h).clamp(min=0) + torch.clamp_min(h, 0.0))
        return self.e(h.clamp(-1.0, 1.0))


def test_functional_relus_count_like_relu_modules():
    torch.manual_seed(0)
    m0 = _FunctionalReLUs().double()
    m = perturbed(m0, 0.3)
    x = torch.randn(37, 3, dtype=torch.float64)
    init = SignPatterns.capture(m0, x.split(10))
    assert init.functional
    assert init.sites == [":relu", ":relu#1", ":relu#2", ":clamp", ":clamp#1", "act"]
    assert init.units == [8] * 6
    want = R.sign_similarity(m, [x], m0)
    # by hand: every ReLU's on/off pattern, the nn.ReLU counted once
    def masks(net):
        h1 = torch.relu(net.a(x)); h2 = torch.relu(net.b(h1)); h3 = torch.relu(net.c(h2)); h4 = torch.relu(net.d(h3))
        h5 = torch.relu(h4 + h3)
        return torch.cat([h1, h2, h3, h4, h3, h5], 1) > 0
    with torch.no_grad():
        by_hand = (masks(m) == masks(m0)).double().mean().item()
    assert want == pytest.approx(by_hand, abs=1e-15)
    assert sign_similarity(m, x.split(8), m0) == pytest.approx(want, abs=1e-15)
    assert init.similarity(m, x.split(10)) == pytest.approx(want, abs=1e-15)
    # modules= given: only those modules, no functional sites
    only = sign_similarity(m, x, m0, modules=["act"])
    assert only == pytest.approx(R.sign_similarity(m, [x], m0, modules=["act"]), abs=1e-15)
    # the linearity probe reads the same sites
    from lazyhasty.metrics import LinearityProbe

    probe = LinearityProbe.capture(m0, x, batch_size=16)
    assert probe.measure(m)["sign_similarity"] == pytest.approx(want, abs=1e-15)


def test_architectures_without_functional_relus_keep_their_sites():
    m0 = mlp((2, 5, 4, 1))
    init = SignPatterns.capture(m0, torch.randn(6, 2))
    assert not init.functional and all(":" not in s for s in init.sites)
