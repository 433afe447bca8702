"""The one error type dsv4c raises for bad input.

Every message names the problem and the fix. The CLI prints ``DSV4CError`` as a single paragraph
and exits non-zero; anything else escaping is a bug in dsv4c.
"""

from __future__ import annotations


def show(value: object, limit: int = 40) -> str:
    """A short repr for messages: long values are cut, and ints too large to print do not raise."""
    try:
        r = repr(value)
    except ValueError:  # int beyond sys.get_int_max_str_digits()
        r = f"<an integer of about {int(value.bit_length() * 0.30103)} digits>" if isinstance(value, int) else "<unprintable>"
    return r if len(r) <= limit else r[: limit - 3] + "..."


class DSV4CError(Exception):
    """A user-facing error: what is wrong, where, and what to do about it."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem} Fix: {fix}")


class ConfigError(DSV4CError):
    """A model config/spec is malformed or inconsistent."""


class CheckpointError(DSV4CError):
    """A checkpoint is missing tensors, has extra or mis-shaped ones, or a file is damaged."""


class ArtifactError(DSV4CError):
    """An artifact directory is incomplete, tampered with, or built for another target/version."""


class InputError(DSV4CError):
    """A runtime request is out of range (token ids, batch, context length, sampling parameters)."""


class BackendUnavailableError(DSV4CError):
    """A requested backend or target cannot run on this machine."""
