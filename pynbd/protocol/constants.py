"""Every NBD constant pynbd uses (values from the NBD spec, doc/proto.md)."""

from __future__ import annotations

import enum

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", first 8 bytes of the greeting
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT", newstyle greeting and every option
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

DEFAULT_PORT = 10809

#: Largest READ/WRITE payload (qemu's NBD_MAX_BUFFER_SIZE); advertised as the maximum block size.
MAX_PAYLOAD = 32 * 1024 * 1024
#: Block sizes advertised in NBD_INFO_BLOCK_SIZE, as qemu-nbd with buffered I/O (NBD spec "Size constraints").
BLOCK_SIZE_MINIMUM = 1
BLOCK_SIZE_PREFERRED = 4096
BLOCK_SIZE_MAXIMUM = MAX_PAYLOAD
#: Strings (names, queries) must be at most this long (NBD spec "Conventions").
MAX_STRING = 4096
#: Largest option payload we read; options larger than this disconnect (a denial of service,
#: NBD spec "Termination of the session during option haggling"; qemu uses 32 MiB).
MAX_OPTION_LENGTH = 1024 * 1024
#: Descriptors per block status chunk (the spec asks for at most 2^20, NBD_REPLY_TYPE_BLOCK_STATUS in
#: "Structured reply types"; qemu caps at 131072).
MAX_EXTENTS_PER_CHUNK = 131072
#: Error messages in chunks stay under the 1000-byte payload qemu's client accepts in a chunk other than
#: OFFSET_DATA.
MAX_ERROR_MESSAGE = 800


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 0x0001
    NO_ZEROES = 0x0002


class ClientFlag(enum.IntFlag):
    C_FIXED_NEWSTYLE = 0x1
    C_NO_ZEROES = 0x2


class Option(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Reply(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = 0x80000001
    ERR_POLICY = 0x80000002
    ERR_INVALID = 0x80000003
    ERR_PLATFORM = 0x80000004
    ERR_TLS_REQD = 0x80000005
    ERR_UNKNOWN = 0x80000006
    ERR_SHUTDOWN = 0x80000007
    ERR_BLOCK_SIZE_REQD = 0x80000008
    ERR_TOO_BIG = 0x80000009
    ERR_EXT_HEADER_REQD = 0x8000000A


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 0x0001
    READ_ONLY = 0x0002
    SEND_FLUSH = 0x0004
    SEND_FUA = 0x0008
    ROTATIONAL = 0x0010
    SEND_TRIM = 0x0020
    SEND_WRITE_ZEROES = 0x0040
    SEND_DF = 0x0080
    CAN_MULTI_CONN = 0x0100
    SEND_RESIZE = 0x0200
    SEND_CACHE = 0x0400
    SEND_FAST_ZERO = 0x0800
    BLOCK_STATUS_PAYLOAD = 0x1000


class Command(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CommandFlag(enum.IntFlag):
    FUA = 0x01
    NO_HOLE = 0x02
    DF = 0x04
    REQ_ONE = 0x08
    FAST_ZERO = 0x10
    PAYLOAD_LEN = 0x20


class Error(enum.IntEnum):
    """Transmission error values (not host errno values)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class ReplyType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = 0x8001
    ERROR_OFFSET = 0x8002


class ReplyFlag(enum.IntFlag):
    DONE = 0x0001


class AllocationState(enum.IntFlag):
    """``base:allocation`` status bits (NBD spec "`base:allocation` metadata context")."""

    HOLE = 0x1
    ZERO = 0x2


DIRTY = 0x1  # qemu:dirty-bitmap:NAME status bit (QEMU docs/interop/nbd.rst, "qemu namespace")


# Plain-int copies for the per-request path: ``int & IntFlag`` builds a new enum
# object every time, which the per-request path would feel.
FLAG_FUA = int(CommandFlag.FUA)
FLAG_NO_HOLE = int(CommandFlag.NO_HOLE)
FLAG_DF = int(CommandFlag.DF)
FLAG_REQ_ONE = int(CommandFlag.REQ_ONE)
FLAG_FAST_ZERO = int(CommandFlag.FAST_ZERO)
TFLAG_READ_ONLY = int(TransmissionFlag.READ_ONLY)
TFLAG_SEND_DF = int(TransmissionFlag.SEND_DF)
TFLAG_SEND_FAST_ZERO = int(TransmissionFlag.SEND_FAST_ZERO)
CFLAG_FIXED_NEWSTYLE = int(ClientFlag.C_FIXED_NEWSTYLE)
CFLAG_NO_ZEROES = int(ClientFlag.C_NO_ZEROES)
# Commands and reply codes too: looking an enum member up on its class costs ~40 ns on
# Python 3.11 (no specialization for class attributes), and a request did several.
CMD_READ = int(Command.READ)
CMD_WRITE = int(Command.WRITE)
CMD_DISC = int(Command.DISC)
CMD_BLOCK_STATUS = int(Command.BLOCK_STATUS)
REPLY_DONE = int(ReplyFlag.DONE)
REPLY_TYPE_NONE = int(ReplyType.NONE)
REPLY_TYPE_OFFSET_DATA = int(ReplyType.OFFSET_DATA)
REPLY_TYPE_OFFSET_HOLE = int(ReplyType.OFFSET_HOLE)
REPLY_TYPE_BLOCK_STATUS = int(ReplyType.BLOCK_STATUS)
REPLY_TYPE_ERROR = int(ReplyType.ERROR)
REPLY_TYPE_ERROR_OFFSET = int(ReplyType.ERROR_OFFSET)
