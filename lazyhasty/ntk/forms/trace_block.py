"""The trace kernel of one block, one output at a time.

``K_trace = sum_a K_a`` where ``K_a`` is the NTK of the scalar output ``f_a``, so the block needs only
one output's gradients at a time: after the forward, output ``a``'s backward pass gives every layer's
output gradient ``g_a``, which is reduced into the kernel at once and dropped. Only ghost layers (few
positions) keep every output's gradients; the tile path holds them for every layer.

* materialized layers: ``F_a = sum_s g_a[s] a[s]^T`` per example (one batched GEMM on position-major
  layouts), then ``K += F_a F_a^T`` on row blocks ``i <= j`` only (mirrored at the end);
* ghost layers: every output's gradients are gathered into the tile path's ghost (``forms.ghost``, made by
  ``gathering``; linear in b); at the end ``K[i, j] += sum_{s,t} A[is, jt] G[is, jt]`` with ``A = a a^T`` and
  ``G = sum_a g_a g_a^T`` (one GEMM of inner dimension ``k d_out``), again on row blocks ``i <= j``, in
  bounded chunks (``Ghost.trace_upper_into``).

Both layouts are position-major (``[b, S, G, d]``), which is the memory layout of a channels-last
activation: the conv gradients and patches need no transposes.

The kernel is a sum of ``k`` outputs x layers terms, each one GEMM added into ``K``: summed in float32 in one
``[b, b]`` its rounding grows with the number of terms (hf-vit at n = 64: 1.2e-6 relative error against
float64, 9x torch.func's one GEMM). :class:`TraceSum` adds them in float32 a few at a time
(``FLUSH_TERMS``) into a float64 total (float32 for 16-bit models), which brings it to the tile path's error.
"""
from __future__ import annotations

import torch

from .. import tuning
from ..capture import caches

from ..capture.check import PlanChanged, check_floor, check_scale, check_weights, grads_close, weighted_layer_grads
from ..capture.rules import rule_for


def row_blocks(b: int) -> list[tuple[int, int]]:
    """Row blocks of a symmetric ``[b, b]`` product: ~4 of them (rows i0:i1 against columns i0:)."""
    r = max(tuning.current().row_block_min, -(-b // 4))
    return [(i, min(i + r, b)) for i in range(0, b, r)]


# terms added in the working precision before they go into the wider total: each flush reads and clears the
# [b, b] block once, against a GEMM of b^2 P / 2 flops per term (P the layer's parameters)
FLUSH_TERMS = 4


class TraceSum:
    """``K`` ``[b, b]`` as a sum of many terms: the terms go into :attr:`part` (the model's dtype), which
    :meth:`added` moves into a wider :attr:`total` every ``FLUSH_TERMS`` terms (float64 for a float32 model,
    float32 for a 16-bit one; float64 models add into ``total`` directly).

    Example:
        >>> acc = TraceSum(3, torch.float32, torch.device("cpu"))
        >>> for F in [torch.ones(3, 2)] * 9:
        ...     _ = acc.part.addmm_(F, F.T)
        ...     acc.added()
        >>> acc.result()[0, 0].item()
        18.0
    """

    def __init__(self, b: int, dtype: torch.dtype, device: torch.device):
        self.dtype = dtype
        wide = {torch.float32: torch.float64, torch.float16: torch.float32, torch.bfloat16: torch.float32}.get(dtype)
        self.part = torch.zeros(b, b, dtype=dtype, device=device)
        self.total = None if wide is None else torch.zeros(b, b, dtype=wide, device=device)
        self.pending = 0

    def added(self, terms: int = 1) -> None:
        """``terms`` more were added into :attr:`part`; every ``FLUSH_TERMS`` they move into :attr:`total`."""
        self.pending += terms
        if self.total is not None and self.pending >= FLUSH_TERMS:
            self.flush()

    def flush(self) -> None:
        """Move :attr:`part` into :attr:`total` now (after terms added without :meth:`added`, e.g. a ghost's)."""
        if self.total is not None:
            self.total.add_(self.part)
            self.part.zero_()
        self.pending = 0

    def result(self) -> torch.Tensor:
        """The sum, in the model's dtype."""
        self.flush()
        return self.part if self.total is None else self.total.to(self.dtype)


def _sym_gram_(K: torch.Tensor, F: torch.Tensor) -> None:
    """``K[i, j] += F_i . F_j`` for the row blocks' columns ``j >= i0`` (float32 GEMMs of one output)."""
    b = F.shape[0]
    for i0, i1 in row_blocks(b):
        K[i0:i1, i0:].addmm_(F[i0:i1], F[i0:].T)


def _mirror(K: torch.Tensor) -> torch.Tensor:
    """Upper block triangle (diagonal blocks full) to the symmetric matrix."""
    out = torch.triu(K)
    return out.add_(torch.triu(K, 1).T)


def trace_block_limit(fz, x: torch.Tensor, budget: int | None = None) -> int:
    """Most examples :func:`trace_gram` takes in one block of the Featurizer ``fz`` within ``budget`` bytes (default
    :class:`~lazyhasty.ntk.tuning.Limits` ``trace_block_bytes`` on CPU, half the free memory on CUDA), from what
    one example of ``x`` needs (:func:`trace_elements_per_example`; remembered per model structure, example shape,
    device and plan in ``caches.TRACE_SIZES``) and the ``[b, b]`` kernels."""
    key = (fz.fingerprint("trace-size"), tuple(x.shape[1:]), x.dtype, str(fz.device),
           tuple((p.name, p.form) for p in fz.plans), tuple(fz.generic))
    known = caches.TRACE_SIZES.get(fz._user_model)
    per = known[1] if known is not None and known[0] == key else trace_elements_per_example(fz, x)
    caches.TRACE_SIZES[fz._user_model] = (key, per)
    if budget is None:
        budget = (tuning.cuda_free_bytes(fz.device) // 2 if fz.device.type == "cuda"
                  else tuning.current().trace_block_bytes)
    # b examples need about b * per + 6 b^2 elements (the [b, b] kernels: accumulators, mirror, and
    # both models' kernels in an alignment)
    elems = budget / (torch.finfo(fz.dtype).bits // 8)
    return int(max(1, (-per + (per * per + 24 * elems) ** 0.5) / 12))


def trace_elements_per_example(fz, x: torch.Tensor) -> int:
    """Elements one example of ``x`` takes in :func:`trace_gram` (one capture forward of it, without grad): per
    layer call its output's gradients (3x: the output, its gradient, the row blocks' share) and what its rule
    keeps (``Rule.trace_elements``: inputs as patches, every output's gradients of ghost layers), one output's
    per-example gradients of the widest materialized layer, and the fallback's per-example Jacobian ``[k, P]``."""
    x1 = fz._prepare(x[:1], check=False)
    with torch.no_grad():
        cap = fz.capture(x1, grad=False)
    k = cap.out.numel()
    per, widest = 0, 0
    for p, c in zip(cap.plans, cap.calls):
        rule = rule_for(p)
        for xi, o in zip(c.inputs, c.outputs):
            kept, transient = rule.trace_elements(p, xi, o, k, fz.pairs_per_example)
            per += 3 * o.numel() + kept
            widest = max(widest, transient)
    per += widest
    if fz.generic:  # per-example Jacobians [k, P] of the fallback parameters
        named = dict(fz.model.named_parameters())
        per += k * sum(named[n].numel() for n in fz.generic)
    return per


def trace_gram(fz, x: torch.Tensor, backend: str = "torch") -> torch.Tensor | None:
    """``[b, b]`` trace kernel of the block ``x``; raises ``PlanChanged`` when the layer check changed the plan
    (the Featurizer computes the block again)."""
    fz.resolve_auto()
    if fz.plans and not fz.verified:
        # the layer check first, on a perturbed copy of the model and a few examples, by the tile path
        # (which sends a layer whose captured tensors do not fit its factors to the fallback, one layer at a
        # time); remembered per model structure
        fz.verify_on_twin(x)
        if not fz.plans:
            raise PlanChanged  # auto took the whole-model Jacobian
    # still unverified: every gradient was zero there (a zero-initialised head), the check decided nothing
    vacuous = bool(fz.plans) and not fz.verified
    plans = fz.plans
    b = x.shape[0]
    cap = fz.capture(x) if plans else None
    upper = TraceSum(b, fz.dtype, x.device)  # upper row blocks (torch path)
    dense = TraceSum(b, fz.dtype, x.device)  # full products (Triton, fallback parameters)
    if plans:
        bad = _layer_terms(fz, cap, upper, dense, backend)
        del cap
        if bad:
            fz.exclude(bad)
            raise PlanChanged
    if fz.generic:
        J = fz.fallback_jacobian(x)  # [b, k, P]
        fz.k = J.shape[1]
        for a in range(J.shape[1]):
            dense.part.addmm_(J[:, a], J[:, a].T)
            dense.added()
    if not fz.verified and not vacuous:
        fz.mark_verified()
    # GEMM products J Jᵀ are symmetric only to rounding: (D + Dᵀ) / 2 is symmetric exactly (a + b = b + a)
    D = dense.result()
    D = D.add(D.T).mul_(0.5)
    return _mirror(upper.result()).add_(D)


def _layer_terms(fz, cap, upper: TraceSum, dense: TraceSum, backend) -> list:
    """Every planned layer's terms of the block's trace kernel into ``upper`` (its row blocks) or ``dense``
    (Triton's full products); the layers that fail the layer check (an unverified plan), else ``[]``."""
    K = upper.part
    plans = cap.plans
    b = cap.out.shape[0]
    out = cap.out.reshape(b, -1)
    k = fz.k = out.shape[1]
    outs = cap.outputs()
    if any(not o.requires_grad for o in outs):
        return [p for p, c in zip(plans, cap.calls) if any(not o.requires_grad for o in c.outputs)]
    misfits = fz.layout_misfits(cap, b) if not fz.verified else []
    if misfits:  # (checked here too when the check runs on the model itself: no twin, or an undecided one)
        return misfits
    # per layer, by its kind's rule: what every output reuses (position-major inputs, embedding indices,
    # normalized inputs; a gathering ghost), its form chosen
    rules = [rule_for(p) for p in plans]
    pairs = fz.pairs_per_example or (b + 1) / 2
    state = [rule.trace_state(p, c, k, pairs, K) for rule, p, c in zip(rules, plans, cap.calls)]
    per_call = [len(c.outputs) for c in cap.calls]

    def gram(F: torch.Tensor) -> None:  # K += F F^T for one output's materialized [b, P] gradients
        _gram(F, K, dense.part, backend)
        (dense if backend == "triton" else upper).added()
    verify = not fz.verified
    if verify:
        # the tile path's check (Featurizer._layer_features): the same weights, the same reference gradients
        w, v = check_weights(b, k)
        w, v = w.to(out.device, out.dtype), v.tolist()
        mine = [None] * len(plans)
    leaves = list(fz.capture_copies.values()) if fz.capture_copies else []  # per-example copies: their gradients too
    copy_grads: list = [[] for _ in leaves]
    # one batched backward for small blocks, else one pass per output (each reduced before the next)
    for a_out, gs in enumerate(fz.output_gradient_passes(out, outs + leaves, retain=verify)):
        for c, g in zip(copy_grads, gs[len(outs):]):
            c.append(g)
        gs = gs[:len(outs)]
        pos = 0
        for i, (p, st) in enumerate(zip(plans, state)):
            g_calls = gs[pos: pos + per_call[i]]
            pos += per_call[i]
            contrib = rules[i].trace_output(p, st, g_calls, gram, fz.workspace, a_out, w if verify else None)
            if verify:
                mine[i] = contrib * v[a_out] if mine[i] is None else mine[i].add_(contrib, alpha=v[a_out])
        del gs
    if leaves:
        fz.keep_copy_grads(copy_grads)  # the generic part's Jacobian takes them (trace_gram)
    for st in state:
        if st.get("ghost") is not None:
            st["ghost"].trace_upper_into(K, row_blocks(b))
            upper.flush()  # (one ghost layer's groups and chunks: one term per entry of K)
    if not verify:
        return []
    vt = torch.tensor(v, dtype=out.dtype, device=out.device)
    per_plan = weighted_layer_grads(out, w[:, None] * vt[None, :], plans)
    largest = check_scale([t for ts in per_plan for t in ts])

    bad = []
    for p, rule, st, m, ref in zip(plans, rules, state, mine, per_plan):
        got = rule.trace_check(p, st, m, w)
        floor = check_floor(ref, largest)
        if not all(grads_close(u, w, floor) for u, w in zip(got, rule.check_reference(ref))):
            bad.append(p)
    return bad


def _gram(F: torch.Tensor, K: torch.Tensor, dense: torch.Tensor, backend: str) -> None:
    if backend == "triton":
        from ... import _backend
        from .triton_kernels import gram

        dense += gram(F.contiguous(), F.contiguous(), True, _backend.triton_interpreted()).to(dense.dtype)
    else:
        _sym_gram_(K, F)
