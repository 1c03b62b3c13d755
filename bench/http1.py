"""One HTTP/1.1 exchange on a keep-alive socket, for the instruction-count benches' clients."""


def exchange(sock, request):
    """Send `request` (bytes) and read its whole answer (`Content-Length` framed); its head."""
    sock.sendall(request)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the answer's head")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = next(
        (int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")),
        0,
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the answer's body")
        body += chunk
    return head
