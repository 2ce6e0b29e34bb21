"""The ``pynbd`` command line: parses arguments, builds exports, starts the server.

Every user error (bad option, missing image, busy port) is one line on stderr
and exit code 2, never a traceback; ``pynbd bitmap`` operations that fail exit 1,
as ``qemu-img bitmap`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
from pathlib import Path
from collections.abc import Sequence
from typing import Any, NoReturn

from pynbd import __version__
from pynbd.image import open_image
from pynbd.image.base import ImageError
from pynbd.protocol.constants import DEFAULT_PORT
from pynbd.server.settings import ConnectionSettings
from pynbd.server.exports import ExportConfig, open_exports
from pynbd.server.lookahead import DEFAULT_POLL_WINDOW_NS
from pynbd.server.process import LoopUnavailable, event_loop_factory, tune_for_serving
from pynbd.certs import ensure_default_creds
from pynbd.protocol.handshake import TlsMode
from pynbd.qmp import standard_registry
from pynbd.qmp.basic import PYNBD_QMP_VERSION
from pynbd.qmp.monitor import QmpMonitor, bind_monitor_socket
from pynbd.qmp.nodes import NodeTable
from pynbd.server.server import (
    ListenAddress,
    ListenError,
    NbdServer,
    export_uris,
    hold_stop_signals,
    listen,
    systemd_sockets,
)
from pynbd.server.tls import TlsConfig, TlsSetupError, read_authz, read_psk_file
from pynbd.tools.bitmap import BitmapRequest, change_bitmaps, format_bitmap_list, format_bitmaps_json
from pynbd.tools.create import FORMATS, PREALLOC_MODES, CreateError, CreateOptions, create_image
from pynbd.tools.map import format_map_human, format_map_json, human_map_complete, image_map, layer_paths

log = logging.getLogger("pynbd")

EXIT_USAGE = 2


class UsageError(Exception):
    """A user error: printed as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# --- serve -------------------------------------------------------------------------


def _export_spec(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not path:
        raise argparse.ArgumentTypeError(f"--export wants NAME=PATH, got {text!r}")
    return name, path


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _poll_us(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"must be 0 to 1000 microseconds, got {text!r}")
    return value


def add_serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve", help="serve images over NBD",
        description="Serve one or more images over NBD. Stops cleanly on SIGTERM/SIGINT.",
    )
    p.add_argument("image", nargs="?", help="image to serve (raw or qcow2, probed)")
    p.add_argument("-x", "--name", default="", help='export name (default "", as qemu-nbd)')
    p.add_argument("-D", "--description", default="", help="export description shown by nbdinfo")
    p.add_argument("--export", action="append", type=_export_spec, default=[], metavar="NAME=PATH",
                   help="serve PATH as export NAME; repeatable, for several exports in one process")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-k", "--socket", metavar="PATH", help="listen on a unix socket")
    where.add_argument("-b", "--bind", metavar="HOST", default=None, help="TCP address (default 127.0.0.1)")
    p.add_argument("-p", "--port", type=int, default=None, help=f"TCP port (default {DEFAULT_PORT})")
    p.add_argument("-r", "--read-only", action="store_true", help="refuse writes")
    p.add_argument("-s", "--snapshot", action="store_true",
                   help="writes go to a temporary qcow2 overlay, deleted at exit; the image is not changed")
    p.add_argument("-f", "--format", choices=["raw", "qcow2"], help="image format (default: probe)")
    p.add_argument("-B", "--bitmap", action="append", metavar="NAME",
                   help="export only these persistent bitmaps (default: all valid ones)")
    p.add_argument("-e", "--shared", type=int, default=0, metavar="N",
                   help="at most N simultaneous connections (0 = unlimited, the default)")
    p.add_argument("--handshake-timeout", type=_positive_float, default=10.0, metavar="S",
                   help="drop clients that do not finish the handshake in S seconds (default 10)")
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default=None,
                   help="event loop (default uvloop when installed)")
    p.add_argument("--zero-copy", choices=["auto", "on", "off"], default="auto",
                   help="send READ data with sendfile (on), by copying (off), or as measured best (auto: "
                        "sendfile from 16 KiB)")
    p.add_argument("--fiemap", choices=["auto", "off"], default="auto",
                   help="raw block status from FIEMAP where the file system has it (auto), "
                        "or from SEEK_DATA/SEEK_HOLE only (off)")
    p.add_argument("--max-requests", type=int, default=32, metavar="N",
                   help="requests in flight per connection before reading stops (default 32)")
    p.add_argument("--poll-us", type=_poll_us, default=DEFAULT_POLL_WINDOW_NS // 1000, metavar="US",
                   help="poll up to US microseconds for a lone client's next request, after a "
                        "one-extent block-status reply (QEMU's scans) or a READ with nothing else "
                        "in flight, while it answers that fast, instead of sleeping; 0: never "
                        f"(default {DEFAULT_POLL_WINDOW_NS // 1000})")
    tls = p.add_argument_group("TLS")
    tls.add_argument("--tls", action="store_true",
                     help="require TLS; without --tls-creds, credentials are generated on first use")
    tls.add_argument("--tls-optional", action="store_true",
                     help="offer TLS but also accept plain clients (for migrations); implies --tls")
    tls.add_argument("--tls-creds", metavar="DIR",
                     help="ca-cert.pem, server-cert.pem, server-key.pem (qemu tls-creds-x509 layout)")
    tls.add_argument("--tls-state-dir", metavar="DIR",
                     help="where --tls keeps generated credentials (default $XDG_STATE_HOME/pynbd/tls)")
    tls.add_argument("--tls-verify-peer", action="store_true",
                     help="require a client certificate signed by the CA")
    tls.add_argument("--tls-authz", action="append", default=[], metavar="DN|@FILE",
                     help="allowed client subject (e.g. 'O=pynbd,CN=backup'); repeatable; @FILE: one per line")
    tls.add_argument("--tls-psk", metavar="FILE", help="TLS-PSK keys, username:hexkey per line (Python >= 3.13)")
    p.add_argument("--node-name", metavar="NAME",
                   help="the QMP node name of IMAGE (default: the export name, or disk0 for the export \"\"); "
                        "its file node is NAME-file")
    p.add_argument("--qmp", metavar="PATH",
                   help="QMP control socket (unix, mode 0600) speaking as qemu-storage-daemon's monitor; "
                        "with it IMAGE may be left out: exports then come from QMP")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for protocol detail)")
    p.set_defaults(func=cmd_serve)


def export_configs(args: argparse.Namespace) -> list[ExportConfig]:
    bitmaps = tuple(args.bitmap) if args.bitmap else None
    fiemap = args.fiemap == "auto"
    configs = []
    if args.image:
        configs.append(ExportConfig(args.name, args.image, args.description, args.read_only,
                                    args.format, bitmaps, fiemap, args.snapshot))
    for name, path in args.export:
        configs.append(ExportConfig(name, path, "", args.read_only, args.format, bitmaps, fiemap,
                                    args.snapshot))
    if not configs and not args.qmp:
        raise UsageError("nothing to serve: give an IMAGE, --export NAME=PATH or --qmp PATH")
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise UsageError(f"export names must be unique, got {names}")
    return configs


def listen_sockets(args: argparse.Namespace) -> list:
    activated = systemd_sockets()
    if activated:
        return activated
    if args.socket:
        if args.port is not None:
            raise UsageError("--port does not go with --socket")
        return [listen(ListenAddress(unix_path=args.socket))]
    port = DEFAULT_PORT if args.port is None else args.port
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port} is out of range")
    return [listen(ListenAddress(host=args.bind or "127.0.0.1", port=port))]


def tls_settings(args: argparse.Namespace, sockets: Sequence[Any]) -> tuple[TlsMode, Any]:
    """TLS mode and the STARTTLS upgrade function the connections use."""
    wanted = args.tls or args.tls_optional or args.tls_creds or args.tls_psk
    if not wanted:
        if args.tls_verify_peer or args.tls_authz:
            raise UsageError("--tls-verify-peer/--tls-authz need --tls")
        return TlsMode.OFF, None
    creds_dir = Path(args.tls_creds) if args.tls_creds else None
    if creds_dir is None and not args.tls_psk:
        generated = ensure_default_creds(Path(args.tls_state_dir) if args.tls_state_dir else None)
        creds_dir = generated.server_dir
        log.info("TLS credentials %s in %s", "created" if generated.created else "reused", generated.server_dir)
        for sock in sockets:
            for uri in export_uris(sock, [""], tls=True):
                log.info("connect with: nbdinfo '%s%stls-certificates=%s'", uri,
                         "&" if "?" in uri else "?", generated.client_dir)
        log.info("or: qemu-img info --object tls-creds-x509,id=tls0,endpoint=client,dir=%s "
                 "--image-opts driver=nbd,%s,tls-creds=tls0", generated.client_dir,
                 _qemu_server_opts(sockets[0]) if sockets else "...")
    config = TlsConfig(
        creds_dir=creds_dir,
        verify_peer=args.tls_verify_peer,
        authz=read_authz(args.tls_authz),
        psk=read_psk_file(args.tls_psk) if args.tls_psk else {},
    )
    mode = TlsMode.OPTIONAL if args.tls_optional else TlsMode.REQUIRED
    return mode, config.upgrader()


def _qemu_server_opts(sock: Any) -> str:
    import socket as socket_mod

    if sock.family == socket_mod.AF_UNIX:
        # No host name to check the certificate against on a unix socket.
        return f"server.type=unix,server.path={sock.getsockname()},tls-hostname=localhost"
    host, port = sock.getsockname()[:2]
    return f"server.type=inet,server.host={host},server.port={port}"


def cmd_serve(args: argparse.Namespace) -> int:
    configs = export_configs(args)
    try:
        factory = event_loop_factory(args.loop)
    except LoopUnavailable as exc:
        raise UsageError(str(exc)) from None
    exports = open_exports(configs)
    qmp_socket = None
    try:
        hold_stop_signals()
        if args.qmp:
            qmp_socket = bind_monitor_socket(args.qmp)
        sockets = listen_sockets(args)
        tls_mode, tls_upgrade = tls_settings(args, sockets)
        settings = ConnectionSettings(
            tls_mode=tls_mode,
            tls_upgrade=tls_upgrade,
            handshake_timeout=args.handshake_timeout,
            zero_copy={"on": True, "off": False, "auto": None}[args.zero_copy],
            max_requests=max(1, args.max_requests),
            poll_window_ns=args.poll_us * 1000,
        )

        async def main() -> None:
            server = NbdServer(exports, sockets, settings, max_connections=args.shared)
            if qmp_socket is not None:
                node_names = {configs[0].name: args.node_name} if args.node_name and configs else {}
                server.nodes = NodeTable(exports, node_names)
                monitor = QmpMonitor(qmp_socket, standard_registry(), PYNBD_QMP_VERSION, server=server,
                                     request_stop=server.stop)
                server.add_service(monitor)
            try:
                await server.serve()
            finally:
                if server.nodes is not None:
                    server.nodes.close()  # (the images of the command line's exports too)

        tune_for_serving(settings.max_inflight_bytes)
        with asyncio.Runner(loop_factory=factory) as runner:
            log.info("pynbd %s on %s", __version__, type(runner.get_loop()).__module__.split(".")[0])
            runner.run(main())
    finally:
        for export in exports:
            export.close()
        if qmp_socket is not None:
            qmp_socket.release()
    log.info("stopped")
    return 0


# --- offline tools --------------------------------------------------------------------


def add_map_parser(sub: Any) -> None:
    p = sub.add_parser("map", help="print an image's allocation map, like qemu-img map")
    p.add_argument("image")
    p.add_argument("-f", "--format", choices=["raw", "qcow2"])
    p.add_argument("--output", choices=["human", "json"], default="human")
    p.set_defaults(func=cmd_map)


def cmd_map(args: argparse.Namespace) -> int:
    with open_image(args.image, args.format, read_only=True) as image:
        records = image_map(image)
        paths = layer_paths(image)
    if args.output == "json":
        print(format_map_json(records), end="")
    else:
        print(format_map_human(records, paths), end="", flush=True)
        if not human_map_complete(records):
            # qemu-img map fails the same way ("File contains external, encrypted or
            # compressed clusters."): a compressed cluster has no host offset to show.
            raise UsageError(f"{args.image}: contains compressed clusters, which have no host offset; "
                             "use --output json")
    return 0


class _BitmapOperation(argparse.Action):
    """Appends ``(operation, argument)`` to ``operations``: the order given is the order applied."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        namespace.operations = [*namespace.operations, (self.const, values or None)]


def add_bitmap_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bitmap", help="list or change an image's persistent dirty bitmaps",
        description="Without BITMAP: list IMAGE's persistent dirty bitmaps. With BITMAP: apply the "
                    "operations to it in the order given, as qemu-img bitmap does, but all or nothing: "
                    "on an error the image is left unchanged and the exit code is 1.",
    )
    p.add_argument("image")
    p.add_argument("bitmap", nargs="?")
    p.add_argument("--list", action="store_true", default=True, help="list bitmaps (the default without BITMAP)")
    p.add_argument("--output", choices=["human", "json"], default=None, help="listing format (default human)")
    p.add_argument("-f", "--format", choices=["raw", "qcow2"], help="image format (default: probe)")
    p.set_defaults(operations=[], func=cmd_bitmap)
    ops = p.add_argument_group("operations on BITMAP (several apply in the order given)")
    for op, help_text in (("add", "add the bitmap (recording writes)"), ("remove", "remove the bitmap"),
                          ("clear", "clear every bit"), ("enable", "record writes"),
                          ("disable", "stop recording writes")):
        ops.add_argument(f"--{op}", action=_BitmapOperation, nargs=0, const=op, help=help_text)
    ops.add_argument("--merge", action=_BitmapOperation, const="merge", metavar="SOURCE",
                     help="set the bits of bitmap SOURCE (of IMAGE, or of -b SOURCE_FILE)")
    ops.add_argument("-g", dest="granularity", metavar="GRANULARITY",
                     help="with --add: bytes per bit, a power of 2 from 512 to 2G (default: the cluster "
                          "size within 4K..64K)")
    ops.add_argument("-b", dest="source_file", metavar="SOURCE_FILE", help="with --merge: the image holding SOURCE")
    ops.add_argument("-F", dest="source_format", choices=["raw", "qcow2"], metavar="SOURCE_FMT",
                     help="the format of SOURCE_FILE (default: probe)")


#: ``pynbd bitmap`` with operations fails with qemu-img bitmap's exit code.
EXIT_BITMAP_FAILED = 1


def cmd_bitmap(args: argparse.Namespace) -> int:
    changing = args.bitmap is not None or args.operations or args.granularity is not None \
        or args.source_file is not None or args.source_format is not None
    if not changing:
        with open_image(args.image, args.format, read_only=True) as image:
            infos = list(image.bitmap_infos())
        print(format_bitmaps_json(infos) if args.output == "json" else format_bitmap_list(infos), end="")
        return 0
    if args.output is not None:
        raise UsageError("--output goes with the listing only (no BITMAP, no operations)")
    request = BitmapRequest(args.image, args.bitmap, args.operations, args.format, args.granularity,
                            args.source_file, args.source_format)
    try:
        change_bitmaps(request)
    except ImageError as exc:
        print(f"pynbd: error: {exc}", file=sys.stderr)
        return EXIT_BITMAP_FAILED
    return 0


_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)
_UNITS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}


def _size(text: str) -> int:
    """``512``, ``64K``, ``10M``, ``1G``, ``2TiB`` -> bytes (binary units, like qemu-img)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 512, 64K, 10M, 1G)")
    value = int(match[1]) << _UNITS[match[2].upper()]
    if value >= 1 << 63:
        raise argparse.ArgumentTypeError(f"size {text!r} out of range")
    return value


def add_create_parser(sub: Any) -> None:
    p = sub.add_parser(
        "create", help="create a raw or qcow2 image",
        description="Create IMAGE as qemu-img create does: raw (sparse unless preallocated) or "
                    "qcow2 v3 (-f qcow2, the default for names ending in .qcow2). SIZE may be left "
                    "out when a backing file gives it; qcow2 sizes are rounded up to 512 bytes.",
    )
    p.add_argument("image")
    p.add_argument("size", type=_size, nargs="?", help="size, e.g. 1G (default: the backing file's)")
    p.add_argument("-f", "--format", choices=FORMATS, help="image format (default: by the name)")
    p.add_argument("-b", "--backing", metavar="BACKING",
                   help="qcow2 backing file, stored as given (relative to IMAGE's directory)")
    p.add_argument("-F", "--backing-format", choices=FORMATS, help="backing file format (default: probed)")
    p.add_argument("--cluster-size", type=_size, metavar="N", help="qcow2 cluster size, 512 to 2M (default 64K)")
    p.add_argument("--extended-l2", action="store_true", help="qcow2 extended L2 entries (subclusters)")
    p.add_argument("--preallocation", choices=PREALLOC_MODES, default="off",
                   help="off, metadata (qcow2), falloc or full (default off)")
    p.set_defaults(func=cmd_create)


def cmd_create(args: argparse.Namespace) -> int:
    options = CreateOptions(
        fmt=args.format, size=args.size, backing=args.backing, backing_format=args.backing_format,
        cluster_size=args.cluster_size, extended_l2=args.extended_l2, preallocation=args.preallocation,
    )
    try:
        created = create_image(args.image, options)
    except CreateError as exc:
        raise UsageError(str(exc)) from None
    print(f"created {args.image}: {created.describe()}")
    return 0


def add_certs_parser(sub: Any) -> None:
    p = sub.add_parser(
        "certs", help="create a CA, server and client certificates for TLS",
        description="Create DIR/ca (the CA; keep ca-key.pem private), DIR/server (for --tls-creds) "
                    "and DIR/client-NAME (for nbdinfo tls-certificates= / qemu tls-creds-x509 dir=). "
                    "An existing CA in DIR/ca is reused.",
    )
    p.add_argument("dir")
    p.add_argument("--hostname", action="append", default=[], metavar="NAME",
                   help="server DNS name or IP address (repeatable; default localhost, this host, 127.0.0.1, ::1)")
    p.add_argument("--client", action="append", default=[], metavar="CN",
                   help="issue a client certificate with this common name (repeatable)")
    p.add_argument("--organization", default="pynbd", help="O= of client certificates (default pynbd)")
    p.add_argument("--days", type=int, default=3650)
    p.set_defaults(func=cmd_certs)


def cmd_certs(args: argparse.Namespace) -> int:
    import ipaddress

    from pynbd import certs

    base = Path(args.dir)
    ca_dir = base / "ca"
    if (ca_dir / certs.CA_KEY).exists():
        ca = certs.CertificateAuthority.load(ca_dir)
    else:
        ca = certs.CertificateAuthority.create(days=args.days)
        ca.save(ca_dir)
    if args.hostname:
        dns, ips = [], []
        for name in args.hostname:
            try:
                ipaddress.ip_address(name)
                ips.append(name)
            except ValueError:
                dns.append(name)
    else:
        dns, ips = certs.default_server_names()
    certs.write_server_creds(base / "server", ca, dns, ips, days=args.days)
    print(f"server credentials: {base / 'server'}  (pynbd serve ... --tls-creds {base / 'server'})")
    for cn in args.client:
        subject = certs.write_client_creds(base / f"client-{cn}", ca, cn, args.organization, days=args.days)
        dn = ",".join(a.rfc4514_string() for rdn in subject.rdns for a in rdn)
        print(f"client credentials: {base / f'client-{cn}'}  (subject {dn})")
    return 0


# --- entry point ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="pynbd", description="An NBD server for raw and qcow2 images.")
    parser.add_argument("--version", action="version", version=f"pynbd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    add_serve_parser(sub)
    add_map_parser(sub)
    add_bitmap_parser(sub)
    add_create_parser(sub)
    add_certs_parser(sub)
    return parser


def setup_logging(verbosity: int) -> None:
    level = logging.DEBUG if verbosity > 0 else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbosity < 2:
        logging.getLogger("pynbd.protocol").setLevel(max(level, logging.INFO))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", 0))
    try:
        return args.func(args)
    except (UsageError, ImageError, ListenError, TlsSetupError) as exc:
        print(f"pynbd: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 0
