"""Durability observed: FLUSH and FUA replies are sent only after the data reached the disk.

Reading the image back cannot tell (the page cache answers either way), so pynbd runs
under strace (tests/support/strace.py) and each test checks the order of the server's
system calls on the raw image: every change to the file (pwrite, fallocate) returned, a
sync of the file (fsync/fdatasync, or sync_file_range over a written range) started after
it and returned, and only then the reply that promises durability began to be sent; or
the change was durable by itself (pwritev2 with RWF_DSYNC, a descriptor opened O_DSYNC).
Replies are told apart by their cookies, and the client waits for each reply before the
next request, so the changes a reply covers are the ones returned before it.

The first tests check the checker on hand-written strace lines (it fails on the wrong
orders); the others run the real server. A FLUSH with nothing written needs no sync and
is not checked either way.
"""

from __future__ import annotations

import pytest

from tests.support.nbdclient import (
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLUSH,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    TF_CAN_MULTI_CONN,
    TF_SEND_FUA,
    NbdClient,
)
from tests.support.servers import make_raw_image
from tests.support.strace import (
    ALLOCATION,
    WRITE,
    StracedPynbd,
    Trace,
    check_durable,
    parse,
)

KiB = 1024
MiB = 1024 * KiB
IMAGE_SIZE = 4 * MiB
ZEROED = (WRITE, ALLOCATION)  # zeros may be written or made by fallocate


def cookie(n: int) -> int:
    """A cookie no other bytes of the trace are likely to contain."""
    return 0x5EED_D15C_0000_0000 | n


# --------------------------------------------------------------------------
# The checker, on hand-written strace output
# --------------------------------------------------------------------------


def _hex(data: bytes) -> str:
    return "".join(f"\\x{b:02x}" for b in data)


IMG = f"3<{_hex(b'/img')}>"
OTHER = f"4<{_hex(b'/other')}>"
SOCK = f"15<{_hex(b'socket:[4242]')}>"


def _reply(c: int) -> str:
    """The bytes of a simple reply to cookie ``c`` as strace -xx prints them."""
    return '"' + _hex(bytes.fromhex("67446698") + bytes(4) + c.to_bytes(8, "big")) + '"'


def _trace(*lines: str) -> Trace:
    """Lines "PID BODY" -> a Trace (stamps added as strace -ttt writes them)."""
    text = "\n".join(f"{ln.split(' ', 1)[0]} 1700000000.{i:06d} {ln.split(' ', 1)[1]}"
                     for i, ln in enumerate(lines))
    return Trace(parse(text))


OPEN = f'10 openat(AT_FDCWD<{_hex(b"/")}>, "{_hex(b"/img")}", O_RDWR|O_CLOEXEC) = {IMG}'
WRITE_8K = f'10 pwrite64({IMG}, "\\x41\\x41"..., 4096, 8192) = 4096'
EXPECT_8K = [("/img", 8192, 4096, (WRITE,))]


def _sent(n: int) -> str:
    """The event loop sending the reply to cookie(n)."""
    return f"10 sendto({SOCK}, {_reply(cookie(n))}, 16, 0, NULL, 0) = 16"


def test_checker_accepts_write_sync_reply():
    """Whole lines, and a sync split by another thread's call but returned before the
    reply: durable."""
    check_durable(_trace(OPEN, WRITE_8K, f"11 fdatasync({IMG}) = 0", _sent(1)),
                  cookie(1), ["/img"], expect=EXPECT_8K)
    check_durable(_trace(OPEN, WRITE_8K, f"11 fdatasync({IMG} <unfinished ...>",
                         "10 write(8<\\x70>, \"\\x2a\", 1) = 1",
                         "11 <... fdatasync resumed>) = 0", _sent(1)),
                  cookie(1), ["/img"], expect=EXPECT_8K)


def test_checker_parses_split_calls():
    """``<unfinished ...>`` and ``<... resumed>`` join into one call: arguments from both
    halves, entry and return line numbers kept."""
    calls = parse("10 1.0 pwrite64(3</img>, \"ab\", 2 <unfinished ...>\n"
                  "11 1.1 fdatasync(3</img>) = 0\n"
                  "10 1.2 <... pwrite64 resumed>, 4096) = 2\n"
                  "10 1.3 --- SIGTERM {si_signo=SIGTERM} ---\n"
                  "11 1.4 fsync(3</img> <unfinished ...>\n")
    write, sync, fsync = calls
    assert (write.name, write.args, write.start, write.end, write.retval) == (
        "pwrite64", ['3</img>', '"ab"', "2", "4096"], 0, 2, 2)
    assert write.fd(0) == (3, "/img") and write.data() == [b"ab"]
    assert (sync.start, sync.end, sync.ok) == (1, 1, True)
    assert (fsync.name, fsync.end, fsync.ok) == ("fsync", None, False)


def test_checker_rejects_reply_before_sync_returned():
    """A reply sent while the sync is still running (another thread) is too early."""
    trace = _trace(OPEN, WRITE_8K, f"11 fdatasync({IMG} <unfinished ...>", _sent(1),
                   "11 <... fdatasync resumed>) = 0")
    with pytest.raises(AssertionError, match="not synced"):
        check_durable(trace, cookie(1), ["/img"], expect=EXPECT_8K)


def test_checker_rejects_sync_started_before_the_write_returned():
    """A sync entered while the write was still in progress does not cover it."""
    trace = _trace(OPEN, f'10 pwrite64({IMG}, "\\x41"..., 4096, 8192 <unfinished ...>',
                   f"11 fdatasync({IMG}) = 0", "10 <... pwrite64 resumed>) = 4096", _sent(1))
    with pytest.raises(AssertionError, match="not synced"):
        check_durable(trace, cookie(1), ["/img"], expect=EXPECT_8K)


def test_checker_rejects_no_sync_failed_sync_and_other_files():
    """No sync, a failing one, or a sync of another file: not durable."""
    for sync in ([], [f"11 fdatasync({IMG}) = -1 EIO (Input/output error)"],
                 [f"11 fsync({OTHER}) = 0"]):
        with pytest.raises(AssertionError, match="not synced"):
            check_durable(_trace(OPEN, WRITE_8K, *sync, _sent(1)), cookie(1), ["/img"],
                          expect=EXPECT_8K)


def test_checker_requires_the_expected_change():
    """A reply with no change of the expected range before it fails (never vacuous),
    and so does a change that returned only after the reply."""
    with pytest.raises(AssertionError, match="no write of /img"):
        check_durable(_trace(OPEN, f"11 fdatasync({IMG}) = 0", _sent(1)), cookie(1), ["/img"],
                      expect=EXPECT_8K)
    with pytest.raises(AssertionError, match="no write of /img"):
        check_durable(_trace(OPEN, _sent(1), WRITE_8K, f"11 fdatasync({IMG}) = 0"),
                      cookie(1), ["/img"], expect=EXPECT_8K)
    with pytest.raises(AssertionError, match=r"no reply to cookie"):
        check_durable(_trace(OPEN, WRITE_8K, _sent(2)), cookie(1), ["/img"])


def test_checker_self_synced_writes():
    """pwritev2 with RWF_DSYNC and a write on an O_DSYNC descriptor need no sync; the same
    descriptor number reopened without O_DSYNC, RWF_HIPRI, or an fallocate on the O_DSYNC
    descriptor (O_DSYNC does not cover it) do."""
    dsync_open = f'10 openat(AT_FDCWD<\\x2f>, "\\x2f", O_RDWR|O_DSYNC) = {IMG}'
    v2 = f'10 pwritev2({IMG}, [{{iov_base="\\x41", iov_len=4096}}], 1, 8192, {{flag}}) = 4096'
    check_durable(_trace(OPEN, v2.replace("{flag}", "RWF_DSYNC"), _sent(1)), cookie(1), ["/img"],
                  expect=EXPECT_8K)
    check_durable(_trace(dsync_open, WRITE_8K, _sent(1)), cookie(1), ["/img"], expect=EXPECT_8K)
    for lines in ([OPEN, v2.replace("{flag}", "RWF_HIPRI")],
                  [dsync_open, f"10 close({IMG}) = 0", OPEN, WRITE_8K],
                  [dsync_open, f"10 fallocate({IMG}, FALLOC_FL_ZERO_RANGE, 8192, 4096) = 0"]):
        with pytest.raises(AssertionError, match="not synced"):
            check_durable(_trace(*lines, _sent(1)), cookie(1), ["/img"])


def test_checker_sync_file_range_covers_its_range_of_data_only():
    """A waiting sync_file_range over the written range makes a write durable; one over
    another range, without WAIT_AFTER, or after an fallocate does not."""
    wait = "SYNC_FILE_RANGE_WAIT_BEFORE|SYNC_FILE_RANGE_WRITE|SYNC_FILE_RANGE_WAIT_AFTER"
    check_durable(_trace(OPEN, WRITE_8K, f"11 sync_file_range({IMG}, 0, 12288, {wait}) = 0",
                         _sent(1)), cookie(1), ["/img"], expect=EXPECT_8K)
    falloc = f"10 fallocate({IMG}, FALLOC_FL_KEEP_SIZE|FALLOC_FL_PUNCH_HOLE, 8192, 4096) = 0"
    for lines in ([WRITE_8K, f"11 sync_file_range({IMG}, 0, 8192, {wait}) = 0"],
                  [WRITE_8K, f"11 sync_file_range({IMG}, 0, 0, SYNC_FILE_RANGE_WRITE) = 0"],
                  [falloc, f"11 sync_file_range({IMG}, 0, 0, {wait}) = 0"]):
        with pytest.raises(AssertionError, match="not synced"):
            check_durable(_trace(OPEN, *lines, _sent(1)), cookie(1), ["/img"])


def test_checker_finds_replies_in_iovecs_not_in_cut_strings_or_files():
    """A reply header split across sendmsg iovecs is found; one in a string strace cut
    short, or bytes written to the image, is not a reply."""
    header = bytes.fromhex("67446698") + bytes(4) + cookie(1).to_bytes(8, "big")
    iov = (f'10 sendmsg({SOCK}, {{msg_name=NULL, msg_namelen=0, msg_iov=[{{iov_base="'
           f'{_hex(header[:6])}", iov_len=6}}, {{iov_base="{_hex(header[6:])}", iov_len=10}}], '
           f"msg_iovlen=2, msg_controllen=0, msg_flags=0}}, MSG_NOSIGNAL) = 16")
    trace = _trace(OPEN, iov)
    assert trace.reply(cookie(1)) is trace.sends[0]
    cut = f'10 writev({SOCK}, [{{iov_base="{_hex(header[:6])}"..., iov_len=6}}, ' \
          f'{{iov_base="{_hex(header[6:])}", iov_len=10}}], 2) = 16'
    in_file = f'10 pwrite64({IMG}, "{_hex(header)}", 16, 0) = 16'
    for line in (cut, in_file):
        with pytest.raises(AssertionError, match="no reply to cookie"):
            _trace(OPEN, line).reply(cookie(1))


# --------------------------------------------------------------------------
# pynbd under strace
# --------------------------------------------------------------------------

def observed(test):
    """Marks of the tests that run pynbd under strace."""
    for mark in (pytest.mark.pynbd, pytest.mark.needs("strace"), pytest.mark.timeout(60)):
        test = mark(test)
    return test


@pytest.fixture
def traced(tmp_path):
    """(pynbd under strace serving an empty writable 4 MiB raw image, the image path)."""
    image = make_raw_image(tmp_path / "disk.img", IMAGE_SIZE)
    server = StracedPynbd(image, workdir=tmp_path)
    yield server, image
    server.stop(check=False)  # the tests stop it checked (trace()); this is for failures


def _ok(client: NbdClient, type: int, offset: int = 0, length: int | None = None,
        flags: int = 0, payload: bytes = b"", *, n: int) -> None:
    """One request with cookie(n), answered without error before the next is sent."""
    reply = client.request(type, offset, length, flags, payload, cookie=cookie(n))
    assert reply.error == 0, reply


def _pattern(n: int, length: int = 4 * KiB) -> bytes:
    return bytes([0x40 + n]) * length


@observed
@pytest.mark.parametrize("pipelined", [1, 6], ids=["one-write", "six-pipelined"])
def test_flush_reply_after_writes_synced(traced, pipelined):
    """WRITEs (one; or six sent before reading any reply), all answered, then FLUSH: each
    write's data was written to the image and synced before the FLUSH reply began."""
    server, image = traced
    offsets = [64 * KiB + i * 128 * KiB for i in range(pipelined)]
    with NbdClient.connect(server) as c:
        for i, off in enumerate(offsets):
            c.send_request(CMD_WRITE, off, payload=_pattern(i), cookie=cookie(i))
        replies = c.read_replies(pipelined)
        assert sorted(replies) == [cookie(i) for i in range(pipelined)]
        assert all(r.error == 0 for r in replies.values()), replies
        _ok(c, CMD_FLUSH, n=100)
        c.disconnect()
    check_durable(server.trace(), cookie(100), [image],
                  expect=[(image, off, 4 * KiB, (WRITE,)) for off in offsets])


@observed
def test_every_flush_syncs_the_writes_since_the_last(traced):
    """WRITE, FLUSH, WRITE, FLUSH: the second FLUSH syncs the second write again (no
    "already flushed" shortcut)."""
    server, image = traced
    with NbdClient.connect(server) as c:
        _ok(c, CMD_WRITE, 0, payload=_pattern(1), n=1)
        _ok(c, CMD_FLUSH, n=2)
        _ok(c, CMD_WRITE, 256 * KiB, payload=_pattern(2), n=3)
        _ok(c, CMD_FLUSH, n=4)
        c.disconnect()
    trace = server.trace()
    check_durable(trace, cookie(2), [image], expect=[(image, 0, 4 * KiB, (WRITE,))])
    check_durable(trace, cookie(4), [image], since=cookie(2),
                  expect=[(image, 256 * KiB, 4 * KiB, (WRITE,))])


@observed
@pytest.mark.parametrize("command", ["write-zeroes-no-hole", "write-zeroes", "trim"])
def test_flush_reply_after_zeroing_and_trim_synced(traced, command):
    """Data written, then WRITE_ZEROES with NO_HOLE over a hole and part of the data
    (zeros allocated), WRITE_ZEROES that may punch, or TRIM of the data, then FLUSH: the
    zeroing or the punched hole reached the disk before the FLUSH reply."""
    server, image = traced
    start, length = 512 * KiB, 64 * KiB
    with NbdClient.connect(server) as c:
        _ok(c, CMD_WRITE, start, payload=_pattern(1, length), n=1)
        if command == "write-zeroes-no-hole":
            _ok(c, CMD_WRITE_ZEROES, start + length // 2, length, CMD_FLAG_NO_HOLE, n=2)
            expect = (start + length // 2, length, ZEROED)
        elif command == "write-zeroes":
            _ok(c, CMD_WRITE_ZEROES, start, length, n=2)
            expect = (start, length, ZEROED)
        else:
            _ok(c, CMD_TRIM, start, length, n=2)
            expect = (start, length, (ALLOCATION,))
        _ok(c, CMD_FLUSH, n=3)
        c.disconnect()
    trace = server.trace()
    check_durable(trace, cookie(3), [image], expect=[(image, start, length, (WRITE,))])
    check_durable(trace, cookie(3), [image], since=cookie(1), expect=[(image, *expect)])


@observed
def test_flush_on_another_connection_syncs_the_first_ones_writes(traced):
    """With CAN_MULTI_CONN a FLUSH covers writes completed on every connection: WRITE
    answered on one, FLUSH on a second, the write synced before that FLUSH reply."""
    server, image = traced
    with NbdClient.connect(server) as writer, NbdClient.connect(server) as flusher:
        assert flusher.flags & TF_CAN_MULTI_CONN
        _ok(writer, CMD_WRITE, MiB, payload=_pattern(3), n=1)
        _ok(flusher, CMD_FLUSH, n=2)
        writer.disconnect()
        flusher.disconnect()
    check_durable(server.trace(), cookie(2), [image], expect=[(image, MiB, 4 * KiB, (WRITE,))])


@observed
@pytest.mark.parametrize("command", ["write", "write-zeroes-no-hole", "trim"])
def test_fua_reply_after_its_change_durable(traced, command):
    """A request with FUA (after a FLUSHed write of other data): its own change was written
    with a sync flag, or synced after it returned, before its reply began - no FLUSH
    needed."""
    server, image = traced
    start, length = 2 * MiB, 16 * KiB
    with NbdClient.connect(server) as c:
        assert c.flags & TF_SEND_FUA
        _ok(c, CMD_WRITE, start, payload=_pattern(1, length), n=1)
        _ok(c, CMD_FLUSH, n=2)
        if command == "write":
            _ok(c, CMD_WRITE, start + length, payload=_pattern(2, length), flags=CMD_FLAG_FUA, n=3)
            expect = (start + length, length, (WRITE,))
        elif command == "write-zeroes-no-hole":
            _ok(c, CMD_WRITE_ZEROES, start + length, length, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE, n=3)
            expect = (start + length, length, ZEROED)
        else:
            _ok(c, CMD_TRIM, start, length, CMD_FLAG_FUA, n=3)
            expect = (start, length, (ALLOCATION,))
        c.disconnect()
    check_durable(server.trace(), cookie(3), [image], since=cookie(2), expect=[(image, *expect)])
