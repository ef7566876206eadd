"""Per-example copies of one model's fallback parameters, across a call (:class:`PerExampleCopies`).

A parameter the model only broadcasts against the batch (a class token, a position embedding, a layer scale)
gets its per-example gradients from ``b`` copies of itself, or stand-ins at the operations that broadcast it
(``fallback.copy_jacobian``). This object holds that side of one ``Featurizer``: which parameters take copies
(decided once per model structure on a perturbed twin, ``caches.COPYABLE`` / ``COPY_WHY``, keyed by the model the
decisions are for: a twin decides for its model), the copies riding on the current capture forward, and the
gradients its backward passes gave them (taken by the fallback's Jacobian instead of a forward of its own).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..._precision import exact_fp32
from . import caches
from .broadcast import BroadcastStandIns, standin_grads
from .fallback import copy_jacobian, copy_reference, decide_copies, per_example_leaves

# Examples of a block the copy decisions run on (weighted by random example weights: any number above one
# tells examples apart; at 3 the batch could not be told from RGB channels)
DECISION_EXAMPLES = 4


class PerExampleCopies:
    """The per-example-copy side of one Featurizer.

    Args:
        owner: the model whose decisions these are (the user's; for a twin, the model it checks for).
        call: ``call(x, subs=None, model=None, standins=None)``: the model (or ``model``) on ``x`` with ``subs``
            ``{name: tensor}`` in place of those parameters and ``standins`` active.
        passes: ``passes(out, leaves, retain)``: each output's gradients at ``leaves`` in turn.
    """

    def __init__(self, owner: nn.Module, call: Callable, passes: Callable):
        self.owner = owner
        self._call = call
        self._passes = passes
        self.subs: dict | None = None  # copy leaves of the current capture forward
        self.standins: BroadcastStandIns | None = None  # and its stand-ins at operations, when any
        self.captured: dict | None = None  # their gradients {name: [b, k, numel]}, for the fallback's Jacobian

    def decided(self, generic: list, key: tuple, x: torch.Tensor | None = None,
                twin: Callable[[], nn.Module] | None = None) -> list[str]:
        """The parameters of ``generic`` that take per-example copies: the substituted forward runs, and its
        per-example gradients weighted by random example and output weights equal autograd's gradient of the same
        weighted sum through the model (an op that mixed the copies between examples fails it). Decided once
        per ``key`` (structure and dtype) and example shape, on up to :data:`DECISION_EXAMPLES` examples of ``x``
        run through ``twin()`` (a perturbed copy: values such as a zero-initialised head would make every
        gradient zero); ``[]`` for undecided parameters without ``x``."""
        known = caches.COPYABLE.get(self.owner)
        shape = None if x is None else (tuple(x.shape[1:]), x.dtype)
        if known is None or known[0] != key or (x is not None and known[1] != shape):
            known = (key, shape, {})  # name -> passed the check
        decided = known[2]
        todo = [n for n in generic if n not in decided]
        if todo and x is not None:
            model = twin()
            named = dict(model.named_parameters())
            probe = x[: min(x.shape[0], DECISION_EXAMPLES)]
            why = caches.COPY_WHY.setdefault(self.owner, {})

            def reference(xs, names):
                with torch.enable_grad():
                    out = self._call(xs, model=model).reshape(xs.shape[0], -1)
                return copy_reference(out, named, names)

            with exact_fp32():  # a check: never in TF32
                decide_copies(todo, decided, why, probe, named,
                              lambda xs, names, at_ops, ops: self.jacobian(xs, names, model, at_ops, ops), reference)
            caches.COPYABLE[self.owner] = (key, shape, decided)
        return [n for n in generic if decided.get(n)]

    def failures(self, generic: list) -> dict:
        """``{parameter name: why}`` for parameters of ``generic`` whose per-example stand-ins broke the forward."""
        return {n: why for n, why in caches.COPY_WHY.get(self.owner, {}).items() if n in generic}

    def ops(self, generic: list) -> dict:
        """``{parameter name: operation names}`` of the parameters of ``generic`` captured by stand-ins at
        operations (``broadcast``) rather than by copies of themselves (known once :meth:`decided` ran)."""
        known = caches.COPYABLE.get(self.owner)
        if known is None:
            return {}
        return {n: list(v) for n, v in known[2].items() if isinstance(v, tuple) and n in generic}

    def ride(self, model: nn.Module, names: list[str], at_ops: set, b: int) -> dict | None:
        """Set up the copies riding on a capture forward of ``b`` examples: ``{name: [b, ...] leaf}`` for
        ``names`` not in ``at_ops``, and stand-ins at operations for those in it (:attr:`standins`); None when
        there are no leaves."""
        self.subs, self.standins = None, None
        if not names:
            return None
        named = dict(model.named_parameters())
        if at_ops:
            self.standins = BroadcastStandIns(named, at_ops, b)
        self.subs = per_example_leaves(named, [n for n in names if n not in at_ops], b) or None
        return self.subs

    def riding(self) -> dict | None:
        """``{name: leaf}`` of the copies on the capture forward that just ran, then ``{("op", i): leaf}`` for
        its stand-ins at operations, in that order (None when there are none)."""
        mode = self.standins
        if not self.subs and not (mode and mode.standins):
            return None
        out = dict(self.subs or {})
        out.update({("op", i): s.leaf for i, s in enumerate(mode.standins if mode else ())})
        return out

    def keep(self, per_output: list[list[torch.Tensor]], model: nn.Module) -> None:
        """``per_output[j][a]``: output a's gradient of riding leaf j (``[b, ...]``, :meth:`riding`'s order) ->
        :attr:`captured` ``{name: [b, k, numel]}``."""
        subs = self.subs or {}
        got = {n: torch.stack([g.reshape(g.shape[0], -1) for g in cols], 1) for n, cols in zip(subs, per_output)}
        mode = self.standins
        if mode is not None and mode.standins:
            grads = [torch.stack(cols, 1) for cols in per_output[len(subs):]]
            got.update(standin_grads(mode.standins, grads, dict(model.named_parameters())))
        self.captured, self.subs, self.standins = got, None, None

    def take(self) -> dict | None:
        """The gradients :meth:`keep` kept (once: a later block captures its own)."""
        got, self.captured = self.captured, None
        return got

    def jacobian(self, x: torch.Tensor, names: list[str], model: nn.Module, at_ops, ops: dict | None = None):
        """``[b, k, numel]`` per parameter of ``names`` from a forward of ``model`` with per-example copies
        (``fallback.copy_jacobian``; those in ``at_ops``: stand-ins at their operations)."""
        def call(inp, subs, standins):
            return self._call(inp, subs=subs, model=model, standins=standins)

        return copy_jacobian(call, dict(model.named_parameters()), x, names, set(at_ops), self._passes, ops)
