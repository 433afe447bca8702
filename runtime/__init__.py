"""dsv4c.runtime: load an artifact and serve prefill / decode / generate.

Imports only the dsv4c core and this package, so a deployed artifact runs without the frontend,
the passes or the lowering code.
"""

from .engine import Engine, GenerationResult

__all__ = ["Engine", "GenerationResult"]
