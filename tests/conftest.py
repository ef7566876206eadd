import os

# Triton kernels must see the interpreter flag when they are defined, i.e. before lazyhasty is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

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
    pytest.param(b, id=f"cuda-{b}", marks=pytest.mark.skipif(
        not torch.cuda.is_available() or (b == "cuda" and not _backend.has_cuda_ext),
        reason="needs a CUDA GPU (and lazyhasty._cuda for the cuda backend)"))
    for b in ("cuda", "triton", "torch")
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
