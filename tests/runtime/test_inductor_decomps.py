"""The KV storage codecs compiled by Inductor through their decompositions equal the ops bitwise (CPU;
the GPU suite checks the same on CUDA). Registered explicitly because some torch versions keep custom
ops opaque in Inductor and run their torch composite eagerly (seen on the H100 with torch 2.11)."""

from __future__ import annotations

import re

import torch

import dsv4c.ops  # noqa: F401  (defines torch.ops.dsv4.*)
from torch._inductor.utils import run_and_get_code

from dsv4c.runtime.inductor_executor import register_decompositions

ops = torch.ops.dsv4


def _entries(seed: int, n: int, d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, d, generator=g) * torch.logspace(-6, 3, n)[None, :, None]
    x[0, 0] = 0.0  # an all-zero entry: the amax floor decides its scale
    x[1, 1, :64] = 448.0 * 2.0**-20  # exactly on a power-of-two boundary
    return x.to(torch.bfloat16)


def test_codecs_through_inductor_are_bitwise():
    register_decompositions()
    e = _entries(0, 12, 192)  # 128 nope dims (two scale blocks) + 64 rope dims
    k = _entries(1, 12, 128)

    def codecs(e, k):  # noqa: ANN001, ANN202
        nope, scale, rope = ops.kv_pack(e, 64)
        return nope, scale, rope, ops.kv_unpack(nope, scale, rope), *ops.fp4_pack(k, 32)

    want = codecs(e, k)
    torch._dynamo.reset()
    got, code = run_and_get_code(torch.compile(codecs, backend="inductor", fullgraph=True, dynamic=False), e, k)
    assert code and not any(re.search(r"dsv4\.\w+\.default\(", c) for c in code)  # fused, not called as ops
    for w, g in zip(want, got):
        assert w.dtype == g.dtype and w.shape == g.shape
        assert torch.equal(w.view(torch.uint8) if w.dtype == torch.float8_e4m3fn else w,
                           g.view(torch.uint8) if g.dtype == torch.float8_e4m3fn else g)


def test_key_rotation_as_a_reduction(monkeypatch):
    """TUNE const_mm_reduction: the compressor's Hadamard rotation of its indexer keys compiles to a
    generated reduction instead of an extern GEMM, equal to the matmul to fp32 rounding; the switch changes
    the compile cache key (the traced graph does not show it)."""
    from dsv4c.ops.triton_kernels import TUNE
    from dsv4c.quant import hadamard_matrix
    from dsv4c.runtime import inductor_executor as ie

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 128, generator=g)
    h = hadamard_matrix(128)
    codes, outs, keys = {}, {}, {}
    for on in (False, True):
        monkeypatch.setitem(TUNE, "const_mm_reduction", on)
        torch._dynamo.reset()
        outs[on], code = run_and_get_code(torch.compile(ie._rotate, backend="inductor", fullgraph=True, dynamic=False),
                                          x, h)
        codes[on] = "\n".join(code)
        keys[on] = ie._runtime_hash()
    gemm = re.compile(r"extern_kernels\.b?mm\(")
    assert gemm.search(codes[False]) and not gemm.search(codes[True])
    assert (outs[True] - x @ h).abs().max() <= 1e-5 * (x @ h).abs().max()
    assert keys[True] != keys[False]


def test_indexer_topk_packed_scores_only_the_visible_entries():
    """The packed indexer's decomposition hands its visible counts to the score op as well as to the
    selection: the scores past each count are -inf (a kernel need not read them; the cache holds all
    max_seq_len / ratio entries) and the ids are the op's."""
    from dsv4c.runtime import inductor_executor as ie

    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 3, 4, 64, generator=g).to(torch.bfloat16)
    k = torch.randn(1, 20, 64, generator=g).to(torch.bfloat16)
    w = torch.rand(1, 3, 4, generator=g)
    codes, scale = ops.fp4_pack(k, 32)
    visible = torch.tensor([[2, 7, 12]])
    seen = []
    real = ops.indexer_score_packed

    class Spy:  # the decomposition's call, recorded
        def __call__(self, *args):  # noqa: ANN002, ANN204
            seen.append(args)
            return real(*args)

    scores = ops.indexer_score_packed(q, codes, scale, w, visible)
    assert bool(torch.isinf(scores[0, 0, 2:]).all()) and bool(torch.isfinite(scores[0, 2, :12]).all())
    assert bool(torch.isinf(scores[0, 2, 12:]).all())
    assert torch.equal(scores[torch.isfinite(scores)], ops.indexer_score_packed(q, codes, scale, w)[torch.isfinite(scores)])
    orig = ie.dsv4
    try:
        ie.dsv4 = type("NS", (), {"indexer_score_packed": Spy(), "topk_ids": ops.topk_ids})()
        ids = ie._indexer_topk_packed(q, codes, scale, w, visible, 4)
    finally:
        ie.dsv4 = orig
    assert len(seen) == 1 and seen[0][4] is visible
    assert torch.equal(ids, ops.indexer_topk_packed(q, codes, scale, w, visible, 4))


def test_compile_cache_key_covers_op_schemas_and_rewrites(monkeypatch):
    """The keyed compile cache's runtime hash reads every module of dsv4c.ops (op schemas, CPU
    implementations, launchers) and dsv4c.runtime (decompositions, load-time rewrites): a changed schema
    must not reuse a module compiled against the old one."""
    from pathlib import Path

    from dsv4c.runtime import inductor_executor as ie

    read = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: (read.append(self.name), real(self))[1])
    ie._runtime_hash()
    assert {"library.py", "kv_storage.py", "triton_kernels.py", "triton_gemv.py", "inductor_executor.py",
            "load_rewrites.py", "wo_a_fp8.py", "shared_expert_stream.py", "rope_rewrite.py"} <= set(read)
