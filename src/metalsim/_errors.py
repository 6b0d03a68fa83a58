"""The one exception type of the harness, with subclasses for the kind of failure."""

from __future__ import annotations


class MetalSimError(Exception):
    """Any failure of metalsim: a compile error (with the compiler's message and the .metal
    line), an out-of-bounds access, a divergent barrier, a deadlock, a bad dispatch argument."""


class MetalSimCompileError(MetalSimError):
    """The .metal file could not be turned into a kernel library."""


class MetalSimArgumentError(MetalSimError, ValueError):
    """A dispatch argument has a bad value (a missing buffer, too many threads, ...)."""


class MetalSimTypeError(MetalSimError, TypeError):
    """A dispatch argument has the wrong type (a list instead of a NumPy array, ...)."""


class MetalSimRuntimeError(MetalSimError, RuntimeError):
    """The kernel failed while running (out-of-bounds access, divergence, deadlock, ...)."""
