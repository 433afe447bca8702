"""dsv4c: a compiler for DeepSeek-V4 models.

Pipeline (one direction): spec -> frontend (torch.export graph) -> passes -> lowering -> artifact -> runtime.
This package is the shared core: the model spec, the ``dsv4`` custom-op library, numerics codecs,
checkpoint I/O, the artifact schema and the error type.
"""

__version__ = "0.1.0"
