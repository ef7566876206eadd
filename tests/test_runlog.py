"""Run directories: no row of a log is ever lost, every resume continues exactly or refuses with the reason."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lazyhasty._runlog import LogDamaged, read_log
from lazyhasty.train import Run, TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).parent))
from test_train import _script, small_setup  # noqa: E402


class Crash(RuntimeError):
    pass


def _train(run_dir, steps=30, crash_at=None, **kw):
    net, ds = small_setup()
    cfg = TrainConfig(steps=steps, lr=0.5, loss="logistic", log_every=1, batch_size=16, probe_every=0)

    def on_log(row, net):
        if crash_at is not None and row["step"] == crash_at:
            raise Crash("after writing the row, before its checkpoint")

    return Trainer(net, ds, cfg, run_dir, on_log=on_log, **kw).fit(resume=True)


@pytest.fixture(scope="module")
def reference_rows(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("ref") / "run").rows


def _lines(path):
    return Path(path).read_bytes().split(b"\n")


def test_damaged_middle_line_is_an_error_and_the_file_is_kept(tmp_path, reference_rows):
    _train(tmp_path / "r")
    log = tmp_path / "r" / "log.jsonl"
    lines = _lines(log)
    lines[14] = lines[14][:20]  # a line in the middle cut short
    log.write_bytes(b"\n".join(lines))
    before = log.read_bytes()
    with pytest.raises(LogDamaged, match=r"log.jsonl, line 15"):
        _train(tmp_path / "r")
    with pytest.raises(LogDamaged, match="line 15"):
        Run(tmp_path / "r")
    assert log.read_bytes() == before  # untouched: the 30 good rows are all still there
    assert len([x for x in before.split(b"\n") if x.strip()]) == len(reference_rows)


def test_torn_last_line_beyond_the_checkpoint_is_dropped_and_said(tmp_path, reference_rows):
    _train(tmp_path / "r", crash_at=None, steps=30)
    log = tmp_path / "r" / "log.jsonl"
    with open(log, "ab") as f:
        f.write(b'{"step": 31, "train_lo')  # a crash while writing a row the checkpoint does not count
    with pytest.warns(RuntimeWarning, match="torn last line"):
        assert Run(tmp_path / "r").rows == reference_rows
    with pytest.warns(RuntimeWarning, match="torn"):
        run = _train(tmp_path / "r")
    assert run.rows == reference_rows
    assert (tmp_path / "r" / "log.jsonl.torn").read_bytes() == b'{"step": 31, "train_lo'
    assert log.read_bytes().endswith(b"\n")


def test_torn_row_that_the_checkpoint_counts_is_refused(tmp_path):
    _train(tmp_path / "r")
    log = tmp_path / "r" / "log.jsonl"
    data = log.read_bytes()
    log.write_bytes(data[:-25])  # the last row (counted by the checkpoint) torn
    before = log.read_bytes()
    with pytest.raises(LogDamaged, match="counts 31"):
        _train(tmp_path / "r")
    assert log.read_bytes() == before


def test_rows_after_the_checkpoint_are_recomputed_and_checked_not_dropped(tmp_path, reference_rows):
    with pytest.raises(Crash):
        _train(tmp_path / "r", crash_at=12)  # row 12 on disk, checkpoint counts rows 0..11
    log = tmp_path / "r" / "log.jsonl"
    assert len(read_log(log)[0]) == 13
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["n_rows"] == 12
    assert _train(tmp_path / "r").rows == reference_rows  # none doubled, none lost
    assert not list((tmp_path / "r").glob("log.jsonl.diverged*"))


def test_a_recomputed_row_that_differs_keeps_the_old_log_aside(tmp_path, reference_rows):
    with pytest.raises(Crash):
        _train(tmp_path / "r", crash_at=12)
    log = tmp_path / "r" / "log.jsonl"
    rows = read_log(log)[0]
    rows[12]["train_loss"] = 123.0  # as if another machine had written it
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(RuntimeWarning, match="differs"):
        assert _train(tmp_path / "r").rows == reference_rows
    aside, = (tmp_path / "r").glob("log.jsonl.diverged*")
    assert read_log(aside)[0] == rows  # the old rows, all of them


@pytest.mark.parametrize("damage", ["truncated", "random", "pickle-garbage", "key-garbage", "empty",
                                    "not-a-checkpoint"])
def test_damaged_checkpoint_is_a_clear_error_and_moving_it_aside_recomputes(tmp_path, reference_rows, damage):
    with pytest.raises(Crash):
        _train(tmp_path / "r", crash_at=20)
    ck = tmp_path / "r" / "checkpoint.pt"
    data = ck.read_bytes()
    if damage == "truncated":
        ck.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        ck.write_bytes(random.Random(len(data)).randbytes(4096))
    elif damage == "pickle-garbage":  # random bytes raise anything: IndexError, KeyError, UnicodeDecodeError...
        ck.write_bytes(b"\x80\x02.")  # STOP on an empty stack: IndexError inside torch.load
    elif damage == "key-garbage":
        ck.write_bytes(random.Random(20).randbytes(4096))  # a KeyError inside torch.load
    elif damage == "empty":
        ck.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(3)}, ck)
    log_before = (tmp_path / "r" / "log.jsonl").read_bytes()
    with pytest.raises(LogDamaged, match=r"checkpoint.pt"):
        _train(tmp_path / "r")
    assert (tmp_path / "r" / "log.jsonl").read_bytes() == log_before
    ck.rename(tmp_path / "r" / "checkpoint.pt.damaged")
    assert _train(tmp_path / "r").rows == reference_rows  # recomputed from step 0, rows checked


def test_corrupt_config_is_a_clear_error(tmp_path):
    _train(tmp_path / "r", steps=3)
    (tmp_path / "r" / "config.json").write_text('{"train": {"steps": 3')
    with pytest.raises(ValueError, match=r"config.json is corrupt"):
        _train(tmp_path / "r", steps=3)
    with pytest.raises(ValueError, match=r"config.json is corrupt"):
        Run(tmp_path / "r")


def test_resume_refuses_a_changed_architecture(tmp_path):
    net, ds = small_setup()
    cfg = TrainConfig(steps=3, lr=0.5, loss="logistic", log_every=1, probe_every=0)
    Trainer(net, ds, cfg, tmp_path / "r").fit()
    other, _ = small_setup()
    other[1] = torch.nn.Tanh()  # same class name, same parameter count
    with pytest.raises(ValueError, match="modules or parameter shapes changed"):
        Trainer(other, ds, cfg, tmp_path / "r").fit(resume=True)


def test_fault_injection_kill_and_damage(tmp_path):
    """kill -9 at random moments and damage the files between runs: no row on disk is ever lost.

    Damage: a torn row, a row the checkpoint counts cut short, a truncated checkpoint, a deleted / inserted /
    edited middle row, a bit flip in the checkpoint, and a second process started on the directory.
    """
    steps = 400
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    subprocess.run([sys.executable, "-c", _script(ref_dir, steps)], check=True, env=env, timeout=300)
    want = Run(ref_dir).rows
    log, ck = run_dir / "log.jsonl", run_dir / "checkpoint.pt"
    rng = random.Random(0)
    kinds = ["torn", "cut", "checkpoint", "delete-row", "insert-row", "edit-row", "bitflip", "second-process"]
    schedule = rng.sample(kinds, len(kinds)) + [rng.choice(kinds + ["none"]) for _ in range(4)]

    def on_disk():
        return read_log(log)[0] if log.exists() else []

    def middle_rows(edit):
        lines = [ln for ln in _lines(log) if ln.strip()] if log.exists() else []
        if len(lines) >= 4 and log.read_bytes().endswith(b"\n"):
            edit(lines, rng.randrange(1, len(lines) - 2))
            log.write_bytes(b"".join(ln + b"\n" for ln in lines))

    refusals = kills = locked_out = 0
    damage = "none"
    for it in range(len(schedule) + 1):
        seen = on_disk()
        snapshot = {p: p.read_bytes() for p in run_dir.glob("*")} if run_dir.exists() else {}
        n = 2 if damage == "second-process" else 1
        procs = [subprocess.Popen([sys.executable, "-c", _script(run_dir, steps)], env=env, stderr=subprocess.PIPE)
                 for _ in range(n)]
        # kill at a random moment: blind (maybe before the files are even read), or once the run is past its
        # checks (the log changed, or the second process was turned away) so that damage is always met
        size0 = log.stat().st_size if log.exists() else -1
        blind = n == 1 and rng.random() < 0.4
        deadline = time.time() + (rng.uniform(1.0, 2.5) if blind else 120)
        while time.time() < deadline and any(p.poll() is None for p in procs):
            if not blind and (any(p.poll() is not None for p in procs) if n == 2 else
                              (log.exists() and log.stat().st_size != size0)):
                blind, deadline = True, time.time() + rng.uniform(0.0, 1.0)
            time.sleep(0.02)
        errs = []
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                kills += 1
            errs.append(p.communicate()[1])
        outcomes = []
        for p, err in zip(procs, errs):
            if p.returncode in (0, -signal.SIGKILL):
                outcomes.append("ran")
            elif b"RunLocked" in err:  # the second process: refused at once, naming the holder
                assert b"in use by another process (pid " in err, err.decode()[-2000:]
                outcomes.append("locked")
            else:
                assert b"LogDamaged" in err, err.decode()[-2000:]
                outcomes.append("damaged")
        locked_out += outcomes.count("locked")
        if n == 2:
            assert outcomes.count("locked") <= 1
        if "damaged" in outcomes:
            # a refusal: it names the damage, and (alone on the directory) left it exactly as it was
            refusals += 1
            if n == 1:
                assert {q: q.read_bytes() for q in run_dir.glob("*")} == snapshot
            if ck.exists():
                ck.rename(run_dir / f"checkpoint.pt.aside-{it}")  # the user's way out: recompute, rows checked
        else:
            now = on_disk()
            # every row that was on disk is still there, at its index, or kept in a copy beside the log
            kept = [read_log(a)[0] for a in run_dir.glob("log.jsonl.diverged*")]
            for i, row in enumerate(seen):
                assert (i < len(now) and now[i] == row) or any(i < len(k) and k[i] == row for k in kept)
        if it == len(schedule):
            break
        damage = schedule[it]
        if damage == "torn" and log.exists():
            with open(log, "ab") as f:
                f.write(b'{"step": 1e9, "tr')
        elif damage == "cut" and log.exists() and log.stat().st_size > 40:
            log.write_bytes(log.read_bytes()[:-7])
        elif damage == "checkpoint" and ck.exists():
            ck.write_bytes(ck.read_bytes()[:100])
        elif damage == "delete-row":
            middle_rows(lambda ls, i: ls.pop(i))
        elif damage == "insert-row":
            middle_rows(lambda ls, i: ls.insert(i, ls[i - 1]))
        elif damage == "edit-row":
            middle_rows(lambda ls, i: ls.__setitem__(i, _edit_loss(ls[i])))
        elif damage == "bitflip" and ck.exists():
            data = bytearray(ck.read_bytes())
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            ck.write_bytes(bytes(data))
    for q in run_dir.glob("checkpoint.pt"):  # a damaged checkpoint left by the last round: step aside
        try:
            torch.load(q, weights_only=True)
        except Exception:
            q.rename(run_dir / "checkpoint.pt.aside-final")
    for _ in range(3):
        r = subprocess.run([sys.executable, "-c", _script(run_dir, steps)], env=env, timeout=300,
                           capture_output=True)
        if r.returncode == 0:
            break
        assert b"LogDamaged" in r.stderr
        ck.rename(run_dir / f"checkpoint.pt.aside-end-{_}")
    assert r.returncode == 0
    assert Run(run_dir).rows == want
    assert kills >= 1 and refusals >= 1 and locked_out >= 1
    shutil.rmtree(tmp_path)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and bool(
            (a.view(-1).view(torch.uint8) == b.view(-1).view(torch.uint8)).all()) if a.numel() else True
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


def test_a_bit_flip_in_the_checkpoint_is_refused_or_harmless(tmp_path):
    """Every single-bit flip in checkpoint.pt is a LogDamaged error, or leaves every value as it was."""
    from lazyhasty.train import load_checkpoint

    _train(tmp_path / "r", steps=5)
    ck = tmp_path / "r" / "checkpoint.pt"
    data = ck.read_bytes()
    clean = load_checkpoint(ck, "cpu")
    rng = random.Random(7)
    changed = refused = 0
    for pos in rng.sample(range(len(data)), 200):
        flipped = bytearray(data)
        flipped[pos] ^= 1 << rng.randrange(8)
        ck.write_bytes(bytes(flipped))
        try:
            blob = load_checkpoint(ck, "cpu")
        except LogDamaged as exc:
            assert "checkpoint.pt" in str(exc)
            refused += 1
            continue
        changed += not _same(clean, blob)
    assert changed == 0, f"{changed} of 200 bit flips loaded with changed values"
    assert refused > 100


def _rewrite(log, edit):
    lines = [ln for ln in _lines(log) if ln.strip()]
    edit(lines)
    log.write_bytes(b"".join(ln + b"\n" for ln in lines))
    return log.read_bytes()


def _edit_loss(line: bytes) -> bytes:
    row = json.loads(line)
    row["train_loss"] += 0.25
    return json.dumps(row).encode()


@pytest.mark.parametrize("damage, line", [
    ("delete", 10),   # row 9 (0-based) removed: line 10 is now the row that was line 11
    ("insert", 9),    # a copy of row 5 inserted as line 9
    ("edit", 8),      # row 7 (line 8) edited
    ("edit-last-counted", 21),  # the last row the checkpoint counts (line 21) edited
])
def test_a_changed_row_before_the_checkpoint_is_named_and_nothing_changes(tmp_path, damage, line):
    with pytest.raises(Crash):
        _train(tmp_path / "r", crash_at=21)  # 22 rows on disk, the checkpoint counts 21
    log = tmp_path / "r" / "log.jsonl"
    if damage == "delete":
        before = _rewrite(log, lambda ls: ls.pop(9))
    elif damage == "insert":
        before = _rewrite(log, lambda ls: ls.insert(8, ls[5]))
    elif damage == "edit":
        before = _rewrite(log, lambda ls: ls.__setitem__(7, _edit_loss(ls[7])))
    else:
        before = _rewrite(log, lambda ls: ls.__setitem__(20, _edit_loss(ls[20])))
    files = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
    with pytest.raises(LogDamaged, match=rf"log.jsonl, line {line}\b"):
        _train(tmp_path / "r")
    assert log.read_bytes() == before
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()} == files


@pytest.mark.parametrize("change", ["permuted", "two-labels-swapped"])
def test_resume_refuses_other_training_data_with_the_same_sums(tmp_path, change):
    with pytest.raises(Crash):
        _train(tmp_path / "r", crash_at=12)
    net, ds = small_setup()
    if change == "permuted":
        other = ds[torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))]
    else:
        i, j = int((ds.y == ds.y.max()).nonzero()[0]), int((ds.y == ds.y.min()).nonzero()[0])
        y = ds.y.clone()
        y[i], y[j] = ds.y[j], ds.y[i]
        other = ds[torch.arange(len(ds))]
        other.y = y
    assert float(other.x.double().sum()) == pytest.approx(float(ds.x.double().sum()), rel=1e-12)
    assert float(other.y.double().sum()) == float(ds.y.double().sum())
    cfg = TrainConfig(steps=30, lr=0.5, loss="logistic", log_every=1, batch_size=16, probe_every=0)
    files = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="train_data"):
        Trainer(net, other, cfg, tmp_path / "r").fit(resume=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()} == files


def test_a_checkpoint_of_another_run_of_the_same_model_is_refused(tmp_path):
    with pytest.raises(Crash):
        _train(tmp_path / "a", crash_at=20)
    with pytest.raises(Crash):
        _train(tmp_path / "b", crash_at=8)  # the same model and config: another run, fewer rows
    shutil.copy2(tmp_path / "b" / "checkpoint.pt", tmp_path / "a" / "checkpoint.pt")
    log_before = (tmp_path / "a" / "log.jsonl").read_bytes()
    with pytest.raises(LogDamaged, match=r"checkpoint.pt belongs to another run"):
        _train(tmp_path / "a")
    assert (tmp_path / "a" / "log.jsonl").read_bytes() == log_before


def _slow_script(run_dir, steps=200) -> str:
    return _script(run_dir, steps).replace(
        "probe_set=ds[:40])", "probe_set=ds[:40], on_log=lambda row, net: __import__('time').sleep(0.2))")


def test_a_second_process_on_a_run_directory_is_refused_naming_the_holder(tmp_path):
    from lazyhasty._runlog import RunLocked

    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    run_dir = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", _slow_script(run_dir)], env=env)
    try:
        deadline = time.time() + 120
        while not (run_dir / "log.jsonl").exists() or not read_log(run_dir / "log.jsonl")[0]:
            assert holder.poll() is None and time.time() < deadline
            time.sleep(0.1)
        before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
        net, ds = small_setup()
        cfg = TrainConfig(steps=200, lr=0.5, loss="logistic", log_every=5, batch_size=16, momentum=0.9, probe_every=2)
        with pytest.raises(RunLocked, match=rf"pid {holder.pid}\b"):
            Trainer(net, ds, cfg, run_dir, probes={"noisy": ds[ds.noisy]}, probe_set=ds[:40]).fit(resume=True)
        after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
        for name, data in before.items():  # the holder only appends; the refused process wrote nothing
            assert after[name].startswith(data) or name == "checkpoint.pt", name
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder is gone (killed): its lock went with it, and the run resumes to the uninterrupted rows
    subprocess.run([sys.executable, "-c", _script(run_dir, 200)], check=True, env=env, timeout=300)
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-c", _script(ref, 200)], check=True, env=env, timeout=300)
    assert Run(run_dir).rows == Run(ref).rows
