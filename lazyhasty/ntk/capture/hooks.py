"""The capture forward: one forward pass recording each planned layer's calls (:func:`capture_forward`).

Per plan, what its layer computed from, in ``plan.inputs`` / ``plan.outputs`` (one entry per call of the module
in the forward): a forward hook on the module (its input and output), or for a norm subclass with a forward of
its own a :class:`~.norm_calls.NormCallRecorder` entered and left by the module's hooks (its norm call's input
and output). Attention and recurrent modules whose maps are planned run unrolled (``sites``), and matmul sites
are recorded by a :class:`~.sites.SiteRecorder` mode around the forward.

In-place safe: each captured tensor's version counter is recorded; when the model changed a captured input or
output in place after the layer ran (``ReLU(inplace=True)``, ``out += identity``), that layer switches to copies
(``LayerPlan.copy_input`` / ``copy_output``, remembered per model structure by the caller's verdict) and the
forward runs again.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .norm_calls import NormCallRecorder
from .sites import InProjection, MatmulSite, RecurrentProjection, SiteRecorder, unrolled_attention, unrolled_recurrent

NO_NORM_CALL = ("its forward made no norm call (F.batch_norm, F.layer_norm, F.group_norm, F.rms_norm) on its own "
                "weight or bias")


def capture_forward(plans: list, b: int, forward: Callable, grad: bool, why: dict) -> torch.Tensor:
    """Run ``forward(reset)`` (the model on a block of ``b`` examples; ``reset()`` drops what was recorded, for a
    forward that restarts) with every plan's capture installed, and return its output.

    Args:
        plans: the :class:`~.plan.LayerPlan` s; each gains its calls' ``inputs``, ``outputs``, ``versions``
            (and ``call_args`` for norms at their call), and ``copy_input`` / ``copy_output`` where an in-place op
            moved a captured tensor.
        grad: whether the forward records the graph (False: sizes only).
        why: ``{plan name: reason}`` gains :data:`NO_NORM_CALL` for a norm at its call whose forward made none
            (its layer then goes to the fallback with that reason).
    """
    def hook_for(p):
        def hook(module, args, output):
            a = args[0].detach()
            p.inputs.append(a.clone() if p.copy_input else a)
            p.outputs.append(output)
            p.versions.append((a._version, output._version))
            if p.copy_output:
                return output.clone()  # the model continues on a copy; ``output`` stays as backward sees it
            return None
        return hook

    def reset():
        for p in plans:
            p.release()

    active: list = []  # norm-call recorders entered by a module's pre-hook, not yet left

    def enter_for(p):
        def pre_hook(module, args):
            rec = NormCallRecorder(p)
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

    def hooks(p):
        if p.at_call:  # captured at its norm call inside the forward (norm_calls)
            return [p.module.register_forward_pre_hook(enter_for(p)), p.module.register_forward_hook(leave_for(p))]
        return [p.module.register_forward_hook(hook_for(p))]

    for _ in range(2):
        reset()
        handles = [h for p in plans for h in hooks(p)]
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
        site_plans = [p for p in plans if isinstance(p.module, MatmulSite)]
        recording = SiteRecorder(site_plans, b).mode if site_plans else contextlib.nullcontext()
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
        for p in plans:
            for a, o, (va, vo) in zip(p.inputs, p.outputs, p.versions):
                if not p.copy_input and a._version != va:
                    p.copy_input = moved = True
                if not p.copy_output and o._version != vo:
                    p.copy_output = moved = True
        if not moved:
            break
    return out
