"""The one tile walker: every NTK kernel, operator product and alignment is a walk over tiles ``(I, J)`` of
blocks of examples, fed to a sink.

Named ``walk`` for what it does — walk the tiles of a kernel once, in one order, with one block cutting, one
feature cache and one precision setting — as against what is done with each tile, which is the sink's (a dense
Gram, a memory-mapped Gram, one Gram per layer, ``K @ Q``, the exact alignment sums). Every entry point
(:func:`~lazyhasty.ntk.ntk_gram`, :func:`~lazyhasty.ntk.ntk_alignment`, :class:`~lazyhasty.ntk.KernelOperator`,
:class:`~lazyhasty.ntk.NTKReference`) validates its arguments, chooses a path (:mod:`lazyhasty.ntk.paths`) and
then runs ``Walk(...).run(sink)``.

A kernel over blocks ``0..nb-1`` is the tiles ``K[I, J]``; for a Gram ``K[J, I] = K[I, J]^T``, so only
``I <= J`` are formed (``mirrored``: the sink also places the transpose). How a tile is formed (``Walk.form``):

| form | tiles | a tile's kernel |
| --- | --- | --- |
| ``"tiles"`` | ``I <= J`` row-major (a rank: its share, :class:`~lazyhasty.ntk.sharding.RankTiles`); cross ``X1 x X2``: every ``(I, J)``; ``kernel="diagonal"``: ``(I, I)`` | products of the two blocks' features (:func:`lazyhasty.ntk.forms.tile`), cached by :class:`~lazyhasty.ntk.blocks.BlockFeatures` |
| ``"streamed"`` | one tile of all ``n`` | each layer's features reduced into the tile as soon as they exist (the per-example gradients in the Featurizer's reused workspace): partial tiles summed by the sink |
| ``"one_output_at_a_time"`` | one tile of all ``n`` (trace) | :meth:`Featurizer.trace_gram`: one output's backward pass at a time |

Precision: the whole walk runs under :func:`lazyhasty._precision.product_precision` (TF32 where the call asked
for it, exact fp32 otherwise); the layer checks inside switch to exact fp32 themselves.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _backend
from .._exact import AlignmentSums
from .._precision import product_precision
from .._progress import Progress
from . import forms as feat
from .blocks import BlockFeatures, Blocks, default_block_size, finite, output_size
from .sharding import RankTiles

FORMS = ("tiles", "streamed", "one_output_at_a_time")
# how each path of lazyhasty.ntk.paths.PATHS forms its tiles (by_layer, cross, diagonal and tiles: "tiles")
FORM_OF_PATH = {"trace_one_block": "one_output_at_a_time", "one_tile": "streamed"}


@dataclass
class Tile:
    """One tile of a walk: rows ``rows`` (block ``I``) against columns ``cols`` (block ``J``).

    Attributes:
        I, J: block indices (cross walks: ``I`` of the first set, ``J`` of the second).
        rows, cols: the tile's slices of the kernel's example axes.
        feats, other: per featurizer (model, reference), the features of block ``I`` and of block ``J``
            (the same objects when ``I == J``); fused Triton alignments: a row matrix instead of a list.
        mirrored: the tile also stands for its transpose at ``(cols, rows)`` (``I != J`` of a Gram).
        partial: one layer's part of the tile (``"streamed"``): the sink sums the parts.
    """

    I: int
    J: int
    rows: slice
    cols: slice
    feats: tuple
    other: tuple
    mirrored: bool
    kernel: str
    backend: str
    partial: bool = False
    former: object = None  # "one_output_at_a_time": m -> that featurizer's [n, n] trace kernel

    def gram(self, m: int = 0) -> torch.Tensor:
        """The tile of featurizer ``m``'s kernel: ``[bI, k, bJ, k]`` (full), ``[bI, bJ]`` (trace) or
        ``[bI, k, k]`` (diagonal)."""
        if self.former is not None:
            return self.former(m)
        if self.kernel == "diagonal":
            return feat.diagonal(self.feats[m])
        # feat.tile looked up on the module at each call (tests spy on it)
        return feat.tile(self.feats[m], self.other[m], self.kernel, self.backend)


def block_size_for(fz, x: torch.Tensor, block_size: int | None, n: int | None = None) -> int:
    """``block_size``, or :func:`default_block_size` of ``n`` examples (default ``len(x)``) and the model's
    output size."""
    return block_size or default_block_size(x.shape[0] if n is None else n, output_size(fz, x))


class Walk:
    """The tiles of one kernel (or of a model's and a reference's, walked together) and how they are formed.

    Args:
        featurizers: one :class:`~lazyhasty.ntk.featurize.Featurizer` (a kernel) or two (model and reference:
            an alignment); tile ``.gram(m)`` is featurizer ``m``'s.
        x: the examples ``[n, ...]`` (rows; for a Gram also the columns).
        kernel: ``"full"``, ``"trace"`` or ``"diagonal"``.
        backend: ``"torch"`` or ``"triton"`` (:func:`lazyhasty.ntk.args.ntk_backend`).
        block_size: examples per block (``"tiles"``); the other forms are one block of all ``n``.
        x2: a second example set ``[n2, ...]``: the cross kernel ``K(X1, X2)``, every tile, none mirrored.
        group: a ``torch.distributed`` group: this rank's share of the tiles (:class:`RankTiles`).
        max_cache_bytes: the feature cache's budget (:class:`~lazyhasty.ntk.blocks.BlockFeatures`).
        form: one of :data:`FORMS` (module docstring).
        plan: a rank walk's ``(regime, tiles)`` to repeat (:attr:`plan` of an earlier walk).
        prepare: applied to each block's features before they are cached (the fused alignment's rows).

    Raises:
        ValueError: an unknown form, a form that takes one featurizer given two, or example sets of different
            shapes.

    Example:
        >>> walk = Walk([fz], x, "trace", "torch", block_size=32)
        >>> K = walk.run(GramSink(walk))        # [n, n], the same as ntk_gram(model, x, kernel="trace")
    """

    def __init__(self, featurizers, x: torch.Tensor, kernel: str, backend: str, block_size: int | None = None, *,
                 x2: torch.Tensor | None = None, group=None, max_cache_bytes: int = 0, form: str = "tiles",
                 plan: tuple | None = None, prepare=None):
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        if form == "streamed" and len(featurizers) != 1:
            raise ValueError("a streamed tile is of one featurizer's kernel")
        if x2 is not None and x.shape[1:] != x2.shape[1:]:
            raise ValueError(f"the two example sets differ in shape: {tuple(x.shape[1:])} vs {tuple(x2.shape[1:])}")
        self.fzs, self.x, self.x2, self.kernel, self.backend = list(featurizers), x, x2, kernel, backend
        self.form, self.group, self.budget, self._plan, self.prepare = form, group, max_cache_bytes, plan, prepare
        self.n = x.shape[0]
        self.n2 = self.n if x2 is None else x2.shape[0]
        for fz in self.fzs:  # the example pairs each example's features meet (forming them is spread over those)
            fz.plan_for_pairs(self.n2 if x2 is not None else (self.n + 1) / 2)
        if form != "tiles":
            block_size = self.n
        elif block_size is None:
            block_size = block_size_for(self.fzs[0], x, None, max(self.n, self.n2))
        self.block_size = block_size
        self.blocks = Blocks(x, block_size)
        self.columns = self.blocks if x2 is None else Blocks(x2, block_size)
        self.ranks: RankTiles | None = None
        self._features: BlockFeatures | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.fzs[0].dtype

    @property
    def device(self) -> torch.device:
        return self.fzs[0].device

    @property
    def k(self) -> int | None:
        """Outputs per example (known once a block's features were formed)."""
        return self.fzs[0].k

    @property
    def plan(self) -> tuple:
        """A rank walk's ``(regime, tiles)``, to walk the same tiles again (``plan=``)."""
        return self.ranks.plan

    def total(self) -> int:
        """Tiles the walk visits (a progress bar's length)."""
        if self.ranks is not None:
            return len(self.ranks.tiles)
        nb, nc = len(self.blocks), len(self.columns)
        if self.x2 is not None:
            return nb * nc
        return nb if self.kernel == "diagonal" else nb * (nb + 1) // 2

    # -- the tiles -------------------------------------------------------------------------------------------
    def _tile(self, I, J, fi, fj, mirrored) -> Tile:
        return Tile(I, J, self.blocks.rows(I), self.columns.rows(J), fi, fj, mirrored, self.kernel, self.backend)

    def _start(self) -> None:
        """The feature source, created inside the walk's precision (a rank walk forms a block to choose its
        regime). Reused by a walk run again (:class:`KernelOperator`: its cache persists)."""
        if self.form != "tiles" or self._features is not None or self.ranks is not None:
            return
        if self.group is not None or self._plan is not None:
            self.ranks = RankTiles(self.fzs, self.x, self.kernel, self.block_size, self.group, self.budget,
                                   self._plan, self.prepare)
        else:
            budget = 0 if self.kernel == "diagonal" else self.budget  # diagonal tiles use each block once
            self._features = BlockFeatures(self.fzs, self.columns, budget, self.prepare)

    def __iter__(self):
        """The tiles in the order walked (``form="tiles"``; the caller holds the walk's precision)."""
        self._start()
        if self.ranks is not None:
            for I, J, fi, fj in self.ranks:
                yield self._tile(I, J, fi, fj, I != J and self.kernel != "diagonal")
            return
        get = self._features
        if self.x2 is not None:  # rows of X1 formed once each (used by one row of tiles), X2's blocks cached
            rows = BlockFeatures(self.fzs, self.blocks, 0)
            for I in range(len(self.blocks)):
                fi = rows.compute(I)
                for J in range(len(self.columns)):
                    yield self._tile(I, J, fi, get(J), False)
            return
        nb = len(self.blocks)
        for I in range(nb):
            fi = get(I)  # kept while its row is walked
            if self.kernel == "diagonal":
                yield self._tile(I, I, fi, fi, False)
                continue
            for J in range(I, nb):
                yield self._tile(I, J, fi, fi if J == I else get(J), J != I)

    def run(self, sink, progress: bool = False, desc: str = "ntk tiles"):
        """Every tile to ``sink.add(tile)`` under the call's product precision; returns ``sink.result()``."""
        with product_precision():
            if self.form == "streamed":
                (fz,) = self.fzs
                x = self.blocks.blocks[0]
                rows = self.blocks.rows(0)

                def part(f):  # one layer's features: reduced now (the workspace they are in is reused)
                    sink.add(Tile(0, 0, rows, rows, ([f],), ([f],), False, self.kernel, self.backend, partial=True))

                fz.stream(x, part, sink.reset)
            elif self.form == "one_output_at_a_time":
                x, rows = self.blocks.blocks[0], self.blocks.rows(0)
                formed: dict = {}

                def former(m):
                    if m not in formed:
                        fz = self.fzs[m]
                        K = fz.trace_gram(x.to(fz.device), self.backend)
                        formed[m] = K if m == 0 else K.to(self.device)
                    return formed[m]

                sink.add(Tile(0, 0, rows, rows, (), (), False, self.kernel, self.backend, former=former))
            else:
                with Progress(self.total(), desc, progress) as bar:
                    for tile in self:
                        sink.add(tile)
                        bar.update()
        return sink.result()


# -- sinks -------------------------------------------------------------------------------------------------------
def place(K, kernel: str, rows: slice, cols: slice, t, mirrored: bool) -> None:
    """Tile ``t`` at ``rows``, ``cols`` of ``K`` (torch or numpy; ``[n, k, n, k]``, ``[n, n]`` or, diagonal,
    ``[n, k, k]`` at ``rows``), and with ``mirrored`` its transpose at ``cols``, ``rows``."""
    if kernel == "diagonal":
        K[rows] = t
    elif kernel == "full":
        K[rows, :, cols, :] = t
        if mirrored:
            K[cols, :, rows, :] = t.permute(2, 3, 0, 1) if isinstance(t, torch.Tensor) else t.transpose(2, 3, 0, 1)
    else:
        K[rows, cols] = t
        if mirrored:
            K[cols, rows] = t.T


def kernel_shape(kernel: str, n: int, k: int, n2: int | None = None) -> tuple:
    """The shape of a kernel of ``n`` (by ``n2``) examples with ``k`` outputs."""
    n2 = n if n2 is None else n2
    return {"full": (n, k, n2, k), "trace": (n, n2), "diagonal": (n, k, k)}[kernel]


class GramSink:
    """The dense kernel, tiles placed and mirrored (``ntk_gram``'s tiles, one-tile, one-block trace, diagonal
    and cross paths). A tile covering the whole kernel is the kernel (no copy); streamed parts are summed in
    place, and a streamed trace kernel is symmetrized (``(K + K^T) / 2``: GEMM products ``F F^T`` are symmetric
    only to rounding).

    Args:
        walk: the walk feeding it (shape, dtype and device of the kernel).
        zeros: start from zeros (tiles that may add to each other) instead of uninitialized memory.

    Returns (``result()``): the kernel, detached, or a ValueError if it has NaN/inf entries.
    """

    def __init__(self, walk: Walk, zeros: bool = False):
        self.walk, self.zeros, self.K, self.streamed = walk, zeros, None, False

    def reset(self) -> None:
        self.K = None

    def _alloc(self, t: torch.Tensor) -> torch.Tensor:
        k = t.shape[1] if self.walk.kernel != "trace" else 1
        make = torch.zeros if self.zeros else torch.empty
        return make(kernel_shape(self.walk.kernel, self.walk.n, k, self.walk.n2), dtype=self.walk.dtype,
                    device=self.walk.device)

    def add(self, tile: Tile) -> None:
        t = tile.gram()
        whole = tile.rows == slice(0, self.walk.n) and tile.cols == slice(0, self.walk.n2)
        if tile.partial:
            self.streamed = True
            self.K = t if self.K is None else self.K.add_(t)
            return
        if whole and self.K is None:
            self.K = t
            return
        if self.K is None:
            self.K = self._alloc(t)
        place(self.K, self.walk.kernel, tile.rows, tile.cols, t, tile.mirrored)

    def result(self) -> torch.Tensor:
        K = self.K
        if self.streamed:
            if self.walk.kernel == "trace":
                K = (K + K.T).mul_(0.5)
            K = K.contiguous()
        return finite(K)


class ByLayerSink:
    """One dense kernel per parameter group (feature name): ``{name: K_l}`` with ``K = sum_l K_l``."""

    def __init__(self, walk: Walk):
        self.walk, self.sinks = walk, {}

    def add(self, tile: Tile) -> None:
        for name, t in layer_tiles(tile, 0).items():
            if name not in self.sinks:
                self.sinks[name] = GramSink(self.walk, zeros=True)
            s = self.sinks[name]
            if s.K is None:
                s.K = s._alloc(t)
            place(s.K, self.walk.kernel, tile.rows, tile.cols, t, tile.mirrored)

    def result(self) -> dict:
        return {name: s.result() for name, s in self.sinks.items()}


def layer_tiles(tile: Tile, m: int) -> dict:
    """Per parameter group (feature name) of featurizer ``m``: its part of the tile."""
    out: dict = {}
    for a, b in zip(tile.feats[m], tile.other[m]):
        t = feat.tile([a], [b], tile.kernel, tile.backend)
        out[a.name] = t if a.name not in out else out[a.name].add_(t)
    return out


class TileSink:
    """The tiles as a list ``[(I, J, tile)]`` (checked finite; ``cpu``: moved to the CPU), for a kernel
    gathered over ranks or kept tile by tile (:class:`~lazyhasty.ntk.NTKReference`)."""

    def __init__(self, cpu: bool = False):
        self.cpu, self.tiles = cpu, []

    def add(self, tile: Tile) -> None:
        t = finite(tile.gram())
        self.tiles.append((tile.I, tile.J, t.cpu() if self.cpu else t))

    def result(self) -> list:
        return self.tiles


class MemmapSink:
    """Tiles written into a memory-mapped ``.npy`` array ``target`` (and their mirror images)."""

    def __init__(self, target, kernel: str):
        self.target, self.kernel = target, kernel

    def add(self, tile: Tile) -> None:
        t = finite(tile.gram())
        place(self.target, self.kernel, tile.rows, tile.cols, t.cpu().numpy(), tile.mirrored)

    def result(self):
        self.target.flush()
        return self.target


class OperatorSink:
    """``K @ Q`` ``[N, p]`` in float64 (``N = n`` trace, ``n k`` full: rows (example, output)), each tile used
    for its block of rows and, mirrored, its transpose for the mirrored block."""

    def __init__(self, Q: torch.Tensor, outputs: int):
        self.Q, self.m, self.out = Q, outputs, torch.zeros_like(Q)

    def add(self, tile: Tile) -> None:
        m = self.m
        t = tile.gram().detach().double()
        t = t.reshape(t.shape[0] * m, -1)
        ri = slice(tile.rows.start * m, tile.rows.stop * m)
        rj = slice(tile.cols.start * m, tile.cols.stop * m)
        self.out[ri] += t @ self.Q[rj]
        if tile.mirrored:
            self.out[rj] += t.T @ self.Q[ri]

    def result(self) -> torch.Tensor:
        return self.out


def fused_alignment(backend: str, kernel: str, centered: bool) -> bool:
    """Whether an alignment's tiles go to the fused Triton ``K_t * K_0`` reduction (where both blocks' features
    are all materialized): on Triton, full or trace kernel, uncentred."""
    return backend == "triton" and kernel != "diagonal" and not centered


def flat_rows_pair(f: tuple, kernel: str):
    """The fused alignment's form of a block's ``(model, reference)`` features: each one row matrix
    (:func:`lazyhasty.ntk.forms.flat_rows`), or the features as they are where a ghost feature is present."""
    rows = (feat.flat_rows(f[0], kernel), feat.flat_rows(f[1], kernel))
    return rows if rows[0] is not None and rows[1] is not None else f


class AlignmentSink:
    """The exact sums of ``KA(K_t, K_0)`` (:class:`lazyhasty._exact.AlignmentSums`) over a walk of two
    featurizers (model, reference); ``by_layer``: one set per parameter group; over ranks (``group``): every
    rank's sums combined in rank order, names in one order. Row-matrix tiles (``prepare=flat_rows_pair``) are
    reduced by the fused Triton kernel without forming either tile.

    Args:
        walk: a walk of two featurizers (model, reference).
        centered: centre both kernels over examples (CKA).
        by_layer: one alignment per parameter group (the featurizers' ``by_layer`` features).
        group: the walk's ``torch.distributed`` group (None: one process).
        k: outputs per example for a centred full kernel's sums (default: the walk's, once known; a rank
            without tiles needs it given).

    Returns (``result()``): the alignment (float), or ``{name: alignment}``; the same on every rank.

    Raises:
        ValueError: the model's and the reference's parameter groups differ (``by_layer``).

    Example:
        >>> walk = Walk([fz, fz0], x, "trace", "torch", block_size=32)
        >>> walk.run(AlignmentSink(walk, centered=False))      # ntk_alignment(model, x, reference, kernel="trace")
    """

    def __init__(self, walk: Walk, centered: bool, by_layer: bool = False, group=None, k: int | None = None):
        self.walk, self.k, self.centered, self.by_layer, self.group = walk, k, centered, by_layer, group
        self.sums: dict = {}

    def _sums(self, name) -> AlignmentSums:
        if name not in self.sums:
            kernel = self.walk.kernel
            k = 1 if kernel == "trace" else self.k or self.walk.k  # k: known once a block's features exist
            self.sums[name] = AlignmentSums(self.walk.n, k, kernel, self.centered, self.walk.device)
        return self.sums[name]

    def add(self, tile: Tile) -> None:
        dev = self.walk.device
        if tile.feats and isinstance(tile.feats[0], torch.Tensor):
            from .forms.triton_kernels import alignment_partials

            outputs = self.walk.k if tile.kernel == "trace" else 1
            parts = alignment_partials(tile.feats[0], tile.other[0], tile.feats[1].to(dev), tile.other[1].to(dev),
                                       tile.I == tile.J, _backend.triton_interpreted(), outputs)
            self._sums(None).add_partials(parts, 2.0 if tile.mirrored else 1.0)
            return
        if self.by_layer and tile.kernel != "diagonal":
            tt, t0 = layer_tiles(tile, 0), layer_tiles(tile, 1)
            if set(tt) != set(t0):
                raise ValueError("the model's and the reference's parameter groups differ: "
                                 f"{sorted(set(tt) ^ set(t0))}")
            for name in tt:
                self._sums(name).add(tt[name], t0[name].to(dev), tile.rows, tile.cols, tile.mirrored)
            return
        Kt = tile.gram(0)
        self._sums(None).add(Kt, tile.gram(1).to(dev), tile.rows, tile.cols, tile.mirrored)

    def result(self):
        from .. import _dist

        group = self.group
        # every rank reduces the same names in the same order (a rank without tiles has none of its own)
        names = [None] if not self.by_layer else sorted(self.sums, key=str) if group is None else sorted(
            {name for part in _dist.gather_objects(sorted(self.sums, key=str), group) for name in part}, key=str)
        for name in names:
            s = self._sums(name)
            if group is not None:
                _dist.reduce_alignment_sums(s, group)
        if not self.by_layer:
            return self.sums[None].alignment()
        return {name: self.sums[name].alignment(f"the tangent kernel of {name}") for name in names}
