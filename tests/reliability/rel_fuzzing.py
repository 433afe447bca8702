"""Shared pieces of the fuzz tests: settings, a hang guard, and JSON-ish value strategies."""

from __future__ import annotations

import os
import resource
import signal
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# CI: 1000 deterministic (derandomized) cases per target, so that CI is stable. For a deeper local or
# nightly run: DSV4C_FUZZ_EXAMPLES=20000 DSV4C_FUZZ_RANDOM=1 (fresh random cases each run).
EXAMPLES = int(os.environ.get("DSV4C_FUZZ_EXAMPLES", "1000"))
RANDOM = os.environ.get("DSV4C_FUZZ_RANDOM") == "1"
# The deadline flags slow cases; the alarm below turns a real hang into a failure, not a stuck CI job.
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=5), derandomize=not RANDOM, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
                print_blob=True)
HANG_S = 20
MEMORY_HEADROOM = 2 << 30


class Hang(Exception):
    pass


@contextmanager
def no_hang(seconds: float = HANG_S, extra_memory: int = MEMORY_HEADROOM) -> Iterator[None]:
    """Raise ``Hang`` if the body runs longer than ``seconds`` (SIGALRM; main thread only), and make a
    runaway allocation a ``MemoryError`` (address-space limit of the current size + ``extra_memory``)
    instead of an OOM kill of the whole test run."""

    def on_alarm(signum, frame):  # noqa: ANN001
        raise Hang(f"still running after {seconds} s")

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        vm = int(f.read().split()[0]) * resource.getpagesize()
    cap = vm + extra_memory if hard == resource.RLIM_INFINITY else min(vm + extra_memory, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2, 3, 4, 16, 64, 127, 128, 129, 256, 2**31, 2**63, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.5, 1.0, 1e-300, -0.0, 1e308]),
    st.text(max_size=12), st.sampled_from(["", "0", "128", "nan", "yarn", "fp8", "../x", "\x00"]),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                           max_leaves=8)


def junk_bytes() -> st.SearchStrategy[bytes]:
    """Bytes that are not a valid document: random, truncated-looking, deeply nested, huge numbers."""
    return st.one_of(
        st.binary(max_size=200),
        st.sampled_from([b"", b"{", b"[", b"null", b"[]", b"\"x\"", b"{\"a\":}", b"\xff\xfe{}", b"{}}",
                         b"[" * 100000, b"{\"a\":" * 50000, b"1" * 5000, b"{\"x\": 1e999999}", b"NaN", b"\x00" * 64]),
        st.text(max_size=80).map(lambda t: t.encode("utf-8", "surrogatepass")),
    )


def dumps(value: Any) -> bytes:
    """JSON as Python writes it (NaN/Infinity included, as real-world writers sometimes do)."""
    import json

    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")
