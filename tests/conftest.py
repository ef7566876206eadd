import os
import sys
import types

import torch

# The torchvision wheel on the package registry is built for CUDA torch: importing it beside the CPU torch
# fails in its fake-kernel registrations (`operator torchvision::nms does not exist`), and transformers, timm
# and lightning import it when it is installed. Its models are pure Python; an empty stand-in for that one
# module lets them import (where torchvision is absent, nothing changes).
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

# Triton kernels must see the interpreter flag when they are defined, i.e. before lazyhasty is imported:
# the CPU interpreter where there is no GPU (CI), compiled kernels where there is one (the interpreter
# cannot read CUDA tensors: `pytest -m gpu` without TRITON_INTERPRET=0 failed every CUDA NTK case).
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

import pytest  # noqa: E402

from lazyhasty import _backend  # noqa: E402


def _backend_params():
    params = [pytest.param("torch", id="torch")]
    params.append(pytest.param("cpp", id="cpp", marks=pytest.mark.skipif(
        not _backend.has_cpp, reason="lazyhasty._C not built")))
    params.append(pytest.param("triton", id="triton", marks=pytest.mark.skipif(
        not (_backend.has_triton and _backend.triton_interpreted()), reason="triton not installed / not interpreted")))
    return params


CPU_BACKENDS = _backend_params()
CUDA_BACKENDS = [
    pytest.param(b, id=f"cuda-{b}", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available() or (b == "cuda" and not _backend.has_cuda_ext),
        reason="needs a CUDA GPU (and lazyhasty._cuda for the cuda backend)")])
    for b in ("cuda", "triton", "torch")
]

# Where the Triton kernels run: the CPU interpreter (TRITON_INTERPRET=1, CI) and a GPU (TRITON_INTERPRET=0,
# benchmarks/device.sh). Tests parametrized over TRITON_DEVICES run on whichever this process can.
TRITON_DEVICES = [
    pytest.param("cpu", id="triton-cpu", marks=pytest.mark.skipif(
        not (_backend.has_triton and _backend.triton_interpreted()), reason="needs triton, interpreted on CPU")),
    pytest.param("cuda", id="triton-cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not (_backend.has_triton and torch.cuda.is_available() and not _backend.triton_interpreted()),
        reason="needs triton on a CUDA GPU (TRITON_INTERPRET=0)")]),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
