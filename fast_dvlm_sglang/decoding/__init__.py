"""Reference decoders: `ar`, `mdm` (Fast-dLLM v2 block diffusion) and `spec` (self-speculative).

Entry point: `generate(model, prompt, GenerationConfig(...), tokenizer=None) -> GenerationResult`.
The decision rules (`mdm.confidence_unmask`, `spec.accept_longest_prefix`) are pure batched tensor
functions shared with the SGLang plugin; the loops here run one request at a time as the oracle.
"""

from __future__ import annotations

from .ar import ar_decode
from .mdm import mdm_decode
from .output import OutputTokens
from .sampling import SamplingParams
from .session import DecodeSession, Prompt
from .spec import spec_decode
from .stopping import StopCriteria, visible_text
from .types import ALGORITHMS, GenerationConfig, GenerationResult

__all__ = ["ALGORITHMS", "GenerationConfig", "GenerationResult", "Prompt", "SamplingParams", "generate"]


def generate(model, prompt: Prompt, config: GenerationConfig, tokenizer=None, cache=None) -> GenerationResult:
    cfg = model.config
    eos = cfg.eos_token_ids if config.eos_token_ids is None else config.eos_token_ids
    if config.stop_strings and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode the output")
    decode = (lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)) if tokenizer is not None else None
    criteria = StopCriteria(config.max_new_tokens, frozenset(eos), tuple(config.stop_strings))
    out = OutputTokens(criteria, decode)
    session = DecodeSession(model, prompt, cache)
    params = config.sampling
    generator = params.make_generator(model.device)
    block_size = config.block_size or cfg.block_size
    accepted: list[int] = []
    if config.algorithm == "ar":
        ar_decode(session, out, params, generator, stop_token_ids=tuple(eos))
    elif config.algorithm == "mdm":
        if params.penalizes or params.min_new_tokens:
            raise ValueError("mdm does not support min_new_tokens or penalties: a block's positions are "
                             "chosen together, not one after another as AR chooses them")
        mdm_decode(session, out, params, generator, block_size=block_size, sub_block_size=config.sub_block_size,
                   threshold=config.threshold, mask_id=cfg.mask_token_id)
    else:
        accepted = spec_decode(session, out, params, generator, block_size=block_size, mask_id=cfg.mask_token_id,
                               policy=config.draft_policy, stop_token_ids=tuple(eos))
    text = visible_text(decode(out.tokens), config.stop_strings) if decode is not None else None
    return GenerationResult(config.algorithm, list(out.tokens), text, session.nfe, out.finish_reason or "length", accepted)
