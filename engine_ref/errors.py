"""Errors a user can act on.

Every failure caused by input (text, audio, model files, config) is raised as a `TTSError` whose message names
the problem and the fix in one line. The CLI prints that line without a traceback; servers return it to the
client. Anything else escaping is a bug in this project.
"""

from __future__ import annotations


class TTSError(Exception):
    """A user-facing error: what is wrong, and how to fix it."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem.rstrip(".")
        self.fix = fix.rstrip(".") if fix else None
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.problem}. Fix: {self.fix}." if self.fix else f"{self.problem}."


class ConfigError(TTSError):
    """config.yaml is missing a key, has a wrong type, or describes an unsupported model."""


class ModelFilesError(TTSError):
    """The model directory or Hugging Face cache is incomplete or corrupt."""


class CheckpointError(TTSError):
    """A checkpoint deserialized but does not match the architecture (keys or shapes)."""


class InputError(TTSError):
    """A request's text, audio or generation parameters are unusable."""


class CapacityError(TTSError):
    """The server is at a configured bound (queued sequences, requests); retrying later can succeed."""
