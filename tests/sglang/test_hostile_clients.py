"""The server as a hostile client meets it: oversized, chunked, slow and abandoned uploads; media
from the server's disk or network; refusals on every endpoint, streamed or not; metrics.

One demo-model `spec` server with the limits set for testing (local media from a temp dir, media
URLs from 127.0.0.1 only, a 3 s body deadline, at most 4 images); the tiny `spec` server of
conftest runs the defaults (data: URLs only). Every case ends with the server healthy; the module
ends checking its memory, its KV pool and a known answer. Every address is on loopback and every
loop is bounded.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import socket
import struct
import threading
import time
import zlib

import pytest

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

from sglang_helpers import image_url, kv_tokens_in_use, prometheus_value, wait_for  # noqa: E402

from fast_dvlm_sglang.demo import DEMO_CHECKPOINT  # noqa: E402
from fast_dvlm_sglang.http_probe import post_raw, tree_rss  # noqa: E402
from fast_dvlm_sglang.server_process import ServeProcess  # noqa: E402

MAX_IMAGES = 4
MAX_REQUEST_PIXELS = 10_000  # three 56 x 56 test images fit (9408), four do not
READ_TIMEOUT_S = 3
MIB = 1024 * 1024
DEFAULT_MAX_BYTES = 32 * MIB  # `limits.ServingLimits.max_request_bytes`
DEFAULT_MAX_PIXELS = 4096 * 4096
QUESTION = "What shape is in the image?"


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height zeros: a few KB that decode to width*height bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def png_bytes(url: str) -> bytes:
    return base64.b64decode(url.split(",", 1)[1])


class MediaHandler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    redirects: dict[str, str] = {}

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path in self.redirects:
            self.send_response(302)
            self.send_header("Location", self.redirects[self.path])
            self.end_headers()
            return
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def media_site():
    """A loopback HTTP server with an image, a decompression bomb and two redirects."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), MediaHandler)
    port = server.server_address[1]
    MediaHandler.files = {"/red.png": png_bytes(image_url("red")), "/bomb.png": bomb_png(6000, 6000)}
    MediaHandler.redirects = {"/to-metadata": "http://169.254.169.254/latest/meta-data/",
                              "/to-localhost": f"http://localhost:{port}/red.png"}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    server.shutdown()


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "red.png").write_bytes(png_bytes(image_url("red")))
    (root / "bomb.png").write_bytes(bomb_png(6000, 6000))
    os.symlink("/etc/hostname", root / "link.png")
    outside = root.parent / "outside.png"
    outside.write_bytes(png_bytes(image_url("blue")))
    return root


@pytest.fixture(scope="module")
def server(media_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("hostile_logs") / "spec_demo.log"
    srv = ServeProcess(DEMO_CHECKPOINT, "spec", log, max_running=16,
                       serve_args=["--served-model-name", "demo", "--allowed-local-media-path", str(media_dir),
                                   "--allow-image-urls", "--allowed-image-hosts", "127.0.0.1",
                                   "--max-images", str(MAX_IMAGES), "--max-request-pixels", str(MAX_REQUEST_PIXELS),
                                   "--request-read-timeout", str(READ_TIMEOUT_S)],
                       sglang_args=["--enable-metrics"],
                       # SGLang polls a plain (non-streamed) request's client every this many seconds
                       # (default 4): 1 s keeps the disconnect test's bound independent of speed.
                       env={"SGLANG_REQUEST_STATE_WAIT_TIMEOUT": "1"})
    try:
        srv.wait_ready()
        srv.model = "demo"
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def baseline(server):
    """Before any hostile case: a known answer, the memory of the server's process tree, the pool."""
    import httpx

    answer = known_answer(server)
    for _ in range(3):  # warm allocator caches and the image path
        httpx.post(server.base_url + "/v1/chat/completions", json=chat(image_url("blue"), max_tokens=16), timeout=120)
    return {"answer": answer, "rss": tree_rss(server.proc.pid)}


def known_answer(server) -> list[int]:
    import httpx

    r = httpx.post(server.base_url + "/generate", timeout=120, json={
        "text": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + QUESTION + "<|im_end|>\n"
                "<|im_start|>assistant\n",
        "image_data": image_url("red"), "sampling_params": {"temperature": 0, "max_new_tokens": 40}})
    r.raise_for_status()
    return r.json()["output_ids"]


def chat(url: str | list[str] | None = None, **extra) -> dict:
    urls = [url] if isinstance(url, str) else (url or [])
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": QUESTION}]
    return {"model": "demo", "messages": [{"role": "user", "content": content}], "max_tokens": 24,
            "temperature": 0, **extra}


def post(server, path: str, body: dict, stream: bool = False):
    """POST; for a stream, the status, headers and the first bytes of the body (bounded)."""
    import httpx

    if not stream:
        return httpx.post(server.base_url + path, json=body, timeout=120)
    with httpx.stream("POST", server.base_url + path, json=body, timeout=120) as r:
        r.first_bytes = b""
        for piece in r.iter_bytes():
            r.first_bytes += piece
            if len(r.first_bytes) > 4096:
                break
        return r


def error_message(r) -> str:
    body = json.loads(r.first_bytes if hasattr(r, "first_bytes") else r.content)
    err = body.get("error", body)
    assert isinstance(err, dict) and err.get("message"), body
    return err["message"]


def assert_refused(r, status: int, *needles: str) -> str:
    assert r.status_code == status, (r.status_code, getattr(r, "first_bytes", None) or r.text[:400])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    message = error_message(r)
    for needle in needles:
        assert needle in message, message
    for leak in ('File "', "Traceback", "site-packages", str(DEMO_CHECKPOINT)):
        assert leak not in message, message
    return message


# ---- 1. the request body ---------------------------------------------------------------------------
def test_declared_oversized_body_is_refused_at_once(server, baseline):
    size = 90 * MIB
    status, body, seconds = post_raw(server.port, "/v1/chat/completions", (b"x" * MIB for _ in range(90)),
                                     headers={"Content-Length": str(size)})
    assert status == 413 and b"--max-request-bytes" in body, (status, body)
    assert seconds < 2.0, seconds  # answered from the header, not after 90 MB arrived
    assert server.healthy()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/generate"])
def test_chunked_body_is_cut_off_at_the_limit(server, baseline, path):
    # 48 MiB offered without a Content-Length; the server must stop reading past 32 MiB.
    status, body, _ = post_raw(server.port, path, (b"x" * MIB for _ in range(48)), chunked=True)
    assert status == 413 and str(DEFAULT_MAX_BYTES).encode() in body, (status, body)
    assert server.healthy()


def test_body_just_under_the_limit_is_parsed(server, baseline):
    # A body under the limit goes on to validation (here: not JSON), so the limit is not too eager.
    status, body, _ = post_raw(server.port, "/v1/chat/completions", [b"{" * (DEFAULT_MAX_BYTES - 1)],
                               headers={"Content-Length": str(DEFAULT_MAX_BYTES - 1)})
    assert status == 400 and b"not valid JSON" in body, (status, body[:300])


def test_slow_upload_times_out(server, baseline):
    status, body, seconds = post_raw(server.port, "/v1/chat/completions", (b" " for _ in range(60)),
                                     headers={"Content-Length": "1000"}, delay_s=0.5, timeout=30)
    assert status == 408, (status, body)
    assert READ_TIMEOUT_S - 0.5 < seconds < READ_TIMEOUT_S + 5, seconds


def test_client_gone_mid_upload_costs_nothing(server, baseline):
    rss = tree_rss(server.proc.pid)
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 20000000\r\n\r\n" + b" " * (8 * MIB))
    time.sleep(1)
    assert server.healthy()
    assert tree_rss(server.proc.pid) - rss < 64 * MIB


def test_client_gone_mid_generation_stops_the_work(server, baseline):
    tokens = "fast_dvlm:spec_tokens_total"
    asked = 3800  # ignore_eos: unaborted, the request makes exactly this many (the context is 4096)
    for stream in (False, True):
        raw = json.dumps(chat(image_url("green"), max_tokens=asked, ignore_eos=True, stream=stream)).encode()
        start = prometheus_value(server, tokens)
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw))
            assert wait_for(lambda s=start: prometheus_value(server, tokens) > s + 20, timeout=60)  # it is decoding
        # SGLang notices the disconnect (a stream at its next chunk, a plain request at its next
        # poll, 1 s here) and aborts: the token counter stops short of what was asked. How far
        # short depends on the machine (the demo drafts ignore_eos text at ~600 to ~1200 tokens/s
        # on 2 cores: a fixed bound of 2000 failed once at 2378), so the test asks for all the
        # context allows and checks the request did not run to its end.
        assert wait_for(lambda: _still(server, tokens, 2.0), timeout=30)
        assert prometheus_value(server, tokens) - start < asked
    assert server.healthy()


def _still(server, name: str, seconds: float) -> bool:
    before = prometheus_value(server, name)
    time.sleep(seconds)
    return prometheus_value(server, name) == before


# ---- 2. media --------------------------------------------------------------------------------------
def test_image_count_is_capped(server, baseline):
    r = post(server, "/v1/chat/completions", chat([image_url(c) for c in ("red", "blue", "green", "black", "gray")]))
    assert_refused(r, 400, "5 images", str(MAX_IMAGES), "--max-images")


def test_pixels_of_all_images_together_are_capped(server, baseline, media_dir):
    three = [image_url("red"), image_url("blue").split(",", 1)[1], str(media_dir / "red.png")]  # data, base64, file
    assert post(server, "/v1/chat/completions", chat(three)).status_code == 200
    r = post(server, "/v1/chat/completions", chat([*three, image_url("green")]))
    assert_refused(r, 400, "12544 pixels", "--max-request-pixels")


@pytest.mark.parametrize("width,height", [(6000, 6000), (20000, 20000)], ids=["over_limit", "pil_bomb"])
def test_decompression_bomb_is_refused_from_its_header(server, baseline, width, height):
    png = bomb_png(width, height)
    assert len(png) < 2 * MIB  # small on the wire, gigabytes decoded
    r = post(server, "/v1/chat/completions", chat(data_url(png)))
    assert_refused(r, 400, "pixels")


def test_local_file_inside_the_allowed_dir_is_read(server, baseline, media_dir):
    from_disk = post(server, "/v1/chat/completions", chat(str(media_dir / "red.png")))
    as_data = post(server, "/v1/chat/completions", chat(image_url("red")))
    as_file_url = post(server, "/v1/chat/completions", chat(f"file://{media_dir}/red.png"))
    assert from_disk.status_code == as_data.status_code == as_file_url.status_code == 200, from_disk.text
    answers = {r.json()["choices"][0]["message"]["content"] for r in (from_disk, as_data, as_file_url)}
    assert len(answers) == 1, answers


@pytest.mark.parametrize("source", [
    "{dir}/../outside.png", "file://{dir}/../outside.png", "{dir}/link.png", "/etc/hostname",
    "file:///etc/hostname", "{dir}/sub/../../outside.png", "relative.png",
], ids=["dotdot", "file_url_dotdot", "symlink_out", "absolute_out", "file_url_out", "nested_dotdot", "relative"])
def test_local_path_escapes_are_refused(server, baseline, media_dir, source):
    r = post(server, "/v1/chat/completions", chat(source.format(dir=media_dir)))
    assert r.status_code == 400, r.text
    assert_refused(r, 400)


def test_local_bomb_is_refused_from_its_header(server, baseline, media_dir):
    assert_refused(post(server, "/v1/chat/completions", chat(str(media_dir / "bomb.png"))), 400, "pixels")


def test_allowed_host_is_fetched_and_redirects_are_checked(server, baseline, media_site):
    fetched = post(server, "/v1/chat/completions", chat(media_site + "/red.png"))
    inline = post(server, "/v1/chat/completions", chat(image_url("red")))
    assert fetched.status_code == 200, fetched.text
    assert fetched.json()["choices"][0]["message"]["content"] == inline.json()["choices"][0]["message"]["content"]
    for path in ("/to-metadata", "/to-localhost"):  # a redirect to a host not allowed: refused at that hop
        assert_refused(post(server, "/v1/chat/completions", chat(media_site + path)), 400)
    # the pixel cap where SGLang decodes a fetched image (`media_policy.fully_load_pil_image`)
    assert_refused(post(server, "/v1/chat/completions", chat(media_site + "/bomb.png")), 400, "pixels")
    # not on the allow-list: refused before any connection
    port = media_site.rsplit(":", 1)[1]
    for url in (f"http://localhost:{port}/red.png", "http://169.254.169.254/latest/meta-data/",
                f"http://[::1]:{port}/red.png"):
        assert_refused(post(server, "/v1/chat/completions", chat(url)), 400)


def test_default_policy_reads_no_files_and_fetches_nothing(spec_server_tiny, media_dir, media_site):
    srv = spec_server_tiny
    messages = set()
    for source in ("/etc/hostname", "/no/such/file.png", f"file://{media_dir}/red.png", str(media_dir / "red.png")):
        r = post(srv, "/v1/chat/completions", chat(source) | {"model": srv.model})
        messages.add(assert_refused(r, 400, "--allowed-local-media-path"))
    assert len(messages) == 1  # one message whether the file exists or not: no existence oracle
    for url in (media_site + "/red.png", f"http://127.0.0.1:{srv.port}/metrics"):
        assert_refused(post(srv, "/v1/chat/completions", chat(url) | {"model": srv.model}), 400, "--allow-image-urls")
        r = post(srv, "/generate", {"text": "hi", "image_data": url, "sampling_params": {"max_new_tokens": 4}})
        assert_refused(r, 400, "--allow-image-urls")
    assert srv.healthy()


# ---- 3. one validation for every endpoint, streamed or not --------------------------------------------
def _completion(**extra) -> dict:
    return {"model": "demo", "prompt": "There is a", "max_tokens": 8, **extra}


def _generate(**sampling) -> dict:
    return {"text": "There is a", "sampling_params": {"max_new_tokens": 8, **sampling}}


REFUSALS = {
    "generate_token_ids_logprob_out_of_vocab": ("/generate", lambda: _generate() | {
        "return_logprob": True, "token_ids_logprob": [5, 10 ** 9]}, "out-of-vocabulary"),
    "chat_unknown_model": ("/v1/chat/completions", lambda: chat(image_url()) | {"model": "no-such-model"},
                           "does not exist"),
    "chat_too_many_images": ("/v1/chat/completions", lambda: chat([image_url()] * 6), "--max-images"),
    "chat_bad_draft_length": ("/v1/chat/completions", lambda: chat(image_url(), custom_params={"draft_length": 99}),
                              "draft_length"),
    "completions_unknown_model": ("/v1/completions", lambda: _completion(model="no-such-model"), "does not exist"),
    "generate_out_of_vocab": ("/generate", lambda: {"input_ids": [1, 2, 99999], "sampling_params": {}},
                              "outside the vocabulary"),
    "generate_negative_id": ("/generate", lambda: {"input_ids": [-1, 5], "sampling_params": {}},
                             "outside the vocabulary"),
    "generate_local_path": ("/generate", lambda: _generate() | {"image_data": "/etc/hostname"}, "outside"),
    # an empty prompt tokenizes to 0 tokens (no BOS): through /generate it killed the server (spec:
    # a round without a seed; AR too, tests/sglang/test_server.py); SGLang's completions refuse it
    "generate_empty_text": ("/generate", lambda: {"text": "", "sampling_params": {"max_new_tokens": 8}},
                            "prompt is empty"),
    "generate_batch_with_an_empty_text": ("/generate", lambda: _generate() | {"text": ["There is a", ""]},
                                          "prompt is empty"),
    "completions_empty_prompt": ("/v1/completions", lambda: _completion(prompt=""), "Prompt cannot be empty"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("case", list(REFUSALS))
def test_every_refusal_is_a_4xx_before_any_stream_byte(server, baseline, case, stream):
    path, body, needle = REFUSALS[case]
    r = post(server, path, body() | ({"stream": True} if stream else {}), stream=stream)
    assert_refused(r, 400, needle)
    if stream:
        assert not r.first_bytes.startswith(b"data:"), r.first_bytes[:200]


SERVED_OPTIONS = {
    "chat_n": ("/v1/chat/completions", lambda: chat(image_url(), n=2)),
    "chat_logit_bias": ("/v1/chat/completions", lambda: chat(image_url(), logit_bias={"15": 2.0})),
    "completions_n_min_p": ("/v1/completions", lambda: _completion(n=3, temperature=0.8, min_p=0.2)),
    "generate_min_new_tokens": ("/generate", lambda: _generate(min_new_tokens=4)),
    "chat_penalties": ("/v1/chat/completions", lambda: chat(image_url(), frequency_penalty=0.5, presence_penalty=0.3,
                                                            repetition_penalty=1.2)),
    "chat_json_schema": ("/v1/chat/completions", lambda: chat(image_url(), response_format={
        "type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}})),
    "chat_regex": ("/v1/chat/completions", lambda: chat(image_url(), regex="[a-z]+")),
    "chat_json_object": ("/v1/chat/completions", lambda: chat(image_url(), response_format={"type": "json_object"})),
    "chat_logprobs": ("/v1/chat/completions", lambda: chat(image_url(), logprobs=True, top_logprobs=2)),
    "completions_logprobs": ("/v1/completions", lambda: _completion(logprobs=2)),
    "generate_return_logprob": ("/generate", lambda: _generate() | {"return_logprob": True, "top_logprobs_num": 2}),
    "completions_ebnf": ("/v1/completions", lambda: _completion(ebnf='root ::= "a"')),
    "generate_regex": ("/generate", lambda: _generate(regex="[a-z]+")),
}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("case", list(SERVED_OPTIONS))
def test_options_spec_honours_are_served_on_every_endpoint(server, baseline, case, stream):
    """What spec applies as AR does (n > 1, logit_bias, min_p, min_new_tokens, penalties, grammars,
    output logprobs) is served."""
    path, body = SERVED_OPTIONS[case]
    r = post(server, path, body() | ({"stream": True} if stream else {}), stream=stream)
    assert r.status_code == 200, getattr(r, "first_bytes", None) or r.text[:400]
    if stream:
        assert r.first_bytes.startswith(b"data:"), r.first_bytes[:200]
    elif path != "/generate":
        assert len(r.json()["choices"]) == (body().get("n") or 1)
    assert server.healthy()


@pytest.mark.parametrize("path,body", [("/v1/chat/completions", lambda: chat(image_url())),
                                       ("/v1/completions", _completion)], ids=["chat", "completions"])
def test_model_default_is_accepted(server, baseline, path, body):
    for model in ("demo", "default"):
        r = post(server, path, body() | {"model": model})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("raw,needle", [
    (b'{"model": "demo", "messages": [', "not valid JSON"),
    (b'{"model": "demo", "messages": [{"role": "user", "content": 42}]}', "messages.0.content"),
    (b'{"model": "demo", "messages": [{"role": "wizard", "content": "hi"}]}', "role"),
    (b'{"model": "demo", "messages": "hello"}', "messages"),
    (b'{"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}', "max_tokens"),
], ids=["truncated", "content_42", "bad_role", "messages_str", "max_tokens_str"])
def test_malformed_requests_name_the_problem_without_internals(server, baseline, raw, needle):
    import httpx

    r = httpx.post(server.base_url + "/v1/chat/completions", content=raw, timeout=60,
                   headers={"Content-Type": "application/json"})
    message = assert_refused(r, 400, needle)
    if needle == "messages.0.content":
        assert "role" not in message, message  # the content is wrong, not the role
    assert len(message) <= 510


def test_huge_text_is_refused_before_tokenization(server, baseline):
    text = "circle " * 700_000  # 4.9 MB: could never fit the 4096-token context
    for path, body in (("/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": text}]}),
                       ("/v1/completions", {"model": "demo", "prompt": text}),
                       ("/generate", {"text": text})):
        start = time.monotonic()
        r = post(server, path, body)
        assert_refused(r, 400, "characters")
        assert time.monotonic() - start < 5


# ---- 4. metrics count what was emitted ---------------------------------------------------------------
def test_spec_metrics_count_emitted_tokens_only(server, baseline):
    names = ("fast_dvlm:spec_tokens_total", "fast_dvlm:spec_accepted_drafts_total", "fast_dvlm:spec_rounds_total",
             "sglang:generation_tokens_total", "fast_dvlm:spec_ar_run_length_sum", "fast_dvlm:spec_ar_run_length_count")

    def snapshot():
        return {n: prometheus_value(server, n) for n in names}

    before = snapshot()
    emitted = requests = 0
    for color in ("red", "blue", "green", "black"):
        # A stop string cuts a round in the middle: the drafts after it are accepted but not sent.
        full = post(server, "/v1/chat/completions", chat(image_url(color), max_tokens=60)).json()
        text = full["choices"][0]["message"]["content"]
        stop = text.split()[min(3, len(text.split()) - 1)] if text.split() else "."
        r = post(server, "/v1/chat/completions", chat(image_url(color), max_tokens=60, stop=[stop])).json()
        emitted += full["usage"]["completion_tokens"] + r["usage"]["completion_tokens"]
        requests += 2
    assert wait_for(lambda: snapshot()["fast_dvlm:spec_tokens_total"] - before["fast_dvlm:spec_tokens_total"]
                    == emitted, timeout=20)
    after = snapshot()
    delta = {n: after[n] - before[n] for n in names}
    # Every request's first token comes from its context pass, not from a draft.
    assert delta["fast_dvlm:spec_accepted_drafts_total"] <= emitted - requests, (delta, emitted)
    # The rest are the rounds' last tokens or steps of AR runs after their first (not drafts).
    run_steps = delta["fast_dvlm:spec_ar_run_length_sum"] - delta["fast_dvlm:spec_ar_run_length_count"]
    assert delta["fast_dvlm:spec_accepted_drafts_total"] >= (emitted - requests - delta["fast_dvlm:spec_rounds_total"]
                                                             - run_steps)


def test_stream_answer_unchanged_by_the_kick_start(server, baseline):
    """`/generate` streams now wait for their first event before answering: same events as before."""
    import httpx

    body = {"text": "There is a", "sampling_params": {"temperature": 0, "max_new_tokens": 12}}
    plain = httpx.post(server.base_url + "/generate", json=body, timeout=60).json()
    events = []
    with httpx.stream("POST", server.base_url + "/generate", json=body | {"stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    assert events and events[-1]["output_ids"] == plain["output_ids"]
    assert [len(e["output_ids"]) for e in events] == sorted(len(e["output_ids"]) for e in events)


# ---- the server after all of it ----------------------------------------------------------------------
def test_server_unharmed_after_all_cases(server, baseline):
    """Runs last in the module (definition order): healthy, memory flat, pool free, same answer."""
    assert server.healthy()
    grown = tree_rss(server.proc.pid) - baseline["rss"]
    # The hostile cases offered > 500 MB of bodies and gigapixel images; what the legitimate
    # requests in between cost (allocator caches, radix-cache entries) stays far below that.
    assert grown < 256 * MIB, grown / MIB
    assert wait_for(lambda: kv_tokens_in_use(server) == 0), kv_tokens_in_use(server)
    assert known_answer(server) == baseline["answer"]
