"""`pynbd serve --snapshot` (-s, as qemu-nbd -s): writes go to a temporary qcow2 overlay
over the image, which stays untouched; the overlay is deleted when the server stops."""

from __future__ import annotations

import pytest

from tests.support.servers import PynbdServer, run

KiB = 1024
MiB = 1024 * KiB

pytestmark = [pytest.mark.pynbd, pytest.mark.needs("qemu-img", "qemu-io")]


@pytest.fixture(params=["raw", "qcow2"])
def image(request, tmp_path):
    path = tmp_path / f"disk.{request.param}"
    run(["qemu-img", "create", "-q", "-f", request.param, str(path), "8M"])
    run(["qemu-io", "-f", request.param, "-c", "write -P 0x11 0 1M", str(path)])
    return path


def test_snapshot_writes_go_to_a_deleted_overlay(image, tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    before = image.read_bytes()
    with PynbdServer(image, "-s", workdir=tmp_path) as server:
        overlays = list(scratch.glob("pynbd-snapshot-*.qcow2"))
        assert len(overlays) == 1
        out = run(["qemu-io", "-f", "raw", "-c", "write -P 0x22 512k 64k", "-c", "write -z 2M 64k",
                   "-c", "read -P 0x11 0 512k", "-c", "read -P 0x22 512k 64k", "-c", "read -P 0 2M 64k",
                   server.uri]).stdout
        assert "Pattern verification failed" not in out
        # The base image is a read-only backing file meanwhile: a reader that shares gets in.
        run(["qemu-img", "info", "-U", str(image)])
        log = server.log()
    assert image.read_bytes() == before, "the image changed"
    assert not list(scratch.glob("pynbd-snapshot-*")), "the overlay was left behind"
    assert "temporary overlay" in log


def test_snapshot_with_read_only_is_read_only(image, tmp_path):
    before = image.read_bytes()
    with PynbdServer(image, "-s", "-r", workdir=tmp_path) as server:
        p = run(["qemu-io", "-f", "raw", "-c", "write -P 0x33 0 4k", server.uri], check=False)
        assert "wrote" not in p.stdout
    assert image.read_bytes() == before
