"""Packaging and backend dispatch."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lazyhasty
from lazyhasty import _backend
from lazyhasty._backend import BackendUnavailable, select


def test_cpp_extension_built_with_openmp():
    assert _backend.has_cpp, "lazyhasty._C must be built by `pip install .`"
    assert _backend.summary()["cpp_openmp"] is True


@pytest.mark.skipif(shutil.which("nvcc") is None or os.environ.get("LAZYHASTY_CUDA", "AUTO").upper() == "OFF",
                    reason="nvcc not on PATH: lazyhasty._cuda is not expected")
def test_cuda_extension_compiled_without_gpu():
    # nvcc is present, so the extension was built; it must import without a driver (static cudart).
    assert _backend.has_cuda_ext
    import lazyhasty._cuda as cu

    assert "90" in cu.architectures
    assert cu.cuda_runtime_version >= 12000


def test_select_rule(monkeypatch):
    monkeypatch.delenv("LAZYHASTY_BACKEND", raising=False)
    assert select("cpu") == ("cpp" if _backend.has_cpp else "torch")
    assert select("cpu", "torch") == "torch"
    assert select("cpu", "auto") == select("cpu")
    with pytest.raises(BackendUnavailable, match="CUDA tensors only|not built"):
        select("cpu", "cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        select("cpu", "fortran")
    monkeypatch.setenv("LAZYHASTY_BACKEND", "torch")
    assert select("cpu") == "torch"
    assert select("cpu", "cpp") == "cpp"  # the argument beats the environment
    monkeypatch.setenv("LAZYHASTY_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="LAZYHASTY_BACKEND="):
        select("cpu")


@pytest.mark.skipif(not _backend.has_triton, reason="triton not installed")
def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select("cpu", "triton") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        select("cpu", "triton")


def test_cpp_on_cuda_device_is_refused():
    with pytest.raises(BackendUnavailable, match="CPU tensors only|failed to import"):
        select("cuda", "cpp")


def test_import_without_compiled_backends_warns_once_and_works():
    code = textwrap.dedent("""
        import sys, warnings, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name in ("lazyhasty._C", "lazyhasty._cuda"):
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import torch, lazyhasty
            from lazyhasty import _backend
        msgs = [str(x.message) for x in w if "lazyhasty" in str(x.message)]
        assert len(msgs) == 1 and "lazyhasty._C" in msgs[0], msgs
        assert not _backend.has_cpp and not _backend.has_cuda_ext
        assert _backend.select("cpu") == "torch"
        from lazyhasty.ops import pack_signs
        assert pack_signs(torch.tensor([[1.0, -1.0, 2.0]])).item() == 5
        print("ok")
    """)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_summary_names_versions():
    s = _backend.summary()
    assert s["torch"] == torch.__version__
    assert lazyhasty.__version__


def test_readme_second_block_is_what_ci_runs_and_is_self_contained():
    """CI runs exactly the README's second bash block; it installs everything the tests import."""
    import re
    import tomllib

    root = Path(__file__).resolve().parents[1]
    blocks = re.findall(r"^```bash\n(.*?)^```$", (root / "README.md").read_text(), flags=re.S | re.M)
    assert len(blocks) >= 2
    test_cmd = blocks[1].strip()
    assert test_cmd.startswith("pip install torch==2.13.0") and "pytest tests" in test_cmd
    extras = re.search(r'pip install "\.\[([a-z,]+)\]"', test_cmd).group(1).split(",")
    optional = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installed = {d.split(">")[0].split("=")[0] for e in extras for d in optional[e]}
    assert {"pytest", "hypothesis", "scipy", "matplotlib", "scikit-learn", "triton"} <= installed
    ci = (root / ".ci" / "run").read_text()
    assert "n==2" in ci and "pip install" not in ci.replace("apt-get install", "")  # no install of its own
    assert "TRITON_INTERPRET=1 pytest tests" in ci  # and it is the test command it runs
