"""Compile a hub-format checkpoint directory (config.json + *.safetensors + index).

Real DeepSeek-V4 checkpoints are read the same way; here a synthetic one stands in:

    dsv4c synth --variant tiny -o /tmp/tiny-ckpt
    python examples/load_hub_checkpoint.py /tmp/tiny-ckpt /tmp/tiny-art
"""

import sys
from pathlib import Path

from dsv4c.checkpoint import load_checkpoint
from dsv4c.lowering.build import BuildRequest, build
from dsv4c.plan import make_plan
from dsv4c.runtime import Engine
from dsv4c.spec import ModelSpec

ckpt, out = Path(sys.argv[1]), Path(sys.argv[2])
spec = ModelSpec.from_config(ckpt)  # hub or transformers spelling of config.json
print(make_plan(spec).render())
tensors = load_checkpoint(ckpt, spec)  # strict: one error lists every missing/extra/mis-shaped tensor
print(f"{len(tensors)} tensors read")
build(BuildRequest(output=out, checkpoint=ckpt, target="cpu", backend="eager", max_seq_len=512))
print(Engine.load(out).generate([[1, 2, 3]], max_new_tokens=8).tokens)
