"""pynbd: an asyncio NBD server for raw and qcow2 images."""

__version__ = "0.1.0"
