"""RequestPoller: when a connection polls for the next request, and for how long."""

from __future__ import annotations

from pynbd.server.polling import POLL_BUDGET_NS, RequestPoller

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
