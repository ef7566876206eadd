"""Capture and verification: one model's per-block NTK features (:class:`Featurizer`).

A :class:`Featurizer` turns a block of examples ``[b, ...]`` into feature objects (``forms``): per
planned layer, its captured inputs and output gradients in ghost or materialized form; for the other
trainable parameters, per-example copies or ``torch.func`` Jacobians. It runs the capture rules of
``capture/`` (plan, sites, layouts, maps, the layer check on a perturbed twin of the model, once per structure:
``verify_on_twin``) and records their decisions in ``capture.caches``. Tiling and sinks live in ``walk``, paths
in ``paths``, the entry points in ``api``; the one-block trace kernel, on the same capture and check, in
``forms.trace_block``.
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from .._loaders import model_device
from .._precision import exact_fp32
from . import forms as feat
from .._outputs import tensor_output
from .capture.check import (
    CHECK_EXAMPLES, CheckRounds, PlanChanged, check_floor, check_scale, check_weights, grads_close, model_bytes,
    perturbed_twin, weighted_layer_grads,
)
from .capture.cost import layerwise_or_jacobian
from .capture.backward import (
    begin_measurement, note_backward_time, output_gradient_passes, replicated_output_gradients, replication_turn,
)
from .capture.copies import PerExampleCopies
from .capture.fallback import joined_parts, torch_func_jacobian
from .capture.layouts import layout_mismatch
from .capture.hooks import capture_forward
from .capture.rules import TileContext, rule_for
from .capture.mixing import check_block_mixing, check_per_example, outputs_agree
from .capture.plan import trainable_params
from .capture.planning import CHECK_FAILED, Planning
from .capture.sites import (
    InProjection, RecurrentProjection, discover_sites,
)
from .forms.trace_block import trace_block_limit, trace_gram as _trace_gram
from . import tuning
from .capture import caches
from .capture.broadcast import BroadcastStandIns





class Featurizer:
    """Per-block NTK features of one model (layerwise factors, or torch.func Jacobians)."""

    def __init__(self, model: nn.Module, implementation: str, kernel: str, dtype: torch.dtype | None):
        check_per_example(model)
        trainable_params(model)
        pdtype = next(p.dtype for p in model.parameters())
        self._user_model = model
        if dtype is not None and dtype != pdtype:
            model = copy.deepcopy(model).to(dtype)
        self.model = model
        self.dtype = dtype or pdtype
        self.device = model_device(model)
        self.kernel = kernel
        self.implementation = "layerwise" if implementation == "auto" else implementation
        self.auto = implementation == "auto"
        self.auto_reason = ""
        self._auto_pending = False
        self._pairs_per_example = 0.0
        self.verified = False
        self.is_twin = False  # the perturbed copy verify_on_twin checks (it checks itself in place)
        # the per-example copies of fallback parameters: decisions, the copies on a capture, their gradients (its
        # owner is set to the checked model on a twin: it decides for that model)
        self.copies = PerExampleCopies(self._user_model, self._call, self.output_gradient_passes)
        self._vmap_failed = False  # torch.func could not run or disagreed: the exact loop from now on
        known = caches.VERIFIED.get(self._user_model, {}).get(self.implementation)
        if known is None or known.key != self.fingerprint(self.implementation):
            self.planning = Planning(model, self.implementation)  # the layer plan, as the check moves it
        else:
            # this model's structure was checked before: the same layers go to the fallback (the verdict's plan
            # copied; a dtype copy has its own modules and plans by name)
            self.planning = Planning.from_verdict(model, self.implementation, known, model is self._user_model)
            self.verified = True
            self._auto_pending = self.auto  # decided once the call's pairs per example are known
        self.k: int | None = None
        self.by_layer = False  # split the fallback's Jacobian per owning module (ntk_gram(by_layer=True))
        self.checked_mixing: set[int] = set()  # block sizes this call checked for batch mixing
        # mkldnn/cudnn convolutions (and their backward passes) are faster on channels-last inputs
        self.channels_last = any(isinstance(m, nn.Conv2d) for m in model.modules())
        self.backward_used: str | None = None  # how the last block's output gradients were formed (explain())
        self._twin_tried = False  # the twin's check left this call undecided: the model's own blocks decide
        # (k, captured bytes per example) of the block the layer check captured (a twin's own, or taken over from
        # the twin): the size of a first block before it is captured (_replicas)
        self._twin_capture: tuple[int, float] | None = None
        self.rounds = CheckRounds()  # what the layer check's rounds found (layers right, their dims)

    # -- public ------------------------------------------------------------------------------------
    @property
    def plans(self) -> list:
        """The planned layers (``planning.plans``)."""
        return self.planning.plans

    @property
    def generic(self) -> list:
        """Names of the parameters on the exact fallback (``planning.generic``)."""
        return self.planning.generic

    @property
    def fallback_reasons(self) -> dict:
        """``{parameter name: why it is on the fallback}`` (``planning.reasons``; ``explain()`` shows them)."""
        return self.planning.reasons

    def fingerprint(self, tag: str, model: nn.Module | None = None) -> tuple:
        """``(tag, structure)`` of ``model`` (default: the user's model) for the per-model caches: modules and
        parameters by name, object, type, shape, dtype, device and requires_grad. Walked once per Featurizer
        (a call's structure does not change while it runs)."""
        model = self._user_model if model is None else model
        cache = self.__dict__.setdefault("_structures", {})
        if id(model) not in cache:
            cache[id(model)] = (model, _fingerprint(model, "")[1:])  # (the model kept: its id stays unique)
        return (tag,) + cache[id(model)][1]

    @property
    def pairs_per_example(self) -> float:
        """Example pairs each example's features meet (about (n + 1) / 2 for a Gram of n; see
        :meth:`plan_for_pairs`): amortizes forming per-example gradients in the ghost / materialized choice and in
        ``auto``'s."""
        return self._pairs_per_example

    def plan_for_pairs(self, pairs: float) -> None:
        """Set the example pairs each example's features meet in this call, and with it the plan: on a model
        whose layer check is remembered, ``implementation="auto"`` decides here between layerwise and the
        whole-model Jacobian (which replaces the layer plans).

        Args:
            pairs: about ``(n + 1) / 2`` for a Gram of n examples, ``n2`` for a cross kernel against n2.
        """
        self._pairs_per_example = float(pairs)
        self.resolve_auto()

    def resolve_auto(self) -> None:
        """``implementation="auto"`` on a model whose layer check was remembered: decide layerwise or the
        whole-model Jacobian now (with this call's pairs per example), before the plan is used."""
        if self._auto_pending:
            self._auto_pending = False
            self._auto_choice()

    def __call__(self, x: torch.Tensor) -> list:
        x = self._prepare(x)
        return self._settled(lambda: self._features(x))

    def _settled(self, attempt, reset=None):
        """``attempt()``'s value, computed again while it raises :class:`PlanChanged` (``reset()`` first, if
        given). Each change moves a layer one step towards the fallback (planned -> affine map -> fallback) or
        switches ``auto`` once, so the rounds are bounded; past the bound the plan is not settling: a bug."""
        bound, rounds = None, 0
        while bound is None or rounds < bound:
            rounds += 1
            try:
                with self._checking():
                    return attempt()
            except PlanChanged:
                if bound is None:  # (counted only when the plan changed: a settled call does not traverse)
                    bound = 2 * (sum(1 for _ in self.model.modules()) + sum(1 for _ in self.model.parameters())) + 8
                if reset is not None:
                    reset()
        raise RuntimeError(f"lazyhasty: the layer plan of {type(self.model).__name__} changed {bound} times "
                           "without settling (a bug: please report it with lazyhasty.ntk.explain's output)")

    def _checking(self):
        """Exact fp32 while the layer check of this model structure is still to run (in a ``tf32=True`` call
        the check compares against autograd in fp32, so TF32 rounding cannot send a layer to the fallback);
        the call's own precision (:func:`lazyhasty._precision.product_precision`) after it."""
        return exact_fp32(not self.verified)

    def trace_block_limit(self, x: torch.Tensor, budget: int | None = None) -> int:
        """Most examples :meth:`trace_gram` takes in one block within ``budget`` bytes
        (:func:`~.forms.trace_block.trace_block_limit`)."""
        return trace_block_limit(self, x, budget)

    def output_size(self, x: torch.Tensor) -> int:
        """``k``: the number of outputs of the model on one example of ``x``, from a forward without grad;
        remembered per model structure and state, example shape, dtypes and device (``caches.OUTPUT_SIZES``):
        on a small model that forward was ~8% of a later call (timm mobilenetv3, n = 4)."""
        key = (self.fingerprint("output-size"), tuple(x.shape[1:]), x.dtype, self.dtype, str(self.device))
        known = caches.OUTPUT_SIZES.get(self._user_model)
        if known is not None and known[0] == key:
            return known[1]
        with torch.no_grad():
            k = int(self._call(self._prepare(x[:1], check=False)).reshape(1, -1).shape[1])
        caches.OUTPUT_SIZES[self._user_model] = (key, k)
        return k

    def trace_gram(self, x: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        """``[b, b]`` trace kernel of one block, one output's backward pass at a time (see ``forms.trace_block``)."""
        x = self._prepare(x)
        return self._settled(lambda: _trace_gram(self, x, backend))

    def stream(self, x: torch.Tensor, sink, reset) -> None:
        """Hand each feature of the block to ``sink`` as soon as it exists, then drop it.

        Materialized per-example gradients are written into one reused buffer, so a block whose tile is
        reduced at once (a single-block Gram) never holds every layer's ``[b, k, P]`` at the same time.
        ``reset()`` is called before a block is recomputed (a layer moved to the fallback).
        """
        x = self._prepare(x)
        self._settled(lambda: self._features(x, sink), reset)

    def _prepare(self, x: torch.Tensor, check: bool = True) -> torch.Tensor:
        x = x.to(self.device)
        if x.is_floating_point():
            x = x.to(self.dtype)
        if check and x.shape[0] not in self.checked_mixing:
            self._check_batch_independence(x)
        return x

    @property
    def capture_copies(self) -> dict | None:
        """``{name: [b, ...] leaf}``: the per-example copies standing in for fallback parameters in the capture
        forward that just ran, then ``{("op", i): leaf}`` for the stand-ins at operations
        (:mod:`.capture.broadcast`), in that order (None when there are none); their gradients go to
        :meth:`keep_copy_grads`."""
        return self.copies.riding()

    def workspace(self, numel: int) -> torch.Tensor:
        """A reused buffer of ``numel`` elements (per-example gradients of one layer at a time)."""
        buf = getattr(self, "_buf", None)
        if buf is None or buf.numel() < numel:
            buf = self._buf = torch.empty(numel, dtype=self.dtype, device=self.device)
        return buf[:numel]

    def describe(self) -> dict:
        return {"layers": {p.name: f"{p.kind}/{p.form}" for p in self.plans}, "generic": list(self.generic),
                "copies": {p.name: [w for w, on in (("input", p.copy_input), ("output", p.copy_output)) if on]
                           for p in self.plans if p.copy_input or p.copy_output}}

    # -- internals ---------------------------------------------------------------------------------
    def _check_batch_independence(self, x: torch.Tensor) -> None:
        """The batch-mixing check of the block ``x`` (:func:`~.capture.mixing.check_block_mixing`), once per
        block size in this call."""
        self.checked_mixing.add(x.shape[0])
        check_block_mixing(self._user_model, self.model, self._call, x, self.fingerprint("mixing"))

    def _features(self, x: torch.Tensor, sink=None):
        self._block = x  # the examples the per-example-copy check may use (per_example_copies)
        self.resolve_auto()
        feats: list = []
        if (self.plans or self.generic) and not self.verified and not self.is_twin and not self._twin_tried \
                and self.verify_on_twin(x):
            raise PlanChanged  # layers moved, or auto took the whole-model Jacobian
        if not self.plans and not self.verified:
            self.mark_verified()  # every layer is on the fallback: remember it, do not check again
        if self.plans:
            feats.extend(self._layer_features(x, sink))
        if self.generic and self.is_twin:
            # the twin checks layers, not the fallback's Jacobians (those are checked on the model's own blocks):
            # only the per-example-copy decisions, which it makes for its model (a first call on timm's
            # efficientnet formed the twin's copy Jacobians twice)
            self.per_example_copies(x)
        elif self.generic and not self.by_layer:
            # the fallback's Jacobian as the per-parameter parts torch.func returns (views; small ones joined):
            # no [b, k, P] concatenation of a whole model's Jacobian, and each product spans one part
            parts = self.fallback_jacobian(x, split=True)
            self.k = parts[0].shape[1]
            for J in parts:
                f = feat.Materialized(J)
                f.name = "generic"
                if sink is not None:
                    sink(f)
                else:
                    feats.append(f)
        elif self.generic:
            J = self.fallback_jacobian(x)
            self.k = J.shape[1]
            if self.by_layer:  # one feature per owning module (the kernel's per-layer parts)
                named = dict(self.model.named_parameters())
                parts, start = {}, 0
                for n in self.generic:
                    size = named[n].numel()
                    parts.setdefault(owner_key(n), []).append((start, start + size))
                    start += size
                gen = []
                for owner, spans in parts.items():
                    f = feat.Materialized(torch.cat([J[:, :, a:b] for a, b in spans], -1))
                    f.name = owner
                    gen.append(f)
            else:
                gen = [feat.Materialized(J)]
                gen[0].name = "generic"
            for f in gen:
                if sink is not None:
                    sink(f)
                else:
                    feats.append(f)
        # one GEMM per layer (no concatenated copy of all per-example gradients)
        return feats

    def _layer_features(self, x: torch.Tensor, sink=None):
        plans = self.plans
        reps, check = self._replicas(x)
        started = time.perf_counter()
        cap = None
        if reps:  # every output's gradients from one backward of the block repeated k times
            try:
                cap, replicated = self._replicated_capture(x, reps, check)
            except (ValueError, RuntimeError, TypeError, IndexError):
                # the model cannot take the replicated block, or its outputs there differ from the block's own
                # (the check turn: it mixes examples in large batches): the batched backward from now on, and
                # this block captured again that way
                caches.REPLICATED[self._user_model][self._replication_key(x)]["never"] = True
                reps = 0
                started = time.perf_counter()
        if cap is None:
            cap = self.capture(x)
        b = x.shape[0]
        out = cap.out.reshape(b, -1)
        k = self.k = out.shape[1]
        idle = [p for p, c in zip(plans, cap.calls) if not c.outputs]
        if idle:
            # planned modules whose forward never ran (e.g. nn.MultiheadAttention reads out_proj.weight
            # itself): their parameters are used some other way, so they go to the fallback
            self.exclude(idle, "its forward never ran: the model uses its parameters another way")
            raise PlanChanged
        outs = cap.outputs()
        if any(not o.requires_grad for o in outs):
            # a layer whose output does not need grad here (e.g. under a no-grad branch): fallback
            bad = [p for p, c in zip(plans, cap.calls) if any(not o.requires_grad for o in c.outputs)]
            self.exclude(bad, "its output did not require grad in the forward")
            raise PlanChanged
        verify = not self.verified
        if verify and any(isinstance(p.module, (InProjection, RecurrentProjection)) for p in plans):
            # the unrolled attention must compute what the module computes (else the kernel would be of
            # another function): compare the outputs once per model structure
            with torch.no_grad():
                own = self._call(x).reshape(b, -1)
            if not grads_close(out.detach().reshape(-1), own.reshape(-1)):
                self.exclude([p for p in plans if isinstance(p.module, (InProjection, RecurrentProjection))],
                             "the unrolled forward's outputs differ from the module's")
                raise PlanChanged
        if verify and self.is_twin:
            self._twin_capture = (k, sum(o.numel() * o.element_size() for o in outs) / b)
            # the twin only checks (its features are thrown away): the output gradients of the v-combination of
            # outputs, summed over examples, as one "output" [b, 1, ...] (instead of k output passes), and the
            # captured rows weighed by the example weights w on the layer's side, against autograd's gradient
            # of sum_i w_i v . f(x_i). The example weights must stay on the layer's side: weighed at the output,
            # any assignment of captured rows to examples would sum to the right total (a layer called on
            # [L, L] buckets with L = b would pass)
            w, v = (t.to(out.device, out.dtype) for t in check_weights(b, k))
            gs = torch.autograd.grad((out * v[None, :]).sum(), outs, retain_graph=True, allow_unused=True)
            grads = [(torch.zeros_like(o) if g is None else g).unsqueeze(1) for g, o in zip(gs, outs)]
            per_plan = weighted_layer_grads(out, w[:, None] * v[None, :], plans)
            vgrads = [t for ts in per_plan for t in ts]
            self.rounds.scale = check_scale(vgrads)
            v = w[:, None]  # [b, 1]: example i's weight on its one "output"
        elif reps:
            grads = replicated  # each [b, k, ...]
            self._note_backward(x, "replicated", time.perf_counter() - started, outs)
        else:
            copies = self.capture_copies
            leaves = list(copies.values()) if copies else []  # per-example copies (their gradients too)
            every = outs + leaves
            per_out = [list(col) for col in zip(*self.output_gradient_passes(out, every, retain=verify))]
            if leaves:
                self.keep_copy_grads(per_out[len(outs):])
                per_out = per_out[:len(outs)]
            grads = [torch.stack(g, 1) for g in per_out]  # each [b, k, ...]
            if not verify:
                self._note_backward(x, "batched", time.perf_counter() - started, outs)
        if verify and not self.is_twin:
            # One random combination of outputs and examples checks every layer: sum_i w_i v . J_i from the
            # captured factors must equal autograd's gradient of sum_i w_i v . f(x_i). It does not when a
            # parameter is also used outside its module's forward, or when a module's batch is not its
            # inputs' first dimension (e.g. [L, b, E] sequences): random example weights w tell examples
            # apart, where a plain sum over examples would not. Such layers go to the exact fallback.
            w, v = (t.to(out.device, out.dtype) for t in check_weights(b, k))
            v = w[:, None] * v[None, :]  # [b, k]: example i's output weights
            per_plan = weighted_layer_grads(out, v, plans)
            vgrads = [t for ts in per_plan for t in ts]
            self.rounds.scale = check_scale(vgrads)
        feats, pos, bad = [], 0, []
        misfits = self.layout_misfits(cap, b) if verify else []
        emit = sink if sink is not None else feats.append
        for i, (p, c) in enumerate(zip(plans, cap.calls)):
            g_calls = grads[pos: pos + len(c.outputs)]
            pos += len(c.outputs)
            theirs = per_plan[i] if verify else None
            if p in misfits:
                bad.append(p)
            else:
                self._plan_feature(p, c, g_calls, theirs, v if verify else None, verify, sink, emit, bad)
            cap.calls[i] = None  # this layer's captured tensors go now (a streamed block holds one layer's at most)
        del cap
        if verify:
            self.rounds.note(plans, per_plan, bad, k)
        if bad:
            self.exclude(bad)
            raise PlanChanged
        if verify and not all(bool(t.any()) for t in vgrads):
            # a layer's gradient is zero here (e.g. behind a zero-initialised head): its check decided nothing,
            # so the outcome is not remembered and the check runs again on the next call
            return feats
        if verify and self.mark_verified():
            raise PlanChanged  # auto chose the whole-model Jacobian: this block again, with that plan
        return feats

    # -- the output gradients of a verified block: batched backward or the block repeated k times -----------------
    def _replication_key(self, x: torch.Tensor) -> tuple:
        # the thread count too: which way is faster depends on it (benchmarks/replicated_backward.py)
        return (self.fingerprint("replicated"), tuple(x.shape), x.dtype, str(self.device), torch.get_num_threads())

    def _replicas(self, x: torch.Tensor) -> tuple[int, bool]:
        """``(k, check)`` when this verified block's output gradients come from one backward of the block repeated
        ``k`` times (:meth:`_replicated_capture`; ``check``: its first turn, whose outputs are compared with the
        block's own), else ``(0, False)`` (one batched backward or k passes: :meth:`output_gradient_passes`).

        Which is faster depends on the model and the machine: on the 2-core CPU at 2 threads, the replicated
        block takes 0.42x the batched backward's time on timm mobilenetv3 (n = 4: the legacy vmap of
        ``is_grads_batched`` loops over k for depthwise convolutions' backward, the replicated one runs it once on
        ``k b`` examples) and 1.0-1.75x on the transformers and ResNet (``benchmarks/results/replicated-backward-*``).
        So it is measured, once per model structure, block shape, device and thread count: two calls each way,
        alternating, the replicated way first (every call exact either way), then the faster is kept
        (``caches.REPLICATED``; explain() says which). The first verified block begins the measurement when the
        layer check's capture on the twin gave its size (a first call then pays the faster way on models such as
        these, not the batched backward and its first-shape check); otherwise a batched block begins it. Only while
        k times the block's captured tensors take at most ``limits`` ``replicated_backward_bytes`` (0: never), and
        not with per-example copies riding on the capture."""
        cap = tuning.current().replicated_backward_bytes
        if (cap == 0 or self.is_twin or not self.verified or not self.plans or type(x) is not torch.Tensor
                or (self.generic and self.per_example_copies())):
            return 0, False
        known = caches.REPLICATED.get(self._user_model, {})
        record = known.get(self._replication_key(x))
        if record is None and self._twin_capture is not None:
            k, per_example = self._twin_capture
            record = begin_measurement(caches.REPLICATED.setdefault(self._user_model, {}), self._replication_key(x),
                                       k, int(per_example * x.shape[0]))
        turn = replication_turn(record, cap)
        if turn in ("check", "replicated"):
            return record["k"], turn == "check"
        return 0, False

    def _replicated_capture(self, x: torch.Tensor, reps: int, check: bool = False):
        """``(captured, grads)``: the capture forward on ``x`` repeated ``reps`` (= k) times (``[k b, ...]``,
        replica-major), then one backward for every output (``capture.backward.replicated_output_gradients``);
        ``grads``: per captured call ``[b, k, ...]``; ``captured`` keeps replica 0's output, inputs and outputs
        (views).

        With ``check`` (the way's first turn for this model and shape), every replica's outputs must first equal
        those of a forward of the block alone, without grad: a batch of ``k b`` examples is a size the batch-mixing
        check has not seen, and a model may mix examples only in large batches (a statistic above some size),
        which changes its outputs there (ValueError: the caller keeps the batched backward). One no-grad forward
        of ``b`` examples: the earlier check, outputs of ``k b`` and ``k b / 2`` examples, cost 0.5-0.7x a steady
        call (timm efficientnet, mobilenetv3)."""
        b = x.shape[0]
        cap = self.capture(x.repeat(reps, *([1] * (x.dim() - 1))))
        out = cap.out.reshape(reps * b, -1)
        if check:
            with torch.no_grad():
                own = self._call(x).reshape(b, -1)
            if not outputs_agree(out.detach().reshape(reps, b, -1), own.expand(reps, b, own.shape[1])):
                raise ValueError("the model's outputs on the block repeated k times differ from the block's own")
        grads = replicated_output_gradients(out, cap.outputs(), reps)
        for c in cap.calls:
            c.batch_slice(b)
        cap.out = out[:b]
        record = caches.REPLICATED[self._user_model][self._replication_key(x)]
        self.backward_used = (f"one backward of the block repeated {reps} times (block of {b}: " + (
            "measured faster than the batched backward for this model, shape and thread count)"
            if len(record["batched"]) >= 2 and len(record["replicated"]) >= 2 else
            "measuring it against the batched backward, two calls each way, for this model, shape and thread count)"))
        return cap, grads

    def _note_backward(self, x: torch.Tensor, way: str, seconds: float, outs: list) -> None:
        """Record one verified block's capture-and-gradients time for :meth:`_replicas`' measurement."""
        note_backward_time(caches.REPLICATED.setdefault(self._user_model, {}), self._replication_key(x), way,
                           seconds, self.k, sum(o.numel() * o.element_size() for o in outs))

    def layout_misfits(self, cap, b: int) -> list:
        """The plans of ``cap`` (a :class:`~.capture.captured.Captured`) whose captured calls do not fit their
        kind's layout (:func:`layout_mismatch`: a forward of
        the subclass's own, a call without the batch), each reason kept for :meth:`exclude` (``explain()``
        shows it). Checked on unverified blocks, before any layout runs: any other error of a layout is raised,
        not sent to the fallback unseen."""
        out = []
        for p, c in zip(cap.plans, cap.calls):
            misfit = layout_mismatch(p, c, b)
            if misfit is not None:
                self.planning.why[p.name] = f"its captured tensors do not fit the {p.kind} layout: {misfit}"
                out.append(p)
        return out

    def _plan_feature(self, p, c, g_calls, theirs, v, verify: bool, sink, emit, bad: list) -> None:
        """One planned layer's feature from its captured calls ``c`` by its kind's rule (``capture.rules``), emitted,
        and on an unverified block its check against autograd (``bad`` gains the layer when it fails); ``v``
        ``[b, k]``: the check's per-example output weights."""
        rule = rule_for(p)
        ctx = TileContext(self.kernel, self.pairs_per_example, self.workspace if sink is not None else None)
        f, mine = rule.tile_feature(p, c, g_calls, v if verify else None, ctx)
        if verify:
            floor = check_floor(theirs, self.rounds.scale)
            if not all(grads_close(u, w, floor) for u, w in zip(mine, rule.check_reference(theirs))):
                bad.append(p)
        f.name = self._layer_key(p)
        emit(f)

    def _layer_key(self, p) -> str:
        """The name of a planned layer's feature: with :attr:`by_layer`, the module owning its parameters
        (:func:`owner_key`: a packed attention projection ``att.in_proj`` counts for ``att``, a recurrent map
        ``gru.ih_l0`` for ``gru``, a matmul site ``mix:matmul`` for the module holding ``mix``), the plan's own
        name otherwise."""
        if not self.by_layer:
            return p.name
        names = self.__dict__.get("_param_names")
        if names is None:
            names = self._param_names = {id(t): n for n, t in self.model.named_parameters()}
        params = [names[id(t)] for _, t in p.params() if id(t) in names]
        return owner_key(params[0]) if params else p.name

    def capture(self, x: torch.Tensor, grad: bool = True):
        """Forward pass (with grad) recording each planned layer's inputs and outputs of every call: a
        :class:`~.capture.captured.Captured` (:func:`~.capture.hooks.capture_forward`; with grad, per-example
        copies of the fallback parameters that take them ride on it)."""
        def forward(reset):
            subs = self._copy_leaves(x) if grad else None
            return self._call(x, reset, subs=subs, standins=self.copies.standins if grad else None)

        # (the twin probes: its capture copies every captured tensor while finding the layers that need copies)
        return capture_forward(self.plans, x.shape[0], forward, grad, self.planning.why, probe=self.is_twin)

    def _call(self, x: torch.Tensor, reset=None, subs: dict | None = None, model: nn.Module | None = None,
              standins: BroadcastStandIns | None = None) -> torch.Tensor:
        """The model (or ``model``, a copy of it) on ``x``, channels-last for convolutional models (unless the
        model cannot take it); ``subs``: ``{parameter name: tensor}`` used in place of those parameters;
        ``standins``: a :class:`~.capture.broadcast.BroadcastStandIns` active during the forward."""
        model = self.model if model is None else model

        def run(inp):
            if standins is not None:
                standins.mark(inp)
                for t in (subs or {}).values():
                    standins.mark(t)
                with standins:
                    return plain(inp)
            return plain(inp)

        def plain(inp):
            if subs:
                from torch.func import functional_call

                return tensor_output(functional_call(model, subs, (inp,), strict=False))
            return tensor_output(model(inp))

        if self.channels_last and x.dim() == 4 and x.is_floating_point():
            try:
                return run(x.contiguous(memory_format=torch.channels_last))
            except RuntimeError:
                # e.g. a .view() that needs the standard layout: this model runs on contiguous inputs
                self.channels_last = False
                if reset is not None:
                    reset()
        return run(x)

    def twin_fits(self) -> bool:
        """Whether the layer check runs on a perturbed copy (the model holds at most ``limits`` ``twin_max_bytes`` in
        parameters and buffers) rather than on the model itself."""
        return model_bytes(self.model) <= tuning.current().twin_max_bytes

    def _perturbed_twin(self, seed: int) -> nn.Module | None:
        """:func:`~.capture.check.perturbed_twin` of the model, or None when it does not :meth:`twin_fits`."""
        return perturbed_twin(self.model, seed) if self.twin_fits() else None

    def verify_on_twin(self, x: torch.Tensor) -> bool:
        """The layer check, run on a perturbed copy of the model (up to ``capture.check.CHECK_EXAMPLES`` examples
        of ``x``), its outcome (layers moved to the fallback, in-place copies) taken over and remembered for this
        model structure.
        Which layers capture exactly is a property of the model's code, not of its values, and values such
        as a zero-initialised head (torchvision's ViT) make gradients zero, so a check on the model itself
        could decide nothing. True when the plan changed (the caller recomputes its block)."""
        twin = self._perturbed_twin(98)
        if twin is None:
            return False  # a model too large to copy: the check runs on the model itself
        other = Featurizer(twin, self.implementation, self.kernel, None)  # "auto" is "layerwise" here: no switch
        other.is_twin = True
        other.copies.owner = self._user_model  # its per-example-copy check decides for this model
        other.checked_mixing = _ALL_SIZES  # this block passed the check already
        other.plan_for_pairs(self.pairs_per_example)
        other.channels_last = self.channels_last
        named = dict(twin.named_parameters())
        probe = x[: min(x.shape[0], CHECK_EXAMPLES)]
        candidates = [n for n in other.generic if named[n].dim() in (1, 2, 3)]
        if candidates and self.implementation == "layerwise":
            # parameters the model's own code multiplies directly: linear sites (checked with the rest)
            other.planning.sites = discover_sites(twin, other._call, probe, candidates)
            if other.planning.sites:
                other.planning.replan(set(), set(), {})
        with torch.enable_grad():
            for _ in range(2 * len(other.plans) + 2):  # each round moves a layer a step, or ends
                try:
                    other._features(probe)
                    break
                except PlanChanged:
                    if other.verified:
                        break
                    if other.rounds.all_passed(other.plans):
                        # the layers left planned all passed the round that moved the others: decided, with no
                        # round more (the fallback's per-example-copy decisions, which a last round makes here)
                        other.planning.layer_costs = dict(other.rounds.dims)
                        other.mark_verified()
                        if other.generic:
                            other.per_example_copies(probe)
                        break
        caches.VERIFIED.pop(twin, None)
        # kept for this call: should auto take the whole-model Jacobian, the per-example-copy check of the
        # parameters that then join the fallback runs on it too (one deep copy per call, not two)
        self._twin = twin
        if not other.verified:
            # undecided (a layer whose gradient stays zero on the twin, e.g. behind a saturated hard-sigmoid): the
            # check runs on the model's own blocks instead, once. The layers the twin found wrong are wrong
            # whatever the values (a mismatch decides; only agreement can be by accident), so they go to the
            # fallback now rather than being found again there, one more round and one more twin later.
            self._twin_tried = True
            bad, affine = other.planning.module_names(twin)
            if not bad:
                return False
            mine, before = self.planning, self.planning.signature()
            mine.sites = dict(other.planning.sites)
            mine.reasons.update(other.planning.reasons)
            known, _ = mine.module_names()
            mine.replan(known | bad, affine, other.planning.copies())
            return mine.signature() != before
        self._twin_capture = other._twin_capture
        names, affine = other.planning.module_names(twin)
        mine, before = self.planning, self.planning.signature()
        # the twin's layer shapes (embeddings: one flop a parameter in the comparison)
        planned = {p.name for p in other.plans}
        mine.layer_costs = {n: d for n, d in other.rounds.dims.items() if n in planned}
        mine.sites = dict(other.planning.sites)
        mine.reasons = dict(other.planning.reasons)
        mine.replan(names, affine, other.planning.copies())
        switched = self.mark_verified()
        return switched or mine.signature() != before

    def _auto_choice(self) -> bool:
        """``implementation="auto"`` once the layer check is done: the whole-model Jacobian when the cost model
        says it is cheaper than the layerwise pass plus its torch.func fallback
        (:func:`~.capture.cost.layerwise_or_jacobian`). True when it switched."""
        if not self.auto or not self.plans or not self.generic:
            return False
        named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        copies = set(self.per_example_copies(getattr(self, "_block", None)))  # these need no torch.func pass
        rest = [n for n in self.generic if n not in copies]
        share = sum(named[n].numel() for n in rest) / sum(p.numel() for p in named.values())
        if not rest:
            self.auto_reason = "layerwise: the fallback parameters are all per-example copies (no torch.func pass)"
            return False
        layers = [(self.planning.layer_costs.get(p.name), sum(t.numel() for _, t in p.params())) for p in self.plans]
        jacobian, self.auto_reason = layerwise_or_jacobian(
            layers, sum(named[n].numel() for n in self.generic), share, self.kernel, self.pairs_per_example)
        if not jacobian:
            return False
        self.planning.whole_model_jacobian()
        return True

    def mark_verified(self) -> bool:
        """Record the layer check's outcome for this model structure; True when ``auto`` then switched to the
        whole-model Jacobian (the caller recomputes its block with the new plan)."""
        self.verified = True
        if not self.planning.layer_costs:  # checked in place: this block's layer shapes
            self.planning.layer_costs = {p.name: p.costs["dims"] for p in self.plans if p.costs and "dims" in p.costs}
        caches.VERIFIED.setdefault(self._user_model, {})[self.implementation] = self.planning.verdict(
            self.fingerprint(self.implementation))
        return self._auto_choice()

    def exclude(self, bad, why: str = CHECK_FAILED) -> None:
        """Move the layers ``bad`` a step towards the fallback (:meth:`~.capture.planning.Planning.exclude`,
        ``why`` recorded per parameter); the plan is unverified again."""
        self.planning.exclude(bad, why)
        self.verified = False

    def fallback_jacobian(self, x: torch.Tensor, split: bool = False):
        """[b, k, P] per-example Jacobians for the fallback parameters only (in ``self.generic`` order):
        per-example copies where they apply (:meth:`per_example_copies`), torch.func for the rest. With
        ``split``, the same as a list of ``[b, k, P_i]`` parts whose concatenation it is (:func:`~.capture.fallback.joined_parts`:
        views of the large ones, the small ones joined), without the concatenated copy."""
        copies = self.per_example_copies(x)
        captured = self.copies.take()
        if not copies or any(n not in copies for n in self.generic):
            # a torch.func pass runs anyway, and its cost hardly depends on how many parameters it covers: the
            # copies ride on it (splicing in the captured ones would copy the whole [b, k, P] once more)
            return self._torch_func_jacobian(x, self.generic, split)
        if (captured is not None and set(captured) == set(copies)
                and all(t.shape[0] == x.shape[0] for t in captured.values())):
            parts = dict(captured)  # from the capture's own backward passes
        else:
            # instead of any torch.func pass
            parts = dict(zip(copies, self.copies.jacobian(x, copies, self.model, self.copy_ops())))
        if split:
            return joined_parts([parts[n] for n in self.generic])
        return torch.cat([parts[n] for n in self.generic], -1) if len(parts) > 1 else parts[self.generic[0]]

    def per_example_copies(self, x: torch.Tensor | None = None) -> list[str]:
        """Fallback parameters whose per-example gradients one forward gives when the parameter is replaced
        by ``b`` copies of itself (``[1, ...] -> [b, ...]``, else ``[...] -> [b, ...]``): class tokens,
        positional embeddings, layer scales, hand-written biases — parameters the model only broadcasts
        against the batch. Autograd's gradient of each copy is then that example's gradient, without a
        whole-model torch.func pass. Decided once per model structure on a few examples of ``x``, on a perturbed
        twin (:meth:`~.capture.copies.PerExampleCopies.decided`); ``[]`` without ``x`` before that."""
        def twin():
            # (a twin checks on itself: it is the perturbed copy, and one deep copy per check is enough; a model
            # too large to copy: the model itself)
            return (self.model if self.is_twin else getattr(self, "_twin", None) or self._perturbed_twin(99)
                    or self.model)

        key = (self.fingerprint("copies", self.copies.owner), self.dtype)
        return self.copies.decided(self.generic, key, x, twin)

    def copy_failures(self) -> dict:
        """``{parameter name: why}`` for fallback parameters whose per-example stand-ins broke the forward."""
        return self.copies.failures(self.generic)

    def copy_ops(self) -> dict:
        """``{parameter name: operation names}`` of the fallback parameters captured by stand-ins at operations
        (:mod:`.capture.broadcast`) rather than by copies of themselves."""
        return self.copies.ops(self.generic)

    def _copy_leaves(self, x: torch.Tensor) -> dict | None:
        """For the capture forward of a verified plan: the copies of the fallback parameters that take them
        (``PerExampleCopies.ride``), so the capture's own backward passes give their per-example gradients."""
        names = self.per_example_copies() if self.verified and self.generic else []
        return self.copies.ride(self.model, names, set(self.copy_ops()) if names else set(), x.shape[0])

    def keep_copy_grads(self, per_output: list[list[torch.Tensor]]) -> None:
        """``per_output[j][a]``: output a's gradient of copy leaf j from the capture's backward passes (taken by
        :meth:`fallback_jacobian`)."""
        self.copies.keep(per_output, self.model)

    def _torch_func_jacobian(self, x: torch.Tensor, names: list[str], split: bool = False):
        """[b, k, P] per-example Jacobians of the parameters ``names`` by torch.func
        (``capture.fallback.torch_func_jacobian``), or the exact loop; with ``split``, as a list of parts."""
        if not self._vmap_failed:
            key = (self.fingerprint("vmap"), tuple(x.shape), x.dtype, tuple(names))
            got = torch_func_jacobian(self.model, x, names, key, caches.VMAP_CHECKED.setdefault(self._user_model, {}),
                                      split)
            if got is not None:
                return got
            # some ops have no correct batching rule: nn.PReLU's backward raises under vmap(jacrev), except when
            # the batch has as many examples as the model has outputs, where it silently mixes the two (torch
            # 2.13; errors of 5% here): the exact loop instead, from now on for this Featurizer
            self._vmap_failed = True
        from . import naive

        named = dict(self.model.named_parameters())
        with torch.enable_grad():  # the exact per-example, per-output autograd loop
            J = naive.jacobian_rows(self.model, [x], params=[named[n] for n in names])
        return [J] if split else J

    def output_gradient_passes(self, out: torch.Tensor, every: list, retain: bool):
        """Each output's gradients with respect to ``every`` in turn (``capture.backward.output_gradient_passes``:
        one batched backward where it fits and agrees, checked once per model structure and block shape, else
        k passes); :attr:`backward_used` says which (``explain()``)."""
        seen = caches.BATCHED_CHECKED.setdefault(self._user_model, {})
        passes, self.backward_used = output_gradient_passes(out, every, retain, lambda: self.fingerprint("batched"),
                                                            seen)
        return passes


def owner_key(param_name: str) -> str:
    """The qualified name of the module owning a parameter, ``by_layer=True``'s key: ``"0.weight" -> "0"``,
    ``"cls" -> ""`` (the model itself), and a parametrized weight's ``"lin.parametrizations.weight.original"``
    -> ``"lin"`` (the module the parametrization is registered on)."""
    owner = param_name.rpartition(".")[0]
    head, sep, _ = owner.partition("parametrizations")
    if sep and (head == "" or head.endswith(".")):
        return head[:-1] if head else ""
    return owner


class _AllSizes:
    """A twin's block sizes checked for mixing: all (its model's blocks passed the check)."""

    def __contains__(self, b) -> bool:
        return True

    def add(self, b) -> None:
        pass


_ALL_SIZES = _AllSizes()


def _fingerprint(model: nn.Module, implementation: str) -> tuple:
    return (implementation,
            tuple((n, id(m), type(m)) for n, m in model.named_modules()),
            # dtype and device too: which kernels run (e.g. nn.LSTM's) may differ between them
            tuple((n, id(p), tuple(p.shape), p.requires_grad, p.dtype, str(p.device))
                  for n, p in model.named_parameters()),
            plan_state(model),
            model.__dict__.get("_lazyhasty_call"))  # the entry point's named inputs and output (_outputs.ProbeCall)


# A buffer or tensor attribute of at most this many elements enters plan_state by its values too (a change
# through ``.data`` moves no version counter); larger ones by identity, storage and version counter only.
STATE_VALUE_MAX_ELEMENTS = 4096
_SCALARS = (bool, int, float, complex, str, type(None))


def plan_state(model: nn.Module) -> tuple:
    """What can decide a plan besides the structure (modules, parameters, requires_grad flags), for the
    per-model cache keys: every module's forward hooks, and, for modules whose class is
    not torch's own (a subclass, a user's or a library's module: its forward may read anything), each buffer
    and non-parameter tensor attribute by identity, storage, version counter, shape and dtype (and by value up
    to :data:`STATE_VALUE_MAX_ELEMENTS` elements), and each scalar attribute (bool, int, float, str, None) by
    value. Parameter values are left out: which layers capture exactly is a property of the code (the layer
    check runs on a perturbed twin for that reason), so training steps keep the cached checks. torch's own
    modules read their buffers (running statistics) the way the engine captures them whatever their values.
    Train/eval flags are left out too (a model's mode changes mixing, which the mixing check keys by, not
    which layers capture exactly: the layer check is kept across ``model.eval()`` / ``model.train()``).
    So are the values of the running statistics a subclass of torch's running-stat norms inherits
    (:data:`RUNNING_STATISTICS`, e.g. timm's ``BatchNormAct2d``): every train-mode forward updates them in place,
    and keyed by them every training step re-ran every check (a logging step of timm's mobilenetv3 took 4-10x
    its time); they enter by identity, shape, dtype and device, as torch's own norms read them.

    Returns:
        A hashable tuple; equal tuples mean the cached checks still hold.
    """
    state = []
    for name, m in model.named_modules():
        state.append((name, tuple(m._forward_hooks), tuple(m._forward_pre_hooks)))
        if type(m).__module__.startswith("torch."):
            continue
        statistics = RUNNING_STATISTICS if isinstance(m, nn.modules.batchnorm._NormBase) else ()
        for key, value in m.__dict__.items():
            if key == "_buffers":
                state.extend((name, k, _statistic_state(t) if k in statistics else _tensor_state(t))
                             for k, t in value.items() if t is not None)
            elif isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                state.append((name, key, _tensor_state(value)))
            elif isinstance(value, _SCALARS) and key != "training":
                state.append((name, key, value))
    return tuple(state)


# The buffers torch's running-stat norms (``nn.modules.batchnorm._NormBase``: BatchNorm, InstanceNorm, SyncBatchNorm)
# register: statistics a train-mode forward updates, read as the norm call's arguments.
RUNNING_STATISTICS = frozenset({"running_mean", "running_var", "num_batches_tracked"})


def _statistic_state(t: torch.Tensor) -> tuple:
    return (id(t), tuple(t.shape), t.dtype, str(t.device))


def _tensor_state(t: torch.Tensor) -> tuple:
    token = (id(t), t._version, tuple(t.shape), t.dtype, str(t.device))
    if t.layout != torch.strided or t.is_meta:
        return token
    token += (t.data_ptr(),)
    if t.numel() <= STATE_VALUE_MAX_ELEMENTS:
        try:  # (as raw bytes: every dtype numpy lacks, bfloat16 included, viewed as bytes first)
            token += (t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes(),)
        except (RuntimeError, TypeError):
            pass  # a dtype without a byte view (quantized): identity, storage and version only
    return token


