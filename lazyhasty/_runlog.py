"""A run's ``log.jsonl``: append-only rows that are never lost, whatever happened to the file.

Rules (what a resume may and may not do to a user's log):

- A torn *last* line (no newline after it and not a JSON object: a crash while writing it) is not a row.
  It is moved to ``log.jsonl.torn`` and reported; the rows before it stay.
- Any other damage (a line in the middle that is not a JSON object) is an error naming the file and the
  line; the file is left exactly as it is.
- The checkpoint counts the rows it knows. A log with fewer rows than that is an error (rows are
  missing): nothing is changed.
- Rows are chained: each row of a run carries in ``"_prev"`` a hash of the row before it (the first row:
  of the run's id), and the checkpoint carries the hash of the last row it counts. Any row before the
  checkpoint that was edited, deleted or inserted is an error naming the line; nothing is changed.
  Readers (:func:`read_rows`) never see ``"_prev"``.
- Rows after the checkpoint's count (written between a row and the next checkpoint) are kept on disk:
  the resumed run recomputes them and checks each against the row on disk. Should one differ (another
  machine, another torch), the whole old log is first copied to ``log.jsonl.diverged-<n>``, then the
  new rows replace the old ones from there on. A log is never rewritten with fewer rows than it held.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path


class LogDamaged(ValueError):
    """A run log that cannot be resumed without losing rows; the files were left as they are."""


class RunLocked(RuntimeError):
    """Another process holds the directory (a run or an experiment being written); nothing was touched."""


LOCK_NAME = "lazyhasty.lock"


def _lock_holder(path: Path) -> str:
    """The pid holding the ``flock`` on ``path`` (from ``/proc/locks``, else as the holder wrote it)."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
                    continue
                maj, mnr, ino = parts[5].split(":")
                if (int(ino), int(maj, 16), int(mnr, 16)) == (st.st_ino, os.major(st.st_dev), os.minor(st.st_dev)):
                    return parts[4]
    except (OSError, ValueError):
        pass
    try:
        return Path(path).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextlib.contextmanager
def locked(directory: Path, what: str = "run directory"):
    """Hold an exclusive ``fcntl.flock`` on ``directory/lazyhasty.lock`` for the ``with`` block.

    The lock goes with the process: a killed holder releases it, so a resume after SIGKILL is never
    refused. Where ``/proc/locks`` is missing (not Linux) the holder writes its pid into the lock file.

    Args:
        directory: created when missing.
        what: how the error names it.

    Raises:
        RunLocked: another process (or another open of it in this process) holds it; the error names the
            holder's pid.
    """
    directory = Path(directory)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _lock_holder(path)
            mine = " (this process)" if pid == str(os.getpid()) else ""
            raise RunLocked(f"{directory} is in use by another process (pid {pid}{mine}, holding {path}): two "
                            f"processes on one {what} would corrupt it. Nothing was touched; wait for it to end, "
                            "or stop it, then resume.") from None
        if not os.path.exists("/proc/locks"):
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def payload_digest(obj) -> str:
    """SHA-256 (hex) of a checkpoint payload's content: every tensor's dtype, shape and bytes, every other value.

    Computed over what :func:`torch.load` returns, so that a damaged file that still loads (a flipped bit in a
    tensor's storage, in a number of the pickle) gives another digest. Dict keys are taken in their order.

    Args:
        obj: nested dicts, lists and tuples of tensors, numbers, strings, bools and ``None``.

    Returns:
        64 hex digits.
    """
    import torch

    h = hashlib.sha256()

    def walk(o) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(o.shape)}:".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, dict):
            h.update(f"D{len(o)}:".encode())
            for k, v in o.items():
                walk(k)
                walk(v)
        elif isinstance(o, (list, tuple)):
            h.update(f"{'L' if isinstance(o, list) else 'U'}{len(o)}:".encode())
            for v in o:
                walk(v)
        else:
            h.update(f"{type(o).__name__}:{o!r};".encode())

    walk(obj)
    return h.hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


CHAIN = "_prev"  # the key of a row's link to the row before it


def link(prev: dict | None, seed: str) -> str:
    """The ``"_prev"`` value of the row after ``prev`` (``None``: of the first row of the run ``seed``)."""
    data = b"first:" + seed.encode() if prev is None else json.dumps(prev).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def read_log(path: Path) -> tuple[list[dict], bytes | None]:
    """The rows of a ``log.jsonl`` (as on disk, ``"_prev"`` included) and the bytes of a torn last line.

    Args:
        path: the log file; a missing file has no rows.

    Returns:
        ``(rows, torn)``: ``torn`` is ``None`` when the last line is whole.

    Raises:
        LogDamaged: naming the file and the line, for any line but the last that is not a JSON object.
    """
    path = Path(path)
    if not path.exists():
        return [], None
    lines = path.read_bytes().split(b"\n")
    rows: list[dict] = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except (ValueError, UnicodeDecodeError) as exc:
            if i == len(lines) - 1:  # no newline after it: the write was interrupted
                return rows, raw
            raise LogDamaged(
                f"{path}, line {i + 1}: not a log row ({str(exc)[:80]}); the file was left as it is. Repair or "
                "remove that line (the rows after it are kept), then resume.") from None
        rows.append(row)
    return rows, None


def _unchained(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != CHAIN}


def check_chain(path: Path, rows: list[dict], n: int, seed: str, head: str | None, checkpoint=None) -> None:
    """Check that the first ``n`` rows are the run's rows in order, and the ``n``-th the checkpoint's last.

    Args:
        path: the log (named in the error).
        rows: its rows as on disk (``"_prev"`` included).
        n: how many rows the checkpoint counts (at most ``len(rows)``).
        seed: the run's id (the first row's link).
        head: the checkpoint's hash of its last counted row (``link(rows[n - 1])``); ``None``: not checked.
        checkpoint: the checkpoint's path, for the message.

    Raises:
        LogDamaged: naming the first line that breaks the chain.
    """
    fix = ("Nothing was changed: restore the log, or move the checkpoint aside to recompute the run from its "
           "start (the rows on disk are then checked, not lost).")
    for i in range(n):
        want = link(rows[i - 1] if i else None, seed)
        got = rows[i].get(CHAIN)
        if got == want:
            continue
        if got is None:
            raise LogDamaged(f"{path}, line {i + 1}: the row carries no link to the row before it ({CHAIN!r}): it "
                             f"was not written by this run, or was edited. {fix}")
        if i == 0:
            raise LogDamaged(f"{path}, line 1: the first row is not this run's (its link names another run: a log "
                             f"copied from another run directory, or rows inserted before it). {fix}")
        earlier = [j + 1 for j in range(i - 1) if link(rows[j], seed) == got]
        why = (f"its link is that of the row after line {earlier[-1]}: a copied row was inserted here, or lines "
               f"{earlier[-1] + 1}..{i} were inserted" if earlier else f"line {i} was edited, or rows between lines {i} and {i + 1} were deleted or "
               "inserted")
        raise LogDamaged(f"{path}, line {i + 1}: this row does not follow line {i} ({why}). {fix}")
    if head is not None and n and link(rows[n - 1], seed) != head:
        raise LogDamaged(f"{path}, line {n}: not the last row {checkpoint or 'the checkpoint'} counts (the row was "
                         f"edited, or the checkpoint belongs to other rows). {fix}")


def read_rows(path: Path) -> list[dict]:
    """Rows for reading (``Run``), without their links: a torn last line is skipped with a warning, other
    damage is an error."""
    rows, torn = read_log(path)
    if torn is not None:
        warnings.warn(f"{path}: ignoring a torn last line ({len(torn)} bytes, a crash while writing it); "
                      f"{len(rows)} rows read", RuntimeWarning, stacklevel=3)
    return [_unchained(r) for r in rows]


def _aside(path: Path, tag: str) -> Path:
    cand = path.with_name(f"{path.name}.{tag}")
    i = 1
    while cand.exists():
        i += 1
        cand = path.with_name(f"{path.name}.{tag}-{i}")
    return cand


def _line(row: dict) -> str:
    return json.dumps(row) + "\n"


class RunLog:
    """The log of a run being trained: known rows, rows on disk awaiting recomputation, appends.

    ``RunLog.open(path, n_checkpoint, seed=run_id, head=...)`` applies the rules of the module docstring;
    ``append(row)`` writes (fsync'd, linked to the row before) or verifies a row; ``rows`` are the rows the
    run has now (without links); ``head`` is the link the next row gets (the checkpoint stores it).
    ``seed=None``: a run of an older lazyhasty, whose rows carry no links (and get none).
    """

    def __init__(self, path: Path, rows: list[dict], pending: list[dict], seed: str | None, head: str | None):
        self.path, self.rows, self.pending = path, rows, pending
        self.seed, self.head = seed, head
        self._file = open(path, "a")

    @classmethod
    def open(cls, path: Path, n_checkpoint: int | None, checkpoint: Path | None = None, *, seed: str | None = None,
             head: str | None = None) -> "RunLog":
        path = Path(path)
        rows, torn = read_log(path)
        known = n_checkpoint or 0
        if seed is not None:
            check_chain(path, rows, min(known, len(rows)), seed, head if known <= len(rows) else None, checkpoint)
        if len(rows) < known:
            raise LogDamaged(
                f"{path} holds {len(rows)} rows but {checkpoint or 'the checkpoint'} counts {known}"
                f"{' (its last line is torn)' if torn is not None else ''}: rows the run wrote are missing (the "
                "log was truncated or edited). Nothing was changed: restore the log, or move the checkpoint "
                "aside to recompute the run from its start (the rows on disk are then checked, not lost).")
        if torn is not None:
            aside = _aside(path, "torn")
            aside.write_bytes(torn)
            warnings.warn(f"{path}: its last line was torn (a crash while writing it); moved to {aside.name}. "
                          f"{len(rows)} rows kept; the run recomputes the rest.", RuntimeWarning, stacklevel=3)
        if torn is not None or (path.exists() and not path.read_bytes().endswith(b"\n") and rows):
            atomic_write(path, "".join(_line(r) for r in rows).encode())  # every row stays
        head = None if seed is None else link(rows[known - 1] if known else None, seed)
        return cls(path, [_unchained(r) for r in rows[:known]], rows[known:], seed, head)

    def _linked(self, row: dict) -> dict:
        return row if self.seed is None else {**row, CHAIN: self.head}

    def append(self, row: dict) -> None:
        """Write ``row`` after the run's rows (or find it already on disk, recomputed by a resume)."""
        row = _unchained(row)
        linked = self._linked(row)
        if self.pending:
            if _line(self.pending[0]) == _line(linked):  # already on disk (a resume recomputing it)
                self.pending.pop(0)
                self._advance(row, linked)
                return
            aside = _aside(self.path, f"diverged-{len(self.rows)}")
            shutil.copy2(self.path, aside)
            warnings.warn(
                f"{self.path}: recomputed row {len(self.rows)} differs from the row on disk (another device or "
                f"library version?); the old log was copied to {aside.name} and the new rows replace it from there",
                RuntimeWarning, stacklevel=2)
            self._file.close()
            self.head = None if self.seed is None else link(None, self.seed)
            lines = []
            for r in self.rows:
                lines.append(_line(self._linked(r)))
                self.head = None if self.seed is None else link(self._linked(r), self.seed)
            atomic_write(self.path, "".join(lines).encode())
            self._file = open(self.path, "a")
            self.pending = []
        self._file.write(_line(linked))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._advance(row, linked)

    def _advance(self, row: dict, linked: dict) -> None:
        self.rows.append(row)
        if self.seed is not None:
            self.head = link(linked, self.seed)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
