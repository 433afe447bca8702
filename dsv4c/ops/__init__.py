"""The ``dsv4`` op namespace. Importing this package registers every op (CPU reference + fake impls)."""

from . import library  # noqa: F401  (registers torch.ops.dsv4.*)
from . import fused  # noqa: F401  (registers the fused ops that passes create)
from . import kv_storage  # noqa: F401  (registers the KV storage-format codecs and the ops that read it)
from .library import dtype_code

__all__ = ["library", "dtype_code"]
