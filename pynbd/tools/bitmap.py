"""``pynbd bitmap``: an image's persistent dirty bitmaps, listed as ``qemu-img info`` shows them."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

from pynbd.image.base import BitmapInfo


def format_bitmaps_json(infos: Sequence[BitmapInfo]) -> str:
    """The bitmaps as a JSON list, one object of :class:`BitmapInfo`'s fields each."""
    return json.dumps([dataclasses.asdict(info) for info in infos], indent=2) + "\n"


def format_bitmap_list(infos: Sequence[BitmapInfo]) -> str:
    """Human text like the ``bitmaps:`` section of ``qemu-img info``, plus consistency and dirty bytes."""
    if not infos:
        return "bitmaps: none\n"
    out = ["bitmaps:"]
    for i, info in enumerate(infos):
        flags = [f for f, on in (("in-use", info.in_use), ("auto", info.enabled)) if on]
        out.append(f"    [{i}]:")
        out.append("        flags:")
        out.extend(f"            [{j}]: {flag}" for j, flag in enumerate(flags))
        out.append(f"        name: {info.name}")
        out.append(f"        granularity: {info.granularity}")
        out.append(f"        consistent: {'true' if info.consistent else 'false'}")
        dirty = "unknown" if info.dirty_bytes is None else str(info.dirty_bytes)
        out.append(f"        dirty bytes: {dirty}")
    return "\n".join(out) + "\n"
