"""A dirty bitmap held in memory as a :class:`bitarray.bitarray`, and its runs for block status.

:class:`DirtyBitmap` is what ``qemu:dirty-bitmap:NAME`` reads (NBD block status) and what
a writable image records writes into; its state is what QEMU's BlockDirtyInfo reports.
A bitmap that lives in an image file subclasses it to load its bits on first use
(:class:`pynbd.image.qcow2.bitmaps.Qcow2Bitmap`); one made at run time and not
persistent starts with its bits clear.

:meth:`DirtyBitmap.dirty_runs` serves whole-range scans from cached chunks of runs, found
by byte operations on the chunk's bits unpacked (:mod:`pynbd.unitruns`) or, in the
large chunks of a fine bitmap, by bitarray's C-level search; a query with REQ_ONE
searches the bits. So a query costs a few C loops, not Python work per bit or per run.
Bits change under :attr:`metadata_lock` (the image's); a change's range is then dropped
from the run cache (:meth:`forget_runs`, called by the image's change feed on the event
loop).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from operator import mul
from threading import Lock, RLock

from bitarray import bitarray

from pynbd.image.base import Bitmap, BitmapInfo, ImageIOError
from pynbd.runlength import Runs, bit_runs, concat
from pynbd.runspans import SpanRuns
from pynbd.unitruns import MAX_UNITS, unit_runs

#: Guest bytes per cached chunk of runs at most: 2 GiB, so a run inside a chunk fits
#: a u32 and slices go to the wire encoder as bytes.
RUN_CHUNK_BYTES = 1 << 31
#: From this granularity on a chunk holds at most MAX_UNITS granules, and its runs come
#: from byte operations without work per run (a freshly fragmented bitmap's first
#: scan). A finer bitmap keeps 2 GiB chunks (more of the image per cached chunk),
#: their runs found by bit search, which works per run.
UNIT_RUNS_GRANULARITY = 64 * 1024
#: Chunks kept per bitmap (a full scan of a 256 GiB image at 64 KiB granularity).
RUN_CHUNKS_CACHED = 256
#: A chunk whose runs take more bytes than this is not kept: at most 32 MiB per bitmap.
MAX_CACHED_CHUNK_BYTES = 128 * 1024


class DirtyBitmap(Bitmap):
    """A dirty bitmap of an image of ``image_size`` bytes, one bit per ``granularity``
    bytes. ``bits`` are its bits (little endian); None: :meth:`_load` reads them on
    first use. Not persistent, recording, and not busy until told otherwise."""

    #: Stored in the image file (QEMU's ``persistent``).
    persistent = False

    def __init__(self, name: str, granularity: int, image_size: int, bits: bitarray | None = None) -> None:
        self.name = name
        self.granularity = granularity
        #: The size of the image it tracks (merges need equal sizes).
        self.image_size = image_size
        self.nbits = -(-image_size // granularity)
        if bits is not None and len(bits) != self.nbits:
            raise ValueError(f"bitmap {name!r}: {len(bits)} bits for {self.nbits} granules")
        self._bits = bits
        self._load_lock = Lock()
        #: Why this bitmap cannot be used (None when it can): QEMU's ``inconsistent``.
        self.problem: str | None = None
        #: Writes are recorded into it (QEMU's ``recording``; the qcow2 flag ``auto``).
        self.recording = True
        #: NBD connections with its context selected: busy while any (QEMU's ``busy``).
        self.readers = 0
        #: Guards the bits against a writer: the image's metadata lock once the image
        #: that owns the bitmap is made, a lock of its own until then.
        self.metadata_lock: RLock = RLock()
        #: chunk index -> its runs (see :meth:`_chunk_runs`), least recently used first.
        self._run_cache: OrderedDict[int, SpanRuns] = OrderedDict()
        #: Chunks a change dropped from the cache, to compute again once changes pause
        #: (:meth:`recompute_dropped`).
        self._dropped: set[int] = set()
        self._unit_bits = granularity.bit_length() - 1
        if granularity != 1 << self._unit_bits:
            raise ValueError(f"bitmap {name!r}: granularity {granularity} is not a power of two")
        chunk_granules = max(1, RUN_CHUNK_BYTES // granularity)
        if granularity >= UNIT_RUNS_GRANULARITY:
            chunk_granules = min(chunk_granules, MAX_UNITS)
        self._chunk_granules = chunk_granules

    @property
    def consistent(self) -> bool:
        return self.problem is None

    @property
    def busy(self) -> bool:
        return self.readers > 0

    def bits(self) -> bitarray:
        """The bit array (loaded on first call); raises ImageIOError if unreadable."""
        if self._bits is None:
            with self._load_lock:
                if self._bits is None:
                    self._bits = self._load()
        return self._bits

    def _load(self) -> bitarray:
        raise ImageIOError(f"bitmap {self.name!r} has no bits")

    def count(self) -> int:
        """Dirty bytes (granules times the granularity), as QEMU counts them."""
        return self.bits().count(1) * self.granularity

    def info(self) -> BitmapInfo:
        """The bitmap as QEMU's BlockDirtyInfo describes it; a bitmap whose bits cannot be
        read is inconsistent (count 0)."""
        problem = self.problem
        count = 0
        if problem is None:
            try:
                count = self.count()
            except ImageIOError as exc:
                problem = f"cannot be read: {exc}"
        return BitmapInfo(name=self.name, count=count, granularity=self.granularity,
                          recording=self.recording and problem is None, busy=self.busy,
                          persistent=self.persistent, inconsistent=problem is not None,
                          flags=self.flags(), problem=problem)

    def flags(self) -> tuple[str, ...]:
        """The flags ``qemu-img info`` shows for it (none for a bitmap only in memory)."""
        return ()

    # -- queries --

    def dirty_runs(self, offset: int, length: int, limit: int | None = None) -> Runs:
        """See :meth:`Bitmap.dirty_runs`; on the event loop thread. The bits are read
        (on first use) before :attr:`metadata_lock` is taken, and the search runs under it,
        so a writer setting bits under that lock is never seen half done."""
        self.bits()
        with self.metadata_lock:
            return self._dirty_runs(offset, length, limit)

    def _dirty_runs(self, offset: int, length: int, limit: int | None) -> Runs:
        g = self.granularity
        end = offset + length
        first = offset // g
        last = min(-(-end // g), self.nbits)  # granules [first, last) overlap the range
        if first >= last:  # past the last granule (cannot happen inside the image)
            return Runs([length], [0], True)
        if limit is not None and limit < 64:
            return self._few_runs(offset, end, first, last, limit)
        # Whole ranges come from cached chunks of runs: a scan of the bitmap
        # (nbdinfo --map, an incremental backup) then costs slices, not bit searches.
        stop = min(end, self.nbits * g)
        chunk_bytes = self.chunk_bytes
        parts: list[Runs] = []
        pos = offset
        while pos < stop:
            chunk = pos // chunk_bytes
            part_end = min(stop, (chunk + 1) * chunk_bytes)
            parts.append(self._chunk_runs(chunk).slice(pos, part_end))
            pos = part_end
        if end > stop:  # the range runs past the bitmap's last granule: clean
            parts.append(Runs([end - stop], [0], True, end - stop, end - stop))
        runs = concat(parts)
        return runs if limit is None else runs.head(limit)

    def _few_runs(self, offset: int, end: int, first: int, last: int, limit: int) -> Runs:
        """At most ``limit`` runs from ``offset`` (REQ_ONE), found boundary by boundary in C
        without copying the range or caching."""
        g = self.granularity
        bits = self.bits()
        granules: list[int] = []
        values: list[int] = []
        k = first
        while k < last and len(granules) < limit:
            dirty = bits[k]
            nxt = bits.find(not dirty, k + 1, last)
            stop = last if nxt < 0 else nxt
            granules.append(stop - k)
            values.append(dirty)
            k = stop
        # Granules to bytes, clipping the partial first and last granule to the range.
        lengths = list(map(mul, granules, repeat(g)))
        lengths[0] -= offset - first * g
        if k == last:
            overshoot = last * g - end
            if overshoot > 0:
                lengths[-1] -= overshoot
            elif overshoot < 0:  # the range runs past the bitmap's last granule: clean
                if values[-1]:
                    lengths.append(-overshoot)
                    values.append(0)
                else:
                    lengths[-1] -= overshoot
        # Runs found at value changes are non-empty and alternate.
        return Runs(lengths, values, True)

    def forget_runs(self, offset: int, length: int) -> bool:
        """Drop the cached run chunks that overlap guest bytes ``[offset, offset+length)``
        (their bits change or will; the bits themselves are the authority and stay);
        True if one was cached.

        A granule never straddles two chunks, so the chunks overlapping the range
        hold every granule the change can dirty. On the event loop thread.
        """
        if length <= 0 or not self._run_cache:
            return False
        chunk_bytes = self.chunk_bytes
        first, last = offset // chunk_bytes, (offset + length - 1) // chunk_bytes
        run_cache = self._run_cache
        if last - first < len(run_cache):
            dropped = [chunk for chunk in range(first, last + 1) if run_cache.pop(chunk, None) is not None]
        else:  # a range wider than the cache: look at what is cached instead
            dropped = [c for c in run_cache if first <= c <= last]
            for chunk in dropped:
                del run_cache[chunk]
        self._dropped.update(dropped)
        return bool(dropped)

    def recompute_dropped(self) -> bool:
        """Compute again one chunk a change dropped from the cache, so that the next scan
        (a backup reading the bitmap after writes) finds it ready; True while others
        remain. On the event loop thread, under :attr:`metadata_lock` (taken here, without
        waiting: False and nothing done when a writer holds it)."""
        if not self._dropped:
            return False
        if not self.metadata_lock.acquire(blocking=False):
            return True
        try:
            chunk = min(self._dropped)  # in the order of a scan
            self._dropped.discard(chunk)
            if chunk not in self._run_cache:
                self._chunk_runs(chunk)
        finally:
            self.metadata_lock.release()
        return bool(self._dropped)

    @property
    def read_soon(self) -> bool:
        """A connection reads the bitmap (has its context selected) and chunks it had
        cached were dropped: its next scan will want them."""
        return bool(self.readers and self._dropped)

    @property
    def cached_chunks(self) -> list[int]:
        """Indexes of the chunks whose runs are cached, least recently used first
        (for tests and statistics); chunk ``k`` covers guest bytes from
        ``k * chunk_bytes`` (:attr:`chunk_bytes`)."""
        return list(self._run_cache)

    @property
    def chunk_bytes(self) -> int:
        """Guest bytes one cached chunk of runs covers."""
        return self._chunk_granules * self.granularity

    def _chunk_runs(self, chunk: int) -> SpanRuns:
        """The runs of one chunk of granules, in bytes (computed once, kept while the cache allows).

        Block status runs on the event loop thread only, so the cache needs no lock.
        """
        cached = self._run_cache.get(chunk)
        if cached is not None:
            self._run_cache.move_to_end(chunk)
            return cached
        g = self.granularity
        first = chunk * self._chunk_granules
        bits = self.bits()[first:min(first + self._chunk_granules, self.nbits)]
        if len(bits) <= MAX_UNITS:
            runs = unit_runs(first * g, bits.unpack(), self._unit_bits, len(bits) * g)
        else:
            granules = bit_runs(bits)
            runs = SpanRuns(first * g, Runs(list(map(mul, granules.lengths, repeat(g))), granules.values, True))
        if runs.nbytes <= MAX_CACHED_CHUNK_BYTES:  # a pathological chunk is computed each time instead
            self._run_cache[chunk] = runs
            while len(self._run_cache) > RUN_CHUNKS_CACHED:
                self._run_cache.popitem(last=False)
        return runs

    def preload(self) -> None:
        """Load the bits and compute the runs of the chunks the cache keeps."""
        self.bits()
        for chunk in range(min(RUN_CHUNKS_CACHED, -(-self.nbits // self._chunk_granules))):
            self._chunk_runs(chunk)


def forget_runs(bitmaps: Iterable[DirtyBitmap], offset: int, length: int) -> bool:
    """:meth:`DirtyBitmap.forget_runs` of each bitmap (True if one dropped a chunk); one
    with no run cached costs no call (a writer calls this for every change)."""
    dropped = False
    for bitmap in bitmaps:
        if bitmap._run_cache and bitmap.forget_runs(offset, length):
            dropped = True
    return dropped


#: Quiet time after the last change before dropped run chunks are computed again: far
#: above the gaps inside a burst of writes, below the time a backup tool takes to start
#: reading after them. RECOMPUTE_AFTER_READ while a connection reads a bitmap with
#: dropped chunks (its scan is coming). The shorter time is also how often a pending
#: recomputation looks again.
RECOMPUTE_AFTER = 0.005
RECOMPUTE_AFTER_READ = 0.001


class DroppedRunsRecomputer:
    """Computes again, once changes pause, the run chunks that changes dropped from the
    bitmaps' caches: a backup that reads a bitmap right after a burst of writes then
    finds them ready instead of waiting for them (the chunks are the ones a scan had
    cached; nothing else is computed). One chunk per event loop turn, in scan order,
    so requests are not held up (a scan arriving meanwhile computes what it needs
    first, and the turns between its requests compute ahead of it); a new change
    pauses it again.

    On the event loop thread: :meth:`changed` from the image's change listener; outside
    a running loop (in-process use) it does nothing.
    """

    def __init__(self, bitmaps: Callable[[], Sequence[DirtyBitmap]]) -> None:
        self._bitmaps = bitmaps
        self._last_change = 0.0
        self._handle: asyncio.Handle | None = None

    def changed(self, dropped: bool) -> None:
        """A change was announced (``dropped``: it dropped cached chunks)."""
        if not dropped and self._handle is None:
            return
        self._last_change = time.monotonic()
        if self._handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._handle = loop.call_later(RECOMPUTE_AFTER_READ, self._step)

    def _step(self) -> None:
        loop = asyncio.get_running_loop()
        bitmaps = self._bitmaps()
        wait = RECOMPUTE_AFTER_READ if any(b.read_soon for b in bitmaps) else RECOMPUTE_AFTER
        quiet = time.monotonic() - self._last_change
        if quiet < wait:
            self._handle = loop.call_later(min(wait - quiet, RECOMPUTE_AFTER_READ), self._step)
            return
        more = False
        for bitmap in bitmaps:
            more = bitmap.recompute_dropped() or more
        self._handle = loop.call_soon(self._step) if more else None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
