"""A run's ``log.jsonl``: append-only rows that are never lost, whatever happened to the file.

Rules (what a resume may and may not do to a user's log):

- A torn *last* line (no newline after it and not a JSON object: a crash while writing it) is not a row.
  It is moved to ``log.jsonl.torn`` and reported; the rows before it stay.
- Any other damage (a line in the middle that is not a JSON object) is an error naming the file and the
  line; the file is left exactly as it is.
- The checkpoint counts the rows it knows. A log with fewer rows than that is an error (rows are
  missing): nothing is changed.
- The checkpoint carries a hash of every row it counts (8 bytes a row, :func:`row_digest`): any row
  before the checkpoint that was edited, deleted or inserted is an error naming the line (and which of
  the three it was); nothing is changed. The rows themselves are stored as they are.
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


def refuse_foreign(directory: Path, markers: tuple[str, ...], what: str) -> None:
    """Refuse a non-empty ``directory`` that holds none of ``markers`` (files lazyhasty writes first).

    Args:
        directory: where lazyhasty is about to write; a missing or empty one is fine.
        markers: names whose presence says lazyhasty created the directory.
        what: what lazyhasty would write there, for the message.

    Raises:
        FileExistsError: naming the directory and a few of its entries; nothing was touched.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    names = sorted(p.name for p in directory.iterdir())
    if any(m in names for m in markers):
        return
    # a run killed before its first file: only the lock, or a temp file of the marker, is there
    others = [n for n in names if n != LOCK_NAME and n not in {m + ".tmp" for m in markers}]
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise FileExistsError(f"{directory} is not empty and was not created by lazyhasty (no {markers[0]}; it "
                              f"holds {shown}): it is not a lazyhasty {what}, and its files are not replaced. "
                              "Nothing was touched; choose another (new or empty) directory.")


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


def row_digest(row: dict) -> bytes:
    """8 bytes of SHA-256 of a row's JSON line: what the checkpoint keeps of each row it counts."""
    return hashlib.sha256(json.dumps(row).encode()).digest()[:8]


def digests_tensor(digests: list[bytes]):
    """The digests as a ``[n, 8]`` uint8 tensor (what a ``weights_only`` checkpoint can hold)."""
    import torch

    return torch.frombuffer(bytearray(b"".join(digests)), dtype=torch.uint8).reshape(len(digests), 8) \
        if digests else torch.zeros(0, 8, dtype=torch.uint8)


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


def check_rows(path: Path, rows: list[dict], digests, checkpoint=None) -> None:
    """Check that the log's first rows are the ones the checkpoint counts, in order.

    Args:
        path: the log (named in the error).
        rows: its rows.
        digests: ``[n, 8]`` uint8, :func:`row_digest` of each row the checkpoint counts.
        checkpoint: the checkpoint's path, for the message.

    Raises:
        LogDamaged: naming the first line that differs and whether a row was edited, deleted or inserted.
    """
    want = [bytes(d) for d in digests.cpu().numpy()]
    have = [row_digest(r) for r in rows[:len(want) + 1]]
    fix = ("Nothing was changed: restore the log, or move the checkpoint aside to recompute the run from its "
           "start (the rows on disk are then checked, not lost).")
    ck = checkpoint or "the checkpoint"
    for i, w in enumerate(want):
        if i < len(have) and have[i] == w:
            continue
        if i < len(have) and i + 1 < len(want) and have[i] == want[i + 1]:
            why = f"it is the row {ck} counts as line {i + 2}: the row before it (line {i + 1}) was deleted"
        elif i + 1 < len(have) and have[i + 1] == w:
            why = f"a row was inserted here: the next line is the row {ck} counts as line {i + 1}"
        elif i < len(have):
            why = f"the row differs from the one {ck} counts there: it was edited"
        else:
            return  # fewer rows than counted: the caller says so
        raise LogDamaged(f"{path}, line {i + 1}: {why}. {fix}")


def read_rows(path: Path) -> list[dict]:
    """Rows for reading (``Run``): a torn last line is skipped with a warning, other damage is an error."""
    rows, torn = read_log(path)
    if torn is not None:
        warnings.warn(f"{path}: ignoring a torn last line ({len(torn)} bytes, a crash while writing it); "
                      f"{len(rows)} rows read", RuntimeWarning, stacklevel=3)
    return rows


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

    ``RunLog.open(path, n_checkpoint, digests=...)`` applies the rules of the module docstring;
    ``append(row)`` writes (fsync'd) or verifies a row; ``rows`` are the rows the run has now;
    ``digests()`` the ``[n, 8]`` hashes of those rows, for the checkpoint.
    """

    def __init__(self, path: Path, rows: list[dict], pending: list[dict]):
        self.path, self.rows, self.pending = path, rows, pending
        self._digests = [row_digest(r) for r in rows]
        self._file = open(path, "a")

    @classmethod
    def open(cls, path: Path, n_checkpoint: int | None, checkpoint: Path | None = None, *,
             digests=None) -> "RunLog":
        """Open a run's log at a resume (or its start).

        Args:
            path: ``log.jsonl``.
            n_checkpoint: how many rows the checkpoint counts (``None``: no checkpoint).
            checkpoint: its path, for messages.
            digests: the checkpoint's ``[n, 8]`` row hashes (``None``: not checked).

        Raises:
            LogDamaged: rows the checkpoint counts are missing or changed, or a middle line is not a row.
        """
        path = Path(path)
        rows, torn = read_log(path)
        known = n_checkpoint or 0
        if digests is not None:
            if digests.shape != (known, 8):
                raise LogDamaged(f"{checkpoint or 'the checkpoint'} holds {digests.shape[0]} row hashes for {known} "
                                 "rows: not a consistent lazyhasty checkpoint. Move it aside to recompute the run.")
            check_rows(path, rows, digests, checkpoint)
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
        return cls(path, rows[:known], rows[known:])

    def digests(self):
        """``[len(rows), 8]`` uint8: :func:`row_digest` of every row the run has, for its checkpoint."""
        return digests_tensor(self._digests)

    def append(self, row: dict) -> None:
        """Write ``row`` after the run's rows (or find it already on disk, recomputed by a resume)."""
        if self.pending:
            if _line(self.pending[0]) == _line(row):  # already on disk (a resume recomputing it)
                self.pending.pop(0)
                self._add(row)
                return
            aside = _aside(self.path, f"diverged-{len(self.rows)}")
            shutil.copy2(self.path, aside)
            warnings.warn(
                f"{self.path}: recomputed row {len(self.rows)} differs from the row on disk (another device or "
                f"library version?); the old log was copied to {aside.name} and the new rows replace it from there",
                RuntimeWarning, stacklevel=2)
            self._file.close()
            atomic_write(self.path, "".join(_line(r) for r in self.rows).encode())
            self._file = open(self.path, "a")
            self.pending = []
        self._file.write(_line(row))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._add(row)

    def _add(self, row: dict) -> None:
        self.rows.append(row)
        self._digests.append(row_digest(row))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
