"""Helpers for the SGLang server tests (image data URLs, a managed `fast-dvlm serve` process)."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def image_url(color: str = "red", shape: str = "ellipse", size: int = 56) -> str:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), "white")
    getattr(ImageDraw.Draw(im), shape)([8, 8, size - 8, size - 8], fill=color)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, algorithm: str, api_key: str | None, max_running: int, log: Path,
                 sglang_args: list[str] | None = None, env: dict[str, str] | None = None):
        self.model, self.algorithm, self.api_key = str(model), algorithm, api_key
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        argv = ["--model", self.model, "--algorithm", algorithm, "--port", str(self.port),
                "--max-running-requests", str(max_running)]
        if api_key:
            argv += ["--api-key", api_key]
        if sglang_args:  # passed through to SGLang after `--`
            argv += ["--", *sglang_args]
        self.log = log
        self._log_file = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "fast_dvlm_sglang.serve", *argv],
                                     stdout=self._log_file, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)

    def wait_ready(self, timeout: float = 240.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); log: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.base_url + "/health", headers=headers, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"server not ready in {timeout}s; log: {self.log.read_text()[-3000:]}")

    def healthy(self) -> bool:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.get(self.base_url + "/health", headers=headers, timeout=5).status_code == 200

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log_file.close()

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url + "/v1", api_key=self.api_key or "none", max_retries=0, timeout=120)


def generate(server, text: str, *, image: str | None = None, timeout: float = 300, **sampling) -> dict:
    """SGLang's native /generate (returns output ids and meta_info); greedy unless told."""
    import httpx

    sampling.setdefault("temperature", 0)
    body = {"text": text, "sampling_params": sampling}
    if image is not None:
        body["image_data"] = image
    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    r = httpx.post(server.base_url + "/generate", json=body, headers=headers, timeout=timeout)
    r.raise_for_status()
    return r.json()


def prometheus_value(server, name: str) -> float:
    """One gauge of SGLang's /metrics (server started with --enable-metrics), e.g.
    `sglang:kv_available_tokens` (free KV slots of the token pool)."""
    import httpx

    for line in httpx.get(server.base_url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)
