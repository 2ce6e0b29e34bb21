"""Block status answers kept for reuse (pynbd/server/answers.py): the cache's bounds,
single use and range drops against a model, the scan tracker, and REQ_ONE scans (runs
kept per connection, replies made ahead, both dropped by the change feed's ranges)."""

from __future__ import annotations

from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.image.changes import ChangeFeed
from pynbd.protocol import wire
from pynbd.protocol.constants import CMD_BLOCK_STATUS, CMD_READ, FLAG_REQ_ONE
from pynbd.protocol.transmission import MAX_DESCRIPTOR_LENGTH, Request
from pynbd.runlength import Runs
from pynbd.runspans import RunIndex
from pynbd.server import answers
from pynbd.server.answers import (
    ONE_EXTENT_FIRST_RUNS,
    ONE_EXTENT_MAX_RUNS,
    AnswerCache,
    BlockStatusAnswer,
    OneExtentScan,
    RequestKey,
    ScanTracker,
)

CONTEXTS = ((1, "base:allocation"),)


def answer(nbytes: int = 32, reusable: bool = True) -> BlockStatusAnswer:
    return BlockStatusAnswer([bytes(24), bytes(nbytes - 24)], (0,), 4096, reusable)


def key(offset: int, length: int = 1 << 20, flags: int = 0) -> RequestKey:
    return (offset, length, flags, CONTEXTS)


def overlaps(start: int, length: int, other_start: int, other_length: int) -> bool:
    """Whether ``[start, start+length)`` and ``[other_start, other_start+other_length)``
    share a byte (the models' rule, written apart from the code's)."""
    return max(start, other_start) < min(start + length, other_start + other_length)


# --- the answer cache ------------------------------------------------------------------


def test_kept_answer_is_found_for_the_same_request_only():
    cache = AnswerCache()
    a = answer()
    cache.put(key(0), a)
    assert cache.has(key(0))
    assert cache.get(key(0)) is a
    assert cache.get(key(0)) is a  # shared: handed out again
    assert cache.get(key(4096)) is None and not cache.has(key(4096))
    assert cache.get((0, 1 << 20, 0, ((2, "qemu:dirty-bitmap:b"),))) is None


def test_a_drop_forgets_exactly_the_overlapping_answers():
    cache = AnswerCache()
    first, second, third, whole = answer(32), answer(40), answer(48), answer(56)
    cache.put(key(0, 4096), first)
    cache.put(key(4096, 4096), second)
    cache.put(key(8192, 4096), third)
    cache.put(key(0, 12288, FLAG_REQ_ONE), whole)  # other flags: dropped by range all the same
    cache.drop(12288, 4096)  # only touches the end of the last two: nothing overlaps
    assert len(cache) == 4 and cache.retained_bytes == 32 + 40 + 48 + 56
    cache.drop(4095, 2)  # the last byte of the first, the first of the second
    assert cache.get(key(0, 4096)) is None
    assert cache.get(key(4096, 4096)) is None
    assert cache.get(key(0, 12288, FLAG_REQ_ONE)) is None
    assert cache.get(key(8192, 4096)) is third  # the change did not touch it
    assert len(cache) == 1 and cache.retained_bytes == 48


def test_an_answer_made_while_a_change_runs_is_dropped_when_it_ends():
    """The change feed announces a change at its start and at its end: an answer computed
    from half-changed metadata in between is not kept."""
    feed = ChangeFeed()
    cache = AnswerCache()
    feed.listen(cache.drop)
    cache.put(key(0, 4096), answer())
    cache.put(key(8192, 4096), answer())
    with feed.changing(4000, 200):
        assert not cache.has(key(0, 4096))  # dropped at the start
        cache.put(key(0, 4096), answer())  # a lookup during the change
    assert not cache.has(key(0, 4096))  # ...dropped at the end
    assert cache.has(key(8192, 4096))


def test_answers_after_an_error_are_never_kept():
    cache = AnswerCache()
    cache.put(key(0), answer(reusable=False))
    assert cache.get(key(0)) is None and len(cache) == 0


def test_single_use_answers_are_handed_out_once():
    cache = AnswerCache(max_answers=1, single_use=True)
    a = answer()
    cache.put(key(0), a)
    assert cache.has(key(0)) and cache.has(key(0))  # asking does not use it
    assert cache.get(key(0)) is a
    assert cache.get(key(0)) is None and not cache.has(key(0))
    assert cache.retained_bytes == 0


def test_a_view_counts_its_whole_buffer():
    """A slice of a cached span keeps the span's bytes alive, and the bound must say so."""
    span = bytes(10_000)
    a = BlockStatusAnswer([bytes(24), memoryview(span)[8:16]], (0,), 4096)
    assert a.retained_bytes() == 24 + 10_000
    cache = AnswerCache(max_bytes=15_000)
    cache.put(key(0), a)
    cache.put(key(1), BlockStatusAnswer([bytes(24), memoryview(span)[16:24]], (0,), 4096))
    assert len(cache) == 1 and cache.retained_bytes <= 15_000
    assert cache.get(key(1)) is not None  # the older one went


def test_an_answer_bigger_than_the_bound_is_not_kept():
    cache = AnswerCache(max_bytes=100)
    cache.put(key(0), answer(200))
    assert len(cache) == 0


# Requests of the model tests: offsets 0-15, lengths 1-8, two flag values.
MODEL_OFFSETS, MODEL_LENGTHS = range(16), range(1, 9)
model_offsets = st.integers(MODEL_OFFSETS.start, MODEL_OFFSETS.stop - 1)
model_lengths = st.integers(MODEL_LENGTHS.start, MODEL_LENGTHS.stop - 1)
model_flags = st.sampled_from([0, FLAG_REQ_ONE])
# (operation, offset, length, flags, answer size, answer reusable); a drop's range may
# reach past the requests' (a change is announced with a length of at least 1).
cache_ops = st.lists(st.one_of(
    st.tuples(st.just("put"), model_offsets, model_lengths, model_flags,
              st.integers(24, 400), st.integers(0, 9).map(lambda n: n != 0)),
    st.tuples(st.just("get"), model_offsets, model_lengths, model_flags, st.just(0), st.just(True)),
    st.tuples(st.just("drop"), st.integers(0, 24), st.integers(1, 12), st.just(0), st.just(0), st.just(True)),
), max_size=60)


@settings(max_examples=500)
@given(cache_ops, st.integers(1, 5), st.integers(100, 1500), st.booleans())
def test_cache_behaves_like_a_bounded_lru_model(sequence, max_answers, max_bytes, single_use):
    """Against a plain model: an LRU dict bounded in entries and bytes, from which a drop
    removes the answers to requests overlapping its range and nothing else; every answer
    handed out is the one last kept for that request."""
    cache = AnswerCache(max_answers=max_answers, max_bytes=max_bytes, single_use=single_use)
    model: OrderedDict[RequestKey, tuple[BlockStatusAnswer, int]] = OrderedDict()
    for op, offset, length, flags, nbytes, reusable in sequence:
        request_key = key(offset, length, flags)
        if op == "put":
            a = answer(nbytes, reusable)
            cache.put(request_key, a)
            if reusable and nbytes <= max_bytes:
                model.pop(request_key, None)
                model[request_key] = (a, nbytes)
                while len(model) > max_answers or sum(n for _, n in model.values()) > max_bytes:
                    model.popitem(last=False)
        elif op == "get":
            got = cache.get(request_key)
            want = model.get(request_key)
            assert got is (want[0] if want else None)
            if want:
                if single_use:
                    del model[request_key]
                else:
                    model.move_to_end(request_key)
        else:
            cache.drop(offset, length)
            for kept in [k for k in model if overlaps(k[0], k[1], offset, length)]:
                del model[kept]
            # Nothing overlapping is answered any more; everything else still is.
            for other_offset in MODEL_OFFSETS:
                for other_length in MODEL_LENGTHS:
                    for other_flags in (0, FLAG_REQ_ONE):
                        other = key(other_offset, other_length, other_flags)
                        assert cache.has(other) == (other in model)
                        if overlaps(other_offset, other_length, offset, length):
                            assert not cache.has(other)
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
    assert scan.descriptors(0, 100) is None  # nothing kept yet
    scan.keep([RunIndex(0, Runs([10, 20, 70], [1, 0, 1]), open_end=True),
               RunIndex(0, Runs([50, 50], [2, 4]), open_end=False)])
    assert scan.descriptors(0, 100) == [(3, 10, 1), (5, 50, 2)]
    assert scan.descriptors(15, 100) == [(3, 15, 0), (5, 35, 2)]
    assert scan.descriptors(15, 3) == [(3, 3, 0), (5, 3, 2)]  # clipped at the request end
    assert scan.descriptors(35, 100) is None  # the open last run of the first context
    assert scan.descriptors(35, 60) == [(3, 60, 1), (5, 15, 2)]  # ...known up to this end
    scan.drop(100, 4096)  # a change just past the runs: they still answer
    assert scan.descriptors(15, 100) == [(3, 15, 0), (5, 35, 2)]
    scan.drop(99, 1)  # a change within them (the last byte): they answer nothing
    assert scan.descriptors(0, 100) is None
    assert scan.descriptors(15, 3) is None  # (not even what the change did not touch)


def test_one_extent_scan_caps_descriptors():
    scan = OneExtentScan([1])
    scan.keep([RunIndex(0, Runs([1 << 40], [0]), open_end=False)])
    assert scan.descriptors(0, 0xFFFFFFFF) == [(1, MAX_DESCRIPTOR_LENGTH, 0)]


def test_one_extent_scan_finds_more_runs_while_the_client_scans():
    scan = OneExtentScan([1])
    assert scan.runs_to_find(0) == ONE_EXTENT_FIRST_RUNS

    def keep_runs(start: int, count: int) -> None:
        scan.keep([RunIndex(start, Runs([10] * count, [0, 1] * (count // 2)), open_end=True)])

    keep_runs(0, ONE_EXTENT_FIRST_RUNS)
    pos = 10 * (ONE_EXTENT_FIRST_RUNS - 1)  # the last (open) run: the scan goes on
    assert scan.descriptors(pos, 1000) is None
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
    many.keep([RunIndex(0, Runs([10] * 16, [0, 1] * 8), open_end=True)] * 40)
    for _ in range(10):
        per_context = many.runs_to_find(150)
    assert per_context * 40 <= max(ONE_EXTENT_MAX_RUNS, 40 * ONE_EXTENT_FIRST_RUNS)


def request(offset: int, length: int, flags: int = FLAG_REQ_ONE, cookie: int = 0,
            command: int = CMD_BLOCK_STATUS) -> Request:
    return Request(command, flags, cookie, offset, length)


@pytest.mark.parametrize("descriptors", [[(1, 65536, 1)], [(0, 512, 3), (2, 4096, 0), (5, 1, 1)]])
def test_reply_made_ahead_gets_the_cookie_in_every_chunk(descriptors):
    scan = OneExtentScan([d[0] for d in descriptors])
    assert not scan.expecting
    assert scan.made_ahead(request(4096, 1 << 20, cookie=5)) is None  # nothing made ahead
    scan.expect(request(4096, 1 << 20), wire.block_status_one_reply(0, descriptors))
    assert scan.expecting
    cookie = 0x1122334455667788
    assert scan.made_ahead(request(4096, 1 << 20, cookie=cookie)) == wire.block_status_one_reply(cookie,
                                                                                                 descriptors)
    assert not scan.expecting
    assert scan.made_ahead(request(4096, 1 << 20, cookie=cookie)) is None  # used once


@pytest.mark.parametrize("other", [
    request(4096 + 512, 1 << 20), request(4096, (1 << 20) - 512), request(4096, 1 << 20, flags=0),
    request(4096, 1 << 20, command=CMD_READ, flags=0), request(4096, 1 << 20, command=CMD_READ),
])
def test_reply_made_ahead_only_for_the_expected_request(other):
    """Another request gets None, and the reply made ahead is gone: the scan went elsewhere."""
    scan = OneExtentScan([1])
    scan.expect(request(4096, 1 << 20), wire.block_status_one_reply(0, [(1, 512, 0)]))
    assert scan.made_ahead(other) is None
    assert not scan.expecting
    assert scan.made_ahead(request(4096, 1 << 20, cookie=7)) is None


def test_a_change_within_the_expected_request_drops_the_reply_made_ahead():
    scan = OneExtentScan([1])
    reply = wire.block_status_one_reply(0, [(1, 512, 0)])
    scan.expect(request(4096, 8192), reply)
    scan.drop(0, 4096)  # just before the request's range
    scan.drop(4096 + 8192, 1)  # just after it
    assert scan.expecting
    assert scan.made_ahead(request(4096, 8192, cookie=7)) == wire.block_status_one_reply(7, [(1, 512, 0)])
    scan.expect(request(4096, 8192), reply)
    scan.drop(4096 + 8191, 1)  # its last byte (beyond what the reply describes: the request's range counts)
    assert not scan.expecting
    assert scan.made_ahead(request(4096, 8192, cookie=7)) is None


def test_runs_of_unstable_images_expire(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(answers.time, "monotonic", lambda: now[0])
    scan = OneExtentScan([1])
    index = RunIndex(0, Runs([10, 20], [1, 0]), open_end=False)
    scan.keep([index], stable=False)
    assert scan.descriptors(0, 30) == [(1, 10, 1)]
    now[0] += answers.ONE_EXTENT_UNSTABLE_SECONDS + 0.01
    assert scan.descriptors(0, 30) is None  # a raw file may have changed behind the server
    scan.keep([index], stable=True)
    now[0] += 3600
    assert scan.descriptors(0, 30) == [(1, 10, 1)]  # stable extents: only a change drops them
    scan.drop(29, 1)
    assert scan.descriptors(0, 30) is None


CONTEXT_IDS = [3, 5]
MODEL_EXTENT = 40  # requests and drops of the scan model start below this
# One context's runs: (start, [(length, status), ...], open_end); they end before MODEL_RUNS_END.
run_index_args = st.tuples(st.integers(0, 24), st.lists(st.tuples(st.integers(1, 6), st.integers(0, 3)),
                                                         min_size=1, max_size=5), st.booleans())
MODEL_RUNS_END = 24 + 5 * 6
scan_offsets = st.integers(0, MODEL_EXTENT - 1)
scan_lengths = st.integers(1, 12)
scan_requests = st.tuples(st.sampled_from([CMD_BLOCK_STATUS, CMD_READ]), st.sampled_from([FLAG_REQ_ONE, 0]),
                          scan_offsets, scan_lengths)
scan_ops = st.lists(st.one_of(
    st.tuples(st.just("keep"), st.lists(run_index_args, min_size=len(CONTEXT_IDS), max_size=len(CONTEXT_IDS))),
    st.tuples(st.just("expect"), scan_requests, st.lists(st.tuples(st.integers(1, 12), st.integers(0, 3)),
                                                         min_size=len(CONTEXT_IDS), max_size=len(CONTEXT_IDS))),
    st.tuples(st.just("drop"), scan_offsets, scan_lengths),
    st.tuples(st.just("descriptors"), scan_offsets, scan_lengths),
    # (the expected request if any, with this cookie, when the flag is set)
    st.tuples(st.just("made_ahead"), st.booleans(), scan_requests, st.integers(0, (1 << 64) - 1)),
), max_size=40)


def make_indexes(args: list[tuple[int, list[tuple[int, int]], bool]]) -> list[RunIndex]:
    return [RunIndex(start, Runs.from_pairs(runs), open_end) for start, runs, open_end in args]


@settings(max_examples=300)
@given(scan_ops)
def test_one_extent_scan_drops_like_a_model(sequence):
    """Against a model: the kept runs answer what a twin scan that is never dropped
    answers, until a drop overlaps one context's runs (by their starts and lengths);
    after that nothing; what is answered never overlaps a range dropped since the runs
    were kept. The reply made ahead goes to the request expected, once, unless a drop
    overlapping that request's range came first."""
    scan = OneExtentScan(CONTEXT_IDS)
    twin = OneExtentScan(CONTEXT_IDS)
    kept: list[tuple[int, int]] = []  # (start, length) of each context's runs
    dropped_since_keep: list[tuple[int, int]] = []
    forgotten = True  # the runs answer nothing
    expected: tuple[tuple[int, int, int, int], list[tuple[int, int, int]]] | None = None

    def check_descriptors(offset: int, length: int) -> None:
        found = scan.descriptors(offset, length)
        assert found == (None if forgotten else twin.descriptors(offset, length))
        for _, described, _ in found or ():
            assert not any(overlaps(offset, described, *gone) for gone in dropped_since_keep)

    for op, *args in sequence:
        if op == "keep":
            scan.keep(make_indexes(args[0]))
            twin.keep(make_indexes(args[0]))
            kept = [(start, sum(length for length, _ in runs)) for start, runs, _ in args[0]]
            dropped_since_keep = []
            forgotten = False
        elif op == "expect":
            (command, flags, offset, length), chunks = args
            descriptors = [(context_id, n, status) for context_id, (n, status) in zip(CONTEXT_IDS, chunks)]
            scan.expect(request(offset, length, flags, command=command), wire.block_status_one_reply(0, descriptors))
            expected = ((command, flags, offset, length), descriptors)
        elif op == "drop":
            offset, length = args
            scan.drop(offset, length)
            dropped_since_keep.append((offset, length))
            if any(overlaps(start, n, offset, length) for start, n in kept):
                forgotten = True
            if expected is not None and overlaps(expected[0][2], expected[0][3], offset, length):
                expected = None
            # Anywhere the runs may reach: nothing overlapping is answered, the rest is
            # answered as before unless the runs were forgotten.
            for anywhere in range(MODEL_RUNS_END):
                for anywhere_length in (1, 4, 16):
                    check_descriptors(anywhere, anywhere_length)
        elif op == "descriptors":
            check_descriptors(*args)
        else:
            use_expected, (command, flags, offset, length), cookie = args
            if use_expected and expected is not None:
                command, flags, offset, length = expected[0]
            got = scan.made_ahead(request(offset, length, flags, cookie, command))
            if expected is not None and expected[0] == (command, flags, offset, length):
                assert got == wire.block_status_one_reply(cookie, expected[1])
            else:
                assert got is None
            expected = None
        assert scan.expecting == (expected is not None)


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 0xFFFFFFFF), st.integers(0, 3)),
                min_size=1, max_size=5), st.integers(0, (1 << 64) - 1))
def test_one_reply_covered_is_the_shortest_descriptor(descriptors, cookie):
    reply = wire.block_status_one_reply(cookie, descriptors)
    assert len(reply) == 32 * len(descriptors)
    assert wire.block_status_one_covered(reply) == min(length for _, length, _ in descriptors)
