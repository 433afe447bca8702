"""dsv4c.bench's byte accounting (what a decode step must read) on flash-4 cache layouts, both storages."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from dsv4c.bench import bench_decode, decode_kv_bytes
from dsv4c.layout import cache_tensors
from dsv4c.spec import get_variant, truncated


def _manifest(storage: str) -> dict:
    spec = truncated(get_variant("flash"), 4)  # window, window, CSA (ratio 4), HCA (ratio 128)
    lay = cache_tensors(spec, 1, 65536, torch.bfloat16, storage=storage)
    return {"spec": spec.to_dict(), "kv_storage": storage,
            "cache_layout": {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype).removeprefix("torch.")}
                             for k, v in lay.items()}}


# compressor state read every step (fp32): CSA c_a/c_z [4, 1024], c_pa/c_pz [4, 512], i_a/i_z [4, 256],
# i_pa/i_pz [4, 128]; HCA c_a/c_z [128, 512]
STATE = 4 * 4 * (2 * 1024 + 2 * 512 + 2 * 256 + 2 * 128) + 4 * 2 * 128 * 512


@pytest.mark.parametrize("storage,main,index", [("packed", 584, 68), ("dense", 1024, 256)])
def test_decode_kv_bytes_at_8k(storage, main, index):
    # 4 windows of 128 entries; CSA: 2048 indexer keys scored, top-512 entries read; HCA: 64 entries
    want = 4 * 128 * main + 2048 * index + 512 * main + 64 * main + STATE
    assert decode_kv_bytes(_manifest(storage), 1, 8192) == want
    assert decode_kv_bytes(_manifest(storage), 3, 8192) == 3 * want


class _SleepyExecutor:
    """Stands in for an artifact's executor: each decode step costs the host a fixed 3 ms."""

    def run(self, entry, inputs):
        time.sleep(0.003)
        return torch.zeros((inputs["input_ids"].shape[0], 7))


def test_bench_decode_reports_the_host_time_per_step():
    eng = SimpleNamespace(_executor=_SleepyExecutor(), device=torch.device("cpu"), _static={}, cache={},
                          vocab_size=7, lengths=[])
    res = bench_decode(eng, batch=2, ctx=16, steps=4)
    assert 3.0 <= res["host_ms_per_step"] < 30.0
    assert res["step_ms"] >= res["host_ms_per_step"] * 0.99  # on the CPU the host's time is the step
    assert res["batch"] == 2 and res["context"] == 16 and res["finite"]
    assert res["step_source"] == "python loop" and res["step_ms"] == res["step_ms_python_loop"]


class _ChainExecutor(_SleepyExecutor):
    """...that can also chain greedy steps (as CUDA graphs do) at 1 ms of host time a step."""

    use_graphs = True

    def __init__(self):
        self.chains = []

    def decode_greedy(self, inputs, steps):
        self.chains.append((inputs["input_ids"].shape[0], int(inputs["start_pos"][0]), steps))
        time.sleep(0.001 * steps)
        return torch.zeros((inputs["input_ids"].shape[0], steps), dtype=torch.long)


def test_bench_decode_times_the_device_chain_where_the_executor_has_one():
    ex = _ChainExecutor()
    eng = SimpleNamespace(_executor=ex, device=torch.device("cpu"), _static={}, cache={}, vocab_size=7, lengths=[])
    res = bench_decode(eng, batch=2, ctx=16, steps=4)
    assert res["step_source"] == "device chain"
    assert 1.0 <= res["step_ms"] < 3.0 <= res["step_ms_python_loop"]
    assert ex.chains == [(2, 16, 4)] * 6  # every chain starts from the filled context; the first one unmeasured


def test_bench_run_reports_progress_after_each_measurement(tmp_path):
    """``progress`` sees the results so far after every decode configuration and the prefill (what a device
    call killed at its time limit keeps), and the final dict holds the same measurements."""
    from dsv4c import bench
    from dsv4c.lowering.build import BuildRequest, build

    out = tmp_path / "tiny"
    build(BuildRequest(output=out, variant="tiny", numerics="reference", dtype="fp32", max_seq_len=64, max_batch=2),
          progress=lambda m: None)
    seen = []
    res = bench.run(out, "cpu", batches=(1, 2), contexts=(8,), prefill_tokens=16, steps=2, log=lambda s: None,
                    progress=lambda r: seen.append((len(r["decode"]), "prefill" in r)))
    assert seen == [(1, False), (1, True), (2, True)]
    assert [r["batch"] for r in res["decode"]] == [1, 2] and res["prefill"]["tokens"] == 16
