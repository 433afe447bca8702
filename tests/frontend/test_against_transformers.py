"""Exact numerics (fp32, no quant simulation) against transformers' DeepseekV4ForCausalLM.

Both load the same synthesized checkpoint (transformers reads an fp32 dequantized copy with hub names).
The tiny spec has a 16-token window, CSA (ratio 4, top-4 of up to 80 entries) and HCA (ratio 16)
blocks and hash + top-k routing, so 320 tokens wrap the window 20 times and complete 80 CSA and 20
HCA windows.
"""

import pytest
import torch

from dsv4c.checkpoint import export_dequantized
from dsv4c.frontend.model import StepContext, constants, step

from dsv4c.testing import new_cache, rel_err

transformers = pytest.importorskip("transformers")

PROMPT, DECODE_STEPS = 20, 300


@pytest.fixture(scope="module")
def hf_model(tiny_ckpt, tiny_spec, tmp_path_factory):
    from transformers import DeepseekV4ForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    d = export_dequantized(tiny_ckpt, tiny_spec, tmp_path_factory.mktemp("hf") / "tiny")
    return DeepseekV4ForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()


def test_prefill_and_300_decode_steps_match_transformers(hf_model, tiny_spec, tiny_params_fp32):
    spec = tiny_spec
    ids = torch.randint(0, spec.vocab_size, (1, PROMPT + DECODE_STEPS), generator=torch.Generator().manual_seed(0))
    ctx = StepContext(spec, "exact", torch.float32)
    consts = constants(spec)
    cache = new_cache(spec, 1, 512, torch.float32)
    ours = [step(ctx, tiny_params_fp32, consts, cache, ids[:, :PROMPT], torch.tensor([0]))]
    for t in range(PROMPT, PROMPT + DECODE_STEPS - 1):
        ours.append(step(ctx, tiny_params_fp32, consts, cache, ids[:, t:t + 1], torch.tensor([t])))
    with torch.no_grad():
        out = hf_model(ids[:, :PROMPT], use_cache=True)
        theirs = [out.logits[:, -1]]
        for t in range(PROMPT, PROMPT + DECODE_STEPS - 1):
            out = hf_model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            theirs.append(out.logits[:, -1])
    errs = [rel_err(a, b) for a, b in zip(ours, theirs)]
    assert len(errs) == DECODE_STEPS
    assert max(errs) <= 1e-4, f"worst step {errs.index(max(errs))}: {max(errs):.2e}"
