"""One step of an NTLM handshake over an http.client connection, shared by the test clients."""

import base64


def request(conn, path, token):
    """GET `path` with `Authorization: NTLM <token>`: (status, body, the server's NTLM token or None)."""
    conn.request(
        "GET", path, headers={"Authorization": "NTLM " + base64.b64encode(token).decode()}
    )
    response = conn.getresponse()
    body = response.read().decode(errors="replace")
    challenge = None
    for value in response.headers.get_all("WWW-Authenticate") or []:
        scheme, _, data = value.partition(" ")
        if scheme.upper() == "NTLM" and data:
            challenge = base64.b64decode(data)
    return response.status, body, challenge
