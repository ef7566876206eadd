"""NTK engine: every implementation vs the naive spec on a zoo of architectures; streamed alignment."""
import copy

import pytest
import torch
from torch import nn

from lazyhasty import reference as R
from lazyhasty.metrics import kernel_alignment, ntk_alignment, ntk_gram
from lazyhasty.ntk import Featurizer, explain

from ntk_zoo import ZOO


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _model(name, dtype):
    torch.manual_seed(0)
    m, x = ZOO[name]()
    m = m.to(dtype)
    return m, (x.to(dtype) if x.is_floating_point() else x)


@pytest.mark.parametrize("kernel", ["full", "trace", "diagonal"])
@pytest.mark.parametrize("implementation", ["jacobian", "layerwise"])
@pytest.mark.parametrize("name", list(ZOO))
def test_float64_matches_naive(name, implementation, kernel):
    m, x = _model(name, torch.float64)
    want = R.ntk_gram(m, [x], kernel=kernel)
    got = ntk_gram(m, [x[:2], x[2:]], kernel=kernel, implementation=implementation, block_size=3)
    assert got.shape == want.shape
    assert _rel(got, want) <= 1e-10


@pytest.mark.parametrize("kernel", ["full", "trace", "diagonal"])
@pytest.mark.parametrize("name", ["cnn_strided", "tied_and_outside_use"])
def test_features_beyond_the_cache_are_recomputed(name, kernel):
    m, x = _model(name, torch.float64)
    want = R.ntk_gram(m, [x], kernel=kernel)
    for cache in (0, 1 << 16):  # nothing kept; some blocks kept
        got = ntk_gram(m, x, kernel=kernel, block_size=2, max_cache_bytes=cache)
        assert _rel(got, want) <= 1e-10


def test_layer_check_runs_once_per_model_structure():
    m, x = _model("tied_and_outside_use", torch.float64)
    want = R.ntk_gram(m, [x], kernel="trace")
    assert _rel(ntk_gram(m, x, kernel="trace"), want) <= 1e-10
    fz = Featurizer(m, "layerwise", "trace", None)
    assert fz.verified  # from the first call: the same layers are in the fallback, without a new check
    assert set(fz.describe()["generic"]) == {"emb.weight", "proj.weight", "proj.bias"}
    assert _rel(fz.trace_gram(x), want) <= 1e-10
    # the weight now used outside its module's forward belongs to a new module: checked again
    m.proj = nn.Linear(6, 6).double()
    fz = Featurizer(m, "layerwise", "trace", None)
    assert not fz.verified
    assert _rel(fz.trace_gram(x), R.ntk_gram(m, [x], kernel="trace")) <= 1e-10
    assert set(fz.describe()["generic"]) == {"emb.weight", "proj.weight", "proj.bias"}


def test_channels_last_falls_back_for_models_that_need_contiguous_inputs():
    class ViewNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 5 * 5, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).view(x.shape[0], -1))  # needs the standard layout

    torch.manual_seed(0)
    m, x = ViewNet().double(), torch.randn(6, 3, 5, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        m(x.contiguous(memory_format=torch.channels_last))
    fz = Featurizer(m, "layerwise", "trace", None)
    K = fz.trace_gram(x)
    assert not fz.channels_last
    assert _rel(K, R.ntk_gram(m, [x], kernel="trace")) <= 1e-10
    assert _rel(ntk_gram(m, x), R.ntk_gram(m, [x])) <= 1e-10


@pytest.mark.parametrize("implementation", ["jacobian", "layerwise", "naive"])
@pytest.mark.parametrize("name", list(ZOO))
def test_float32_matches_naive(name, implementation):
    m, x = _model(name, torch.float32)
    want = R.ntk_gram(m.double(), [x.double() if x.is_floating_point() else x], kernel="full")
    m = m.float()
    got = ntk_gram(m, x, implementation=implementation)
    assert got.dtype == torch.float32
    assert _rel(got, want) <= 1e-5


def test_dtype_argument_computes_in_float64():
    m, x = _model("cnn_strided", torch.float32)
    want = R.ntk_gram(copy.deepcopy(m).double(), [x.double()])
    got = ntk_gram(m, x, dtype=torch.float64)
    assert got.dtype == torch.float64 and _rel(got, want) <= 1e-10
    assert next(m.parameters()).dtype == torch.float32  # the user's model is untouched


def test_layerwise_uses_the_exact_forms_it_should():
    m, x = _model("tied_and_outside_use", torch.float64)
    fz = Featurizer(m, "layerwise", "full", None)
    fz(x)
    d = fz.describe()
    # tied weight and the weight used outside its module go to the exact torch.func fallback
    assert set(d["generic"]) == {"emb.weight", "proj.weight", "proj.bias"}
    m, x = _model("generic_params", torch.float64)
    fz = Featurizer(m, "layerwise", "full", None)
    fz(x)
    assert set(fz.describe()["generic"]) == {"act.weight", "scale"}  # frozen layer excluded entirely
    m, x = _model("mlp_paper", torch.float64)
    fz = Featurizer(m, "layerwise", "full", None)
    fz(x)
    assert fz.describe()["layers"]["net.2"] == "linear/ghost"  # S = 1, wide: ghost


@pytest.mark.parametrize("kernel", ["full", "trace"])
def test_in_place_ops_keep_every_layer_on_its_exact_form(kernel):
    """ReLU(inplace=True), ``out += identity`` and Hardswish(inplace=True) overwrite captured layer outputs;
    the capture notices (version counters), copies them, and no layer falls back to torch.func."""
    from lazyhasty.ntk.capture import caches

    m, x = _model("resnet_inplace", torch.float64)
    want = R.ntk_gram(m, [x], kernel=kernel)
    fz = Featurizer(m, "layerwise", kernel, None)
    fz(x)
    d = fz.describe()
    assert d["generic"] == []
    assert set(d["layers"]) == {"0", "2.conv1", "2.bn1", "2.conv2", "2.bn2", "5", "7"}
    assert d["copies"] == {"0": ["output"], "2.bn1": ["output"], "2.bn2": ["output"], "5": ["output"]}
    assert _rel(ntk_gram(m, x, kernel=kernel), want) <= 1e-10
    # remembered per model structure: a new featurizer starts with the copies, without re-checking
    fz2 = Featurizer(m, "layerwise", kernel, None)
    assert fz2.verified and fz2.describe()["copies"] == d["copies"]
    caches.VERIFIED.pop(m, None)


@pytest.mark.parametrize("kernel", ["full", "trace"])
def test_auto_compares_the_layerwise_pass_plus_fallback_with_one_whole_model_jacobian(kernel):
    """With a parameter left to torch.func (PReLU), ``auto`` takes the layerwise pass only where its ghost forms
    save more flops than the fallback's extra forward and k backward passes (the cost model), else one
    whole-model Jacobian; both exact."""
    from lazyhasty.ntk.capture import caches

    torch.manual_seed(0)
    # convolutions over many positions (materialized: ghost saves nothing) -> the whole-model Jacobian
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.PReLU(8), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 3)).double()
    xc = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    fz = Featurizer(conv, "auto", kernel, None)
    fz.plan_for_pairs(3.5)
    fz(xc)
    assert fz.plans == [] and len(fz.generic) == 7 and fz.auto_reason.startswith("jacobian: the torch.func pass")
    assert "jacobian: the torch.func pass" in explain(conv, xc, kernel=kernel).why
    # remembered check: the choice waits for the call's pairs per example, then is the same
    again = Featurizer(conv, "auto", kernel, None)
    assert again.verified and again.plans != [] and again.auto_reason == ""
    again.plan_for_pairs(3.5)
    assert again.plans == [] and again.auto_reason == fz.auto_reason
    # a wide MLP (ghost forms save k^2 d_in d_out a pair) with a PReLU -> layerwise plus the fallback
    mlp = nn.Sequential(nn.Linear(20, 512), nn.PReLU(512), nn.Linear(512, 10)).double()
    xm = torch.randn(6, 20, dtype=torch.float64)
    fz = Featurizer(mlp, "auto", kernel, None)
    fz.plan_for_pairs(50.5)  # as for a probe set of 100 (the savings grow with it, the extra pass does not)
    fz(xm)
    assert {p.name for p in fz.plans} == {"0", "2"} and fz.generic == ["1.weight"]
    assert fz.auto_reason.startswith("layerwise: its ghost forms save")
    for m, x in ((conv, xc), (mlp, xm)):
        assert _rel(ntk_gram(m, x, kernel=kernel), R.ntk_gram(m, [x], kernel=kernel)) <= 1e-10
        caches.VERIFIED.pop(m, None)
    fz = Featurizer(conv, "layerwise", kernel, None)  # asked for explicitly: layerwise with its fallback
    fz(xc)
    assert {p.name for p in fz.plans} == {"0", "2", "5"}
    # a model whose every layer falls back: the check's outcome is remembered (not redone on each call)
    m, x = _model("tied_and_outside_use", torch.float64)
    caches.VERIFIED.pop(m, None)
    Featurizer(m, "auto", "full", None)(x)
    again = Featurizer(m, "auto", "full", None)
    assert again.verified and again.plans == []


def test_output_shapes_b_and_b1_give_k1():
    m, x = _model("mlp_paper", torch.float64)
    K = ntk_gram(m, x)
    assert K.shape == (7, 1, 7, 1)
    m1 = nn.Sequential(*list(m.net))  # same net, output [b, 1]
    assert torch.allclose(ntk_gram(m1, x), K)


def test_frozen_parameters_are_excluded():
    m, x = _model("mlp_paper", torch.float64)
    m.net[0].requires_grad_(False)
    J = R.jacobian_rows(m, [x])
    assert J.shape[-1] == sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert _rel(ntk_gram(m, x), torch.einsum("iap,jbp->iajb", J, J).double()) <= 1e-10


@pytest.mark.parametrize("kernel", ["full", "trace", "diagonal"])
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("block_size", [1, 3, 64, None, "tiles"])
def test_alignment_equals_materialized_for_any_block_size(kernel, centered, block_size, monkeypatch):
    if kernel == "diagonal" and centered:
        pytest.skip("not defined")
    m0, x = _model("resnet_small", torch.float64)
    x = torch.cat([x, torch.randn(3, 3, 8, 8, dtype=torch.float64)])
    m = copy.deepcopy(m0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    K, K0 = R.ntk_gram(m, [x], kernel=kernel), R.ntk_gram(m0, [x], kernel=kernel)
    if kernel == "diagonal":
        K, K0 = torch.block_diag(*K), torch.block_diag(*K0)
    want = kernel_alignment(K, K0, centered=centered)
    assert 0.2 < want < 0.9999
    import contextlib

    from lazyhasty.ntk import path_override

    path = contextlib.nullcontext()
    if block_size == "tiles":  # default blocks, on the tile path (not the trace kernel's single block)
        path = path_override("tiles") if kernel != "diagonal" else path
        block_size = None
    with path:
        got = ntk_alignment(m, [x[:2], x[2:]], m0, kernel=kernel, centered=centered, block_size=block_size)
        assert got == pytest.approx(want, rel=1e-10)
        nocache = ntk_alignment(m, [x], m0.state_dict(), kernel=kernel, centered=centered, block_size=block_size,
                                max_cache_bytes=0)
    assert nocache == pytest.approx(want, rel=1e-10)


def test_alignment_float32_and_naive():
    m0, x = _model("cnn_strided", torch.float32)
    m = copy.deepcopy(m0)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.5)
    want = R.ntk_alignment(m.double(), [x.double()], m0.double())
    assert ntk_alignment(m.float(), x, m0.float()) == pytest.approx(want, rel=1e-5)
    assert ntk_alignment(m.float(), x, m0.float(), implementation="naive") == pytest.approx(want, rel=1e-5)
    assert ntk_alignment(m0, x, m0, kernel="trace") == pytest.approx(1.0, abs=1e-6)


def test_ill_defined_kernels_are_refused():
    # a train-mode model is measured in eval mode (issue 27: probes inside training), its modes left as they were
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    x = torch.randn(8, 3)
    stats = m[1].running_mean.clone()
    K_train = ntk_gram(m, x)
    assert m.training and m[1].training and torch.equal(m[1].running_mean, stats)
    assert torch.equal(K_train, ntk_gram(copy.deepcopy(m).eval(), x))
    d = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.2), nn.Linear(4, 1))
    assert torch.equal(ntk_gram(d, x), ntk_gram(d[::2], x))  # dropout off while measuring
    # ... but a network that is random or batch-statistics-normalized in eval mode is still refused
    no_stats = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="batch statistics"):
        ntk_gram(no_stats, x)

    class AlwaysDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 1)

        def forward(self, x):
            return self.fc(torch.nn.functional.dropout(x, 0.5, training=True))

    with pytest.raises(ValueError):
        ntk_gram(AlwaysDropout(), x)

    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 1)

        def forward(self, x):
            h = self.fc(x)
            return h - h.mean(0, keepdim=True)
    with pytest.raises(ValueError, match="depends on the other examples"):
        ntk_gram(Mix(), x)


def test_bad_arguments():
    m, x = _model("mlp_paper", torch.float32)
    with pytest.raises(ValueError, match="kernel must be"):
        ntk_gram(m, x, kernel="block")
    with pytest.raises(ValueError, match="implementation must be"):
        ntk_gram(m, x, implementation="fast")
    with pytest.raises(ValueError, match="block_size"):
        ntk_gram(m, x, block_size=0)
    with pytest.raises(ValueError, match="max_cache_bytes"):
        ntk_gram(m, x, max_cache_bytes=-1)
    with pytest.raises(ValueError, match="max_cache_bytes"):
        ntk_alignment(m, x, m, max_cache_bytes=0.5)
    with pytest.raises(ValueError, match="NaN"):
        ntk_gram(m, torch.full((3, 2), float("nan")), kernel="trace")  # the one-block trace path
    with pytest.raises(ValueError, match="empty"):
        ntk_gram(m, [])
    with pytest.raises(ValueError, match="NaN"):
        ntk_gram(m, torch.full((3, 2), float("nan")))
    with pytest.raises(ValueError, match="NaN"):
        ntk_alignment(m, torch.full((3, 2), float("nan")), copy.deepcopy(m))
    with pytest.raises(ValueError, match="no trainable"):
        ntk_gram(copy.deepcopy(m).requires_grad_(False), x)
    with pytest.raises(ValueError, match="architecture"):
        ntk_alignment(m, x, nn.Linear(2, 1))
    with pytest.raises(ValueError, match="diagonal"):
        ntk_alignment(m, x, m, kernel="diagonal", centered=True)


# which parameters each zoo model leaves to torch.func: a silent fallback elsewhere fails this test
EXPECTED_GENERIC = {  # the cost model: the fallback's torch.func pass costs more than the ghost forms save, so
                    # auto takes the whole-model Jacobian (one bias rides on per-example copies)
                    "conv_prelu": {"0.weight", "0.bias", "1.weight", "2.weight", "2.bias", "5.weight"},
                    "generic_params": {"act.weight", "fc.weight"},
                    "tied_and_outside_use": {"emb.weight", "proj.weight"},
                    # a weight also used elementwise is not one linear map: it stays on torch.func (layerwise), and
                    # that pass costs more than this small model's ghost forms save: auto takes the Jacobian
                    "hand_written": {"l1.W", "odd", "out.W", "w"},
                    }
# models with a layer reached through a map: "parametrized" (torch parametrizations; a bias of such a layer shares
# its plan), "subclasses" (the cosine Linear computes W(theta) in its forward: the plain plan fails the check,
# the affine plan passes)
MAPPED = {"parametrized": {"2.bias", "2.parametrizations.weight.original0", "2.parametrizations.weight.original1",
                            "4.bias", "4.parametrizations.weight.original"},
          "subclasses": {"b.weight", "b.bias"}}
# parameters the model only broadcasts against the batch: per-example copies, no torch.func pass
EXPECTED_COPIES = {"vit_tiny": {"cls", "pos", "scale"},
                   # a bias of a layer moved to the fallback, added by F.linear against the batch
                   "tied_and_outside_use": {"proj.bias"}, "conv_prelu": {"5.bias"},
                   # the free scale, multiplied elementwise: a stand-in at its mul (capture/broadcast.py)
                   "generic_params": {"fc.bias", "scale"},
                   "hand_written": {"seq", "c", "l1.b", "out.b"}}


@pytest.mark.parametrize("name", list(ZOO))
def test_explain_names_every_parameter_form_and_the_path(name):
    from lazyhasty.ntk import PATHS, explain

    m, x = _model(name, torch.float64)
    plan = explain(m, x, kernel="full")
    assert [p["name"] for p in plan.parameters] == [n for n, p in m.named_parameters() if p.requires_grad]
    assert set(plan.generic) == EXPECTED_GENERIC.get(name, set())
    assert {p["name"] for p in plan.parameters if p["form"] == "per-example copies"} == EXPECTED_COPIES.get(name, set())
    mapped = {p["name"] for p in plan.parameters if p["kind"] in ("linear", "conv") and p["costs"] is None}
    assert mapped == MAPPED.get(name, set())
    for p in plan.parameters:
        assert p["form"] in ("ghost", "materialized", "torch.func", "per-example copies")
        if p["name"] in mapped:  # reached through a map: materialized, then the map's VJP
            assert p["form"] == "materialized"
        elif p["kind"] in ("linear", "conv", "convT"):  # the cost model's figures, and the form is the cheaper one
            assert p["form"] == min(p["costs"], key=lambda f: (p["costs"][f], f != "materialized"))
    assert plan.path == "one_tile" and plan.path in PATHS and plan.n == x.shape[0]
    assert ("auto' -> jacobian" in plan.why) == (name in ("conv_prelu", "generic_params", "hand_written"))
    if name == "hand_written":  # the matmul sites are planned; only the weight also used elementwise falls back
        assert set(explain(m, x, implementation="layerwise").generic) == {"odd"}
    if name == "conv_prelu":  # asked for explicitly: layerwise keeps its per-layer forms
        assert set(explain(m, x, implementation="layerwise").generic) == {"1.weight"}
    if name == "generic_params":
        assert set(explain(m, x, implementation="layerwise").generic) == {"act.weight"}
    d = plan.to_dict()
    assert d["path_description"] == PATHS["one_tile"] and d["parameters"] == plan.parameters
    assert "path: one_tile" in str(plan)


@pytest.mark.parametrize("kernel,block_size,purpose,path", [
    ("trace", None, "gram", "one_tile"), ("trace", 100, "gram", "trace_one_block"), ("trace", 3, "gram", "tiles"),
    ("full", None, "gram", "one_tile"),
    ("full", 3, "gram", "tiles"), ("diagonal", 3, "gram", "diagonal"), ("full", None, "alignment", "tiles"),
    ("trace", 100, "alignment", "trace_one_block")])
def test_the_path_table(kernel, block_size, purpose, path):
    """One function chooses the path; every path gives the spec's numbers (float64)."""
    from lazyhasty.ntk import explain

    m, x = _model("cnn_strided", torch.float64)
    assert explain(m, x, kernel=kernel, block_size=block_size, purpose=purpose).path == path
    if purpose == "gram":
        want = R.ntk_gram(m, [x], kernel=kernel)
        assert _rel(ntk_gram(m, x, kernel=kernel, block_size=block_size), want) <= 1e-10
    else:
        m0, _ = _model("cnn_strided", torch.float64)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(1.3)
        want = R.ntk_alignment(m, [x], m0, kernel=kernel)
        assert ntk_alignment(m, x, m0, kernel=kernel, block_size=block_size) == pytest.approx(want, abs=1e-12)
    assert explain(m, x, implementation="naive").path == "naive"


def test_batch_mixing_check_runs_once_per_model_structure_and_mode():
    from lazyhasty.ntk import limits
    from lazyhasty.ntk.capture import caches

    # the one-block trace path as it is chosen (it estimates its size): without the one-tile rule for few examples
    with limits(trace_one_tile_max_n=0):

        m, x = _model("mlp_paper", torch.float64)
        calls = []
        m.register_forward_hook(lambda mod, a, o: calls.append(a[0].shape[0]))
        ntk_gram(m, x, kernel="trace")
        first = len(calls)
        calls.clear()
        ntk_gram(m, x, kernel="trace")
        again = len(calls)
        # a later call: the capture of the block only (the input checks' trial forwards of 3 and 2 examples
        # passed for this structure and input signature, the block-size estimate is remembered per structure)
        assert again == 1
        # the first call also ran the trial forwards (2, lazyhasty/_validate.py), estimated the block size from one
        # example (1), ran the mixing check (2) and the layer check (1)
        assert first == again + 2 + 1 + 2 + 1
        with pytest.raises(ValueError, match="NaN/inf"):
            ntk_gram(m, torch.full_like(x, float("nan")), kernel="trace")
        m.eval()  # the zoo models start in train mode; both are measured in eval mode, so nothing is checked again
        calls.clear()
        ntk_gram(m, x, kernel="trace")
        assert len(calls) == again
        caches.MIXING_CHECKED.pop(m, None)


def test_per_example_copies_are_refused_when_an_op_mixes_examples():
    """A parameter flipped along its first dimension: harmless for the [1, d] parameter, but it would swap
    the per-example copies of the parameter between examples; the weighted check catches that. Copies of the
    flipped tensor at the add that broadcasts it (capture/broadcast.py, tried first) are exact: it is captured
    there. (A parameter whose stand-ins the check refuses: tests/ntk/test_capture_rules.py.)"""
    from lazyhasty.ntk import explain

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)
            self.flipped = nn.Parameter(torch.randn(1, 4))
            self.added = nn.Parameter(torch.randn(1, 4))
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(torch.tanh(self.fc(x) + self.flipped.flip(0)) + self.added)

    torch.manual_seed(1)
    m = M().double()
    x = torch.randn(6, 3, dtype=torch.float64)
    plan = explain(m, x, implementation="layerwise")
    forms = {p["name"]: p["form"] for p in plan.parameters}
    assert forms["flipped"] == "per-example copies" and forms["added"] == "per-example copies"
    assert {p["name"]: p["at_ops"] for p in plan.parameters}["flipped"] == ["add"]
    for kernel in ("full", "trace"):
        assert _rel(ntk_gram(m, x, kernel=kernel, implementation="layerwise"), R.ntk_gram(m, [x], kernel=kernel)) <= 1e-12


def test_a_zero_initialised_head_does_not_decide_the_checks():
    """torchvision's ViT starts with a zero head: every other gradient is zero, so a layer check on the model
    itself would pass whatever the capture did. The checks run on a perturbed copy of the model instead and
    are decided (and remembered) at once; a layer moved there is moved here."""
    from lazyhasty.ntk.capture import caches

    m, x = _model("vit_tiny", torch.float64)
    with torch.no_grad():
        m.head.weight.zero_()
    fz = Featurizer(m, "layerwise", "full", None)
    fz(x)
    assert fz.verified and m in caches.VERIFIED and fz.describe()["generic"] == ["cls", "pos", "scale"]
    assert set(fz.per_example_copies()) == {"cls", "pos", "scale"}
    assert _rel(ntk_gram(m, x, kernel="trace"), R.ntk_gram(m, [x], kernel="trace")) <= 1e-12
    caches.VERIFIED.pop(m, None)
    # a layer whose capture is wrong is found on the twin even when its gradient here is zero
    t, xt = _model("tied_and_outside_use", torch.float64)
    with torch.no_grad():
        t.emb.weight.zero_()  # tied to the output layer: every gradient here is zero
    fz = Featurizer(t, "layerwise", "full", None)
    fz(xt)
    assert fz.verified and {"emb.weight", "proj.weight"} <= set(fz.describe()["generic"])
    caches.VERIFIED.pop(t, None)


def test_models_too_large_to_copy_are_checked_in_place():
    """Beyond limits twin_max_bytes no twin is made: the same checks run on the model itself, with the same outcome
    where gradients are not zero."""
    from lazyhasty.ntk import limits
    from lazyhasty.ntk.capture import caches

    with limits(twin_max_bytes=0):
        m, x = _model("tied_and_outside_use", torch.float64)
        fz = Featurizer(m, "layerwise", "full", None)
        assert fz._perturbed_twin(1) is None
        fz(x)
        assert fz.verified and {"emb.weight", "proj.weight"} <= set(fz.describe()["generic"])
        assert _rel(ntk_gram(m, x, kernel="full"), R.ntk_gram(m, [x], kernel="full")) <= 1e-12
        caches.VERIFIED.pop(m, None)
        v, xv = _model("vit_tiny", torch.float64)
        assert _rel(ntk_gram(v, xv, kernel="trace"), R.ntk_gram(v, [xv], kernel="trace")) <= 1e-12
        caches.VERIFIED.pop(v, None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_func_jacobians_are_checked_against_autograd(dtype):
    """torch 2.13's vmap(jacrev) through nn.PReLU returns wrong per-example Jacobians, without an error, when a
    block has as many examples as the model has outputs (here 3 and 3): the fallback notices (one weighted
    autograd check per block shape) and computes that block exactly."""
    from torch.func import functional_call, jacrev, vmap

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.PReLU(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).to(dtype)
    x = torch.randn(3, 3, 8, 8, dtype=dtype)
    p = {n: t.detach() for n, t in m.named_parameters()}
    J = vmap(jacrev(lambda p, xi: functional_call(m, p, (xi[None],)).reshape(-1)), in_dims=(None, 0))(p, x)
    J = torch.cat([J[n].reshape(3, 3, -1) for n in p], -1)
    want = R.jacobian_rows(m, [x])
    assert _rel(J, want) > 1e-3  # the torch bug this guards against (if it is fixed, this test says so)
    fz = Featurizer(m, "jacobian", "full", None)
    got = fz.fallback_jacobian(x)
    assert _rel(got, want) <= (1e-6 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("name", ["vit_tiny", "hand_written", "generic_params"])
def test_the_checks_deep_copy_the_model_once(name, monkeypatch):
    """The layer check and the per-example-copy check share one perturbed twin (a model is copied once, not
    once per check), and a second call copies nothing."""
    from lazyhasty.ntk import featurize

    m, x = _model(name, torch.float64)
    copies = []
    real = copy.deepcopy
    monkeypatch.setattr(featurize.copy, "deepcopy",
                        lambda obj, memo=None: (copies.append(type(obj)) if memo is None else None, real(obj, memo))[1])
    want = R.ntk_gram(m, [x])
    assert _rel(ntk_gram(m, x), want) <= 1e-10
    assert len(copies) == 1
    assert _rel(ntk_gram(m, x), want) <= 1e-10
    assert len(copies) == 1


def test_the_layer_check_is_remembered_per_implementation():
    """Calls alternating implementations (comparing them, say) do not redo each other's layer checks."""
    m, x = _model("cnn_strided", torch.float64)
    want = R.ntk_gram(m, [x])
    for implementation in ("layerwise", "jacobian", "layerwise", "auto"):
        assert _rel(ntk_gram(m, x, implementation=implementation), want) <= 1e-10
    assert Featurizer(m, "layerwise", "full", None).verified and Featurizer(m, "jacobian", "full", None).verified
    assert Featurizer(m, "auto", "full", None).verified


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_on_cuda_matches_naive(name):
    """Every zoo architecture on the GPU: both implementations and kernels in float64 against the reference
    on the GPU (and the CPU's within 1e-7: on an H100, torch's own float64 forward of weight norm and of
    BatchNorm differs from the CPU's by ~5e-9 in the kernel, reference included), and float32 at the
    float32 tolerance (fails if tf32 leaks into the products)."""
    m, x = _model(name, torch.float64)
    want_cpu = R.ntk_gram(m, [x], kernel="full")
    mc, xc = m.cuda(), x.cuda()
    want = {k: R.ntk_gram(mc, [xc], kernel=k).cpu() for k in ("full", "trace")}
    assert _rel(want["full"], want_cpu) <= 1e-7
    for kernel in ("full", "trace"):
        for implementation in ("jacobian", "layerwise", "auto"):
            got = ntk_gram(mc, [xc[:2], xc[2:]], kernel=kernel, implementation=implementation, block_size=3)
            assert got.device.type == "cuda"
            assert _rel(got.cpu(), want[kernel]) <= 1e-10, (kernel, implementation)
    m32, x32 = copy.deepcopy(mc).float(), (xc.float() if xc.is_floating_point() else xc)
    got = ntk_gram(m32, x32)
    assert got.dtype == torch.float32 and _rel(got.cpu(), want["full"]) <= 1e-5


def test_cuda_memory_budget_counts_the_allocators_cache(monkeypatch):
    """Free memory for a trace block = the driver's free bytes + what torch's allocator caches unused
    (a second large call must not see less memory than the first just because its blocks are cached)."""
    from lazyhasty.ntk.tuning import cuda_free_bytes

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 40 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 4 << 30)
    assert cuda_free_bytes("cuda") == (10 + 40 - 4) << 30


def test_tf32_option_reaches_the_products_and_never_the_layer_checks(monkeypatch):
    """ntk_gram / ntk_alignment(tf32=True): the products and passes run with torch's TF32 flags on, every
    layer check (in the first call of a model structure) with them off, the user's own flag values come back
    afterwards, and tf32=False (the default) keeps them off throughout. The CPU ignores the flags: the
    kernels are the same. tf32 must be a bool."""
    import lazyhasty.ntk.featurize as FZ
    from lazyhasty.ntk import forms

    seen = {"products": [], "checks": []}
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # noqa: E731
    tile, close = forms.tile, FZ.grads_close

    def spy_tile(*a, **k):
        seen["products"].append(flags())
        return tile(*a, **k)

    def spy_close(*a, **k):
        seen["checks"].append(flags())
        return close(*a, **k)

    passes = FZ.Featurizer.output_gradient_passes

    def spy_passes(self, *a, **k):  # the k backward passes of every path (tiles and the one-block trace)
        seen["passes"].append(flags())
        return passes(self, *a, **k)

    monkeypatch.setattr(forms, "tile", spy_tile)
    monkeypatch.setattr(FZ, "grads_close", spy_close)
    monkeypatch.setattr(FZ.Featurizer, "output_gradient_passes", spy_passes)
    seen["passes"] = []
    user = flags()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x = torch.randn(10, 3, 8, 8)
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # the user's
        K_first = ntk_gram(m, x, tf32=True, block_size=4)  # the layer check runs in this call
        assert seen["checks"] and set(seen["checks"]) == {(False, False)}  # (on a twin, before the tiles)
        assert seen["products"] and set(seen["products"]) == {(True, True)}
        assert flags() == (False, True)
        seen["products"].clear(), seen["checks"].clear()
        K_tf32 = ntk_gram(m, x, tf32=True, block_size=4)
        assert not seen["checks"] and set(seen["products"]) == {(True, True)}
        assert flags() == (False, True)
        seen["products"].clear()
        K = ntk_gram(m, x, block_size=4)
        assert set(seen["products"]) == {(False, False)} and flags() == (False, True)
        assert torch.equal(K, K_tf32) and torch.equal(K, K_first)
        m0 = copy.deepcopy(m)
        with torch.no_grad():
            m0[0].weight.mul_(1.5)
        seen["products"].clear()
        a_tf32 = ntk_alignment(m, x, m0, kernel="full", block_size=4, tf32=True)
        assert (True, True) in seen["products"]
        assert a_tf32 == ntk_alignment(m, x, m0, kernel="full", block_size=4)
        x20 = torch.randn(20, 3, 8, 8)
        assert explain(m, x20, kernel="trace").path == "trace_one_block"
        seen["passes"].clear()
        K_trace = ntk_gram(m, x20, kernel="trace", tf32=True)
        assert set(seen["passes"]) == {(True, True)} and flags() == (False, True)
        assert torch.equal(K_trace, ntk_gram(m, x20, kernel="trace"))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = user
    with pytest.raises(TypeError, match="tf32"):
        ntk_gram(m, x, tf32="yes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernel", ["full", "trace"])
def test_tf32_option_error_against_float64(kernel):
    """tf32=True on the GPU: the same plan as float32 (no layer sent to the fallback by TF32 rounding in a
    check), relative Frobenius error against the float64 kernel at most 1e-2, and on a GPU with TF32 tensor
    cores (compute capability >= 8) clearly above float32's (so TF32 did run). The errors are printed
    (the device suite records them; README's precision line)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2), nn.ReLU(),
                      nn.Conv2d(64, 64, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(64, 10)).cuda()
    x = torch.randn(64, 3, 32, 32, device="cuda")
    want = ntk_gram(copy.deepcopy(m).double(), x.double(), kernel=kernel).cpu()
    fp32 = ntk_gram(m, x, kernel=kernel)
    tf32 = ntk_gram(m, x, kernel=kernel, tf32=True)
    assert explain(m, x, kernel=kernel).generic == []
    e32, etf = _rel(fp32.cpu().double(), want), _rel(tf32.cpu().double(), want)
    print(f"tf32 {kernel}: relative error vs float64 {etf:.2e} (float32 {e32:.2e})")
    assert e32 <= 1e-5 and etf <= 1e-2
    if torch.cuda.get_device_capability()[0] >= 8:
        assert etf > 10 * e32
