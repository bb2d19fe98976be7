"""The n choices of one seeded request (`n > 1` with `seed`) are n different samples: choice k
samples with seed + k (wrapped to int64), so the same request gives the same n choices again and
choice 0 is the answer the request gives with n = 1 (vLLM's convention).

SGLang fans a request with `n > 1` out in `TokenizerManager._handle_batch_request`: after a
`max_new_tokens=0` warm-up that caches the prompt, it sends n shallow copies of the tokenized
request, in choice order, one `_send_one_request` each, all holding one `SamplingParams` object,
seed included. SGLang's AR sampler uses the seed only under `--enable-deterministic-inference`
(and then returns n copies of one sample); `FastDVLMSpeculative` always samples with the
request's own seeded generator (`speculative.SpecState.with_generator`), so without this every
choice would be the same answer: n copies of one sample, silently, for anyone who asks for several
samples with a seed (pass@k with a fixed seed, for one).

`before_send_one_request` (a BEFORE hook on `TokenizerManager._send_one_request`, listed in
`hooks.HOOK_TARGETS`) counts the sends of each shared `SamplingParams` and gives the k-th copy its
own params with seed + k. A params object sent alone (every request with n = 1, each prompt's
warm-up) is never changed.
"""

from __future__ import annotations

from .request_checks import serves_our_model

# Shared SamplingParams being fanned out: id -> (the object, copies sent so far). Holding the
# object keeps its id from being reused while it is counted; an entry leaves after the n-th copy.
# A fan-out cut short (a send that raised) leaves its entry: the oldest go past this many.
MAX_FAN_OUTS = 1024
_fan_outs: dict[int, tuple[object, int]] = {}


def choice_seed(seed: int, choice: int) -> int:
    """seed + choice in int64 (SGLang accepts seeds in [-2**63, 2**63 - 1])."""
    return (seed + choice + 2**63) % 2**64 - 2**63


def before_send_one_request(tokenizer_manager, tokenized_obj, *args, **kwargs):
    params = getattr(tokenized_obj, "sampling_params", None)
    if (params is None or getattr(params, "sampling_seed", None) is None or getattr(params, "n", 1) <= 1
            or not params.max_new_tokens or not serves_our_model(tokenizer_manager)):
        return None  # not a seeded fan-out copy (a warm-up generates nothing)
    import msgspec

    _, sent = _fan_outs.pop(id(params), (params, 0))
    if sent + 1 < params.n:
        _fan_outs[id(params)] = (params, sent + 1)
        while len(_fan_outs) > MAX_FAN_OUTS:
            del _fan_outs[next(iter(_fan_outs))]
    if sent:
        tokenized_obj.sampling_params = msgspec.structs.replace(
            params, sampling_seed=choice_seed(params.sampling_seed, sent))
    return None
