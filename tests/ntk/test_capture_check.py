"""The engine's cached checks (issue 28 items 1 and 3): what decides a plan is part of the cache key, and the
batch-mixing check covers the block sizes a call uses and the gradients, not only the outputs."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lazyhasty import reference as R
from lazyhasty.metrics import ntk_alignment, ntk_gram
from models import MixesAbove


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


class _BufferScaled(nn.Linear):
    """``s * F.linear(x, W, b)`` with ``s`` a buffer (changed in place below)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.register_buffer("s", torch.tensor(1.0))

    def forward(self, x):
        return self.s * F.linear(x, self.weight, self.bias)


class _AttributeScaled(nn.Linear):
    """``s * F.linear(x, W, b)`` with ``s`` a plain Python float or a tensor attribute (not a buffer)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.s = 1.0

    def forward(self, x):
        return self.s * F.linear(x, self.weight, self.bias)


def _scaled_net(layer):
    torch.manual_seed(0)
    return nn.Sequential(layer(5, 7), nn.Tanh(), nn.Linear(7, 3)).double(), torch.randn(6, 5, dtype=torch.float64)


CHANGES = {
    "buffer-in-place": (_BufferScaled, lambda m: m.s.fill_(2.0)),
    "buffer-through-data": (_BufferScaled, lambda m: m.s.data.fill_(2.0)),  # (no version counter moves)
    "buffer-reassigned": (_BufferScaled, lambda m: setattr(m, "s", torch.tensor(2.0, dtype=torch.float64))),
    "float-attribute": (_AttributeScaled, lambda m: setattr(m, "s", 2.0)),
    "tensor-attribute": (_AttributeScaled, lambda m: setattr(m, "s", torch.tensor(2.0, dtype=torch.float64))),
}


@pytest.mark.parametrize("kernel", ["full", "trace"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_plan_follows_the_state_that_decides_it(change, kernel):
    """A Linear subclass whose forward reads a scale: the first call (scale 1) plans it as a plain Linear, which
    is exact there; after the scale changes the plan must be checked again (relative error 0.3 when it was
    kept), on every path."""
    layer, mutate = CHANGES[change]
    net, x = _scaled_net(layer)
    ntk_gram(net, x, kernel=kernel)  # plans and caches with s = 1
    mutate(net[0])
    want = R.ntk_gram(net, [x], kernel=kernel)
    assert _rel(ntk_gram(net, x, kernel=kernel), want) <= 1e-10
    assert _rel(ntk_gram(net, x, kernel=kernel, block_size=4), want) <= 1e-10  # tiles


def test_alignment_with_itself_follows_the_state():
    net, x = _scaled_net(_BufferScaled)
    assert ntk_alignment(net, x, net) == pytest.approx(1.0, abs=1e-12)
    net[0].s.fill_(2.0)
    fresh = copy.deepcopy(net)
    assert ntk_alignment(net, x, fresh) == pytest.approx(1.0, abs=1e-12)
    assert ntk_alignment(net, x, fresh) == pytest.approx(R.ntk_alignment(net, [x], fresh), abs=1e-12)


def test_requires_grad_flags_decide_the_plan():
    """Freezing a parameter after a first call changes which parameters the kernel is over."""
    net, x = _scaled_net(nn.Linear)
    ntk_gram(net, x)
    net[0].weight.requires_grad_(False)
    assert _rel(ntk_gram(net, x), R.ntk_gram(net, [x])) <= 1e-10


def test_unchanged_state_keeps_the_cached_check():
    """The state key does not redo the layer check when nothing changed (parameter values do not count)."""
    from lazyhasty.ntk import featurize

    net, x = _scaled_net(_BufferScaled)
    ntk_gram(net, x)
    runs = []
    real = featurize.Featurizer.verify_on_twin
    try:
        featurize.Featurizer.verify_on_twin = lambda self, x: runs.append(1) or real(self, x)
        with torch.no_grad():
            net[2].weight.mul_(1.5)  # a training step changes values, not the plan
        ntk_gram(net, x)
        assert runs == []
        net[0].s.fill_(2.0)
        ntk_gram(net, x)
        assert runs == [1]
    finally:
        featurize.Featurizer.verify_on_twin = real


class _ScaledNormAct(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d`` in miniature: a BatchNorm subclass with a forward of its own (the norm call, a
    scale buffer of its own, then an activation)."""

    def __init__(self, c):
        super().__init__(c)
        self.register_buffer("scale", torch.tensor(1.0))

    def forward(self, x):
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         self.momentum, self.eps)
        return torch.tanh(self.scale * y)


def _norm_act_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), _ScaledNormAct(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).double()
    return net, torch.randn(5, 2, 6, 6, dtype=torch.float64)


def test_training_steps_keep_the_cached_check_of_a_norm_subclass():
    """A train-mode step updates a norm subclass's running statistics in place; the layer check stays (keyed by
    their values, every logging step of timm's mobilenetv3 re-ran it: 4-10x a call), and the kernel follows the
    new statistics exactly. A buffer of the subclass's own still decides the plan."""
    from lazyhasty.ntk import featurize

    net, x = _norm_act_net()
    ntk_gram(net.eval(), x)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    runs = []
    real = featurize.Featurizer.verify_on_twin
    try:
        featurize.Featurizer.verify_on_twin = lambda self, x: runs.append(1) or real(self, x)
        for _ in range(2):
            net.train()
            net(torch.randn(8, 2, 6, 6, dtype=torch.float64)).square().sum().backward()
            opt.step()
            opt.zero_grad()
            net.eval()
            assert _rel(ntk_gram(net, x), R.ntk_gram(net, [x])) <= 1e-10
        assert runs == []
        assert bool(net[1].running_mean.any())  # the statistics moved
        net[1].scale.fill_(2.0)
        assert _rel(ntk_gram(net, x), R.ntk_gram(net, [x])) <= 1e-10
        assert runs == [1]
    finally:
        featurize.Featurizer.verify_on_twin = real


class _GradientMixing(nn.Module):
    """The same values as ``lin(x)``, gradients mixed over the batch: ``y + (y - y.detach()).mean(0)``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        y = torch.tanh(self.lin(x))
        return y + (y - y.detach()).mean(0)


@pytest.mark.parametrize("call", [
    lambda m, x: ntk_gram(m, x),  # default blocks (32 + 8)
    lambda m, x: ntk_gram(m, x, kernel="trace"),  # one block of 40
    lambda m, x: ntk_gram(m, x, block_size=20),
    lambda m, x: ntk_alignment(m, x, copy.deepcopy(m), kernel="trace"),
])
def test_mixing_in_the_blocks_used_is_found(call):
    torch.manual_seed(0)
    m, x = MixesAbove(16), torch.randn(40, 4)
    with pytest.raises(ValueError, match="depends on the other examples"):
        call(m, x)
    # small blocks do not mix: accepted, the kernel of the per-example model
    K = ntk_gram(m, x, block_size=8)
    assert _rel(K, R.ntk_gram(m, [x])) <= 1e-5


@pytest.mark.parametrize("implementation", ["layerwise", "jacobian", "naive"])
@pytest.mark.parametrize("kernel", ["full", "trace"])
def test_gradient_only_mixing_is_found(implementation, kernel):
    torch.manual_seed(0)
    m, x = _GradientMixing(), torch.randn(6, 4)
    with pytest.raises(ValueError, match="gradient"):
        ntk_gram(m, x, kernel=kernel, implementation=implementation)
    with pytest.raises(ValueError, match="gradient"):
        ntk_alignment(m, x, copy.deepcopy(m), kernel=kernel, implementation=implementation)


class _Fused(nn.Module):
    """Modules the engine splits into several captured maps: a GRU (input and hidden maps), an attention's packed
    input projection, a parameter multiplied directly (a matmul site), a parametrized Linear, a bare parameter."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, 4, batch_first=True)
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.lin = nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
        self.mix = nn.Parameter(torch.randn(4, 4))
        self.cls = nn.Parameter(torch.randn(4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h, _ = self.gru(x)
        h, _ = self.att(h, h, h)
        h = torch.tanh(self.lin(h) @ self.mix) + self.cls
        return self.head(h.mean(1))


def test_by_layer_keys_are_the_owning_modules_on_every_implementation():
    """``by_layer=True`` keys: the module owning each parameter (whatever capture split it into), the same
    keys on every implementation, each value the kernel over that module's parameters."""
    torch.manual_seed(0)
    m, x = _Fused().double().eval(), torch.randn(5, 6, 3, dtype=torch.float64)
    want_keys = {"", "gru", "att", "att.out_proj", "lin", "head"}
    for implementation in ("layerwise", "auto", "jacobian"):
        parts = ntk_gram(m, x, kernel="trace", by_layer=True, implementation=implementation)
        assert set(parts) == want_keys, implementation
    for key in ("gru", "att", "lin", ""):
        only = copy.deepcopy(m)
        for name, p in only.named_parameters():
            owner = name.rpartition(".")[0].partition(".parametrizations")[0].partition("parametrizations")[0]
            p.requires_grad_(owner.rstrip(".") == key)
        assert _rel(parts[key], R.ntk_gram(only, [x], kernel="trace")) <= 1e-10, key


class _FoldedLinear(nn.Linear):
    """Takes ``[b, 2 d_in]`` and applies the weight to both halves: the captured input does not fit the Linear
    layout (its last dimension is not ``in_features``)."""

    def forward(self, x):
        return F.linear(x.view(x.shape[0], 2, -1), self.weight, self.bias).sum(1)


def test_captured_tensors_that_do_not_fit_a_layout_are_reported_in_explain():
    """A layer whose captured tensors do not fit its kind's layout goes to torch.func, and explain() says why
    (the shapes), instead of the fallback taking it unseen; the kernel is still exact."""
    from lazyhasty.ntk import explain

    torch.manual_seed(0)
    m = nn.Sequential(_FoldedLinear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    plan = explain(m, x, implementation="layerwise")
    rows = {r["name"]: r for r in plan.to_dict()["parameters"]}
    assert rows["0.weight"]["form"] == "torch.func"
    assert "do not fit the linear layout" in rows["0.weight"]["fallback"]
    assert "do not fit the linear layout" in str(plan)
    assert rows["2.weight"]["fallback"] is None and rows["2.weight"]["form"] != "torch.func"
    # remembered with the check's outcome: a second explain (no check) says the same
    again = {r["name"]: r for r in explain(m, x, implementation="layerwise").to_dict()["parameters"]}
    assert again["0.weight"]["fallback"] == rows["0.weight"]["fallback"]
    assert _rel(ntk_gram(m, x, implementation="layerwise"), R.ntk_gram(m, [x])) <= 1e-10


def test_an_undecided_twin_check_still_moves_the_layers_it_found_wrong():
    """A twin check left undecided (a layer whose gradient is zero whatever the values) still decides the
    layers it found wrong: they go to the fallback at once, and the call checks its own blocks without a second
    twin (before: the model's block found the same layer wrong, and a second twin was made and checked)."""
    import torch
    from torch import nn

    from lazyhasty import reference as R
    from lazyhasty.metrics import ntk_gram
    from lazyhasty.ntk import explain, featurize

    class OutsideUseAndDeadBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.dead = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(3, 2)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            outside = 0.1 * (x @ self.a.weight.T).sum(1, keepdim=True)  # a.weight used outside a's forward
            return self.b(h) + outside + 0.0 * self.dead(x)  # dead: a zero gradient on every twin

    torch.manual_seed(0)
    m = OutsideUseAndDeadBranch().double()
    x = torch.randn(6, 3, dtype=torch.float64)
    calls = []
    real = featurize.Featurizer.verify_on_twin
    try:
        featurize.Featurizer.verify_on_twin = lambda self, xb: calls.append(1) or real(self, xb)
        got = ntk_gram(m, x, kernel="full", implementation="layerwise")
    finally:
        featurize.Featurizer.verify_on_twin = real
    assert len(calls) == 1
    want = R.ntk_gram(m, [x], kernel="full")
    assert float((got - want).norm() / want.norm()) <= 1e-10
    rows = {r["name"]: r for r in explain(m, x, kernel="full", implementation="layerwise").parameters}
    assert rows["a.weight"]["form"] == "torch.func" and rows["a.weight"]["fallback"]


class _DoubledLinear(nn.Linear):
    """A Linear subclass applied to its input concatenated with itself: its module input is half as wide as the
    weight (timm's LayerNorm2d was the example here until norms with a forward of their own were captured at
    their norm call)."""

    def forward(self, x):
        return super().forward(torch.cat([x, x], -1))


class _BucketBias(nn.Module):
    """T5's relative-position bias: an Embedding called on ``[L, L]`` buckets (no batch), broadcast over it."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 3)
        self.bias = nn.Embedding(5, 1)

    def forward(self, x):  # x [b, L, 3]
        L = x.shape[1]
        buckets = (torch.arange(L)[:, None] - torch.arange(L)[None, :]).abs().clamp(max=4)
        return self.inp(x).sum(-1, keepdim=True) + self.bias(buckets).squeeze(-1).sum(-1)[None, :, None]


@pytest.mark.parametrize("case", ["doubled_linear", "bucket_bias", "bucket_bias_as_long_as_the_check_batch"])
def test_forwards_of_their_own_and_calls_without_the_batch_are_misfits_by_shape(case):
    """A norm subclass normalizing another dimension and an Embedding called on a tensor without the batch do
    not fit their layouts: found from the captured shapes (explain() names them), on the fallback or captured
    where the parameter is broadcast, and the kernels equal the spec; the rest stays captured. Where the
    buckets' [L, L] happens to have the check's batch (L = CHECK_EXAMPLES), the shapes fit and the weighted
    check must find it (its example weights on the layer's side: weighed at the output, rows of any meaning sum
    to autograd's total, and the kernel was wrong)."""
    from lazyhasty.ntk import Featurizer, explain
    from lazyhasty.ntk.capture.check import CHECK_EXAMPLES

    torch.manual_seed(0)
    if case == "doubled_linear":
        m = nn.Sequential(nn.Linear(3, 3), _DoubledLinear(6, 4), nn.Tanh(), nn.Linear(4, 2))
        x, name, why = torch.randn(5, 3), "1.weight", "a call does not map [b, ..., 6] to [b, ..., 4]"
    elif case == "bucket_bias":
        m, x = _BucketBias(), torch.randn(6, CHECK_EXAMPLES + 1, 3)
        name, why = "bias.weight", "a call's first dimension is not the batch of"
    else:
        m, x = _BucketBias(), torch.randn(6, CHECK_EXAMPLES, 3)
        name, why = "bias.weight", "differ from autograd's"
    m = m.double()
    x = x.double()
    fz = Featurizer(m, "layerwise", "full", None)
    fz(x)
    assert why in fz.fallback_reasons[name], fz.fallback_reasons
    for kernel in ("full", "trace"):
        want = R.ntk_gram(m, [x], kernel=kernel)
        assert _rel(ntk_gram(m, x, kernel=kernel, implementation="layerwise"), want) <= 1e-10, kernel
    plan = explain(m, x, implementation="layerwise")
    assert plan.to_dict()["parameters"][0]["form"] in ("ghost", "materialized")  # the layer before stays planned


def test_a_layout_that_raises_is_an_error_not_a_fallback(monkeypatch):
    """Captured tensors that fit their layout but make a layout function raise are a bug of the engine: the
    error reaches the caller (before, a broad except sent the layer to the fallback, a silent slowdown)."""
    import lazyhasty.ntk.capture.rules as rules

    def broken(*args):
        raise IndexError("a bug in a layout")

    monkeypatch.setattr(rules, "linear_factors", broken)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    with pytest.raises(IndexError, match="a bug in a layout"):
        ntk_gram(m, torch.randn(5, 3, dtype=torch.float64), implementation="layerwise")


def test_a_block_is_computed_again_while_the_plan_changes_and_a_plan_that_never_settles_is_an_error():
    """PlanChanged (the layer check changed the plan) makes the Featurizer compute the block again, resetting
    the sink first, in one loop; a plan that keeps changing past the bound is a RuntimeError, not a hang."""
    from lazyhasty.ntk import Featurizer
    from lazyhasty.ntk.capture.check import PlanChanged

    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    fz = Featurizer(m, "layerwise", "full", None)
    rounds, resets = [], []

    def twice():
        rounds.append(1)
        if len(rounds) < 3:
            raise PlanChanged
        return "features"

    assert fz._settled(twice, lambda: resets.append(1)) == "features"
    assert len(rounds) == 3 and len(resets) == 2

    def never():
        raise PlanChanged

    with pytest.raises(RuntimeError, match="changed .* times without settling"):
        fz._settled(never)


class _Twice(nn.Linear):
    """``2 F.linear(x, W, b)``: its captured output gradient makes half of autograd's weight gradient."""

    def forward(self, x):
        return 2.0 * F.linear(x, self.weight, self.bias)


class _Tiny(nn.Module):
    def forward(self, x):
        return x * 1e-5


@pytest.mark.parametrize("kernel", ["full", "trace"])
def test_the_layer_check_is_relative_at_every_scale(kernel):
    """A wrong layer on a float32 model whose outputs are of order 1e-5 (every gradient small): the check's
    tolerance was absolute below 1 (1e-3 of 1 + max|grad|), it passed the layer and the kernel was 40% off;
    relative to the check's largest gradient it fails, and the kernel is the spec's to float32 rounding. (A
    gradient zero in exact arithmetic, an attention key's bias, stays within that floor: the outside zoo's
    plans keep them captured.)"""
    from lazyhasty.ntk import path_override

    torch.manual_seed(0)
    m = nn.Sequential(_Twice(3, 4), nn.Tanh(), nn.Linear(4, 2), _Tiny())
    x = torch.randn(6, 3)
    want = R.ntk_gram(copy.deepcopy(m).double(), [x.double()], kernel=kernel)
    with path_override("trace_one_block" if kernel == "trace" else None):
        got = ntk_gram(m, x, kernel=kernel, implementation="layerwise")
    assert got.dtype == torch.float32 and _rel(got, want) <= 1e-4


class _NormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d (a BatchNorm2d whose forward also applies an activation), its weight also added to
    the output: captured at its norm call, that plan misses the second use, and the check must find it (before
    norms were captured at their call, the activation alone made the module-output plan wrong)."""

    def forward(self, x):
        return torch.relu(super().forward(x)) + 0.5 * self.weight.view(1, -1, 1, 1)


class _BigBranch(nn.Module):
    """A conv -> norm-with-activation path beside a linear branch whose gradients are ~300x larger."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = _NormAct(4)
        self.head = nn.Linear(4 * 4 * 4, 2)
        self.big = nn.Linear(3 * 6 * 6, 2)

    def forward(self, x):
        h = self.head(self.norm(self.conv(x)).flatten(1))
        return h + self.big(300.0 * x.flatten(1))


def test_a_layer_with_gradients_far_below_the_largest_is_still_checked_against_its_own():
    """The check's floor is a layer's own scale (and at least a small share of the largest): with the largest
    gradient of the check as the floor, a wrong layer whose gradients were ~300x smaller passed (timm's
    efficientnet: a BatchNormAct2d taken as a plain norm, the float32 kernel 144% off)."""
    from lazyhasty.ntk import Featurizer

    torch.manual_seed(0)
    m = _BigBranch().eval()
    x = torch.randn(6, 3, 6, 6)
    fz = Featurizer(m, "layerwise", "trace", None)
    fz(x)
    assert "norm" not in {p.name for p in fz.plans}, fz.describe()
    want = R.ntk_gram(copy.deepcopy(m).double(), [x.double()], kernel="trace")
    assert _rel(ntk_gram(m, x, kernel="trace", implementation="layerwise"), want) <= 1e-5


def test_forget_drops_every_per_model_cache_and_the_next_call_checks_anew():
    """caches.forget(model) empties every per-model cache (the layer check's verdict, the mixing check, the
    input checks' trial forwards, ...): the next call runs the checks again, with the same kernel."""
    from lazyhasty._validate import SAMPLE
    from lazyhasty.ntk.capture import caches

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    K = ntk_gram(m, x)
    seen = []
    m[0].register_forward_hook(lambda mod, a, o: seen.append(a[0].shape[0]))
    ntk_gram(m, x)
    assert seen[:2] != [SAMPLE, SAMPLE - 1]  # remembered: no trial forwards
    caches.forget(m)
    assert all(m not in cache for cache in caches.ALL)
    seen.clear()
    assert _rel(ntk_gram(m, x), K) <= 1e-12
    assert seen[:2] == [SAMPLE, SAMPLE - 1]  # the input checks' trial forwards ran again
    assert m in caches.VERIFIED and m in caches.TRIAL_PASSED


def test_a_remembered_verdict_is_planned_once_and_later_calls_copy_that_plan(monkeypatch):
    """Once a model's layer check is remembered, the first Featurizer that replans from it keeps the plan in the
    Verdict and later calls copy it (LayerPlan.fresh) instead of planning the model again; the copies share no
    captured tensors, a dtype copy of the model plans its own modules, and every kernel stays exact."""
    from lazyhasty.ntk import featurize as FZ
    from lazyhasty.ntk.capture import caches

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3),
                      nn.LayerNorm(3)).eval()
    x = torch.randn(5, 3, 6, 6)
    want = R.ntk_gram(copy.deepcopy(m).double(), [x.double()])
    ntk_gram(m, x, implementation="layerwise")  # checks and remembers
    calls = []
    from lazyhasty.ntk.capture import planning

    real = planning.plan_layers
    monkeypatch.setattr(planning, "plan_layers", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = [ntk_gram(m, x, implementation="layerwise") for _ in range(3)]
    assert len(calls) == 1, calls  # the first later call plans; the next two copy (before: one a call)
    for K in got:
        assert _rel(K, want) <= 1e-5
    a = FZ.Featurizer(m, "layerwise", "full", None)
    b = FZ.Featurizer(m, "layerwise", "full", None)
    assert [p.name for p in a.plans] == [p.name for p in b.plans] and all(
        p is not q for p, q in zip(a.plans, b.plans))
    assert all(p.module is dict(m.named_modules())[p.name] for p in a.plans)
    d = FZ.Featurizer(m, "layerwise", "full", torch.float64)  # its own (float64) modules, not the template's
    assert all(p.module is not q.module for p, q in zip(d.plans, a.plans))
    assert _rel(ntk_gram(m, x.double(), implementation="layerwise", dtype=torch.float64), want) <= 1e-10
    caches.forget(m)


def test_the_output_size_is_remembered_per_structure_and_example_shape():
    """The one-example forward that sizes the outputs runs once per model structure and example shape (it was
    one a call), and a changed head gives the new size."""
    from lazyhasty.ntk.capture import caches

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    sized = []
    m.register_forward_hook(lambda mod, args, out: sized.append(1) if args[0].shape[0] == 1 else None)
    x = torch.randn(6, 3, dtype=torch.float64)
    for _ in range(3):
        ntk_gram(m, x, kernel="full")
    assert len(sized) == 1, sized
    m[2] = nn.Linear(5, 4).double()
    K = ntk_gram(m, x, kernel="full")
    assert K.shape == (6, 4, 6, 4) and _rel(K, R.ntk_gram(m, [x], kernel="full")) <= 1e-10
    after = len(sized)  # (the new structure's check ran one-example forwards too)
    ntk_gram(m, x, kernel="full")
    assert len(sized) == after
    caches.forget(m)


class _WideNormAlsoScaled(nn.LayerNorm):
    """A wide LayerNorm whose weight also enters the output a second, small way: captured at its norm call,
    the per-example gradients miss ~1% of the weight's."""

    def forward(self, x):
        return super().forward(x) + 0.01 * self.weight


def test_the_check_tolerance_does_not_grow_with_a_layers_size():
    """A float32 layer check compares max errors within 1e-3 of the gradient's scale, whatever the number of
    entries: with the old factor sqrt(rows) a 1000-channel norm's flattened gradient had a 3% tolerance, and a
    norm whose per-example gradients were ~1% off passed (its kernel wrong in float32, no warning)."""
    from lazyhasty.ntk import Featurizer

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 1000), _WideNormAlsoScaled(1000), nn.Tanh(), nn.Linear(1000, 2))
    x = torch.randn(6, 4)
    fz = Featurizer(m, "layerwise", "full", None)
    fz(x)
    assert "1" not in {p.name for p in fz.plans}, fz.describe()
    want = R.ntk_gram(copy.deepcopy(m).double(), [x.double()])
    assert _rel(ntk_gram(m, x, implementation="layerwise"), want) <= 1e-5


def test_the_perturbed_twin_and_the_check_rounds_on_their_own():
    """``capture.check.perturbed_twin``: the same structure, every parameter moved, the model untouched;
    ``CheckRounds``: a layer counts as passed only with a nonzero gradient and outside ``bad``, and
    ``all_passed`` asks it of every plan."""
    from types import SimpleNamespace

    from lazyhasty.ntk.capture.check import CheckRounds, model_bytes, perturbed_twin

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    nn.init.zeros_(m[2].weight)
    before = {n: t.clone() for n, t in m.state_dict().items()}
    twin = perturbed_twin(m, 7)
    assert all(torch.equal(t, before[n]) for n, t in m.state_dict().items())
    assert [n for n, _ in twin.named_parameters()] == [n for n, _ in m.named_parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(twin.parameters(), m.parameters()))
    assert bool(twin[2].weight.abs().min() > 0)  # a zero-initialised head is not zero on the twin
    assert model_bytes(m) == 4 * (12 + 4 + 4 + 4 + 8 + 2) + 4 * 8 + 8  # parameters, running stats, the counter
    rounds = CheckRounds()
    a = SimpleNamespace(name="a", weight_map=False, costs={"dims": (1, 3, 1, 1, 4)})
    b = SimpleNamespace(name="b", weight_map=False, costs=None)
    c = SimpleNamespace(name="c", weight_map=False, costs=None)
    rounds.note([a, b, c], [[torch.ones(2)], [torch.zeros(2)], [torch.ones(2)]], [c], k=5)
    assert rounds.passed == {("a", False)} and rounds.dims == {"a": (1, 3, 1, 5, 4)}
    assert rounds.all_passed([a]) and not rounds.all_passed([a, b]) and not rounds.all_passed([])


class _DeepGated(nn.Module):
    """A deep chain of Linear + eval-mode BatchNorm (nothing renormalises) feeding a hard-sigmoid gate, as timm's
    squeeze-excite blocks in mobilenetv3."""

    def __init__(self, d: int = 16, depth: int = 16):
        super().__init__()
        self.body = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(d, d), nn.BatchNorm1d(d))])
        for m in self.body:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=d ** -0.5)  # a scale-preserving init
        self.gate = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.body(x)
        return self.head(h * nn.functional.hardsigmoid(self.gate(h)))


def test_the_twin_keeps_the_scale_of_a_deep_model_so_its_gates_do_not_saturate():
    """The twin's noise keeps each tensor's root mean square: added as it was, it compounded over the chain
    (outputs ~600x the model's), every gate saturated, the gate's gradient was zero and the check undecided on
    the twin, so it ran again on the model's own block (timm mobilenetv3's first call)."""
    from lazyhasty.ntk.capture.check import perturbed_twin
    from lazyhasty.ntk.featurize import Featurizer

    torch.manual_seed(0)
    m = _DeepGated().eval()
    x = torch.randn(6, 16)
    twin = perturbed_twin(m, 98)
    with torch.no_grad():
        ratio = float(twin(x).norm() / m(x).norm())
    assert 0.2 < ratio < 5, ratio
    assert all(not torch.equal(a, b) for a, b in zip(twin.parameters(), m.parameters()))
    fz = Featurizer(m, "layerwise", "trace", None)
    fz(x)
    assert fz.verified and not fz._twin_tried  # decided on the twin
    want = R.ntk_gram(copy.deepcopy(m).double(), [x.double()], kernel="trace")
    assert _rel(ntk_gram(m, x, kernel="trace", implementation="layerwise"), want) <= 1e-5
