"""The interactive downloads window (``nbia-retriever open``), built on Textual.

Imported only by the ``open`` command, so ``download`` never pays for Textual.
"""

from __future__ import annotations

from .app import RetrieverApp
from .command import open_command

__all__ = ["RetrieverApp", "open_command"]
