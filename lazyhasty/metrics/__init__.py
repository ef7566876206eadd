from .signs import SignPatterns, sign_similarity  # noqa: F401
from .alignment import kernel_alignment, representation_alignment  # noqa: F401
