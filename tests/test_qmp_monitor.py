"""``pynbd serve --qmp PATH`` against qemu-storage-daemon 7.2's monitor, and beside NBD clients.

The oracle is a running qemu-storage-daemon (tests/support/qmp.py): the same bytes go to
both monitors, and the answers must be the same lines once the version is masked (the
version pynbd reports is its own: 7.2.0, package "pynbd X"). Where pynbd departs on
purpose (several clients at once; its own command set), the test says so.

The rest checks what only pynbd has: clients at once, events, a client that never reads
or sends too much (NBD clients and other monitors go on), ``quit`` (exit 0, bitmaps
stored, sockets removed), the socket's mode and its refusal of a live path.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from pynbd import __version__
from pynbd.qmp.basic import PYNBD_QMP_VERSION, register
from pynbd.qmp.monitor import QmpMonitor, bind_monitor_socket
from pynbd.qmp.registry import (
    BOOL, STR, UINT32, Alternate, CommandRegistry, Enum, List, Member, QmpError, Struct, Union,
)
from tests.support.deadline import DEADLINE, wait_for_log
from tests.support.qmp import (
    NEGOTIATE, QsdServer, RawQmp, exchange, first_difference, masked, pynbd_with_qmp, wait_gone,
)
from tests.support.servers import REPO_ROOT, make_raw_image, nbdcopy, nbdinfo, run

MiB = 1 << 20

pytestmark = [pytest.mark.needs("qemu-storage-daemon", "qemu-img"), pytest.mark.timeout(180)]


def qcow2(path: Path, size: str = "64M") -> Path:
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size])
    return path


@pytest.fixture(scope="module")
def qsd(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("qsd")
    with QsdServer(qcow2(workdir / "disk.qcow2"), workdir=workdir) as server:
        yield server


@pytest.fixture(scope="module")
def pynbd(tmp_path_factory):
    """pynbd with a monitor and no image (exports would come from QMP)."""
    workdir = tmp_path_factory.mktemp("pynbd")
    with pynbd_with_qmp(None, workdir=workdir) as server:
        yield server


def both(qsd, pynbd, pieces, *, negotiate: bool = True) -> None:
    theirs = exchange(qsd.qmp_path, pieces, negotiate=negotiate)
    ours = exchange(pynbd.qmp_path, pieces, negotiate=negotiate)
    assert ours == theirs, first_difference(ours, theirs)


def request(command: str, arguments=None, **extra) -> bytes:
    message = {"execute": command, **extra}
    if arguments is not None:
        message["arguments"] = arguments
    return json.dumps(message).encode()


# --- the same answers as qemu-storage-daemon -----------------------------------------------------


@pytest.mark.pynbd
def test_greeting_has_qsds_shape(qsd, pynbd):
    with RawQmp(qsd.qmp_path) as theirs, RawQmp(pynbd.qmp_path) as ours:
        qemu_greeting, pynbd_greeting = json.loads(theirs.greeting), json.loads(ours.greeting)
        assert masked(ours.greeting) == masked(theirs.greeting)
    assert pynbd_greeting["QMP"]["capabilities"] == qemu_greeting["QMP"]["capabilities"] == ["oob"]
    assert pynbd_greeting["QMP"]["version"] == {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                                "package": f"pynbd {__version__}"}
    assert qemu_greeting["QMP"]["version"]["qemu"]["major"] == 7


CASES = {
    "before negotiation": (False, [
        request("query-version", id=1), request("nope"), b'{"foo": 1}', b'{"execute": 1}', b"[]", b"1 ",
        b"garbage ", b'{"exec-oob": "qmp_capabilities"}', b'{"id": "x"}',
        request("qmp_capabilities", {"x": 1}), request("qmp_capabilities", {"enable": ["foo"]}),
        request("qmp_capabilities", {"enable": "oob"}), request("qmp_capabilities", {"enable": ["oob", 1]}),
        b'{"execute": "qmp_capabilities", "arguments": []}',
        request("qmp_capabilities", {"enable": ["oob"]}, id="n"), request("query-version", id=2),
    ]),
    "negotiation twice": (True, [request("qmp_capabilities", id=1), request("qmp_capabilities", {"enable": ["x"]}),
                                 request("query-version")]),
    "request errors": (True, [
        request("nope", id="x"), request("query-version", {"x": 1}), b'{}', b'{"id": 1}',
        b'{"arguments": 1, "execute": 2}', b'{"x": 1, "y": 2, "execute": 2, "arguments": 1}',
        b'{"execute": "query-version", "arguments": []}', b'{"exec-oob": "query-version", "id": 3}',
        b'{"execute": "query-version", "exec-oob": "query-version"}', request("quit", {"now": True}),
        request("query-version", {k: 1 for k in ("node", "name", "granularity", "persistent", "x", "y", "z")}),
    ]),
    "oob enabled": (False, [
        request("qmp_capabilities", {"enable": ["oob"]}), b'{"exec-oob": "query-version", "id": 1}',
        b'{"exec-oob": "nope", "id": 2}', b'{"exec-oob": "query-version", "execute": "query-version", "id": 3}',
        b'{"exec-oob": 1}']),
    "id echo": (True, [request("query-version", id=value) for value in (
        0, -7, 1.5, 0.1, -0.0, 1e300, 18446744073709551615, "s\u00e9\U0001F600/\x00", True, False, None,
        [1, {"a": [], "b": {}}], {"x": {"y": [None]}})] + [
        b'{"execute": "query-version", "id": 1e400}', b'{"execute": "query-version", "id": 18446744073709551616}',
        b'{"execute": "query-version", "id": -9223372036854775809}',
        b"{'execute': 'query-version', 'id': 'a\"b\\'c'}", b'{"execute": "query-version", "id": "\xc0\x80\xc3\xa9"}',
        b'{"execute": "nope", "id": [1, 2]}']),
    "no newline between requests": (True, [request("query-version", id=1) + request("query-version", id=2)
                                           + request("nope", id=3)]),
    "split across sends": (True, [b'{"execute": "query-ver', b'sion", "id"', b': [1, 2', b"]}", b"12", b"3 ",
                                  b'"ab', b'c"']),
    "one byte per send": (True, [bytes([b]) for b in request("query-version", id="bytes") + b" [1, @] "]),
    "garbage then a request": (True, [b"garbage" + request("query-version", id=1), b"@@@ " + request("nope"),
                                      b'"abc\x01" ' + request("query-version", id=2),
                                      b"\xfe" + request("query-version", id=3)]),
    "parse errors": (True, [b'{"a": 1,} {1: 2} {"a"} {"a":} {"a" 1} [1 2] [1,] 2 "x" true nul\n',
                            b'"\\x" "\\u12" "\\ud800" "\\ufffe" "\xc0\x80" "\xc3" "\xed\xa0\x80" 01 1. -x 1e\n',
                            b'[}] {"a": ]} {"a": 1, "a": 2} {"id": [TRUE]}\n']),
    "nesting limit": (True, [b"[" * 1024 + b"]" * 1024, b"[" * 1025 + b"]" * 1025,
                             b'[{"a":' * 513 + b"1" + b"}]" * 513]),
}


@pytest.mark.pynbd
@pytest.mark.parametrize("case", sorted(CASES))
def test_same_answers_as_qsd(qsd, pynbd, case):
    negotiate, pieces = CASES[case]
    both(qsd, pynbd, pieces, negotiate=negotiate)


FRAGMENTS = [b"{", b"}", b"[", b"]", b":", b",", b" ", b"\n", b"\t", b'"a"', b"'b'", b'"\\u00e9"', b'"\\ud83d\\ude00"',
             b'"\\x"', b'"', b"'", b"\\", b"1", b"-", b"0", b".5", b"e3", b"true", b"nul", b"garbage", b"@",
             b"\x00", b"\x01", b"\xc3\xa9", b"\xc3", b"\xff", b"\xc0\x80", b'{"execute": "query-version"}', b'"id"',
             b'"execute"', b'"arguments"', b'"query-version"', b'"qmp_capabilities"', b'"exec-oob"', b'"enable"',
             b'"oob"', b"null", b"1e400", b"-0.0", b"18446744073709551616"]


@pytest.mark.pynbd
@pytest.mark.parametrize("seed", range(4))
def test_random_streams_same_answers_as_qsd(qsd, pynbd, seed):
    """Seeded random byte soups from JSON fragments, garbage and requests, each cut into
    random pieces: every answer equal to qsd's."""
    rng = random.Random(seed)
    for _ in range(40):
        stream = b"".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 40)))
        cuts = sorted(rng.sample(range(len(stream) + 1), min(3, len(stream) + 1)))
        pieces = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
        both(qsd, pynbd, pieces, negotiate=rng.random() < 0.7)


KEYS = ["execute", "exec-oob", "arguments", "id", "x", "enable", "aa", "zz", "node"]
COMMANDS = ["qmp_capabilities", "query-version", "nope"]


def random_value(rng: random.Random, depth: int = 0):
    choice = rng.random()
    if depth < 2 and choice < 0.2:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if depth < 2 and choice < 0.35:
        return {rng.choice(KEYS): random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return rng.choice([None, True, 0, -1, 1.5, 1 << 40, (1 << 64) - 1, "oob", "x", "\u00e9", ["oob"], ["x"],
                       *COMMANDS])


def random_request(rng: random.Random) -> bytes:
    message = {}
    for _ in range(rng.randint(0, 4)):
        key = rng.choice(KEYS)
        if key in ("execute", "exec-oob") and rng.random() < 0.8:
            message[key] = rng.choice(COMMANDS)
        elif key == "arguments" and rng.random() < 0.8:
            message[key] = {rng.choice(KEYS): random_value(rng) for _ in range(rng.randint(0, 3))}
        else:
            message[key] = random_value(rng)
    return json.dumps(message, ensure_ascii=rng.random() < 0.5).encode()


@pytest.mark.pynbd
@pytest.mark.parametrize("seed", range(3))
def test_random_requests_same_answers_as_qsd(qsd, pynbd, seed):
    """Seeded random requests, valid and not, before and after negotiation."""
    rng = random.Random(seed)
    for _ in range(40):
        both(qsd, pynbd, [random_request(rng) for _ in range(rng.randint(1, 6))], negotiate=rng.random() < 0.6)


@pytest.mark.pynbd
def test_query_commands_lists_like_qsd(qsd, pynbd):
    """CommandInfo objects, newest command first: the basic commands come last, in qsd's order."""
    names = {}
    for server in (qsd, pynbd):
        with RawQmp(server.qmp_path) as client:
            client.send(NEGOTIATE)
            client.read_line()
            names[server.kind] = [c["name"] for c in client.execute("query-commands")["return"]]
    basic = ["quit", "query-commands", "query-version", "qmp_capabilities"]
    assert names["pynbd"][-4:] == basic
    assert [n for n in names["qsd"] if n in basic] == basic


#: Inputs too big for qemu-storage-daemon to take in on every run (it reads its monitor one
#: byte per main-loop turn), with the answers it gave to each (qemu-storage-daemon 7.2.22,
#: run by hand), up to the marker's.
LIMIT_CASES = {
    "2 Mi + 1 tokens": ([b"[" + b"1," * 1048575 + b"1]"], ["JSON token count limit exceeded"]),
    "2 Mi tokens": ([b"[" + b"1," * 1048574 + b"1]"], ["QMP input must be a JSON object"]),
    "64 MiB of tokens": ([b'["' + b"a" * (64 * MiB - 5) + b'"]'], ["QMP input must be a JSON object"]),
    "64 MiB + 1 of tokens": ([b'["' + b"a" * (64 * MiB - 4) + b'"]'], ["JSON token size limit exceeded"]),
    "a token over 64 MiB": ([b'"' + b"a" * (64 * MiB + 5), b'" {"execute":"query-version","id":"X"}\n'], [
        "JSON token size limit exceeded", "JSON parse error, invalid keyword 'aaaaa'",
        "QMP input must be a JSON object", "JSON parse error, invalid keyword 'execute'",
        "QMP input must be a JSON object", "JSON parse error, invalid keyword 'query'",
        "JSON parse error, stray '-v'", "JSON parse error, expecting value", "QMP input must be a JSON object",
        "JSON parse error, expecting value", "QMP input must be a JSON object", "JSON parse error, expecting value"]),
}


@pytest.mark.pynbd
@pytest.mark.parametrize("case", sorted(LIMIT_CASES))
def test_token_limits_as_qsd_answered(pynbd, case):
    """QEMU's limits per value: 2 Mi tokens, 64 MiB of token text, one token of 64 MiB."""
    pieces, expected = LIMIT_CASES[case]
    errors = [json.loads(line)["error"]["desc"] for line in exchange(pynbd.qmp_path, pieces)[2:]]
    assert errors == expected


# --- argument validation against QEMU's, command by command ------------------------------------

BITMAP_ADD = (Member("node", STR), Member("name", STR), Member("granularity", UINT32, optional=True),
              Member("persistent", BOOL, optional=True), Member("disabled", BOOL, optional=True))
BITMAP_OR_STR = Alternate("BlockDirtyBitmapOrStr", (STR, Struct("BlockDirtyBitmap", BITMAP_ADD[:2])))
TRANSACTION = (
    Member("actions", List(Union(
        "TransactionAction", (Member("type", Enum("TransactionActionKind", (
            "abort", "block-dirty-bitmap-add", "block-dirty-bitmap-remove"))),),
        discriminator="type", branches={
            "abort": (Member("data", Struct("Abort")),),
            "block-dirty-bitmap-add": (Member("data", Struct("BlockDirtyBitmapAdd", BITMAP_ADD)),),
            "block-dirty-bitmap-remove": (Member("data", Struct("BlockDirtyBitmap", BITMAP_ADD[:2])),)}))),
    Member("properties", Struct("TransactionProperties", (
        Member("completion-mode", Enum("ActionCompletionMode", ("individual", "grouped")), optional=True),)),
        optional=True),
)
#: Argument schemas of qsd 7.2 commands, as QAPI declares them (enough to check messages).
SCHEMAS = {
    "block-dirty-bitmap-add": BITMAP_ADD,
    "block-dirty-bitmap-merge": (Member("node", STR), Member("target", STR), Member("bitmaps", List(BITMAP_OR_STR))),
    "transaction": TRANSACTION,
    "block-export-del": (Member("id", STR), Member("mode", Enum("BlockExportRemoveMode", ("safe", "hard")),
                                                  optional=True)),
}


def bad_arguments(rng: random.Random, command: str) -> dict:
    """Arguments with one or more problems (or none): missing, wrong types, extra members."""
    valid = {
        "block-dirty-bitmap-add": {"node": "nonexistent", "name": "b", "granularity": 65536, "persistent": True},
        "block-dirty-bitmap-merge": {"node": "nonexistent", "target": "t",
                                     "bitmaps": ["a", {"node": "nonexistent", "name": "b"}]},
        "transaction": {"actions": [{"type": "block-dirty-bitmap-add",
                                     "data": {"node": "nonexistent", "name": "b"}}]},
        "block-export-del": {"id": "nonexistent", "mode": "safe"},
    }[command]
    arguments = json.loads(json.dumps(valid))
    junk = [1, -1, 1 << 32, 1.0, "x", True, None, [], {}, ["x", 2], [{"type": "abort", "zz": 1}], {"node": 1}]
    for _ in range(rng.randint(1, 3)):
        action = rng.random()
        if action < 0.3 and arguments:
            del arguments[rng.choice(sorted(arguments))]
        elif action < 0.7:
            arguments[rng.choice(sorted(valid))] = rng.choice(junk)
        else:
            for _ in range(rng.randint(1, 12)):
                arguments[rng.choice(["x", "y", "zz", "aa", "w", "alpha", "k1", "k2", "k3", "k4", "mode", "q"])] = 0
    return arguments


def test_validation_messages_same_as_qsd(qsd):
    """Command.validate() on QAPI's schemas gives qsd's message for seeded random bad
    arguments (several unexpected members included: QEMU names the first in its hash
    table's order). Argument errors come before the command runs, in both."""
    rng = random.Random(5)
    cases = [(command, bad_arguments(rng, command)) for command in sorted(SCHEMAS) for _ in range(40)]
    registry = CommandRegistry()
    for command, members in SCHEMAS.items():
        registry.add(command, lambda context, **arguments: None, members)
    with RawQmp(qsd.qmp_path) as client:
        client.send(NEGOTIATE)
        client.read_line()
        for command, arguments in cases:
            answer = client.execute(command, arguments)
            try:
                registry.get(command).validate(arguments)
                ours = None
            except QmpError as error:
                ours = error.desc
            if ours is None:  # valid: qsd runs it (and fails on the missing node or export)
                desc = answer.get("error", {}).get("desc", "")
                assert not desc.startswith(("Parameter '", "Invalid parameter type")), (arguments, answer)
            else:
                assert answer == {"error": {"class": "GenericError", "desc": ours}}, (command, arguments)


# --- pynbd's own behaviour -------------------------------------------------------------------


async def qmp_client(path: str | Path, name: str = "test") -> QMPClient:
    client = QMPClient(name)
    await client.connect(str(path))
    return client


@pytest.mark.pynbd
def test_several_clients_at_once(pynbd):
    """qsd serves one monitor client at a time; pynbd any number, each with its own state."""
    async def scenario() -> None:
        clients = [await qmp_client(pynbd.qmp_path, f"c{i}") for i in range(4)]
        with RawQmp(pynbd.qmp_path) as raw:  # connected, never negotiates
            answers = await asyncio.gather(*(c.execute("query-version") for c in clients for _ in range(5)))
            assert all(a == PYNBD_QMP_VERSION.to_qapi() for a in answers)
            assert raw.execute("query-version")["error"]["class"] == "CommandNotFound"
        for client in clients:
            await client.disconnect()
    asyncio.run(scenario())


def monitor_test(scenario, registry: CommandRegistry, tmp_path: Path) -> None:
    """Run ``scenario(monitor)`` with an in-process monitor serving ``registry``."""
    async def main() -> None:
        monitor = QmpMonitor(bind_monitor_socket(str(tmp_path / "qmp.sock")), registry, PYNBD_QMP_VERSION)
        await monitor.start()
        try:
            await scenario(monitor)
        finally:
            await monitor.close()
    asyncio.run(main())
    assert not (tmp_path / "qmp.sock").exists()


def test_events_go_to_negotiated_clients(tmp_path):
    registry = CommandRegistry()
    register(registry)

    def emit(context, name: str) -> None:
        context.emit_event(name, {"node": "disk0", "client": context.client})
    registry.add("x-emit", emit, (Member("name", STR),))

    async def scenario(monitor: QmpMonitor) -> None:
        first, second = await qmp_client(monitor.path, "a"), await qmp_client(monitor.path, "b")
        loop = asyncio.get_running_loop()
        raw = await loop.run_in_executor(None, RawQmp, monitor.path)
        try:
            with first.listener() as first_events, second.listener() as second_events:
                await first.execute("x-emit", {"name": "TEST_EVENT"})
                monitor.emit_event("OTHER")  # an event from outside any command
                for events in (first_events, second_events):
                    event = await asyncio.wait_for(events.get(), 30)
                    assert event["event"] == "TEST_EVENT"
                    assert event["data"] == {"node": "disk0", "client": "qmp#1"}
                    assert set(event["timestamp"]) == {"seconds", "microseconds"}
                    assert "data" not in await asyncio.wait_for(events.get(), 30)
            # The client that never negotiated got nothing before its own answer.
            assert await loop.run_in_executor(None, raw.sync) == []
        finally:
            raw.close()
            await first.disconnect()
            await second.disconnect()
    monitor_test(scenario, registry, tmp_path)


def test_commands_run_one_at_a_time_in_order(tmp_path):
    """A command that awaits holds back every other client's commands until it is done,
    as QEMU's one dispatcher does; a client's requests run in the order sent."""
    registry = CommandRegistry()
    register(registry)
    release = asyncio.Event()
    ran: list[str] = []

    async def slow(context) -> str:
        ran.append("slow started")
        await release.wait()
        ran.append("slow done")
        return "slow"

    def fast(context, tag: str) -> str:
        ran.append(tag)
        return tag
    registry.add("x-slow", slow)
    registry.add("x-fast", fast, (Member("tag", STR),))

    async def scenario(monitor: QmpMonitor) -> None:
        loop = asyncio.get_running_loop()

        def connect_and_negotiate() -> RawQmp:
            client = RawQmp(monitor.path)
            client.send(NEGOTIATE)
            assert json.loads(client.read_line()) == {"return": {}}
            return client
        second = await loop.run_in_executor(None, connect_and_negotiate)
        first = await qmp_client(monitor.path)
        slow_answer = asyncio.ensure_future(first.execute("x-slow"))
        while ran != ["slow started"]:
            await asyncio.sleep(0.01)

        def send_fast_ones() -> bytes:
            second.send(b"garbage " + b"".join(request("x-fast", {"tag": f"t{i}"}) for i in range(3)))
            return second.read_line()  # a parse error needs no command: answered at once
        error = await loop.run_in_executor(None, send_fast_ones)
        assert json.loads(error)["error"]["desc"] == "JSON parse error, invalid keyword 'garbage'"
        for _ in range(100):
            await asyncio.sleep(0)  # the next request is dispatched, and must wait
        assert ran == ["slow started"]
        release.set()
        assert await slow_answer == "slow"
        lines = await loop.run_in_executor(None, lambda: [second.read_line() for _ in range(3)])
        assert [json.loads(line)["return"] for line in lines] == ["t0", "t1", "t2"]
        assert ran == ["slow started", "slow done", "t0", "t1", "t2"]
        second.close()
        await first.disconnect()
    monitor_test(scenario, registry, tmp_path)


def test_requests_sent_before_end_of_input_are_answered(tmp_path):
    """A client may send its requests and shut its side down (socat, a shell pipe)."""
    registry = CommandRegistry()
    register(registry)

    async def scenario(monitor: QmpMonitor) -> None:
        def talk() -> list[bytes]:
            with RawQmp(monitor.path) as client:
                client.send(NEGOTIATE + request("query-version", id=1) + b"garbage " + request("nope", id=2))
                client.sock.shutdown(socket.SHUT_WR)
                return client.read_until_eof()
        lines = await asyncio.get_running_loop().run_in_executor(None, talk)
        assert [json.loads(line).get("id") for line in lines] == [None, 1, None, 2]
    monitor_test(scenario, registry, tmp_path)


@pytest.mark.pynbd
@pytest.mark.needs("nbdcopy", "qemu-io")
def test_bad_monitor_clients_do_not_affect_nbd_clients_or_other_monitors(tmp_path):
    """While one monitor client floods garbage and never reads, another sends a string
    past QEMU's 64 MiB token limit, and a third connects and never says anything, an NBD
    client copies the export (correctly) and a fourth monitor client is answered; the
    flooder is dropped once its unread answers pass the output limit."""
    image = make_raw_image(tmp_path / "disk.raw", 32 * MiB,
                           ["write -P 0x5a 0 1M", "write -P 0xa5 17M 3M", "write -P 0x11 31M 1M"])
    with pynbd_with_qmp(image, "-v", workdir=tmp_path) as server:
        silent = RawQmp(server.qmp_path)
        flooder = RawQmp(server.qmp_path)
        flooder.send(NEGOTIATE)
        flooder_cut = threading.Event()
        big_sender = RawQmp(server.qmp_path)
        big_done = threading.Event()

        def flood() -> None:
            try:
                while True:
                    flooder.send(b"]" * 65536)  # one error answer per byte, never read
            except OSError:
                flooder_cut.set()

        def send_big() -> None:
            big_sender.send(b'"' + b"a" * (100 * MiB))
            big_done.set()
        threads = [threading.Thread(target=flood, daemon=True), threading.Thread(target=send_big, daemon=True)]
        for thread in threads:
            thread.start()
        rounds = 0
        give_up = time.monotonic() + DEADLINE
        while rounds < 2 or not (flooder_cut.is_set() and big_done.is_set()):  # copies overlap the abuse
            rounds += 1
            copy = tmp_path / "copy.raw"
            nbdcopy(server.uri, str(copy), timeout=120)
            assert copy.read_bytes() == image.read_bytes()
            with RawQmp(server.qmp_path) as other:
                other.send(NEGOTIATE)
                assert json.loads(other.read_line()) == {"return": {}}
                assert other.execute("query-version")["return"] == PYNBD_QMP_VERSION.to_qapi()
            assert time.monotonic() < give_up, (f"after {DEADLINE} s: flooder cut off: {flooder_cut.is_set()}, "
                                                f"big string sent: {big_done.is_set()}")
        wait_for_log(server, "dropped:")
        big_sender.send(b'" ' + request("query-version", id="after"))
        assert [json.loads(line)["error"]["desc"] for line in big_sender.sync()[:1]] == \
            ["JSON token size limit exceeded"]
        assert nbdinfo("--size", server.uri).strip() == str(32 * MiB)
        for client in (silent, flooder, big_sender):
            client.close()


@pytest.mark.pynbd
@pytest.mark.needs("qemu-io")
def test_quit_stops_cleanly_like_qsd(tmp_path):
    """quit answers {}, then the process exits 0 and removes its sockets, as qsd; and the
    stop is pynbd's clean one: a bitmap dirtied over NBD is stored, not left in use."""
    image = qcow2(tmp_path / "disk.qcow2")
    run(["qemu-img", "bitmap", "--add", str(image), "b0"])

    # qsd configured as pynbd serves the image: its node exported as "" under id disk0.
    with QsdServer(qcow2(tmp_path / "qsd.qcow2"), "--export", "type=nbd,id=disk0,node-name=disk0,name=,writable=on",
                   workdir=tmp_path) as qsd, pynbd_with_qmp(image, workdir=tmp_path) as server:
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x33 1M 64k", server.uri])
        for process in (qsd, server):
            with RawQmp(process.qmp_path) as client:
                client.send(NEGOTIATE + request("quit", id="q"))
                negotiated, event, answer = client.read_until_eof()
                assert (negotiated, answer) == (b'{"return": {}}', b'{"return": {}, "id": "q"}')
                # The export goes first, as an event (its timestamp differs).
                assert json.loads(event)["event"] == "BLOCK_EXPORT_DELETED"
                assert json.loads(event)["data"] == {"id": "disk0"}
            assert process.wait_exit() == 0, process.log()
            wait_gone(process.qmp_path)
        assert not Path(server.socket).exists()
    info = json.loads(run(["qemu-img", "info", "--output=json", str(image)]).stdout)
    bitmaps = info["format-specific"]["data"]["bitmaps"]
    assert [(b["name"], b["flags"]) for b in bitmaps] == [("b0", ["auto"])]
    out = run(["qemu-img", "map", "--output=json", "--image-opts",
               f"driver=qcow2,file.driver=file,file.filename={image}"]).stdout
    assert any(e["start"] == 1 * MiB and e["data"] for e in json.loads(out))


def serve(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "pynbd", "serve", *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd=cwd, stdin=subprocess.DEVNULL)


@pytest.mark.pynbd
def test_monitor_socket_mode_and_refusals(tmp_path, pynbd):
    assert stat.S_IMODE(os.stat(pynbd.qmp_path).st_mode) == 0o600
    # A live path: refused with one line, exit code 2; the running monitor is untouched.
    refused = serve("--qmp", pynbd.qmp_path, "--socket", str(tmp_path / "n.sock"), cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"pynbd: error: cannot listen on {pynbd.qmp_path}: another process is listening there"]
    with RawQmp(pynbd.qmp_path) as client:
        assert json.loads(client.greeting)["QMP"]["capabilities"] == ["oob"]
    # Not a socket: refused.
    (tmp_path / "file").write_text("x")
    refused = serve("--qmp", str(tmp_path / "file"), "--socket", str(tmp_path / "n.sock"), cwd=tmp_path)
    assert refused.returncode == 2 and "exists and is not a socket" in refused.stderr
    assert (tmp_path / "file").read_text() == "x"
    # No image and no --qmp: nothing to serve.
    refused = serve("--socket", str(tmp_path / "n.sock"), cwd=tmp_path)
    assert refused.returncode == 2 and "nothing to serve" in refused.stderr


@pytest.mark.pynbd
@pytest.mark.needs("nbdinfo")
def test_stale_socket_is_replaced_and_no_image_means_no_exports(tmp_path):
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(stale))  # a socket file nobody listens on any more
    with pynbd_with_qmp(None, workdir=tmp_path, qmp_path=stale) as server:
        assert stat.S_IMODE(os.stat(server.qmp_path).st_mode) == 0o600
        listing = nbdinfo("--list", "--json", f"nbd+unix://?socket={server.socket}")
        assert json.loads(listing)["exports"] == []
        with RawQmp(server.qmp_path) as client:
            client.send(NEGOTIATE)
            assert json.loads(client.read_line()) == {"return": {}}
