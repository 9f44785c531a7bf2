"""The registry: one ``Family`` per model family (``weights_conversion.family``).

Adding a family is one file here (plus the model in ``packvit/models/``) and one entry below;
CONTRIBUTING.md says what the file holds.
"""

from __future__ import annotations

from ..family import Family
from . import aimv2, dinov3, siglip2

FAMILIES: dict[str, Family] = {f.name: f for f in (aimv2.FAMILY, dinov3.FAMILY, siglip2.FAMILY)}

__all__ = ["FAMILIES", "Family"]
