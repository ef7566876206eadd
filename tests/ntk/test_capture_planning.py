"""``capture/planning.py`` on its own: a layer plan as the layer check moves it, and its remembered Verdict."""
import torch
from torch import nn

from lazyhasty.ntk.capture.planning import CHECK_FAILED, Planning


class Doubled(nn.Linear):
    """A Linear subclass with its own forward: an affine-map candidate before the fallback."""

    def forward(self, x):
        return nn.functional.linear(x, 2 * self.weight, self.bias)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), Doubled(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def test_exclude_moves_a_layer_one_step_towards_the_fallback_with_its_reason():
    m = _model()
    planning = Planning(m, "layerwise")
    assert [p.name for p in planning.plans] == ["0", "2", "3", "4"] and planning.generic == []
    first = next(p for p in planning.plans if p.name == "2")
    planning.exclude([first])  # a Linear subclass: an affine map first
    second = next(p for p in planning.plans if p.name == "2")
    assert second.weight_map == "affine" and planning.generic == [] and not planning.reasons
    planning.why["2"] = "a reason the check found"
    planning.exclude([second])  # then the fallback, with the check's own reason
    assert "2" not in [p.name for p in planning.plans]
    assert planning.generic == ["2.weight", "2.bias"]
    assert planning.reasons == {"2.weight": "a reason the check found", "2.bias": "a reason the check found"}
    norm = next(p for p in planning.plans if p.name == "3")
    planning.exclude([norm])  # not a candidate: straight to the fallback, the default reason
    assert planning.reasons["3.weight"] == CHECK_FAILED and "3" not in [p.name for p in planning.plans]
    assert planning.module_names() == ({"2", "3"}, set())


def test_a_verdict_replans_by_name_and_its_template_is_copied():
    m = _model()
    planning = Planning(m, "layerwise")
    planning.exclude([p for p in planning.plans if p.name == "3"])
    planning.plans[0].copy_output = True  # an in-place op after the first layer (found by the capture)
    verdict = planning.verdict(("key",))
    assert verdict.excluded == frozenset({"3"}) and verdict.copies == {"0": (False, True)}
    again = Planning.from_verdict(m, "layerwise", verdict, template=True)  # plans by name, keeps the template
    assert again.signature() == planning.signature() and again.generic == planning.generic
    assert again.plans[0].copy_output and len(verdict.planned) == 1
    copied = Planning.from_verdict(m, "layerwise", verdict, template=True)  # copies it
    assert copied.signature() == planning.signature() and copied.excluded == again.excluded
    assert all(p is not q for p, q in zip(copied.plans, again.plans))
    other = Planning.from_verdict(_model(), "layerwise", verdict, template=False)  # another copy: by name
    assert other.signature() == planning.signature() and other.excluded != again.excluded


def test_per_example_copies_decide_once_per_owner_and_hand_their_gradients_over_once():
    """``capture/copies.py`` on its own: decisions keyed by the owner model (a twin decides for its model), the
    copies riding on a forward and the gradients kept for the fallback taken once."""
    from lazyhasty.ntk.capture import caches
    from lazyhasty.ntk.capture.backward import output_gradient_passes
    from lazyhasty.ntk.capture.copies import PerExampleCopies

    class Tokened(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.pos = nn.Parameter(torch.randn(1, 3))

        def forward(self, x):
            return self.lin(x + self.pos)

    torch.manual_seed(0)
    owner, twin = Tokened().double(), Tokened().double()

    def call(x, subs=None, model=None, standins=None):
        from torch.func import functional_call
        model = owner if model is None else model
        return functional_call(model, subs, (x,), strict=False) if subs else model(x)

    def passes(out, leaves, retain):
        return output_gradient_passes(out, leaves, retain, lambda: ("t",), {})[0]

    copies = PerExampleCopies(owner, call, passes)
    x = torch.randn(5, 3, dtype=torch.float64)
    used = []
    assert copies.decided(["pos"], ("key",), None) == []  # undecided without examples
    assert copies.decided(["pos"], ("key",), x, lambda: used.append(1) or twin) == ["pos"]
    assert copies.decided(["pos"], ("key",), x, lambda: used.append(1) or twin) == ["pos"] and used == [1]
    assert caches.COPYABLE[owner][2] == {"pos": True} and twin not in caches.COPYABLE
    leaves = copies.ride(owner, ["pos"], set(), 5)
    assert list(leaves) == ["pos"] and leaves["pos"].shape == (5, 3) and copies.riding() == leaves
    out = call(x, subs=leaves).reshape(5, -1)
    per_output = [list(col) for col in zip(*passes(out, list(leaves.values()), False))]
    copies.keep(per_output, owner)
    got = copies.take()
    assert copies.take() is None and copies.riding() is None
    J = torch.stack([torch.autograd.functional.jacobian(lambda p: owner.lin(x[i] + p), owner.pos.detach()[0])
                     for i in range(5)])  # [b, k, 3]
    assert torch.allclose(got["pos"], J, atol=1e-12)
    caches.forget(owner)
