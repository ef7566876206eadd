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

EXCHANGE = "exchange"
RECOMPUTE = "recompute"


def blocks_of(x_all: torch.Tensor, block_size: int) -> tuple[list[torch.Tensor], list[int]]:
    """``(blocks, starts)``: the probe set ``[n, ...]`` cut into blocks, and each block's first row (+ ``n``)."""
    blocks = list(x_all.split(block_size))
    starts = [0]
    for x in blocks:
        starts.append(starts[-1] + x.shape[0])
    return blocks, starts


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
    (model and reference). Iterating yields ``(I, J, feats_I, feats_J)`` with ``feats_*`` a tuple of one
    feature list per featurizer.

    regime: ``"exchange"`` or ``"recompute"`` (module docstring); tiles: ``[(I, J)]`` in the order walked.
    """

    def __init__(self, featurizers: list, x_all: torch.Tensor, kernel: str, block_size: int, group,
                 max_cache_bytes: int, plan: tuple | None = None):
        """plan: ``(regime, tiles)`` of an earlier walk to repeat (the same tiles on the same rank: a kernel
        captured once and compared later, :class:`lazyhasty.ntk.NTKReference`)."""
        self.fzs, self.kernel, self.group = featurizers, kernel, group
        self.rank, self.size = (0, 1) if group is None else _dist.rank_and_size(group)
        self.blocks, self.starts = blocks_of(x_all, block_size)
        nb = len(self.blocks)
        sizes = [b.shape[0] for b in self.blocks]
        self.owned = [I for I in range(nb) if I % self.size == self.rank]
        self.features: dict[int, tuple] = {}
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
            self.features[probe] = self._compute(probe)
            per_example = sum(f.nbytes for fs in self.features[probe] for f in fs) / sizes[probe]
        if group is not None:
            per_example = max(float(v) for v in _dist.gather_objects(per_example, group))
        self.regime = EXCHANGE if per_example * x_all.shape[0] <= max_cache_bytes else RECOMPUTE
        if self.regime == EXCHANGE:
            self.tiles = _dist.balanced_tiles(sizes, self.size)[self.rank]
            self._exchange()
        else:
            self.tiles = runs[self.rank]

    def _compute(self, I: int) -> tuple:
        x = self.blocks[I]
        return tuple(fz(x.to(fz.device)) for fz in self.fzs)

    def _exchange(self) -> None:
        """Every block's features on every rank: each owner computes its blocks and broadcasts them."""
        for I in range(len(self.blocks)):
            owner = I % self.size
            if owner == self.rank and I not in self.features:
                self.features[I] = self._compute(I)
            if self.group is not None:
                mine = self.features.get(I) if owner == self.rank else None
                size = None if mine is None else sum(f.nbytes for fs in mine for f in fs)
                sent = _dist.broadcast_object(mine, owner, self.group, nbytes=size)
                self.features.setdefault(I, sent)
        kinds = {tuple((type(f).__name__, getattr(f, "name", None)) for f in fs[0]) for fs in self.features.values()}
        if len(kinds) > 1:
            raise RuntimeError("the ranks formed different per-layer feature forms for their blocks: "
                               "report this with the model (it would mix incompatible tiles)")

    def __iter__(self):
        if self.regime == EXCHANGE:
            for I, J in self.tiles:
                yield I, J, self.features[I], self.features[J]
            return
        row, fi = None, None
        for I, J in self.tiles:
            if I != row:  # a new row: its features are kept while the row is walked
                row = I
                fi = self.features.pop(I, None) or self._compute(I)
            yield I, J, fi, fi if J == I else self._compute(J)

    @property
    def plan(self) -> tuple:
        return self.regime, tuple(self.tiles)

    def rows(self, I: int) -> slice:
        return slice(self.starts[I], self.starts[I + 1])
