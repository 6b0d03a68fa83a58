"""The one exception the model loaders raise for problems a user can fix."""

from __future__ import annotations


class ModelLoadError(Exception):
    """A model could not be found, fetched or read; the message is one line saying what to do.

    The CLI prints it as `error: <message>` and exits with status 2, without a traceback.
    """
