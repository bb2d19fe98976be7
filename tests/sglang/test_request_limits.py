"""The request limits and media policy without a server: the ASGI body limit against a fake
client, the error-message digest on SGLang's real request models, the media source rules over
every kind of source, the address rule over address classes, and the HTTP-side and scheduler-side
spec refusals agreeing. The same rules through the real server: `test_hostile_clients.py`."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os

import pytest

pytestmark = pytest.mark.sglang

from sglang_helpers import image_url  # noqa: E402

from fast_dvlm_sglang.sglang_plugin import http_guard, media_policy  # noqa: E402
from fast_dvlm_sglang.sglang_plugin.limits import ENV, ServingLimits  # noqa: E402


# ---- the body limit (ASGI) -----------------------------------------------------------------------
class FakeClient:
    def __init__(self, messages, content_length=None):
        self.messages, self.received, self.sent = list(messages), 0, []
        headers = [(b"content-type", b"application/json")]
        if content_length is not None:
            headers.append((b"content-length", str(content_length).encode()))
        self.scope = {"type": "http", "method": "POST", "path": "/generate", "headers": headers}

    async def receive(self):
        self.received += 1
        if self.messages:
            return self.messages.pop(0)
        await asyncio.sleep(3600)  # a client that says nothing more

    async def send(self, message):
        self.sent.append(message)

    @property
    def status(self):
        return next((m["status"] for m in self.sent if m["type"] == "http.response.start"), None)


class RecordingApp:
    def __init__(self):
        self.bodies = []

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def _run(limit, client, timeout=5.0):
    app = RecordingApp()
    asyncio.run(http_guard.RequestBodyLimit(app, max_bytes=limit, read_timeout_s=timeout)(
        client.scope, client.receive, client.send))
    return app


def _chunks(sizes, last_more=False):
    out = [{"type": "http.request", "body": b"x" * n, "more_body": True} for n in sizes]
    out[-1]["more_body"] = last_more
    return out


def test_declared_length_over_the_limit_is_refused_unread():
    client = FakeClient(_chunks([10]), content_length=1001)
    app = _run(1000, client)
    assert client.status == 413 and client.received == 0 and not app.bodies
    body = json.loads(client.sent[1]["body"])
    assert body["error"]["code"] == 413 and "1001 bytes" in body["error"]["message"]


@pytest.mark.parametrize("sizes,refused", [([400, 400, 199], False), ([400, 400, 200], False),
                                           ([400, 400, 201], True), ([1001], True), ([0, 0, 1000], False)])
def test_chunked_body_is_counted_as_it_arrives(sizes, refused):
    client = FakeClient(_chunks(sizes))
    app = _run(1000, client)
    if refused:
        assert client.status == 413 and not app.bodies
    else:
        assert client.status == 200 and app.bodies == [b"x" * sum(sizes)]


def test_refusal_stops_reading_the_upload():
    client = FakeClient(_chunks([600] * 100, last_more=True))
    _run(1000, client)
    assert client.status == 413 and client.received == 2  # not the other 98 chunks


def test_disconnect_mid_upload_calls_nothing():
    client = FakeClient([*_chunks([100], last_more=True), {"type": "http.disconnect"}])
    app = _run(1000, client)
    assert not app.bodies and not client.sent


def test_slow_body_gets_408():
    client = FakeClient(_chunks([10], last_more=True))  # then silence
    app = _run(1000, client, timeout=0.2)
    assert client.status == 408 and not app.bodies


def test_after_the_body_receive_reaches_the_client():
    """The app sees the client's disconnect after the replayed body (SGLang polls for it)."""
    seen = []

    async def app(scope, receive, send):
        seen.append(await receive())
        seen.append(await receive())

    client = FakeClient([*_chunks([5]), {"type": "http.disconnect"}])
    asyncio.run(http_guard.RequestBodyLimit(app, max_bytes=100, read_timeout_s=5)(
        client.scope, client.receive, client.send))
    assert seen[0]["body"] == b"xxxxx" and seen[1]["type"] == "http.disconnect"


def test_no_limit_passes_through():
    client = FakeClient(_chunks([5000]), content_length=5000)
    app = _run(0, client)
    assert client.status == 200 and app.bodies == [b"x" * 5000]


# ---- error messages on SGLang's real request models ------------------------------------------------
def _errors(payload: dict):
    from pydantic import ValidationError
    from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest

    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate(payload)
    return e.value.errors()


@pytest.mark.parametrize("payload,expected,absent", [
    ({"model": "m", "messages": [{"role": "user", "content": 42}]},
     "messages.0.content: Input should be a valid string or a valid list", "role"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"},
     "max_tokens", "function-after"),
    ({"model": "m", "messages": "hello"}, "messages", "Traceback"),
])
def test_validation_message_names_the_field(payload, expected, absent):
    message = http_guard.validation_message(_errors(payload))
    assert expected in message and absent not in message, message
    assert "[" not in message.split(":")[0]  # no union-member tags in the field name


def test_json_error_message():
    errors = [{"type": "json_invalid", "loc": ("body", 57), "msg": "JSON decode error", "input": {},
               "ctx": {"error": "unexpected end of data"}}]
    assert http_guard.validation_message(errors) == "The request body is not valid JSON: unexpected end of data."


@pytest.mark.parametrize("chunk,expected", [
    (b'data: {"error": {"message": "no", "code": 400}}\n\n', (400, "no")),
    (b'data: {"text": "", "meta_info": {"finish_reason": {"type": "abort", "status_code": 400, "message": "m"}}}\n\n',
     (400, "m")),
    (b'data: {"text": "", "meta_info": {"finish_reason": {"type": "abort", "status_code": 503, "message": "m"}}}\n\n',
     None),
    (b'data: {"text": "a", "meta_info": {"finish_reason": null}}\n\n', None),
    (b"data: [DONE]\n\n", None),
])
def test_stream_refusal_detection(chunk, expected):
    assert http_guard._stream_refusal(chunk) == expected


# ---- media sources -------------------------------------------------------------------------------
@pytest.fixture
def media(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    (root / "red.png").write_bytes(base64.b64decode(image_url("red").split(",", 1)[1]))
    os.symlink("/etc/hostname", root / "out.png")
    os.symlink(root / "red.png", root / "in.png")
    (tmp_path / "secret.png").write_bytes(b"x")
    return root


def _png(w, h) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def test_default_policy_is_data_urls_only(media):
    limits = ServingLimits()
    assert media_policy.check_media_item(image_url(), limits=limits) is None
    assert media_policy.check_media_item(image_url().split(",", 1)[1], limits=limits) is None  # bare base64
    assert media_policy.check_media_item({"url": image_url()}, limits=limits) is None
    refusals = {media_policy.check_media_item(s, limits=limits)
                for s in (str(media / "red.png"), "/no/such.png", f"file://{media}/red.png", "FILE:///etc/hostname")}
    assert len(refusals) == 1 and "--allowed-local-media-path" in refusals.pop()
    for url in ("http://example.com/a.png", "https://127.0.0.1/x", "HTTP://[::1]/x"):
        assert "--allow-image-urls" in media_policy.check_media_item(url, limits=limits)
    assert "data:" in media_policy.check_media_item("not base64 at all!", limits=limits)


def test_local_files_inside_the_directory_only(media, tmp_path):
    limits = ServingLimits(allowed_local_media_path=str(media)).checked()
    ok = [str(media / "red.png"), f"file://{media}/red.png", str(media / "in.png"), f"{media}/./red.png"]
    for source in ok:
        assert media_policy.check_media_item(source, limits=limits) is None, source
    outside = [str(media / "out.png"), f"{media}/../secret.png", f"file://{media}/../secret.png",
               f"file://{media}/%2e%2e/secret.png", "/etc/hostname", f"{media}/sub/../../secret.png"]
    for source in outside:
        assert "outside" in media_policy.check_media_item(source, limits=limits), source
    assert "No such" in media_policy.check_media_item(str(media / "missing.png"), limits=limits)


@pytest.mark.parametrize("w,h,refused", [(4096, 4096, False), (4097, 4096, True), (20000, 20000, True)])
def test_pixel_cap_from_the_header(w, h, refused, tmp_path):
    png = _png(w, h)
    limits = ServingLimits()
    got = media_policy.check_media_item("data:image/png;base64," + base64.b64encode(png).decode(), limits=limits)
    assert (got is not None and "pixels" in got) == refused, got
    (tmp_path / "a.png").write_bytes(png)
    local = ServingLimits(allowed_local_media_path=str(tmp_path)).checked()
    got = media_policy.check_media_item(str(tmp_path / "a.png"), limits=local)
    assert (got is not None and "pixels" in got) == refused, got


def test_pixel_cap_where_sglang_decodes(monkeypatch):
    from PIL import Image

    calls = []
    small, big = Image.open(io.BytesIO(_png(8, 8))), Image.open(io.BytesIO(_png(5000, 5000)))
    assert media_policy.fully_load_pil_image(lambda im: calls.append(im) or im, small) is small
    with pytest.raises(ValueError, match="pixels"):
        media_policy.fully_load_pil_image(lambda im: calls.append(im), big)
    assert calls == [small]  # the big one was never decoded


@pytest.mark.parametrize("address,public", [
    ("93.184.216.34", True), ("2606:2800:220:1:248:1893:25c8:1946", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("::1", False), ("fe80::1", False), ("fd00::1", False), ("::ffff:127.0.0.1", False),
])
def test_address_rule(monkeypatch, address, public):
    import socket

    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [(family, 1, 6, "", (address, 0))])
    assert (media_policy.address_error("some.host") is None) == public


def test_every_resolved_address_must_be_public(monkeypatch):
    import socket

    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [(2, 1, 6, "", ("93.184.216.34", 0)),
                                                                (2, 1, 6, "", ("10.0.0.1", 0))])
    assert media_policy.address_error("rebinding.example") is not None


def test_allow_listed_hosts_skip_the_address_rule(monkeypatch):
    from sglang.srt.utils import common

    limits = ServingLimits(allow_media_urls=True)
    monkeypatch.setattr(common, "_allowed_media_domains", {"127.0.0.1"}, raising=False)
    monkeypatch.setattr(media_policy, "current", lambda: limits)
    assert media_policy.url_error("http://127.0.0.1:9/a.png", limits) is None
    assert media_policy.url_error("http://localhost:9/a.png", limits) is not None
    assert media_policy.url_error("ftp://127.0.0.1/a.png", limits) is not None
    # at fetch time (every redirect hop): SGLang's own check first, then ours
    seen = []
    media_policy.assert_media_url_allowed(seen.append, "http://127.0.0.1:9/a.png")
    with pytest.raises(ValueError):
        media_policy.assert_media_url_allowed(seen.append, "http://169.254.169.254/latest/")
    assert seen == ["http://127.0.0.1:9/a.png", "http://169.254.169.254/latest/"]


# ---- limits from the environment ------------------------------------------------------------------
def test_limits_round_trip_through_the_environment(tmp_path):
    limits = ServingLimits(max_request_bytes=123, max_images=2, max_image_pixels=99, max_request_pixels=7,
                           allow_media_urls=True,
                           allowed_local_media_path=str(tmp_path), request_read_timeout_s=2.5).checked()
    assert ServingLimits.from_env(limits.env()) == limits
    assert ServingLimits.from_env({}) == ServingLimits()
    with pytest.raises(ValueError, match=ENV["max_images"]):
        ServingLimits.from_env({ENV["max_images"]: "many"})
    with pytest.raises(ValueError, match="not a directory"):
        ServingLimits.from_env({ENV["allowed_local_media_path"]: str(tmp_path / "nope")})


# ---- spec refusals: the HTTP process and the scheduler agree --------------------------------------
@pytest.mark.parametrize("options", [
    {}, {"temperature": 0.7, "top_p": 0.9}, {"json_schema": "{}"}, {"regex": "a+"}, {"frequency_penalty": 0.5},
    {"presence_penalty": 0.1}, {"repetition_penalty": 1.2}, {"repetition_penalty": 1.0}, {"min_p": 0.1},
    {"logit_bias": {"1": 2.0}}, {"min_new_tokens": 3}, {"custom_params": {"draft_length": 4}},
    {"custom_params": {"draft_length": 32}}, {"custom_params": {"draft_length": True}},
])
def test_http_side_and_scheduler_side_refusals_agree(options):
    """spec: the HTTP process and the scheduler give the same answer; mdm: the same, and it refuses
    exactly grammars, min_new_tokens and non-neutral penalties among these."""
    from sglang.srt.sampling.sampling_params import SamplingParams

    from fast_dvlm_sglang.sglang_plugin.request_checks import spec_refusal

    sp = SamplingParams(max_new_tokens=4, **options)
    http_side = spec_refusal(options.get, None, lambda: 32)
    scheduler_side = spec_refusal(lambda name: getattr(sp, name, None), None, lambda: 32)
    assert http_side == scheduler_side
    bad = set(options) - {"temperature", "top_p", "custom_params", "min_p", "logit_bias", "min_new_tokens",
                          "frequency_penalty", "presence_penalty", "repetition_penalty", "json_schema", "regex"}
    bad_k = options.get("custom_params", {}).get("draft_length", 0)
    assert (http_side is None) == (not bad and isinstance(bad_k, int) and not isinstance(bad_k, bool)
                                   and 0 <= bad_k < 32)
    from fast_dvlm_sglang.sglang_plugin.request_checks import mdm_refusal

    mdm_http, mdm_scheduler = mdm_refusal(options.get, False, None), mdm_refusal(lambda n: getattr(sp, n, None), False, None)
    assert mdm_http == mdm_scheduler
    mdm_ok = {k: v for k, v in options.items()
              if k not in ("json_schema", "regex", "min_new_tokens", "frequency_penalty", "presence_penalty")
              and not (k == "repetition_penalty" and v != 1.0)}
    assert (mdm_http is None) == (mdm_ok == options)


@pytest.mark.parametrize("asked", [False, True, "last"])
def test_hidden_states_are_refused_by_mdm_alone_on_both_sides(asked):
    """Spec returns hidden states (tests/sglang/test_spec_hidden_states.py); MDM refuses them, in
    the HTTP process and in the scheduler alike."""
    from types import SimpleNamespace

    from sglang.srt.sampling.sampling_params import SamplingParams

    from fast_dvlm_sglang.sglang_plugin.algorithm import FastDVLMBlock
    from fast_dvlm_sglang.sglang_plugin.request_checks import mdm_refusal, spec_refusal

    http_side = mdm_refusal({}.get, False, None, hidden_states=bool(asked))
    req = SimpleNamespace(sampling_params=SamplingParams(max_new_tokens=4), return_logprob=False,
                          custom_logit_processor=None, return_hidden_states=asked)
    assert FastDVLMBlock.validate_request(req) == http_side
    assert (http_side is not None) == bool(asked)
    if asked:
        assert "return_hidden_states" in http_side and "mdm" in http_side
    assert spec_refusal({}.get, None, lambda: 32) is None
