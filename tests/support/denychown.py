"""Run a command with chown(2) and its kin refused (EPERM) by a seccomp filter, as the units'
``SystemCallFilter=~@privileged`` with ``SystemCallErrorNumber=EPERM`` refuses them
(x86_64 system call numbers): ``python denychown.py COMMAND ARGS...``."""

from __future__ import annotations

import ctypes
import os
import struct
import sys

CHOWN_CALLS = (92, 93, 94, 260)  # chown, fchown, lchown, fchownat on x86_64
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
RET_ALLOW, RET_ERRNO, EPERM = 0x7FFF0000, 0x00050000, 1
LOAD_NR, JUMP_IF_EQUAL, RETURN = 0x20, 0x15, 0x06  # BPF: ld [0] (the call's number); jeq k; ret k


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def deny_chown() -> None:
    code = [(LOAD_NR, 0, 0, 0)]
    code += [(JUMP_IF_EQUAL, len(CHOWN_CALLS) - i, 0, nr) for i, nr in enumerate(CHOWN_CALLS)]
    code += [(RETURN, 0, 0, RET_ALLOW), (RETURN, 0, 0, RET_ERRNO | EPERM)]
    raw = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in code))
    program = _Program(len(code), ctypes.cast(raw, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) or libc.prctl(
            PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(program), 0, 0):
        raise OSError(ctypes.get_errno(), "cannot install the seccomp filter")


if __name__ == "__main__":
    deny_chown()
    os.execvp(sys.argv[1], sys.argv[1:])
