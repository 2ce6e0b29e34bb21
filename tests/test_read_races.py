"""A READ racing writes and trims of the same range returns, for each block, the old
bytes, the new ones or zeros (the NBD spec leaves which open), never bytes of another
range, another cluster's owner or freed space.

The READ's reply is held back (its client reads nothing until the other connection's
trims and writes are acknowledged), so most of it is sent after they changed the file:
with zero-copy the server's sendfile reads the file then. Every block of the image
carries its own index and a generation, so data from another range shows.
"""

from __future__ import annotations

import struct

import pytest

from tests.conftest import MiB
from tests.support.nbdclient import CMD_READ, NbdClient

pytestmark = [pytest.mark.pynbd, pytest.mark.timeout(120)]

BLOCK = 4096
SIZE = 40 * MiB
READ_LENGTH = 32 * MiB
TRIMMED = (8 * MiB, 24 * MiB)
REWRITTEN = (16 * MiB, 32 * MiB)


def block(index: int, generation: int) -> bytes:
    """Block ``index`` as written by ``generation`` (1: the image's, 2: the racing writes)."""
    return struct.pack(">QQ", index, generation) * (BLOCK // 16)


def blocks(start: int, end: int, generation: int) -> bytes:
    return b"".join(block(i, generation) for i in range(start // BLOCK, end // BLOCK))


@pytest.mark.parametrize("zero_copy", ["on", "off"])
def test_read_racing_trim_and_write_sees_only_its_range(launch, tmp_path, zero_copy):
    image = tmp_path / "race.img"
    image.write_bytes(blocks(0, SIZE, 1))
    server = launch.pynbd(image, "--zero-copy", zero_copy)
    reader = NbdClient.connect(server, timeout=60)
    writer = NbdClient.connect(server, timeout=60)
    cookie = reader.send_request(CMD_READ, 0, READ_LENGTH)
    assert writer.trim(TRIMMED[0], TRIMMED[1] - TRIMMED[0]).error == 0
    for offset in range(REWRITTEN[0], REWRITTEN[1], MiB):
        assert writer.write(offset, blocks(offset, offset + MiB, 2)).error == 0
    reply = reader.read_reply(timeout=60)
    assert reply.cookie == cookie and reply.error == 0
    data = reply.data(0, READ_LENGTH)
    kinds = []
    for index in range(READ_LENGTH // BLOCK):
        got = data[index * BLOCK:(index + 1) * BLOCK]
        if got == block(index, 1):
            kinds.append("old")
        elif got == block(index, 2):
            kinds.append("new")
        elif got == bytes(BLOCK):
            kinds.append("zero")
        else:
            raise AssertionError(f"block {index} (offset {index * BLOCK}) holds neither its old nor "
                                 f"its new bytes nor zeros: {got[:16].hex()}...")
        # Zeros only where trimmed, new bytes only where rewritten.
        offset = index * BLOCK
        if kinds[-1] == "zero":
            assert TRIMMED[0] <= offset < TRIMMED[1], f"zeros at {offset}, never trimmed"
        if kinds[-1] == "new":
            assert REWRITTEN[0] <= offset < REWRITTEN[1], f"new bytes at {offset}, never rewritten"
    if zero_copy == "on":
        # The race really happened: the end of the READ left after the writes.
        assert kinds[-1] == "new", "the READ was sent before the writes: no race was tested"
    reader.close()
    writer.close()
