"""Claims over seeds: the t interval, the three verdicts, resuming a killed experiment, the report."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lazyhasty.__main__ import main
from lazyhasty.experiments.claims import (Claim, claim_over_seeds, claims_over_seeds, format_interval, t_cdf,
                                          t_quantile)

# two-sided 95% Student-t critical values (any statistics table)
T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 9: 2.2622, 19: 2.0930, 29: 2.0452, 100: 1.9840}


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_matches_the_table(df):
    assert t_quantile(0.975, df) == pytest.approx(T975[df], abs=6e-5)
    assert t_quantile(0.025, df) == pytest.approx(-T975[df], abs=6e-5)
    assert t_cdf(t_quantile(0.9, df), df) == pytest.approx(0.9, abs=1e-10)


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 1.5, 3, 7, 30, 1000):
        for p in (0.6, 0.9, 0.975, 0.999):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-8)


def test_t_quantile_rejects_bad_arguments():
    with pytest.raises(ValueError, match="0 < p < 1"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="df > 0"):
        t_quantile(0.9, 0)


def _values(mean, sd, n, seed=0):
    """n values with exactly this sample mean and sample standard deviation."""
    z = np.random.default_rng(seed).standard_normal(n)
    z = (z - z.mean()) / z.std(ddof=1)
    return mean + sd * z


def test_holds_fails_inconclusive_on_synthetic_seeds():
    # mean 1, sd 1, n 10: half-width 2.2622 * 1 / sqrt(10) = 0.7154 -> [0.2846, 1.7154]
    c = claim_over_seeds("x", "> 0", _values(1.0, 1.0, 10))
    assert c["mean"] == pytest.approx(1.0) and c["stderr"] == pytest.approx(1 / math.sqrt(10))
    assert c["ci95"] == pytest.approx([1 - 0.71536, 1 + 0.71536], abs=1e-4)
    assert c["state"] == "holds" and c["holds"] is True
    assert claim_over_seeds("x", "< 0", _values(1.0, 1.0, 10))["state"] == "fails"
    # the same mean with a spread that makes the interval straddle zero
    c = claim_over_seeds("x", "> 0", _values(1.0, 3.0, 10))
    assert c["ci95"][0] < 0 < c["ci95"][1] and c["state"] == "inconclusive" and c["holds"] is False
    # a threshold other than zero: 0.95 +- small spread against "> 0.9" and "< 0.9"
    assert claim_over_seeds("x", "> 0.9", _values(0.95, 0.01, 5))["state"] == "holds"
    assert claim_over_seeds("x", "< 0.9", _values(0.95, 0.01, 5))["state"] == "fails"
    assert claim_over_seeds("x", "> 0.9", _values(0.95, 0.2, 5))["state"] == "inconclusive"


def test_every_seed_with_the_right_sign_is_not_enough():
    """Three seeds all positive but spread out: the sign test would say 'holds', the interval does not."""
    c = claim_over_seeds("x", "> 0", [0.001, 0.2, 0.004])
    assert c["sign_held"] == 3 and c["state"] == "inconclusive"


def test_one_seed_missing_values_and_zero_spread():
    c = claim_over_seeds("x", "> 0", [0.5])
    assert c["n"] == 1 and c["state"] == "inconclusive" and math.isnan(c["ci95"][0])
    assert format_interval(c) == "+0.5000"
    c = claim_over_seeds("x", "> 0", [0.5, float("nan"), 0.7, 0.6])
    assert c["n"] == 3 and c["mean"] == pytest.approx(0.6) and math.isnan(c["values"][1])
    assert claim_over_seeds("x", "> 0", [float("nan")] * 3)["state"] == "inconclusive"
    c = claim_over_seeds("x", "< 0", [-1.0, -1.0, -1.0])  # a seed-independent (closed-form) claim
    assert c["ci95"] == [-1.0, -1.0] and c["state"] == "holds"


def test_interval_covers_the_true_mean_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    hits = 0
    trials = 2000
    for _ in range(trials):
        lo, hi = claim_over_seeds("x", "> 0", rng.normal(0.3, 1.0, 5))["ci95"]
        hits += lo <= 0.3 <= hi
    assert 0.935 <= hits / trials <= 0.965


def test_claims_are_matched_by_name_across_seeds():
    seeds = [[Claim("a", v, "> 0").as_dict(), Claim("b", -v, "< 0").as_dict()] for v in (1.0, 2.0, 3.0)]
    out = claims_over_seeds(seeds)
    assert [c["claim"] for c in out] == ["a", "b"] and out[0]["values"] == [1.0, 2.0, 3.0]
    assert out[1]["mean"] == pytest.approx(-2.0)
    seeds[2] = seeds[2][::-1]
    with pytest.raises(ValueError, match="seed 2 measured other claims"):
        claims_over_seeds(seeds)
    with pytest.raises(ValueError, match="'> x' or '< x'"):
        claim_over_seeds("x", ">= 0", [1.0, 2.0])


# --- resuming a killed experiment ------------------------------------------------------------------
LABEL_NOISE = ["--quick", "--no-progress", "--set", "seeds=3", "--set", "n_train=200", "--set", "epochs=3",
               "--set", "width=4"]


def _run(out, extra=(), name="label-noise"):
    return [sys.executable, "-m", "lazyhasty", "run", name, "--out", str(out), *LABEL_NOISE, *extra]


def _claim_values(out):
    return [v for c in json.loads((out / "summary.json").read_text())["claims"] for v in c["values"]]


def test_a_killed_experiment_resumes_with_the_missing_seeds(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    whole = tmp_path / "whole"
    subprocess.run(_run(whole), check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_run(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "seed1" / "runs" / "alpha=100" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.stat().st_size > 0) and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # in seed 1's second run: seed 0 done, seeds 1 (part) and 2 missing
    proc.wait()
    assert (killed / "seed0" / "summary.json").exists()
    assert not (killed / "seed1" / "summary.json").exists() and not (killed / "seed2").exists()
    seed0 = (killed / "seed0" / "summary.json").stat().st_mtime_ns
    done = subprocess.run(_run(killed), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "seed 2/3 was interrupted: resuming its runs" in done.stderr
    assert (killed / "seed0" / "summary.json").stat().st_mtime_ns == seed0  # not run again
    assert _claim_values(killed) == pytest.approx(_claim_values(whole), nan_ok=True, rel=1e-12)
    # more seeds on a rerun: the first three are kept, one is added
    more = subprocess.run(_run(killed, ["--set", "seeds=4"]), env=env, capture_output=True, text=True)
    assert more.returncode == 0, more.stderr
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["seeds"] == 4 and summary["seed_values"] == [0, 1, 2, 3]
    assert [v for c in summary["claims"] for v in c["values"][:3]] == pytest.approx(_claim_values(whole),
                                                                                    nan_ok=True, rel=1e-12)
    # another definition is refused and names what differs
    other = subprocess.run(_run(killed, ["--set", "noise=0.3"]), env=env, capture_output=True, text=True)
    assert other.returncode == 2 and "options" in other.stderr and "noise" in other.stderr


def test_an_interrupted_seed_that_cannot_resume_starts_again_and_keeps_its_files(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "y"
    args = ["run", "yinyang", "--quick", "--out", str(out), "--no-progress", "--set", "seeds=2", "--set", "steps=100",
            "--set", "steps_lazy=150", "--set", "resolution=8", "--set", "width=8"]
    assert main(args) == 0
    first = _claim_values(out)
    (out / "seed1" / "summary.json").unlink()  # as if killed before seed 1 finished
    (out / "summary.json").unlink()
    assert main(args) == 0
    assert (out / "seed1.incomplete-1" / "runs").exists()
    assert _claim_values(out) == pytest.approx(first, nan_ok=True)


# --- the report ------------------------------------------------------------------------------------
def test_report_of_experiment_directories(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("scipy")
    q = tmp_path / "q"
    assert main(["run", "quadratic", "--quick", "--out", str(q), "--no-progress", "--set", "seeds=3"]) == 0
    intro = tmp_path / "intro.md"
    intro.write_text("Measured on a test machine.\n")
    md = tmp_path / "docs" / "EXP.md"
    assert main(["report", str(q), "--out", str(md), "--intro", str(intro), "--title", "Results"]) == 0
    text = md.read_text()
    assert text.startswith("# Results\n") and "Measured on a test machine." in text
    assert "lazyhasty run quadratic --quick --set seeds=3" in text
    summary = json.loads((q / "summary.json").read_text())
    for c in summary["claims"]:
        assert f"| {c['claim']} | {format_interval(c)} | {c['expected']} | 3/3 | **holds** |" in text
    from lazyhasty.experiments.report import _cell

    assert _cell("sqrt(lambda)|y|") == "sqrt(lambda)\\|y\\|"
    links = [line[line.index("](") + 2:-1] for line in text.splitlines() if line.startswith("![")]
    assert links and all((md.parent / link).stat().st_size > 5000 for link in links)
    # a directory without a summary over seeds is an error naming it
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r.md")]) == 2


def test_the_docstring_example_is_true():
    import doctest

    from lazyhasty.experiments import claims

    result = doctest.testmod(claims)
    assert result.attempted >= 2 and result.failed == 0


def test_core_modules_never_import_from_experiments():
    """Imports run down the layers: only the CLI and experiments/ itself import lazyhasty.experiments."""
    import ast
    from pathlib import Path

    import lazyhasty

    root = Path(lazyhasty.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] == "experiments" or rel.name == "__main__.py":
            continue
        depth = len(rel.parts) - 1  # how many packages below lazyhasty: what ".." means there
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against lazyhasty/<package>
                    pkg = ["lazyhasty", *rel.parts[:-1]][: 1 + depth - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n == "lazyhasty.experiments" or n.startswith("lazyhasty.experiments.") for n in names):
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, offenders
