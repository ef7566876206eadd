"""Empirical NTK Gram matrices and streamed NTK alignment (see :mod:`lazyhasty.ntk`)."""
from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass

import torch
from torch import nn

from .._malloc import retained_heap
from .._modes import measures
from .._loaders import all_inputs, as_reference_module, iter_inputs, model_and_reference, model_device
from .._precision import tf32_requested
from .args import DEFAULT_CACHE_BYTES, IMPLEMENTATIONS, KERNELS, check_args, ntk_backend  # noqa: F401
from .blocks import default_block_size, finite, one_trace_block, output_size  # noqa: F401
from .capture.mixing import check_per_example, check_probe_inputs
from .capture.plan import trainable_params
from .featurize import Featurizer
from .paths import choose_path
from .walk import (FORM_OF_PATH, AlignmentSink, ByLayerSink, GramSink, MemmapSink, OperatorSink, TileSink, Walk,
                   flat_rows_pair, fused_alignment, kernel_shape, place)
from .._outputs import current_call
from .._probing import probing, reapplying
from .._validate import check_model_inputs

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


def _tf32_option(fn):
    """An NTK entry point's ``tf32=`` keyword: its body runs under :func:`lazyhasty._precision.tf32_requested`
    (products and passes in TF32 on GPUs that have it; the layer checks stay in exact fp32)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with tf32_requested(kwargs.get("tf32", False)):
            return fn(*args, **kwargs)
    return wrapper


def _naive(model, loader, kernel, dtype, loader2=None):
    from . import naive as reference

    m = model if dtype is None else copy.deepcopy(model).to(dtype)
    xs = [x.to(dtype) if (dtype is not None and x.is_floating_point()) else x
          for x in iter_inputs(loader, model_device(m), same_shape=True)]
    _guard_naive(m, xs)
    if loader2 is not None:
        if kernel == "diagonal":
            raise ValueError("a cross kernel K(X1, X2) has no diagonal blocks: use kernel='full' or 'trace'")
        xs2 = [x.to(dtype) if (dtype is not None and x.is_floating_point()) else x
               for x in iter_inputs(loader2, model_device(m), same_shape=True)]
        _guard_naive(m, xs2)
        K = reference.ntk_cross(m, xs, xs2, kernel=kernel)
    else:
        K = reference.ntk_gram(m, xs, kernel=kernel)
    return finite(K.to(dtype or next(p.dtype for p in model.parameters())))


def _guard_naive(model: nn.Module, xs: list) -> None:
    """The checks the other implementations run (Featurizer), before the naive loop touches the model."""
    check_per_example(model)
    trainable_params(model)
    if not xs:
        raise ValueError("the probe set is empty")
    check_model_inputs(torch.cat(xs) if len(xs) > 1 else xs[0], model=model)
    check_probe_inputs(model, torch.cat(xs) if len(xs) > 1 else xs[0],
                       params=[p for p in model.parameters() if p.requires_grad])


@torch.enable_grad()  # per-example gradients need autograd, also when called under no_grad (a probe)
@measures("model")  # eval mode; the model's modes, buffers and RNG states restored after
@retained_heap()
@_tf32_option
@probing("model", loaders=("loader", "loader2"))  # named inputs and output= (lazyhasty._outputs)
def ntk_gram(model: nn.Module, loader, *, kernel: str = "full", implementation: str = "auto",
             dtype: torch.dtype | None = None, block_size: int | None = None, progress: bool = False,
             backend: str | None = None, max_cache_bytes: int = DEFAULT_CACHE_BYTES, output=None,
             loader2=None, by_layer: bool = False, out=None, process_group=None, gather: str | None = None,
             tf32: bool = False):
    """Empirical neural tangent kernel of ``model`` on every example of ``loader``.

    ``K = J J^T``, with ``J`` ``[n k, p]`` the Jacobian of the outputs ``f(x_i)`` (flattened to ``[k]``; k = 1
    for outputs ``[n]`` / ``[n, 1]``) with respect to the ``p`` trainable parameters (``requires_grad=True``):
    ``K[i, a, j, b] = <d f_a(x_i) / d theta, d f_b(x_j) / d theta>``. The kernel is of the network in eval
    mode (dropout off, BatchNorm on its running statistics), whatever mode the model is in; its modes,
    buffers and RNG states are restored after. A model that mixes examples in eval mode is refused.

    Args:
        model: the network (an ``nn.Module``). Its output is a tensor, or anything with ``logits`` (a Hugging
            Face ``ModelOutput``, a dict): those are taken; else pass ``output=``.
        loader: the examples: a tensor ``[n, ...]``, an iterable of batches (tensors, tuples/lists whose first
            element is the inputs, ``{"x": ...}``), or batches of **named inputs**: mappings of tensors
            (``{"input_ids": [b, L], "attention_mask": [b, L], "labels": [b]}``, or ``(mapping, labels)``;
            a mapping is also the whole set), passed to the model as keyword arguments. Their inputs are every
            key but ``labels`` / ``label`` / ``label_ids``; examples are counted along dim 0 of every input
            (the module ``lazyhasty._outputs``; docs: "Named inputs" in the guide).
        kernel: ``"full"`` -> ``[n, k, n, k]``; ``"trace"`` -> ``[n, n]`` (``sum_a K[i, a, j, a]``);
            ``"diagonal"`` -> ``[n, k, k]`` (the per-example blocks ``K[i, :, i, :]``).
        implementation: ``"naive"``: one autograd call per example and output (the spec; ``O(n k)``
            backward passes). ``"jacobian"``: per-block Jacobians by ``torch.func.vmap(jacrev)``, then
            ``J_I J_J^T`` per tile pair (memory ``block k p``; wins for small models and many outputs per
            parameter). ``"layerwise"``: one forward and k backward passes per block capture layer inputs and
            output gradients; per layer a cost model picks the ghost form (``G S^2 (d_in + k^2 d_out)`` flops
            per example pair: few positions S, wide layers) or materialized per-example gradients
            (``k^2 G d_in d_out``: many positions, narrow layers), and charges forming per-example gradients
            (``k S G d_in d_out`` per example, spread over its ~n/2 pairs); modules it does not know get exact
            torch.func Jacobians for their parameters only. ``"auto"``: layerwise or the whole-model Jacobian,
            by the cost model ([explain][lazyhasty.ntk.explain] says which and why).
        dtype: compute precision (default: the parameters' dtype). float64 gives ~1e-15 relative error,
            float32 ~5e-8 (at most 8.3e-8 on the test zoo), bfloat16 ~3e-3.
        block_size: examples per tile (a tile's memory is ``(block k)^2``; default
            ``lazyhasty.ntk.blocks.default_block_size``). Per-block features are kept while
            they fit ``max_cache_bytes`` and recomputed for each row of tiles otherwise, so memory beyond the
            result is bounded. ``kernel="trace"`` runs as one block while all n examples fit
            ``limits`` ``trace_block_bytes`` (estimated from one example; or when ``block_size >= n``): each output's
            backward pass is reduced into the kernel and dropped before the next one.
        progress: show a progress bar over the tiles.
        backend: the tile products' backend (default: Triton on GPUs that have it, else torch).
        max_cache_bytes: memory for kept block features.
        output: which tensor of a non-tensor output the kernel is of: an index, a key or attribute name, or a
            callable (``output=lambda out: out.hidden_states[-1]``).
        loader2: a second example set: the cross kernel ``K(X1, X2)``, ``[n1, k, n2, k]`` (full) or
            ``[n1, n2]`` (trace), e.g. test against training points; streamed in tiles like the Gram.
        by_layer: ``{module: K_l}`` with ``K = sum_l K_l``, one kernel per module owning trainable
            parameters, keyed by the model's own qualified name (``"features.0"``; ``""``: parameters of the
            model itself), the same keys whatever the implementation. A module whose parameters capture splits
            into several maps gets their sum under its own name: an ``nn.MultiheadAttention``'s packed input
            projection (its ``out_proj`` is a module of its own), an ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN``'s
            maps, a parameter the model multiplies directly under the module holding it, a parametrized weight
            under the module it is registered on.
        out: a path: the kernel is written tile by tile into a memory-mapped ``.npy`` file (float32 / float64)
            and returned as a read-only ``numpy.memmap`` (memory: the features of the blocks in use and one
            tile), so a kernel larger than memory can be computed and read back lazily.
        process_group: a ``torch.distributed`` group (or ``"world"``): each rank passes its own shard (possibly
            empty); the inputs (named inputs too) are gathered in rank order and the ``i <= j`` tiles split over
            the ranks by their work. With ``out=`` (a file every rank can reach) each rank writes its tiles.
        gather: with ``process_group`` and no ``out``: ``"rank0"`` returns the kernel on rank 0 (None
            elsewhere), ``"all"`` on every rank.
        tf32: on CUDA GPUs with TF32 tensor cores, a float32 call's GEMMs, convolutions and Triton dots use
            TF32 (10 of fp32's 23 mantissa bits); the layer checks of a first call still run in exact fp32, so
            the plan is the same. Its error is measured by
            ``tests/test_ntk.py::test_tf32_option_error_against_float64``. No effect on the CPU, for float64 /
            16-bit dtypes, or with ``implementation="naive"``.

    Returns:
        The kernel: ``[n, k, n, k]`` (full), ``[n, n]`` (trace), ``[n, k, k]`` (diagonal), ``[n1, k, n2, k]``
            / ``[n1, n2]`` with ``loader2``; a ``{module: kernel}`` dict with ``by_layer``; a ``numpy.memmap``
            with ``out``; ``None`` on ranks other than 0 with ``gather="rank0"``.

    Raises:
        ValueError: bad arguments, an empty probe set, non-finite inputs or outputs, a model that mixes
            examples (BatchNorm on batch statistics, active dropout), named inputs whose rows (dim 0) disagree
            (naming the keys) or batches with other keys or shapes.
        TypeError: an output that is neither a tensor nor has ``logits`` (without ``output=``), a named input
            that is not a tensor.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> K = ntk_gram(net, x)                             # full: [n, k, n, k]
        >>> K.shape
        torch.Size([5, 2, 5, 2])
        >>> Kt = ntk_gram(net, x, kernel="trace")            # [n, n] = sum over the outputs
        >>> bool(torch.allclose(Kt, K.diagonal(dim1=1, dim2=3).sum(-1)))
        True
        >>> sorted(ntk_gram(net, x, kernel="trace", by_layer=True))
        ['0', '2']
        >>> class Bag(torch.nn.Module):                      # a model called with keyword arguments
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.emb = torch.nn.Embedding(10, 4)
        ...     def forward(self, input_ids, attention_mask):
        ...         return (self.emb(input_ids) * attention_mask[..., None]).sum(1)
        >>> batch = {"input_ids": torch.randint(0, 10, (5, 6)), "attention_mask": torch.ones(5, 6),
        ...          "labels": torch.zeros(5)}               # "labels" is not an input
        >>> ntk_gram(Bag(), [batch], kernel="trace").shape   # [n, n]
        torch.Size([5, 5])
    """
    check_args(kernel, implementation, block_size, max_cache_bytes, dtype)
    check_model_inputs(None, model=model)
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
    be = ntk_backend(fz.device, backend, fz.dtype)
    if group is not None or out is not None:
        with _dist.failing_together(group, "ntk_gram"):
            if group is not None:
                _dist.agree(group, "ntk_gram", model=_dist.structure(model), kernel=kernel,
                            implementation=implementation, dtype=str(fz.dtype), block_size=block_size,
                            out=None if out is None else str(out), gather=gather, tf32=tf32)
                _dist.check_same_parameters(group, "ntk_gram", model)
                x_all = _dist.gather_loader(loader, group, fz.device)
            else:
                x_all = all_inputs(loader, fz.device)
            check_model_inputs(x_all, model=model)
            return _gram_tiles(fz, x_all, kernel, block_size, be, group, out, gather, max_cache_bytes, progress)
    x_all = all_inputs(loader, fz.device)
    check_model_inputs(x_all, model=model)
    if by_layer and (kernel == "diagonal" or loader2 is not None):
        raise ValueError("by_layer=True takes kernel='full' or 'trace' and one example set")
    if loader2 is not None and kernel == "diagonal":
        raise ValueError("a cross kernel K(X1, X2) has no diagonal blocks: use kernel='full' or 'trace'")
    n = x_all.shape[0]
    if not (by_layer or loader2 is not None):
        fz.plan_for_pairs((n + 1) / 2)
    path = choose_path(fz, x_all, kernel=kernel, implementation=implementation, block_size=block_size,
                       cross=loader2 is not None, by_layer=by_layer)
    call = Call(kernel, be, block_size, max_cache_bytes, progress,
                x2=None if loader2 is None else all_inputs(loader2, fz.device))
    return GRAM_RUNNERS[path.name]([fz], x_all, path, call)


@dataclass(frozen=True)
class Call:
    """What a path runner needs of a call besides its Featurizers and inputs (one runner signature:
    ``runner(featurizers, x_all, path, call)``)."""

    kernel: str
    backend: str
    block_size: int | None
    max_cache_bytes: int
    progress: bool | None
    x2: torch.Tensor | None = None  # a cross kernel's second example set
    centered: bool = False


def _gram_by_layer(fzs, x_all, path, call):
    fzs[0].by_layer = True
    walk = Walk(fzs, x_all, call.kernel, call.backend, call.block_size, max_cache_bytes=call.max_cache_bytes)
    return walk.run(ByLayerSink(walk), call.progress)


def _gram_cross(fzs, x_all, path, call):
    walk = Walk(fzs, x_all, call.kernel, call.backend, call.block_size, x2=call.x2,
                max_cache_bytes=call.max_cache_bytes)
    return walk.run(GramSink(walk), call.progress, "ntk cross tiles")


def _gram_walk(fzs, x_all, path, call):
    walk = Walk(fzs, x_all, call.kernel, call.backend, path.block_size, max_cache_bytes=call.max_cache_bytes,
                form=FORM_OF_PATH.get(path.name, "tiles"))
    return walk.run(GramSink(walk), call.progress, "ntk features" if call.kernel == "diagonal" else "ntk tiles")


def _alignment_by_layer(fzs, x_all, path, call):
    return _alignment_tiles(*fzs, x_all, call.kernel, call.centered, call.block_size, call.backend, None,
                            call.max_cache_bytes, by_layer=True)


def _alignment_one_block(fzs, x_all, path, call):
    # both [n, n] trace kernels of one block (one output at a time)
    walk = Walk(fzs, x_all, call.kernel, call.backend, form="one_output_at_a_time")
    return walk.run(AlignmentSink(walk, call.centered))


def _alignment_walk(fzs, x_all, path, call):
    fused = fused_alignment(call.backend, call.kernel, call.centered)
    walk = Walk(fzs, x_all, call.kernel, call.backend, path.block_size, max_cache_bytes=call.max_cache_bytes,
                prepare=functools.partial(flat_rows_pair, kernel=call.kernel) if fused else None)
    return walk.run(AlignmentSink(walk, call.centered), call.progress, "ntk alignment")


# Each path of paths.PATHS (but the naive spec, run before any Featurizer exists) and its runner, per entry point:
# the one dispatch of a call once choose_path has named its path.
GRAM_RUNNERS = {"by_layer": _gram_by_layer, "cross": _gram_cross, "trace_one_block": _gram_walk,
                "one_tile": _gram_walk, "diagonal": _gram_walk, "tiles": _gram_walk}
ALIGNMENT_RUNNERS = {"by_layer": _alignment_by_layer, "trace_one_block": _alignment_one_block,
                     "one_tile": _alignment_walk, "diagonal": _alignment_walk, "tiles": _alignment_walk}


def _gram_tiles(fz, x_all, kernel, block_size, be, group, out, gather, max_cache_bytes, progress):
    """``ntk_gram`` tile by tile into a memory-mapped file (``out``) and/or over ranks (``group``)."""
    import numpy as np

    from .. import _dist

    rank = 0 if group is None else _dist.rank_and_size(group)[0]
    n = x_all.shape[0]
    k = output_size(fz, x_all)
    walk = Walk([fz], x_all, kernel, be, block_size or default_block_size(n, k), group=group,
                max_cache_bytes=max_cache_bytes)
    shape = kernel_shape(kernel, n, k)
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64}.get(fz.dtype)
    if out is not None:
        if np_dtype is None:
            raise ValueError(f"out= writes float32 or float64 kernels, not {fz.dtype}: pass dtype=torch.float32")
        if rank == 0:
            np.lib.format.open_memmap(out, mode="w+", dtype=np_dtype, shape=shape).flush()
        if group is not None:
            _dist.barrier(group)
        target = walk.run(MemmapSink(np.load(out, mmap_mode="r+"), kernel), progress)
        del target
        if group is not None:
            _dist.barrier(group)
        return np.load(out, mmap_mode="r")
    tiles = walk.run(TileSink(cpu=True), progress)
    everyone = _dist.gather_objects(tiles, group) if group is not None else [tiles]
    if group is not None and gather == "rank0" and rank != 0:
        return None
    K = torch.empty(shape, dtype=fz.dtype)
    for part in everyone:
        for I, J, t in part:
            place(K, kernel, walk.blocks.rows(I), walk.blocks.rows(J), t, I != J and kernel != "diagonal")
    return K.to(fz.device)


def _alignment_tiles(fz, fz0, x_all, kernel, centered, block_size, be, group, max_cache_bytes,
                     by_layer: bool = False):
    """``ntk_alignment``'s walk of both kernels' tiles into exact sums: over ranks (``group``: this rank's share,
    then the sums of all ranks), or in one process (``group=None``; ``by_layer``: one set of sums per parameter
    group, reduced in name order)."""
    n = x_all.shape[0]
    k = output_size(fz, x_all)
    if by_layer:
        fz.by_layer = fz0.by_layer = True
    walk = Walk([fz, fz0], x_all, kernel, be, block_size or default_block_size(n, k), group=group,
                max_cache_bytes=max_cache_bytes)
    return walk.run(AlignmentSink(walk, centered, by_layer, group, k))


class KernelOperator:
    """``Q -> K Q`` for the NTK of ``model`` on ``x`` without forming ``K``: features of every block are formed
    once (kept within ``max_cache_bytes``, else recomputed) and each product runs over tiles ``I <= J``
    (``K_JI = K_IJ^T``). ``Q``: ``[N, p]`` with ``N = n`` (trace) or ``n k`` (full, rows (example, output)).
    Memory: the cached features, one tile, and ``Q``. ``x``: a tensor ``[n, ...]``, a dict of named inputs
    (passed to the model as keyword arguments, as in [ntk_gram][lazyhasty.ntk.ntk_gram]) or a loader; the
    model runs under that call (and its picked output) in every product."""

    @probing("model", loaders=("x",))  # named inputs (lazyhasty._outputs); kept for __call__
    def __init__(self, model: nn.Module, x: torch.Tensor, *, kernel: str = "trace", implementation: str = "auto",
                 dtype: torch.dtype | None = None, block_size: int | None = None, backend: str | None = None,
                 max_cache_bytes: int = DEFAULT_CACHE_BYTES):
        if kernel not in ("trace", "full"):
            raise ValueError(f"kernel must be 'trace' or 'full', got {kernel!r}")
        check_args(kernel, implementation, block_size, max_cache_bytes, dtype)
        self._probe_call, self._probe_model = current_call(model), model
        x = x if isinstance(x, torch.Tensor) else all_inputs(x, model_device(model))  # a loader (of named inputs)
        check_model_inputs(x, model=model)
        self.fz = Featurizer(model, implementation, kernel, dtype)
        self.be = ntk_backend(self.fz.device, backend, self.fz.dtype)
        self.x, self.kernel = x.to(self.fz.device), kernel
        self.k = output_size(self.fz, self.x)
        # one walk, run again for every product: its feature cache persists between them
        self._walk = Walk([self.fz], self.x, kernel, self.be, block_size or default_block_size(x.shape[0], self.k),
                          max_cache_bytes=max_cache_bytes)
        self.N = x.shape[0] * (self.k if kernel == "full" else 1)

    @torch.enable_grad()
    @retained_heap()
    @reapplying("self._probe_model")
    def __call__(self, Q: torch.Tensor) -> torch.Tensor:
        Q = Q.to(self.fz.device, torch.float64)
        if Q.shape[0] != self.N:
            raise ValueError(f"Q must have {self.N} rows, got {tuple(Q.shape)}")
        return self._walk.run(OperatorSink(Q, self.k if self.kernel == "full" else 1))


@torch.enable_grad()
@measures("model", "reference")  # eval mode; modes, buffers and RNG states restored after
@retained_heap()
@_tf32_option
@probing("model", reference="reference")  # named inputs and output= (lazyhasty._outputs)
def ntk_alignment(model: nn.Module, loader, reference=None, *, kernel: str = "full", centered: bool = False,
                  implementation: str = "auto", block_size: int | None = None, dtype: torch.dtype | None = None,
                  max_cache_bytes: int = DEFAULT_CACHE_BYTES, progress: bool = False,
                  backend: str | None = None, output=None, by_layer: bool = False, process_group=None,
                  tf32: bool = False):
    """Kernel alignment ``KA(K_t, K_0) = Tr[K_t K_0] / (|K_t|_F |K_0|_F)`` of the empirical NTKs of ``model`` and
    ``reference`` on all examples.

    Both kernels are ``K = J J^T`` as in [ntk_gram][lazyhasty.ntk.ntk_gram] (``[n k, n k]`` full, ``[n, n]``
    trace), computed tile by tile (``block_size`` examples a side) with float64 sums; no ``[n k, n k]`` (or
    ``[n, n]``) matrix is held, except for ``kernel="trace"`` while one block of all n examples fits
    ``limits`` ``trace_block_bytes`` (then both ``[n, n]`` kernels are formed one output at a time and reduced at once).
    Per-block features are kept while they fit ``max_cache_bytes``, otherwise recomputed for each tile pair,
    so memory is then set by ``block_size`` alone. The sums are error-free
    (``lazyhasty._exact.AlignmentSums``): with ``centered=True`` nothing large cancels when the
    centred kernels are small against the uncentred ones.

    Args:
        model: the network now. Its output is a tensor or has ``logits`` (a ``ModelOutput``); else ``output=``.
        loader: the probe examples: a tensor ``[n, ...]``, an iterable of batches, or batches of named inputs
            (mappings of tensors passed as keyword arguments; see [ntk_gram][lazyhasty.ntk.ntk_gram]).
        reference: the model at init: a module of the same architecture or its state_dict; ``None`` for an
            ``AlphaScaled`` / ``Linearized`` model (its frozen initialization).
        kernel: ``"full"``, ``"trace"`` or ``"diagonal"`` (only the per-example ``[k, k]`` blocks are aligned).
        centered: centre both kernels over examples (CKA), still in one pass. float32 kernels carry rounding of
            ~1e-7 of the uncentred kernel; a warning says when that limits the centred value (use float64).
        implementation: as in [ntk_gram][lazyhasty.ntk.ntk_gram].
        block_size: examples per tile side.
        dtype: compute precision (default: the parameters').
        max_cache_bytes: memory for kept block features (of both models).
        progress: show a progress bar over the tiles.
        backend: the tile products' backend.
        output: as in [ntk_gram][lazyhasty.ntk.ntk_gram].
        by_layer: ``{module: KA(K_t,l, K_0,l)}``, each module's kernel aligned with its own at init (the keys
            of [ntk_gram][lazyhasty.ntk.ntk_gram]'s ``by_layer``: the model's own names).
        process_group: a ``torch.distributed`` group (or ``"world"``): each rank passes its own shard of the
            probe set (possibly empty); the inputs are gathered (inputs, named inputs too, not features,
            travel), the ``i <= j`` tile pairs split over the ranks by their work
            (``lazyhasty._dist.balanced_tiles``), and the exact partial sums combined in rank
            order: the alignment over the union, the same on every rank.
        tf32: both kernels' products in TF32 on GPUs that have it (see [ntk_gram][lazyhasty.ntk.ntk_gram]);
            the float64 sums are unchanged.

    Returns:
        The alignment, a float in ``[-1, 1]`` (``[0, 1]`` uncentred: both kernels are positive semi-definite);
            with ``by_layer``, ``{module: float}``.

    Raises:
        ValueError: bad arguments (``centered`` with ``kernel="diagonal"``), a reference of another
            architecture, an empty probe set, named inputs whose rows disagree (naming the keys).
        TypeError: a plain module without ``reference``, an output that is neither a tensor nor has ``logits``
            (without ``output=``).

    Example:
        >>> import copy, torch
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
        >>> init = copy.deepcopy(net.state_dict())
        >>> x = torch.randn(16, 3, dtype=torch.float64)
        >>> ntk_alignment(net, x, init, kernel="trace")           # 1.0 at init
        1.0
        >>> with torch.no_grad():
        ...     _ = net[0].weight.mul_(3.0)
        >>> 0.0 < ntk_alignment(net, x, init, kernel="full") < 1.0
        True
    """
    check_args(kernel, implementation, block_size, max_cache_bytes, dtype)
    if kernel == "diagonal" and centered:
        raise ValueError("centered=True is not defined for kernel='diagonal' (only per-example blocks)")
    model, reference = model_and_reference(model, reference)  # None: an AlphaScaled/Linearized's init
    ref = as_reference_module(model, reference)
    check_model_inputs(None, model=model, reference=ref)
    if implementation == "naive":
        if process_group is not None:
            raise ValueError("implementation='naive' (the spec) runs in one process: process_group= takes 'auto', "
                             "'layerwise' or 'jacobian'")
        from . import naive as R

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
        be = ntk_backend(fz.device, backend, fz.dtype)
        if group is not None:
            with _dist.failing_together(group, "ntk_alignment"):
                _dist.agree(group, "ntk_alignment", model=_dist.structure(model), reference=_dist.structure(ref),
                            kernel=kernel, centered=centered, implementation=implementation, dtype=str(fz.dtype),
                            block_size=block_size, by_layer=by_layer, tf32=tf32)
                _dist.check_same_parameters(group, "ntk_alignment", model, ref)
                x_all = _dist.gather_loader(loader, group, fz.device)
                check_model_inputs(x_all, model=model, reference=ref)
                return _alignment_tiles(fz, fz0, x_all, kernel, centered, block_size, be, group,
                                        max_cache_bytes, by_layer)
        x_all = all_inputs(loader, fz.device)
        check_model_inputs(x_all, model=model, reference=ref)
        n = x_all.shape[0]
        if by_layer and kernel == "diagonal":
            raise ValueError("by_layer=True takes kernel='full' or 'trace'")
        if not by_layer:
            fz.plan_for_pairs((n + 1) / 2)
            fz0.plan_for_pairs((n + 1) / 2)
        path = choose_path(fz, x_all, kernel=kernel, implementation=implementation, block_size=block_size,
                           by_layer=by_layer, purpose="alignment", backend=be, centered=centered)
        call = Call(kernel, be, block_size, max_cache_bytes, progress, centered=centered)
        return ALIGNMENT_RUNNERS[path.name]([fz, fz0], x_all, path, call)
