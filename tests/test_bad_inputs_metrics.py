"""Bad inputs to the no-grad probes: a clear error naming the argument, never a silent or raw-torch answer
(issue 28: SignPatterns' input check, float64 references, meta tensors, integer inputs, mixed batch shapes)."""
import copy

import pytest
import torch
from torch import nn

from lazyhasty.metrics import LinearityProbe, SignPatterns, representation_alignment, sign_similarity


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))


def _images(n=12):
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("change", ["hflip", "permute pixels", "swap two examples", "one value by 1 ulp"])
def test_sign_patterns_detect_any_change_of_the_inputs(change):
    net, x = _net(), _images()
    init = SignPatterns.capture(copy.deepcopy(net), x)
    assert init.similarity(net, x) == 1.0
    if change == "hflip":
        other = x.flip(-1)
    elif change == "permute pixels":
        other = x.reshape(12, -1)[:, torch.randperm(16, generator=torch.Generator().manual_seed(0))].reshape(x.shape)
    elif change == "swap two examples":
        other = x[[1, 0, *range(2, 12)]]
    else:
        other = x.clone()
        other[5, 0, 2, 1] = torch.nextafter(other[5, 0, 2, 1], torch.tensor(float("inf")))
    with pytest.raises(ValueError, match="differs from the captured probe set"):
        init.similarity(net, other)


def test_a_float64_reference_of_a_float32_model_works_as_in_ntk_alignment():
    net, x = _net(), _images()
    moved = _net(1)
    ref64 = copy.deepcopy(net).double()
    assert sign_similarity(moved, x, ref64) == pytest.approx(sign_similarity(moved, x, net), abs=1e-12)
    assert representation_alignment(moved, x, ref64) == pytest.approx(representation_alignment(moved, x, net),
                                                                      abs=1e-6)
    probe = LinearityProbe.capture(ref64, x)
    got = probe.measure(moved)
    assert got["repr_alignment"] == pytest.approx(representation_alignment(moved, x, net), abs=1e-6)


@pytest.mark.parametrize("fn", [sign_similarity, representation_alignment])
def test_meta_tensors_are_named(fn):
    net, x = _net(), _images()
    with pytest.raises(ValueError, match="loader's inputs are on the meta device"):
        fn(net, torch.empty(4, 1, 4, 4, device="meta"), copy.deepcopy(net))
    with pytest.raises(ValueError, match="model has tensors on the meta device"):
        fn(copy.deepcopy(net).to("meta"), x, net)
    with pytest.raises(ValueError, match="reference has tensors on the meta device"):
        fn(net, x, copy.deepcopy(net).to("meta"))


@pytest.mark.parametrize("fn", [sign_similarity, representation_alignment])
def test_integer_inputs_to_a_float_model_are_named(fn):
    net = _net()
    with pytest.raises(ValueError, match="loader's inputs are torch.int64 but the reference computes in torch.float32"):
        fn(net, torch.randint(0, 5, (6, 1, 4, 4)), copy.deepcopy(net))


@pytest.mark.parametrize("fn", [sign_similarity, representation_alignment])
def test_batches_of_different_shapes_are_named(fn):
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    loader = [torch.randn(4, 1, 6, 6), torch.randn(4, 1, 8, 8)]  # the model takes both: no torch error to lean on
    with pytest.raises(ValueError, match=r"batch 1 of the loader has examples of shape \(1, 8, 8\)"):
        fn(net, loader, copy.deepcopy(net))
