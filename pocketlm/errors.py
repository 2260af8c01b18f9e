"""The one exception type users see: a file (or input) and what is wrong with it."""

from __future__ import annotations

import os


class PocketLMError(Exception):
    """A clear, user-facing error. The CLI prints `pocketlm: error: <message>` and exits with 2."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class UnsupportedModelError(PocketLMError):
    """An architecture (or a variant of one) that pocketlm does not run."""
