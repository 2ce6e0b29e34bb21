"""Watch a server's system calls from outside the process: pynbd under ``strace -f``.

Durability cannot be seen by reading the image back (the page cache answers either
way), so the durability tests run the server under strace and check the *order* of
what it did: a change to an image file (a write, an fallocate, a truncate) returned,
then a sync of that file started and returned, then the reply that promises
durability (a FLUSH's, a FUA request's) started to be sent.

The order is strace's: with ``-f`` it writes one line per event in the order it
handled them, and a call that another thread's event interrupts is split into
``NAME(args <unfinished ...>`` (entered) and ``<... NAME resumed>rest) = result``
(returned). A traced thread stops at every entry and exit of a traced call until
strace has logged it, so whatever a thread does *because* another's call returned
(the event loop sending a reply once the sync thread is done) is logged after that
return. ``Syscall.start`` and ``Syscall.end`` are the line numbers of the entry and the
return; "A returned before B started" is ``A.end < B.start``.

Changes the trace cannot see (io_uring, mmap, copy_file_range) make the "expected
change" check of :func:`check_durable` fail rather than pass.

Pieces:

* :class:`StracedPynbd` - ``strace ... python -m pynbd serve`` (a PynbdServer);
* :func:`parse` - strace's text to :class:`Syscall` records (unit-tested on hand-written
  lines in tests/test_durability.py);
* :class:`Trace` - the changes to files, the syncs, the reply to a cookie;
* :func:`check_durable` - the rule, over several files and kinds of change (the qcow2
  tests extend it to metadata: refcounts, L2, L1 in the same file).
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.servers import PynbdServer

#: Calls that change a file, sync it, or may carry a reply, plus openat/close for the
#: O_DSYNC/O_SYNC of each descriptor.
TRACED = ("openat", "close", "pwrite64", "pwritev", "pwritev2", "write", "writev",
          "fallocate", "ftruncate", "fsync", "fdatasync", "sync_file_range",
          "sendto", "sendmsg", "sendmmsg", "sendfile")

#: -s: enough for a batch of coalesced replies; longer strings are cut (``"..."...``),
#: and a reply in a cut part is not found (the check fails, it does not pass).
STRING_LIMIT = 1024

# Reply magics (simple, structured, extended); the cookie follows 8 bytes after each.
REPLY_MAGICS = (bytes.fromhex("67446698"), bytes.fromhex("668e33ef"), bytes.fromhex("6e8a278c"))


def strace_argv(log_path: str | os.PathLike, command: list[str], syscalls: Iterable[str] = TRACED) -> list[str]:
    """``strace`` options that :func:`parse` reads: threads (-f), fd paths (-y), every
    string in hex (-xx), no signal or exit lines; only ``syscalls`` are stopped at
    (--seccomp-bpf: the others run at full speed)."""
    return ["strace", "-f", "--seccomp-bpf", "-qq", "-ttt", "-y", "-xx", "-s", str(STRING_LIMIT),
            "-e", "signal=none", "-e", "trace=" + ",".join(syscalls),
            "-o", str(log_path), "--", *command]


class StracedPynbd(PynbdServer):
    """pynbd run under strace, tracing ``syscalls`` (default :data:`TRACED`). strace
    running a command blocks fatal signals (-I 3), so :meth:`stop` sends SIGTERM to
    pynbd itself (:attr:`pid`); strace exits with pynbd's status. :meth:`calls` counts
    calls logged so far; :meth:`trace` stops the server and parses the log."""

    kind = "pynbd-strace"
    trace_path: Path | None = None

    def __init__(self, image=None, *extra_args, syscalls: Iterable[str] = TRACED, **kw) -> None:
        self.syscalls = tuple(syscalls)
        super().__init__(image, *extra_args, **kw)

    def argv(self) -> list[str]:
        if self.trace_path is None:
            self.trace_path = self._unique("strace.log")
        return strace_argv(self.trace_path, super().argv(), self.syscalls)

    def calls(self, text: str) -> int:
        """Lines logged so far that contain ``text`` (e.g. ``FS_IOC_FIEMAP``, ``accept4(``):
        strace writes each call as it returns."""
        assert self.trace_path is not None
        try:
            return self.trace_path.read_text(errors="replace").count(text)
        except FileNotFoundError:
            return 0

    @property
    def pid(self) -> int:
        """pynbd's pid: strace's only child."""
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        assert len(children) == 1, f"strace has children {children}"
        return int(children[0])

    def stop(self, *, check: bool = True, timeout: float = 20.0) -> int:
        if self.proc is not None and self.returncode is None and self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except (OSError, AssertionError):
                pass  # pynbd already gone: strace is exiting
        return super().stop(check=check, timeout=timeout)

    def trace(self) -> "Trace":
        """Stop the server (it must exit 0), then the complete trace."""
        self.stop()
        assert self.trace_path is not None
        return Trace(parse(self.trace_path.read_text()))


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------

_ESCAPES = {"n": 10, "t": 9, "r": 13, "v": 11, "f": 12, "a": 7, "b": 8, "\\": 92, '"': 34,
            "'": 39, "?": 63}


def decode_c_string(text: str) -> bytes:
    """The bytes of a C string body as strace prints it (``\\xNN``, octal, ``\\n``...)."""
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out += ch.encode()
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "x":
            out.append(int(text[i + 2:i + 4], 16))
            i += 4
        elif nxt in "01234567":
            m = re.match(r"[0-7]{1,3}", text[i + 1:])
            assert m is not None
            out.append(int(m.group(), 8) & 0xFF)
            i += 1 + len(m.group())
        else:
            out.append(_ESCAPES.get(nxt, ord(nxt)))
            i += 2
    return bytes(out)


_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"(\.\.\.)?')
_FD = re.compile(r"^(-?\d+|AT_FDCWD)<(.*)>$", re.S)


def split_args(text: str) -> list[str]:
    """Top-level arguments of a call: commas inside strings, ``[]``, ``{}``, ``()`` and
    ``<path>`` annotations do not split."""
    args: list[str] = []
    depth = 0
    start = 0
    i = 0
    in_string = False
    while i < len(text):
        ch = text[i]
        if in_string:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{(<":
            depth += 1
        elif ch in "]})>":
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(text[start:i].strip())
            start = i + 1
        i += 1
    last = text[start:].strip()
    if last or args:
        args.append(last)
    return args


def fd_annotation(arg: str) -> tuple[int | None, str | None]:
    """``3<\\x2f\\x74...>`` -> (3, "/t..."); a bare number -> (n, None)."""
    m = _FD.match(arg.strip())
    if m:
        fd = None if m.group(1) == "AT_FDCWD" else int(m.group(1))
        return fd, decode_c_string(m.group(2)).decode(errors="replace")
    try:
        return int(arg), None
    except ValueError:
        return None, None


@dataclass
class Syscall:
    """One system call; ``start``/``end`` are the log line numbers of its entry and its
    return (``end`` None: it had not returned when the log ends)."""

    pid: int
    name: str
    args_text: str
    result: str | None
    start: int
    end: int | None
    line: str  # the log text (both halves of a split call), for messages
    args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.args = split_args(self.args_text)

    @property
    def ok(self) -> bool:
        """Returned, without an error."""
        return self.end is not None and self.retval is not None and self.retval >= 0

    @property
    def retval(self) -> int | None:
        if self.result is None:
            return None
        m = re.match(r"-?\d+", self.result)
        return int(m.group()) if m else None

    def fd(self, i: int = 0) -> tuple[int | None, str | None]:
        """(fd, path from -y) of argument ``i``."""
        return fd_annotation(self.args[i]) if i < len(self.args) else (None, None)

    def result_path(self) -> str | None:
        """The path -y prints after a returned descriptor (openat)."""
        return fd_annotation(self.result.split(" ", 1)[0])[1] if self.result else None

    def int_arg(self, i: int) -> int | None:
        try:
            return int(self.args[i], 0)
        except (IndexError, ValueError):
            return None

    def data(self) -> list[bytes]:
        """The bytes in the call's strings, consecutive strings joined (the iovecs of a
        writev/sendmsg are one stream) except across a string strace cut short."""
        pieces: list[bytes] = []
        current = bytearray()
        for m in _STRING.finditer(self.args_text):
            current += decode_c_string(m.group(1))
            if m.group(2):  # cut: what follows is not adjacent
                pieces.append(bytes(current))
                current = bytearray()
        if current:
            pieces.append(bytes(current))
        return pieces

    def __str__(self) -> str:
        """Readable: paths and strings decoded, long strings cut."""
        shown = []
        for arg in self.args:
            fd, path = fd_annotation(arg)
            string = _STRING.fullmatch(arg)
            if path is not None:
                shown.append(f"{fd}<{path}>")
            elif string:
                data = decode_c_string(string.group(1))
                shown.append(repr(data[:24]) + ("..." if len(data) > 24 or string.group(2) else ""))
            else:
                shown.append(arg if len(arg) <= 80 else arg[:80] + "...")
        return (f"[log lines {self.start}-{self.end}, pid {self.pid}] {self.name}("
                f"{', '.join(shown)}) = {self.result}")


_LINE = re.compile(r"^(?:(\d+)\s+)?(?:\d+\.\d+\s+)?(.*)$", re.S)
_UNFINISHED = " <unfinished ...>"
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$", re.S)
_CALL = re.compile(r"^(\w+)\((.*)$", re.S)


def _split_result(rest: str) -> tuple[str, str]:
    """``args) = result`` -> (args, result)."""
    args, sep, result = rest.rpartition(") = ")
    if not sep:
        raise ValueError(f"no result in {rest!r}")
    return args, result.strip()


def parse(text: str) -> list[Syscall]:
    """strace -f output (with or without pids and -ttt stamps) to calls, in the order
    they were entered. Signal, exit and unknown lines are skipped."""
    calls: list[Syscall] = []
    pending: dict[int, tuple[str, str, int, str]] = {}  # pid -> (name, args so far, start, line)
    for number, raw in enumerate(text.splitlines()):
        m = _LINE.match(raw.rstrip("\n"))
        if not m:
            continue
        pid = int(m.group(1)) if m.group(1) else 0
        body = m.group(2)
        if body.startswith(("---", "+++")):
            continue
        resumed = _RESUMED.match(body)
        if resumed:
            name, rest = resumed.groups()
            if pid not in pending or pending[pid][0] != name:
                continue  # the entry was before the log (or not traced)
            _, so_far, start, first = pending.pop(pid)
            joined = so_far + rest
            if rest.endswith(_UNFINISHED):  # interrupted again
                pending[pid] = (name, joined[:-len(_UNFINISHED)], start, first + " | " + body)
                continue
            args, result = _split_result(joined)
            calls.append(Syscall(pid, name, args, result, start, number, first + " | " + body))
            continue
        call = _CALL.match(body)
        if not call:
            continue
        name, rest = call.groups()
        if rest.endswith(_UNFINISHED):
            pending[pid] = (name, rest[:-len(_UNFINISHED)], number, body)
            continue
        try:
            args, result = _split_result(rest)
        except ValueError:
            continue
        calls.append(Syscall(pid, name, args, result, number, number, body))
    for pid, (name, so_far, start, first) in pending.items():
        calls.append(Syscall(pid, name, so_far, None, start, None, first))
    calls.sort(key=lambda c: c.start)
    return calls


# --------------------------------------------------------------------------
# What the calls did
# --------------------------------------------------------------------------

WRITE = "write"            # data written (pwrite64, pwritev[2], write[v], sendfile)
ALLOCATION = "allocation"  # fallocate: zero range, punch hole, allocate
SIZE = "size"              # ftruncate

_SOCKET = re.compile(r"^(socket:|UNIX|TCP|UDP|NETLINK)")


@dataclass
class Change:
    """A successful change to a file: ``[offset, offset+length)`` (offset None: at the file
    position or the whole file). ``synced_by`` names what made it durable by itself when
    it returned (RWF_DSYNC, an O_DSYNC descriptor), else None."""

    call: Syscall
    path: str
    kind: str
    offset: int | None
    length: int | None
    synced_by: str | None = None

    def covers(self, offset: int, length: int) -> bool:
        return (self.offset is not None and self.length is not None
                and self.offset <= offset and offset + length <= self.offset + self.length)


def _is_socket(path: str | None) -> bool:
    return path is not None and bool(_SOCKET.match(path))


class Trace:
    """The calls of one traced run, and what they mean for files and replies."""

    def __init__(self, calls: list[Syscall]):
        self.calls = calls
        self.changes: list[Change] = []
        self.syncs: list[Syscall] = []
        self.sends: list[Syscall] = []
        self._classify()

    def _classify(self) -> None:
        opened: dict[int, tuple[str | None, str]] = {}  # fd -> (path, open flags)
        # Descriptors change as calls *return*: walk the returns in order.
        for c in sorted((c for c in self.calls if c.end is not None), key=lambda c: c.end):
            name = c.name
            if name == "openat":
                fd = c.retval
                if fd is not None and fd >= 0:
                    opened[fd] = (c.result_path(), c.args[2] if len(c.args) > 2 else "")
                continue
            fd, path = c.fd(0)
            if name == "close":
                opened.pop(fd, None)  # type: ignore[arg-type]
                continue
            if path is None:
                continue
            if _is_socket(path):
                if name in ("write", "writev", "sendto", "sendmsg", "sendmmsg"):
                    self.sends.append(c)
                continue
            if not c.ok or not path.startswith("/"):
                continue  # failed, or a pipe, an eventfd...
            if name in ("fsync", "fdatasync", "sync_file_range"):
                self.syncs.append(c)
                continue
            open_path, flags = opened.get(fd, (None, ""))  # type: ignore[arg-type]
            fd_sync = None
            if open_path == path and re.search(r"\bO_(D?SYNC)\b", flags):
                fd_sync = re.search(r"\bO_(D?SYNC)\b", flags).group()  # type: ignore[union-attr]
            if name in ("pwrite64", "pwritev", "pwritev2"):
                offset = c.int_arg(3)
                offset = None if offset is None or offset < 0 else offset
                synced_by = fd_sync
                if name == "pwritev2" and len(c.args) > 4:
                    flag = re.search(r"\bRWF_D?SYNC\b", c.args[4])
                    synced_by = flag.group() if flag else synced_by
                self.changes.append(Change(c, path, WRITE, offset, c.retval, synced_by))
            elif name in ("write", "writev", "sendfile"):
                self.changes.append(Change(c, path, WRITE, None, c.retval, fd_sync))
            elif name == "fallocate":
                self.changes.append(Change(c, path, ALLOCATION, c.int_arg(2), c.int_arg(3)))
            elif name == "ftruncate":
                self.changes.append(Change(c, path, SIZE, None, None))
        self.changes.sort(key=lambda ch: ch.call.end)  # type: ignore[arg-type, return-value]

    # -- replies --

    def reply(self, cookie: int) -> Syscall:
        """The first send on a socket that carries the reply header for ``cookie``."""
        want = cookie.to_bytes(8, "big")
        for c in sorted(self.sends, key=lambda c: c.start):
            for data in c.data():
                i = data.find(want)
                while i != -1:
                    if i >= 8 and data[i - 8:i - 4] in REPLY_MAGICS:
                        return c
                    i = data.find(want, i + 1)
        raise AssertionError(f"no reply to cookie {cookie:#x} in the trace "
                             f"({len(self.sends)} sends on sockets)")

    # -- durability --

    def sync_after(self, change: Change, before: int) -> Syscall | None:
        """A sync of the changed file that started after the change returned and returned
        before line ``before``: fsync/fdatasync of the file, or (data writes only) a
        waiting sync_file_range over the written range."""
        assert change.call.end is not None
        for s in self.syncs:
            fd, path = s.fd(0)
            if path != change.path or s.start <= change.call.end or s.end is None or s.end >= before:
                continue
            if s.name in ("fsync", "fdatasync"):
                return s
            if s.name == "sync_file_range" and change.kind == WRITE and change.offset is not None:
                flags = s.args[3] if len(s.args) > 3 else ""
                if not all(f in flags for f in ("SYNC_FILE_RANGE_WAIT_BEFORE",
                                                "SYNC_FILE_RANGE_WRITE", "SYNC_FILE_RANGE_WAIT_AFTER")):
                    continue
                start, nbytes = s.int_arg(1), s.int_arg(2)
                if start is None or nbytes is None:
                    continue
                end = None if nbytes == 0 else start + nbytes
                if start <= change.offset and (end is None or change.offset + (change.length or 0) <= end):
                    return s
        return None

    def durable_by(self, change: Change, before: int) -> bool:
        """Was the change on the disk before line ``before``?"""
        if change.call.end is None or change.call.end >= before:
            return False
        if change.synced_by is not None:
            return True
        return self.sync_after(change, before) is not None


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(path)


def _covered(changes: list[Change], offset: int, length: int) -> bool:
    """Do the changes' ranges together cover ``[offset, offset+length)``?"""
    pos, end = offset, offset + length
    for ch in sorted((c for c in changes if c.offset is not None and c.length),
                     key=lambda c: c.offset):  # type: ignore[arg-type, return-value]
        assert ch.offset is not None and ch.length is not None
        if ch.offset > pos:
            break
        pos = max(pos, ch.offset + ch.length)
        if pos >= end:
            return True
    return pos >= end


def check_durable(trace: Trace, cookie: int, paths: Iterable[str | os.PathLike], *,
                  expect: Iterable[tuple[str | os.PathLike, int, int, tuple[str, ...]]] = (),
                  since: int | None = None) -> None:
    """The reply to ``cookie`` was sent only once every change to ``paths`` that had
    returned before it was durable, and ``expect`` (path, offset, length, kinds) ranges
    were changed by such changes (so the check is never vacuous).

    ``since``: a cookie whose reply was sent before; only changes returned after it began
    are looked at (each test sends nothing while it waits for the reply it checks, so
    the window holds the changes that reply covers). Raises AssertionError naming each
    change that was not synced, with the trace lines.
    """
    files = {_real(p) for p in paths}
    reply = trace.reply(cookie)
    lower = trace.reply(since).start if since is not None else -1
    window = [ch for ch in trace.changes
              if ch.path in files and ch.call.end is not None and lower < ch.call.end < reply.start]
    problems = []
    for path, offset, length, kinds in expect:
        mine = [ch for ch in window if ch.path == _real(path) and ch.kind in kinds]
        if not _covered(mine, offset, length):
            after = f" after the reply to {since:#x} began" if since is not None else ""
            problems.append(f"no {'/'.join(kinds)} of {path} [{offset}, +{length}) returned "
                            f"before the reply to {cookie:#x} was sent{after}")
    for ch in window:
        if not trace.durable_by(ch, reply.start):
            problems.append(f"{ch.kind} of {ch.path} at {ch.offset} (+{ch.length}) not synced "
                            f"before the reply:\n    change: {ch.call}")
    if problems:
        syncs = "\n".join(f"    {s}" for s in trace.syncs if s.fd(0)[1] in files) or "    none"
        raise AssertionError("\n".join(problems) + f"\n  reply: {reply}\n  syncs of the files:\n"
                             + syncs)
