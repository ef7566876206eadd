"""Empirical neural tangent kernel engine: exact Gram matrices and streamed alignment.

See :func:`ntk_gram` and :func:`ntk_alignment` (also exported from :mod:`lazyhasty.metrics`).
"""
from ._engine import IMPLEMENTATIONS, KERNELS, Featurizer, KernelOperator, ntk_alignment, ntk_gram  # noqa: F401
from ._reference import NTKReference  # noqa: F401,E402
from ._plan import PATHS, Plan, choose_path, explain  # noqa: F401,E402
