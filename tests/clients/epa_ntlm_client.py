#!/usr/bin/env python3
"""An NTLM client with Extended Protection: pyspnego computes the NTLMv2 response with the
tls-server-end-point channel binding (RFC 5929) of the certificate this TLS connection received,
the way Windows clients do. One keep-alive HTTPS connection: Type1 -> 401 + Type2 -> Type3.

Usage: epa_ntlm_client.py URL USER PASSWORD --ca-file PEM [--server-name NAME] [--source IP]
Prints one JSON line: {"status": ..., "body": ..., "binding_hash": ...}.
"""

import argparse
import http.client
import json
import ssl
import sys
import urllib.parse

import spnego
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from ntlm_http import login, ntlm_client


def end_point_hash(der: bytes) -> bytes:
    """RFC 5929 4.1: the certificate's signature hash, SHA-256 when that is MD5 or SHA-1."""
    cert = x509.load_der_x509_certificate(der)
    algorithm = cert.signature_hash_algorithm
    if algorithm is None or isinstance(algorithm, (hashes.MD5, hashes.SHA1)):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(der)
    return digest.finalize()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("user")
    parser.add_argument("password")
    parser.add_argument("--ca-file", required=True)
    parser.add_argument("--server-name")
    parser.add_argument("--source")
    args = parser.parse_args()

    url = urllib.parse.urlsplit(args.url)
    server_name = args.server_name or url.hostname
    context = ssl.create_default_context(cafile=args.ca_file)
    conn = http.client.HTTPSConnection(
        url.hostname,
        url.port or 443,
        context=context,
        timeout=20,
        source_address=(args.source, 0) if args.source else None,
    )
    # SNI and certificate name: the site's name, whatever address the gateway listens on.
    conn._tunnel_host = None
    conn.host = url.hostname
    conn.connect = _connect_with_name(conn, context, server_name)
    conn.connect()
    der = conn.sock.getpeercert(binary_form=True)
    application_data = b"tls-server-end-point:" + end_point_hash(der)
    bindings = spnego.channel_bindings.GssChannelBindings(application_data=application_data)
    client = ntlm_client(args.user, args.password, server_name, channel_bindings=bindings)
    status, body = login(conn, url.path or "/", client)
    print(
        json.dumps(
            {
                "status": status,
                "body": body,
                "binding_hash": application_data.hex(),
            }
        )
    )
    return 0


def _connect_with_name(conn, context, server_name):
    import socket

    def connect():
        sock = socket.create_connection(
            (conn.host, conn.port), conn.timeout, conn.source_address
        )
        conn.sock = context.wrap_socket(sock, server_hostname=server_name)

    return connect


if __name__ == "__main__":
    sys.exit(main())
