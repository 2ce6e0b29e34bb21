"""Strict mode (tests/support/skips.py) does what CI relies on.

Most cases run pytest in a subprocess, with and without ``CI=true`` / ``PYNBD_STRICT=1``:
on a sample module (an unlisted skip, an allowed one, a missing binary, a module-level
skip) and on a real test of the suite with a PATH that lacks nbdinfo. The outcomes are
read from the JUnit XML pytest writes, not from its summary line. The last case checks
that scripts/test installs every binary the suite's needs(...) marks name.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.support.skips import ALLOWED_SKIPS, PACKAGES, allowed_skip

REPO = Path(__file__).resolve().parents[1]

SAMPLE = '''
import pytest

def test_passes():
    pass

def test_unlisted_skip():
    pytest.skip("a reason nobody listed")

def test_allowed_skip():
    pytest.skip("needs /proc")

@pytest.mark.skipif(True, reason="an unlisted skipif")
def test_unlisted_skipif():
    pass

@pytest.mark.needs("pynbd-test-no-such-binary")
def test_missing_binary():
    pass

@pytest.mark.xfail(reason="an xfail is not a skip", strict=True)
def test_xfail():
    assert False
'''

STRICT_ENVS = {"off": {}, "CI=true": {"CI": "true"}, "PYNBD_STRICT=1": {"PYNBD_STRICT": "1"}}


def run_pytest(args: list[str], tmp_path: Path, env_extra: dict[str, str], *, cwd: Path,
               path: str | None = None) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    """``python -m pytest ARGS`` with only ``env_extra`` deciding strict mode; returns the
    process and ``{test name: outcome}`` (passed, failure, error, skipped) from its JUnit XML."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYNBD_STRICT", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = str(REPO)
    env.update(env_extra)
    if path is not None:
        env["PATH"] = path
    xml = tmp_path / "junit.xml"
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-ra",
                        f"--junitxml={xml}", *args], capture_output=True, text=True, env=env, cwd=cwd,
                       timeout=120, stdin=subprocess.DEVNULL)
    outcomes = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[case.get("name", "")] = kinds[0] if kinds else "passed"
    return p, outcomes


def test_plugin_is_loaded(request: pytest.FixtureRequest) -> None:
    """conftest.py loads the plugin for this very run (else nothing below would apply)."""
    assert request.config.pluginmanager.has_plugin("tests.support.skips")


def test_allowed_skips_are_documented() -> None:
    """Every allowed skip says where and why, and no two patterns overlap on the reasons
    the suite uses."""
    for entry in ALLOWED_SKIPS:
        assert entry.where and len(entry.why) > 40, entry
    for reason in ("needs /proc", "no /dev/shm", "/dev/shm supports FIEMAP here", "no FIEMAP on this file system",
                   "this Python supports TLS-PSK",
                   "qemu-nbd 7.2 does not always drain in-flight replies on DISC",
                   "TLS-PSK needs Python >= 3.13 and none is installed (pyenv 3.13 not found)",
                   "could not install pynbd's dependencies for /usr/bin/python3.13: ERROR",
                   "the file system of /tmp/pytest-of-root/pytest-1/test_x0 has no FIEMAP"):
        assert sum(entry.matches(reason) for entry in ALLOWED_SKIPS) == 1, reason
    assert allowed_skip("missing binaries: nbdinfo") is None
    assert allowed_skip("pynbd server not available: 'python -m pynbd serve --help' fails") is None


@pytest.mark.parametrize("strict", list(STRICT_ENVS))
def test_sample_outcomes(tmp_path: Path, strict: str) -> None:
    """Strict: the unlisted skips and the missing binary fail, the allowed skip stays a skip
    and is shown with its reason; off: all of them skip, the unlisted ones shown as such."""
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    p, outcomes = run_pytest(["-p", "tests.support.skips", "test_sample.py"], tmp_path, STRICT_ENVS[strict],
                             cwd=tmp_path)
    out = p.stdout + p.stderr
    assert "allowed skips (tests/support/skips.py)" in out and "procfs" in out, out
    if strict == "off":
        assert p.returncode == 0, out
        assert outcomes == {"test_passes": "passed", "test_unlisted_skip": "skipped", "test_allowed_skip": "skipped",
                            "test_unlisted_skipif": "skipped", "test_missing_binary": "skipped",
                            "test_xfail": "skipped"}, out
        assert "skips that strict mode (CI=true or PYNBD_STRICT=1) fails" in out
        assert "a reason nobody listed" in out and "pynbd-test-no-such-binary" in out
    else:
        assert p.returncode == 1, out
        assert outcomes == {"test_passes": "passed", "test_unlisted_skip": "failure", "test_allowed_skip": "skipped",
                            "test_unlisted_skipif": "error", "test_missing_binary": "error",
                            "test_xfail": "skipped"}, out
        assert f"strict mode ({strict})" in out
        assert "missing binaries: pynbd-test-no-such-binary" in out
        assert "skips that strict mode" not in out


def test_module_level_skip_fails_collection(tmp_path: Path) -> None:
    """A module skipped at collection (importorskip, allow_module_level) fails in strict mode."""
    (tmp_path / "test_gone.py").write_text(
        'import pytest\npytest.skip("an unlisted module skip", allow_module_level=True)\n'
        "def test_never():\n    pass\n")
    p, _ = run_pytest(["-p", "tests.support.skips", "test_gone.py"], tmp_path, {"CI": "true"}, cwd=tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode not in (0, 5), out
    assert "an unlisted module skip" in out and "strict mode (CI=true)" in out, out


@pytest.mark.needs("qemu-img", "qemu-io", "qemu-nbd")
@pytest.mark.parametrize("strict", ["off", "CI=true"])
def test_missing_tool_in_the_suite(tmp_path: Path, strict: str) -> None:
    """A real test of the suite with nbdinfo missing from PATH (the other tools there):
    it skips, and with CI=true it fails naming nbdinfo and its package."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("qemu-img", "qemu-io", "qemu-nbd"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    node = "tests/test_interop_qcow2.py::test_corrupt_bit_refused_at_start"
    p, outcomes = run_pytest([node], tmp_path, STRICT_ENVS[strict], cwd=REPO, path=str(bin_dir))
    out = p.stdout + p.stderr
    if strict == "off":
        assert (p.returncode, outcomes) == (0, {"test_corrupt_bit_refused_at_start": "skipped"}), out
    else:
        assert (p.returncode, outcomes) == (1, {"test_corrupt_bit_refused_at_start": "error"}), out
        assert "missing binaries: nbdinfo (Debian packages: libnbd-bin" in out and "strict mode (CI=true)" in out


def test_scripts_test_installs_every_needed_binary() -> None:
    """Every binary a needs(...) mark of the suite names has a Debian package in PACKAGES,
    and scripts/test installs each of those packages: strict mode in CI fails on nothing
    that scripts/test could have installed."""
    script = (REPO / "scripts" / "test").read_text()
    match = re.search(r"^apt_packages=\(([^)]*)\)", script, re.M)
    assert match, "scripts/test: no apt_packages=(...) line"
    installed = set(match.group(1).split())
    assert set(PACKAGES.values()) <= installed, set(PACKAGES.values()) - installed
    named = set()
    for source in (REPO / "tests").rglob("*.py"):
        if source.name != Path(__file__).name:
            for args in re.findall(r"\bneeds\(([^)]*)\)", source.read_text()):
                named.update(re.findall(r'"([^"]+)"', args))
    assert "nbdinfo" in named and "libnbd-python" in named  # the scan finds the marks
    assert named <= set(PACKAGES), named - set(PACKAGES)
