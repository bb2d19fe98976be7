"""A `fast-dvlm serve` child process on a free local port: what tests and benchmarks talk to.

Starts the real server (SGLang's OpenAI server with our plugin) in its own process group, waits
for `/health`, and stops the whole group (SGLang's scheduler and detokenizer processes included).
"""

from __future__ import annotations

import fcntl
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The server binds its port some 30 s after the port is chosen. A port from bind(0) lies in the
# kernel's ephemeral range, which every outgoing connection on the machine draws from meanwhile
# (CI lost a server to "address already in use" that way, with two test processes side by side).
# So ports come from below that range, and below SGLang's own pick for its NCCL port (22000-29999,
# `get_free_port_below_ephemeral`), and each is reserved by a lock file while this process uses it,
# so that two processes here never pick the same one.
PORT_RANGE = (15000, 21999)
_LOCK_DIR = Path(tempfile.gettempdir()) / f"fast-dvlm-ports-{os.getuid()}"  # per user: no other owner's files
_reserved: dict[int, object] = {}  # port -> its open lock file (the flock lives as long as it)
_pick = random.SystemRandom()  # not the `random` module's state: tests seed that, in every process alike


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a process that binds it later, reserved for this process
    until `release_port` (or its exit). Falls back to bind(0) where the range is unusable."""
    low, high = PORT_RANGE[0], min(PORT_RANGE[1], _ephemeral_low() - 1)
    if high - low >= 64:
        _LOCK_DIR.mkdir(parents=True, exist_ok=True)
        for port in _pick.sample(range(low, high + 1), 64):
            if port in _reserved:
                continue
            lock = open(_LOCK_DIR / f"{port}.lock", "a")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # another process here holds it
                lock.close()
                continue
            if _bindable(port):
                _reserved[port] = lock
                return port
            lock.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def release_port(port: int) -> None:
    lock = _reserved.pop(port, None)
    if lock is not None:
        lock.close()


def _lost_its_port(log: Path) -> bool:
    """uvicorn's line when the port was taken between the pick and the bind (SGLang then exits 3):
    "[Errno 98] error while attempting to bind on address (...): address already in use"."""
    try:
        return "address already in use" in log.read_text().lower()
    except OSError:
        return False


class ServeProcess:
    def __init__(self, model: str | Path, algorithm: str, log: Path, *, max_running: int | None = None,
                 api_key: str | None = None, sglang_args: list[str] | None = None,
                 env: dict[str, str] | None = None, serve_args: list[str] | None = None,
                 cwd: Path | None = None):
        self.model, self.algorithm, self.api_key = str(model), algorithm, api_key
        argv = ["--model", self.model, "--algorithm", algorithm]
        if max_running is not None:
            argv += ["--max-running-requests", str(max_running)]
        if api_key:
            argv += ["--api-key", api_key]
        argv += serve_args or []  # more `fast-dvlm serve` flags (e.g. --device cuda --spec-cuda-graph)
        if sglang_args:  # passed through to SGLang after `--`
            argv += ["--", *sglang_args]
        self._argv, self._env, self._cwd = argv, {**os.environ, **(env or {})}, cwd
        self.log = Path(log)
        self.started = time.perf_counter()
        self._launch()

    # `fast-dvlm serve`; a test stands a stub server in for it
    command = (sys.executable, "-m", "fast_dvlm_sglang.serve")

    def _launch(self) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        argv = list(self._argv)
        cut = argv.index("--") if "--" in argv else len(argv)
        argv[cut:cut] = ["--port", str(self.port)]  # a `fast-dvlm serve` flag: before the `--`
        self._log_file = open(self.log, "w")
        self.proc = subprocess.Popen([*self.command, *argv], stdout=self._log_file, stderr=subprocess.STDOUT,
                                     env=self._env, start_new_session=True, cwd=self._cwd)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self, timeout: float = 480.0, port_retries: int = 2) -> float:
        """Block until `/health` answers 200; returns the seconds since the process started. A
        server that lost its port before binding it starts again on another, `port_retries` times
        (`base_url` changes then: read it after this returns)."""
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                if port_retries > 0 and _lost_its_port(self.log):
                    port_retries -= 1
                    lost = self.port
                    self._close()
                    self.log.with_name(f"{self.log.name}.port{lost}").write_text(self.log.read_text())
                    self._launch()
                    continue
                raise RuntimeError(f"server exited ({self.proc.returncode}); log: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.base_url + "/health", headers=self.headers, timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready in {timeout}s; log: {self.log.read_text()[-3000:]}")

    def healthy(self) -> bool:
        import httpx

        return httpx.get(self.base_url + "/health", headers=self.headers, timeout=5).status_code == 200

    def client(self, timeout: float = 120):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url + "/v1", api_key=self.api_key or "none", max_retries=0, timeout=timeout)

    def stop(self, grace: float = 2.0) -> None:
        """SIGTERM to every process of the server at once, then SIGKILL to what is left after
        `grace` seconds. The scheduler and detokenizer exit on SIGTERM at once; SGLang's launcher
        then takes their exit for a crash and sleeps 5 s before its crash diagnostics, with
        nothing left to shut down, so waiting for it would only cost each stop those 5 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self._close()

    def _close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the launcher, and any child it left behind
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._log_file.close()
        release_port(self.port)
