"""Capture rules by operation (``lazyhasty/ntk/capture/``, issue 30 item 4) on small hand-written modules.

Each module uses one pattern the outside libraries use (timm, Hugging Face), written out by hand: the plan
``explain()`` returns names the rule that captures it (its ``kind`` / ``form`` / ``at_ops``, never the generic
torch.func fallback), and the float64 full and trace kernels equal :func:`lazyhasty.reference.ntk_gram` within
1e-10. Before these rules every parameter named here was on torch.func (``explain(...).generic``).
"""
import torch
import torch.nn.functional as F
from torch import nn

from lazyhasty import reference as R
from lazyhasty.metrics import ntk_gram
from lazyhasty.ntk import explain

TOL = 1e-10


def _rel(got, want):
    return float((got - want).norm() / want.norm())


def _exact(m, x):
    for kernel in ("full", "trace"):
        for implementation in ("layerwise", "auto"):
            got = ntk_gram(m, x, kernel=kernel, implementation=implementation)
            err = _rel(got, R.ntk_gram(m, [x], kernel=kernel))
            assert err <= TOL, f"{kernel} {implementation}: {err:.3g}"


def _rows(m, x):
    plan = explain(m, x, kernel="full", implementation="layerwise")
    return plan, {p["name"]: p for p in plan.parameters}


class LayerScale2d(nn.Module):
    """ConvNeXt's block: ``x.mul(gamma.reshape(1, -1, 1, 1))`` after a convolution."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gamma = nn.Parameter(torch.rand(4) + 0.5)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv(x).mul(self.gamma.reshape(1, -1, 1, 1))
        return self.head(torch.tanh(h).mean((2, 3)))


class TokenScale(nn.Module):
    """ResMLP: ``x + ls * mlp(x)`` with ``ls`` ``[d]`` on ``[b, L, d]``, and Affine's ``addcmul(beta, alpha, x)``."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.rand(1, 1, 5) + 0.5)
        self.beta = nn.Parameter(torch.randn(1, 1, 5))
        self.fc = nn.Linear(5, 5)
        self.ls = nn.Parameter(torch.rand(5) + 0.5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.addcmul(self.beta, self.alpha, x)
        h = h + self.ls * torch.tanh(self.fc(h))
        return self.head(h.mean(1))


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 ``Conv1D``: the weight ``[in, out]``, batch and positions merged in one ``addmm``."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx ** 0.5)
        self.bias = nn.Parameter(torch.randn(nf))
        self.nf = nf

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.size()[:-1] + (self.nf,))


class Conv1DNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Conv1D(4, 6)
        self.b = Conv1D(6, 2)

    def forward(self, x):  # x [b, L, 4]
        return self.b(torch.tanh(self.a(x))).mean(1)


class PositionEmbedded(nn.Module):
    """BERT / GPT-2 embeddings: position ids a ``[1, L]`` buffer, looked up and added to the token embeddings."""

    def __init__(self, vocab=11, L=5, d=6):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(8, d)
        self.register_buffer("position_ids", torch.arange(8)[None], persistent=False)
        self.head = nn.Linear(d, 2)

    def forward(self, ids):
        L = ids.shape[1]
        h = self.tok(ids)
        h += self.pos(self.position_ids[:, :L])
        return self.head(torch.tanh(h).mean(1))


class NormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d``: batch norm then an activation in one module's forward."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return F.silu(x)


class LayerNorm2d(nn.LayerNorm):
    """timm's ``LayerNorm2d``: permute to channels last, ``layer_norm``, permute back."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class RMSNormT5(nn.Module):
    """T5's ``T5LayerNorm``: ``weight * x / rms(x)`` written out elementwise."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = NormAct2d(4)
        self.ln = LayerNorm2d(4)
        self.rms = RMSNormT5(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.ln(self.bn(self.conv(x)))
        return self.head(self.rms(h.mean((2, 3))))


class AttentionBias(nn.Module):
    """T5 on the SDPA path: a learned bias ``[1, H, L, L]`` as the attention's additive ``attn_mask``."""

    def __init__(self, L=4, d=6, H=2):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.bias = nn.Parameter(torch.randn(1, H, L, L))
        self.H = H
        self.head = nn.Linear(d, 2)

    def forward(self, x):  # [b, L, d]
        b, L, d = x.shape
        q, k, v = self.qkv(x).view(b, L, 3, self.H, d // self.H).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        return self.head(o.transpose(1, 2).reshape(b, L, d).mean(1))


class TiedEmbeddings(nn.Module):
    """T5's ``shared`` and ``encoder.embed_tokens``: two Embedding modules holding one weight, one called."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Embedding(9, 4)
        self.embed_tokens = nn.Embedding(9, 4)
        self.embed_tokens.weight = self.shared.weight
        self.head = nn.Linear(4, 2)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed_tokens(ids)).mean(1))


class AlsoMultiplied(nn.Module):
    """A parameter broadcast at ``h * p`` and also entering a product ``h @ outer(p, p)``: stand-ins at the mul
    miss the product's share of its gradient, which the check sees: it stays on torch.func, and says why."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.p = nn.Parameter(torch.rand(4) + 0.5)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.out(h * self.p + h @ torch.outer(self.p, self.p))


def _double(m):
    torch.manual_seed(0)
    return m.double().eval()


def test_layer_scale_reshaped_is_captured_at_its_mul():
    torch.manual_seed(0)
    m, x = _double(LayerScale2d()), torch.randn(5, 3, 6, 6, dtype=torch.float64)
    plan, rows = _rows(m, x)
    assert plan.generic == []
    assert (rows["gamma"]["kind"], rows["gamma"]["form"], rows["gamma"]["at_ops"]) == (
        "broadcast", "per-example copies", ["mul"])
    _exact(m, x)


def test_token_layer_scale_and_affine_are_captured():
    torch.manual_seed(0)
    m, x = _double(TokenScale()), torch.randn(5, 3, 5, dtype=torch.float64)
    plan, rows = _rows(m, x)
    assert plan.generic == []
    assert rows["ls"]["at_ops"] == ["mul"] and rows["ls"]["kind"] == "broadcast"
    assert rows["alpha"]["form"] == rows["beta"]["form"] == "per-example copies"
    _exact(m, x)


def test_addmm_with_merged_batch_rows_is_a_linear_site():
    torch.manual_seed(0)
    m, x = _double(Conv1DNet()), torch.randn(5, 7, 4, dtype=torch.float64)
    plan, rows = _rows(m, x)
    assert plan.generic == []
    for name in ("a.weight", "a.bias", "b.weight", "b.bias"):
        assert rows[name]["kind"] == "linear" and rows[name]["form"] in ("ghost", "materialized"), rows[name]
    _exact(m, x)


def test_position_embedding_on_a_broadcast_buffer_is_captured():
    torch.manual_seed(0)
    m = _double(PositionEmbedded())
    ids = torch.randint(0, 11, (6, 5))
    plan, rows = _rows(m, ids)
    assert plan.generic == []
    assert rows["tok.weight"]["kind"] == "embedding"
    assert rows["pos.weight"]["kind"] == "broadcast" and rows["pos.weight"]["at_ops"] == ["add"]
    _exact(m, ids)


def test_norms_with_an_activation_a_permuted_layout_or_written_out_are_captured():
    torch.manual_seed(0)
    m = Norms()
    with torch.no_grad():
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2.0)
    m, x = _double(m), torch.randn(5, 3, 6, 6, dtype=torch.float64)
    plan, rows = _rows(m, x)
    assert plan.generic == []
    # the norm subclasses with a forward of their own are captured at their norm call (capture.norm_calls): a
    # norm layer's materialized gradients, with no stand-ins over the whole forward (before: stand-ins at
    # batch_norm / layer_norm); the written-out RMS norm's weight by a stand-in at its mul
    for name in ("bn.weight", "bn.bias", "ln.weight", "ln.bias"):
        assert (rows[name]["kind"], rows[name]["form"]) == ("norm", "materialized"), rows[name]
    assert rows["rms.weight"]["at_ops"] == ["mul"]
    _exact(m, x)


class NormAlsoAdded(nn.BatchNorm2d):
    """A norm whose weight is also added to its output: captured at its norm call, the check finds the other use."""

    def forward(self, x):
        return torch.relu(super().forward(x)) + 0.5 * self.weight.view(1, -1, 1, 1)


class NoNormCall(nn.LayerNorm):
    """A LayerNorm subclass writing the affine map out (no norm call on its own weight)."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, None, None, self.eps) * self.weight + self.bias


def test_a_norm_at_its_call_whose_parameters_are_used_another_way_goes_to_the_fallback_and_says_why():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), NormAlsoAdded(4), nn.Flatten(), nn.Linear(4 * 16, 5), NoNormCall(5),
                      nn.Linear(5, 2)).eval()
    m, x = _double(m), torch.randn(5, 3, 6, 6, dtype=torch.float64)
    plan, rows = _rows(m, x)
    assert rows["1.weight"]["kind"] == "broadcast" and rows["1.weight"]["at_ops"] == ["add", "batch_norm"], rows
    assert rows["1.bias"]["at_ops"] == ["batch_norm"], rows["1.bias"]  # (its module is on the fallback)
    assert rows["4.weight"]["at_ops"] == ["mul"] and rows["4.bias"]["at_ops"] == ["add"], rows["4.weight"]
    from lazyhasty.ntk import Featurizer

    fz = Featurizer(m, "layerwise", "full", None)
    fz(x)
    assert "made no norm call" in fz.fallback_reasons["4.weight"], fz.fallback_reasons
    _exact(m, x)


def test_attention_bias_as_an_sdpa_mask_is_captured():
    torch.manual_seed(0)
    m, x = _double(AttentionBias()), torch.randn(5, 4, 6, dtype=torch.float64)
    plan, rows = _rows(m, x)
    assert plan.generic == []
    assert rows["bias"]["at_ops"] == ["scaled_dot_product_attention"]
    _exact(m, x)


def test_tied_embedding_is_planned_on_the_module_that_runs():
    torch.manual_seed(0)
    m = _double(TiedEmbeddings())
    ids = torch.randint(0, 9, (6, 5))
    plan, rows = _rows(m, ids)
    assert [p["name"] for p in plan.parameters][:1] == ["shared.weight"]  # (named once: the first holder)
    assert plan.generic == [] and rows["shared.weight"]["kind"] == "embedding"
    _exact(m, ids)


def test_a_parameter_also_used_another_way_stays_on_torch_func_and_says_why():
    torch.manual_seed(0)
    m, x = _double(AlsoMultiplied()), torch.randn(6, 3, dtype=torch.float64)
    plan, rows = _rows(m, x)
    assert plan.generic == ["p"]
    assert "stand-ins at mul differ from autograd" in rows["p"]["fallback"]
    _exact(m, x)


def test_every_layer_kind_has_one_rule_and_no_kind_dispatch_outside_capture():
    """Issue 26: supporting a new family of layers is a change in ``capture/`` alone. Every LayerKind has its
    rule in ``capture.rules.RULES``, and no module of the engine outside ``capture/`` branches on a layer's
    kind (before the rules, ``featurize._plan_feature``, ``forms.trace_block._one_output`` and ``paths`` did)."""
    import pathlib
    import re

    import lazyhasty.ntk
    from lazyhasty.ntk.capture.plan import LayerKind
    from lazyhasty.ntk.capture.rules import RULES

    assert set(RULES) == set(LayerKind)
    root = pathlib.Path(lazyhasty.ntk.__file__).parent
    branch = re.compile(r"\.kind\s*(==|!=|in\b)|LayerKind\.")
    offenders = [f"{f.relative_to(root)}:{i}: {line.strip()}" for f in sorted(root.rglob("*.py"))
                 if "capture" not in f.relative_to(root).parts
                 for i, line in enumerate(f.read_text().splitlines(), 1) if branch.search(line)]
    assert not offenders, offenders


def test_both_paths_reach_a_layer_through_its_rule(monkeypatch):
    """The tile path and the one-block trace path take a layer's features and check from its kind's rule: a
    rule put in its place (here the norm rule, wrapped to count its calls) is what both paths run, and the
    kernels stay exact."""
    from lazyhasty.ntk.capture import caches
    from lazyhasty.ntk.capture import rules as rules_mod
    from lazyhasty.ntk.capture.plan import LayerKind
    from lazyhasty.ntk.paths import path_override

    calls = {"tile": 0, "trace": 0}

    class Counted(rules_mod.NormRule):
        def tile_feature(self, *a):
            calls["tile"] += 1
            return super().tile_feature(*a)

        def trace_output(self, *a):
            calls["trace"] += 1
            return super().trace_output(*a)

    monkeypatch.setitem(rules_mod.RULES, LayerKind.NORM, Counted())
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    for kernel, path in (("full", "tiles"), ("trace", "trace_one_block")):
        caches.forget(m)
        with path_override(path):
            got = ntk_gram(m, x, kernel=kernel, implementation="layerwise")
        assert _rel(got, R.ntk_gram(m, [x], kernel=kernel)) <= TOL, kernel
    assert calls["tile"] > 0 and calls["trace"] > 0, calls


def test_a_capture_forward_returns_its_calls_as_a_value_and_plans_hold_no_tensor():
    """``capture_forward`` returns a :class:`Captured` (the output and, per plan, its calls); the plans hold only
    decisions, so a plan kept in a verdict's cache or reused for the next block holds no tensor of a block
    (before, a LayerPlan carried ``inputs`` / ``outputs`` / ``versions`` / ``call_args`` of the last capture)."""
    import dataclasses

    from lazyhasty.ntk import Featurizer
    from lazyhasty.ntk.capture import caches
    from lazyhasty.ntk.capture.captured import Captured
    from lazyhasty.ntk.capture.plan import LayerPlan

    captured_fields = {"inputs", "outputs", "versions", "call_args"}
    assert not captured_fields & {f.name for f in dataclasses.fields(LayerPlan)}
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.ReLU(inplace=True), nn.Linear(5, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    ntk_gram(m, x)  # checks and remembers: later Featurizers copy the verdict's plans
    fz = Featurizer(m, "layerwise", "full", None)
    cap = fz.capture(x)
    assert isinstance(cap, Captured) and cap.plans == fz.plans and len(cap.calls) == len(fz.plans)
    assert torch.equal(cap.out, m(x))
    by_name = dict(zip((p.name for p in cap.plans), cap.calls))
    assert by_name["0"].inputs[0] is not x and torch.equal(by_name["0"].inputs[0], x)
    assert by_name["1"].outputs[0].shape == (4, 5) and by_name["1"].outputs[0].requires_grad
    # the in-place ReLU after the LayerNorm moved its output: the plan now hands the model a copy
    assert [p.copy_output for p in cap.plans if p.name == "1"] == [True]
    for p in fz.plans + [q for v in caches.VERIFIED[m].values() for t in v.planned for q in t[0]]:
        assert not any(isinstance(getattr(p, f.name), (torch.Tensor, list)) for f in dataclasses.fields(p)), p.name


def test_a_probing_capture_finds_the_copies_in_one_forward():
    """The twin's capture probes (``capture_forward(probe=True)``): every captured input and output is a copy and
    the model's own tensors are watched, so one forward finds the layers an in-place op needs copies for (the same
    as the two forwards of a plain capture find) and its records are right. Before, the twin's first capture
    ran its forward twice on models with in-place activations (timm's squeeze-excite: ~10 ms of a first call)."""
    from lazyhasty.ntk.capture.hooks import capture_forward
    from lazyhasty.ntk.capture.planning import Planning

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = torch.relu_(self.a(x))  # a's output changed in place
            y = self.b(h)
            h += y  # b's input (h) changed in place after b read it
            return self.c(h)

    torch.manual_seed(0)
    m, x = Residual().double(), torch.randn(5, 4, dtype=torch.float64)
    found = {}
    for probe in (True, False):
        plans = Planning(m, "layerwise").plans
        runs = []

        def forward(reset):
            runs.append(1)
            return m(x)

        cap = capture_forward(plans, 5, forward, True, {}, probe=probe)
        found[probe] = ({p.name: (p.copy_input, p.copy_output) for p in plans}, len(runs))
        by_name = dict(zip((p.name for p in plans), cap.calls))
        assert torch.equal(by_name["b"].inputs[0], torch.relu(m.a(x)).detach())  # the value b read
        assert torch.equal(cap.out, m(x))
    assert found[True][1] == 1 and found[False][1] == 2, found
    assert found[True][0] == found[False][0] == {"a": (False, True), "b": (True, False), "c": (False, False)}, found
