"""Which kernel tiles a rank computes, and where its block features come from (``process_group=``, ``out=``).

The kernel over blocks ``0..nb-1`` of the probe set is the tiles ``(I, J)``, ``I <= J``. Two costs make a
tile: the features of its two blocks (one backward pass per block and model) and the product of the two.
How the work is shared depends on whether every block's features fit ``max_cache_bytes``:

* **exchange** (they fit): block ``I`` is owned by rank ``I mod P``, which alone computes its features and
  broadcasts them; each rank then takes its share of the tiles balanced by work
  (:func:`lazyhasty._dist.balanced_tiles`). Feature work is split ``1 / P``; the bytes that travel are at
  most the cache budget per call (a single process would hold the same features).
* **recompute** (they do not): nothing but inputs travels. The tiles in row-major order are cut into ``P``
  runs of equal work, so a rank keeps its current row's features while it walks the row and recomputes
  each column block, as one process does: recomputation is per tile, which divides evenly between ranks.

``schedule`` is deterministic: every rank derives the same plan from the same agreed facts.
"""
from __future__ import annotations

import torch

from .. import _dist
from .blocks import BlockFeatures, Blocks, nbytes

EXCHANGE = "exchange"
RECOMPUTE = "recompute"


def blocks_of(x_all: torch.Tensor, block_size: int) -> tuple[list[torch.Tensor], list[int]]:
    """``(blocks, starts)``: the probe set ``[n, ...]`` cut into blocks, and each block's first row (+ ``n``)
    (:class:`lazyhasty.ntk.blocks.Blocks`, as two lists)."""
    b = Blocks(x_all, block_size)
    return b.blocks, b.starts


def row_major_runs(sizes: list[int], size: int) -> list[list[tuple[int, int]]]:
    """Tile pairs ``(I, J >= I)`` in row-major order cut into ``size`` contiguous runs of (nearly) equal
    work. A tile's work in the recompute regime is its column block's features plus the product: both scale
    with ``b_J`` (times ``b_I`` for the product); the weights below use ``b_I b_J`` (half on the diagonal,
    whose features are the row's) plus ``b_J`` for the off-diagonal recomputation."""
    pairs = [(I, J) for I in range(len(sizes)) for J in range(I, len(sizes))]

    def work(I, J):
        return sizes[I] * sizes[J] * (0.5 if I == J else 1.0) + (0 if I == J else 64.0 * sizes[J])

    total = sum(work(*p) for p in pairs)
    out: list[list] = [[] for _ in range(size)]
    done = 0.0
    for p in pairs:
        w = work(*p)
        # the run whose share of the total holds this tile's midpoint
        r = min(size - 1, int((done + w / 2) * size / total)) if total > 0 else 0
        out[r].append(p)
        done += w
    return out


class RankTiles:
    """This rank's tiles of the kernel and the features of their blocks, for one or two featurizers
    (model and reference): the rank schedule of :class:`lazyhasty.ntk.walk.Walk`. Iterating yields
    ``(I, J, feats_I, feats_J)`` with ``feats_*`` a tuple of one feature list per featurizer (the same tuple
    when ``I == J``).

    Block features come from one :class:`lazyhasty.ntk.blocks.BlockFeatures` (kept while they fit
    ``max_cache_bytes``); in the exchange regime every block's features are kept (they fit, by its choice).
    ``kernel="diagonal"``: tiles ``(I, I)`` of this rank's own blocks, nothing kept (nothing is used twice).

    regime: ``"exchange"`` or ``"recompute"`` (module docstring); tiles: ``[(I, J)]`` in the order walked.
    """

    def __init__(self, featurizers: list, x_all: torch.Tensor, kernel: str, block_size: int, group,
                 max_cache_bytes: int, plan: tuple | None = None, prepare=None):
        """plan: ``(regime, tiles)`` of an earlier walk to repeat (the same tiles on the same rank: a kernel
        captured once and compared later, :class:`lazyhasty.ntk.NTKReference`). prepare: see
        :class:`~lazyhasty.ntk.blocks.BlockFeatures`."""
        self.fzs, self.kernel, self.group = featurizers, kernel, group
        self.rank, self.size = (0, 1) if group is None else _dist.rank_and_size(group)
        self.cut = Blocks(x_all, block_size)
        self.blocks, self.starts = self.cut.blocks, self.cut.starts
        self.features = BlockFeatures(featurizers, self.cut, 0 if kernel == "diagonal" else max_cache_bytes,
                                      prepare)
        self._first: tuple | None = None  # (I, features) of the block measured for the regime, for its row
        nb = len(self.blocks)
        sizes = self.cut.sizes
        self.owned = [I for I in range(nb) if I % self.size == self.rank]
        if plan is not None:
            self.regime, self.tiles = plan[0], list(plan[1])
            if self.regime == EXCHANGE:
                self._exchange()
            return
        if kernel == "diagonal":  # tiles (I, I) only: each rank its own blocks, nothing travels
            self.regime, self.tiles = RECOMPUTE, [(I, I) for I in self.owned]
            return
        runs = row_major_runs(sizes, self.size)
        # what all blocks' features take, from one block of this rank (every rank agrees on the maximum):
        # the first row of its recompute run, which that regime needs first anyway
        probe = runs[self.rank][0][0] if runs[self.rank] else (self.owned[0] if self.owned else None)
        per_example = 0.0
        if probe is not None:
            f = self.features(probe)
            self._first = (probe, f)
            per_example = nbytes(f) / sizes[probe]
        if group is not None:
            per_example = max(float(v) for v in _dist.gather_objects(per_example, group))
        self.regime = EXCHANGE if per_example * x_all.shape[0] <= max_cache_bytes else RECOMPUTE
        if self.regime == EXCHANGE:
            self.tiles = _dist.balanced_tiles(sizes, self.size)[self.rank]
            if group is not None:
                self._exchange()
        else:
            self.tiles = runs[self.rank]

    def _exchange(self) -> None:
        """Every block's features on every rank: each owner computes its blocks and broadcasts them."""
        cache = self.features.cache
        for I in range(len(self.blocks)):
            owner = I % self.size
            if owner == self.rank and I not in cache:
                self.features.keep(I, self._first[1] if self._first and self._first[0] == I
                                   else self.features.compute(I), always=True)
            if self.group is not None:
                mine = cache.get(I) if owner == self.rank else None
                size = None if mine is None else nbytes(mine)
                sent = _dist.broadcast_object(mine, owner, self.group, nbytes=size)
                if I not in cache:
                    self.features.keep(I, sent, always=True)
        kinds = {tuple((type(f).__name__, getattr(f, "name", None)) for f in fs[0]) for fs in cache.values()}
        if len(kinds) > 1:
            raise RuntimeError("the ranks formed different per-layer feature forms for their blocks: "
                               "report this with the model (it would mix incompatible tiles)")

    def __iter__(self):
        row, fi = None, None
        for I, J in self.tiles:
            if I != row:  # a new row: its features are kept while the row is walked
                row = I
                if self._first is not None and self._first[0] == I:
                    fi, self._first = self._first[1], None
                else:
                    fi = self.features(I)
            yield I, J, fi, fi if J == I else self.features(J)

    @property
    def plan(self) -> tuple:
        return self.regime, tuple(self.tiles)

    def rows(self, I: int) -> slice:
        return self.cut.rows(I)
