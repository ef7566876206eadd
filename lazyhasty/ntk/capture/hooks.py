"""The capture forward: one forward pass recording each planned layer's calls (:func:`capture_forward`).

Per plan, what its layer computed from, in a :class:`~.captured.Calls` of the :class:`~.captured.Captured` value
it returns (one entry per call of the module in the forward): a forward hook on the module (its input and output), or for a norm subclass with a forward of
its own a :class:`~.norm_calls.NormCallRecorder` entered and left by the module's hooks (its norm call's input
and output). Attention and recurrent modules whose maps are planned run unrolled (``sites``), and matmul sites
are recorded by a :class:`~.sites.SiteRecorder` mode around the forward.

In-place safe: each captured tensor's version counter is recorded; when the model changed a captured input or
output in place after the layer ran (``ReLU(inplace=True)``, ``out += identity``), that layer switches to copies
(``LayerPlan.copy_input`` / ``copy_output``, remembered per model structure by the caller's verdict) and the
forward runs again; a probing capture (the layer check's, on the twin) copies every captured tensor and finds the
same switches in one forward.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .captured import Captured
from .norm_calls import NormCallRecorder
from .sites import InProjection, MatmulSite, RecurrentProjection, SiteRecorder, unrolled_attention, unrolled_recurrent

NO_NORM_CALL = ("its forward made no norm call (F.batch_norm, F.layer_norm, F.group_norm, F.rms_norm) on its own "
                "weight or bias")


def capture_forward(plans: list, b: int, forward: Callable, grad: bool, why: dict, probe: bool = False) -> Captured:
    """Run ``forward(reset)`` (the model on a block of ``b`` examples; ``reset()`` drops what was recorded, for a
    forward that restarts) with every plan's capture installed.

    Args:
        plans: the :class:`~.plan.LayerPlan` s; ``copy_input`` / ``copy_output`` are set where an in-place op
            moved a captured tensor (the forward then runs again with copies).
        grad: whether the forward records the graph (False: sizes only).
        why: ``{plan name: reason}`` gains :data:`NO_NORM_CALL` for a norm at its call whose forward made none
            (its layer then goes to the fallback with that reason).
        probe: copy every captured input and output while finding which layers need copies
            (:class:`~.captured.Calls` ``probe``): one forward, never a second.

    Returns:
        A :class:`~.captured.Captured`: the forward's output and, per plan, its calls' inputs, outputs, version
        counters (and call arguments for norms at their call).
    """
    cap = Captured.empty(plans, probe)

    def hook_for(p, calls):
        def hook(module, args, output):
            calls.record(p, args[0], output)
            handed = calls.hand_on(p, output)  # a copy, or ``output`` itself
            return None if handed is output else handed
        return hook

    def reset():  # (in place: the hooks hold these records)
        for calls in cap.calls:
            calls.clear()

    active: list = []  # norm-call recorders entered by a module's pre-hook, not yet left

    def enter_for(p, calls):
        def pre_hook(module, args):
            rec = NormCallRecorder(p, calls)
            rec.__enter__()
            active.append(rec)
        return pre_hook

    def leave_for(p):
        def hook(module, args, output):
            rec = active.pop()
            rec.__exit__(None, None, None)
            if not rec.recorded:
                why[p.name] = NO_NORM_CALL
        return hook

    def hooks(p, calls):
        if p.at_call:  # captured at its norm call inside the forward (norm_calls)
            return [p.module.register_forward_pre_hook(enter_for(p, calls)),
                    p.module.register_forward_hook(leave_for(p))]
        return [p.module.register_forward_hook(hook_for(p, calls))]

    for _ in range(2):
        reset()
        handles = [h for p, calls in zip(plans, cap.calls) for h in hooks(p, calls)]
        # attention and recurrent modules whose maps are planned run unrolled (the maps become hooked calls)
        unrolled = []
        for p in plans:
            if isinstance(p.module, (InProjection, RecurrentProjection)):
                owner = p.module._owner()
                if owner in unrolled:
                    continue
                unrolled.append(owner)
                own = type(owner).forward.__get__(owner)
                owner.forward = (unrolled_attention(owner, p.module, own) if isinstance(p.module, InProjection)
                                 else unrolled_recurrent(owner, own))
        sites = [(p, calls) for p, calls in zip(plans, cap.calls) if isinstance(p.module, MatmulSite)]
        recording = SiteRecorder(sites, b).mode if sites else contextlib.nullcontext()
        try:
            with torch.set_grad_enabled(grad), recording:
                out = forward(reset)
        finally:
            while active:  # the forward raised inside a recorded module: leave its mode
                active.pop().__exit__(None, None, None)
            for h in handles:
                h.remove()
            for att in unrolled:
                del att.forward  # the class's forward again
        moved = False
        for p, calls in zip(plans, cap.calls):
            moved_in, moved_out = calls.moved()
            if moved_in and not p.copy_input:
                p.copy_input = moved = True
            if moved_out and not p.copy_output:
                p.copy_output = moved = True
        if not moved or probe:  # (probing, every captured tensor was a copy: this forward's records hold)
            break
    cap.out = out
    return cap
