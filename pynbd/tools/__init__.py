"""Offline tools: what ``pynbd map``, ``pynbd bitmap`` and ``pynbd create`` do to an image
file with no server running (``map``, ``bitmap``, ``create``)."""
