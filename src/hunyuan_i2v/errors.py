"""Project exception classes.

User errors carry a remedy in their message ("num_frames must be 4k+1: try 125 or 129"). Each class also
derives from the matching built-in, so callers that catch ``ValueError`` / ``FileNotFoundError`` keep working;
the CLI catches :class:`HunyuanI2VError` and prints a one-line message.
"""

from __future__ import annotations


class HunyuanI2VError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(HunyuanI2VError, ValueError):
    """A bad user input: an unreadable image, an invalid size or frame count, bad frames for a video."""


class CheckpointError(HunyuanI2VError, ValueError):
    """A checkpoint that cannot be used: unknown format, missing or mismatched keys or shapes."""


class ModelFilesError(HunyuanI2VError, FileNotFoundError):
    """Model files (weights, configs, tokenizers) that are missing where they were expected."""


class DeviceMemoryError(HunyuanI2VError, RuntimeError):
    """The device ran out of memory; the message names a memory plan predicted to fit."""
