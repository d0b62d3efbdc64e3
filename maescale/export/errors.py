"""The one exception type of the export."""

from __future__ import annotations


class ExportError(RuntimeError):
    """An export cannot be done (bad input, bad output path, failed verification)."""
