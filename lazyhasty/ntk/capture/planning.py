"""A model's layer plan as the layer check moves it (:class:`Planning`), and the check's remembered outcome
(:class:`Verdict`).

``plan.plan_layers`` makes the first plan; the layer check (``featurize.Featurizer.verify_on_twin``, on a
perturbed twin) moves a layer that fails it one step towards the exact fallback (planned -> an affine map, for a
Linear subclass -> the fallback: :meth:`Planning.exclude`), with the reason per parameter (``explain()``). The
outcome is kept per model structure as a :class:`Verdict` (``caches.VERIFIED``), from which a later call plans
again by name (:meth:`Planning.from_verdict`; the first one's plan is kept as a template and copied).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .plan import affine_candidate, plan_layers
from .sites import capture_modules

# Why a layer that failed the check is on the fallback (explain()), unless the check found a more specific reason.
CHECK_FAILED = ("its per-example gradients from the captured tensors differ from autograd's (a parameter also used "
                "outside the module's forward, a forward other than its base class's, or a batch not on dim 0)")


@dataclass(frozen=True)
class Verdict:
    """The layer check's outcome for one model structure and state (``caches.VERIFIED[model][implementation]``).

    Attributes:
        key: ``Featurizer.fingerprint`` of the model it holds for.
        excluded: names (:func:`capture_modules`) of the modules moved to the fallback.
        copies: ``{plan name: (copy_input, copy_output)}``: layers capturing copies (in-place ops).
        affine: names of the Linear subclasses planned as affine maps.
        sites: the matmul sites found on the twin (``{parameter name: MatmulSite spec}``).
        layer_costs: ``{plan name: (G, d_in, S, k, d_out)}``, for ``implementation="auto"``.
        reasons: ``{parameter name: why it is on the fallback}``.
    """

    key: tuple
    excluded: frozenset
    copies: dict
    affine: frozenset
    sites: dict
    layer_costs: dict
    reasons: dict = field(default_factory=dict)
    # the plan these decisions give, made once by the first Featurizer that replans from them: (plans as
    # templates, generic names, excluded and affine module ids); a later call copies it (LayerPlan.fresh) instead
    # of planning the model again (~5 ms a call on timm's efficientnet: two module traversals and the kinds)
    planned: list = field(default_factory=list)  # (at most one entry: the Verdict itself is frozen)


class Planning:
    """One model's layer plan and what moved it.

    Attributes:
        plans: the planned layers (:class:`~.plan.LayerPlan`, decisions only).
        generic: names of the trainable parameters on the exact fallback (per-example copies or torch.func).
        excluded: ids of the modules the check moved to the fallback; ``affine``: of the Linear subclasses
            planned as affine maps.
        sites: the matmul sites in the model's own code (``{parameter name: MatmulSite spec}``).
        reasons: ``{parameter name: why it is on the fallback}`` (``explain()``).
        why: ``{plan name: reason}`` found this round of the check (captured tensors that do not fit the layout,
            a norm forward without a norm call), taken by :meth:`exclude`.
        layer_costs: ``{plan name: (G, d_in, S, k, d_out)}`` from the check, for ``implementation="auto"``.
    """

    def __init__(self, model: nn.Module, implementation: str, plan: bool = True):
        self.model = model
        self.implementation = implementation
        self.plans, self.generic = plan_layers(model, implementation) if plan else ([], [])
        self.excluded: set[int] = set()
        self.affine: set[int] = set()
        self.sites: dict = {}
        self.reasons: dict[str, str] = {}
        self.why: dict[str, str] = {}
        self.layer_costs: dict = {}

    @classmethod
    def from_verdict(cls, model: nn.Module, implementation: str, known: Verdict, template: bool) -> "Planning":
        """The plan a remembered check gives ``model``: copied from the verdict's template when ``template``
        (``model`` is the one the verdict is for) and one exists, else planned by name (and kept as the template
        when ``template``)."""
        out = cls(model, implementation, plan=False)
        out.sites = dict(known.sites)
        out.layer_costs = dict(known.layer_costs)
        out.reasons = dict(known.reasons)
        if template and known.planned:
            plans, generic, excluded, affine = known.planned[0]
            out.plans, out.generic = [p.fresh() for p in plans], list(generic)
            out.excluded, out.affine = set(excluded), set(affine)
            return out
        out.replan(known.excluded, known.affine, known.copies)
        if template:
            known.planned.append((tuple(p.fresh() for p in out.plans), tuple(out.generic), frozenset(out.excluded),
                                  frozenset(out.affine)))
        return out

    def signature(self) -> list:
        """What a check round can change: each plan's name and weight map (compare before and after)."""
        return [(p.name, p.weight_map) for p in self.plans]

    def copies(self, only_set: bool = False) -> dict:
        """``{plan name: (copy_input, copy_output)}`` (with ``only_set``, of the plans capturing a copy)."""
        return {p.name: (p.copy_input, p.copy_output) for p in self.plans
                if not only_set or p.copy_input or p.copy_output}

    def module_names(self, model: nn.Module | None = None, sites: dict | None = None) -> tuple[set, set]:
        """``(excluded, affine)`` by module name (:func:`capture_modules` of ``model``, default this plan's, with
        ``sites``): how the decisions carry to another copy of the model."""
        named = capture_modules(self.model if model is None else model, self.sites if sites is None else sites)
        return ({n for n, m in named if id(m) in self.excluded}, {n for n, m in named if id(m) in self.affine})

    def replan(self, excluded_names, affine_names, copies: dict) -> None:
        """Plan again with these modules on the fallback / planned as affine maps, by name; ``copies``:
        ``{plan name: (copy_input, copy_output)}`` kept from before."""
        named = capture_modules(self.model, self.sites)
        self.excluded = {id(m) for n, m in named if n in excluded_names}
        self.affine = {id(m) for n, m in named if n in affine_names}
        self._plan_again(copies)

    def exclude(self, bad, why: str = CHECK_FAILED) -> None:
        """Move the layers ``bad`` (plans that failed the check) a step towards the fallback: a Linear subclass
        first gets a second chance as an affine map (:func:`lazyhasty.ntk.capture.maps.affine_map`).

        Args:
            bad: the failing :class:`~.plan.LayerPlan` objects.
            why: the reason, recorded per parameter in :attr:`reasons` (``explain()`` shows it), unless the check
                recorded a more specific one for the layer in :attr:`why`.
        """
        names = {id(t): n for n, t in self.model.named_parameters()}
        for p in bad:
            reason = self.why.pop(p.name, why)
            if affine_candidate(p.module) and p.weight_map != "affine":
                self.affine.add(id(p.module))
            else:
                self.affine.discard(id(p.module))
                self.excluded.add(id(p.module))
                for _, t in p.params():
                    if id(t) in names:
                        self.reasons[names[id(t)]] = reason
        self._plan_again(self.copies())

    def whole_model_jacobian(self) -> None:
        """Every parameter on the fallback (``implementation="auto"`` chose the whole-model Jacobian)."""
        self.plans, self.generic = plan_layers(self.model, "jacobian")

    def verdict(self, key: tuple) -> Verdict:
        """This plan's decisions as the :class:`Verdict` remembered for the structure ``key``."""
        excluded, affine = self.module_names()
        return Verdict(key, frozenset(excluded), self.copies(only_set=True), frozenset(affine), dict(self.sites),
                       dict(self.layer_costs), dict(self.reasons))

    def _plan_again(self, copies: dict) -> None:
        self.plans, self.generic = plan_layers(self.model, self.implementation, self.excluded, self.affine,
                                               self.sites)
        for p in self.plans:
            p.copy_input, p.copy_output = copies.get(p.name, (False, False))
