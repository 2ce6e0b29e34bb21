"""QEMU's QObject conventions that show on the QMP wire: dictionary order, key sets, the JSON writer.

Pure functions and data structures, no I/O; safe on any thread.

QMP is JSON, where member order carries no meaning, but QEMU's answers have a fixed order
and some of its error messages name "the first" of several offending members. Both come
from QEMU's hash tables, emulated here so pynbd's answers are the same bytes:

* a ``QDict`` (qobject/qdict.c) keeps 512 buckets chosen by ``tdb_hash``; iteration goes
  bucket by bucket, newest entry first within a bucket. It orders every JSON object QEMU
  writes, and the members ``qmp_dispatch`` checks one after the other;
* the input visitor (qapi/qobject-input-visitor.c) tracks the members not yet visited in
  a GLib ``GHashTable`` (``g_str_hash``, open addressing); "Parameter 'x' is unexpected"
  names the first one left in that table's slot order.

Python values stand for QObjects: ``dict`` (insertion order = the order QEMU inserted the
members), ``list``, ``str``, ``int`` (QNum int64/uint64), ``float`` (QNum double),
``bool``, ``None`` (QNull).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

#: QDICT_BUCKET_MAX in include/qapi/qmp/qdict.h.
QDICT_BUCKETS = 512

_U32 = 0xFFFF_FFFF


def modified_utf8(text: str) -> bytes:
    """``text`` as QEMU stores strings: UTF-8 with U+0000 as ``C0 80`` (no NUL byte)."""
    return text.encode("utf-8", "surrogatepass").replace(b"\x00", b"\xc0\x80")


def _tdb_hash(key: bytes) -> int:
    """tdb_hash() of qobject/qdict.c."""
    value = (0x238F13AF * len(key)) & _U32
    for i, byte in enumerate(key):
        value = (value + (byte << (i * 5 % 24))) & _U32
    return (1103515243 * value + 12345) & _U32


def qdict_bucket(key: str) -> int:
    """The QDict bucket of ``key``."""
    return _tdb_hash(modified_utf8(key)) % QDICT_BUCKETS


def qdict_order(keys: Iterable[str]) -> list[str]:
    """``keys`` (in insertion order) in the order QEMU iterates a QDict holding them."""
    ranked = sorted((qdict_bucket(key), -i, key) for i, key in enumerate(keys))
    return [key for _, _, key in ranked]


# --- GLib GHashTable used as a set of strings (glib/ghash.c, GLib 2.74) -------------------------

_HASH_TABLE_MIN_SHIFT = 3
_UNUSED, _TOMBSTONE = 0, 1
#: prime_mod[] of glib/ghash.c, one per table size 1 << shift.
_PRIME_MOD = (1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521,
              131071, 262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213, 33554393,
              67108859, 134217689, 268435399, 536870909, 1073741789, 2147483647)


def _g_str_hash(key: bytes) -> int:
    """g_str_hash(): djb2 over *signed* chars."""
    value = 5381
    for byte in key:
        value = (value * 33 + (byte - 256 if byte >= 0x80 else byte)) & _U32
    return value


class GHashKeySet:
    """A set of strings iterated in the slot order of a GLib ``GHashTable`` that got the
    same insertions and removals (``g_hash_table_add`` / ``g_hash_table_remove``)."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._set_shift(_HASH_TABLE_MIN_SHIFT)
        self._hashes = [_UNUSED] * self._size
        self._keys: list[str | None] = [None] * self._size
        self._nnodes = 0
        self._noccupied = 0
        for key in keys:
            self.add(key)

    def _set_shift(self, shift: int) -> None:
        self._size = 1 << shift
        self._mod = _PRIME_MOD[shift]
        self._mask = self._size - 1

    def _index(self, key_hash: int) -> int:
        return ((key_hash * 11) & _U32) % self._mod

    @staticmethod
    def _hash(key: bytes) -> int:
        value = _g_str_hash(key)
        return 2 if value <= _TOMBSTONE else value  # HASH_IS_REAL needs >= 2

    def _lookup(self, key: str, key_hash: int) -> int:
        index = self._index(key_hash)
        step = 0
        tombstone = -1
        while self._hashes[index] != _UNUSED:
            if self._hashes[index] == key_hash and self._keys[index] == key:
                return index
            if self._hashes[index] == _TOMBSTONE and tombstone < 0:
                tombstone = index
            step += 1
            index = (index + step) & self._mask
        return tombstone if tombstone >= 0 else index

    def add(self, key: str) -> None:
        key_hash = self._hash(modified_utf8(key))
        index = self._lookup(key, key_hash)
        old = self._hashes[index]
        if old > _TOMBSTONE:
            return
        self._hashes[index] = key_hash
        self._keys[index] = key
        self._nnodes += 1
        if old == _UNUSED:
            self._noccupied += 1
        self._maybe_resize()

    def discard(self, key: str) -> None:
        index = self._lookup(key, self._hash(modified_utf8(key)))
        if self._hashes[index] <= _TOMBSTONE:
            return
        self._hashes[index] = _TOMBSTONE
        self._keys[index] = None
        self._nnodes -= 1
        self._maybe_resize()

    def _maybe_resize(self) -> None:
        size, occupied = self._size, self._noccupied
        if (size > self._nnodes * 4 and size > 1 << _HASH_TABLE_MIN_SHIFT) or size <= occupied + occupied // 16:
            self._resize()

    def _resize(self) -> None:
        # g_hash_table_resize(): a new size from the live entries, then resize_set()'s
        # in-place rehash (entries evicted along the way move on to their own slots).
        old_size = self._size
        wanted = int(self._nnodes * 1.333)
        self._set_shift(max(wanted.bit_length(), _HASH_TABLE_MIN_SHIFT))
        if self._size > old_size:
            self._hashes += [_UNUSED] * (self._size - old_size)
            self._keys += [None] * (self._size - old_size)
        placed = [False] * max(self._size, old_size)
        for i in range(old_size):
            node_hash = self._hashes[i]
            if node_hash <= _TOMBSTONE:
                self._hashes[i] = _UNUSED
                continue
            if placed[i]:
                continue
            self._hashes[i] = _UNUSED
            key, self._keys[i] = self._keys[i], None
            while True:
                index = self._index(node_hash)
                step = 0
                while placed[index]:
                    step += 1
                    index = (index + step) & self._mask
                placed[index] = True
                replaced = self._hashes[index]
                self._hashes[index] = node_hash
                if replaced <= _TOMBSTONE:
                    self._keys[index] = key
                    break
                node_hash = replaced
                key, self._keys[index] = self._keys[index], key
        if self._size < old_size:
            del self._hashes[self._size:]
            del self._keys[self._size:]
        self._noccupied = self._nnodes

    def __iter__(self) -> Iterator[str]:
        for key_hash, key in zip(self._hashes, self._keys):
            if key_hash > _TOMBSTONE and key is not None:
                yield key

    def __len__(self) -> int:
        return self._nnodes


# --- Modified UTF-8 (util/unicode.c) ----------------------------------------------------------

def valid_codepoint(cp: int) -> bool:
    """is_valid_codepoint(): in Unicode's range, not a surrogate, not a noncharacter."""
    if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
        return False
    return not (0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE)


_MIN_CODEPOINT = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)


def mod_utf8_codepoint(data: bytes, pos: int) -> tuple[int, int]:
    """mod_utf8_codepoint(): (code point or -1 when invalid, position after what it read).

    ``data`` ends where QEMU's C string ends (a missing continuation byte reads as NUL).
    """
    if pos >= len(data):
        return -1, pos
    byte = data[pos]
    pos += 1
    if byte < 0x80:
        return byte, pos
    if byte >= 0xFE or not byte & 0x40:
        return -1, pos  # impossible byte, or a continuation byte where a character starts
    length = 0
    mask = 0x80
    while byte & mask:
        length += 1
        mask >>= 1
    cp = byte & (mask - 1)
    for _ in range(1, length):
        byte = data[pos] if pos < len(data) else 0
        if byte & 0xC0 != 0x80:
            return -1, pos
        pos += 1
        cp = (cp << 6) | (byte & 0x3F)
    if not valid_codepoint(cp) or (cp < _MIN_CODEPOINT[length - 2] and not (cp == 0 and length == 2)):
        return -1, pos
    return cp, pos


def lossy_text(data: bytes) -> str:
    """Bytes as QEMU's JSON writer shows them: up to the first NUL (a C string), each invalid
    sequence as U+FFFD."""
    data = data.split(b"\x00", 1)[0]
    try:
        text = data.replace(b"\xc0\x80", b"\x00").decode("utf-8")
        if all(valid_codepoint(ord(c)) for c in text if ord(c) >= 0xFDD0):
            return text
    except UnicodeDecodeError:
        pass
    chars = []
    pos = 0
    while pos < len(data):
        cp, pos = mod_utf8_codepoint(data, pos)
        chars.append(chr(cp) if cp >= 0 else "\ufffd")
    return "".join(chars)


# --- The JSON writer (qobject/json-writer.c, compact form) --------------------------------------

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _quoted(text: str) -> str:
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    out = ['"']
    for char in text:
        escaped = _ESCAPES.get(char)
        if escaped is not None:
            out.append(escaped)
            continue
        cp = ord(char)
        if not valid_codepoint(cp):
            cp = 0xFFFD
        if cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}")
        elif cp < 0x20 or cp >= 0x7F:
            out.append(f"\\u{cp:04X}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def to_json(value: Any) -> str:
    """``value`` as QEMU writes it on QMP: objects in QDict order, ``", "`` and ``": "``
    between items, non-ASCII as ``\\uXXXX``, doubles as ``%.17g``.

    Raises TypeError for a value that is no QObject (a tuple, a set, bytes, ...).
    """
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return "%.17g" % value
    if isinstance(value, str):
        return _quoted(value)
    if isinstance(value, Mapping):
        members = ", ".join(f"{_quoted(key)}: {to_json(value[key])}" for key in qdict_order(value))
        return "{" + members + "}"
    if isinstance(value, list):
        return "[" + ", ".join(to_json(item) for item in value) + "]"
    raise TypeError(f"not a QObject: {type(value).__name__}")
