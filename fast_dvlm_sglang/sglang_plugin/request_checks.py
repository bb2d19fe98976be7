"""One validation layer for every endpoint (chat, completions, native `/generate`), streamed or not.

Every refusal here is a ValueError raised in the HTTP process before the request reaches the
scheduler, so SGLang answers it with HTTP 400 (its OpenAI handlers kick-start a stream before
sending any byte; `http_guard.serve_generate_request` does the same for `/generate`):

- `TokenizerManager.generate_request` (all endpoints end here, before tokenization or any media
  is loaded): the options `FastDVLMSpeculative` cannot honour, media count and sources
  (`media_policy.py`), `input_ids` inside the vocabulary (an id past it crashed the scheduler in
  the embedding), and a text far longer than the context can hold (refused before a multi-MB
  string is tokenized);
- `TokenizerManager._validate_one_request` (after tokenization): for our dLLM algorithms, a
  prompt that with one decoding block can never fit in the KV pool (`kv_pressure.py` keeps the
  same check in the scheduler as a backstop);
- the OpenAI handlers' `_validate_request` (chat and completions): the `model` name (the served
  name, or "default" as SGLang's own clients send) and the text size of messages or prompts, which
  chat tokenizes while converting the request.

Each check applies only when the server serves our architecture; other models see SGLang as is.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache

from fast_dvlm_sglang.config import ARCHITECTURE

from .limits import current
from .media_policy import check_media_item, image_pixels

# A token never covers more than its longest vocabulary string; Unicode normalization (NFC) can
# merge up to a few characters into one, hence the margin. Refusing above this bound is exact.
NORMALIZATION_MARGIN = 4


def serves_our_model(tokenizer_manager) -> bool:
    try:
        archs = tokenizer_manager.model_config.hf_config.architectures or []
    except AttributeError:
        return False
    return ARCHITECTURE in archs


def _algorithm(tokenizer_manager) -> str | None:
    from sglang.srt.arg_groups.overrides import resolving_view

    return resolving_view(tokenizer_manager.server_args).dllm_algorithm


@cache
def _configured_block_size(algorithm_config_path: str | None) -> int | None:
    from .attention_modes import algorithm_config

    value = algorithm_config(algorithm_config_path).get("block_size")
    return None if value is None else int(value)


def block_size(tokenizer_manager) -> int:
    """The served block size, as `dllm_config.from_server_args_hook` resolves it."""
    from sglang.srt.arg_groups.overrides import resolving_view

    from fast_dvlm_sglang.config import DEFAULT_BLOCK_SIZE

    configured = _configured_block_size(resolving_view(tokenizer_manager.server_args).dllm_algorithm_config)
    if configured is not None:
        return configured
    return int(getattr(tokenizer_manager.model_config.hf_config, "bd_size", None) or DEFAULT_BLOCK_SIZE)


def _as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _per_request(value, batch: int) -> list:
    """A per-request field of a GenerateReqInput (a scalar for all, or one entry per request)."""
    return value if isinstance(value, list) else [value] * batch


def _media_items(data) -> list:
    """The media items of a request's `image_data` (one item, a list, or a list per request)."""
    out = []
    for entry in _as_list(data):
        out.extend(entry if isinstance(entry, list) else [entry])
    return out


def _max_token_chars(tokenizer) -> int:
    try:
        vocab = tokenizer.get_vocab()
    except Exception:
        return 0
    return max((len(t) for t in vocab), default=0)


_TOKEN_CHARS: dict[int, int] = {}


def text_too_long(tokenizer_manager, chars: int) -> str | None:
    """A text of `chars` characters that no tokenization can fit in the context (None: maybe fits)."""
    tokenizer = getattr(tokenizer_manager, "tokenizer", None)
    context = getattr(tokenizer_manager, "context_len", None)
    if tokenizer is None or not context:
        return None
    key = id(tokenizer)
    if key not in _TOKEN_CHARS:
        _TOKEN_CHARS[key] = _max_token_chars(tokenizer)
    longest = _TOKEN_CHARS[key]
    if not longest:
        return None
    bound = context * longest * NORMALIZATION_MARGIN
    if chars <= bound:
        return None
    return (f"The input has {chars} characters: more than any prompt that fits this model's context of "
            f"{context} tokens can have ({bound}).")


def _neither_algorithm_honours(get, return_logprob: bool, custom_logit_processor) -> list[str]:
    """Beam search, logprobs and custom logit processors: refused by both dLLM algorithms."""
    refused = []
    if get("beam_width") is not None:
        refused.append("beam search")
    if return_logprob:
        refused.append("logprobs")
    if custom_logit_processor:
        refused.append("custom logit processors")
    return refused


def spec_refusal(get, custom_logit_processor, block_size, *, sampling_mask: bool = False) -> str | None:
    """What `FastDVLMSpeculative` cannot honour, from a request's sampling parameters (`get(name)`,
    SamplingParams field names; `block_size()` is asked only when needed). Output logprobs
    (`logprobs`, `top_logprobs`, `token_ids_logprob`) and prompt logprobs (`logprob_start_len` >=
    0, completions' `echo`: the causal context pass computes them,
    `spec_scheduler.record_prompt_logprobs`) are served; SGLang's sampling masks are not. Shared
    by the HTTP process and the scheduler."""
    from . import SPEC_ALGORITHM_NAME

    refused = _neither_algorithm_honours(get, False, custom_logit_processor)
    if sampling_mask:
        refused.append("return_sampling_mask")
    if refused:
        return f"{SPEC_ALGORITHM_NAME} does not support {', '.join(refused)}"
    custom = get("custom_params")
    if isinstance(custom, dict) and "draft_length" in custom:
        k, block = custom["draft_length"], block_size()
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < block:
            return f"custom_params.draft_length must be an integer in [0, {block - 1}], got {k!r}"
    return None


def mdm_refusal(get, return_logprob: bool, custom_logit_processor, hidden_states: bool = False) -> str | None:
    """What `FastDVLMBlock` cannot honour exactly (same arguments as `spec_refusal`). MDM commits
    tokens by confidence, several per forward and out of order within a sub-block: there is no
    left-to-right sampling step where a grammar, a per-position logprob, an output count (the
    penalties, min_new_tokens) or a logit processor would apply. `logit_bias` is the same at every
    position and is applied (`algorithm.with_logit_bias`). Sampling settings (temperature, top_p,
    top_k, min_p, seed) are accepted and not applied: MDM is greedy (README). Hidden states
    (`return_hidden_states`) neither: a token has no row that produced it alone."""
    from . import ALGORITHM_NAME

    refused = _neither_algorithm_honours(get, return_logprob, custom_logit_processor)
    if hidden_states:
        refused.append("return_hidden_states")
    if get("json_schema") or get("regex") or get("ebnf") or get("structural_tag"):
        refused.append("constrained decoding (json_schema / regex / ebnf / structural_tag)")
    if get("min_new_tokens"):
        refused.append("min_new_tokens")
    for name, neutral in (("frequency_penalty", 0.0), ("presence_penalty", 0.0), ("repetition_penalty", 1.0)):
        value = get(name)
        if value is not None and float(value) != neutral:
            refused.append(name)
    if refused:
        return f"{ALGORITHM_NAME} (mdm) does not support {', '.join(refused)}; use the spec or ar algorithm"
    return None


def _ids_error(input_ids, vocab_size: int) -> str | None:
    rows = input_ids if input_ids and isinstance(input_ids[0], list) else [input_ids]
    for row in rows:
        for i, token in enumerate(row):
            if not 0 <= token < vocab_size:
                return f"input_ids[{i}] = {token} is outside the vocabulary [0, {vocab_size})."
    return None


def _texts(text) -> Iterable[str]:
    for t in _as_list(text):
        if isinstance(t, str):
            yield t


def generate_request_error(tokenizer_manager, obj) -> str | None:
    """Why SGLang must refuse `obj` (a GenerateReqInput, before normalization); None: go on."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    from . import ALGORITHM_NAME, SPEC_ALGORITHM_NAME

    if not isinstance(obj, GenerateReqInput) or not serves_our_model(tokenizer_manager):
        return None
    algorithm = _algorithm(tokenizer_manager)
    params = [p or {} for p in _as_list(obj.sampling_params)] or [{}]
    if algorithm in (SPEC_ALGORITHM_NAME, ALGORITHM_NAME):
        batch = max(len(params), len(_as_list(obj.text)) or 1)

        def each(value, i):
            values = _per_request(value, batch)
            return values[min(i, len(values) - 1)] if values else None

        for i, p in enumerate(params):
            logprob, processor = bool(each(obj.return_logprob, i)), each(obj.custom_logit_processor, i)
            if algorithm == SPEC_ALGORITHM_NAME:
                error = spec_refusal(p.get, processor, lambda: block_size(tokenizer_manager),
                                     sampling_mask=bool(each(obj.return_sampling_mask, i)))
            else:
                error = mdm_refusal(p.get, logprob, processor, hidden_states=bool(each(obj.return_hidden_states, i)))
            if error:
                return error
    limits = current()
    for modality, data in (("image", obj.image_data), ("video", obj.video_data), ("audio", obj.audio_data)):
        items = _media_items(data)
        if modality == "image" and limits.max_images and len(items) > limits.max_images:
            return (f"The request has {len(items)} images; this server accepts at most {limits.max_images} "
                    "per request (--max-images).")
        if modality == "video" and limits.max_videos and len(items) > limits.max_videos:
            return (f"The request has {len(items)} videos; this server accepts at most {limits.max_videos} "
                    "per request (--max-videos).")
        for item in items:
            error = check_media_item(item, modality, limits)
            if error:
                return error
        if modality == "image" and limits.max_request_pixels and len(items) > 1:
            total = sum(image_pixels(item) for item in items)
            if total > limits.max_request_pixels:
                return (f"The request's images have {total} pixels in all; this server decodes at most "
                        f"{limits.max_request_pixels} per request (--max-request-pixels).")
    if obj.input_ids is not None:
        error = _ids_error(obj.input_ids, tokenizer_manager.model_config.vocab_size)
        if error:
            return error
    for text in _texts(obj.text):
        error = text_too_long(tokenizer_manager, len(text))
        if error:
            return error
    return None


async def _refused(message: str):
    raise ValueError(message)
    yield  # an async generator, as the original is


# ---- hooks (listed in `hooks.HOOK_TARGETS`) -----------------------------------------------------
def generate_request(original, tokenizer_manager, obj, request=None):
    error = generate_request_error(tokenizer_manager, obj)
    if error:
        return _refused(error)
    return original(tokenizer_manager, obj, request)


EMPTY_PROMPT = "The prompt is empty (0 tokens): there is nothing to continue from; send at least one token."


def after_validate_one_request(result, tokenizer_manager, obj, input_ids):
    """After tokenization: an empty prompt (any algorithm), and a dLLM prompt that with one block
    can never fit in the KV pool."""
    from . import ALGORITHM_NAME, SPEC_ALGORITHM_NAME
    from .kv_pressure import never_fits_message

    if input_ids is None or not serves_our_model(tokenizer_manager):
        return None
    # An empty text (`/generate` "text": ""; the tokenizer adds no BOS) reached the scheduler as a
    # 0-token prefill and killed the server, AR included (the attention reshapes 0 query rows;
    # spec has no seed). SGLang refuses empty input_ids and an empty completions prompt itself,
    # and lets a session request through, whose history the scheduler prepends.
    session = obj.session_params.get("id") if isinstance(getattr(obj, "session_params", None), dict) else None
    if len(input_ids) == 0 and not session:
        raise ValueError(EMPTY_PROMPT)
    if _algorithm(tokenizer_manager) not in (ALGORITHM_NAME, SPEC_ALGORITHM_NAME):
        return None
    pool = _pool_tokens()
    if pool:
        message = never_fits_message(len(input_ids), block_size(tokenizer_manager), pool)
        if message:
            raise ValueError(message)
    return None


def _pool_tokens() -> int | None:
    try:
        from sglang.srt.entrypoints import http_server

        return int(http_server._global_state.scheduler_info["max_total_num_tokens"])
    except (AttributeError, KeyError, TypeError, ValueError):
        return None  # no HTTP server (the Engine API): the scheduler's check answers


def model_error(serving, model: str | None) -> str | None:
    served = serving.tokenizer_manager.served_model_name
    if model and model not in (served, "default"):
        return f"The model {model!r} does not exist; this server serves {served!r}."
    return None


def _message_chars(messages) -> int:
    total = 0
    for message in messages or []:
        content = getattr(message, "content", None)
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            for part in content:
                text = getattr(part, "text", None)
                if isinstance(text, str):
                    total += len(text)
    return total


def after_validate_chat_request(error, serving, request):
    if error or not serves_our_model(serving.tokenizer_manager):
        return None
    return model_error(serving, request.model) or text_too_long(serving.tokenizer_manager,
                                                                _message_chars(request.messages))


def after_validate_completion_request(error, serving, request):
    if error or not serves_our_model(serving.tokenizer_manager):
        return None
    chars = sum(len(p) for p in _as_list(request.prompt) if isinstance(p, str))
    return model_error(serving, request.model) or text_too_long(serving.tokenizer_manager, chars)
