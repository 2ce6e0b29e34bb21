"""A stop asked for at any moment of the server's life is a clean stop.

A supervisor (systemd, a test harness, a backup tool) may send SIGTERM the moment the
server's socket accepts connections, before the event loop runs: that must end like
any other stop (exit 0, images flushed and closed), not by the signal's default action.
"""

from __future__ import annotations

import signal

import pytest

pytestmark = [pytest.mark.pynbd]


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_stop_signal_right_after_listening_is_clean(launch, sparse_image, signal_name):
    """The launcher signals as soon as a connect() succeeds (the earliest a client could
    be there); every cycle must exit 0. Without the signals held until the server
    handles them, every cycle died of the signal here."""
    for _ in range(8):
        server = launch.pynbd(sparse_image)
        server.proc.send_signal(getattr(signal, signal_name))
        assert server.wait_exit() == 0, server.log()
