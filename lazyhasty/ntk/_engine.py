"""Empirical NTK Gram matrices and streamed NTK alignment (see :mod:`lazyhasty.ntk`)."""
from __future__ import annotations

import contextlib
import copy
import weakref

import torch
from torch import nn

from .. import _backend
from .._loaders import all_inputs, as_reference_module, iter_inputs, model_and_reference, model_device
from .._precision import exact_fp32
from .._progress import Progress
from ..metrics._exact import AlignmentSums
from . import _features as feat
from ._plan import choose_path
from ._sharding import RankTiles, blocks_of
from ._layers import (
    InProjection, batch_grad_from_factors, capture_modules, check_per_example, unrolled_attention, check_probe_inputs, choose_form, embedding_factors, ghost_layout,
    linear_factors, select_output, tensor_output,
    linear_g, norm_grads, split_params,
    plan_layers, to_materialized, trainable_params,
)

KERNELS = ("full", "trace", "diagonal")
IMPLEMENTATIONS = ("auto", "naive", "jacobian", "layerwise")
DEFAULT_CACHE_BYTES = 1 << 30
# On CPU the trace kernel is one block (one output's backward pass at a time, symmetric products inside
# the block) while what that block holds fits in this many bytes (on CUDA: half the free memory);
# beyond, tiles of default_block_size.
TRACE_BLOCK_BYTES = 1 << 30
# implementation="auto": layerwise, unless the layer check leaves at least this share of the parameters to the
# torch.func fallback. The fallback's vmap(jacrev) runs through the whole model whatever its share, so with a
# large share the layerwise pass is extra work on top of what one whole-model Jacobian costs. Measured (2-core
# CPU, n = 32-64, layerwise / jacobian time): torchvision ViT (37% on the fallback) 1.5x, nn.TransformerEncoder
# classifier (41%) 1.4x, nn.MultiheadAttention (81%) 1.5x, nn.LSTM (98%) 1.2x.
AUTO_JACOBIAN_SHARE = 0.25


def _ntk_backend(device: torch.device, backend: str | None, dtype: torch.dtype = torch.float32) -> str:
    """The NTK engine's path: ``"triton"`` (CUDA, or CPU in the interpreter) or ``"torch"`` (BLAS/cuBLAS tiles).

    The C++ and CUDA extensions have no NTK kernels, so ``backend="cpp"`` / ``"cuda"`` are errors, not
    silently another path. Default (None / "auto"): Triton on CUDA when installed, else torch. The Triton
    kernels accumulate in float32, so float64 always runs the torch path: it must not lose digits.
    """
    if backend not in (None, "auto", "torch", "triton"):
        raise ValueError(f"backend={backend!r}: the NTK engine has 'torch' and 'triton' paths (or None / 'auto'); "
                         "the C++ and CUDA extensions hold no NTK kernels")
    if dtype == torch.float64:
        return "torch"
    if backend == "triton":
        return _backend.select(device, "triton")  # BackendUnavailable, with the reason, where it cannot run
    if backend == "torch":
        return "torch"
    if _backend.has_triton and device.type == "cuda":
        return "triton"
    return "torch"


@contextlib.contextmanager
def _same_trainable(model: nn.Module, ref: nn.Module):
    """The reference's kernel is over the parameters trainable in ``model`` (by name), whatever the
    reference's own flags are (e.g. a frozen copy at init); its flags are restored afterwards."""
    want = {n for n, p in model.named_parameters() if p.requires_grad}
    saved = [(p, p.requires_grad) for _, p in ref.named_parameters()]
    try:
        for n, p in ref.named_parameters():
            p.requires_grad_(n in want)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _check_args(kernel: str, implementation: str, block_size, max_cache_bytes=0, dtype=None) -> None:
    if not isinstance(kernel, str) or kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if block_size is not None and (not isinstance(block_size, int) or isinstance(block_size, bool)
                                   or block_size < 1):
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
    if not isinstance(max_cache_bytes, int) or isinstance(max_cache_bytes, bool) or max_cache_bytes < 0:
        raise ValueError(f"max_cache_bytes must be a non-negative int, got {max_cache_bytes!r}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.float64) or None, got {dtype!r}")


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
        self.excluded: set[int] = set()
        self.plans, self.generic = plan_layers(model, self.implementation)
        self.verified = False
        self.is_twin = False  # the perturbed copy verify_on_twin checks (it checks itself in place)
        self._subs = None  # per-example copy leaves of the current capture forward
        self._captured_copies = None  # their gradients {name: [b, k, numel]}, for _generic_jacobian
        known = _VERIFIED.get(self._user_model)
        if known is not None and known[0] == _fingerprint(self._user_model, self.implementation):
            # this model's structure was checked before: the same layers go to the fallback
            names = known[1]
            self.excluded = {id(m) for n, m in capture_modules(model) if n in names}
            self.plans, self.generic = plan_layers(model, self.implementation, self.excluded)
            for p in self.plans:
                p.copy_input, p.copy_output = known[2].get(p.name, (False, False))
            self.verified = True
            self._auto_choice()
        self.k: int | None = None
        self.by_layer = False  # split the fallback's Jacobian per owning module (ntk_gram(by_layer=True))
        self.checked_mixing = False
        # amortizes forming per-example gradients in the ghost/materialized choice (set by the caller)
        self.pairs_per_example = 0.0
        # mkldnn/cudnn convolutions (and their backward passes) are faster on channels-last inputs
        self.channels_last = any(isinstance(m, nn.Conv2d) for m in model.modules())

    # -- public ------------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> list:
        x = self._prepare(x)
        while True:
            feats = self._features(x)
            if feats is not None:
                return feats

    def trace_block_limit(self, x: torch.Tensor, budget: int | None = None) -> int:
        """Most examples :meth:`trace_gram` takes in one block within ``budget`` bytes (default
        :data:`TRACE_BLOCK_BYTES` on CPU, half the free memory on CUDA), from what one example of ``x``
        needs: layer inputs as patches, activations and gradients, every output's gradients of ghost
        layers, one output's per-example gradients of the widest materialized layer, and the ``[b, b]``
        kernels."""
        from ._layers import position_a

        x1 = self._prepare(x[:1], check=False)
        with torch.no_grad():
            out = self._forward_capture(x1, grad=False)
        k = out.numel()
        per, widest = 0, 0
        for p in self.plans:
            for xi, o in zip(p.inputs, p.outputs):
                per += 3 * o.numel()
                if p.kind in ("linear", "conv"):
                    a = position_a(p, xi)  # [1, S, G, din]
                    per += a.numel()
                    dout = o.numel() // (a.shape[1] * a.shape[2])
                    form = p.form or choose_form(p, a.shape[2], a.shape[3], a.shape[1], k, dout, "trace",
                                                 self.pairs_per_example)
                    if form == "ghost":
                        per += k * o.numel()
                    else:
                        widest = max(widest, a.shape[2] * a.shape[3] * dout)
                elif p.kind == "embedding":
                    per += k * o.numel()
            p.inputs.clear()
            p.outputs.clear()
        per += widest
        if self.generic:  # per-example Jacobians [k, P] of the fallback parameters
            named = dict(self.model.named_parameters())
            per += k * sum(named[n].numel() for n in self.generic)
        if budget is None:
            budget = (torch.cuda.mem_get_info(self.device)[0] // 2 if self.device.type == "cuda"
                      else TRACE_BLOCK_BYTES)
        # b examples need about b * per + 6 b^2 elements (the [b, b] kernels: accumulators, mirror, and
        # both models' kernels in an alignment)
        elems = budget / (torch.finfo(self.dtype).bits // 8)
        return int(max(1, (-per + (per * per + 24 * elems) ** 0.5) / 12))

    def trace_gram(self, x: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        """``[b, b]`` trace kernel of one block, one output's backward pass at a time (see ``_trace``)."""
        from ._trace import trace_gram

        x = self._prepare(x)
        while True:
            K = trace_gram(self, x, backend)
            if K is not None:
                return K

    def stream(self, x: torch.Tensor, sink, reset) -> None:
        """Hand each feature of the block to ``sink`` as soon as it exists, then drop it.

        Materialized per-example gradients are written into one reused buffer, so a block whose tile is
        reduced at once (a single-block Gram) never holds every layer's ``[b, k, P]`` at the same time.
        ``reset()`` is called before a block is recomputed (a layer moved to the fallback).
        """
        x = self._prepare(x)
        while self._features(x, sink) is None:
            reset()

    def _prepare(self, x: torch.Tensor, check: bool = True) -> torch.Tensor:
        x = x.to(self.device)
        if x.is_floating_point():
            x = x.to(self.dtype)
        if check and not self.checked_mixing:
            self._check_batch_independence(x)
        return x

    def _buffer(self, numel: int) -> torch.Tensor:
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
        """:func:`check_probe_inputs` (two small forwards), once per model structure, train/eval flags and
        input shape: whether a model mixes examples is a property of its code, not of the values. Non-finite
        inputs are checked on every call (non-finite outputs make the kernel non-finite: an error there)."""
        self.checked_mixing = True
        key = (_fingerprint(self._user_model, "mixing"), tuple(m.training for m in self.model.modules()),
               tuple(x.shape[1:]), x.dtype, str(x.device))
        if _MIXING_CHECKED.get(self._user_model) == key:
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise ValueError("the probe inputs contain NaN/inf: the tangent kernel is undefined")
            return
        check_probe_inputs(self._call, x)
        _MIXING_CHECKED[self._user_model] = key

    def _features(self, x: torch.Tensor, sink=None):
        self._block = x  # the examples the per-example-copy check may use (per_example_copies)
        feats: list = []
        if self.plans and not self.verified and not self.is_twin and self.verify_on_twin(x):
            return None  # the plan changed (layers moved, or auto took the whole-model Jacobian): again
        if not self.plans and not self.verified:
            self._mark_verified()  # every layer is on the fallback: remember it, do not check again
        if self.plans:
            layer_feats = self._layer_features(x, sink)
            if layer_feats is None:  # verification moved a layer to the fallback: redo this block
                return None
            feats.extend(layer_feats)
        if self.generic:
            J = self._generic_jacobian(x)
            self.k = J.shape[1]
            if self.by_layer:  # one feature per owning module (the kernel's per-layer parts)
                named = dict(self.model.named_parameters())
                parts, start = {}, 0
                for n in self.generic:
                    size = named[n].numel()
                    parts.setdefault(n.rpartition(".")[0], []).append((start, start + size))
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
        out = self._forward_capture(x)
        b = x.shape[0]
        out = out.reshape(b, -1)
        k = self.k = out.shape[1]
        idle = [p for p in plans if not p.outputs]
        if idle:
            # planned modules whose forward never ran (e.g. nn.MultiheadAttention reads out_proj.weight
            # itself): their parameters are used some other way, so they go to the fallback
            self._exclude(idle)
            return None
        outs = [o for p in plans for o in p.outputs]
        if any(not o.requires_grad for o in outs):
            # a layer whose output does not need grad here (e.g. under a no-grad branch): fallback
            bad = [p for p in plans if any(not o.requires_grad for o in p.outputs)]
            self._exclude(bad)
            return None
        verify = not self.verified
        if verify and any(isinstance(p.module, InProjection) for p in plans):
            # the unrolled attention must compute what the module computes (else the kernel would be of
            # another function): compare the outputs once per model structure
            with torch.no_grad():
                own = self._call(x).reshape(b, -1)
            if not _close(out.detach().reshape(-1), own.reshape(-1)):
                self._exclude([p for p in plans if isinstance(p.module, InProjection)])
                return None
        leaves = list(self._subs.values()) if self._subs else []  # per-example copies (their gradients too)
        every = outs + leaves
        per_out = [[] for _ in every]
        for a in range(k):
            gs = torch.autograd.grad(out[:, a].sum(), every, retain_graph=verify or a + 1 < k, allow_unused=True)
            for i, g in enumerate(gs):
                per_out[i].append(torch.zeros_like(every[i]) if g is None else g)
        if leaves:
            self.keep_copy_grads(per_out[len(outs):])
            per_out = per_out[:len(outs)]
        grads = [torch.stack(g, 1) for g in per_out]  # each [b, k, ...]
        if verify:
            # One random combination of outputs and examples checks every layer: sum_i w_i v . J_i from the
            # captured factors must equal autograd's gradient of sum_i w_i v . f(x_i). It does not when a
            # parameter is also used outside its module's forward, or when a module's batch is not its
            # inputs' first dimension (e.g. [L, b, E] sequences): random example weights w tell examples
            # apart, where a plain sum over examples would not. Such layers go to the exact fallback.
            gen = torch.Generator(device="cpu").manual_seed(1234)
            v = torch.randn(k, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
            w = torch.randn(b, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
            v = w[:, None] * v[None, :]  # [b, k]: example i's output weights
            vparams = [t for p in plans for _, t in p.params()]
            vgrads = torch.autograd.grad((out * v).sum(), vparams, allow_unused=True)
            vgrads = [torch.zeros_like(t) if g is None else g for g, t in zip(vgrads, vparams)]
        feats, pos, vpos, bad = [], 0, 0, []
        emit = sink if sink is not None else feats.append
        for p in plans:
            g_calls = grads[pos: pos + len(p.outputs)]
            pos += len(p.outputs)
            np_ = len(p.params())
            theirs = vgrads[vpos: vpos + np_] if verify else None
            vpos += np_
            if verify:
                try:
                    self._plan_feature(p, g_calls, theirs, v, verify, sink, emit, bad)
                except (RuntimeError, ValueError, IndexError) as exc:
                    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc):
                        raise
                    # a subclass whose forward is not its base class's (e.g. a LayerNorm over channels of
                    # NCHW inputs): its captured tensors do not fit the base-class factors -> the fallback
                    bad.append(p)
            else:
                self._plan_feature(p, g_calls, theirs, None, False, sink, emit, bad)
            p.inputs.clear()
            p.outputs.clear()
        if bad:
            self._exclude(bad)
            return None
        if verify and not all(bool(t.any()) for t in vgrads):
            # a layer's gradient is zero here (e.g. behind a zero-initialised head): its check decided nothing,
            # so the outcome is not remembered and the check runs again on the next call
            return feats
        if verify and self._mark_verified():
            return None  # auto chose the whole-model Jacobian: this block again, with that plan
        return feats

    def _plan_feature(self, p, g_calls, theirs, v, verify: bool, sink, emit, bad: list) -> None:
        """One planned layer's feature from its captured calls (emitted), and on an unverified block its
        check against autograd (``bad`` gains the layer when it fails); ``v`` ``[b, k]``: the check's
        per-example output weights."""
        if p.kind == "norm":
            F = norm_grads(p, g_calls)
            if verify:
                mine = torch.einsum("bk,bkp->p", v, F)
                if not _close(mine, torch.cat([t.reshape(-1) for t in theirs])):
                    bad.append(p)
            f = feat.Materialized(F)
            f.name = p.name
            emit(f)
        else:
            a, g = (embedding_factors if p.kind == "embedding" else linear_factors)(p, g_calls)
            if p.kind != "embedding" and p.form is None:
                p.form = choose_form(p, a.shape[1], a.shape[2], a.shape[3], g.shape[1], g.shape[3], self.kernel,
                                     self.pairs_per_example)
            F = None
            if p.kind != "embedding" and p.form == "materialized":
                F = to_materialized(a, g, self._buffer(_materialized_numel(a, g)) if sink is not None else None)
            if verify:
                if F is not None:  # the per-example gradients are at hand: sum them
                    G, do = g.shape[2], g.shape[3]
                    mine = split_params(p, torch.einsum("bk,bkp->p", v, F).view(G, do, -1))
                else:
                    # contract v with the [b, k, ...] gradients, then lay them out like g (without k)
                    gv_calls = [torch.einsum("bk,bk...->b...", v, gk).unsqueeze(1) for gk in g_calls]
                    if p.kind == "embedding":
                        g_v = embedding_factors(p, gv_calls)[1][:, 0]
                    else:
                        gv = [linear_g(p, gk) for gk in gv_calls]
                        g_v = (torch.cat(gv, -1) if len(gv) > 1 else gv[0])[:, 0]
                    mine = batch_grad_from_factors(p, a, g_v)
                if not all(_close(u, w) for u, w in zip(mine, theirs)):
                    bad.append(p)
            if p.kind == "embedding":
                f = feat.GhostEmbedding(a, g)
            elif F is not None:
                f = feat.Materialized(F)
            else:
                f = feat.GhostLinear(*ghost_layout(a, g))
            f.name = p.name
            emit(f)

    def _forward_capture(self, x: torch.Tensor, grad: bool = True) -> torch.Tensor:
        """Forward pass (with grad) recording each planned layer's inputs and outputs of every call.

        In-place safe: if the model modified a captured input or output in place after the layer ran (its
        version counter moved), that layer switches to copies (:class:`LayerPlan` ``copy_input`` /
        ``copy_output``, remembered per model structure) and the forward runs again."""
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
            for p in self.plans:
                p.inputs.clear()
                p.outputs.clear()
                p.versions.clear()

        for _ in range(2):
            reset()
            handles = [p.module.register_forward_hook(hook_for(p)) for p in self.plans]
            # attention modules whose packed projection is planned run unrolled (it becomes a hooked call)
            unrolled = [p.module._owner[0] for p in self.plans if isinstance(p.module, InProjection)]
            for att, p in zip(unrolled, [p for p in self.plans if isinstance(p.module, InProjection)]):
                att.forward = unrolled_attention(att, p.module, type(att).forward.__get__(att))
            try:
                with torch.set_grad_enabled(grad):
                    out = self._call(x, reset, subs=self._copy_leaves(x) if grad else None)
            finally:
                for h in handles:
                    h.remove()
                for att in unrolled:
                    del att.forward  # the class's forward again
            moved = False
            for p in self.plans:
                for a, o, (va, vo) in zip(p.inputs, p.outputs, p.versions):
                    if not p.copy_input and a._version != va:
                        p.copy_input = moved = True
                    if not p.copy_output and o._version != vo:
                        p.copy_output = moved = True
            if not moved:
                break
        return out

    def _call(self, x: torch.Tensor, reset=None, subs: dict | None = None, model: nn.Module | None = None
              ) -> torch.Tensor:
        """The model (or ``model``, a copy of it) on ``x``, channels-last for convolutional models (unless the
        model cannot take it); ``subs``: ``{parameter name: tensor}`` used in place of those parameters."""
        model = self.model if model is None else model

        def run(inp):
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

    def verify_on_twin(self, x: torch.Tensor) -> bool:
        """The layer check, run on a perturbed copy of the model (up to 8 examples of ``x``), its outcome
        (layers moved to the fallback, in-place copies) taken over and remembered for this model structure.
        Which layers capture exactly is a property of the model's code, not of its values, and values such
        as a zero-initialised head (torchvision's ViT) make gradients zero, so a check on the model itself
        could decide nothing. True when the plan changed (the caller recomputes its block)."""
        twin = copy.deepcopy(self.model)
        gen = torch.Generator(device="cpu").manual_seed(98)
        with torch.no_grad():
            for t in twin.parameters():
                noise = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device, t.dtype)
                t.add_(noise * (0.5 * float(t.abs().mean()) + 0.1))
        other = Featurizer(twin, self.implementation, self.kernel, None)  # "auto" is "layerwise" here: no switch
        other.is_twin = True
        other.checked_mixing = True  # this block passed the check already
        other.pairs_per_example = self.pairs_per_example
        other.channels_last = self.channels_last
        with torch.enable_grad():
            for _ in range(len(other.plans) + 2):  # each round moves at least one layer, or ends
                if other._features(x[: min(x.shape[0], 8)]) is not None or other.verified:
                    break
        _VERIFIED.pop(twin, None)
        if not other.verified:
            return False  # undecided (e.g. a layer whose gradient stays zero): the check runs here instead
        names = {n for n, m in capture_modules(twin) if id(m) in other.excluded}
        copies = {p.name: (p.copy_input, p.copy_output) for p in other.plans}
        before = [p.name for p in self.plans]
        self.excluded = {id(m) for n, m in capture_modules(self.model) if n in names}
        self.plans, self.generic = plan_layers(self.model, self.implementation, self.excluded)
        for p in self.plans:
            p.copy_input, p.copy_output = copies.get(p.name, (False, False))
        switched = self._mark_verified()
        return switched or [p.name for p in self.plans] != before

    def _auto_choice(self) -> bool:
        """``implementation="auto"`` once the layer check is done: one whole-model Jacobian when the fallback
        would hold at least :data:`AUTO_JACOBIAN_SHARE` of the parameters. True when it switched."""
        if not self.auto or not self.plans or not self.generic:
            return False
        sizes = {n: p.numel() for n, p in self.model.named_parameters() if p.requires_grad}
        copies = set(self.per_example_copies(getattr(self, "_block", None)))  # these need no torch.func pass
        share = sum(sizes[n] for n in self.generic if n not in copies) / sum(sizes.values())
        if share < AUTO_JACOBIAN_SHARE:
            self.auto_reason = f"layerwise: {share:.0%} of the parameters on the fallback"
            return False
        self.auto_reason = (f"jacobian: {share:.0%} of the parameters would be on the fallback "
                            f"(>= {AUTO_JACOBIAN_SHARE:.0%}), whose pass costs about one whole-model Jacobian")
        self.plans, self.generic = plan_layers(self.model, "jacobian")
        return True

    def _mark_verified(self) -> bool:
        """Record the layer check's outcome for this model structure; True when ``auto`` then switched to the
        whole-model Jacobian (the caller recomputes its block with the new plan)."""
        self.verified = True
        names = frozenset(n for n, m in capture_modules(self.model) if id(m) in self.excluded)
        copies = {p.name: (p.copy_input, p.copy_output) for p in self.plans if p.copy_input or p.copy_output}
        _VERIFIED[self._user_model] = (_fingerprint(self._user_model, self.implementation), names, copies)
        return self._auto_choice()

    def _exclude(self, bad) -> None:
        self.excluded |= {id(p.module) for p in bad}
        copies = {p.name: (p.copy_input, p.copy_output) for p in self.plans}
        self.plans, self.generic = plan_layers(self.model, self.implementation, self.excluded)
        for p in self.plans:
            p.copy_input, p.copy_output = copies.get(p.name, (False, False))
        self.verified = False

    def _generic_jacobian(self, x: torch.Tensor) -> torch.Tensor:
        """[b, k, P] per-example Jacobians for the fallback parameters only (in ``self.generic`` order):
        per-example copies where they apply (:meth:`per_example_copies`), torch.func for the rest."""
        copies = self.per_example_copies(x)
        captured, self._captured_copies = self._captured_copies, None
        if not copies:
            return self._torch_func_jacobian(x, self.generic)
        rest = [n for n in self.generic if n not in copies]
        if (captured is not None and set(captured) == set(copies)
                and all(t.shape[0] == x.shape[0] for t in captured.values())):
            parts = dict(captured)  # from the capture's own backward passes
        elif rest:
            # a torch.func pass runs anyway, and its cost hardly depends on how many parameters it covers:
            # a separate copies pass (a forward and k backwards) would only add to it
            return self._torch_func_jacobian(x, self.generic)
        else:
            parts = dict(zip(copies, self._copy_jacobian(x, copies)))  # instead of any torch.func pass
        if rest:
            J = self._torch_func_jacobian(x, rest)
            start = 0
            named = dict(self.model.named_parameters())
            for n in rest:
                parts[n] = J[:, :, start:start + named[n].numel()]
                start += named[n].numel()
        return torch.cat([parts[n] for n in self.generic], -1)

    def per_example_copies(self, x: torch.Tensor | None = None) -> list[str]:
        """Fallback parameters whose per-example gradients one forward gives when the parameter is replaced
        by ``b`` copies of itself (``[1, ...] -> [b, ...]``, else ``[...] -> [b, ...]``): class tokens,
        positional embeddings, layer scales, hand-written biases — parameters the model only broadcasts
        against the batch. Autograd's gradient of each copy is then that example's gradient, without a
        whole-model torch.func pass. Decided once per model structure on a few examples of ``x``: the
        substituted forward must run and the per-example gradients, weighted by random example weights
        and output weights, must equal autograd's gradient of the same weighted sum through the model
        itself (an op that mixed the copies between examples fails it). ``[]`` without ``x`` before that."""
        fp = (_fingerprint(self._user_model, "copies"), self.dtype)
        known = _COPYABLE.get(self._user_model)
        shape = None if x is None else (tuple(x.shape[1:]), x.dtype)
        if known is None or known[0] != fp or (x is not None and known[1] != shape):
            known = (fp, shape, {})  # name -> passed the check
        decided = known[2]
        todo = [n for n in self.generic if n not in decided]
        if todo and x is not None:
            # checked on a perturbed copy of the model: whether copies work is a property of the code, and
            # values such as a zero-initialised head (torchvision's ViT) would make every gradient zero
            twin = copy.deepcopy(self.model)
            gen = torch.Generator(device="cpu").manual_seed(99)
            with torch.no_grad():
                for t in twin.parameters():
                    noise = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device, t.dtype)
                    t.add_(noise * (0.5 * float(t.abs().mean()) + 0.1))
            named = dict(twin.named_parameters())
            probe = x[: min(x.shape[0], 4)]
            for n in todo:
                decided[n] = False
                if named[n].numel() * probe.shape[0] > COPY_MAX_ELEMENTS or named[n].dim() == 0:
                    continue
                try:
                    J = self._copy_jacobian(probe, [n], twin)[0]
                except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                    if isinstance(exc, torch.cuda.OutOfMemoryError):
                        raise
                    continue
                decided[n] = self._copy_check(probe, n, J, twin)
            _COPYABLE[self._user_model] = (fp, shape, decided)
        return [n for n in self.generic if decided.get(n)]

    def _copy_leaves(self, x: torch.Tensor) -> dict | None:
        """For the capture forward of a verified plan: ``{name: [b, ...] leaf}`` copies of the fallback
        parameters that take them, so the capture's own k backward passes give their per-example gradients
        (kept in ``_captured_copies`` for :meth:`_generic_jacobian`); None when there are none."""
        self._subs = None
        if not (self.verified and self.generic):
            return None
        names = self.per_example_copies()
        if not names:
            return None
        self._subs = _per_example_leaves(dict(self.model.named_parameters()), names, x.shape[0])
        return self._subs

    def keep_copy_grads(self, per_output: list[list[torch.Tensor]]) -> None:
        """``per_output[j][a]``: output a's gradient of copy leaf j (``[b, ...]``) from the capture's backward
        passes -> ``_captured_copies`` ``{name: [b, k, numel]}``."""
        b = next(iter(self._subs.values())).shape[0]
        self._captured_copies = {n: torch.stack([g.reshape(b, -1) for g in cols], 1)
                                 for n, cols in zip(self._subs, per_output)}
        self._subs = None

    @torch.enable_grad()
    def _copy_jacobian(self, x: torch.Tensor, names: list[str], model: nn.Module | None = None) -> list[torch.Tensor]:
        """``[b, k, numel]`` per parameter of ``names``: one forward with per-example copies, k backwards."""
        model = self.model if model is None else model
        b = x.shape[0]
        subs = _per_example_leaves(dict(model.named_parameters()), names, b)
        out = self._call(x, subs=subs, model=model).reshape(b, -1)
        k = out.shape[1]
        leaves = list(subs.values())
        cols: list = [[] for _ in leaves]
        for a in range(k):
            gs = torch.autograd.grad(out[:, a].sum(), leaves, retain_graph=a + 1 < k, allow_unused=True)
            for c, g, t in zip(cols, gs, leaves):
                c.append((torch.zeros_like(t) if g is None else g).reshape(b, -1))
        return [torch.stack(c, 1) for c in cols]

    @torch.enable_grad()
    def _copy_check(self, x: torch.Tensor, name: str, J: torch.Tensor, model: nn.Module) -> bool:
        """``sum_i w_i v . J_i`` from the copies against autograd's gradient of ``sum_i w_i v . f(x_i)``."""
        gen = torch.Generator(device="cpu").manual_seed(4321)
        b, k = J.shape[:2]
        w = torch.randn(b, generator=gen, dtype=torch.float64).to(J.device, J.dtype)
        v = torch.randn(k, generator=gen, dtype=torch.float64).to(J.device, J.dtype)
        mine = torch.einsum("i,a,iap->p", w, v, J)
        p = dict(model.named_parameters())[name]
        out = self._call(x, model=model).reshape(b, -1)
        theirs, = torch.autograd.grad((out * w[:, None] * v[None, :]).sum(), [p], allow_unused=True)
        if theirs is None or not bool(mine.any()):
            return False  # unused, or the substituted copies were not what the model read (e.g. nn.LSTM)
        theirs = theirs.reshape(-1)
        # relative to the gradient's size (no absolute floor: a small gradient must still match)
        rtol = 1e-4 if theirs.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-10
        return float((mine - theirs).norm()) <= rtol * float(theirs.norm())

    def _torch_func_jacobian(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """[b, k, P] per-example Jacobians of the parameters ``names`` by torch.func (or an exact loop)."""
        from torch.func import functional_call, jacrev, vmap

        named = dict(self.model.named_parameters())
        b = x.shape[0]
        if not getattr(self, "_vmap_failed", False):
            sub = {n: named[n].detach() for n in names}

            def f(p, xi):
                return functional_call(self.model, p, (xi.unsqueeze(0),)).reshape(-1)

            try:
                with torch.enable_grad():
                    J = vmap(jacrev(f), in_dims=(None, 0))(sub, x)
                return torch.cat([J[n].reshape(b, J[n].shape[1], -1) for n in names], -1)
            except (RuntimeError, NotImplementedError):
                # some ops have no (correct) batching rule (e.g. PReLU's backward): exact loop instead
                self._vmap_failed = True
        from .. import reference

        with torch.enable_grad():  # the exact per-example, per-output autograd loop
            return reference.jacobian_rows(self.model, [x], params=[named[n] for n in names])


# Per model: (structure fingerprint, names of the modules moved to the fallback) once the layerwise
# gradients were checked against autograd (first block of the first call). Whether a weight is also used
# outside its module is a property of the model's code, so later calls on the same structure skip the
# extra backward pass; any change of modules or parameters (objects, shapes, requires_grad) redoes it.
_VERIFIED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
# Per model: (fingerprint, input shape and dtype, {fallback parameter name: whether its per-example copies passed
# the check}).
_COPYABLE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
# Per-example copies of one parameter beyond this many elements (b x numel) stay on torch.func.
COPY_MAX_ELEMENTS = 1 << 24
# Per model: the key (structure, train/eval flags, input shape/dtype/device) of its last passed batch-mixing check.
_MIXING_CHECKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _per_example_leaves(named: dict, names: list[str], b: int) -> dict:
    """``{name: leaf}``: ``b`` copies of each parameter, ``[1, ...] -> [b, ...]`` or ``[...] -> [b, ...]``."""
    subs = {}
    for n in names:
        p = named[n].detach()
        if p.shape[0] == 1:
            subs[n] = p.expand(b, *p.shape[1:]).clone().requires_grad_()
        else:
            subs[n] = p.unsqueeze(0).expand(b, *p.shape).clone().requires_grad_()
    return subs


def _fingerprint(model: nn.Module, implementation: str) -> tuple:
    return (implementation,
            tuple((n, id(m), type(m)) for n, m in model.named_modules()),
            # dtype and device too: which kernels run (e.g. nn.LSTM's) may differ between them
            tuple((n, id(p), tuple(p.shape), p.requires_grad, p.dtype, str(p.device))
                  for n, p in model.named_parameters()))


def _materialized_numel(a: torch.Tensor, g: torch.Tensor) -> int:
    b, k, G, do, _ = g.shape
    return b * k * G * do * a.shape[2]


def _close(mine: torch.Tensor, theirs: torch.Tensor) -> bool:
    scale = float(theirs.abs().max()) if theirs.numel() else 0.0
    tol = (1e-3 if theirs.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-8) * (1.0 + scale)
    return mine.shape == theirs.shape and float((mine - theirs).abs().max()) <= tol * max(1.0, mine.shape[0] ** 0.5)


def default_block_size(n: int, k: int) -> int:
    """About four blocks a side (tiles with i <= j only: ~half the pair work of one n x n tile), at least
    32 examples (GEMM efficiency), at most 1024 and ``8192 / k`` (a [b k, b k] tile stays <= 256 MB)."""
    return int(max(1, min(max(32, -(-n // 4)), 1024, max(1, 8192 // max(1, k)))))


def _one_trace_block(fz: "Featurizer", x_all: torch.Tensor, block_size: int | None) -> bool:
    """Whether the trace kernel is computed as one block (see :meth:`Featurizer.trace_block_limit`)."""
    n = x_all.shape[0]
    return block_size >= n if block_size is not None else n <= fz.trace_block_limit(x_all)


def _output_size(fz: "Featurizer", x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(fz._call(fz._prepare(x[:1], check=False)).reshape(1, -1).shape[1])


def _naive(model, loader, kernel, dtype, loader2=None):
    from .. import reference

    m = model if dtype is None else copy.deepcopy(model).to(dtype)
    xs = [x.to(dtype) if (dtype is not None and x.is_floating_point()) else x
          for x in iter_inputs(loader, model_device(m))]
    _guard_naive(m, xs)
    if loader2 is not None:
        if kernel == "diagonal":
            raise ValueError("a cross kernel K(X1, X2) has no diagonal blocks: use kernel='full' or 'trace'")
        xs2 = [x.to(dtype) if (dtype is not None and x.is_floating_point()) else x
               for x in iter_inputs(loader2, model_device(m))]
        _guard_naive(m, xs2)
        K = reference.ntk_cross(m, xs, xs2, kernel=kernel)
    else:
        K = reference.ntk_gram(m, xs, kernel=kernel)
    return _finite(K.to(dtype or next(p.dtype for p in model.parameters())))


def _guard_naive(model: nn.Module, xs: list) -> None:
    """The checks the other implementations run (Featurizer), before the naive loop touches the model."""
    check_per_example(model)
    trainable_params(model)
    if not xs:
        raise ValueError("the probe set is empty")
    check_probe_inputs(model, torch.cat(xs) if len(xs) > 1 else xs[0])


@torch.enable_grad()  # per-example gradients need autograd, also when called under no_grad (a probe)
def ntk_gram(model: nn.Module, loader, *, kernel: str = "full", implementation: str = "auto",
             dtype: torch.dtype | None = None, block_size: int | None = None, progress: bool = False,
             backend: str | None = None, max_cache_bytes: int = DEFAULT_CACHE_BYTES, output=None,
             loader2=None, by_layer: bool = False, out=None, process_group=None, gather: str | None = None):
    """Empirical neural tangent kernel of ``model`` on every example of ``loader``.

    ``K[i, a, j, b] = <d f_a(x_i) / d theta, d f_b(x_j) / d theta>`` over all trainable parameters
    (``requires_grad=True``), with ``f(x)`` flattened to ``[b, k]`` (k = 1 for outputs ``[b]`` / ``[b, 1]``).

    kernel: ``"full"`` -> ``[n, k, n, k]``; ``"trace"`` -> ``[n, n]`` (sum over a = b);
    ``"diagonal"`` -> ``[n, k, k]`` (the per-example blocks).

    by_layer: ``{parameter group: K_l}`` with ``K = sum_l K_l``, one kernel per module owning trainable
    parameters (its qualified name; the per-layer terms the engine forms anyway), tile by tile.

    loader2: a second set of examples gives the cross kernel ``K(X1, X2)``: ``[n1, k, n2, k]`` (full) or
    ``[n1, n2]`` (trace), e.g. test points against training points for kernel predictions; streamed in
    tiles like the Gram (the second set's block features are kept while they fit ``max_cache_bytes``).

    implementation:
      ``"naive"``     one autograd call per example and output (the spec; O(n k) backward passes).
      ``"jacobian"``  per-block Jacobians by ``torch.func.vmap(jacrev)``, then ``J_I J_J^T`` per tile pair.
                      Memory ``block * k * p``; wins for small models and many outputs per parameter.
      ``"layerwise"`` one forward + k backward passes per block capture layer inputs and output gradients;
                      per layer, a cost model picks the ghost form (``G S^2 (d_in + k^2 d_out)`` flops per
                      example pair; few positions S, wide layers: MLPs, last ResNet stages) or materialized
                      per-example gradients (``k^2 G d_in d_out``; many positions, narrow layers: early convs).
                      Modules it does not know get exact torch.func Jacobians for their parameters only.
                      The cost model also charges forming per-example gradients (``k S G d_in d_out`` per
                      example, spread over its ~n/2 pairs).
      ``"auto"``      layerwise.

    output: for a model returning a tuple, list or dict, which element the kernel is of: an index, a key,
    or a callable (``output=lambda out: out.logits``).

    dtype: compute precision (default: the parameters' dtype, float32 without tf32). float64 gives
    ~1e-15 relative error; float32 ~5e-8 (at most 8.3e-8 on the test zoo); bfloat16 ~3e-3.
    block_size: examples per tile (memory of a tile is ``(block k)^2``; default :func:`default_block_size`). Per-block features are kept while they
    fit ``max_cache_bytes`` and recomputed for each row of tiles otherwise, so memory beyond the result is
    bounded. The model must not mix examples (eval mode for BatchNorm, no dropout).

    ``kernel="trace"`` runs as one block while all n examples fit :data:`TRACE_BLOCK_BYTES` (estimated
    from one example; or when ``block_size >= n``): ``K = sum_a K_a``, so output ``a``'s backward pass is
    reduced into the kernel and dropped before the next one (per-example gradients formed one output at a
    time, ghost layers accumulating ``sum_a g_a g_a^T``, symmetric products on row blocks i <= j), on
    channels-last activations for convolutional models. Beyond that, tiles as for the full kernel.

    out: a path: the kernel is written tile by tile into a memory-mapped ``.npy`` file (float32/float64) and
    returned as a read-only ``numpy.memmap``, so a kernel larger than memory can be computed and read back
    lazily (memory: the features of the blocks in use and one tile).

    process_group: a ``torch.distributed`` group (or ``"world"``): each rank passes its own shard (possibly
    empty); inputs are gathered in rank order and the ``i <= j`` tiles split over the ranks by their work.
    With ``out=`` (a file every rank can reach) each rank writes its tiles and no rank holds the kernel;
    without, ``gather="rank0"`` returns the kernel on rank 0 (None elsewhere) and ``gather="all"`` on every
    rank.

    >>> K = ntk_gram(model, x, kernel="trace")     # [n, n]
    >>> K = ntk_gram(model, x, kernel="full", out="K.npy")   # numpy.memmap [n, k, n, k] on disk
    """
    _check_args(kernel, implementation, block_size, max_cache_bytes, dtype)
    model = select_output(model, output)
    if implementation == "naive":
        if out is not None or process_group is not None:
            raise ValueError("implementation='naive' (the spec) runs in one process into memory: out= and "
                             "process_group= take 'auto', 'layerwise' or 'jacobian'")
        return _naive(model, loader, kernel, dtype, loader2)
    from .. import _dist

    group = _dist.resolve(process_group)
    if gather not in (None, "rank0", "all"):
        raise ValueError(f"gather must be None, 'rank0' or 'all', got {gather!r}")
    if (out is not None or group is not None) and (by_layer or loader2 is not None):
        raise ValueError("out= and process_group= take one example set and by_layer=False")
    if group is not None and out is None and gather is None:
        raise ValueError("with process_group=, pass out=PATH (each rank writes its tiles) or gather='rank0' / 'all' "
                         "(the whole kernel is sent to rank 0 / every rank)")
    fz = Featurizer(model, implementation, kernel, dtype)
    be = _ntk_backend(fz.device, backend, fz.dtype)
    if group is not None or out is not None:
        if group is not None:
            _dist.agree(group, "ntk_gram", model=_dist.structure(model), kernel=kernel, implementation=implementation,
                        dtype=str(fz.dtype), block_size=block_size, out=None if out is None else str(out),
                        gather=gather)
            x_all = _dist.gather_loader(loader, group, fz.device)
        else:
            x_all = all_inputs(loader, fz.device)
        return _gram_tiles(fz, x_all, kernel, block_size, be, group, out, gather, max_cache_bytes, progress)
    x_all = all_inputs(loader, fz.device)
    if by_layer and (kernel == "diagonal" or loader2 is not None):
        raise ValueError("by_layer=True takes kernel='full' or 'trace' and one example set")
    if loader2 is not None and kernel == "diagonal":
        raise ValueError("a cross kernel K(X1, X2) has no diagonal blocks: use kernel='full' or 'trace'")
    n = x_all.shape[0]
    if not (by_layer or loader2 is not None):
        fz.pairs_per_example = (n + 1) / 2
    path = choose_path(fz, x_all, kernel=kernel, implementation=implementation, block_size=block_size,
                       cross=loader2 is not None, by_layer=by_layer)
    if path.name == "by_layer":
        fz.by_layer = True
        return _gram_by_layer(fz, x_all, kernel, block_size, be)
    if path.name == "cross":
        return _cross_gram(fz, x_all, all_inputs(loader2, fz.device), kernel, block_size, be, max_cache_bytes,
                           progress)
    blocks, starts = blocks_of(x_all, path.block_size)
    with exact_fp32():
        if path.name == "trace_one_block":
            return _finite(fz.trace_gram(x_all, be))
        if path.name == "one_tile":
            # one tile: reduce each layer's features as soon as they exist (no [b, k, P] per layer kept)
            acc = {}

            def sink(f):
                t = feat.tile([f], [f], kernel, be) if be == "triton" else f.full(f)
                acc["K"] = t if "K" not in acc else acc["K"].add_(t)

            fz.stream(blocks[0], sink, acc.clear)
            return _finite(acc["K"].contiguous())
        if path.name == "diagonal":  # per-block features are used once: nothing is kept
            diags = []
            with Progress(len(blocks), "ntk features", progress) as bar:
                for x in blocks:
                    diags.append(feat.diagonal(fz(x)))
                    bar.update()
            return _finite(torch.cat(diags))
        # features beyond max_cache_bytes are recomputed for each row of tiles that needs them
        get = _BlockFeatures(fz, blocks, max_cache_bytes)

        K = None
        nb = len(blocks)
        with Progress(nb * (nb + 1) // 2, "ntk tiles", progress) as bar:
            for I in range(nb):
                fi = get(I)
                for J in range(I, nb):
                    t = feat.tile(fi, fi if J == I else get(J), kernel, be)
                    if K is None:
                        k = fz.k
                        K = torch.empty((n, k, n, k) if kernel == "full" else (n, n), dtype=fz.dtype,
                                        device=fz.device)
                    si, sj = slice(starts[I], starts[I + 1]), slice(starts[J], starts[J + 1])
                    if kernel == "full":
                        K[si, :, sj, :] = t
                        if I != J:
                            K[sj, :, si, :] = t.permute(2, 3, 0, 1)
                    else:
                        K[si, sj] = t
                        if I != J:
                            K[sj, si] = t.T
                    bar.update()
    return _finite(K)


def _gram_tiles(fz, x_all, kernel, block_size, be, group, out, gather, max_cache_bytes, progress):
    """``ntk_gram`` tile by tile into a memory-mapped file (``out``) and/or over ranks (``group``)."""
    import numpy as np

    from .. import _dist

    rank = 0 if group is None else _dist.rank_and_size(group)[0]
    n = x_all.shape[0]
    fz.pairs_per_example = (n + 1) / 2
    k = _output_size(fz, x_all)
    work = RankTiles([fz], x_all, kernel, block_size or default_block_size(n, k), group, max_cache_bytes)
    shape = {"full": (n, k, n, k), "trace": (n, n), "diagonal": (n, k, k)}[kernel]
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64}.get(fz.dtype)
    target = None
    if out is not None:
        if np_dtype is None:
            raise ValueError(f"out= writes float32 or float64 kernels, not {fz.dtype}: pass dtype=torch.float32")
        if rank == 0:
            np.lib.format.open_memmap(out, mode="w+", dtype=np_dtype, shape=shape).flush()
        if group is not None:
            _dist.barrier(group)
        target = np.load(out, mmap_mode="r+")
    tiles = []
    with exact_fp32(), Progress(len(work.tiles), "ntk tiles", progress) as bar:
        for I, J, (fi,), (fj,) in work:
            si, sj = work.rows(I), work.rows(J)
            if kernel == "diagonal":
                t = _finite(feat.diagonal(fi))
            else:
                t = _finite(feat.tile(fi, fj, kernel, be))
            if target is None:
                tiles.append((I, J, t.cpu()))
            else:
                _put(target, kernel, si, sj, t.cpu().numpy())
            bar.update()
    if target is not None:
        target.flush()
        del target
        if group is not None:
            _dist.barrier(group)
        return np.load(out, mmap_mode="r")
    everyone = _dist.gather_objects(tiles, group) if group is not None else [tiles]
    if group is not None and gather == "rank0" and rank != 0:
        return None
    K = torch.empty(shape, dtype=fz.dtype)
    for part in everyone:
        for I, J, t in part:
            _put(K, kernel, work.rows(I), work.rows(J), t)
    return K.to(fz.device)


def _put(K, kernel, si, sj, t) -> None:
    """Tile ``t`` at rows ``si``, columns ``sj`` of ``K`` (torch or numpy), and its mirror image."""
    if kernel == "diagonal":
        K[si] = t
    elif kernel == "full":
        K[si, :, sj, :] = t
        if si != sj:
            K[sj, :, si, :] = t.transpose(2, 3, 0, 1) if not isinstance(t, torch.Tensor) else t.permute(2, 3, 0, 1)
    else:
        K[si, sj] = t
        if si != sj:
            K[sj, si] = t.T


def _alignment_sharded(fz, fz0, x_all, kernel, centered, block_size, be, group, max_cache_bytes,
                       by_layer: bool = False):
    """``ntk_alignment`` over ranks: this rank's share of the tile pairs, then the exact sums of all ranks
    (``by_layer``: one set of sums per parameter group, reduced in name order). ``group=None``: one process
    walks every tile (the by-layer path)."""
    from .. import _dist

    n = x_all.shape[0]
    fz.pairs_per_example = fz0.pairs_per_example = (n + 1) / 2
    k = _output_size(fz, x_all)
    if by_layer:
        fz.by_layer = fz0.by_layer = True
    work = RankTiles([fz, fz0], x_all, kernel, block_size or default_block_size(n, k), group, max_cache_bytes)
    sums: dict = {}

    def add(name, Kt, K0, I, J):
        if name not in sums:
            sums[name] = AlignmentSums(n, 1 if kernel == "trace" else k, kernel, centered, fz.device)
        sums[name].add(Kt, K0.to(fz.device), work.rows(I), work.rows(J), I != J)

    with exact_fp32():
        for I, J, (fi, fi0), (fj, fj0) in work:
            if kernel == "diagonal":
                add(None, feat.diagonal(fi), feat.diagonal(fi0), I, I)
            elif by_layer:
                tt, t0 = _layer_tiles(fi, fj, kernel, be), _layer_tiles(fi0, fj0, kernel, be)
                if set(tt) != set(t0):
                    raise ValueError("the model's and the reference's parameter groups differ: "
                                     f"{sorted(set(tt) ^ set(t0))}")
                for name in tt:
                    add(name, tt[name], t0[name], I, J)
            else:
                add(None, feat.tile(fi, fj, kernel, be), feat.tile(fi0, fj0, kernel, be), I, J)
    # every rank reduces the same names in the same order (a rank without tiles has none of its own)
    names = [None] if not by_layer else sorted(sums, key=str) if group is None else sorted(
        {name for part in _dist.gather_objects(sorted(sums, key=str), group) for name in part}, key=str)
    for name in names:
        if name not in sums:
            sums[name] = AlignmentSums(n, 1 if kernel == "trace" else k, kernel, centered, fz.device)
        if group is not None:
            _dist.reduce_alignment_sums(sums[name], group)
    if not by_layer:
        return sums[None].alignment()
    return {name: sums[name].alignment(f"the tangent kernel of {name}") for name in names}


class _BlockFeatures:
    """Features of block I on demand: kept while they fit ``max_bytes``, recomputed otherwise, so memory
    beyond the result stays bounded whatever n is."""

    def __init__(self, fz: "Featurizer", blocks: list, max_bytes: int):
        self.fz, self.blocks, self.room, self.cache = fz, blocks, max_bytes, {}

    def __call__(self, I: int) -> list:
        if I in self.cache:
            return self.cache[I]
        f = self.fz(self.blocks[I])
        size = sum(t.nbytes for t in f)
        if size <= self.room:
            self.cache[I] = f
            self.room -= size
        return f


def _layer_tiles(fi: list, fj: list, kernel: str, be: str) -> dict:
    """Per parameter group (feature name): its tile between two blocks."""
    out: dict = {}
    for a, b in zip(fi, fj):
        t = feat.tile([a], [b], kernel, be)
        out[a.name] = t if a.name not in out else out[a.name].add_(t)
    return out


def _block_pairs(n: int, bs: int):
    starts = list(range(0, n, bs)) + [n]
    nb = len(starts) - 1
    for I in range(nb):
        for J in range(I, nb):
            yield I, J, slice(starts[I], starts[I + 1]), slice(starts[J], starts[J + 1])


def _gram_by_layer(fz: "Featurizer", x: torch.Tensor, kernel: str, block_size: int | None, be: str) -> dict:
    n = x.shape[0]
    bs = block_size or default_block_size(n, _output_size(fz, x))
    fz.pairs_per_example = (n + 1) / 2
    feats, K = _BlockFeatures(fz, list(x.split(bs)), DEFAULT_CACHE_BYTES), {}
    with exact_fp32():
        for I, J, si, sj in _block_pairs(n, bs):
            fi = feats(I)
            for name, t in _layer_tiles(fi, fi if I == J else feats(J), kernel, be).items():
                if name not in K:
                    k = fz.k
                    K[name] = torch.zeros((n, k, n, k) if kernel == "full" else (n, n), dtype=fz.dtype,
                                          device=fz.device)
                if kernel == "full":
                    K[name][si, :, sj, :] = t
                    if I != J:
                        K[name][sj, :, si, :] = t.permute(2, 3, 0, 1)
                else:
                    K[name][si, sj] = t
                    if I != J:
                        K[name][sj, si] = t.T
    return {name: _finite(k) for name, k in K.items()}


class KernelOperator:
    """``Q -> K Q`` for the NTK of ``model`` on ``x`` without forming ``K``: features of every block are formed
    once (kept within ``max_cache_bytes``, else recomputed) and each product runs over tiles ``I <= J``
    (``K_JI = K_IJ^T``). ``Q``: ``[N, p]`` with ``N = n`` (trace) or ``n k`` (full, rows (example, output)).
    Memory: the cached features, one tile, and ``Q``."""

    def __init__(self, model: nn.Module, x: torch.Tensor, *, kernel: str = "trace", implementation: str = "auto",
                 dtype: torch.dtype | None = None, block_size: int | None = None, backend: str | None = None,
                 max_cache_bytes: int = DEFAULT_CACHE_BYTES):
        if kernel not in ("trace", "full"):
            raise ValueError(f"kernel must be 'trace' or 'full', got {kernel!r}")
        _check_args(kernel, implementation, block_size, max_cache_bytes, dtype)
        self.fz = Featurizer(model, implementation, kernel, dtype)
        self.be = _ntk_backend(self.fz.device, backend, self.fz.dtype)
        self.x, self.kernel = x.to(self.fz.device), kernel
        n = x.shape[0]
        self.k = _output_size(self.fz, self.x)
        self.fz.pairs_per_example = (n + 1) / 2
        bs = block_size or default_block_size(n, self.k)
        self.starts = list(range(0, n, bs)) + [n]
        self._feats = _BlockFeatures(self.fz, list(self.x.split(bs)), max_cache_bytes)
        self.N = n * (self.k if kernel == "full" else 1)

    @torch.enable_grad()
    def __call__(self, Q: torch.Tensor) -> torch.Tensor:
        Q = Q.to(self.fz.device, torch.float64)
        if Q.shape[0] != self.N:
            raise ValueError(f"Q must have {self.N} rows, got {tuple(Q.shape)}")
        m = self.k if self.kernel == "full" else 1
        out = torch.zeros_like(Q)
        nb = len(self.starts) - 1
        with exact_fp32():
            for I in range(nb):
                fi = self._feats(I)
                ri = slice(self.starts[I] * m, self.starts[I + 1] * m)
                for J in range(I, nb):
                    t = feat.tile(fi, fi if J == I else self._feats(J), self.kernel, self.be).detach().double()
                    t = t.reshape(t.shape[0] * m, -1)
                    rj = slice(self.starts[J] * m, self.starts[J + 1] * m)
                    out[ri] += t @ Q[rj]
                    if J != I:
                        out[rj] += t.T @ Q[ri]
        return out


def _cross_gram(fz: "Featurizer", x1: torch.Tensor, x2: torch.Tensor, kernel: str, block_size: int | None, be: str,
                max_cache_bytes: int, progress: bool) -> torch.Tensor:
    """``K(X1, X2)``: every tile (I of X1, J of X2); X2's block features cached within the budget."""
    if x1.shape[1:] != x2.shape[1:]:
        raise ValueError(f"the two example sets differ in shape: {tuple(x1.shape[1:])} vs {tuple(x2.shape[1:])}")
    n1, n2 = x1.shape[0], x2.shape[0]
    fz.pairs_per_example = n2  # each example of X1 meets every example of X2
    bs = block_size or default_block_size(max(n1, n2), _output_size(fz, x1))
    b1, b2 = list(x1.split(bs)), list(x2.split(bs))
    s1, s2 = [0], [0]
    for b, s in ((b1, s1), (b2, s2)):
        for x in b:
            s.append(s[-1] + x.shape[0])
    get = _BlockFeatures(fz, b2, max_cache_bytes)

    K = None
    with exact_fp32(), Progress(len(b1) * len(b2), "ntk cross tiles", progress) as bar:
        for I, xi in enumerate(b1):
            fi = fz(xi)
            for J in range(len(b2)):
                t = feat.tile(fi, get(J), kernel, be)
                if K is None:
                    k = fz.k
                    K = torch.empty((n1, k, n2, k) if kernel == "full" else (n1, n2), dtype=fz.dtype, device=fz.device)
                si, sj = slice(s1[I], s1[I + 1]), slice(s2[J], s2[J + 1])
                if kernel == "full":
                    K[si, :, sj, :] = t
                else:
                    K[si, sj] = t
                bar.update()
    return _finite(K)


def _finite(K: torch.Tensor) -> torch.Tensor:
    K = K.detach()  # a kernel, not a node of an autograd graph (that would keep the graph alive)
    if not bool(torch.isfinite(K).all()):
        raise ValueError("the tangent kernel has NaN/inf entries (non-finite inputs, parameters or activations)")
    return K


@torch.enable_grad()
def ntk_alignment(model: nn.Module, loader, reference=None, *, kernel: str = "full", centered: bool = False,
                  implementation: str = "auto", block_size: int | None = None, dtype: torch.dtype | None = None,
                  max_cache_bytes: int = DEFAULT_CACHE_BYTES, progress: bool = False,
                  backend: str | None = None, output=None, by_layer: bool = False, process_group=None):
    """``KA(K_model, K_reference) = Tr[K K0] / (|K|_F |K0|_F)`` of the empirical NTKs on all examples.

    Computed tile by tile (``block_size`` examples a side) with float64 sums; no ``n x n`` (or
    ``nk x nk``) matrix is ever held, except for ``kernel="trace"`` while one block of all n examples
    fits :data:`TRACE_BLOCK_BYTES` (then both ``[n, n]`` kernels are formed one output at a time, as in
    :func:`ntk_gram`, and reduced at once). Per-block features (see :func:`ntk_gram`) are kept while they fit
    in ``max_cache_bytes``, otherwise recomputed for each tile pair, so memory is then set by
    ``block_size`` alone. ``centered=True`` centres both kernels over examples (CKA), still in one pass:
    the sums are error-free (:class:`lazyhasty.metrics._exact.AlignmentSums`), so nothing large cancels
    when the centred kernels are small against the uncentred ones. float32 kernels carry rounding of
    ~1e-7 of the uncentred kernel; a warning says when that limits the centred value (use float64).
    ``kernel="diagonal"`` aligns only the per-example ``[k, k]`` blocks. ``reference``: the model at
    init, a module of the same architecture or its state_dict; None (the two-argument call) for an
    ``AlphaScaled`` / ``Linearized`` model: its frozen initialization. ``output``: as in :func:`ntk_gram`.
    ``by_layer=True``: ``{parameter group: KA(K_t,l, K_0,l)}``, each layer's kernel aligned with its own at init.

    process_group: a ``torch.distributed`` group (or ``"world"``): each rank passes its own shard of the probe
    set (possibly empty); the inputs are gathered (inputs, not features, travel), the ``i <= j`` tile pairs
    split over the ranks by their work (:func:`lazyhasty._dist.balanced_tiles`), and the exact partial sums
    combined in rank order: the alignment over the union, the same on every rank.

    >>> ntk_alignment(model, probe, init_state_dict, kernel="trace")   # 1.0 at init
    """
    _check_args(kernel, implementation, block_size, max_cache_bytes, dtype)
    if kernel == "diagonal" and centered:
        raise ValueError("centered=True is not defined for kernel='diagonal' (only per-example blocks)")
    model, reference = model_and_reference(model, reference)  # None: an AlphaScaled/Linearized's init
    ref = select_output(as_reference_module(model, reference), output)
    model = select_output(model, output)
    if implementation == "naive":
        if process_group is not None:
            raise ValueError("implementation='naive' (the spec) runs in one process: process_group= takes 'auto', "
                             "'layerwise' or 'jacobian'")
        from .. import reference as R

        with _same_trainable(model, ref):
            xs = list(iter_inputs(loader, model_device(model)))
            _guard_naive(model, xs)
            _guard_naive(ref, [x.to(model_device(ref)) for x in xs])
            return R.ntk_alignment(model, xs, ref, kernel=kernel, centered=centered)
    from .. import _dist

    group = _dist.resolve(process_group)
    if group is not None and by_layer and kernel == "diagonal":
        raise ValueError("by_layer=True takes kernel='full' or 'trace'")
    with _same_trainable(model, ref):
        fz, fz0 = Featurizer(model, implementation, kernel, dtype), Featurizer(ref, implementation, kernel, dtype)
        be = _ntk_backend(fz.device, backend, fz.dtype)
        if group is not None:
            _dist.agree(group, "ntk_alignment", model=_dist.structure(model), reference=_dist.structure(ref),
                        kernel=kernel, centered=centered, implementation=implementation, dtype=str(fz.dtype),
                        block_size=block_size, by_layer=by_layer)
            x_all = _dist.gather_loader(loader, group, fz.device)
            return _alignment_sharded(fz, fz0, x_all, kernel, centered, block_size, be, group, max_cache_bytes,
                                      by_layer)
        x_all = all_inputs(loader, fz.device)
        n = x_all.shape[0]
        if by_layer and kernel == "diagonal":
            raise ValueError("by_layer=True takes kernel='full' or 'trace'")
        if not by_layer:
            fz.pairs_per_example = fz0.pairs_per_example = (n + 1) / 2
        path = choose_path(fz, x_all, kernel=kernel, implementation=implementation, block_size=block_size,
                           by_layer=by_layer, purpose="alignment", backend=be, centered=centered)
        if path.name == "by_layer":
            return _alignment_sharded(fz, fz0, x_all, kernel, centered, block_size, be, None, max_cache_bytes,
                                      by_layer=True)
        if path.name == "trace_one_block":
            # both [n, n] trace kernels of one block (one output at a time), reduced at once
            with exact_fp32():
                sums = AlignmentSums(n, 1, kernel, centered, fz.device)
                Kt = fz.trace_gram(x_all, be)
                sums.add(Kt, fz0.trace_gram(x_all.to(fz0.device), be).to(fz.device), slice(0, n), slice(0, n),
                         False)
            return sums.alignment()
        blocks, starts = blocks_of(x_all, path.block_size)
        with exact_fp32():
            first = (fz(blocks[0]), fz0(blocks[0].to(fz0.device)))
            per_block = sum(f.nbytes for f in first[0]) + sum(f.nbytes for f in first[1])
            cache = per_block * len(blocks) <= max_cache_bytes
            fused = be == "triton" and kernel != "diagonal" and not centered
    
            def prepare(f):
                if not fused:
                    return f
                # Triton: all-materialized blocks become one row matrix each, and the fused kernel reduces
                # K_t * K_0 tiles without writing them.
                rows = (feat.flat_rows(f[0], kernel), feat.flat_rows(f[1], kernel))
                return rows if rows[0] is not None and rows[1] is not None else f
    
            # block 0 is kept for the first row of tiles even without caching (it is not computed twice)
            cached = {0: prepare(first)}
    
            def get(I):
                if I in cached:
                    return cached[I]
                f = prepare((fz(blocks[I]), fz0(blocks[I].to(fz0.device))))
                if cache:
                    cached[I] = f
                return f
    
            sums = AlignmentSums(n, fz.k, kernel, centered, fz.device)
            nb = len(blocks)
            total = nb if kernel == "diagonal" else nb * (nb + 1) // 2
            with Progress(total, "ntk alignment", progress) as bar:
                for I in range(nb):
                    fi, fi0 = get(I)
                    if I == 1 and not cache:
                        cached.pop(0, None)
                    si = slice(starts[I], starts[I + 1])
                    if kernel == "diagonal":
                        sums.add(feat.diagonal(fi), feat.diagonal(fi0).to(fz.device), si, si, False)
                        bar.update()
                        continue
                    for J in range(I, nb):
                        fj, fj0 = (fi, fi0) if J == I else get(J)
                        if isinstance(fi, torch.Tensor):
                            from ._triton_ntk import alignment_partials
    
                            parts = alignment_partials(fi, fj, fi0.to(fz.device), fj0.to(fz.device), I == J,
                                                       _backend.triton_interpreted(),
                                                       fz.k if kernel == "trace" else 1)
                            sums.add_partials(parts, 2.0 if I != J else 1.0)
                        else:
                            Kt = feat.tile(fi, fj, kernel, be)
                            K0 = feat.tile(fi0, fj0, kernel, be).to(fz.device)
                            sums.add(Kt, K0, si, slice(starts[J], starts[J + 1]), I != J)
                        bar.update()
        return sums.alignment()
