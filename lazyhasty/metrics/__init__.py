"""Linearity probes: sign similarity, representation alignment, tangent-kernel Gram and alignment.

[sign_similarity][lazyhasty.metrics.sign_similarity] and [SignPatterns][lazyhasty.metrics.SignPatterns]
(ReLU on/off patterns), [representation_alignment][lazyhasty.metrics.representation_alignment],
[kernel_alignment][lazyhasty.metrics.kernel_alignment], [target_alignment][lazyhasty.metrics.target_alignment],
[LinearityProbe][lazyhasty.metrics.LinearityProbe] (the no-grad probes in one forward) and, from
`lazyhasty.ntk`, [ntk_gram][lazyhasty.ntk.ntk_gram], [ntk_alignment][lazyhasty.ntk.ntk_alignment] and
[NTKReference][lazyhasty.ntk.NTKReference].
"""
from .signs import SignPatterns, sign_similarity  # noqa: F401
from .alignment import kernel_alignment, representation_alignment, target_alignment  # noqa: F401
from ..ntk import NTKReference, ntk_alignment, ntk_gram  # noqa: F401
from .probe import LinearityProbe  # noqa: F401,E402
