"""lazyhasty: lazy (linearized) vs feature-learning regimes, measured exactly and cheaply.

Subpackages: `lazyhasty.metrics` (the linearity probes), `lazyhasty.ntk` (the empirical NTK engine),
`lazyhasty.ops` (the low-level kernels), `lazyhasty.reference` (the plain-torch spec every fast path is tested
against); [`Monitor`][lazyhasty.monitor.Monitor] logs the probes from any training loop.

Example:
    >>> import copy, torch, lazyhasty
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    >>> init = copy.deepcopy(model)
    >>> round(float(lazyhasty.metrics.ntk_alignment(model, torch.rand(8, 2), init)), 6)
    1.0
"""
from . import _backend  # noqa: F401  (capability flags; warns once if a compiled backend is missing)
from . import metrics, ntk, ops, reference  # noqa: F401
from .monitor import CSVSink, JSONLSink, Monitor, TensorBoardSink, WandbSink, read_monitor_log  # noqa: F401,E402

__version__ = "0.1.0"
