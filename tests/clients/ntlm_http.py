"""NTLM over one http.client connection, shared by the test clients: one request with an
`Authorization: NTLM` token, and the whole Type1 -> 401 + Type2 -> Type3 login (pyspnego computes
the NTLMv2 response)."""

import base64
import http.client

import spnego


def connection(host, port, source=None):
    """A plain HTTP connection to host:port from `source` (an address, port chosen by the kernel)."""
    return http.client.HTTPConnection(
        host, port, timeout=20, source_address=(source, 0) if source else None
    )


def ntlm_client(user, password, hostname, **kwargs):
    """A pyspnego NTLM client for the SPN HTTP/<hostname> (kwargs: e.g. channel_bindings)."""
    return spnego.client(
        user, password, hostname=hostname, service="HTTP", protocol="ntlm", **kwargs
    )


def request(conn, path, token=None):
    """GET `path`, with `Authorization: NTLM <token>` when a token is given: (status, body, the
    server's NTLM token or None)."""
    headers = {}
    if token is not None:
        headers["Authorization"] = "NTLM " + base64.b64encode(token).decode()
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    body = response.read().decode(errors="replace")
    challenge = None
    for value in response.headers.get_all("WWW-Authenticate") or []:
        scheme, _, data = value.partition(" ")
        if scheme.upper() == "NTLM" and data:
            challenge = base64.b64decode(data)
    return response.status, body, challenge


def login(conn, path, client):
    """The NTLM handshake for `path` on `conn`: Type1, then Type3 if the server challenged.
    Returns the final (status, body)."""
    status, body, challenge = request(conn, path, client.step())
    if status == 401 and challenge:
        status, body, _ = request(conn, path, client.step(challenge))
    return status, body
