#!/usr/bin/env python3
"""A WebSocket opened on the connection an NTLM login authenticated, like a browser opening
Windows Admin Center or a SignalR hub on an IIS site with Windows authentication.

One keep-alive HTTP connection: Type1 -> 401 + Type2 -> Type3 -> 200 (pyspnego computes the
NTLMv2 response), then `GET PATH` with `Upgrade: websocket` on the same socket, then MESSAGES
text messages, each read back from the echo server, then a close.

The WebSocket framing (RFC 6455) is written here because the client must take over the socket
http.client authenticated; only the few frames this test needs (masked text and close frames
from the client, unmasked frames from the server) are handled.

Usage: ws_after_ntlm_client.py HOST PORT USER PASSWORD PATH [--source IP] [--messages N]
Prints one JSON line: {"login_status", "login_body", "upgrade_status", "upgrade_head", "echoes"}.
"""

import argparse
import base64
import hashlib
import json
import os
import struct
import sys

from ntlm_http import connection, login, ntlm_client

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("user")
    parser.add_argument("password")
    parser.add_argument("path")
    parser.add_argument("--source")
    parser.add_argument("--messages", type=int, default=3)
    args = parser.parse_args()

    conn = connection(args.host, args.port, args.source)
    client = ntlm_client(args.user, args.password, args.host)
    status, body = login(conn, "/login", client)
    result = {"login_status": status, "login_body": body}
    if status != 200:
        print(json.dumps(result))
        return 0

    sock = conn.sock
    key = base64.b64encode(os.urandom(16))
    sock.sendall(
        b"GET " + args.path.encode() + b" HTTP/1.1\r\n"
        b"Host: " + args.host.encode() + b"\r\n"
        b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    lines = head.decode(errors="replace").split("\r\n")
    upgrade_status = int(lines[0].split()[1]) if len(lines[0].split()) > 1 else 0
    result["upgrade_status"] = upgrade_status
    result["upgrade_head"] = lines
    expected = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
    accept = [l.split(":", 1)[1].strip() for l in lines if l.lower().startswith("sec-websocket-accept:")]
    result["accept_ok"] = accept == [expected]
    echoes = []
    if upgrade_status == 101:
        for i in range(args.messages):
            text = f"message {i} through the gateway"
            sock.sendall(_frame(0x1, text.encode()))
            opcode, payload = _read_frame(sock)
            echoes.append(payload.decode(errors="replace") if opcode == 0x1 else f"opcode {opcode}")
        sock.sendall(_frame(0x8, struct.pack("!H", 1000)))
        opcode, _ = _read_frame(sock)
        result["close_opcode"] = opcode
    result["echoes"] = echoes
    print(json.dumps(result))
    return 0


def _frame(opcode: int, payload: bytes) -> bytes:
    """A final, masked client frame (payloads under 64 KiB)."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def _read_exactly(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed mid-frame")
        data += chunk
    return data


def _read_frame(sock):
    b0, b1 = _read_exactly(sock, 2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", _read_exactly(sock, 2))
    elif n == 127:
        (n,) = struct.unpack("!Q", _read_exactly(sock, 8))
    return b0 & 0x0F, _read_exactly(sock, n)


if __name__ == "__main__":
    sys.exit(main())
