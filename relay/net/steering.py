"""UDP listeners split by what a datagram carries, so that on the native data plane a STUN
request never crosses threads.

The native data plane's thread reads a UDP listener, relays ChannelData and Send indications
and hands every other datagram (Allocate, Refresh, CreatePermission, ChannelBind, Binding) to
the reactor's thread through a queue and an eventfd.  Each such hand-over wakes two threads
where the Python data plane wakes one: measured on the Allocate path, two more context
switches a cycle and a quarter more CPU.  So each UDP listener is bound twice per process
(SO_REUSEPORT), and a classic BPF program on the group (SO_ATTACH_REUSEPORT_CBPF, no privilege
needed) picks the socket per datagram: ChannelData (first byte 0x40-0x7F) and Send indications
(type 0x0016) to the data plane's socket, everything else to the reactor's.  With N worker
processes the group holds 2N sockets, and the program also picks the worker, by a hash of the
client's address and port, so every datagram of a client reaches the same worker, as the
kernel's own SO_REUSEPORT hash did.

The program reads the payload (the kernel has pulled the UDP header) and, through
SKF_NET_OFF, the IP header for the source address and port.  A datagram too short for a load
ends the program with 0: the first worker's reactor socket, which answers or drops it as
before.  Where the kernel refuses the program, the listener is bound once per process, as
without a data plane of its own.
"""
from __future__ import annotations

import ctypes
import socket
import struct
from typing import List

from relay.proto.stun import SEND_INDICATION

SO_ATTACH_REUSEPORT_CBPF = 51  # <asm-generic/socket.h>; not in Python's socket module
_NET = -0x100000  # SKF_NET_OFF: loads relative to the IP header

# Classic BPF opcodes (<linux/filter.h>), only those the program uses.
_LDX_IMM, _LDXB_MSH = 0x01, 0xB1
_LDW_ABS, _LDH_ABS, _LDB_ABS, _LDH_IND = 0x20, 0x28, 0x30, 0x48
_ADD_K, _MUL_K, _RSH_K, _LSH_K, _MOD_K, _XOR_X = 0x04, 0x24, 0x74, 0x64, 0x94, 0xAC
_JEQ_K, _JGE_K = 0x15, 0x35
_TAX, _TXA, _RET_A = 0x07, 0x87, 0x16


def _insn(code: int, jt: int = 0, jf: int = 0, k: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


def program(processes: int, ipv6: bool) -> List[bytes]:
    """The steering program for a group of `2 * processes` sockets bound in the order
    process 0's reactor socket, process 0's data-plane socket, process 1's, ..."""
    return [
        # X = the UDP header's offset from the IP header: IPv4's IHL, IPv6's fixed 40 (the
        # sockets are IPV6_V6ONLY: no IPv4 here; extension headers are not followed).
        _insn(_LDX_IMM, k=40) if ipv6 else _insn(_LDXB_MSH, k=_NET),
        _insn(_LDH_IND, k=_NET),  # A = the source port
        _insn(_MUL_K, k=0x9E3779B1),
        _insn(_TAX),
        _insn(_LDW_ABS, k=_NET + (20 if ipv6 else 12)),  # the source address's last 32 bits
        _insn(_XOR_X),
        _insn(_MUL_K, k=0x85EBCA6B),
        _insn(_RSH_K, k=16),
        _insn(_MOD_K, k=processes),
        _insn(_LSH_K, k=1),
        _insn(_TAX),  # X = 2 * the process
        _insn(_LDB_ABS, k=0),
        _insn(_JGE_K, 3, 0, 0x80),  # 0x80 and up: neither STUN nor ChannelData (to "reactor")
        _insn(_JGE_K, 4, 0, 0x40),  # 0x40-0x7F: ChannelData (to "data plane")
        _insn(_LDH_ABS, k=0),
        _insn(_JEQ_K, 2, 0, SEND_INDICATION),
        # reactor:
        _insn(_TXA),
        _insn(_RET_A),
        # data plane:
        _insn(_TXA),
        _insn(_ADD_K, k=1),
        _insn(_RET_A),
    ]


def attach(sock: socket.socket, processes: int) -> None:
    """Attach the steering program to `sock`'s SO_REUSEPORT group (OSError if refused)."""
    code = b"".join(program(processes, sock.family == socket.AF_INET6))
    buffer = ctypes.create_string_buffer(code, len(code))  # the kernel copies it
    fprog = struct.pack("HP", len(code) // 8, ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
