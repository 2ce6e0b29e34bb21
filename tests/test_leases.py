"""Leases on the host ranges of reads being sent (pynbd/image/leases.py).

Against a model (a list of live leased ranges): pinned() answers, and deferred
actions run exactly once, exactly when the last overlapping lease ends. Then
from worker threads, the gap between read_segments() and the lease, and a real
zero-copy READ reply stuck on a full socket.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import threading
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.image import open_image
from pynbd.image.base import BytesSegment, HostSegment, ReadSegment, ZeroSegment
from pynbd.image.leases import HostLeases
from pynbd.protocol import wire
from pynbd.server.channel import SocketChannel
from pynbd.server.replies import ReplyWriter

MiB = 1024 * 1024


def overlaps(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """Whether host ranges ``(fd, start, end)`` share a byte."""
    return a[0] == b[0] and a[1] < b[2] and b[1] < a[2] and a[1] < a[2] and b[1] < b[2]


def host_ranges(segments: list[ReadSegment]) -> list[tuple[int, int, int]]:
    return [(s.fd, s.host_offset, s.host_offset + s.length) for s in segments if isinstance(s, HostSegment)]


# --- unit --------------------------------------------------------------------------------


def test_overlapping_leases_are_counted_and_adjacent_ranges_are_not_pinned():
    leases = HostLeases()
    ran: list[str] = []
    first = leases.lease([HostSegment(4096, 7, 0)])
    second = leases.lease([HostSegment(8192, 7, 2048)])
    first.__enter__()
    second.__enter__()
    assert leases.pinned(7, 0, 1) and leases.pinned(7, 10239, 1)
    assert not leases.pinned(7, 10240, 4096)  # just past the end
    assert not leases.pinned(8, 0, 4096)  # another file
    assert not leases.pinned(7, 100, 0)  # an empty range overlaps nothing
    leases.when_unpinned(7, 3000, 100, lambda: ran.append("both"))  # under both leases
    leases.when_unpinned(7, 9000, 100, lambda: ran.append("second"))  # under the second only
    leases.when_unpinned(7, 20000, 100, lambda: ran.append("free"))
    assert ran == ["free"]
    first.__exit__(None, None, None)
    assert ran == ["free"]  # the second lease still covers both
    assert leases.pinned(7, 3000, 100)
    second.__exit__(None, None, None)
    assert ran == ["free", "both", "second"]
    assert not leases.pinned(7, 0, 1 << 40)


def test_the_same_range_leased_twice_stays_pinned_until_both_end():
    leases = HostLeases()
    ran: list[int] = []
    segment = [HostSegment(65536, 3, 1 << 20)]
    with leases.lease(segment):
        with leases.lease(segment):
            leases.when_unpinned(3, 1 << 20, 65536, lambda: ran.append(1))
        assert ran == [] and leases.pinned(3, 1 << 20, 1)
    assert ran == [1]


def test_zero_bytes_and_empty_segments_pin_nothing():
    leases = HostLeases()
    segments: list[ReadSegment] = [ZeroSegment(4096), BytesSegment(b"x" * 10), HostSegment(0, 5, 0)]
    with leases.lease(segments):
        assert not leases.pinned(5, 0, 1 << 30)
    with leases.lease([ZeroSegment(1), HostSegment(512, 5, 512)]):
        assert leases.pinned(5, 0, 1024) and not leases.pinned(5, 0, 512)


def test_a_lease_ends_when_the_reply_raises():
    leases = HostLeases()
    with pytest.raises(ConnectionError):
        with leases.lease([HostSegment(4096, 5, 0)]):
            raise ConnectionError("client gone")
    assert not leases.pinned(5, 0, 4096)


def test_a_failing_deferred_action_is_logged_and_the_others_still_run(caplog):
    leases = HostLeases()
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("broken action")

    with caplog.at_level(logging.ERROR, logger="pynbd.image.leases"):
        with leases.lease([HostSegment(4096, 5, 0)]):
            leases.when_unpinned(5, 0, 4096, broken)
            leases.when_unpinned(5, 0, 4096, lambda: ran.append("after"))
    assert ran == ["after"]
    assert "broken action" in caplog.text


def test_negative_ranges_are_refused():
    leases = HostLeases()
    with pytest.raises(ValueError):
        leases.pinned(5, -1, 10)
    with pytest.raises(ValueError):
        leases.when_unpinned(5, 0, -10, lambda: None)


# --- hypothesis: against a model ------------------------------------------------------------

FDS = (3, 4)
SPACE = 32  # host offsets 0..SPACE-1: small, so ranges collide often

segment_strategy = st.one_of(
    st.builds(HostSegment, st.integers(0, 8), st.sampled_from(FDS), st.integers(0, SPACE - 1)),
    st.builds(ZeroSegment, st.integers(0, 8)),
    st.builds(BytesSegment, st.binary(max_size=4)),
)
operation = st.one_of(
    st.tuples(st.just("enter"), st.lists(segment_strategy, max_size=4)),
    st.tuples(st.just("exit"), st.integers(0, 100)),
    st.tuples(st.just("wait"), st.sampled_from(FDS), st.integers(0, SPACE - 1), st.integers(0, 8)),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(operation, max_size=40))
def test_pinned_and_deferred_actions_follow_the_model(operations):
    leases = HostLeases()
    live: list[tuple[object, list[tuple[int, int, int]]]] = []  # (context manager, its ranges)
    waiting: dict[int, tuple[int, int, int]] = {}  # action id -> its range, not run yet
    ran: list[int] = []

    def model_pinned(query: tuple[int, int, int]) -> bool:
        return any(overlaps(query, r) for _, ranges in live for r in ranges)

    def action(ident: int) -> Callable[[], None]:
        return lambda: ran.append(ident)

    def check() -> None:
        assert len(ran) == len(set(ran)), f"an action ran twice: {ran}"
        for ident in ran[checked:]:
            wanted = waiting.pop(ident)
            assert not model_pinned(wanted), f"action {ident} for {wanted} ran while pinned"
        for ident, wanted in waiting.items():
            assert model_pinned(wanted), f"action {ident} for {wanted} did not run though nothing overlaps"

    checked = 0
    for step, op in enumerate(operations):
        if op[0] == "enter":
            context = leases.lease(op[1])
            context.__enter__()
            live.append((context, host_ranges(op[1])))
        elif op[0] == "exit" and live:
            context, _ = live.pop(op[1] % len(live))
            context.__exit__(None, None, None)
        elif op[0] == "wait":
            _, fd, offset, length = op
            waiting[step] = (fd, offset, offset + length)
            leases.when_unpinned(fd, offset, length, action(step))
        check()
        checked = len(ran)
        # pinned() agrees with the model on every byte (which decides every range).
        for fd in FDS:
            for offset in range(SPACE + 8):
                assert leases.pinned(fd, offset, 1) == model_pinned((fd, offset, offset + 1)), (fd, offset)
    while live:  # the rest end in turn: actions run as their last lease goes
        context, _ = live.pop()
        context.__exit__(None, None, None)
        check()
        checked = len(ran)
    assert waiting == {}, "an action never ran after the last lease ended"


# --- threads ----------------------------------------------------------------------------


def _hammer(leases: HostLeases, held: list[object], rounds: int, rng: random.Random) -> None:
    """Take and release random leases on fd 9 (the loop thread's side of the tests below);
    ``held`` are the leases live between calls."""
    for _ in range(rounds):
        if held and (len(held) > 8 or rng.random() < 0.5):
            held.pop(rng.randrange(len(held))).__exit__(None, None, None)
        else:
            context = leases.lease([HostSegment(rng.randrange(1, 64), 9, rng.randrange(256))])
            context.__enter__()
            held.append(context)


def _release(held: list[object]) -> None:
    while held:
        held.pop().__exit__(None, None, None)


def _free_from_threads(leases: HostLeases, calls: int, record: Callable[[int, int, int], None],
                       threads: int = 4) -> list[threading.Thread]:
    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for index in range(calls):
            ident = seed * calls + index
            offset, length = rng.randrange(256), rng.randrange(1, 64)
            leases.when_unpinned(9, offset, length, lambda i=ident, o=offset, n=length: record(i, o, n))

    workers = [threading.Thread(target=worker, args=(seed,)) for seed in range(threads)]
    for thread in workers:
        thread.start()
    return workers


def test_when_unpinned_from_threads_without_a_loop_runs_every_action_once():
    leases = HostLeases()
    ran: list[int] = []
    calls = 2000
    workers = _free_from_threads(leases, calls, lambda i, o, n: ran.append(i))
    held: list[object] = []
    _hammer(leases, held, 20000, random.Random(1))
    _release(held)
    for thread in workers:
        thread.join()
    assert sorted(ran) == list(range(4 * calls))


def test_when_unpinned_from_threads_with_a_loop_runs_on_the_loop_only_when_unpinned():
    async def main() -> tuple[list[int], list[str]]:
        leases = HostLeases()
        ran: list[int] = []
        problems: list[str] = []
        loop_thread = threading.get_ident()
        calls = 1000

        def record(ident: int, offset: int, length: int) -> None:
            if threading.get_ident() != loop_thread:
                problems.append(f"action {ident} ran on a worker thread")
            if leases.pinned(9, offset, length):
                problems.append(f"action {ident} ran while [{offset}, +{length}) was pinned")
            ran.append(ident)

        with leases.lease([HostSegment(1, 9, 1000)]):  # the loop becomes the owner
            pass
        workers = _free_from_threads(leases, calls, record)
        # Lease changes happen in loop steps, between which posted decisions run.
        held: list[object] = []
        rng = random.Random(1)
        while any(thread.is_alive() for thread in workers):
            _hammer(leases, held, 20, rng)
            await asyncio.sleep(0)  # posted decisions run here, with leases held
        for thread in workers:
            thread.join()
        await asyncio.sleep(0)
        _release(held)
        while len(ran) < 4 * calls and not problems:
            await asyncio.sleep(0.001)  # the last posted decisions
        return ran, problems

    ran, problems = asyncio.run(main())
    assert problems == []
    assert sorted(ran) == list(range(4000))


def test_a_read_mapped_before_a_free_leases_in_time():
    """The gap: a worker frees a range after read_segments() but before the lease is
    entered; the action must wait for that lease, not run in the worker at once."""

    async def main() -> list[str]:
        leases = HostLeases()
        events: list[str] = []
        with leases.lease([HostSegment(1, 9, 1 << 20)]):  # an earlier read: the loop is known
            pass
        freed = threading.Event()

        def free() -> None:
            leases.when_unpinned(9, 0, 4096, lambda: events.append("put back"))
            freed.set()

        segments = [HostSegment(4096, 9, 0)]  # what read_segments() returned
        worker = threading.Thread(target=free)
        worker.start()
        assert freed.wait(10)  # the free happens right here, in the same loop step
        worker.join()
        with leases.lease(segments):
            events.append("leased")
            await asyncio.sleep(0.01)  # the posted decision runs, finds the lease
            events.append("sent")
        await asyncio.sleep(0)
        return events

    assert asyncio.run(main()) == ["leased", "sent", "put back"]


# --- a real zero-copy READ reply on a full socket ---------------------------------------------


def test_a_stuck_sendfile_reply_keeps_its_lease_until_the_last_byte(tmp_path):
    path = tmp_path / "leased.img"
    content = os.urandom(6 * MiB)
    path.write_bytes(content)
    offset, length, cookie = 1 * MiB, 4 * MiB, 0x1234

    async def main() -> None:
        loop = asyncio.get_running_loop()
        image = open_image(str(path), "raw")
        server, peer = socket.socketpair()
        peer.setblocking(False)
        channel = SocketChannel(server, loop)
        writer = ReplyWriter(channel, structured=True, zero_copy=True)
        ran: list[str] = []

        async def serve_read() -> None:
            segments = image.read_segments(offset, length)
            assert [type(s) for s in segments] == [HostSegment]
            with image.leases.lease(segments):
                await writer.read(cookie, offset, segments, length, False)

        task = loop.create_task(serve_read())
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert not task.done(), "the reply fitted the socket: nothing was waiting"
        assert writer.sendfile_bytes < length
        fd = image.fd
        assert image.leases.pinned(fd, offset, length)
        assert image.leases.pinned(fd, offset + length - 1, 1)
        assert not image.leases.pinned(fd, offset + length, MiB)
        image.leases.when_unpinned(fd, offset + MiB, 4096, lambda: ran.append("loop"))
        # From a worker thread, as the qcow2 allocator will: posted to the loop.
        await asyncio.to_thread(image.leases.when_unpinned, fd, offset, length, lambda: ran.append("worker"))
        await asyncio.sleep(0.01)
        assert ran == []
        received = bytearray()
        expected = wire.chunk_offset_data_header(cookie, offset, length, True) + content[offset:offset + length]
        while len(received) < len(expected):
            chunk = await loop.sock_recv(peer, 1 << 20)
            assert chunk, "the server closed the socket"
            received += chunk
        await asyncio.wait_for(task, 10)
        assert not image.leases.pinned(fd, 0, len(content))
        assert sorted(ran) == ["loop", "worker"]
        assert bytes(received) == expected
        channel.close()
        peer.close()
        image.close()

    asyncio.run(main())
