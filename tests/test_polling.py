"""The lookahead seam (pynbd/server/lookahead.py): RequestPoller, when a connection
polls for the next request and for how long, and Lookahead/NoLookahead, when it polls
and prepares what a scanning client asks next."""

from __future__ import annotations

from pynbd.protocol.constants import CMD_BLOCK_STATUS, CMD_READ, CMD_WRITE, FLAG_REQ_ONE
from pynbd.protocol.transmission import Request
from pynbd.server.lookahead import POLL_BUDGET_NS, Lookahead, NoLookahead, RequestPoller, lookahead_for

WINDOW = 50_000


class FakeClock:
    """A clock that advances ``step`` nanoseconds per reading."""

    def __init__(self, step: int = 1_000) -> None:
        self.now = 10_000_000
        self.step = step

    def __call__(self) -> int:
        self.now += self.step
        return self.now


def receiver(results):
    """receive() returning ``results`` in turn, then None (nothing yet) for ever."""
    results = list(results)
    calls = []

    def receive():
        calls.append(1)
        return results.pop(0) if results else None
    receive.calls = calls
    return receive


def test_poll_returns_what_arrives_within_the_window():
    clock = FakeClock()
    poller = RequestPoller(WINDOW, clock=clock)
    poller.woken()
    receive = receiver([None, None, 28])
    assert poller.poll(receive) == 28
    assert len(receive.calls) == 3
    assert poller.active
    assert (poller.polled, poller.empty_windows) == (1, 0)


def test_eof_is_returned_as_received():
    poller = RequestPoller(WINDOW, clock=FakeClock())
    poller.woken()
    assert poller.poll(receiver([0])) == 0


def test_an_empty_window_stops_polling_for_the_next_replies():
    clock = FakeClock(step=1_000)
    poller = RequestPoller(WINDOW, clock=clock)
    poller.woken()
    receive = receiver([])
    start = clock.now
    assert poller.poll(receive) is None
    # It polled for the whole window (one reading per call), and no longer.
    assert WINDOW <= clock.now - start <= WINDOW + 3 * clock.step
    assert not poller.active
    assert (poller.polled, poller.empty_windows) == (0, 1)
    again = receiver([28])
    assert poller.poll(again) is None and not again.calls


def test_a_request_soon_after_the_reply_starts_polling_again():
    clock = FakeClock()
    poller = RequestPoller(WINDOW, clock=clock)
    poller.woken()
    poller.poll(receiver([]))  # nothing came: inactive
    clock.now += poller.wake_gap_ns - 10_000  # the next request woke the server soon after
    poller.woken()
    assert poller.active
    assert poller.poll(receiver([28])) == 28


def test_a_slow_client_stays_unpolled():
    clock = FakeClock()
    poller = RequestPoller(WINDOW, clock=clock)
    poller.woken()
    poller.poll(receiver([]))
    for _ in range(5):
        clock.now += 1_000_000  # a millisecond between a reply and the next request
        poller.woken()
        assert not poller.active
        receive = receiver([28])
        assert poller.poll(receive) is None and not receive.calls
    # The gap counts from the last reply, not from the first.
    clock.now += 20_000
    poller.woken()
    assert poller.active


def test_one_callback_polls_within_its_budget():
    clock = FakeClock(step=10_000)
    poller = RequestPoller(WINDOW, clock=clock)
    poller.woken()
    served = 0
    while poller.poll(receiver([None, 28])) == 28:
        served += 1
    # The budget ends the loop (each poll takes 10-40 us of this clock), and the poller
    # stays active for the next callback.
    assert POLL_BUDGET_NS // 40_000 <= served <= POLL_BUDGET_NS // 10_000
    assert poller.active and poller.budget_spent
    poller.woken()
    assert not poller.budget_spent
    assert poller.poll(receiver([28])) == 28


def test_window_zero_never_polls():
    clock = FakeClock()
    poller = RequestPoller(0, clock=clock)
    assert not poller.active
    poller.woken()
    receive = receiver([28])
    assert poller.poll(receive) is None and not receive.calls
    assert not poller.active


# --- Lookahead and NoLookahead --------------------------------------------------------


class ScanStandIn:
    """Stands in for the connection's BlockStatusService: counts prepare_next() calls,
    after which a reply is made ahead (``expecting``) if ``makes_reply_ahead``."""

    def __init__(self, makes_reply_ahead: bool) -> None:
        self.makes_reply_ahead = makes_reply_ahead
        self.expecting = False
        self.prepared = 0

    def prepare_next(self) -> None:
        self.prepared += 1
        self.expecting = self.makes_reply_ahead


def request(command: int, flags: int = 0) -> Request:
    return Request(command, flags, 1, 0, 4096)


def test_lookahead_for_window_zero_is_no_lookahead():
    assert isinstance(lookahead_for(0), NoLookahead)
    lookahead = lookahead_for(WINDOW)
    assert not isinstance(lookahead, NoLookahead) and lookahead.window_ns == WINDOW


def test_no_lookahead_never_polls_nor_prepares():
    lookahead = NoLookahead()
    service = ScanStandIn(makes_reply_ahead=True)
    service.expecting = True  # even while a reply made ahead waits
    for command, flags in ((CMD_READ, 0), (CMD_BLOCK_STATUS, FLAG_REQ_ONE), (CMD_BLOCK_STATUS, 0)):
        lookahead.replied(request(command, flags), service)
        assert not lookahead.wants_poll(0, service)
    assert service.prepared == 0
    lookahead.woken()
    receive = receiver([28])
    assert lookahead.poll(receive) is None and not receive.calls


def test_lookahead_polls_after_a_read_with_nothing_in_flight():
    lookahead = Lookahead(WINDOW)
    service = ScanStandIn(makes_reply_ahead=True)
    assert not lookahead.wants_poll(0, service)  # nothing answered yet
    lookahead.replied(request(CMD_READ), service)
    assert service.prepared == 0  # a READ has nothing to prepare
    assert lookahead.wants_poll(0, service) and lookahead.wants_poll(0, None)
    assert not lookahead.wants_poll(1, service)  # a request in flight runs first
    lookahead.replied(request(CMD_WRITE), service)
    assert not lookahead.wants_poll(0, service)


def test_lookahead_polls_after_block_status_only_while_a_reply_is_made_ahead():
    lookahead = Lookahead(WINDOW)
    scanning = ScanStandIn(makes_reply_ahead=True)
    lookahead.replied(request(CMD_BLOCK_STATUS, FLAG_REQ_ONE), scanning)
    assert scanning.prepared == 1  # prepared while the client reads the reply
    assert lookahead.wants_poll(0, scanning)
    scanning.expecting = False  # the reply made ahead went out (or a change dropped it)
    assert not lookahead.wants_poll(0, scanning)

    mapping = ScanStandIn(makes_reply_ahead=False)  # e.g. nbdinfo --map: nothing made ahead
    lookahead.replied(request(CMD_BLOCK_STATUS), mapping)
    assert mapping.prepared == 1
    assert not lookahead.wants_poll(0, mapping)
    lookahead.replied(request(CMD_BLOCK_STATUS), None)  # no block status service: nothing to do
    assert not lookahead.wants_poll(0, None)


def test_lookahead_polls_as_its_poller_does():
    lookahead = Lookahead(WINDOW)
    lookahead._clock = FakeClock()
    lookahead.woken()
    assert not lookahead.budget_spent
    assert lookahead.poll(receiver([None, 28])) == 28
    assert lookahead.summary() == "polled for 1 requests, 0 windows empty"
