"""Raw HTTP requests an ordinary client library will not send, for the hostile-client tests and
the request-limits benchmark: a declared body that never comes, a chunked upload that does not
stop, a slow upload; and the memory of a server's process tree.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterable


def _head(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_response(sock: socket.socket, deadline: float) -> tuple[int, bytes]:
    data = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), None)
            if length is not None and len(body) >= length:
                break
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        status = 0  # no response
    return status, body


def post_raw(port: int, path: str, chunks: Iterable[bytes], *, headers: dict[str, str] | None = None,
             chunked: bool = False, delay_s: float = 0.0, timeout: float = 60.0) -> tuple[int, bytes, float]:
    """POST `chunks` (each sent as it comes, `delay_s` apart; chunked transfer encoding if asked),
    stopping as soon as the server answers. Returns (status, body, seconds to the answer);
    status 0: no answer within `timeout`."""
    headers = dict(headers or {})
    if chunked:
        headers["Transfer-Encoding"] = "chunked"
    start = time.monotonic()
    deadline = start + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(_head(path, headers))
        for chunk in chunks:
            ready, _, _ = select.select([sock], [], [], 0)
            if ready or time.monotonic() > deadline:
                break  # the server answered (or gave up) mid-upload
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            if delay_s:
                time.sleep(delay_s)
        else:
            if chunked:
                try:
                    sock.sendall(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass
        status, body = _read_response(sock, deadline)
    return status, body, time.monotonic() - start


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    import psutil

    total = 0
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        return 0
    return total


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and all its descendants."""
    import psutil

    total = 0.0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total
