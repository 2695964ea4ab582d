#!/usr/bin/env python3
"""A real NTLM client (pyspnego) that logs in once and keeps its connection: Type1 -> 401 + Type2 ->
Type3 on one keep-alive HTTP connection, then one more GET on that same connection (without any
Authorization header) for every line read on stdin, until stdin closes.

Usage: ntlm_keepalive_client.py HOST PORT PATH USER PASSWORD [--source IP]
Prints one JSON line per response: {"status": ..., "body": ..., "local_port": ...}; a failed
request prints {"error": ...} and ends the client.
"""

import argparse
import http.client
import json
import sys

from ntlm_http import connection, login, ntlm_client, request


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("path")
    parser.add_argument("user")
    parser.add_argument("password")
    parser.add_argument("--source")
    args = parser.parse_args()

    conn = connection(args.host, args.port, args.source)
    conn.connect()
    # No automatic reconnection: a request on a closed connection must fail, not open a new one.
    conn.auto_open = 0
    local_port = conn.sock.getsockname()[1]
    client = ntlm_client(args.user, args.password, args.host)
    status, body = login(conn, args.path, client)
    report(status, body, local_port)
    for line in sys.stdin:
        path = line.strip() or args.path
        try:
            status, body, _ = request(conn, path)
        except (OSError, http.client.HTTPException) as e:
            print(json.dumps({"error": repr(e)}), flush=True)
            return 1
        if conn.sock is None:
            print(json.dumps({"error": "the server closed the connection"}), flush=True)
            return 1
        report(status, body, local_port)
    return 0


def report(status, body, local_port):
    print(json.dumps({"status": status, "body": body, "local_port": local_port}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
