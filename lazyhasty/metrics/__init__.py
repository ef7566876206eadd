"""Linearity probes: sign similarity, representation alignment, tangent-kernel Gram and alignment."""
from .signs import SignPatterns, sign_similarity  # noqa: F401
from .alignment import kernel_alignment, representation_alignment, target_alignment  # noqa: F401
from ..ntk import NTKReference, ntk_alignment, ntk_gram  # noqa: F401
from .probe import LinearityProbe  # noqa: F401,E402
