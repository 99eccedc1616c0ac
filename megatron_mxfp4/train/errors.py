"""Errors in what the user gave (arguments, data, run folder): `mxfp4-train` reports them in one
line with exit status 2 and no traceback; every other exception is a bug and keeps its traceback."""
from __future__ import annotations

import contextlib


class UsageError(ValueError):
    """A problem with the command's arguments, data or run folder (the message says which)."""


@contextlib.contextmanager
def user_errors(context: str = ""):
    """Report the ValueError / OSError / AssertionError of the block as a `UsageError` (prefixed with
    `context`): for calls whose only inputs are the user's (a config, a path), whose checks raise those."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, OSError, AssertionError) as e:
        raise UsageError(f"{context}{e}") from e
