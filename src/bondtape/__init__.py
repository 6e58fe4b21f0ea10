"""bondtape: trade reporting and transparency for OTC bonds.

The public API is listed in ``__all__``; everything else is private and may change.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
