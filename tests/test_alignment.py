"""kernel_alignment and the streamed representation_alignment against reference.py."""
import pytest
import torch
from torch import nn

from lazyhasty import reference as R
from lazyhasty.metrics import kernel_alignment, representation_alignment

from models import SmallCNN, batches, mlp, perturbed


def gram(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, d, generator=g, dtype=torch.float64)
    return f @ f.T


@pytest.mark.parametrize("centered", [False, True])
def test_kernel_alignment_matches_reference(centered):
    K1, K2 = gram(37, 5, 0), gram(37, 9, 1)
    assert kernel_alignment(K1, K2, centered=centered) == pytest.approx(
        R.kernel_alignment(K1, K2, centered=centered), rel=1e-12)
    K4a, K4b = torch.randn(6, 3, 18).double(), torch.randn(6, 3, 18).double()
    K4a = torch.einsum("iap,jbp->iajb", K4a, K4a)
    K4b = torch.einsum("iap,jbp->iajb", K4b, K4b)
    assert kernel_alignment(K4a, K4b, centered=centered) == pytest.approx(
        R.kernel_alignment(K4a, K4b, centered=centered), rel=1e-12)


def test_kernel_alignment_properties():
    K = gram(20, 4)
    assert kernel_alignment(K, 3.0 * K) == pytest.approx(1.0, rel=1e-14)
    assert kernel_alignment(K.float(), K) == pytest.approx(1.0, rel=1e-6)
    a = torch.zeros(4, 4)
    a[0, 0] = 1
    b = torch.zeros(4, 4)
    b[1, 1] = 1
    assert kernel_alignment(a, b) == 0.0


def test_kernel_alignment_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        kernel_alignment(gram(3, 2), gram(4, 2))
    with pytest.raises(ValueError, match=r"\[n, n\]"):
        kernel_alignment(torch.ones(3, 4), torch.ones(3, 4))
    with pytest.raises(ValueError, match="zero Frobenius"):
        kernel_alignment(torch.zeros(3, 3), gram(3, 2))
    with pytest.raises(ValueError, match="NaN"):
        kernel_alignment(torch.full((3, 3), float("nan")), gram(3, 2))
    with pytest.raises(TypeError, match="floating"):
        kernel_alignment(torch.ones(3, 3, dtype=torch.int64), gram(3, 2))


def _pair(kind="mlp"):
    if kind == "mlp":
        m0 = mlp((2, 31, 1007, 3))
        x = torch.randn(513, 2)
    else:
        m0 = SmallCNN()
        x = torch.randn(300, 1, 9, 9)
    return m0, perturbed(m0, 0.2), x


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("size", [1, 7, 128, 513])
def test_streamed_equals_n_by_n_definition_for_any_batching(centered, size):
    m0, m, x = _pair()
    # same batching in the reference: fp32 forwards differ in the last bits with the batch size
    want = R.representation_alignment(m, batches(x, size), m0, centered=centered)
    assert 0.5 < want < 0.999
    assert want == pytest.approx(R.representation_alignment(m, [x], m0, centered=centered), rel=1e-6)
    got = representation_alignment(m, batches(x, size), m0, centered=centered, dtype=torch.float64)
    assert got == pytest.approx(want, rel=1e-10)
    got32 = representation_alignment(m, batches(x, size), m0, centered=centered)
    assert got32 == pytest.approx(want, rel=1e-5)


def test_mean_of_per_batch_alignments_is_not_the_alignment():
    # The pitfall the streamed form avoids: averaging per-batch alignments is not KA over all n.
    m0, m, x = _pair()
    whole = R.representation_alignment(m, [x], m0)
    per_batch = sum(R.representation_alignment(m, [c], m0) for c in x.split(64)) / len(x.split(64))
    assert abs(per_batch - whole) > 1e-4
    assert representation_alignment(m, batches(x, 64), m0, dtype=torch.float64) == pytest.approx(whole, rel=1e-10)


def test_layer_choice():
    m0, m, x = _pair("cnn")
    default = representation_alignment(m, x, m0, dtype=torch.float64)
    assert default == pytest.approx(R.representation_alignment(m, [x], m0), rel=1e-10)
    assert representation_alignment(m, x, m0, layer="fc2", where="input", dtype=torch.float64) == default
    assert representation_alignment(m, x, m0, layer=m.fc2, where="input", dtype=torch.float64) == default
    pooled = representation_alignment(m, x, m0, layer="pool", dtype=torch.float64)
    assert pooled == pytest.approx(R.representation_alignment(m, [x], m0, layer="pool"), rel=1e-10)
    assert pooled != default
    assert representation_alignment(m, x, m.state_dict(), layer="conv1") == pytest.approx(1.0, abs=1e-12)


def test_bad_inputs():
    m0, m, x = _pair()
    with pytest.raises(ValueError, match="no nn.Linear"):
        representation_alignment(nn.Sequential(nn.ReLU()), x, nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="no submodule named"):
        representation_alignment(m, x, m0, layer="head")
    with pytest.raises(ValueError, match="empty"):
        representation_alignment(m, [], m0)
    with pytest.raises(ValueError, match="architecture"):
        representation_alignment(m, x, mlp((2, 31, 1000, 3)))
    with pytest.raises(ValueError, match="NaN"):
        representation_alignment(m, torch.full((5, 2), float("nan")), m0)
    dead = mlp((2, 4, 3))
    with torch.no_grad():
        dead[0].bias.fill_(-100.0)
    with pytest.raises(ValueError, match="zero Frobenius"):
        representation_alignment(dead, torch.rand(8, 2), dead)
