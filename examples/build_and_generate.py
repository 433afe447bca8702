"""Build the mini variant (synthesized weights) and generate through the Python API.

    python examples/build_and_generate.py [ARTIFACT_DIR]
"""

import sys
from pathlib import Path

from dsv4c.lowering.build import BuildRequest, build
from dsv4c.runtime import Engine

out = Path(sys.argv[1] if len(sys.argv) > 1 else "artifacts/mini-example")
build(BuildRequest(output=out, variant="mini", target="cpu", backend="eager", max_seq_len=1024, max_batch=4))

eng = Engine.load(out)
prompts = [[1, 2, 3, 4], [10, 20, 30, 40, 50, 60, 70]]  # two sequences of different lengths
res = eng.generate(prompts, max_new_tokens=12)
for p, t in zip(prompts, res.tokens):
    print(f"{p} -> {t}")
print(f"prefill {res.prefill_s * 1e3:.0f} ms, decode {res.decode_s / max(res.decode_steps, 1) * 1e3:.1f} ms/step")

# The same engine, step by step: prefill returns the last position's logits, decode takes one token per sequence.
logits = eng.prefill([[1, 2, 3]])
for _ in range(4):
    nxt = logits.argmax(-1)
    logits = eng.decode(nxt)
print("step-by-step lengths:", eng.lengths)
