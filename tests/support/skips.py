"""The skips a test run may contain, and the strict mode that fails every other one.

A pytest plugin (tests/conftest.py loads it). Outside strict mode a missing tool, a
missing libnbd binding or a pynbd that cannot start skips the tests that need it, so
a developer without QEMU can still run the pure tests. In **strict mode** each of
those is a test failure, and so is any skip whose reason is not in
:data:`ALLOWED_SKIPS` below, wherever it comes from (``pytest.skip``, ``skipif``, a
fixture, collection). Strict mode is on with ``CI=true`` (as ``.ci/run`` runs
``scripts/test``) or ``PYNBD_STRICT=1``; nothing turns it off under ``CI=true``.

At the end of a run a section "allowed skips" lists the skips that happened, with
the reason each is legitimate (and, outside strict mode, the ones strict mode would
fail).

Markers (checked before each test):

* ``@pytest.mark.needs("qemu-nbd", "nbdinfo", ...)``: these binaries must be on PATH;
  ``"libnbd-python"`` stands for /usr/bin/python3 with ``import nbd``;
* ``@pytest.mark.pynbd``: ``python -m pynbd serve --help`` must work.

(PYTEST_DONT_REWRITE: conftest.py imports this module before pytest loads it as a
plugin, and it has no asserts to rewrite.)
"""

from __future__ import annotations

import functools
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

import pytest

from tests.support.servers import have_libnbd_python, pynbd_unavailable_reason


@dataclass(frozen=True)
class AllowedSkip:
    """A skip that may happen in strict mode: ``pattern`` is searched (``re.search``) in
    the skip's reason; ``where`` names the test(s); ``why`` says why it is legitimate."""

    pattern: str
    where: str
    why: str

    def matches(self, reason: str) -> bool:
        return re.search(self.pattern, reason) is not None


# The only skips strict mode lets through. Each depends on the machine (Python version,
# file system, kernel) or on a reference server's known variance, never on a tool or
# binding that scripts/test installs, nor on pynbd itself.
ALLOWED_SKIPS: tuple[AllowedSkip, ...] = (
    AllowedSkip(
        r"^TLS-PSK needs Python >= 3\.13 and none is installed",
        "tests/test_tls.py::test_psk_with_qemu_img_and_nbdinfo (fixture psk_python)",
        "pynbd's --tls-psk needs the ssl module's PSK callbacks of Python >= 3.13; without such a "
        "Python the server cannot offer PSK (test_psk_on_old_python_is_a_clear_error checks the "
        "clear error instead)."),
    AllowedSkip(
        r"^could not install pynbd's dependencies for ",
        "tests/test_tls.py::test_psk_with_qemu_img_and_nbdinfo (fixture psk_python)",
        "a Python >= 3.13 exists but pip could not install pynbd's dependencies into a venv for it "
        "(no network or no wheel for that Python): the machine cannot run a PSK server."),
    AllowedSkip(
        r"^this Python supports TLS-PSK$",
        "tests/test_tls.py::test_psk_on_old_python_is_a_clear_error",
        "the test checks the error pynbd gives on Python < 3.13; on 3.13+ there is no such error."),
    AllowedSkip(
        r"^no FIEMAP on this file system$",
        "tests/test_raw_extents.py::test_fiemap_equals_seek, tests/test_zero_allocation.py",
        "the test compares FIEMAP with SEEK_DATA/SEEK_HOLE, or reads a file's allocation with it; a "
        "file system without FIEMAP (tmpfs, some overlays) has nothing to compare (the lseek fallback "
        "is tested separately)."),
    AllowedSkip(
        r"^the file system of \S+ has no FIEMAP$",
        "tests/test_interop_fiemap.py (the --fiemap auto cases)",
        "the FIEMAP path of raw block status can only be reached on a file system that has FIEMAP; "
        "the --fiemap off cases (SEEK_DATA/SEEK_HOLE) still run."),
    AllowedSkip(
        r"^no /dev/shm$",
        "tests/test_raw_extents.py::test_file_system_without_fiemap_falls_back",
        "the test needs a tmpfs (no FIEMAP) to reach the fallback; some containers have no /dev/shm."),
    AllowedSkip(
        r"^/dev/shm supports FIEMAP here$",
        "tests/test_raw_extents.py::test_file_system_without_fiemap_falls_back",
        "newer kernels give tmpfs FIEMAP, and then no file system at hand lacks it."),
    AllowedSkip(
        r"^needs /proc$",
        "tests/test_server.py, tests/test_tls.py (skipif on /proc/self/stat or /proc/self/status)",
        "the tests read a process's counters from /proc, which only Linux with procfs mounted has."),
    AllowedSkip(
        r"^qemu-nbd 7\.2 does not always drain in-flight replies on DISC$",
        "tests/test_conformance.py::test_X23_disc_with_requests_in_flight[qemu-nbd]",
        "an oracle variance: qemu-nbd 7.2 sometimes closes before answering the requests in flight; "
        "the spec's rule is checked on pynbd (the [pynbd] case runs)."),
)


def allowed_skip(reason: str) -> AllowedSkip | None:
    """The :data:`ALLOWED_SKIPS` entry whose pattern matches ``reason``, if any."""
    return next((a for a in ALLOWED_SKIPS if a.matches(reason)), None)


# --------------------------------------------------------------------------
# Strict mode
# --------------------------------------------------------------------------

_TRUE = {"1", "true", "yes", "on"}


def strict_mode() -> str | None:
    """Why strict mode is on ("CI=true", "PYNBD_STRICT=1"), or None when it is off."""
    for var in ("CI", "PYNBD_STRICT"):
        value = os.environ.get(var, "")
        if value.strip().lower() in _TRUE:
            return f"{var}={value}"
    return None


# Where scripts/test gets each binary the markers name (for the failure message).
PACKAGES = {
    "qemu-img": "qemu-utils", "qemu-io": "qemu-utils", "qemu-nbd": "qemu-utils",
    "nbdinfo": "libnbd-bin", "nbdcopy": "libnbd-bin", "nbdsh": "libnbd-bin",
    "libnbd-python": "python3-libnbd", "nbdkit": "nbdkit", "certtool": "gnutls-bin",
    "fio": "fio", "nbd-client": "nbd-client", "strace": "strace",
    "qemu-storage-daemon": "qemu-system-common",
}


@functools.cache
def have(binary: str) -> bool:
    """``binary`` is on PATH; ``"libnbd-python"``: /usr/bin/python3 can ``import nbd``."""
    if binary == "libnbd-python":
        return have_libnbd_python()
    return shutil.which(binary) is not None


def unavailable(reason: str) -> NoReturn:
    """Something a test needs is missing: skip, or in strict mode fail, with ``reason``."""
    why = strict_mode()
    if why:
        pytest.fail(f"{reason}\n[strict mode ({why}): a missing tool or binding, or a pynbd that "
                    f"cannot start, fails the test instead of skipping it]", pytrace=False)
    pytest.skip(reason)


def require(*binaries: str) -> None:
    """Skip (strict mode: fail) unless every binary is there (see :func:`have`)."""
    missing = [b for b in binaries if not have(b)]
    if missing:
        packages = sorted({PACKAGES[b] for b in missing if b in PACKAGES})
        hint = f" (Debian packages: {', '.join(packages)}; scripts/test installs them)" if packages else ""
        unavailable(f"missing binaries: {', '.join(missing)}{hint}")


def require_pynbd() -> None:
    """Skip (strict mode: fail) unless ``python -m pynbd serve --help`` works."""
    problem = pynbd_unavailable_reason()
    if problem:
        unavailable(f"pynbd server not available: {problem}")


# --------------------------------------------------------------------------
# Plugin hooks
# --------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs(*binaries): skip (strict mode: fail) unless these binaries exist")
    config.addinivalue_line("markers", "pynbd: needs a working 'python -m pynbd serve' (else skip; strict: fail)")


def pytest_report_header(config: pytest.Config) -> str:
    why = strict_mode()
    if why:
        return f"pynbd strict mode: on ({why}): only the skips in tests/support/skips.py are allowed"
    return "pynbd strict mode: off (CI=true or PYNBD_STRICT=1 turns it on)"


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs"):
        require(*mark.args)
    if item.get_closest_marker("pynbd"):
        require_pynbd()


def skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    """The reason a skipped report gives (without pytest's "Skipped: " prefix)."""
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text.removeprefix("Skipped: ")


def _is_skip(report: pytest.TestReport | pytest.CollectReport) -> bool:
    return report.skipped and not hasattr(report, "wasxfail")


def _fail_unlisted_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    why = strict_mode()
    if not why or not _is_skip(report):
        return
    reason = skip_reason(report)
    if allowed_skip(reason):
        return
    where = ""
    if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        where = f" (at {report.longrepr[0]}:{report.longrepr[1]})"
    report.outcome = "failed"
    report.longrepr = (f"skipped{where}: {reason}\n[strict mode ({why}): this skip is not one of the "
                       f"allowed skips listed in tests/support/skips.py, so it fails]")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    _fail_unlisted_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    _fail_unlisted_skip(outcome.get_result())


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Sections "allowed skips" (with why each is legitimate) and, outside strict mode,
    the skips strict mode would fail."""
    allowed: dict[AllowedSkip, list[str]] = {}
    unlisted: dict[str, list[str]] = {}
    for report in terminalreporter.stats.get("skipped", []):
        if not _is_skip(report):
            continue
        reason = skip_reason(report)
        entry = allowed_skip(reason)
        if entry:
            allowed.setdefault(entry, []).append(report.nodeid)
        else:
            unlisted.setdefault(reason, []).append(report.nodeid)
    if allowed:
        terminalreporter.section("allowed skips (tests/support/skips.py)")
        for entry, nodeids in allowed.items():
            terminalreporter.line(f"{len(nodeids)} skipped: /{entry.pattern}/ - {entry.why}")
            for nodeid in nodeids:
                terminalreporter.line(f"    {nodeid}")
    if unlisted:
        terminalreporter.section("skips that strict mode (CI=true or PYNBD_STRICT=1) fails")
        for reason, nodeids in unlisted.items():
            terminalreporter.line(f"{len(nodeids)} skipped: {reason}")
            for nodeid in nodeids[:5]:
                terminalreporter.line(f"    {nodeid}")
            if len(nodeids) > 5:
                terminalreporter.line(f"    ... and {len(nodeids) - 5} more")
