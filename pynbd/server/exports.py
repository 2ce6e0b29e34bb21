"""An export: one opened image shared by every connection to it, plus its metadata."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pynbd.image import open_image
from pynbd.image.overlay import snapshot_overlay
from pynbd.image.base import Bitmap, Image, ImageError
from pynbd.protocol.handshake import ExportDescription
from pynbd.server.answers import AnswerCache
from pynbd.server.contexts import ContextTable
from pynbd.server.inline import InlineWhileFast
from pynbd.server.stats import IoStats

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ExportConfig:
    """What the command line says about one export."""

    name: str
    path: str
    description: str = ""
    read_only: bool = False
    fmt: str | None = None
    #: Restrict exported bitmaps to these names (None: every exportable bitmap).
    bitmaps: tuple[str, ...] | None = None
    #: Raw block status may use FIEMAP (False: SEEK_DATA/SEEK_HOLE only).
    fiemap: bool = True
    #: Writes go to a temporary qcow2 overlay over the image, deleted at close.
    snapshot: bool = False


@dataclass(eq=False)
class Export:
    name: str
    image: Image
    description: str
    read_only: bool
    bitmaps: Mapping[str, Bitmap]
    contexts: ContextTable
    #: How WRITEs to this image run: inline while fast, in threads after a slow one.
    writes: InlineWhileFast = field(default_factory=InlineWhileFast)
    #: Block status answers every connection may reuse (images with stable extents);
    #: the image's change feed drops those a change overlaps.
    answers: AnswerCache = field(default_factory=AnswerCache)
    #: I/O counters of the requests served (pynbd.server.stats); exports of one image may share them.
    stats: IoStats = field(default_factory=IoStats)

    def __post_init__(self) -> None:
        # (Created here, before any thread can reach them: cached_property has no lock.)
        self.image.leases  # noqa: B018
        self.image.changes.listen(self.answers.drop)

    #: The temporary overlay of a snapshot export (deleted at close).
    overlay: str | None = None
    #: The bitmaps it may export (``-B``); None: every consistent one of the image.
    bitmap_names: tuple[str, ...] | None = None
    #: The image is closed with the export (else it belongs to a block node: pynbd.qmp.nodes).
    owns_image: bool = True

    @classmethod
    def open(cls, config: ExportConfig) -> "Export":
        """Open the image; raises ImageError with a one-line message."""
        overlay = (snapshot_overlay(config.path, config.fmt, config.name)
                   if config.snapshot and not config.read_only else None)
        try:
            image = open_image(overlay or config.path, "qcow2" if overlay else config.fmt,
                               read_only=config.read_only, fiemap=config.fiemap)
        except BaseException:
            if overlay:
                os.unlink(overlay)
            raise
        try:
            export = cls.for_image(config.name, image, config.description, config.read_only, config.bitmaps,
                                   owns_image=True)
        except BaseException:
            image.close()
            if overlay:
                os.unlink(overlay)
            raise
        export.overlay = overlay
        if export.read_only and not config.read_only:
            log.warning("export %r: %s is served read-only (%s)", config.name, config.path,
                        image.read_only_reason or f"pynbd cannot write {image.format_name} images")
        return export

    @classmethod
    def for_image(cls, name: str, image: Image, description: str = "", read_only: bool = False,
                  bitmap_names: Sequence[str] | None = None, owns_image: bool = False) -> "Export":
        """An export of an opened image (closed with the export when ``owns_image``).
        ``bitmap_names``: export only these (ImageError naming the first missing one).
        The bitmaps are read now (:meth:`_loaded`)."""
        bitmaps = dict(image.bitmaps())
        if bitmap_names is not None:
            missing = [b for b in bitmap_names if b not in bitmaps]
            if missing:
                raise ImageError(f"{image.path}: bitmap {missing[0]!r} not found or not exportable")
            bitmaps = {b: bitmaps[b] for b in bitmap_names}
        bitmaps = cls._loaded(name, bitmaps, strict=bitmap_names is not None)
        return cls(
            name=name,
            image=image,
            description=description,
            read_only=read_only or image.read_only,
            bitmaps=bitmaps,
            contexts=ContextTable.for_image(image, bitmaps),
            bitmap_names=None if bitmap_names is None else tuple(bitmap_names),
            owns_image=owns_image,
        )

    @staticmethod
    def _loaded(name: str, bitmaps: dict[str, Bitmap], strict: bool) -> dict[str, Bitmap]:
        """The bitmaps read at open, as qemu does: the first client does not wait for
        them, and one that cannot be read is left out now (or, when asked for with
        --bitmap, refused) instead of failing requests later."""
        loaded: dict[str, Bitmap] = {}
        for bitmap_name, bitmap in bitmaps.items():
            try:
                bitmap.preload()
            except ImageError as exc:
                if strict:
                    raise ImageError(f"bitmap {bitmap_name!r} cannot be exported: {exc}") from None
                log.warning("export %r: bitmap %r left out: %s", name, bitmap_name, exc)
                continue
            loaded[bitmap_name] = bitmap
        return loaded

    def refresh_bitmaps(self) -> None:
        """Export the image's bitmaps as they are now (after bitmaps were added or removed
        at run time): new connections see them; open ones keep the contexts they chose,
        whose bitmaps stay while they read them (they are busy). On the event loop."""
        bitmaps = dict(self.image.bitmaps())
        if self.bitmap_names is not None:
            bitmaps = {name: bitmaps[name] for name in self.bitmap_names if name in bitmaps}
        self.bitmaps = bitmaps
        self.contexts = ContextTable.for_image(self.image, bitmaps)

    def describe(self) -> ExportDescription:
        return ExportDescription(
            name=self.name,
            size=self.image.size,
            read_only=self.read_only,
            description=self.description,
            contexts=self.contexts.names,
            can_fast_zero=self.image.fast_zero,
            # One image object per export, shared by all connections: a FLUSH on
            # one connection covers writes completed on any (NBD spec "NBD_FLAG_CAN_MULTI_CONN").
            can_multi_conn=True,
        )

    def close(self) -> None:
        """Stop listening to the image; close it if the export owns it. Once."""
        if self.answers.drop not in self.image.changes.listeners:
            return
        self.image.changes.unlisten(self.answers.drop)
        if not self.owns_image:
            return
        try:
            self.image.close()
        except OSError as exc:
            log.error("export %r: closing %s failed: %s", self.name, self.image.path, exc)
        finally:
            if self.overlay:
                os.unlink(self.overlay)


def open_exports(configs: Sequence[ExportConfig]) -> list[Export]:
    """Open every export or none (closing what was opened when one fails)."""
    opened: list[Export] = []
    try:
        for config in configs:
            opened.append(Export.open(config))
    except BaseException:
        for export in opened:
            export.close()
        raise
    return opened
