"""`lazyhasty check` and the device script's CPU steps (benchmarks/device.sh --dry-run)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lazyhasty import _backend
from lazyhasty import check as C
from lazyhasty.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def test_every_op_and_backend_on_cpu_matches_the_reference():
    results = C.run_checks("cpu", quick=True)
    bad = [r for r in results if r.status not in ("ok", "skipped")]
    assert not bad, C.format_table(bad)
    ops = {r.op for r in results if r.status == "ok"}
    assert {"pack_signs", "sign_mismatch", "ntk_gram", "ntk_alignment", "sign_similarity",
            "representation_alignment", "kernel_alignment"} <= ops
    ran = {(r.op, r.backend) for r in results if r.status == "ok"}
    if _backend.has_cpp:
        assert ("pack_signs", "cpp") in ran and ("sign_mismatch", "cpp") in ran
    if _backend.has_triton and _backend.triton_interpreted():
        assert {("ntk.gram", "triton"), ("ntk.ghost_gram", "triton"), ("pack_signs", "triton")} <= ran
    skipped = {r.backend for r in results if r.status == "skipped"}
    assert "cuda" in skipped  # never on CPU tensors, said with the reason
    assert all(r.note for r in results if r.status == "skipped")
    # awkward shapes are in: one example, sizes that do not divide the tiles, non-contiguous inputs
    cases = " ".join(r.case for r in results)
    assert "1x1" in cases and "non-contiguous" in cases and "n=1" in cases


def test_a_wrong_backend_is_a_failing_row_and_exit_status(monkeypatch, tmp_path, capsys):
    from lazyhasty.ops import signs

    real = signs._pack_torch

    def broken(x):
        out = real(x)
        out[..., 0] ^= 1
        return out

    monkeypatch.setattr(signs, "_pack_torch", broken)
    path = tmp_path / "check.json"
    code = main(["check", "--device", "cpu", "--quick", "--json", str(path), "--failures-only"])
    out = capsys.readouterr().out
    assert code == 1
    assert "pack_signs" in out and "FAIL" in out
    rows = json.loads(path.read_text())["results"]
    assert any(r["op"] == "pack_signs" and r["backend"] == "torch" and r["status"] == "FAIL" for r in rows)
    assert not any(r["op"] == "pack_signs" and r["backend"] == "cpp" and r["status"] == "FAIL" for r in rows)


def test_check_cuda_without_a_gpu_is_a_clear_message(capsys):
    if _backend.cuda_available():
        pytest.skip("a GPU is present")
    assert main(["check", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def _bash(args, **env):
    e = dict(os.environ, PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "device.sh"), *args], capture_output=True, text=True,
                          env=e, cwd=ROOT, timeout=300)


def test_device_script_dry_run():
    r = _bash(["--dry-run"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for step in ("env", "build", "check", "test", "bench"):
        assert f"(dry run): {step}" in r.stdout
    assert "pytest -m gpu tests" in r.stdout and "--benchmark-json benchmarks/results/" in r.stdout
    assert "device.sh: dry run ok" in r.stdout


def test_device_script_names_the_step_it_stopped_at():
    if _backend.cuda_available():
        pytest.skip("a GPU is present")
    r = _bash([])
    assert r.returncode == 3 and "no CUDA device" in r.stderr
    r = _bash(["check", "test"], DEVICE_SH_SKIP_GPU_TEST="1")  # forced past the GPU test: check fails
    assert r.returncode != 0
    assert "stopped at step 'check'" in r.stderr and "continue with: bash benchmarks/device.sh check test" in r.stderr
