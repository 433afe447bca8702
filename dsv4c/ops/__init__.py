"""The ``dsv4`` op namespace. Importing this package registers every op (CPU reference + fake impls)."""

from . import library  # noqa: F401  (registers torch.ops.dsv4.*)
from . import fused  # noqa: F401  (registers the fused ops that passes create)
from .library import dtype_code

__all__ = ["library", "dtype_code"]
