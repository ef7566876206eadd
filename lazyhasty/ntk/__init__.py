"""Empirical neural tangent kernel engine: exact Gram matrices and streamed alignment.

See :func:`ntk_gram` and :func:`ntk_alignment` (also exported from :mod:`lazyhasty.metrics`).
On the CPU they keep freed buffers in glibc's heap between calls (:mod:`lazyhasty._malloc`);
:func:`release_cpu_memory` gives that memory back.
"""
from .api import IMPLEMENTATIONS, KERNELS, Featurizer, KernelOperator, ntk_alignment, ntk_gram  # noqa: F401
from .at_init import NTKReference  # noqa: F401,E402
from .paths import PATHS, Plan, choose_path, explain, path_override  # noqa: F401,E402
from .tuning import Limits, limits  # noqa: F401,E402
from .._malloc import release as release_cpu_memory  # noqa: F401,E402
