"""Low-level ops (kernel -> launcher -> torch custom op -> public function)."""
from .signs import pack_signs, sign_mismatch, sign_words  # noqa: F401
