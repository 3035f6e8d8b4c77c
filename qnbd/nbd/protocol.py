"""Numbers and wire layouts of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md).

Everything is big-endian ("network byte order", proto.md "Conventions"). Layouts are
precompiled `struct.Struct`s so the hot path only calls pack/unpack_from.
"""

import errno
import struct

# --- Handshake phase (proto.md "Newstyle negotiation", "Fixed newstyle negotiation") ---
NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x0003E889045565A9

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# Option types ("Option types").
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11   # proto.md (extension-ext-header) "NBD_OPT_EXTENDED_HEADERS"

# Option reply types ("Option reply types"); errors have bit 31 set.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
_REP_ERR = 1 << 31
REP_ERR_UNSUP = _REP_ERR | 1
REP_ERR_POLICY = _REP_ERR | 2
REP_ERR_INVALID = _REP_ERR | 3
REP_ERR_PLATFORM = _REP_ERR | 4
REP_ERR_TLS_REQD = _REP_ERR | 5
REP_ERR_UNKNOWN = _REP_ERR | 6
REP_ERR_SHUTDOWN = _REP_ERR | 7
REP_ERR_BLOCK_SIZE_REQD = _REP_ERR | 8
REP_ERR_TOO_BIG = _REP_ERR | 9
REP_ERR_EXT_HEADER_REQD = _REP_ERR | 10

# NBD_REP_INFO types.
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Transmission flags ("Transmission flags").
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11
FLAG_BLOCK_STATUS_PAYLOAD = 1 << 12

# --- Transmission phase ---
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REQUEST_MAGIC = 0x21E41C71
EXTENDED_REPLY_MAGIC = 0x6E8A278C

# Request types ("Request types").
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

# Command flags ("Command flags").
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
CMD_FLAG_PAYLOAD_LEN = 1 << 5    # extended headers only: `length` bytes of payload follow

# Structured reply flags and chunk types ("Structured reply types").
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_BLOCK_STATUS_EXT = 6
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# Error values ("Error values"). They equal Linux errno numbers by design, but the
# protocol restricts them to this set, so anything else is reported as EIO.
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

_ERRNO_TO_NBD = {
    errno.EPERM: EPERM, errno.EROFS: EPERM, errno.EIO: EIO, errno.ENOMEM: ENOMEM,
    errno.EINVAL: EINVAL, errno.ENOSPC: ENOSPC, errno.EDQUOT: ENOSPC, errno.EFBIG: ENOSPC,
    errno.EOVERFLOW: EOVERFLOW, errno.ENOTSUP: ENOTSUP, errno.ESHUTDOWN: ESHUTDOWN,
}


def nbd_error(code: int | None) -> int:
    """Map a host errno onto the protocol's restricted set (EDQUOT/EFBIG are ENOSPC)."""
    return _ERRNO_TO_NBD.get(code, EIO)


# Size constraints ("Size constraints"): the defaults every client can rely on.
MIN_BLOCK_SIZE = 1
PREFERRED_BLOCK_SIZE = 4096
MAX_PAYLOAD = 32 * 1024 * 1024   # advertised in NBD_INFO_BLOCK_SIZE
# Strings (names, descriptions, context queries) are at most 4096 bytes ("Conventions").
MAX_STRING = 4096

# --- Wire layouts ---
GREETING = struct.Struct(">QQH")              # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")          # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")          # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")       # size, transmission flags (+124 zeroes)
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
INFO_EXPORT_PAYLOAD = struct.Struct(">HQH")    # INFO_EXPORT, size, transmission flags
INFO_BLOCK_SIZE_PAYLOAD = struct.Struct(">HIII")  # INFO_BLOCK_SIZE, min, preferred, max
REQUEST = struct.Struct(">IHHQQI")             # magic, flags, type, cookie, offset, length
EXT_REQUEST = struct.Struct(">IHHQQQ")         # the same with a 64-bit length
SIMPLE_REPLY = struct.Struct(">IIQ")           # magic, error, cookie
STRUCTURED_REPLY = struct.Struct(">IHHQI")     # magic, flags, type, cookie, payload length
EXT_REPLY = struct.Struct(">IHHQQQ")           # magic, flags, type, cookie, offset, length
OFFSET = struct.Struct(">Q")                   # OFFSET_DATA prefix
OFFSET_HOLE = struct.Struct(">QI")             # offset, hole length
ERROR_CHUNK = struct.Struct(">IH")             # error, message length
BLOCK_DESCRIPTOR = struct.Struct(">II")        # extent length, status flags
BLOCK_STATUS_EXT_HEAD = struct.Struct(">II")   # context id, descriptor count
BLOCK_DESCRIPTOR_EXT = struct.Struct(">QQ")    # 64-bit extent length, 64-bit flags
U64 = struct.Struct(">Q")
