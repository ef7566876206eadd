"""The lazyhasty command line, end to end at tiny sizes (seconds each)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lazyhasty.__main__ import EXPERIMENT_NAMES, main

TINY = {  # two seeds each: the claims are decided over seeds
    "yinyang": ["--set", "seeds=2", "--set", "steps=150", "--set", "steps_lazy=300", "--set", "resolution=10",
                "--set", "width=16"],
    "label-noise": ["--set", "seeds=2", "--set", "n_train=200", "--set", "epochs=2", "--set", "width=4"],
    "cscores": ["--set", "seeds=2", "--set", "n_train=200", "--set", "epochs=2", "--set", "width=4",
                "--set", "cscore_epochs=2"],
    "spurious": ["--set", "seeds=2", "--set", "n_train=200", "--set", "epochs=3", "--set", "width=4",
                 "--set", "per_group=10"],
    "quadratic": ["--set", "seeds=2"],
    "modes": ["--set", "seeds=2", "--set", "steps=60", "--set", "steps_lazy=60", "--set", "modes=4",
              "--set", "n_train=30", "--set", "width=16"],
}


@pytest.mark.parametrize("name", EXPERIMENT_NAMES)
def test_each_experiment_end_to_end(tmp_path, name, capsys):
    _needs(name)
    out = tmp_path / name
    assert main(["run", name, "--quick", "--out", str(out), "--no-progress"] + TINY[name]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiment"] == name and summary["claims"] and summary["seeds"] == 2
    assert summary["seed_values"] == [0, 1]
    per_seed = [json.loads((out / f"seed{s}" / "summary.json").read_text()) for s in (0, 1)]
    assert [p["seed"] for p in per_seed] == [0, 1]
    for i, c in enumerate(summary["claims"]):
        assert {"claim", "value", "expected", "holds", "values", "mean", "stderr", "ci95", "sign_held",
                "state"} <= set(c)
        assert c["state"] in ("holds", "fails", "inconclusive") and c["holds"] == (c["state"] == "holds")
        # the summary's values are the seeds' own claims, in seed order
        assert c["values"] == pytest.approx([p["claims"][i]["value"] for p in per_seed], nan_ok=True)
    assert sum(summary["verdicts"].values()) == len(summary["claims"])
    assert "claims.png" in summary["figures"]
    for fig in summary["figures"]:
        assert (out / fig).stat().st_size > 5000
    assert json.loads((out / "config.json").read_text())["experiment"] == name
    if name != "quadratic":
        assert list((out / "seed1" / "runs").rglob("log.jsonl"))
    printed = capsys.readouterr().out
    assert "expected" in printed and "95% interval" in printed
    # the same command again resumes: every seed is done, nothing retrains, the same summary
    logs = {p: p.stat().st_mtime_ns for p in out.rglob("log.jsonl")}
    assert main(["run", name, "--quick", "--out", str(out), "--no-progress"] + TINY[name]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("log.jsonl")} == logs
    again = json.loads((out / "summary.json").read_text())
    assert [v for c in again["claims"] for v in c["values"]] == pytest.approx(
        [v for c in summary["claims"] for v in c["values"]], nan_ok=True)
    # another definition into the same directory is refused unless --overwrite
    assert main(["run", name, "--out", str(out), "--no-progress"] + TINY[name]) == 2
    assert "quick: True before, False now" in capsys.readouterr().err
    assert main(["run", name, "--quick", "--out", str(out), "--no-progress", "--overwrite"] + TINY[name]) == 0


def test_help_on_every_command():
    for args in (["--help"], ["demo", "--help"], ["run", "--help"], ["info", "--help"], ["report", "--help"]):
        out = subprocess.run([sys.executable, "-m", "lazyhasty"] + args, capture_output=True, text=True,
                             env=dict(os.environ, TRITON_INTERPRET="0"))
        assert out.returncode == 0 and "usage" in out.stdout


def _needs(name):
    """The optional dependencies an experiment checks up front (skip with the reason when absent)."""
    pytest.importorskip("matplotlib", reason="experiments write figures: pip install 'lazyhasty[plots]'")
    if name == "quadratic":
        pytest.importorskip("scipy", reason="the quadratic experiment needs pip install 'lazyhasty[theory]'")
    if name in ("label-noise", "cscores", "spurious"):
        pytest.importorskip("sklearn", reason="the digits dataset needs pip install 'lazyhasty[data]'")


def test_config_file_and_bad_options(tmp_path):
    _needs("quadratic")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"sigma": 0.001}))
    assert main(["run", "quadratic", "--out", str(tmp_path / "q"), "--config", str(cfg), "--no-progress"]) == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["sigma"] == 0.001
    with pytest.raises(SystemExit):
        main(["run", "quadratic", "--config", str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit):
        main(["run", "quadratic", "--set", "novalue"])
    with pytest.raises(SystemExit):
        main(["run", "nosuch"])
    assert main(["run", "label-noise", "--dataset", "cifar10", "--out", str(tmp_path / "c"), "--no-progress"]) == 2


def test_nproc_splits_the_probes_and_gives_the_one_process_logs(tmp_path):
    """``--nproc 2``: two gloo processes, the linearity probes split between them; the run directory is
    rank 0's and its logs equal one process's (probes to 1e-9: exact sums, other float order)."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    import torch

    args = ["run", "label-noise", "--quick", "--no-progress", "--set", "seeds=1"] + TINY["label-noise"][2:]
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))  # as each of the 2 ranks: the same float order
    try:
        assert main(args + ["--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert main(args + ["--out", str(tmp_path / "two"), "--nproc", "2"]) == 0
    logs = sorted((tmp_path / "one").rglob("log.jsonl"))
    assert logs
    for log in logs:
        mine = [json.loads(line) for line in log.read_text().splitlines()]
        other = [json.loads(line) for line in (tmp_path / "two" / log.relative_to(tmp_path / "one")).read_text()
                 .splitlines()]
        assert len(mine) == len(other) and any("ntk_alignment" in row for row in mine)
        for a, b in zip(mine, other):
            assert set(a) == set(b)
            for key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), (log, key)
    # the scratch copies of the other ranks are gone; a failing rank is reported, not hung on
    assert main(args + ["--out", str(tmp_path / "bad"), "--nproc", "2", "--set", "width=-3"]) == 2


def test_torchrun_launch_writes_rank0s_run(tmp_path):
    """The documented recipe: ``torchrun --nproc_per_node 2 -m lazyhasty run ...`` (here via
    ``python -m torch.distributed.run``): the same logs as ``--nproc 2``."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    args = ["run", "label-noise", "--quick", "--no-progress", "--set", "seeds=1"] + TINY["label-noise"][2:]
    assert main(args + ["--out", str(tmp_path / "spawned"), "--nproc", "2"]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "lazyhasty"] + args + ["--out", str(tmp_path / "torchrun")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "run directory" in done.stdout and done.stdout.count("claims over seeds") == 1  # rank 0 reports
    for log in sorted((tmp_path / "spawned").rglob("log.jsonl")):
        theirs = (tmp_path / "torchrun" / log.relative_to(tmp_path / "spawned")).read_text()
        a = [json.loads(r) for r in log.read_text().splitlines()]
        b = [json.loads(r) for r in theirs.splitlines()]
        assert len(a) == len(b)
        for ra, rb in zip(a, b):
            for key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-9, abs=1e-12), (log, key)


def test_a_second_process_on_an_experiment_directory_is_refused_naming_the_holder(tmp_path, capsys):
    """Two ``lazyhasty run`` into one --out: the second stops at once, naming the first's pid; nothing touched."""
    import time

    _needs("quadratic")
    out = tmp_path / "q"
    assert main(["run", "quadratic", "--out", str(out), "--no-progress", "--set", "seeds=1"]) == 0
    capsys.readouterr()
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    holder = subprocess.Popen(  # an experiment still running in OUT: it holds OUT's lock
        [sys.executable, "-c", "import sys, time; from lazyhasty._runlog import locked\n"
         f"with locked({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, TRITON_INTERPRET="0"))
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["run", "quadratic", "--out", str(out), "--no-progress", "--set", "seeds=2"]) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "in use by another process" in err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert main(["run", "quadratic", "--out", str(out), "--no-progress", "--set", "seeds=2"]) == 0


def test_out_into_a_folder_lazyhasty_did_not_create_is_refused_even_with_overwrite(tmp_path, capsys):
    _needs("quadratic")
    out = tmp_path / "mine"
    (out / "seed_data").mkdir(parents=True)
    (out / "seed_data" / "x.csv").write_text("1,2\n")
    (out / "summary.json").write_text('{"mine": true}')
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for extra in ([], ["--overwrite"]):
        assert main(["run", "quadratic", "--out", str(out), "--no-progress", "--set", "seeds=1"] + extra) == 2
        assert "not created by lazyhasty" in capsys.readouterr().err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


def test_overwrite_deletes_only_what_lazyhasty_wrote(tmp_path, capsys):
    _needs("quadratic")
    out = tmp_path / "q"
    assert main(["run", "quadratic", "--out", str(out), "--no-progress", "--set", "seeds=2"]) == 0
    (out / "seed_data").mkdir()
    (out / "seed_data" / "x.csv").write_text("1,2\n")  # the user's, beside lazyhasty's seed0/ and seed1/
    (out / "notes.md").write_text("mine")
    (out / "seed0" / "notes.md").write_text("mine too")  # inside lazyhasty's folder: goes with it
    assert main(["run", "quadratic", "--out", str(out), "--no-progress", "--set", "seeds=1", "--overwrite"]) == 0
    assert (out / "seed_data" / "x.csv").read_text() == "1,2\n" and (out / "notes.md").read_text() == "mine"
    assert not (out / "seed1").exists() and not (out / "seed0" / "notes.md").exists()
    assert json.loads((out / "summary.json").read_text())["seeds"] == 1


def test_report_reads_only_files_inside_the_experiment_directory(tmp_path, capsys):
    _needs("quadratic")
    out = tmp_path / "q"
    assert main(["run", "quadratic", "--out", str(out), "--no-progress", "--set", "seeds=1"]) == 0
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not yours")
    (out / "link.png").symlink_to(secret)
    summary = json.loads((out / "summary.json").read_text())
    for bad in ("/etc/hostname", "../secret.png", str(secret), "link.png"):
        s = dict(summary, figures=summary["figures"] + [bad])
        (out / "summary.json").write_text(json.dumps(s))
        rep = tmp_path / f"rep-{abs(hash(bad))}" / "report.md"
        assert main(["report", str(out), "--out", str(rep)]) == 2
        assert repr(bad) in capsys.readouterr().err
        copied = list((rep.parent / "figures").glob("*")) if (rep.parent / "figures").exists() else []
        assert all(p.read_bytes() != b"not yours" for p in copied)
        assert all("hostname" not in p.name for p in copied)
    (out / "summary.json").write_text(json.dumps(summary))
    assert main(["report", str(out), "--out", str(tmp_path / "ok" / "report.md")]) == 0


def test_lazyhasty_scratch_keeps_its_contents_and_each_rank_removes_only_its_own(tmp_path, monkeypatch):
    from lazyhasty import _launch

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "keep.txt").write_text("the user's")
    (scratch / "rank1").mkdir()  # what an old lazyhasty would have written into, or the user's
    (scratch / "rank1" / "data.bin").write_bytes(b"x")
    used = []

    def body(rank, size, init, scratch_dir, run, ctx):
        used.append(Path(scratch_dir))
        (Path(scratch_dir) / f"rank{rank}").mkdir()
        (Path(scratch_dir) / f"rank{rank}" / "log.jsonl").write_text("{}\n")
        return None

    monkeypatch.setattr(_launch, "_rank_body", body)
    monkeypatch.setenv("LAZYHASTY_SCRATCH", str(scratch))
    for rank in ("1", "2"):  # two ranks of one torchrun, one after the other here
        monkeypatch.setenv("WORLD_SIZE", "3")
        monkeypatch.setenv("RANK", rank)
        assert _launch.run_over_processes(3, None, None) is None
    assert len(set(used)) == 2 and all(u.parent == scratch for u in used)
    assert (scratch / "keep.txt").read_text() == "the user's" and (scratch / "rank1" / "data.bin").read_bytes() == b"x"
    assert sorted(p.name for p in scratch.iterdir()) == ["keep.txt", "rank1"]


@pytest.mark.parametrize("dataset, option", [("digits", "cscores=/nowhere/cifar10-cscores.npz"),
                                             ("cifar10", "cscore_runs=3")])
def test_cscores_option_of_the_other_source_is_an_error_not_ignored(tmp_path, capsys, dataset, option):
    _needs("cscores")
    out = tmp_path / "c"
    args = ["run", "cscores", "--quick", "--out", str(out), "--no-progress", "--dataset", dataset,
            "--set", option] + TINY["cscores"]
    if dataset == "cifar10":
        args += ["--root", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert repr(option.split("=")[0]) in err and "cifar10" in err
    assert not out.exists()  # refused before anything was written


def test_a_torn_seed_summary_is_an_error_naming_the_file(tmp_path, capsys):
    _needs("quadratic")
    out = tmp_path / "q"
    assert main(["run", "quadratic", "--out", str(out), "--no-progress", "--set", "seeds=1"]) == 0
    done = out / "seed0" / "summary.json"
    done.write_bytes(done.read_bytes()[:40])
    capsys.readouterr()
    assert main(["run", "quadratic", "--out", str(out), "--no-progress", "--set", "seeds=1"]) == 2
    err = capsys.readouterr().err
    assert str(done) in err and "damaged" in err
    assert len(done.read_bytes()) == 40
