"""lazyhasty: lazy (linearized) vs feature-learning regimes, measured exactly and cheaply.

See README.md. Subpackages: :mod:`lazyhasty.metrics` (linearity probes), :mod:`lazyhasty.ops`
(kernels), :mod:`lazyhasty.reference` (the plain-torch spec every fast path is tested against).
"""
from . import _backend  # noqa: F401  (capability flags; warns once if a compiled backend is missing)
from . import metrics, ntk, ops, reference  # noqa: F401
from .monitor import CSVSink, JSONLSink, Monitor, TensorBoardSink, WandbSink  # noqa: F401,E402

__version__ = "0.1.0"
