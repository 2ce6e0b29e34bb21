"""A qcow2 image that cannot grow (the file size limit of the server process, which the
kernel enforces like a full disk: EFBIG) answers ENOSPC and stays consistent; a file
that cannot be opened for writing is a one-line error, not a crash."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest

from tests.support.nbdclient import CMD_FLUSH, CMD_WRITE, ENOSPC, NbdClient
from tests.support.servers import REPO_ROOT, PynbdServer, run

KiB = 1024
MiB = 1024 * KiB

pytestmark = [pytest.mark.pynbd, pytest.mark.needs("qemu-img")]


def test_writes_past_a_full_disk_answer_enospc_and_the_image_stays_consistent(tmp_path):
    image = tmp_path / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"])
    with PynbdServer(image, workdir=tmp_path) as server:
        limit = os.path.getsize(image) + 2 * MiB
        resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
        errors = []
        with NbdClient.connect(server) as c:
            for i in range(16):
                reply = c.request(CMD_WRITE, i * MiB, payload=bytes([i + 1]) * MiB)
                errors.append(reply.error)
                if reply.error == 0:
                    assert c.request(CMD_FLUSH).error in (0, ENOSPC)
            assert c.read(0, 4).error == 0  # still serving
        log = server.log()
    assert errors[0] == 0 and ENOSPC in errors, errors
    assert set(errors) <= {0, ENOSPC}, errors
    assert "Traceback" not in log
    out = subprocess.run(["qemu-img", "check", "--output=json", str(image)], capture_output=True, text=True)
    report = json.loads(out.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("check-errors", 0) == 0, report
    assert run(["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 1 0 1M", str(image)]).returncode == 0


def test_a_file_that_cannot_be_opened_for_writing_is_one_line(tmp_path):
    if os.geteuid() == 0:
        # root opens any file for writing: make it immutable to the open instead.
        image = tmp_path / "disk.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"])
        if subprocess.run(["chattr", "+i", str(image)], capture_output=True).returncode != 0:
            pytest.skip("no way to make a file unwritable for root here (chattr)")
    else:
        image = tmp_path / "disk.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"])
        image.chmod(0o444)
    try:
        p = subprocess.run([sys.executable, "-m", "pynbd", "serve", str(image), "--socket",
                            str(tmp_path / "s")], capture_output=True, text=True, timeout=30,
                           env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    finally:
        subprocess.run(["chattr", "-i", str(image)], capture_output=True)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert str(image) in lines[0] and "writing" in lines[0] and "Traceback" not in p.stderr
