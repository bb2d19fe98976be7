"""SGLang's own scale-out with our plugin, on CPU: data parallel (`-- --dp 2`), tensor parallel
(`-- --tp 2`; both with one core per rank, `fast-dvlm serve` splits the cores) and SGLang's router
(`sglang_router`) over two workers. Each answers 16 concurrent greedy requests on the demo model
exactly as one spec worker does (what would differ on a scheduler or state bug: a request's
algorithm state lives on the request, and every rank runs the same hooks)."""

from __future__ import annotations

import concurrent.futures as cf
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.sglang, pytest.mark.slow, pytest.mark.many_servers]

N = 16


def _answers(base_url: str) -> list[tuple[str, int]]:
    from openai import OpenAI

    from fast_dvlm_sglang.benchmarks.load import demo_requests

    client = OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=600)
    model = client.models.list().data[0].id

    def one(req):
        out = client.chat.completions.create(model=model, messages=req.messages, max_tokens=96, temperature=0)
        return out.choices[0].message.content, out.usage.completion_tokens

    with cf.ThreadPoolExecutor(N) as pool:
        return list(pool.map(one, demo_requests(N, 96)))


def _requests_served(base_url: str) -> float:
    import httpx

    text = httpx.get(base_url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("sglang:num_requests_total"))


@pytest.fixture(scope="module")
def one_worker(demo_spec_and_ar):
    spec, _ar = demo_spec_and_ar
    return spec, _answers(spec.base_url)


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    from fast_dvlm_sglang.demo import DEMO_CHECKPOINT
    from fast_dvlm_sglang.server_process import ServeProcess

    server = ServeProcess(DEMO_CHECKPOINT, "spec", tmp_path_factory.mktemp("tp2") / "server.log", max_running=N,
                          sglang_args=["--tp", "2", "--enable-metrics"])
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_data_parallel_answers_as_one_worker(one_worker, tmp_path):
    from fast_dvlm_sglang.demo import DEMO_CHECKPOINT
    from fast_dvlm_sglang.server_process import ServeProcess

    _, want = one_worker
    server = ServeProcess(DEMO_CHECKPOINT, "spec", tmp_path / "dp2.log", max_running=N, sglang_args=["--dp", "2"])
    try:
        server.wait_ready()
        assert _answers(server.base_url) == want
        assert server.healthy()
        assert "DP1" in server.log.read_text()  # two data-parallel schedulers really ran
    finally:
        server.stop()


def test_tensor_parallel_answers_as_one_worker(one_worker, tp2):
    _, want = one_worker
    assert _answers(tp2.base_url) == want
    assert "TP1" in tp2.log.read_text()


def test_sglang_router_over_two_workers_answers_as_one_worker(one_worker, tp2, tmp_path):
    import httpx

    from fast_dvlm_sglang.server_process import free_port

    spec, want = one_worker
    workers = (spec.base_url, tp2.base_url)
    before = [_requests_served(w) for w in workers]
    port = free_port()
    log = open(tmp_path / "router.log", "w")
    router = subprocess.Popen([sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *workers,
                               "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert router.poll() is None, (tmp_path / "router.log").read_text()[-2000:]
            try:  # the router registers its workers after it starts serving: wait for them
                r = httpx.get(url + "/v1/models", timeout=2)
                if r.status_code == 200 and r.json().get("data"):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        assert _answers(url) == want
        served = [_requests_served(w) - b for w, b in zip(workers, before)]
        assert sum(served) == N and min(served) > 0, served  # both workers took part
    finally:
        router.terminate()
        router.wait(30)
        log.close()
