"""The HTTP edge of a Fast-dVLM server: body limit, error bodies, `/generate` stream refusals.

Installed on SGLang's FastAPI app by an AROUND hook on `http_server._setup_and_run_http_server`
(the last step before uvicorn starts, in the process that serves HTTP):

- `RequestBodyLimit` (pure ASGI, outermost): a body is counted as it arrives, before anything
  parses it. A declared `Content-Length` over the limit is answered 413 at once without reading;
  a chunked body is cut off with 413 as soon as it passes the limit; a body that does not arrive
  within `request_read_timeout_s` gets 408; a client that disconnects mid-upload costs nothing more. So
  server memory per request is bounded by the limit, not by what a client sends (SGLang 0.5.23
  has no such limit: a 90 MB chat body grew its tokenizer process to 16 GB).
- request-validation errors (malformed JSON, wrong field types): a one-line message naming the
  field, no Python traceback or server path (SGLang's handler appends both), for every route
  but `/v1/messages` and `/v1/systemone`, which keep SGLang's documented formats.
- `/generate` streams (`serve_generate_request`): SGLang sends HTTP 200 and then a refusal as an
  SSE event; we wait for the stream's first event, as SGLang's OpenAI handlers do, and answer a
  refusal as a 4xx before any byte is sent.

Errors use OpenAI's envelope: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import json
import logging

from .limits import current

logger = logging.getLogger(__name__)

def error_body(message: str, code: int, kind: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


class RequestBodyLimit:
    """ASGI middleware: at most `max_bytes` of request body, counted before parsing."""

    def __init__(self, app, max_bytes: int, read_timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.max_bytes:
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            return await self._refuse(send, 413, self._too_large(declared))
        chunks, total = [], 0
        try:
            async with asyncio.timeout(self.read_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None  # the client went away mid-upload: nothing to answer
                    body = message.get("body", b"")
                    total += len(body)
                    if total > self.max_bytes:
                        return await self._refuse(send, 413, self._too_large(None))
                    if body:
                        chunks.append(body)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            return await self._refuse(send, 408, f"The request body did not arrive within {self.read_timeout_s:g} s.")
        body = b"".join(chunks)
        del chunks
        replayed = False

        async def replay():
            nonlocal replayed, body
            if replayed:
                return await receive()  # after the body: disconnect detection, as before
            replayed = True
            message, body = {"type": "http.request", "body": body, "more_body": False}, b""
            return message

        return await self.app(scope, replay, send)

    def _too_large(self, declared: int | None) -> str:
        size = f"of {declared} bytes " if declared is not None else ""
        return (f"The request body {size}exceeds this server's limit of {self.max_bytes} bytes "
                "(--max-request-bytes).")

    @staticmethod
    async def _refuse(send, status: int, message: str) -> None:
        payload = error_body(message, status)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # uvicorn refuses a malformed length itself
    return None


# ---- request-validation errors ----------------------------------------------------------------
def _is_tag(part) -> bool:
    """A pydantic location element naming a union member or type, not a field."""
    if not isinstance(part, str):
        return False
    return any(c in part for c in "[(") or part[:1].isupper() or part in ("str", "int", "float", "bool", "list",
                                                                          "dict", "none")


def _field(loc) -> str:
    parts = [str(p) for p in loc if p != "body" and not _is_tag(p)]
    return ".".join(parts)


def validation_message(errors) -> str:
    """One line naming each offending field: "messages.0.content: Input should be a valid string
    or a valid list". For a union (a chat message is one of several roles' models), the members
    that failed only because the role did not match are left out."""
    errors = list(errors or [])
    for e in errors:
        if e.get("type") == "json_invalid":
            detail = (e.get("ctx") or {}).get("error")
            return "The request body is not valid JSON" + (f": {detail}." if detail else ".")
    # A union member whose `role` did not match: its other errors are noise.
    wrong_role = {tuple(e["loc"][:-1]) for e in errors if len(e.get("loc", ())) > 1 and e["loc"][-1] == "role"}
    kept = [e for e in errors if not any(tuple(e.get("loc", ()))[:len(m)] == m for m in wrong_role)] or errors
    by_field: dict[str, list[str]] = {}
    for e in kept:
        msg = str(e.get("msg") or "invalid").strip()
        msg = msg.removeprefix("Value error, ")
        field = _field(e.get("loc", ()))
        if msg not in by_field.setdefault(field, []):
            by_field[field].append(msg)
    parts = []
    for field, msgs in by_field.items():
        text = msgs[0] + "".join(" or " + m.removeprefix("Input should be ") for m in msgs[1:])
        parts.append(f"{field}: {text}" if field else text)
    message = "; ".join(parts) or "Invalid request."
    return message if len(message) <= 500 else message[:500] + "..."


def _validation_handler(sglang_handler):
    async def handler(request, exc):
        path = request.url.path.removeprefix(request.scope.get("root_path", ""))
        if path.startswith("/v1/messages") or path == "/v1/systemone":
            return await sglang_handler(request, exc)
        from fastapi.responses import Response

        return Response(error_body(validation_message(exc.errors()), 400), status_code=400,
                        media_type="application/json")

    return handler


def install(app) -> None:
    """Our middleware and error handler on SGLang's app (idempotent; before it starts)."""
    if getattr(app.state, "fast_dvlm_guard", False):
        return
    from fastapi.exceptions import RequestValidationError

    limits = current()
    if limits.max_request_bytes:
        app.add_middleware(RequestBodyLimit, max_bytes=limits.max_request_bytes,
                           read_timeout_s=limits.request_read_timeout_s)
    sglang_handler = app.exception_handlers.get(RequestValidationError)
    if sglang_handler is not None:
        app.add_exception_handler(RequestValidationError, _validation_handler(sglang_handler))
    app.state.fast_dvlm_guard = True


# ---- hooks (listed in `hooks.HOOK_TARGETS`) -----------------------------------------------------
def setup_and_run_http_server(original, server_args, tokenizer_manager, *args, **kwargs):
    from sglang.srt.entrypoints import http_server

    from .request_checks import serves_our_model

    if tokenizer_manager is not None and serves_our_model(tokenizer_manager):
        if getattr(server_args, "tokenizer_worker_num", 1) > 1:
            logger.warning("fast_dvlm: --tokenizer-worker-num > 1: the request-body limit applies to the "
                           "main HTTP process only")
        install(http_server.app)
    return original(server_args, tokenizer_manager, *args, **kwargs)


def _stream_refusal(chunk) -> tuple[int, str] | None:
    """(status, message) if a `/generate` stream's first event is a refusal."""
    if isinstance(chunk, str):
        chunk = chunk.encode()
    if not isinstance(chunk, bytes | bytearray) or not chunk.startswith(b"data: {"):
        return None
    try:
        event = json.loads(chunk[len(b"data: "):])
    except ValueError:
        return None
    error = event.get("error")
    if isinstance(error, dict):
        return int(error.get("code") or 400), str(error.get("message") or "Bad request")
    reason = (event.get("meta_info") or {}).get("finish_reason")
    if isinstance(reason, dict) and reason.get("type") == "abort":
        status = reason.get("status_code")
        if isinstance(status, int) and 400 <= status < 500:
            return status, str(reason.get("message") or "Request refused")
    return None


async def serve_generate_request(original, obj, request):
    response = await original(obj, request)
    if not getattr(obj, "stream", False) or not hasattr(response, "body_iterator"):
        return response
    iterator = response.body_iterator
    try:
        first = await iterator.__anext__()
    except StopAsyncIteration:
        return response
    refusal = _stream_refusal(first)
    if refusal is not None:
        await iterator.aclose()
        from fastapi.responses import Response

        status, message = refusal
        return Response(error_body(message, status), status_code=status, media_type="application/json")

    async def replay_first():
        yield first
        async for chunk in iterator:
            yield chunk

    response.body_iterator = replay_first()
    return response


def freeze_gc_after_server_warmup(original, server_args, *args, **kwargs):
    """SGLang posts `/freeze_gc` to its own port once warmup is done; with `--skip-server-warmup`
    (our CPU default) that is at once, before uvicorn listens, and every start logged a
    connection-refused traceback with the GC left unfrozen. Wait (up to 60 s) for the port first."""
    import socket
    import time
    from urllib.parse import urlparse

    url = urlparse(server_args.url())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((url.hostname, url.port), timeout=1):
                break
        except OSError:
            time.sleep(0.2)
    return original(server_args, *args, **kwargs)
