"""Cutting examples into blocks (:class:`Blocks`, the one block cutting) and the one feature-cache policy
(:class:`BlockFeatures`); the default block size, the one-block trace test, the output size, and the finiteness
check of a kernel (shared by every path and by the tile walker, :mod:`lazyhasty.ntk.walk`)."""
from __future__ import annotations

import torch


def default_block_size(n: int, k: int) -> int:
    """About four blocks a side (tiles with i <= j only: ~half the pair work of one n x n tile), at least
    32 examples (GEMM efficiency), at most 1024 and ``8192 / k`` (a [b k, b k] tile stays <= 256 MB)."""
    return int(max(1, min(max(32, -(-n // 4)), 1024, max(1, 8192 // max(1, k)))))


def one_trace_block(fz, x_all: torch.Tensor, block_size: int | None) -> bool:
    """Whether the trace kernel is computed as one block (see :meth:`Featurizer.trace_block_limit`)."""
    n = x_all.shape[0]
    return block_size >= n if block_size is not None else n <= fz.trace_block_limit(x_all)


def output_size(fz, x: torch.Tensor) -> int:
    """``k``: the number of outputs of ``fz``'s model on one example of ``x`` (a forward without grad, once per
    model structure and state, example shape, dtypes and device: ``Featurizer.output_size``)."""
    return fz.output_size(x)


def finite(K: torch.Tensor) -> torch.Tensor:
    """``K`` detached, or a ValueError when it has NaN/inf entries."""
    K = K.detach()  # a kernel, not a node of an autograd graph (that would keep the graph alive)
    # NaN and inf reach the sum (inf - inf is NaN); a finite sum clears every entry, and a sum that overflowed
    # while all entries are finite is told apart by the elementwise check
    if not bool(torch.isfinite(K.sum(dtype=torch.float64))) and not bool(torch.isfinite(K).all()):
        raise ValueError("the tangent kernel has NaN/inf entries (non-finite inputs, parameters or activations)")
    return K


class Blocks:
    """The examples ``x`` ``[n, ...]`` cut into blocks of ``block_size`` rows (the last one shorter when
    ``block_size`` does not divide ``n``): the one block cutting every walk uses.

    Attributes:
        blocks: the blocks, views of ``x`` (``x.split(block_size)``).
        starts: each block's first row, and ``n`` last (``len(blocks) + 1`` entries).

    Example:
        >>> b = Blocks(torch.zeros(10, 3), 4)
        >>> [x.shape[0] for x in b.blocks], b.starts, b.rows(2)
        ([4, 4, 2], [0, 4, 8, 10], slice(8, 10, None))
    """

    def __init__(self, x: torch.Tensor, block_size: int):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.blocks = list(x.split(block_size))
        self.starts = [0]
        for b in self.blocks:
            self.starts.append(self.starts[-1] + b.shape[0])

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def n(self) -> int:
        return self.starts[-1]

    @property
    def sizes(self) -> list[int]:
        return [b.shape[0] for b in self.blocks]

    def rows(self, I: int) -> slice:
        """The rows of block ``I`` in the kernel."""
        return slice(self.starts[I], self.starts[I + 1])


def nbytes(features) -> int:
    """Bytes held by one block's features: a feature list, a tensor, or a tuple of them (one per model)."""
    if isinstance(features, torch.Tensor):
        return features.numel() * features.element_size()
    if isinstance(features, tuple):
        return sum(nbytes(f) for f in features)
    return sum(f.nbytes for f in features)


class BlockFeatures:
    """The one feature-cache policy: block ``I``'s features (a tuple, one feature list per featurizer), kept
    while they fit ``max_bytes`` (first come, first kept), recomputed on each later use otherwise; so memory
    beyond the result stays bounded whatever ``n`` is. A walk keeps the block of its current row of tiles
    itself while it walks the row, cached or not.

    Args:
        featurizers: callables ``x [b, ...] -> features`` with a ``device`` (the model's and, for an alignment,
            the reference's :class:`Featurizer`).
        blocks: the :class:`Blocks` whose features are asked for.
        max_bytes: the cache budget (0: nothing is kept).
        prepare: applied to each block's tuple of features before it is kept or returned (the fused Triton
            alignment's row matrices), or None.

    Example:
        >>> feats = BlockFeatures([fz], Blocks(x, 32), max_bytes=1 << 30)
        >>> (f_0,) = feats(0)          # computed once, then served from the cache
    """

    def __init__(self, featurizers, blocks: Blocks, max_bytes: int, prepare=None):
        self.fzs, self.blocks, self.room, self.prepare = list(featurizers), blocks, max_bytes, prepare
        self.cache: dict[int, tuple] = {}

    def compute(self, I: int) -> tuple:
        """Block ``I``'s features, formed now (not looked up, not kept)."""
        x = self.blocks.blocks[I]
        f = tuple(fz(x.to(fz.device)) for fz in self.fzs)
        return self.prepare(f) if self.prepare is not None else f

    def keep(self, I: int, f: tuple, always: bool = False) -> tuple:
        """Keep ``f`` as block ``I``'s features while the budget has room (``always``: whatever it has)."""
        size = nbytes(f)
        if always or size <= self.room:
            self.cache[I] = f
            self.room -= size
        return f

    def __call__(self, I: int) -> tuple:
        if I in self.cache:
            return self.cache[I]
        return self.keep(I, self.compute(I))
