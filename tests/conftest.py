"""Shared fixtures: small raw images, server launchers.

Markers (handled by the plugin tests/support/skips.py, loaded here):
* ``@pytest.mark.needs("qemu-nbd", "nbdinfo", ...)`` skips (with the reason) when a
  binary is missing; ``"libnbd-python"`` stands for /usr/bin/python3 + ``import nbd``.
* ``@pytest.mark.pynbd`` skips while ``python -m pynbd serve --help`` fails.

In strict mode (``CI=true`` or ``PYNBD_STRICT=1``) each of those is a failure, and so
is every skip not listed in tests/support/skips.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# Make "tests.support" importable however pytest is started (pytest, python -m pytest).
_REPO = str(Path(__file__).resolve().parents[1])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from tests.support.servers import PynbdServer, QemuNbdServer, make_raw_image
from tests.support.skips import require, require_pynbd

# Strict mode, the allowed skips and the needs/pynbd markers.
pytest_plugins = ("tests.support.skips",)

MiB = 1024 * 1024
KiB = 1024

# A 4 MiB sparse image with a few data runs (offsets chosen to give qemu-nbd and pynbd
# a map with several data/hole alternations, one of them not 64 KiB aligned).
SPARSE_SIZE = 4 * MiB
SPARSE_WRITES = (
    "write -P 0xaa 0 64k",
    "write -P 0xbb 1M 4k",
    "write -P 0xcc 1052672 8k",  # 1M+4k..1M+12k: adjacent to the previous run
    "write -P 0xdd 2M 192k",
    "write -P 0xee 4128768 64k",  # last 64 KiB
)
# A size that is not a multiple of 512 (qemu-nbd rounds it up, pynbd must not).
ODD_SIZE = 3 * MiB + 1000
ODD_WRITES = (
    "write -P 0x11 0 4k",
    "write -P 0x22 3145728 1000",  # the last 1000 bytes
)


# --------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------


@pytest.fixture
def sparse_image(tmp_path) -> Path:
    require("qemu-io")
    return make_raw_image(tmp_path / "sparse.img", SPARSE_SIZE, SPARSE_WRITES)


@pytest.fixture
def odd_image(tmp_path) -> Path:
    require("qemu-io")
    return make_raw_image(tmp_path / "odd.img", ODD_SIZE, ODD_WRITES)


@pytest.fixture
def image_factory(tmp_path):
    """make(name, size, writes) -> Path of a fresh sparse raw image."""
    def make(name: str, size: int = SPARSE_SIZE, writes=()) -> Path:
        if writes:
            require("qemu-io")
        return make_raw_image(tmp_path / name, size, writes)
    return make


def copy_sparse(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    return dst


# --------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------


class _Launcher:
    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.servers = []

    def _track(self, s):
        self.servers.append(s)
        return s

    def pynbd(self, image=None, *args, **kw) -> PynbdServer:
        kw.setdefault("workdir", self.tmp_path)
        return self._track(PynbdServer(image, *args, **kw))

    def qemu(self, image, *args, **kw) -> QemuNbdServer:
        kw.setdefault("workdir", self.tmp_path)
        return self._track(QemuNbdServer(image, *args, **kw))

    def stop_all(self):
        errors = []
        for s in reversed(self.servers):
            try:
                s.stop()
            except AssertionError as e:
                errors.append(str(e))
        if errors:
            raise AssertionError("\n".join(errors))


@pytest.fixture
def launch(tmp_path):
    """launch.pynbd(image, *args, name=..., tcp=...) / launch.qemu(image, *args, fmt=...).

    Every server is stopped at teardown; a pynbd server that does not exit 0 on
    SIGTERM fails the test.
    """
    launcher = _Launcher(tmp_path)
    yield launcher
    launcher.stop_all()


@pytest.fixture
def pynbd_server(launch, sparse_image):
    """pynbd serving the sparse image, writable, export name ""."""
    require_pynbd()
    return launch.pynbd(sparse_image)


@pytest.fixture
def qemu_server(launch, sparse_image):
    """qemu-nbd serving the sparse image, writable, -A, export name ""."""
    require("qemu-nbd")
    return launch.qemu(sparse_image, "-A", "-e", "0")


@pytest.fixture(params=["pynbd", "qemu-nbd"])
def any_server_kind(request):
    """Parametrize a test over both servers (each skipped while unavailable; strict: fails)."""
    if request.param == "pynbd":
        require_pynbd()
    else:
        require("qemu-nbd")
    return request.param


@pytest.fixture
def start_server(launch, any_server_kind):
    """start(image, *, read_only=False, name="", extra=()) with the parametrized server kind.

    qemu-nbd gets ``-A -e 0`` so both offer the same contexts and multi-conn.
    """
    def start(image, *, read_only=False, name="", pynbd_args=(), qemu_args=(), **kw):
        if any_server_kind == "pynbd":
            args = list(pynbd_args) + (["--read-only"] if read_only else [])
            return launch.pynbd(image, *args, name=name, **kw)
        args = ["-A", "-e", "0", *qemu_args] + (["-r"] if read_only else [])
        return launch.qemu(image, *args, name=name, **kw)
    start.kind = any_server_kind
    return start
