"""The linearity metrics from any training loop: ``Monitor``, its logging triggers and its sinks.

    mon = Monitor(model_at_init, probe_x, groups={"noisy": (x_noisy, y_noisy)}, every=100)
    for step, (x, y) in enumerate(loader):
        ...  # the user's own training step
        if mon.due(step, loss.item()):
            mon.log(model, step)          # {"sign_similarity": ..., "ntk_alignment": ..., "group/noisy/loss": ...}

The reference's side is captured once ([`LinearityProbe`][lazyhasty.metrics.LinearityProbe], whose ``ntk=`` holds an
[`NTKReference`][lazyhasty.ntk.NTKReference]): a log runs one no-grad forward of the model for sign similarity and
representation alignment, and forms only the model's tangent kernel. Models are measured in eval mode on
their own device; their modes, buffers and the RNG states are restored bit for bit after each log.

Sinks never mix runs silently: each file sink records the Monitor's run header (metrics, kernel, probe size,
dtype, ...): a ``.jsonl`` log as its first row (``read_monitor_log`` returns it apart), a ``.csv`` beside it
(``<path>.header.json``). A file that already holds a run is refused unless ``append=True``, and then only one
of the same configuration is continued (a CSV only under its own columns); one process writes at a time.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ._loaders import all_inputs, model_device
from ._modes import measuring
from ._outputs import ProbeModel, output_tensor, pack_inputs
from .losses import LOSSES, per_example_loss, predictions_correct

METRICS = ("sign_similarity", "repr_alignment", "ntk_alignment", "ntk_rel_change", "param_distance")
DEFAULT_METRICS = ("sign_similarity", "repr_alignment", "ntk_alignment")


# --- sinks -----------------------------------------------------------------------------------------
HEADER_FORMAT = "lazyhasty.Monitor/1"
HEADER_KEY = "run_header"  # the first row of a .jsonl log: {"run_header": {...}}
# header entries that describe when or with what a file was written, not what its rows are
# (the cadence is recorded, not compared: a continued run may log more or less often)
_UNCOMPARED = ("created", "lazyhasty_version", "every", "geometric", "budget")


def header_path(path: str | os.PathLike) -> Path:
    """The run header of a ``.csv`` Monitor log: ``<path>.header.json`` beside it (a ``.jsonl`` log holds its
    header in its first row, ``{"run_header": {...}}``)."""
    path = Path(path)
    return path.with_name(path.name + ".header.json")


def header_difference(old: dict, new: dict) -> list[str]:
    """``["key: old -> new", ...]`` for every entry of two run headers that differs (when and by which version
    a file was written are not compared)."""
    keys = [k for k in dict.fromkeys([*old, *new]) if k not in _UNCOMPARED]
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def read_monitor_log(path: str | os.PathLike) -> tuple[dict | None, list[dict]]:
    """A ``.jsonl`` Monitor log: its run header and its rows.

    Args:
        path: the file a ``JSONLSink`` (or ``Monitor(sinks=["....jsonl"])``) wrote.

    Returns:
        ``(header, rows)``: the run header (metrics, kernel, probe examples, dtype, ...; None for a file written
        without a Monitor) and one dict per log, ``{"step": ..., metric: value, ...}``. A torn last row (a
        crash while writing it) is skipped with a warning.

    Example:
        >>> header, rows = read_monitor_log("probes.jsonl")   # doctest: +SKIP
        >>> header["kernel"], rows[-1]["ntk_alignment"]       # doctest: +SKIP
        ('trace', 0.93)
    """
    from ._runlog import read_rows

    rows = read_rows(Path(path))
    header = None
    if rows and set(rows[0]) == {HEADER_KEY}:
        header, rows = rows[0][HEADER_KEY], rows[1:]
    return header, rows


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive ``flock`` on the log file itself (created when missing) for the block: two processes never
    check or start one log at the same time. A file held for longer than a check (its writer holds it until it
    closes) is checked without the lock: it has rows, which the check then finds."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform
        yield True
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    held = False
    try:
        for _ in range(100):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
                break
            except BlockingIOError:
                time.sleep(0.01)
        yield held
    finally:
        os.close(fd)


class _FileSink:
    """What the file sinks share: a run header, no silent appending to another run's rows, a torn last row set
    aside, and one writing process (an ``flock`` held from the first row to ``close``).

    In a multi-process run every process may build the same Monitor with the same path (a Lightning ``ddp``
    script runs once per rank): only the process that writes rows takes the file; the others only check it.
    """

    kind = "rows"

    def __init__(self, path: str | os.PathLike, *, append: bool = False):
        if not isinstance(append, bool):
            raise TypeError(f"append must be True or False, got {append!r}")
        self.path, self.append = Path(path), append
        self.header: dict | None = None
        self._opened = False

    def open(self, header: dict | None) -> None:
        """Check the file against ``header`` (the Monitor's run header) and record the header.

        Raises:
            FileExistsError: the file holds rows and ``append`` is False.
            ValueError: ``append=True`` but the rows there were written by another configuration (the message
                names each difference).
        """
        if self._opened:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.path) as held:
            has_rows = self._has_rows()
            if has_rows and not self.append:
                raise FileExistsError(
                    f"{self.path} already holds the {self.kind} of a run: pass append=True to the sink to continue "
                    "that run (with the same configuration), or choose another path (sinks never mix runs "
                    "silently)")
            if has_rows and held:  # (a file another process is writing is never changed here)
                self._set_torn_row_aside()
            old = self._stored_header()
            if has_rows and old is not None and header is not None:
                diff = header_difference(old, header)
                if diff:
                    raise ValueError(f"{self.path} was written by another configuration of the Monitor ("
                                     + "; ".join(diff) + "): choose another path; append=True continues only the "
                                     "same configuration")
            elif has_rows and header is not None:
                warnings.warn(f"{self.path} has no run header: appending without checking which configuration "
                              "wrote its rows", RuntimeWarning, stacklevel=3)
            if header is not None and not has_rows and held and (old is None or header_difference(old, header)):
                self._write_header(header)  # a file without rows: its header is this run's
            self._owns_header = header is not None and not has_rows
            self._size_at_open = self.path.stat().st_size
            self.header, self._opened = header, True
            self._start(has_rows)

    def update_header(self, header: dict) -> None:
        """A new run header before any row (the cadence set by a callback): rewritten if this sink wrote it."""
        if getattr(self, "_owns_header", False) and getattr(self, "_lock_fd", None) is None:
            with _file_lock(self.path) as held:
                if not held or self._has_rows():
                    return
                self.close()
                self._write_header(header)
                self.header = header
                self._size_at_open = self.path.stat().st_size
                self._reopen()

    def _has_rows(self) -> bool:
        return self.path.exists() and self.path.stat().st_size > 0

    def _stored_header(self) -> dict | None:
        side = header_path(self.path)
        if not side.exists():
            return None
        try:
            return json.loads(side.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{side}: unreadable run header ({exc}); choose another path") from None

    def _write_header(self, header: dict) -> None:
        _atomic_json(header_path(self.path), header)

    def _set_torn_row_aside(self) -> None:
        data = self.path.read_bytes()
        if data.endswith(b"\n"):
            return
        # a crash mid-row: set the torn row aside, never glue the next one on it
        keep = data.rfind(b"\n") + 1
        from ._runlog import _aside

        aside = _aside(self.path, "torn")  # <path>.torn, then .torn-2, ... as a run log's
        aside.write_bytes(data[keep:])
        with open(self.path, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())
        warnings.warn(f"{self.path}: a torn last row ({len(data) - keep} bytes) was moved to {aside.name}",
                      RuntimeWarning, stacklevel=5)

    def _start(self, has_rows: bool) -> None:
        raise NotImplementedError

    def _ensure_open(self) -> None:
        if not self._opened:  # used without a Monitor: the same rules, without a header
            self.open(None)
        elif getattr(self, "_f", None) is None:  # unpickled in another process: the same run, appended to
            self._reopen()
        if getattr(self, "_lock_fd", None) is None:
            self._take()

    def _take(self) -> None:
        """Become the file's one writer: an ``flock`` held until ``close``, refused while another process holds
        it, and refused when another process wrote rows since ``open`` (unless ``append``)."""
        try:
            import fcntl
        except ImportError:
            self._lock_fd = -1
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            from ._runlog import _lock_holder

            holder = _lock_holder(self.path)
            if holder in (str(os.getpid()), getattr(self, "_pickled_by", None)):
                # this sink pickled from (or beside) the one holding the file: the same run, continued
                self._lock_fd = -1
                return
            raise FileExistsError(f"{self.path} is being written by another process (pid "
                                  f"{holder}): two runs never write into one log; choose another "
                                  "path") from None
        if not self.append and self.path.stat().st_size != self._size_at_open:
            os.close(fd)
            raise FileExistsError(f"{self.path} gained the {self.kind} of another run since this sink opened it: "
                                  "choose another path (sinks never mix runs silently)")
        self._lock_fd = fd

    def _reopen(self) -> None:
        self._f = open(self.path, "a")

    def _write(self, text: str) -> None:
        self._f.write(text)
        self._f.flush()
        os.fsync(self._f.fileno())

    def __getstate__(self) -> dict:
        # a sink sent to another process (Lightning's ddp_spawn pickles the callbacks) reopens its file there
        state = {k: v for k, v in self.__dict__.items() if k not in ("_f", "_w", "_lock_fd")}
        if getattr(self, "_lock_fd", None) is not None:
            state["_pickled_by"] = str(os.getpid())  # the writer: its copies continue its run
        return state

    def close(self) -> None:
        if getattr(self, "_f", None) is not None and not self._f.closed:
            self._f.close()
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            if fd >= 0:
                os.close(fd)  # releases the writer's lock
            self._lock_fd = None


class JSONLSink(_FileSink):
    """One JSON object per log, appended, flushed and fsync'd (a crash loses at most the row being written).

    The first row is the run header, ``{"run_header": {...}}`` (the Monitor's configuration: metrics, kernel,
    probe examples, dtype, ...); [`read_monitor_log`][lazyhasty.monitor.read_monitor_log] returns it apart
    from the rows.

    Args:
        path: the ``.jsonl`` file.
        append: continue a file that already holds a run (its header must equal this run's); default False: such
            a file is refused, so a rerun never mixes into an earlier run's rows.
    """

    def _has_rows(self) -> bool:
        if not self.path.exists():
            return False
        with open(self.path, "rb") as f:
            first = f.readline()
            more = f.read(1)
        return bool(more) or (bool(first) and not self._is_header_line(first))

    @staticmethod
    def _is_header_line(line: bytes) -> bool:
        try:
            row = json.loads(line)
        except ValueError:
            return False
        return isinstance(row, dict) and set(row) == {HEADER_KEY}

    def _stored_header(self) -> dict | None:
        if not self.path.exists():
            return None
        with open(self.path, "rb") as f:
            first = f.readline()
        if self._is_header_line(first):
            return json.loads(first)[HEADER_KEY]
        return super()._stored_header()  # a log of an earlier version: its header beside it

    def _write_header(self, header: dict) -> None:
        # in place, under the lock (a run with no row yet gets its new header): the locked file stays the log
        with open(self.path, "r+b" if self.path.exists() else "wb") as f:
            f.truncate(0)
            f.write((json.dumps({HEADER_KEY: header}, sort_keys=True) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())

    def _start(self, has_rows: bool) -> None:
        self._f = open(self.path, "a")

    def __call__(self, step: int, values: dict) -> None:
        self._ensure_open()
        self._write(json.dumps({"step": step, **values}) + "\n")


class CSVSink(_FileSink):
    """A CSV file with a header line; the columns are those of the first row (later new keys are an error).

    Args:
        path: the ``.csv`` file; its run header is written to ``<path>.header.json`` beside it.
        append: continue a file that already holds rows: its header line must be the columns of this run's rows
            and its run header this run's configuration; default False: such a file is refused.
    """

    def _start(self, has_rows: bool) -> None:
        self._columns = None
        if has_rows:
            with open(self.path, newline="") as f:
                self._columns = next(csv.reader(f), None)
        self._f, self._w = open(self.path, "a", newline=""), None

    def __call__(self, step: int, values: dict) -> None:
        self._ensure_open()
        row = {"step": step, **values}
        if getattr(self, "_w", None) is None:
            keys = list(row)
            if self._columns is not None and self._columns != keys:
                raise ValueError(f"{self.path} has the columns {self._columns}, but these rows have {keys}: a CSV "
                                 "never writes values under another header; choose another path")
            self._buf = io.StringIO()
            self._w = csv.DictWriter(self._buf, fieldnames=keys)
            if self._columns is None:
                self._w.writeheader()
            self._columns = keys
        extra = set(row) - set(self._columns)
        if extra:
            raise ValueError(f"{self.path}: new columns {sorted(extra)} after the header was written")
        self._w.writerow(row)
        text = self._buf.getvalue()
        self._buf.seek(0)
        self._buf.truncate()
        self._write(text)

    def _reopen(self) -> None:
        self._f, self._w = open(self.path, "a", newline=""), None


def _flat_hparams(header: dict) -> dict:
    out = {}
    for k, v in header.items():
        out[k] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v, sort_keys=True)
    return out


class TensorBoardSink:
    """``torch.utils.tensorboard.SummaryWriter`` scalars, one tag per metric; the run header as ``hparams``
    and as the text ``lazyhasty/monitor``.

    Args:
        writer_or_dir: a ``SummaryWriter`` or its ``log_dir``.
    """

    def __init__(self, writer_or_dir):
        if isinstance(writer_or_dir, (str, os.PathLike)):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError("TensorBoardSink needs tensorboard: pip install 'lazyhasty[monitor]'") from exc

            writer_or_dir = SummaryWriter(str(writer_or_dir))
        self.writer = writer_or_dir

    def open(self, header: dict | None) -> None:
        if header is None:
            return
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(_flat_hparams(header), {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("lazyhasty/monitor", "```\n" + json.dumps(header, indent=1, sort_keys=True) + "\n```")

    def __call__(self, step: int, values: dict) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()


class WandbSink:
    """``run.log(values, step=step)`` for a Weights & Biases run (``wandb.init(...)``; offline mode works); the
    run header goes into ``run.config["lazyhasty_monitor"]``."""

    def __init__(self, run):
        self.run = run

    def open(self, header: dict | None) -> None:
        if header is not None:
            self.run.config.update({"lazyhasty_monitor": header}, allow_val_change=True)

    def __call__(self, step: int, values: dict) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        pass


def _as_sink(s, append: bool = False):
    if isinstance(s, (str, os.PathLike)):
        p = Path(s)
        return CSVSink(p, append=append) if p.suffix == ".csv" else JSONLSink(p, append=append)
    if callable(s):
        return s
    raise TypeError(f"a sink is a path (.jsonl / .csv), a sink object or a callable(step, values), got {s!r}")


# --- the monitor -----------------------------------------------------------------------------------
def _labelled(data, name: str):
    """A group's ``(inputs, labels)``: a Dataset, an ``(x, y)`` pair, or named inputs with a ``labels`` key."""
    from .data import Dataset

    if isinstance(data, Dataset):
        return data.x, data.y
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0], data[1]
    if isinstance(data, Mapping) and isinstance(data.get("labels"), torch.Tensor):
        return {k: v for k, v in data.items() if k != "labels"}, data["labels"]
    raise TypeError(f"group {name!r} must be a Dataset, an (x, y) pair of tensors or a dict of named inputs with "
                    "a 'labels' tensor")


def _named_inputs(probe) -> bool:
    return isinstance(probe, Mapping) and "x" not in probe


def _rows(x) -> int:
    return x.shape[0]


def _check_cadence(every, geometric) -> None:
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"every must be a positive integer or None, got {every!r}")
    if geometric is not None and not (isinstance(geometric, float) and 0 < geometric < 1):
        raise ValueError(f"geometric must be a float in (0, 1), got {geometric!r}")


class Monitor:
    """Linearity metrics and group losses of a model against its reference, whenever a training loop asks.

    What it measures: the network in eval mode (dropout off, BatchNorm on its running statistics), whatever
    mode the model and the reference are in; each module's mode, every buffer and the RNG states are restored
    bit for bit after each log (`measuring`), so the training step after a log is the
    one that would have run without it. The reference's side (sign patterns, features, ``K_0``) is captured
    once, here; a log runs one no-grad forward of the model and forms only its tangent kernel.

    The kernel: ``ntk_alignment`` is ``KA(K_t, K_0)`` of the ``kernel=`` chosen here, by default the **trace**
    kernel ``[n, n]`` (the sum over the k outputs of each block; k^2 times cheaper to form), while
    [`ntk_alignment`][lazyhasty.ntk.ntk_alignment] defaults to the full ``[n, k, n, k]`` kernel. The two are
    different quantities (0.995 vs 0.59 on a trained resnet18); the run header of every sink records which one.

    Args:
        reference: the model at init (a module), or an ``AlphaScaled`` / ``Linearized`` model, whose frozen
            initialization is taken (alignments are scale-invariant).
        probe: the examples the linearity metrics use: a tensor ``[n, ...]``, a Dataset, a loader, or named
            inputs ``{key: [n, ...] tensor}`` passed to the model as keyword arguments (``labels`` is dropped),
            e.g. a tokenized batch for a Hugging Face model.
        groups: ``{name: Dataset | (x, y) | {named inputs..., "labels": y}}`` whose mean loss (``loss=``) and
            accuracy are logged as ``group/<name>/loss`` and ``group/<name>/acc``. Default: none.
        metrics: any of ``sign_similarity``, ``repr_alignment``, ``ntk_alignment``, ``ntk_rel_change``,
            ``param_distance``. Default None: the first three (without ``sign_similarity`` for a model without
            ReLUs; asked for explicitly, that is an error).
        every: log when ``step % every == 0``. Default None.
        geometric: ``q`` in (0, 1): log when the tracked loss first falls below ``L0 q^m`` (m = 1, 2, ...; the
            paper's logging). With ``every`` and ``geometric`` both None every call of ``due`` is due.
        kernel: ``"trace"`` (default) or ``"full"``: the tangent kernel of ``ntk_alignment`` / ``ntk_rel_change``.
        output: which tensor of the model's output is measured (the tangent kernel, the group losses): an index,
            a key, an attribute name or a callable. Default None: the output itself when it is a tensor, else its
            ``logits`` (a Hugging Face ``ModelOutput``, a dict).
        dtype: precision of the tangent kernel and of the representation Gram products (e.g.
            ``torch.float64``); default None: the model's (sums are float64 either way).
        block_size: examples per block of the tangent-kernel computation; default None: chosen from n and k.
        loss: ``cross_entropy`` (default), ``logistic`` or ``mse``, for the group losses.
        sinks: paths (``.jsonl``: crash-safe JSON lines; ``.csv``), ``JSONLSink`` / ``CSVSink`` /
            ``TensorBoardSink`` / ``WandbSink`` objects or any ``callable(step, values)``. Each sink with an
            ``open(header)`` method gets the run header first (``header``: metrics, kernel, probe examples,
            dtype, ...): a ``.jsonl`` as its first row, a ``.csv`` beside it (``<path>.header.json``); file sinks
            refuse a file that already holds a run unless ``append=True``, and then continue only one written by
            the same configuration.
        append: passed to the sinks given as paths. Default False.
        batch_size: examples per forward of the no-grad probes. Default 1024.
        budget: the largest share of wall time the probes may take, e.g. 0.05. ``due`` then also waits until
            the loop has run ``cost * (1 - budget) / budget`` seconds since the last log (``cost``: that log's
            own measured time), which stretches the cadence, never the exactness of a value. Default None.
        process_group: a ``torch.distributed`` group (or ``"world"``), e.g. in a DDP script: each rank passes its
            own shard of ``probe`` and of each group (possibly empty) and every rank gets the values over the
            union (give ``sinks`` on rank 0 only, or every rank writes them). ``due`` follows rank 0's decision
            when it depends on a loss or a clock (``geometric``, ``budget``).

    Every row [`log`][lazyhasty.monitor.Monitor.log] writes also has ``probe_seconds`` (this log's measurement)
    and ``probe_overhead`` (the share of wall time since the first ``due`` / ``log`` call spent in logs).

    Example:
        >>> mon = Monitor(model_at_init, probe_x, every=100, sinks=["probes.jsonl"])
        >>> for step, (x, y) in enumerate(loader):
        ...     ...                                   # the training step
        ...     if mon.due(step, loss.item()):
        ...         mon.log(model, step)              # {"sign_similarity": ..., "ntk_alignment": ..., ...}
    """

    def __init__(self, reference, probe, *, groups: Mapping | None = None,
                 metrics: Sequence[str] | None = None, every: int | None = None, geometric: float | None = None,
                 kernel: str = "trace", output=None, dtype: torch.dtype | None = None, block_size: int | None = None,
                 loss: str = "cross_entropy", sinks: Sequence = (), append: bool = False, batch_size: int = 1024,
                 budget: float | None = None, process_group=None):
        from .regimes import AlphaScaled, Linearized

        chosen = metrics is not None
        metrics = DEFAULT_METRICS if metrics is None else metrics
        if isinstance(metrics, str) or not all(isinstance(m, str) for m in metrics):
            raise TypeError(f"metrics must be a sequence of metric names, got {metrics!r}")
        unknown = set(metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
        _check_cadence(every, geometric)
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or not 0 < budget < 1):
            raise ValueError(f"budget must be a share of wall time in (0, 1), e.g. 0.05, got {budget!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if kernel not in ("trace", "full"):
            raise ValueError(f"kernel must be 'trace' or 'full', got {kernel!r}")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
        if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                       or block_size < 1):
            raise ValueError(f"block_size must be a positive integer or None, got {block_size!r}")
        if isinstance(reference, (AlphaScaled, Linearized)):
            from ._loaders import model_and_reference

            inner, reference = model_and_reference(reference, None)
            trainable = {n for n, p in inner.named_parameters() if p.requires_grad}
        elif isinstance(reference, nn.Module):
            trainable = {n for n, p in reference.named_parameters() if p.requires_grad}
        else:
            raise TypeError(f"reference must be the model at init or an AlphaScaled / Linearized model, got "
                            f"{type(reference).__name__}")
        self.metrics, self.every, self.geometric, self.loss = tuple(metrics), every, geometric, loss
        self.kernel, self.output, self.dtype, self.block_size = kernel, output, dtype, block_size
        self.budget = None if budget is None else float(budget)
        self.reference = reference
        from . import _dist

        self.group = _dist.resolve(process_group)
        device = model_device(reference)
        self._packing = None
        if _named_inputs(probe):
            if self.group is not None:
                raise ValueError("named-input probes (a dict of tensors) are not sharded over a process_group: "
                                 "pass each rank's inputs as one tensor")
            x, self._packing = pack_inputs(probe, name="probe")
            x = x.to(device)
        elif self.group is None:
            x = all_inputs(probe, device)
        else:  # this rank's shard, possibly empty
            x = _dist.own_shard(probe, self.group, device)
        self.groups = {}
        for name, data in (groups or {}).items():
            gx, gy = _labelled(data, name)
            if isinstance(gx, Mapping):
                if self._packing is None:
                    raise ValueError(f"group {name!r} has named inputs but the probe set does not: give both as "
                                     "dicts of tensors or both as tensors")
                gx, _ = pack_inputs(gx, self._packing, name=f"group {name!r}")
            if gx.shape[0] != gy.shape[0] or (gx.shape[0] == 0 and self.group is None):
                raise ValueError(f"group {name!r}: x has {gx.shape[0]} rows and y {gy.shape[0]} (non-empty, equal)")
            self.groups[name] = (gx, gy)
        self._wrap = self._packing is not None or output is not None
        if not self._wrap and x.shape[0]:  # a model returning a ModelOutput / dict: measured through its logits
            with measuring(reference), torch.no_grad():
                self._wrap = not isinstance(reference(x[:1]), torch.Tensor)
        probed = self._probe_model(reference, cache=False)
        if self._wrap:
            if x.shape[0]:
                with measuring(reference), torch.no_grad():
                    probed(x[:1])  # a clear error now, naming the output, if no tensor can be picked
            trainable = {f"model.{n}" for n in trainable}
        from .metrics import LinearityProbe

        want_ntk = {"ntk_alignment", "ntk_rel_change"} & set(metrics)
        need_probe = {"sign_similarity", "repr_alignment"} & set(metrics)
        self.probe = None
        if need_probe or want_ntk:
            self.probe = LinearityProbe.capture(probed, x, batch_size=batch_size, ntk=kernel if want_ntk else None,
                                                trainable=trainable, process_group=self.group, dtype=dtype,
                                                ntk_options=dict(dtype=dtype, block_size=block_size))
            if "sign_similarity" in metrics and self.probe.signs is None and not chosen:
                # the default metrics on a model without ReLUs (GELU transformers): the others are measured
                self.metrics = metrics = tuple(m for m in metrics if m != "sign_similarity")
            elif "sign_similarity" in metrics and self.probe.signs is None:
                raise ValueError("sign_similarity needs ReLUs in the model (nn.ReLU modules or F.relu / torch.relu / "
                                 "clamp(min=0) calls); drop it from metrics=")
        self.theta0 = {n: p.detach().clone() for n, p in reference.named_parameters()} \
            if "param_distance" in metrics else None
        n_probe = int(x.shape[0])
        if self.group is not None:
            n_probe = int(_dist.sum_i64(torch.tensor([n_probe], dtype=torch.int64), self.group)[0])
        self.header = self._header(reference, x, n_probe, batch_size)
        self.sinks = [_as_sink(s, append) for s in sinks]
        for s in self.sinks:
            if hasattr(s, "open"):
                s.open(self.header)
        self._L0 = None
        self._next_m = 1
        self._pending = False  # a geometric level was crossed while the budget held the log back
        self._clock_start = None  # the first due() / log() call
        self._last_end = None
        self._last_cost = None
        self._probe_seconds = 0.0

    def _header(self, reference: nn.Module, x: torch.Tensor, n_probe: int, batch_size: int) -> dict:
        from . import __version__, _dist

        model_dtype = next((p.dtype for p in reference.parameters()), torch.float32)
        ntk = {"ntk_alignment", "ntk_rel_change"} & set(self.metrics)
        return {
            "format": HEADER_FORMAT,
            "metrics": list(self.metrics),
            "kernel": self.kernel if ntk else None,
            "probe_examples": n_probe,
            "inputs": self._packing.describe() if self._packing is not None else
            [list(x.shape[1:]), str(x.dtype).replace("torch.", "")],
            "dtype": str(self.dtype or model_dtype).replace("torch.", ""),
            "block_size": self.block_size,
            "output": None if self.output is None else (self.output if isinstance(self.output, (int, str)) else
                                                        getattr(self.output, "__qualname__", repr(self.output))),
            "loss": self.loss if self.groups else None,
            "groups": {name: int(gy.shape[0]) for name, (_, gy) in self.groups.items()},
            "every": self.every,
            "geometric": self.geometric,
            "budget": self.budget,
            "batch_size": batch_size,
            "reference": type(reference).__name__,
            "parameters": sum(p.numel() for p in reference.parameters()),
            "ranks": 1 if self.group is None else _dist.rank_and_size(self.group)[1],
            "lazyhasty_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def _probe_model(self, model: nn.Module, cache: bool = True) -> nn.Module:
        """``model`` as the probes take it: itself, or wrapped to take packed named inputs / give its logits (one
        wrapper per model object, so the tangent-kernel engine's per-model checks stay cached)."""
        if not self._wrap:
            return model
        if cache:
            kept = getattr(self, "_wrapped", None)
            if kept is not None and kept.model is model:
                return kept
        wrapped = ProbeModel(model, self.output, self._packing)
        if cache:
            self._wrapped = wrapped
        return wrapped

    # -- when ----------------------------------------------------------------------------------------
    def schedule(self, *, every: int | None = None, geometric: float | None = None) -> None:
        """Set the cadence before the first ``due`` / ``log`` (what the integrations' ``every_n_steps`` /
        ``geometric`` options do); the run header is updated.

        Raises:
            RuntimeError: the Monitor has already been asked or logged.
        """
        if self._clock_start is not None:
            raise RuntimeError("the cadence is set before the first due() / log() call")
        _check_cadence(every, geometric)
        self.every, self.geometric = every, geometric
        self.header = {**self.header, "every": every, "geometric": geometric}
        for s in self.sinks:
            if hasattr(s, "update_header"):
                s.update_header(self.header)
            elif isinstance(s, WandbSink):
                s.open(self.header)

    def due(self, step: int, loss: float | None = None) -> bool:
        """Whether ``step`` is a logging step.

        Args:
            step: the training step.
            loss: the tracked training loss (needed with ``geometric``).

        Returns:
            True every ``every`` steps, or at the first step below the next level ``L0 q^m`` of the tracked
            loss (the first call with a loss sets ``L0`` and is due); with ``budget``, only once the loop has
            run long enough since the last log (a geometric level crossed meanwhile stays due until then).
        """
        now = time.perf_counter()
        if self._clock_start is None:
            self._clock_start = now
        fired = self._trigger(step, loss)
        if self.budget is None:
            decision = fired
        else:
            if fired and self.geometric is not None:
                self._pending = True
            wanted = self._pending if self.geometric is not None else fired
            decision = wanted and self._affordable(now)
            if decision:
                self._pending = False
        if self.group is not None and (self.geometric is not None or self.budget is not None):
            from . import _dist

            decision = bool(_dist.broadcast_object(bool(decision), 0, self.group, nbytes=1))
        return decision

    def _trigger(self, step: int, loss) -> bool:
        if self.geometric is not None:
            if loss is None:
                raise ValueError("geometric logging needs the tracked loss: mon.due(step, loss)")
            loss = float(loss)
            if not math.isfinite(loss):
                return False
            if self._L0 is None:
                self._L0 = loss
                return True
            if loss < self._L0 * self.geometric ** self._next_m:
                while loss < self._L0 * self.geometric ** self._next_m:
                    self._next_m += 1
                return True
            return False
        if self.every is not None:
            return step % self.every == 0
        return True

    def _affordable(self, now: float) -> bool:
        if self._last_cost is None:
            return True
        return now - self._last_end >= self._last_cost * (1.0 - self.budget) / self.budget

    # -- what ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _group_losses(self, model: nn.Module) -> dict:
        out, dev = {}, model_device(model)
        for name, (gx, gy) in self.groups.items():
            tot, correct, n = 0.0, 0, 0
            for xb, yb in zip(gx.split(1024), gy.split(1024)):
                o = output_tensor(model(xb.to(dev)), self.output, "the model")
                yb = yb.to(dev)
                tot += float(per_example_loss(self.loss, o, yb).double().sum())
                correct += int(predictions_correct(self.loss, o, yb).sum())
                n += xb.shape[0]
            if self.group is not None:  # sums over every rank's shard of the group
                from . import _dist

                tot, correct, n = _dist.sum_f64(torch.tensor([tot, correct, n], dtype=torch.float64),
                                                self.group).tolist()
                if n == 0:
                    raise ValueError(f"group {name!r} is empty on every rank")
            out[f"group/{name}/loss"] = tot / n
            out[f"group/{name}/acc"] = correct / n
        return out

    def measure(self, model: nn.Module) -> dict:
        """The metrics of ``model`` now (no sink, no trigger, no timing).

        Args:
            model: the model being trained: the module whose parameter names match the reference's, or the
                reference's wrapper (``AlphaScaled`` / ``Linearized``: its inner model is measured).

        Returns:
            ``{metric: float}`` for the metrics asked for (``ntk_rel_change`` while ``K_0`` is stored) and
            ``group/<name>/loss`` / ``group/<name>/acc`` for each group.
        """
        from .regimes import AlphaScaled, Linearized

        inner = model.model if isinstance(model, (AlphaScaled, Linearized)) else model
        if not isinstance(inner, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(inner).__name__}")
        from . import _dist

        with _dist.failing_together(self.group, "Monitor.measure"), measuring(inner, self.reference):
            return self._measure(inner)

    def _measure(self, inner: nn.Module) -> dict:
        out: dict = {}
        probed = self._probe_model(inner)
        if self.probe is not None:
            got = self.probe.measure(probed)
            out.update({k: v for k, v in got.items() if k in self.metrics})
        if self.theta0 is not None:
            out["param_distance"] = self._param_distance(inner)
        if self.groups:
            out.update(self._group_losses(probed))
        return {k: float(v) for k, v in out.items()}

    def _param_distance(self, model: nn.Module) -> float:
        params = dict(model.named_parameters())
        if set(params) != set(self.theta0):
            missing, extra = sorted(set(self.theta0) - set(params)), sorted(set(params) - set(self.theta0))
            raise ValueError("param_distance: the model's parameters are not the reference's "
                             f"(missing {missing[:5]}, unexpected {extra[:5]})")
        num = den = 0.0
        for n, p in params.items():
            p0 = self.theta0[n]
            if p.shape != p0.shape:
                raise ValueError(f"param_distance: parameter {n!r} is {tuple(p.shape)} in the model but "
                                 f"{tuple(p0.shape)} in the reference: not the same architecture")
            p0 = p0.to(p.device)
            num += float((p.detach() - p0).double().pow(2).sum())
            den += float(p0.double().pow(2).sum())
        return (num / den) ** 0.5 if den > 0 else float("nan")

    def log(self, model: nn.Module, step: int, *, write: bool = True) -> dict:
        """Measure, hand the values to every sink, and return them.

        Args:
            model: as for [`measure`][lazyhasty.monitor.Monitor.measure].
            step: the training step the row is filed under.
            write: hand the row to the sinks. Default True; False on the ranks other than the one that writes
                (a ``process_group`` Monitor measures on every rank, together).

        Returns:
            [`measure`][lazyhasty.monitor.Monitor.measure]'s values plus ``probe_seconds`` (this measurement's
            wall time) and ``probe_overhead`` (the share of wall time since the first ``due`` / ``log`` call spent
            in logs, this one included).
        """
        start = time.perf_counter()
        if self._clock_start is None:
            self._clock_start = start
        values = self.measure(model)
        measured = time.perf_counter()
        cost = measured - start
        elapsed = measured - self._clock_start
        values["probe_seconds"] = cost
        values["probe_overhead"] = (self._probe_seconds + cost) / elapsed if elapsed > 0 else 1.0
        for s in self.sinks if write else ():
            s(int(step), values)
        end = time.perf_counter()
        self._probe_seconds += end - start
        self._last_cost, self._last_end = end - start, end
        return values

    def close(self) -> None:
        for s in self.sinks:
            if hasattr(s, "close"):
                s.close()

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
