"""The reference's side of the NTK alignment, captured once (the every-logging-step path).

At every log a run compares the model's kernel with the kernel at init, which never changes. Capturing
it once halves the NTK part of a probe round: ``NTKReference.capture(f0, probe)`` keeps ``K_0`` (float32
storage for float32 models; sums are float64, exact: :class:`lazyhasty._exact.AlignmentSums`)
while it fits ``max_bytes``; ``.alignment(model)`` then forms only the model's kernel. Beyond the budget
it keeps a frozen copy of the reference and recomputes both kernels tile by tile
(:func:`lazyhasty.ntk.ntk_alignment`): the same number, without the saving.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .._loaders import all_inputs, model_device, model_inputs
from .._exact import AlignmentSums
from .._malloc import retained_heap
from .._modes import measures, measuring
from .._validate import check_model_inputs
from .._precision import tf32_requested
from .api import ntk_alignment, ntk_gram
from .args import DEFAULT_CACHE_BYTES, KERNELS, check_args, ntk_backend
from .blocks import default_block_size, output_size
from .featurize import Featurizer
from .._outputs import select_output, tensor_output
from .._probing import probing, reapplying
from .walk import TileSink, Walk

DEFAULT_REFERENCE_BYTES = 1 << 30


class NTKReference:
    """``K_0``, the tangent kernel of a reference model (the network at init) on a fixed probe set, captured
    once for ``KA(K_t, K_0) = Tr[K_t K_0] / (|K_t|_F |K_0|_F)`` at every logging step.

    Build it with [`capture`][lazyhasty.ntk.NTKReference.capture]; each
    [`alignment`][lazyhasty.ntk.NTKReference.alignment] / [`measure`][lazyhasty.ntk.NTKReference.measure] then
    forms only the model's kernel ``K_t`` and reduces it against the stored ``K_0`` tile by tile, with the
    exact float64 sums of [`ntk_alignment`][lazyhasty.ntk.ntk_alignment]: the value equals
    ``ntk_alignment(model, x, reference, kernel=...)`` (to 1e-6 in float32, 1e-12 in float64) at half its cost.
    ``K_0`` is ``[n, n]`` (``kernel="trace"``) or ``[n, k, n, k]`` (``"full"``), kept in the reference's dtype
    while it fits ``max_bytes``; beyond that a frozen copy of the reference is kept instead and both kernels
    are recomputed at each call (the same number, without the saving).

    Both kernels are of the networks in eval mode (dropout off, BatchNorm on its running statistics), whatever
    mode the models are in; their modes, buffers and the RNG states are restored after.

    With a ``process_group`` (a ``torch.distributed`` group, or ``"world"``) each rank captures with its own
    shard of the probe set (possibly empty) and keeps only its share of ``K_0``'s tiles (``max_bytes`` is per
    rank); ``alignment(model)`` forms the same tiles of the model's kernel and returns the value over the
    union, the same on every rank.

    Attributes:
        x: the probe inputs ``[n, ...]`` (all ranks' examples with a process group).
        kernel: ``"trace"`` or ``"full"``.
        centered: whether both kernels are centred over examples (CKA).
        stored: whether ``K_0`` is kept (else it is recomputed at each call).
        nbytes: the bytes ``K_0`` holds on this process (0 when not stored).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> init = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        >>> x = torch.randn(20, 3)
        >>> ref = NTKReference.capture(init, x, kernel="trace")
        >>> ref.stored, ref.nbytes                       # K_0 [20, 20] float32
        (True, 1600)
        >>> round(ref.alignment(init), 6)
        1.0
        >>> model = copy.deepcopy(init)
        >>> with torch.no_grad():
        ...     for p in model.parameters():
        ...         _ = p.add_(0.5 * torch.randn_like(p))
        >>> round(ref.alignment(model), 4)               # = ntk_alignment(model, x, init, kernel="trace")
        0.9822
    """

    def __init__(self, x: torch.Tensor, kernel: str, centered: bool, options: dict, K0,
                 reference: nn.Module | None, trainable: frozenset, group=None, shard: torch.Tensor | None = None,
                 plan: tuple | None = None):
        self.x, self.kernel, self.centered, self.options = x, kernel, centered, options
        self.K0, self.reference, self.trainable = K0, reference, trainable
        # with a group: K0 is {(I, J): tile} of this rank's tiles, walked again in `plan`; `shard` is this
        # rank's own examples (what ntk_alignment takes when K0 is not stored)
        self.group, self.shard, self.plan = group, shard, plan

    @property
    def stored(self) -> bool:
        return self.K0 is not None

    @property
    def nbytes(self) -> int:
        if isinstance(self.K0, dict):
            return sum(t.numel() * t.element_size() for t in self.K0.values())
        return 0 if self.K0 is None else self.K0.numel() * self.K0.element_size()

    @classmethod
    @measures("reference")  # eval mode; the reference's modes, buffers and RNG states restored after
    @retained_heap()
    @probing("reference", keep=True)  # named inputs and output= (lazyhasty._outputs), kept for measure
    def capture(cls, reference: nn.Module, loader, *, kernel: str = "trace", centered: bool = False,
                implementation: str = "auto", dtype: torch.dtype | None = None, block_size: int | None = None,
                max_bytes: int = DEFAULT_REFERENCE_BYTES, backend: str | None = None, output=None,
                trainable=None, process_group=None) -> "NTKReference":
        """Form ``K_0``, the reference's tangent kernel on the probe set, once.

        Args:
            reference: the network at init (an ``nn.Module``; the model later measured must have the same
                trainable parameter names).
            loader: the probe inputs: a tensor ``[n, ...]``, a Dataset or a loader of batches (the inputs of
                each; with a process group, this rank's shard).
            kernel: ``"trace"`` (default; ``K_0`` ``[n, n]``, the sum over the k outputs) or ``"full"``
                (``[n, k, n, k]``).
            centered: centre both kernels over examples (CKA). Default False.
            implementation: the engine's implementation, as in [`ntk_gram`][lazyhasty.ntk.ntk_gram]
                (``"auto"``, ``"layerwise"``, ``"jacobian"``, ``"naive"``).
            dtype: precision of both kernels (e.g. ``torch.float64``); default None: the reference's.
            block_size: examples per block of the tiles; default None: chosen from n and k.
            max_bytes: the most memory ``K_0`` may hold (per rank); beyond it a frozen copy of the reference
                is kept and both kernels are recomputed at each call. Default 1 GiB.
            backend: ``"torch"`` / ``"triton"`` / None, as in [`ntk_gram`][lazyhasty.ntk.ntk_gram].
            output: which tensor of the model's output the kernel is of (an index, a key or a callable);
                default None: the output itself.
            trainable: names of the parameters the kernel is over; default: the reference's trainable ones
                (the Trainer passes the model's, as [`ntk_alignment`][lazyhasty.ntk.ntk_alignment] does with
                a frozen ``f_0``).
            process_group: a ``torch.distributed`` group or ``"world"``; default None (one process).

        Returns:
            The `NTKReference`, with ``K_0`` stored when ``item_size * n^2`` (trace) or
            ``item_size * (n k)^2`` (full) fits ``max_bytes``.

        Raises:
            TypeError: a reference that is not an ``nn.Module``; a dtype that is not a floating torch.dtype.
            ValueError: a kernel other than ``"trace"`` / ``"full"``, a negative ``max_bytes`` or another
                argument out of range (named); an empty probe set, probe inputs the reference cannot take
                (token ids out of an ``nn.Embedding``'s range, integer inputs to a float model, another shape)
                or an output without one row per example; a reference without trainable parameters;
                non-finite inputs or outputs; a reference that mixes examples of a batch.

        Example:
            >>> init = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
            >>> x = torch.randn(20, 3)
            >>> full = NTKReference.capture(init, x, kernel="full")
            >>> full.K0.shape, full.nbytes                   # [n, k, n, k] float32
            (torch.Size([20, 2, 20, 2]), 6400)
            >>> NTKReference.capture(init, x, kernel="full", max_bytes=0).stored   # recomputed at each call
            False
        """
        if kernel not in KERNELS or kernel == "diagonal":
            raise ValueError(f"kernel must be 'trace' or 'full' for a reference kernel, got {kernel!r}")
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
        if implementation == "naive" and process_group is not None:
            raise ValueError("implementation='naive' (the spec) runs in one process: process_group= takes 'auto', "
                             "'layerwise' or 'jacobian'")
        from .. import _dist

        check_args(kernel, implementation, block_size, 0, dtype)
        check_model_inputs(None, reference=reference)
        group = _dist.resolve(process_group)
        names = frozenset(trainable) if trainable is not None else frozenset(
            n for n, p in reference.named_parameters() if p.requires_grad)
        options = dict(implementation=implementation, dtype=dtype, block_size=block_size, backend=backend,
                       output=output)
        if group is not None:
            _dist.agree(group, "NTKReference.capture", reference=_dist.structure(reference), kernel=kernel,
                        centered=centered, implementation=implementation, dtype=str(dtype), block_size=block_size,
                        max_bytes=max_bytes, output=repr(output), trainable=sorted(names))
            _dist.check_same_parameters(group, "NTKReference.capture", reference)
            shard = _dist.own_shard(loader, group, model_device(reference))  # [0, ...] when empty
            x = _dist.gather_inputs(shard, group, model_device(reference))
        else:
            x, shard = all_inputs(loader, model_device(reference)), None
        frozen = copy.deepcopy(reference)
        for name, p in frozen.named_parameters():
            p.requires_grad_(name in names)
        check_model_inputs(x, reference=select_output(frozen, output))
        n = x.shape[0]
        with torch.no_grad(), measuring(reference):
            k = int(tensor_output(select_output(reference, output)(model_inputs(x[:1], reference))).reshape(1, -1).shape[1])
        item = torch.finfo(dtype or next(p.dtype for p in reference.parameters())).bits // 8
        need = item * (n * n if kernel == "trace" else (n * k) ** 2)
        if group is not None:
            need //= _dist.rank_and_size(group)[1]  # each rank keeps its share of the tiles
        if need > max_bytes:
            return cls(x, kernel, centered, options, None, frozen, names, group, shard)
        if group is not None:
            work, tiles = _walk(frozen, x, kernel, options, group)
            K0 = {(I, J): t for I, J, t in tiles}
            return cls(x, kernel, centered, options, K0, None, names, group, shard, work.plan)
        K0 = ntk_gram(frozen, x, kernel=kernel, **options)
        return cls(x, kernel, centered, options, K0, None, names)

    def alignment(self, model: nn.Module) -> float:
        """``KA(K_t, K_0)`` (centred if captured so) of ``model``'s kernel on the captured probe set.

        Args:
            model: the network now (the same trainable parameter names as the reference).

        Returns:
            The alignment, a float in ``[-1, 1]`` (1.0 at init).
        """
        return self.measure(model)["ntk_alignment"]

    @measures("model", "self.reference")
    @retained_heap()
    @reapplying("model")
    def measure(self, model: nn.Module) -> dict:
        """``{"ntk_alignment": KA(K_t, K_0), "ntk_rel_change": |K_t - K_0|_F / |K_0|_F}`` (the second only
        while ``K_0`` is stored; from the same exact sums: ``|K_t|^2 + |K_0|^2 - 2 <K_t, K_0>``)."""
        if self.K0 is None:
            x = self.x if self.group is None else self.shard
            return {"ntk_alignment": ntk_alignment(model, x, self.reference, kernel=self.kernel,
                                                   centered=self.centered, process_group=self.group,
                                                   **self.options)}
        have = {n for n, p in model.named_parameters() if p.requires_grad}
        if have != set(self.trainable):
            raise ValueError("the model's trainable parameters differ from those the reference kernel was captured "
                             f"over: {sorted(have ^ set(self.trainable))[:5]}")
        n = self.x.shape[0]
        if self.group is not None:
            from .. import _dist

            with _dist.failing_together(self.group, "NTKReference.measure"):
                _dist.agree(self.group, "NTKReference.measure", model=_dist.structure(model))
                _dist.check_same_parameters(self.group, "NTKReference.measure", model)
                work, tiles = _walk(model, self.x.to(model_device(model)), self.kernel, self.options, self.group,
                                    self.plan)
                k = work.outputs if self.kernel == "full" else 1
                sums = AlignmentSums(n, k, self.kernel, self.centered, model_device(model))
                for I, J, Kt in tiles:
                    sums.add(Kt, self.K0[I, J].to(Kt.device), work.blocks.rows(I), work.blocks.rows(J), I != J)
                _dist.reduce_alignment_sums(sums, self.group)
                return self._values(sums)
        Kt = ntk_gram(model, self.x.to(model_device(model)), kernel=self.kernel, **self.options)
        sums = AlignmentSums(n, Kt.shape[1] if self.kernel == "full" else 1, self.kernel, self.centered, Kt.device)
        sums.add(Kt, self.K0.to(Kt.device), slice(0, n), slice(0, n), False)
        return self._values(sums)

    @staticmethod
    def _values(sums: AlignmentSums) -> dict:
        change = (sums.sq_t + sums.sq_0 + sums.cross.scale(-2.0)).value()
        return {"ntk_alignment": sums.alignment(),
                "ntk_rel_change": max(change, 0.0) ** 0.5 / max(sums.sq_0.value(), 1e-300) ** 0.5}


@torch.enable_grad()  # LinearityProbe runs under no_grad; tangent features need backward passes
def _walk(model: nn.Module, x: torch.Tensor, kernel: str, options: dict, group, plan: tuple | None = None):
    """This rank's tiles of ``model``'s kernel on the union ``x``: ``(walk, [(I, J, tile)])`` (``walk.plan``
    repeats the same walk for another model; ``walk.outputs``: the model's output size)."""
    if options.get("output") is not None:
        model = select_output(model, options["output"])
    fz = Featurizer(model, options["implementation"], kernel, options["dtype"])
    be = ntk_backend(fz.device, options["backend"], fz.dtype)
    k = output_size(fz, x)
    with tf32_requested(False):  # exact fp32 products (no tf32 option here)
        walk = Walk([fz], x, kernel, be, options["block_size"] or default_block_size(x.shape[0], k), group=group,
                    max_cache_bytes=DEFAULT_CACHE_BYTES, plan=plan)
        tiles = walk.run(TileSink())
    walk.outputs = k
    return walk, tiles
