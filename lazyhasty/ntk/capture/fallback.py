"""The exact fallback for parameters no layer plan covers: per-example copies and ``torch.func`` Jacobians.

* **Per-example copies** (:func:`copy_jacobian`): a parameter the model only broadcasts against the batch (a
  class token, a position embedding, a layer scale) is replaced by ``b`` copies of itself (:func:`per_example_leaves`),
  or stand-ins at the operations that broadcast it (``broadcast.BroadcastStandIns``); autograd's gradient of each
  copy is that example's gradient, from one forward and the block's output backward passes. Whether copies work is
  decided once per model structure (:func:`decide_copies`), against autograd on random example and output weights
  (:func:`copy_reference`, :func:`copy_agrees`).
* **torch.func** (:func:`torch_func_jacobian`): ``vmap(jacrev)`` for the named parameters only, checked against
  autograd once per structure and block shape (:func:`vmap_agrees`); where it cannot run or disagrees, the caller
  takes the exact per-example loop (``ntk.naive.jacobian_rows``).

Results are ``[b, k, numel]`` per parameter; :func:`joined_parts` makes features of them without one concatenated
``[b, k, P]`` copy. The functions take the model call and the output passes as arguments: their callers keep the
per-model records (``copies.PerExampleCopies``: ``caches.COPYABLE``, ``COPY_WHY``; ``featurize.Featurizer``:
``VMAP_CHECKED``).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import tuning
from ..._outputs import tensor_output
from ..._precision import exact_fp32
from .broadcast import BroadcastStandIns, standin_grads


def per_example_leaves(named: dict, names: list[str], b: int) -> dict:
    """``{name: leaf}``: ``b`` copies of each parameter, ``[1, ...] -> [b, ...]`` or ``[...] -> [b, ...]``."""
    subs = {}
    for n in names:
        p = named[n].detach()
        if p.shape[0] == 1:
            subs[n] = p.expand(b, *p.shape[1:]).clone().requires_grad_()
        else:
            subs[n] = p.unsqueeze(0).expand(b, *p.shape).clone().requires_grad_()
    return subs


@torch.enable_grad()
def copy_jacobian(call: Callable, named: dict, x: torch.Tensor, names: list[str], at_ops: set, passes: Callable,
                  ops: dict | None = None) -> list[torch.Tensor]:
    """``[b, k, numel]`` per parameter of ``names``: one forward with per-example copies (of the parameter, or for
    those in ``at_ops`` stand-ins at its operations), then the output passes.

    Args:
        call: ``call(x, subs, standins) -> [b, ...]`` the model's output with ``subs`` ``{name: tensor}`` in place
            of those parameters and ``standins`` active during the forward.
        named: the model's ``named_parameters()``.
        passes: ``passes(out, leaves, retain)``, each output's gradients at ``leaves`` in turn
            (``backward.output_gradient_passes``).
        ops: gains ``{name: operation names}`` of the stand-ins found.
    """
    b = x.shape[0]
    at_ops = set(at_ops) & set(names)
    subs = per_example_leaves(named, [n for n in names if n not in at_ops], b)
    mode = BroadcastStandIns(named, at_ops, b) if at_ops else None
    out = call(x, subs, mode).reshape(b, -1)
    k = out.shape[1]
    leaves = list(subs.values()) + ([s.leaf for s in mode.standins] if mode else [])
    cols: list = [[] for _ in leaves]
    if leaves:  # (none: no operation broadcast a candidate)
        for gs in passes(out, leaves, True):
            for c, g in zip(cols, gs):
                c.append(g)
    got = {n: torch.stack([g.reshape(b, -1) for g in c], 1) for n, c in zip(subs, cols)}
    if mode is not None:
        got.update(standin_grads(mode.standins, [torch.stack(c, 1) for c in cols[len(subs):]], named))
        if ops is not None:
            ops.update(mode.ops())
    return [got[n] if n in got else out.new_zeros(b, k, named[n].numel()) for n in names]


@torch.enable_grad()
def copy_reference(out: torch.Tensor, named: dict, names: list) -> dict:
    """``{name: (w, v, autograd's gradient of sum_i w_i v . f(x_i))}`` for the per-example-copy check, from the
    model's own output ``out`` ``[b, k]`` (one backward for all ``names``; ``w`` ``[b]``, ``v`` ``[k]`` random)."""
    b, k = out.shape
    gen = torch.Generator(device="cpu").manual_seed(4321)
    w = torch.randn(b, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    v = torch.randn(k, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    gs = torch.autograd.grad((out * w[:, None] * v[None, :]).sum(), [named[n] for n in names], allow_unused=True)
    return {n: (w, v, g) for n, g in zip(names, gs) if g is not None}


def copy_agrees(J: torch.Tensor, ref) -> bool:
    """Whether per-example gradients ``J`` ``[b, k, numel]`` from copies agree with the check's reference ``ref``
    (``(w, v, theirs)`` of :func:`copy_reference`; None: the parameter is unused): ``sum_i w_i v . J_i``
    against autograd's gradient of ``sum_i w_i v . f(x_i)``."""
    if ref is None:
        return False
    w, v, theirs = ref
    if J.shape[:2] != (w.shape[0], v.shape[0]):
        return False  # with copies the model computed something of another shape (copies mixed)
    mine = torch.einsum("i,a,iap->p", w, v, J)
    if not bool(mine.any()):
        return False  # the substituted copies were not what the model read (e.g. nn.LSTM)
    theirs = theirs.reshape(-1)
    # relative to the gradient's size (no absolute floor: a small gradient must still match). float64: 1e-6, not
    # tighter: a float64 model may run some ops in float32 (T5's norms compute their variance in float32), whose
    # rounding of the weighted backward differs from the per-output passes' by ~1e-8 (measured, T5 encoder norm
    # weights behind later blocks); an op mixing examples is an O(1) error
    rtol = 1e-4 if theirs.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-6
    return float((mine - theirs).norm()) <= rtol * float(theirs.norm())


def decide_copies(todo: list, decided: dict, why: dict, probe: torch.Tensor, named: dict, jacobian: Callable,
                  reference: Callable) -> None:
    """Whether per-example copies work for each fallback parameter of ``todo``, into ``decided[name]``: a tuple of
    operation names for stand-ins at the operations that broadcast it (``broadcast``), True for copies of the
    parameter itself (tried for the rest), False when neither passes the check (``why[name]`` says why).

    Each way runs one forward for all the parameters it tries (one at a time only where copies of several break the
    forward together), and the check's reference gradient is one backward for all: a first call on timm's
    efficientnet ran 42 forwards and backwards here before.

    Args:
        probe: the few examples the check runs on ``[b, ...]``.
        named: the checked model's ``named_parameters()``.
        jacobian: ``jacobian(x, names, at_ops, ops) -> [[b, k, numel], ...]`` (:func:`copy_jacobian` on the
            checked model).
        reference: ``reference(x, names) -> {name: (w, v, grad)}`` (:func:`copy_reference` on it).
    """
    cap = tuning.current().copy_max_elements
    for n in todo:
        decided[n] = False
        why[n] = (f"not a planned layer's parameter, and its per-example copies would take more than "
                  f"{cap} elements (limits copy_max_elements)")
    eligible = [n for n in todo if named[n].numel() * probe.shape[0] <= cap]
    if not eligible:
        return
    ref = reference(probe, eligible)
    ops: dict = {}
    try:
        Js = jacobian(probe, eligible, eligible, ops)
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as exc:  # (torch asserts shapes)
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            raise
        # a stand-in broke the forward: said in explain() (not a silent fallback)
        broke = f"per-example stand-ins at its operations broke the forward ({type(exc).__name__}: {exc})"
        why.update({n: broke for n in eligible})
        Js = None
    if Js is not None:
        for n, J in zip(eligible, Js):
            if ops.get(n) and copy_agrees(J, ref.get(n)):
                decided[n] = tuple(ops[n])
            elif ops.get(n):
                why[n] = (f"its per-example stand-ins at {', '.join(ops[n])} differ from autograd's (it is also "
                          "used another way, or an operation after them mixes examples)")
            else:
                why[n] = ("no elementwise operation broadcasts it against the batch (it enters a product, a "
                          "concatenation or another operation with the examples), and copies of it do not "
                          "give its per-example gradients")
    rest = [n for n in eligible if not decided[n] and named[n].dim() > 0]
    groups = [rest] if len(rest) > 1 else [[n] for n in rest]
    while groups:
        group = groups.pop(0)
        try:
            Js = jacobian(probe, group, (), None)
        except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as exc:
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            if len(group) > 1:  # one of them broke the forward: each on its own
                groups.extend([n] for n in group)
            continue  # the copies changed the output's shape or broke the forward: not this way
        for n, J in zip(group, Js):
            decided[n] = copy_agrees(J, ref.get(n))
    for n in eligible:
        if decided[n]:
            why.pop(n, None)


def torch_func_jacobian(model: nn.Module, x: torch.Tensor, names: list[str], key: tuple, seen: dict,
                        split: bool = False):
    """Per-example Jacobians ``[b, k, P]`` of the parameters ``names`` by ``torch.func.vmap(jacrev)`` (with
    ``split``, as :func:`joined_parts`); None where vmap cannot run or disagrees with autograd
    (:func:`vmap_agrees`, checked once per ``key`` in ``seen``): the caller then takes the exact loop.

    A block shape not yet checked runs in exact fp32 (in a ``tf32=True`` call too)."""
    from torch.func import functional_call, jacrev, vmap

    named = dict(model.named_parameters())
    b = x.shape[0]
    sub = {n: named[n].detach() for n in names}

    def f(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).reshape(-1)

    try:
        with torch.enable_grad(), exact_fp32(key not in seen):
            J = vmap(jacrev(f), in_dims=(None, 0))(sub, x)
            parts = [J[n].reshape(b, J[n].shape[1], -1) for n in names]
            if vmap_agrees(model, x, names, parts, key, seen):
                return joined_parts(parts) if split else (
                    torch.cat(parts, -1) if len(parts) > 1 else parts[0])  # (one parameter: a view)
    except (RuntimeError, NotImplementedError):
        pass
    return None


def vmap_agrees(model: nn.Module, x: torch.Tensor, names: list[str], parts: list, key: tuple, seen: dict) -> bool:
    """Whether torch.func's per-example Jacobians (``parts``, ``[b, k, P_i]`` per parameter) agree with autograd on
    one random combination ``sum_i w_i v_i . f(x_i)`` of examples and outputs (one forward and backward of the
    block); once per ``key`` (model structure, block shape and dtype: batching-rule bugs depend on the sizes),
    remembered in ``seen``."""
    if key in seen:
        return seen[key]
    named = dict(model.named_parameters())
    gen = torch.Generator(device="cpu").manual_seed(4321)
    J0 = parts[0]
    wv = torch.randn(J0.shape[:2], generator=gen, dtype=torch.float64).to(J0.device, J0.dtype)  # [b, k]
    with torch.enable_grad():
        out = tensor_output(model(x)).reshape(x.shape[0], -1)
        theirs = torch.autograd.grad((out * wv).sum(), [named[n] for n in names], allow_unused=True)
    theirs = torch.cat([(torch.zeros_like(named[n]) if g is None else g).reshape(-1) for n, g in zip(names, theirs)])
    mine = torch.cat([torch.einsum("bk,bkp->p", wv, J.detach()) for J in parts])
    theirs = theirs.detach()
    tol = 1e-4 if J0.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
    ok = float((mine - theirs).norm()) <= tol * float(theirs.norm()) + 1e-30
    if len(seen) > 64:  # a bounded record (block shapes vary little within a run)
        seen.clear()
    seen[key] = ok
    return ok


def joined_parts(parts: list) -> list:
    """Per-parameter Jacobian parts ``[b, k, P_i]`` as features: each of at least ``limits``
    ``product_slice_elements`` columns as it is (a view), the smaller ones joined into parts of about that size
    (one GEMM for many biases, not one each)."""
    least = max(1, tuning.current().product_slice_elements)
    out, small, size = [], [], 0
    for J in parts:
        if J.shape[2] >= least:
            out.append(J)
            continue
        small.append(J)
        size += J.shape[2]
        if size >= least:
            out.append(torch.cat(small, -1) if len(small) > 1 else small[0])
            small, size = [], 0
    if small:
        out.append(torch.cat(small, -1) if len(small) > 1 else small[0])
    return out
