"""Batches of named inputs (``{"input_ids": ..., "attention_mask": ..., "labels": ...}``) and ModelOutputs through
every entry point (issue 30 items 1 and 2): the same float64 numbers as the model called through a hand-written
wrapper on one stacked tensor (or :mod:`lazyhasty.reference`), the model's own parameter names, clear errors."""
import copy
import os
import sys

import pytest
import torch
from torch import nn

from lazyhasty import Monitor
from lazyhasty import reference as R
from lazyhasty.kernels import kernel_matvec, ntk_eigh
from lazyhasty.metrics import (
    LinearityProbe,
    SignPatterns,
    ntk_alignment,
    ntk_gram,
    representation_alignment,
    sign_similarity,
)
from lazyhasty.ntk import KernelOperator, NTKReference, explain

sys.path.insert(0, os.path.dirname(__file__))

L = 5  # tokens an example
TOL = 1e-10


class TwoInputs(nn.Module):
    """Token embeddings times a float mask, pooled, then an MLP with a ReLU: ``forward(input_ids, mask)``."""

    def __init__(self, vocab: int = 11, d: int = 6, k: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc1 = nn.Linear(d, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, k)

    def forward(self, input_ids, mask):
        h = (self.emb(input_ids) * mask[..., None]).sum(1)
        return self.fc2(self.act(self.fc1(h)))


class Stacked(nn.Module):
    """The hand-written glue the named inputs replace: ``x [n, 2 L]`` = ids (as floats) and mask side by side."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x[:, :L].long(), x[:, L:])


def two_inputs(seed: int = 0):
    torch.manual_seed(seed)
    m0 = TwoInputs().double()
    m = copy.deepcopy(m0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m, m0


def batches(n: int = 9, seed: int = 1, size: int = 4):
    """Dict batches (ids, float mask, labels) of ``n`` examples and the same examples stacked ``[n, 2 L]``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 11, (n, L), generator=g)
    mask = (torch.rand(n, L, generator=g) > 0.3).double()
    y = torch.randint(0, 3, (n,), generator=g)
    dicts = [{"input_ids": ids[i:i + size], "mask": mask[i:i + size], "labels": y[i:i + size]}
             for i in range(0, n, size)]
    return dicts, torch.cat([ids.double(), mask], 1)


def _close(a, b, tol=TOL):
    assert torch.as_tensor(a).shape == torch.as_tensor(b).shape
    assert float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max()) <= tol * max(1.0, float(torch.as_tensor(b).abs().max()))


@pytest.mark.parametrize("kernel", ["full", "trace", "diagonal"])
def test_ntk_gram_of_named_inputs_equals_the_stacked_wrapper_and_the_reference(kernel):
    m, _ = two_inputs()
    dicts, x = batches()
    got = ntk_gram(m, dicts, kernel=kernel, block_size=4)
    _close(got, ntk_gram(Stacked(m), x, kernel=kernel, block_size=4))
    _close(got, R.ntk_gram(Stacked(m), [x], kernel=kernel))
    _close(ntk_gram(m, dicts, kernel=kernel, implementation="naive"), got)
    _close(ntk_gram(m, dicts, kernel=kernel, implementation="jacobian"), got)
    whole = {k: torch.cat([b[k] for b in dicts]) for k in dicts[0]}  # the whole set as one dict
    _close(ntk_gram(m, whole, kernel=kernel), got)
    _close(ntk_gram(m, iter(dicts), kernel=kernel), got)  # a one-shot iterator
    _close(ntk_gram(m, [(b, b["labels"]) for b in dicts], kernel=kernel), got)  # (inputs, labels) tuples


def test_by_layer_keys_are_the_models_own_names_and_cross_kernels():
    m, _ = two_inputs()
    dicts, x = batches()
    parts = ntk_gram(m, dicts, kernel="trace", by_layer=True)
    assert sorted(parts) == ["emb", "fc1", "fc2"]  # no "model." prefix
    _close(sum(parts.values()), ntk_gram(Stacked(m), x, kernel="trace"))
    ref = ntk_gram(Stacked(m), x, kernel="trace", by_layer=True)
    for name in parts:
        _close(parts[name], ref[f"model.{name}"])
    assert sorted(ntk_alignment(m, dicts, m, kernel="trace", by_layer=True)) == ["emb", "fc1", "fc2"]
    _close(ntk_gram(m, dicts[:1], loader2=dicts[1:], kernel="full"),
           ntk_gram(Stacked(m), x[:4], loader2=x[4:], kernel="full"))


def test_explain_names_and_forms_are_the_models_own():
    m, _ = two_inputs()
    dicts, x = batches()
    plan, stacked = explain(m, dicts), explain(Stacked(m), x)
    rows = {p["name"]: (p["kind"], p["form"]) for p in plan.parameters}
    assert set(rows) == {"emb.weight", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert rows == {p["name"][len("model."):]: (p["kind"], p["form"]) for p in stacked.parameters}
    assert plan.generic == []


@pytest.mark.parametrize("kernel", ["trace", "full"])
def test_ntk_alignment_and_its_references(kernel):
    m, m0 = two_inputs()
    dicts, x = batches()
    want = R.ntk_alignment(Stacked(m), [x], Stacked(m0), kernel=kernel)
    assert abs(ntk_alignment(m, dicts, m0, kernel=kernel, block_size=4) - want) <= TOL
    assert abs(ntk_alignment(m, dicts, m0.state_dict(), kernel=kernel, centered=False) - want) <= TOL
    assert abs(ntk_alignment(m, dicts, m0, kernel=kernel, implementation="naive") - want) <= TOL
    for max_bytes in (1 << 30, 0):  # K_0 stored, and a frozen copy of the reference
        ref = NTKReference.capture(m0, dicts, kernel=kernel, max_bytes=max_bytes)
        assert abs(ref.alignment(m) - want) <= TOL


def test_kernel_operator_and_the_kernel_functions():
    m, _ = two_inputs()
    dicts, x = batches()
    whole = {k: torch.cat([b[k] for b in dicts]) for k in dicts[0]}
    K = ntk_gram(Stacked(m), x, kernel="trace")
    Q = torch.randn(9, 3, dtype=torch.float64)
    op = KernelOperator(m, whole, kernel="trace", block_size=4)
    _close(op(Q), K @ Q)
    _close(op(Q), K @ Q)  # the operator keeps the call for every product
    _close(KernelOperator(m, dicts, kernel="trace")(Q), K @ Q)  # a loader of dict batches
    _close(kernel_matvec(m, dicts, Q), K @ Q)
    lam, _ = ntk_eigh(m, dicts, 3, max_bytes=0, tol=1e-12, max_iter=500)
    _close(lam, torch.linalg.eigvalsh(K).flip(0)[:3], 1e-9)
    lam2, _ = ntk_eigh(m, dicts, 3)
    _close(lam2, torch.linalg.eigvalsh(K).flip(0)[:3], 1e-9)


def test_sign_and_representation_metrics_and_probes():
    m, m0 = two_inputs()
    dicts, x = batches()
    sm, sm0 = Stacked(m), Stacked(m0)
    want = sign_similarity(sm, x, sm0)
    assert want < 1.0
    assert sign_similarity(m, dicts, m0) == want
    assert sign_similarity(m, dicts, m0.state_dict()) == want
    pat = SignPatterns.capture(m0, dicts)
    assert pat.similarity(m, dicts) == want
    for centered in (False, True):
        r = representation_alignment(m, dicts, m0, centered=centered)
        assert abs(r - representation_alignment(sm, x, sm0, centered=centered)) <= TOL
    whole = {k: torch.cat([b[k] for b in dicts]) for k in dicts[0]}
    probe = LinearityProbe.capture(m0, whole, batch_size=4, ntk="trace")
    got, ref = probe.measure(m), LinearityProbe.capture(sm0, x, batch_size=4, ntk="trace").measure(sm)
    assert set(got) == set(ref)
    for key in got:
        assert abs(got[key] - ref[key]) <= TOL, key


def test_monitor_with_named_inputs_still_works():
    m, m0 = two_inputs()
    dicts, _ = batches()
    whole = {k: torch.cat([b[k] for b in dicts]) for k in dicts[0]}
    got = Monitor(m0, whole, metrics=("ntk_alignment", "sign_similarity")).measure(m)
    assert abs(got["ntk_alignment"] - ntk_alignment(m, dicts, m0, kernel="trace")) <= 1e-9
    assert got["sign_similarity"] == sign_similarity(m, dicts, m0)


class WithLogits(nn.Module):
    """Returns an object with ``.logits`` (not a tensor), as a ModelOutput does."""

    class Out:
        def __init__(self, logits):
            self.logits, self.hidden = logits, logits.sum(1)

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.Out(self.net(x))


def test_an_output_with_logits_is_taken_as_its_logits_without_output_and_names_keep_no_prefix():
    torch.manual_seed(0)
    m = WithLogits().double()
    x = torch.randn(6, 4, dtype=torch.float64)
    want = ntk_gram(m.net, x)
    _close(ntk_gram(m, x), want)
    _close(ntk_gram(m, x, output="logits"), want)
    _close(ntk_gram(m, x, output=lambda o: o.logits), want)
    assert abs(ntk_alignment(m, x, copy.deepcopy(m)) - 1.0) <= TOL
    byl = ntk_gram(m, x, by_layer=True, kernel="trace")
    assert sorted(byl) == ["net.0", "net.2"]
    assert sorted(ntk_gram(m, x, by_layer=True, kernel="trace", output="logits")) == ["net.0", "net.2"]
    assert [p["name"] for p in explain(m, x, output=lambda o: o.logits).parameters] == [
        n for n, _ in m.named_parameters()]
    _close(ntk_gram(m, x, output="hidden"), ntk_gram(nn.Sequential(m.net, _Sum()), x))


class _Sum(nn.Module):
    def forward(self, x):
        return x.sum(1)


def test_the_model_is_left_as_it_was():
    m, _ = two_inputs()
    dicts, _ = batches()
    before = dict(m.__dict__)
    ntk_gram(m, dicts)
    assert "forward" not in m.__dict__ and m.__dict__.keys() == before.keys()
    with pytest.raises(ValueError):
        ntk_gram(m, [{"input_ids": dicts[0]["input_ids"], "mask": dicts[0]["mask"][:2]}])
    assert "forward" not in m.__dict__


def test_bad_named_batches_are_errors_naming_the_keys():
    m, _ = two_inputs()
    dicts, _ = batches()
    ids, mask = dicts[0]["input_ids"], dicts[0]["mask"]
    with pytest.raises(ValueError, match=r"different numbers of rows.*'input_ids': 4.*'mask': 3"):
        ntk_gram(m, [{"input_ids": ids, "mask": mask[:3]}])
    with pytest.raises(TypeError, match=r"\['mask'\] must be a tensor.*got list"):
        ntk_gram(m, [{"input_ids": ids, "mask": mask.tolist()}])
    with pytest.raises(ValueError, match="no input keys"):
        ntk_gram(m, [{"labels": ids}])
    with pytest.raises(ValueError, match=r"batch 1 has inputs .*'ids'.*the same keys"):
        ntk_gram(m, [{"input_ids": ids, "mask": mask}, {"ids": ids, "mask": mask}])
    with pytest.raises(TypeError, match="first batch was a dict of named inputs"):
        ntk_gram(m, [{"input_ids": ids, "mask": mask}, ids])
    with pytest.raises(ValueError, match="the same keys, per-example shapes"):  # another sequence length
        ntk_gram(m, [{"input_ids": ids, "mask": mask}, {"input_ids": ids[:, :3], "mask": mask[:, :3]}])
    with pytest.raises(ValueError, match="no input keys"):
        sign_similarity(m, [{"labels": ids}], copy.deepcopy(m))
    x = torch.cat([ids.double(), mask], 1)
    with pytest.raises(TypeError, match="holds tensors but another set named inputs"):
        ntk_gram(m, x, loader2=[{"input_ids": ids, "mask": mask}])
    with pytest.raises(TypeError, match="holds tensors but another set named inputs"):
        ntk_gram(m, [{"input_ids": ids, "mask": mask}], loader2=x)


def test_the_x_key_keeps_its_meaning():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    _close(ntk_gram(net, [{"x": x, "y": torch.zeros(5)}]), ntk_gram(net, x))


# --- a tiny Hugging Face BERT from the outside zoo -------------------------------------------------------------
@pytest.fixture(scope="module")
def bert():
    from outside_zoo import build

    return build("hf-bert-mask", n=4)


def test_bert_dict_batch_equals_the_stacked_stand_in_in_every_ntk_entry_point(bert):
    batch = dict(bert.inputs, labels=torch.tensor([0, 1, 2, 0]))
    for kernel in ("full", "trace"):
        _close(ntk_gram(bert.natural, [batch], kernel=kernel), ntk_gram(bert.model, bert.x, kernel=kernel))
    _close(ntk_gram(bert.natural, [batch], kernel="trace"), R.ntk_gram(bert.model, [bert.x], kernel="trace"))
    parts = ntk_gram(bert.natural, [batch], kernel="trace", by_layer=True)
    stacked = ntk_gram(bert.model, bert.x, kernel="trace", by_layer=True)
    assert sorted(parts) == sorted(k[len("model."):] for k in stacked)
    assert "bert.embeddings.word_embeddings" in parts
    init = copy.deepcopy(bert.natural)
    with torch.no_grad():
        for p in bert.natural.parameters():
            p.add_(0.05 * torch.randn_like(p))
    try:
        want = ntk_alignment(bert.model, bert.x, _stacked(init, bert), kernel="trace")
        assert abs(ntk_alignment(bert.natural, [batch], init, kernel="trace") - want) <= TOL
        assert abs(representation_alignment(bert.natural, [batch], init)
                   - representation_alignment(bert.model, bert.x, _stacked(init, bert))) <= TOL
    finally:
        with torch.no_grad():
            for p, q in zip(bert.natural.parameters(), init.parameters()):
                p.copy_(q)


def _stacked(natural, bert):
    from outside_zoo import StackedInputs

    return StackedInputs(natural, bert.model.keys)


def test_bert_explain_shows_the_stand_ins_forms_under_the_models_names(bert):
    plan = explain(bert.natural, bert.inputs)
    stacked = explain(bert.model, bert.x)
    rows = {p["name"]: (p["kind"], p["form"]) for p in plan.parameters}
    assert rows == {p["name"][len("model."):]: (p["kind"], p["form"]) for p in stacked.parameters}
    assert plan.path == stacked.path
    assert any(form != "torch.func" for _, form in rows.values())  # captured per layer, not all on the fallback


def test_the_layer_check_is_kept_across_calls_and_keyed_by_the_call():
    from lazyhasty.ntk.capture.caches import VERIFIED

    m, _ = two_inputs(seed=3)
    dicts, _ = batches()
    ntk_gram(m, dicts, kernel="trace", implementation="layerwise")
    first = VERIFIED[m]["layerwise"]
    ntk_gram(m, dicts, kernel="trace", implementation="layerwise")
    assert VERIFIED[m]["layerwise"] is first  # the same model object is measured: its check stays cached
    ntk_gram(m, dicts, kernel="trace", implementation="layerwise", output=lambda out: out[:, :2])
    other = VERIFIED[m]["layerwise"]
    assert other is not first and other.key != first.key  # another output is another function to check


def test_named_inputs_the_forward_does_not_take_are_named_before_the_call():
    """A dict batch whose keys are not the forward's arguments: a clear error naming both (was Python's
    'forward() got an unexpected keyword argument' from inside the engine's first trial forward)."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    batch = {"inputs": torch.randn(4, 3)}
    with pytest.raises(ValueError, match=r"\['inputs'\].*takes \['input'\].*match none"):
        ntk_gram(net, [batch], kernel="trace")


class _CountingLoader:
    """A re-iterable loader that counts its passes."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


@pytest.mark.parametrize("named", [False, True])
def test_reading_the_first_batch_costs_no_second_pass_over_the_loader(named):
    """The entry points read a loader's first batch to see whether it holds named inputs; that batch is the
    start of the pass the engine makes, not a pass of its own (before: two passes, e.g. a DataLoader's workers
    started twice), and the kernel is the same as from the tensor."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x = torch.randn(7, 3, dtype=torch.float64)
    parts = x.split(3)
    loader = _CountingLoader([{"input": p} for p in parts] if named else list(parts))
    K = ntk_gram(net, loader, kernel="trace")
    assert loader.passes == 1
    assert torch.allclose(K, ntk_gram(net, x, kernel="trace"), rtol=0, atol=1e-12)
