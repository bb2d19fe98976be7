"""`ServeProcess`'s port: chosen outside the kernel's ephemeral range, reserved across processes,
and a server that lost its port before binding it starts again on another. A stub stands in for
`fast-dvlm serve` (binds `--port`, answers /health; where the port is taken it prints uvicorn's
line and exits 3, as SGLang's server did in CI)."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import httpx
import pytest

from fast_dvlm_sglang import server_process
from fast_dvlm_sglang.server_process import PORT_RANGE, ServeProcess, free_port, release_port

STUB = textwrap.dedent('''
    import http.server, os, sys
    port = int(sys.argv[sys.argv.index("--port") + 1])
    if os.environ.get("STUB_FAIL"):
        print("some other failure", flush=True)
        sys.exit(1)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

    try:
        server = http.server.HTTPServer(("127.0.0.1", port), Health)
    except OSError as e:  # uvicorn's wording
        print(f"ERROR:    [Errno {e.errno}] error while attempting to bind on address "
              f"('127.0.0.1', {port}): {e.strerror.lower()}", flush=True)
        sys.exit(3)
    print("ready", flush=True)
    server.serve_forever()
''')


@pytest.fixture
def stub(tmp_path, monkeypatch):
    path = tmp_path / "stub_server.py"
    path.write_text(STUB)
    monkeypatch.setattr(ServeProcess, "command", (sys.executable, str(path)))
    return path


@pytest.fixture
def taken():
    """A port something else holds (bound, not listening: /health polls are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def _picks(seq, monkeypatch):
    """free_port returns `seq`'s ports first, then real picks; returns the list of ports handed out."""
    handed, queue = [], list(seq)

    def pick():
        handed.append(queue.pop(0) if queue else free_port())
        return handed[-1]

    monkeypatch.setattr(server_process, "free_port", pick)
    return handed


def _ephemeral_low() -> int:
    return int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])


def test_ports_are_below_the_ephemeral_range_and_sglangs_nccl_range_and_distinct():
    assert PORT_RANGE[1] < min(22000, _ephemeral_low())  # SGLang picks NCCL ports from 22000-29999
    ports = [free_port() for _ in range(100)]
    try:
        assert len(set(ports)) == 100
        assert all(PORT_RANGE[0] <= p <= PORT_RANGE[1] for p in ports)
    finally:
        for p in ports:
            release_port(p)


def test_a_port_reserved_here_is_never_picked_by_another_process(monkeypatch):
    # A narrow range (65 ports) so that a clash would be likely without the reservation.
    low = 18100
    monkeypatch.setattr(server_process, "PORT_RANGE", (low, low + 64))
    mine = [free_port() for _ in range(40)]
    try:
        code = (f"import fast_dvlm_sglang.server_process as sp; sp.PORT_RANGE = ({low}, {low + 64}); "
                f"print(*[sp.free_port() for _ in range(20)])")
        theirs = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        theirs = [int(p) for p in theirs.stdout.split()]
        assert len(theirs) == 20 and not set(theirs) & set(mine)
        assert all(low <= p <= low + 64 for p in theirs)  # from the range, not bind(0)'s fallback
    finally:
        for p in mine:
            release_port(p)
    # Released, the ports are free to others again.
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert len(again.stdout.split()) == 20


def test_a_server_that_lost_its_port_starts_again_on_another(stub, taken, tmp_path, monkeypatch):
    handed = _picks([taken], monkeypatch)
    server = ServeProcess("m", "spec", tmp_path / "s.log", sglang_args=["--enable-metrics"])
    try:
        server.wait_ready(timeout=60)
        assert len(handed) == 2 and server.port == handed[1] != taken
        assert server.base_url == f"http://127.0.0.1:{server.port}"
        assert httpx.get(server.base_url + "/health").text == "ok"
        assert "address already in use" in (tmp_path / f"s.log.port{taken}").read_text()
    finally:
        server.stop()


def test_port_goes_before_the_sglang_arguments(stub, tmp_path, monkeypatch):
    seen = []

    def popen(argv, **kw):
        seen.append(argv)
        raise RuntimeError("stop here")

    monkeypatch.setattr(subprocess, "Popen", popen)
    with pytest.raises(RuntimeError, match="stop here"):
        ServeProcess("m", "ar", tmp_path / "s.log", max_running=4, sglang_args=["--page-size", "4"])
    argv = seen[0]
    assert argv[argv.index("--port") + 2:] == ["--", "--page-size", "4"]


def test_other_failures_are_not_retried(stub, tmp_path, monkeypatch):
    handed = _picks([], monkeypatch)
    server = ServeProcess("m", "spec", tmp_path / "s.log", env={"STUB_FAIL": "1"})
    try:
        with pytest.raises(RuntimeError, match="some other failure"):
            server.wait_ready(timeout=60)
        assert len(handed) == 1
    finally:
        server.stop()


def test_retries_are_bounded(stub, taken, tmp_path, monkeypatch):
    handed = _picks([taken] * 10, monkeypatch)
    server = ServeProcess("m", "spec", tmp_path / "s.log")
    try:
        with pytest.raises(RuntimeError, match="address already in use"):
            server.wait_ready(timeout=60, port_retries=2)
        assert handed == [taken] * 3
    finally:
        server.stop()
