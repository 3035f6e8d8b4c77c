"""Run a command where io_uring cannot be set up, as under a container's seccomp profile
(Docker's default one refuses io_uring_setup): `python nouring.py ERRNO COMMAND...`.

A seccomp filter, installed with prctl (no library needed), makes io_uring_setup fail
with ERRNO (1 EPERM, 38 ENOSYS) for this process and what it executes; every other system
call is allowed. Only x86_64's system call number is known here: elsewhere it allows all.
"""

import ctypes
import os
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
AUDIT_ARCH_X86_64 = 0xC000003E
NR_IO_URING_SETUP = 425   # x86_64 (include/uapi/asm-generic/unistd.h has the same number)
# classic BPF opcodes (linux/filter.h)
LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06


def install(error: int) -> None:
    program = [                                      # struct seccomp_data: nr at 0, arch at 4
        (LD_W_ABS, 0, 0, 4),
        (JEQ_K, 0, 3, AUDIT_ARCH_X86_64),            # another architecture: allow
        (LD_W_ABS, 0, 0, 0),
        (JEQ_K, 0, 1, NR_IO_URING_SETUP),
        (RET_K, 0, 0, SECCOMP_RET_ERRNO | error),
        (RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
    code = b"".join(struct.pack("=HBBI", *insn) for insn in program)
    filters = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("=HxxxxxxQ", len(program), ctypes.addressof(filters))
    prog = ctypes.create_string_buffer(fprog, len(fprog))
    libc = ctypes.CDLL(None, use_errno=True)
    for args in ((PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
                 (PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0)):
        if libc.prctl(*[ctypes.c_ulong(a) for a in args]) != 0:
            raise OSError(ctypes.get_errno(), "prctl")


if __name__ == "__main__":
    install(int(sys.argv[1]))
    os.execvp(sys.argv[2], sys.argv[2:])
