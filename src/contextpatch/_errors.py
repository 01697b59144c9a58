"""Exceptions raised by contextpatch. All derive from ``ContextPatchError`` (a ``ValueError``)."""

__all__ = ["ContextPatchError", "DegenerateNormError", "UnsupportedModelError", "PatchFileError"]


class ContextPatchError(ValueError):
    """Bad input to a contextpatch function: the message names the problem."""


class DegenerateNormError(ContextPatchError):
    """A norm in a patch denominator is zero or below the tolerance, so the patch would be inf/NaN."""


class UnsupportedModelError(ContextPatchError):
    """The model's architecture has no adapter; the message lists the supported families."""


class PatchFileError(ContextPatchError):
    """A saved patch file is missing, truncated, corrupt, or belongs to a different model."""
