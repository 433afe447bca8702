"""dsv4c.passes: graph rewrites between tracing and lowering.

``run_pipeline`` is the one entry point the build uses; see ``passes/manager.py`` for the pass
interface and ``passes/pipeline.py`` for which passes run for which target.
"""

from .dump import dump_files
from .manager import check_pass_names
from .pipeline import run_pipeline

__all__ = ["run_pipeline", "dump_files", "check_pass_names"]
