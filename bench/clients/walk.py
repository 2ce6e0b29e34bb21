"""Walk an export's block status over one libnbd connection, the way a backup tool
reads a dirty bitmap or an allocation map: one request after another, each where
the last one ended, in requests as large as nbdinfo's (continuing where each answer ended),
``walks`` times over.

Run with the interpreter that has libnbd's Python bindings (Debian: python3-libnbd,
/usr/bin/python3). Prints one JSON object: extents per walk and each walk's time
in seconds (the connection and handshake excluded).

    walk.py URI CONTEXT WALKS
"""

from __future__ import annotations

import json
import sys
import time

import nbd  # python3-libnbd

#: Request length: 4 GiB less 1 MiB (nbdinfo --map asks about the same per request).
STEP = (1 << 32) - (1 << 20)


def main() -> int:
    uri, context, walks = sys.argv[1], sys.argv[2], int(sys.argv[3])
    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(uri)
    if not h.can_meta_context(context):
        print(f"walk.py: the server did not select {context}", file=sys.stderr)
        return 1
    size = h.get_size()
    extents = 0
    covered = 0

    def count(metacontext: str, offset: int, entries: list[int], err: object) -> int:
        nonlocal extents, covered
        extents += len(entries) // 2
        covered = sum(entries[0::2])
        return 0

    # Warm the client's own code path (a one-extent answer) before timing anything.
    h.block_status(min(size, 4096), 0, lambda *args: 0, nbd.CMD_FLAG_REQ_ONE)
    times = []
    for _ in range(walks):
        extents = 0
        t0 = time.perf_counter()
        offset = 0
        while offset < size:
            length = min(size - offset, STEP)
            covered = 0
            h.block_status(length, offset, count)
            if covered <= 0:
                print(f"walk.py: no progress at offset {offset}", file=sys.stderr)
                return 1
            offset += min(covered, length)  # a server may describe less than asked
        times.append(time.perf_counter() - t0)
    h.shutdown()
    print(json.dumps({"extents": extents, "times": times}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
