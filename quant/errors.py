"""The one exception hierarchy, at the bottom of the import graph (quant, kernels, model, engine and CLI all raise
these). Library code raises them; the CLI's error boundary maps them to a line and an exit code."""

from __future__ import annotations


class V4Error(Exception):
    """Base class. `hint` names the next command or flag to try."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class BadInput(V4Error):
    """The user's input (file, flag, name) is wrong; fixing the input fixes it."""

    exit_code = 2


class CheckpointError(BadInput):
    """A source checkpoint is incomplete or not what config.json says."""


class GGUFError(BadInput):
    """A GGUF file is malformed, truncated or not a deepseek4 model."""


class UnsupportedModel(BadInput):
    """An architecture or tensor type this runner does not handle."""


class DiskSpaceError(V4Error):
    """Not enough free space for an output."""

    exit_code = 3


class DownloadError(V4Error):
    """The Hub refused or failed a request, or a file failed verification."""

    exit_code = 4


class RemoteError(V4Error):
    """A remote OpenAI-compatible server (`--remote`) could not be reached, refused the key or failed a request."""

    exit_code = 4  # DownloadError's: in both a server, not the input, said no


class NotFoundError(BadInput):
    """A model name, file or cache entry does not exist."""


class DoesNotFit(BadInput):
    """A configuration would not fit the machine's memory."""


class V4Warning(UserWarning):
    """Something was skipped but the command goes on (e.g. a corrupt prefix-cache entry); shown as one line."""
