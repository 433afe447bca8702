"""The export machinery on a small program: functionalization of the in-place cache updates, the fast
(direct) and the portable (torch.onnx.export) paths giving the same model behaviour, and the checks
that refuse what the rewrite cannot take."""

from __future__ import annotations

import pytest
import torch

ir = pytest.importorskip("onnx_ir")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import dsv4c.ops  # noqa: E402, F401
from dsv4c import quant  # noqa: E402
from dsv4c.frontend.export import to_program  # noqa: E402
from dsv4c.lowering import onnx_backend as ob  # noqa: E402

dsv4 = torch.ops.dsv4
N, D, V, W = 128, 128, 32, 4


class Toy(torch.nn.Module):
    """A decode-shaped step: embed, an FP8 linear, a ring buffer written with scatter_, an accumulator
    written with copy_, both read after they change."""

    def forward(self, params, consts, cache, input_ids, start_pos):  # noqa: ANN001
        h = params["embed"][input_ids]  # [B, 1, D]
        y = dsv4.fp8_linear(h, params["w"], params["w_s"], True, True)  # [B, 1, N]
        ring, acc = cache["win"], cache["acc"]
        slot = (start_pos % W)[:, None, None].expand(-1, 1, N)
        ring.scatter_(1, slot, y)
        acc.copy_(acc + y[:, 0] * consts["scale"])
        return (ring.sum(1) + acc) @ params["head"].t()


def _toy_inputs(batch: int):
    g = torch.Generator().manual_seed(0)
    q, s = quant.quantize_fp8_weight(torch.randn(N, D, generator=g) * 0.05)
    params = {"embed": torch.randn(V, D, generator=g), "w": q, "w_s": s, "head": torch.randn(V, N, generator=g)}
    consts = {"scale": torch.tensor(0.5)}
    cache = {"win": torch.randn(batch, W, N, generator=g), "acc": torch.randn(batch, N, generator=g)}
    return params, consts, cache, torch.randint(0, V, (batch, 1), generator=g), torch.tensor([3, 6, 9][:batch])


@pytest.fixture(scope="module")
def toy():
    inputs = _toy_inputs(2)
    params, consts, cache, _, _ = inputs
    b = torch.export.Dim("batch", min=1, max=64)
    ds = ({k: None for k in params}, {k: None for k in consts}, {k: {0: b} for k in cache}, {0: b}, {0: b})
    ep = torch.export.export(Toy(), inputs, dynamic_shapes=ds, strict=False)
    names = ([f"params.{k}" for k in params] + [f"consts.{k}" for k in consts] + [f"cache.{k}" for k in cache]
             + ["input_ids", "start_pos"])
    prog = to_program(ep, "decode", names, {})
    tensors = {f"params.{k}": v for k, v in params.items()} | {f"consts.{k}": v for k, v in consts.items()}
    layout = {k: {"shape": list(v.shape[1:]), "dtype": "float32"} for k, v in cache.items()}
    return prog, tensors, layout


def _run_onnx(model, tensors, inputs):
    import onnx

    proto = ir.serde.serialize_model(model)
    data = ob.DataFile()
    # initializers inline for the test: bind, then load the data back into the proto
    ob.bind_initializers(proto, tensors, data, "x.data")
    blob = b"".join(data.chunks)
    for t in proto.graph.initializer:
        loc = {e.key: e.value for e in t.external_data}
        if not loc:
            continue
        t.raw_data = blob[int(loc["offset"]):int(loc["offset"]) + int(loc["length"])]
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
    proto = ob.infer(proto)
    onnx.checker.check_model(proto, full_check=True)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    params, consts, cache, ids, start = inputs
    feed = {"cache.win": cache["win"].numpy(), "cache.acc": cache["acc"].numpy(), "input_ids": ids.numpy(),
            "start_pos": start.numpy()}
    return [torch.from_numpy(o) for o in sess.run(None, feed)], [o.name for o in sess.get_outputs()]


@pytest.mark.parametrize("method", ["direct", "public"])
def test_both_export_paths_match_the_program(toy, method):
    prog, tensors, layout = toy
    model, used = ob.export_program(prog, tensors, layout, max_seq_len=16, method=method)
    assert used == method
    for batch in (1, 3):  # the batch dim is symbolic
        inputs = _toy_inputs(batch)
        outs, names = _run_onnx(model, tensors, inputs)
        assert names == ["logits", "cache_out.win", "cache_out.acc"]
        params, consts, cache, ids, start = inputs
        ref_cache = {k: v.clone() for k, v in cache.items()}
        flat = [*params.values(), *consts.values(), *ref_cache.values(), ids, start]
        want = prog(*flat)
        torch.testing.assert_close(outs[0], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outs[1], ref_cache["win"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(outs[2], ref_cache["acc"], rtol=1e-6, atol=1e-6)


def test_functionalize_rewires_readers_after_the_mutation(toy):
    prog, _, _ = toy
    gm = ob.functional_graph(prog)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.scatter_.src not in targets and torch.ops.aten.copy_.default not in targets
    assert torch.ops.aten.scatter.src in targets
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert len(out) == 3 and all(isinstance(v, torch.fx.Node) and v.op != "placeholder" for v in out)


def test_functionalize_refuses_a_view_read_after_the_mutation():
    g = torch.fx.Graph()
    cache = g.placeholder("cache")
    view = g.call_function(torch.ops.aten.slice.Tensor, (cache, 0, 0, 1))
    g.call_function(torch.ops.aten.copy_.default, (cache, cache))
    g.output(g.call_function(torch.ops.aten.add.Tensor, (view, view)))
    with pytest.raises(ob.ExportUnsupported, match="view"):
        ob.functionalize(g, [cache])


def test_functionalize_refuses_mutating_a_non_cache_input():
    g = torch.fx.Graph()
    cache, other = g.placeholder("cache"), g.placeholder("other")
    g.call_function(torch.ops.aten.copy_.default, (other, cache))
    g.output(cache)
    with pytest.raises(ob.ExportUnsupported, match="not a cache input"):
        ob.functionalize(g, [cache])


def test_onnx_backend_refuses_bf16_with_a_fix():
    from dsv4c.errors import ConfigError

    with pytest.raises(ConfigError, match="--dtype fp32"):
        ob.check("cpu", "bf16")
    ob.check("cpu", "fp32")
