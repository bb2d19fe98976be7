"""A `fast-dvlm serve` child process on a free local port: what tests and benchmarks talk to.

Starts the real server (SGLang's OpenAI server with our plugin) in its own process group, waits
for `/health`, and stops the whole group (SGLang's scheduler and detokenizer processes included).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    def __init__(self, model: str | Path, algorithm: str, log: Path, *, max_running: int | None = None,
                 api_key: str | None = None, sglang_args: list[str] | None = None,
                 env: dict[str, str] | None = None, serve_args: list[str] | None = None,
                 cwd: Path | None = None):
        self.model, self.algorithm, self.api_key = str(model), algorithm, api_key
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        argv = ["--model", self.model, "--algorithm", algorithm, "--port", str(self.port)]
        if max_running is not None:
            argv += ["--max-running-requests", str(max_running)]
        if api_key:
            argv += ["--api-key", api_key]
        argv += serve_args or []  # more `fast-dvlm serve` flags (e.g. --device cuda --spec-cuda-graph)
        if sglang_args:  # passed through to SGLang after `--`
            argv += ["--", *sglang_args]
        self.log = Path(log)
        self._log_file = open(self.log, "w")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "fast_dvlm_sglang.serve", *argv],
                                     stdout=self._log_file, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True, cwd=cwd)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self, timeout: float = 480.0) -> float:
        """Block until `/health` answers 200; returns the seconds since the process started."""
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
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
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the launcher, and any child it left behind
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._log_file.close()
