"""Block status answers kept for reuse (pynbd/server/answers.py): the cache's bounds,
generations and single use against a model, the scan tracker, and REQ_ONE scans (runs
kept per connection, replies made ahead)."""

from __future__ import annotations

from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.protocol import wire
from pynbd.protocol.constants import FLAG_REQ_ONE, REQUEST_MAGIC, Command
from pynbd.protocol.transmission import MAX_DESCRIPTOR_LENGTH
from pynbd.runlength import RunIndex, Runs
from pynbd.server import answers
from pynbd.server.answers import (
    ONE_EXTENT_FIRST_RUNS,
    ONE_EXTENT_MAX_RUNS,
    AnswerCache,
    BlockStatusAnswer,
    OneExtentScan,
    ScanTracker,
)

CONTEXTS = ((1, "base:allocation"),)


def answer(nbytes: int = 32, reusable: bool = True) -> BlockStatusAnswer:
    return BlockStatusAnswer([bytes(24), bytes(nbytes - 24)], (0,), 4096, reusable)


def key(offset: int) -> tuple:
    return (offset, 1 << 20, 0, CONTEXTS)


def test_kept_answer_is_found_for_the_same_request_only():
    cache = AnswerCache()
    a = answer()
    cache.put(key(0), 0, a)
    assert cache.get(key(0), 0) is a
    assert cache.get(key(0), 0) is a  # shared: handed out again
    assert cache.get(key(4096), 0) is None
    assert cache.get((0, 1 << 20, 0, ((2, "qemu:dirty-bitmap:b"),)), 0) is None


def test_a_new_generation_drops_every_answer():
    cache = AnswerCache()
    cache.put(key(0), 4, answer())
    cache.put(key(1), 4, answer())
    assert cache.get(key(0), 5) is None  # a change started
    assert len(cache) == 0 and cache.retained_bytes == 0
    assert cache.get(key(1), 4) is None  # nor is an older generation trusted again


def test_answers_after_an_error_are_never_kept():
    cache = AnswerCache()
    cache.put(key(0), 0, answer(reusable=False))
    assert cache.get(key(0), 0) is None and len(cache) == 0


def test_single_use_answers_are_handed_out_once():
    cache = AnswerCache(max_answers=1, single_use=True)
    a = answer()
    cache.put(key(0), 0, a)
    assert cache.get(key(0), 0) is a
    assert cache.get(key(0), 0) is None
    assert cache.retained_bytes == 0


def test_a_view_counts_its_whole_buffer():
    """A slice of a cached span keeps the span's bytes alive, and the bound must say so."""
    span = bytes(10_000)
    a = BlockStatusAnswer([bytes(24), memoryview(span)[8:16]], (0,), 4096)
    assert a.retained_bytes() == 24 + 10_000
    cache = AnswerCache(max_bytes=15_000)
    cache.put(key(0), 0, a)
    cache.put(key(1), 0, BlockStatusAnswer([bytes(24), memoryview(span)[16:24]], (0,), 4096))
    assert len(cache) == 1 and cache.retained_bytes <= 15_000
    assert cache.get(key(1), 0) is not None  # the older one went


def test_an_answer_bigger_than_the_bound_is_not_kept():
    cache = AnswerCache(max_bytes=100)
    cache.put(key(0), 0, answer(200))
    assert len(cache) == 0


# (operation, request offset, the image changed before it, answer size, answer reusable)
ops = st.lists(st.one_of(
    st.tuples(st.just("put"), st.integers(0, 7), st.integers(0, 9).map(lambda n: n == 0),
              st.integers(24, 400), st.integers(0, 9).map(lambda n: n != 0)),
    st.tuples(st.just("get"), st.integers(0, 7), st.integers(0, 9).map(lambda n: n == 0),
              st.just(0), st.just(True)),
), max_size=60)


@settings(max_examples=500)
@given(ops, st.integers(1, 5), st.integers(100, 1500), st.booleans())
def test_cache_behaves_like_a_bounded_lru_model(sequence, max_answers, max_bytes, single_use):
    """Against a plain model: an LRU dict bounded in entries and bytes, emptied by a new
    generation; every answer handed out is the one last kept for that request."""
    cache = AnswerCache(max_answers=max_answers, max_bytes=max_bytes, single_use=single_use)
    model: OrderedDict[int, tuple[BlockStatusAnswer, int]] = OrderedDict()
    generation = 0
    for op, offset, changed, nbytes, reusable in sequence:
        if changed:
            model.clear()
            generation += 1
        gen = generation
        if op == "put":
            a = answer(nbytes, reusable)
            cache.put(key(offset), gen, a)
            if reusable and nbytes <= max_bytes:
                model.pop(offset, None)
                model[offset] = (a, nbytes)
                while len(model) > max_answers or sum(n for _, n in model.values()) > max_bytes:
                    model.popitem(last=False)
        else:
            got = cache.get(key(offset), gen)
            want = model.get(offset)
            assert got is (want[0] if want else None)
            if want:
                if single_use:
                    del model[offset]
                else:
                    model.move_to_end(offset)
        assert len(cache) == len(model) <= max_answers
        assert cache.retained_bytes == sum(n for _, n in model.values()) <= max_bytes


def test_scan_tracker_follows_a_scan_and_nothing_else():
    scan = ScanTracker()
    size = 10 << 20
    assert scan.next_request(0, 4 << 20, 1 << 20, size) == (1 << 20, 4 << 20)
    # The client continues where the answer ended: the next one follows, cut at the end.
    assert scan.next_request(1 << 20, 4 << 20, 4 << 20, size) == (5 << 20, 4 << 20)
    assert scan.next_request(5 << 20, 4 << 20, 4 << 20, size) == (9 << 20, 1 << 20)
    assert scan.next_request(9 << 20, 1 << 20, 1 << 20, size) is None  # at the end
    # A request elsewhere is no scan; nor is an answer that covers nothing.
    assert scan.next_request(3 << 20, 4096, 4096, size) is None
    assert scan.next_request(0, 4096, 0, size) is None


# --- REQ_ONE scans --------------------------------------------------------------------


def test_one_extent_scan_answers_from_kept_runs_per_context():
    scan = OneExtentScan([3, 5])
    assert scan.descriptors(0, 100, 0) is None  # nothing kept yet
    scan.keep([RunIndex(0, Runs([10, 20, 70], [1, 0, 1]), open_end=True),
               RunIndex(0, Runs([50, 50], [2, 4]), open_end=False)], generation=7)
    assert scan.descriptors(0, 100, 7) == [(3, 10, 1), (5, 50, 2)]
    assert scan.descriptors(15, 100, 7) == [(3, 15, 0), (5, 35, 2)]
    assert scan.descriptors(15, 3, 7) == [(3, 3, 0), (5, 3, 2)]  # clipped at the request end
    assert scan.descriptors(15, 100, 8) is None  # another generation: the image changed
    assert scan.descriptors(35, 100, 7) is None  # the open last run of the first context
    assert scan.descriptors(35, 60, 7) == [(3, 60, 1), (5, 15, 2)]  # ...known up to this end


def test_one_extent_scan_caps_descriptors():
    scan = OneExtentScan([1])
    scan.keep([RunIndex(0, Runs([1 << 40], [0]), open_end=False)], generation=0)
    assert scan.descriptors(0, 0xFFFFFFFF, 0) == [(1, MAX_DESCRIPTOR_LENGTH, 0)]


def test_one_extent_scan_finds_more_runs_while_the_client_scans():
    scan = OneExtentScan([1])
    assert scan.runs_to_find(0) == ONE_EXTENT_FIRST_RUNS

    def keep_runs(start: int, count: int) -> None:
        scan.keep([RunIndex(start, Runs([10] * count, [0, 1] * (count // 2)), open_end=True)], 0)

    keep_runs(0, ONE_EXTENT_FIRST_RUNS)
    pos = 10 * (ONE_EXTENT_FIRST_RUNS - 1)  # the last (open) run: the scan goes on
    assert scan.descriptors(pos, 1000, 0) is None
    assert scan.runs_to_find(pos) == 4 * ONE_EXTENT_FIRST_RUNS
    keep_runs(pos, 4 * ONE_EXTENT_FIRST_RUNS)
    end = pos + 10 * 4 * ONE_EXTENT_FIRST_RUNS
    assert scan.runs_to_find(end) == 16 * ONE_EXTENT_FIRST_RUNS  # at the end: still a scan
    for _ in range(10):
        scan.runs_to_find(end)
    assert scan.runs_to_find(end) == ONE_EXTENT_MAX_RUNS  # bounded
    assert scan.runs_to_find(5) == ONE_EXTENT_FIRST_RUNS  # a jump back: a probe again



def test_one_extent_runs_are_shared_by_the_contexts():
    """However many contexts (bitmaps) a connection selected, its kept runs stay bounded."""
    many = OneExtentScan(list(range(40)))
    assert many.runs_to_find(0) == ONE_EXTENT_FIRST_RUNS  # never fewer than a probe's
    many.keep([RunIndex(0, Runs([10] * 16, [0, 1] * 8), open_end=True)] * 40, 0)
    for _ in range(10):
        per_context = many.runs_to_find(150)
    assert per_context * 40 <= max(ONE_EXTENT_MAX_RUNS, 40 * ONE_EXTENT_FIRST_RUNS)

def request(offset: int, length: int, flags: int = FLAG_REQ_ONE, cookie: int = 0) -> wire.Request:
    return wire.Request(REQUEST_MAGIC, flags, int(Command.BLOCK_STATUS), cookie, offset, length)


@pytest.mark.parametrize("descriptors", [[(1, 65536, 1)], [(0, 512, 3), (2, 4096, 0), (5, 1, 1)]])
def test_expected_reply_gets_the_cookie_in_every_chunk(descriptors):
    scan = OneExtentScan([d[0] for d in descriptors])
    expected = request(4096, 1 << 20)
    scan.expect(expected, 3, wire.block_status_one_reply(0, descriptors))
    assert scan.expected_request is expected
    header = request(4096, 1 << 20, cookie=0x1122334455667788).pack()
    assert scan.expected_reply(header, 3) == wire.block_status_one_reply(0x1122334455667788, descriptors)
    assert scan.expected_reply(header, 3) is None  # used once


@pytest.mark.parametrize("other", [
    request(4096 + 512, 1 << 20), request(4096, (1 << 20) - 512), request(4096, 1 << 20, flags=0),
    wire.Request(REQUEST_MAGIC, FLAG_REQ_ONE, int(Command.READ), 9, 4096, 1 << 20),
    wire.Request(0x12345678, FLAG_REQ_ONE, int(Command.BLOCK_STATUS), 9, 4096, 1 << 20),
])
def test_expected_reply_only_for_the_expected_request(other):
    scan = OneExtentScan([1])
    scan.expect(request(4096, 1 << 20), 0, wire.block_status_one_reply(0, [(1, 512, 0)]))
    assert scan.expected_reply(other.pack(), 0) is None
    assert scan.expected_reply(request(4096, 1 << 20, cookie=7).pack(), 1) is None  # image changed
    assert scan.expected_reply(request(4096, 1 << 20, cookie=7).pack(), 0) is not None


def test_reply_to_a_parsed_request_is_the_expected_reply():
    """The task's way (TLS): the same answer for a parsed request, on the same terms."""
    scan = OneExtentScan([1, 2])
    descriptors = [(1, 512, 0), (2, 4096, 3)]
    assert not scan.expecting
    assert scan.reply_to(request(4096, 1 << 20, cookie=5), 0) is None  # nothing expected
    scan.expect(request(4096, 1 << 20), 0, wire.block_status_one_reply(0, descriptors))
    assert scan.expecting
    assert scan.reply_to(request(4096 + 512, 1 << 20, cookie=5), 0) is None
    assert scan.reply_to(request(4096, 1 << 20, cookie=5), 1) is None  # image changed
    assert scan.reply_to(request(4096, 1 << 20, cookie=5), 0) == wire.block_status_one_reply(5, descriptors)
    assert not scan.expecting
    assert scan.reply_to(request(4096, 1 << 20, cookie=5), 0) is None  # used once


def test_runs_of_unstable_images_expire(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(answers.time, "monotonic", lambda: now[0])
    scan = OneExtentScan([1])
    index = RunIndex(0, Runs([10, 20], [1, 0]), open_end=False)
    scan.keep([index], 0, stable=False)
    assert scan.descriptors(0, 30, 0) == [(1, 10, 1)]
    now[0] += answers.ONE_EXTENT_UNSTABLE_SECONDS + 0.01
    assert scan.descriptors(0, 30, 0) is None  # a raw file may have changed behind the server
    scan.keep([index], 0, stable=True)
    now[0] += 3600
    assert scan.descriptors(0, 30, 0) == [(1, 10, 1)]  # stable extents: only writes (generation)


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 0xFFFFFFFF), st.integers(0, 3)),
                min_size=1, max_size=5), st.integers(0, (1 << 64) - 1))
def test_one_reply_covered_is_the_shortest_descriptor(descriptors, cookie):
    reply = wire.block_status_one_reply(cookie, descriptors)
    assert len(reply) == 32 * len(descriptors)
    assert wire.block_status_one_covered(reply) == min(length for _, length, _ in descriptors)
