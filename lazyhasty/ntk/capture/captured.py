"""What one capture forward recorded, as a value: per planned layer its calls (:class:`Calls`), with the
forward's output (:class:`Captured`).

``hooks.capture_forward`` returns it; the tile path's features (``rules``), the layer check, the one-block
trace path (``forms.trace_block``) and the trace path's block size read it, and the block drops it when done. The
plans (``plan.LayerPlan``) hold decisions only (layer, kind, parameters, weight map, form, in-place copies): a
plan kept in a per-model cache (``Verdict.planned``) or reused for the next block holds no tensor of a block.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Calls:
    """One planned layer's calls in one forward, in call order.

    Attributes:
        inputs: each call's input (detached: a view of the model's tensor, a copy when the plan's ``copy_input``).
        outputs: each call's output, in the autograd graph (the tensor whose gradient the layer's backward sees).
        versions: ``(input version, output version)`` at the call: an in-place op on either after it
            (``ReLU(inplace=True)``, ``out += identity``) moved the counter, and the capture runs again with copies.
        call_args: for a norm captured at its norm call (``plan.at_call``): each call's function and its other
            arguments (``norm_calls``); empty otherwise.
        probe: every call's input is copied and its output handed on to the model as a copy, whatever the plan
            says, while the model's own input and the copy it continues on are watched for in-place ops
            (``watched``): one forward both captures safely and finds which layers need copies (the layer check's
            captures on the twin: the second forward an in-place op cost was ~10 ms of a timm mobilenetv3 first
            call).
    """

    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    versions: list = field(default_factory=list)
    call_args: list = field(default_factory=list)
    probe: bool = False
    watched: tuple = field(default_factory=lambda: ([], []))

    def record(self, plan, x: torch.Tensor, out: torch.Tensor) -> None:
        """Record the call ``x -> out`` of ``plan``'s layer (``x`` copied when ``plan.copy_input``)."""
        x = x.detach()
        self.inputs.append(x.clone() if plan.copy_input or self.probe else x)
        self.outputs.append(out)
        self.versions.append((x._version, out._version))
        if self.probe:
            self.watched[0].append((x, x._version))

    def hand_on(self, plan, out: torch.Tensor) -> torch.Tensor:
        """What the model continues on after a recorded call: a copy of ``out`` when ``plan.copy_output`` (or
        probing), so that an in-place op of the model leaves the recorded ``out`` as backward sees it; else ``out``."""
        if not (plan.copy_output or self.probe):
            return out
        handed = out.clone()
        if self.probe:
            self.watched[1].append((handed, handed._version))
        return handed

    def clear(self) -> None:
        """Drop every recorded call (a forward that restarts; the hooks keep this record)."""
        self.inputs.clear()
        self.outputs.clear()
        self.versions.clear()
        self.call_args.clear()
        for w in self.watched:
            w.clear()

    def moved(self) -> tuple[bool, bool]:
        """Whether an input / an output of these calls changed in place after its call (probing: the model's own
        input, and the copy of the output it continued on)."""
        if self.probe:
            return tuple(any(t._version != v for t, v in w) for w in self.watched)
        return (any(a._version != va for a, (va, _) in zip(self.inputs, self.versions)),
                any(o._version != vo for o, (_, vo) in zip(self.outputs, self.versions)))

    def batch_slice(self, b: int) -> None:
        """Keep the first ``b`` rows of every input and output (views): replica 0 of a repeated block."""
        self.inputs[:] = [t[:b] for t in self.inputs]
        self.outputs[:] = [t[:b] for t in self.outputs]


@dataclass
class Captured:
    """One capture forward: the model's ``out`` and, aligned with ``plans``, each plan's :class:`Calls`."""

    plans: list
    calls: list
    out: torch.Tensor | None = None

    @classmethod
    def empty(cls, plans: list, probe: bool = False) -> "Captured":
        return cls(list(plans), [Calls(probe=probe) for _ in plans])

    def outputs(self) -> list:
        """Every planned layer's call outputs, plan by plan (what the output gradients are taken for)."""
        return [o for c in self.calls for o in c.outputs]
