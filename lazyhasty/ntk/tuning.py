"""The sizes at which the NTK engine switches from one form to another: one place for every threshold.

Each field of [`Limits`][lazyhasty.ntk.Limits] is read when a call needs it, through `current()`; [`limits`][lazyhasty.ntk.limits] changes some
of them for the calls inside a ``with`` block (and ``explain()`` inside it lists the changed ones under
``switches``). Tests use it to send a call down each side of a switch on small models (instead of patching module
constants); a user may use it to trade memory for speed. Values never change a kernel's value beyond float
rounding: every side of every switch is exact and tested against `lazyhasty.ntk.naive`.

Example:
    >>> from lazyhasty.ntk import limits
    >>> with limits(batched_backward_bytes=0):  # k backward passes instead of one batched backward
    ...     K = ntk_gram(model, x)
"""
import contextlib
import contextvars
import dataclasses


@dataclasses.dataclass(frozen=True)
class Limits:
    """Thresholds of the engine's implicit switches (bytes, elements, rows or examples; all ``>= 0``).

    Args:
        trace_one_tile_max_n: the trace kernel of at most this many examples is one tile of features with all k
            outputs at once (path ``one_tile``), not the one-output-at-a-time path ``trace_one_block``, whose
            per-layer, per-output overheads dominate at this size. Measured (2-core CPU, median of 9, one_tile vs
            trace_one_block): torchvision mobilenet_v3_small n = 8 240 vs 384 ms, resnet18 n = 2 131 vs 144; at
            n >= 64 the trace path wins (plain CNN n = 64 243 vs 397 ms).
        one_block_jacobian_bytes: the whole-model Jacobian path forms one block (no tiles) while
            ``J [n, k, P]`` takes at most this many bytes.
        trace_block_bytes: on the CPU, the trace kernel is one block of all n examples while their per-output
            captured tensors fit this many bytes (on CUDA: half the free memory).
        batched_backward_bytes: the k output gradients come from one batched backward pass (``is_grads_batched``)
            while they take at most this many bytes; else k backward passes. Measured (2-core CPU, trace kernel,
            k passes -> one batched pass): torchvision ViT-tiny n = 32 0.098 -> 0.073 s, nn.MultiheadAttention
            0.016 -> 0.0135 s; larger blocks gain nothing and would hold k times the gradients.
        replicated_backward_bytes: a verified block's output gradients may come from one backward of the block
            repeated k times (measured against the batched backward once per model structure, block shape and
            thread count, the replicated way first when the twin's capture gave the block's size; the faster
            kept) while k times its captured tensors take at most this many bytes; 0: never. Measured (2-core CPU, 2 threads): timm mobilenetv3 n = 4 0.42x the batched backward's time,
            efficientnet 0.65x, ConvNeXt 0.58x; transformers and ResNet 1.0-1.75x (not taken there). Both ways
            are exact; their roundings differ in the last bits, so the first calls of a model (which alternate
            while measuring) need not be bitwise equal (0 makes repeated calls bitwise reproducible).
        twin_max_bytes: the layer check runs on a perturbed copy of a model holding at most this many bytes of
            parameters and buffers; on the model itself above it.
        copy_max_elements: a broadcast parameter gets per-example copies while ``numel * b`` is at most this.
        vjp_chunk_elements: the batched backward through a parametrization or a site is cut into chunks of rows
            of at most this many elements (each op then streams from cache: the VJP of W / ||W||_row for 640 rows
            of a 256 x 256 weight took 377 ms in one batch, 140 ms in chunks of 32 rows, 2-core CPU).
        row_block_min: the trace path's symmetric products take row blocks of at least this many rows.
        ghost_chunk_elements: the ghost form's ``[rows, cols]`` intermediates are chunked to this many elements
            (8x on a GPU: fewer, larger launches).
        symmetric_block_rows: materialized symmetric products cut ``m`` rows into ``m // this`` blocks (at most 8),
            each multiplied against the rows from its own on and mirrored.
        product_slice_elements: a materialized product over more parameters than this is summed slice by
            slice (float32: a single dot product over all of them accumulates its rounding; 0: never sliced).
    """

    trace_one_tile_max_n: int = 16
    one_block_jacobian_bytes: int = 256 << 20
    trace_block_bytes: int = 1 << 30
    batched_backward_bytes: int = 64 << 20
    replicated_backward_bytes: int = 64 << 20
    twin_max_bytes: int = 1 << 30
    copy_max_elements: int = 1 << 24
    vjp_chunk_elements: int = 1 << 21
    row_block_min: int = 32
    ghost_chunk_elements: int = 1 << 23
    symmetric_block_rows: int = 64
    product_slice_elements: int = 8192

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"limits: {f.name} must be an int >= 0, got {v!r}")

    def changed(self) -> dict:
        """``{name: (value, default)}`` of the fields that differ from the defaults."""
        default = Limits()
        return {f.name: (getattr(self, f.name), getattr(default, f.name)) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}


_CURRENT: contextvars.ContextVar = contextvars.ContextVar("lazyhasty_ntk_limits", default=Limits())


def current() -> Limits:
    """The [`Limits`][lazyhasty.ntk.Limits] in effect (the defaults outside any [`limits`][lazyhasty.ntk.limits] block)."""
    return _CURRENT.get()


@contextlib.contextmanager
def limits(**changes):
    """Changes some [`Limits`][lazyhasty.ntk.Limits] for the NTK calls inside the ``with`` block (nested blocks compose).

    Args:
        **changes: field names of [`Limits`][lazyhasty.ntk.Limits] and their values (ints ``>= 0``).

    Returns:
        A context manager yielding the [`Limits`][lazyhasty.ntk.Limits] in effect inside the block.

    Raises:
        ValueError: an unknown name (the valid ones are listed) or a value that is not an int ``>= 0``.

    Example:
        >>> with limits(twin_max_bytes=0, trace_one_tile_max_n=0):
        ...     K = ntk_gram(model, x, kernel="trace")   # layer check on the model itself; trace_one_block path
    """
    names = {f.name for f in dataclasses.fields(Limits)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ValueError(f"limits: unknown {unknown}; the limits are {sorted(names)}")
    value = dataclasses.replace(current(), **changes)
    token = _CURRENT.set(value)
    try:
        yield value
    finally:
        _CURRENT.reset(token)


def cuda_free_bytes(device) -> int:
    """Bytes a new allocation on a CUDA ``device`` can use: the driver's free memory plus what torch's
    caching allocator holds unused. The driver's figure alone counts the cache as taken: after a first
    call on a large probe set (its blocks stay cached) a second one sees less memory, falls from one
    block to tiles and runs several times slower. Seen on an H100: the paper's ResNet18, trace alignment
    of 10,000 examples, in the benchmark after a first call or other cases, ran past 140 and 250 s; with
    this budget two consecutive calls took 25.5 s each (41.5 GiB held by the cache between them)."""
    import torch

    free = torch.cuda.mem_get_info(device)[0]
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
