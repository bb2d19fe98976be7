"""Structured outputs (json_schema / regex / ebnf / structural_tag) for `FastDVLMSpeculative`.

SGLang compiles a request's grammar with its grammar backend (xgrammar) and puts the matcher on
`req.grammar`; its AR sampler masks each position with the tokens the matcher allows and then
advances the matcher by the chosen token. A speculative round does the same at every verify
position, given the drafts before it:

1. `walk` (between the draft and the verify pass; the matcher stands after the committed output,
   the round's seed included): fill the mask of verify position 0; pick the draft d_1 among the
   draft pass's best candidates for it, the first the mask allows (so drafts are grammatical and
   the verify pass can accept them; where the grammar allows one token only, that one); advance
   the matcher by d_1; fill the mask of position 1; ...
   up to the row's width, a position where no candidate is allowed, or a draft that terminates
   the grammar (a stop token: the round then accepts at most the drafts before it, so a stop is
   always the next seed, chosen by the verify pass under its mask);
2. `apply`: the verify pass's logits of positions 0..m get those masks, so each verify choice is
   AR's choice given the drafts before it, and a row accepts at most its m walked drafts;
3. `commit` (the scheduler's step): roll the matcher back to the accepted drafts and advance it
   by the next seed (chosen under its position's mask, so the matcher accepts it), before
   SGLang's finish checks, which end the request once the grammar has terminated.
The context pass masks its last position the same way; its seed is accepted when the scheduler
commits it (`spec_scheduler.adopt_context_state`: after the last chunk of a chunked pass only).

Drafts from the top `DRAFT_CANDIDATES` of the draft logits cost one host sync for the batch (its
rows with a grammar), then host work only: the matcher is a CPU object, as in SGLang's AR path.
`constrain_drafts: false` in `--dllm-algorithm-config` keeps the plain argmax drafts instead (the
walk then stops at the first draft the grammar forbids); `benchmarks/bench_structured_output.py`
measures what each costs and saves.

SGLang 0.5.23's dLLM scheduler never moves a request whose grammar compiles asynchronously from
its grammar queue to the waiting queue (only the AR prefill path polls that queue), so such a
request would wait forever: `release_ready_grammar_requests` polls it before each dLLM batch.
"""

from __future__ import annotations

import torch

# How many draft-pass candidates per position the walk may try (best first).
DRAFT_CANDIDATES = 16
# Grammar backends whose masks are xgrammar's packed int32 bitmask (one bit per token, 1 = allowed),
# which `allows` reads on the host.
SUPPORTED_BACKENDS = ("xgrammar",)


def usable(grammar) -> bool:
    """A compiled matcher that still constrains: not None, not a pending compile (a Future), not
    terminated."""
    return grammar is not None and hasattr(grammar, "fill_vocab_mask") and not grammar.is_terminated()


def allocate(grammar, rows: int, vocab_size: int) -> torch.Tensor:
    """A host mask of `rows` positions, every token allowed (the backend's own buffer)."""
    return grammar.allocate_vocab_mask(vocab_size=vocab_size, batch_size=rows, device="cpu")


def allows(mask: torch.Tensor, row: int, token: int) -> bool:
    """Whether bitmask row `row` allows `token` (Python's >> on a negative int32 sign-extends, so
    bit 31 reads right)."""
    return bool((int(mask[row, token >> 5]) >> (token & 31)) & 1)


# Set bits per byte value: a mask row's allowed-token count without a Python loop over its words.
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)


def only_allowed(mask: torch.Tensor, row: int) -> int | None:
    """The token of bitmask row `row` if it allows exactly one (a position the grammar forces:
    JSON punctuation, a key, the rest of an enum value), else None. Bytes of the little-endian
    int32 words: token = byte index * 8 + bit."""
    data = mask[row].contiguous().view(torch.uint8)
    counts = _POPCOUNT[data.long()]
    if int(counts.sum()) != 1:
        return None
    byte = int(counts.nonzero()[0, 0])
    return byte * 8 + int(data[byte]).bit_length() - 1


def walk(grammar, candidates: list[list[int]], width: int, mask: torch.Tensor, start: int
         ) -> tuple[list[int], bool]:
    """Advance `grammar` through the drafts of a row of `width` verify positions whose flat rows
    start at `start`: fill mask row start + j for position j, pick d_{j+1} from `candidates[j]`
    (best first; the first the mask allows), or the one token the mask allows when it forces one
    (the verify pass can choose nothing else). Returns the walked drafts d_1..d_m (the matcher
    has accepted them) and whether the last of them terminated the grammar. Positions after m
    keep an all-allowed mask: the verify pass never reaches them."""
    drafts: list[int] = []
    for j in range(width):
        grammar.fill_vocab_mask(mask, start + j)
        if j == width - 1:
            break
        token = next((t for t in candidates[j] if allows(mask, start + j, t)), None)
        if token is None:
            token = only_allowed(mask, start + j)
        if token is None:
            break
        grammar.accept_token(token)
        drafts.append(token)
        if grammar.is_terminated():
            return drafts, True
    return drafts, False


def acceptable_drafts(walked: int, terminated: bool) -> int:
    """Most drafts a row may accept after its walk: all walked ones, but not a terminating one
    (the stop then comes as the next seed, the verify pass's choice)."""
    return walked - 1 if terminated else walked


def apply(logits: torch.Tensor, grammar, mask: torch.Tensor) -> None:
    """Mask `logits` [T, V] in place with host mask [T, words] (the backend's device kernel)."""
    grammar.apply_vocab_mask(logits, grammar.move_vocab_mask(mask, logits.device))


def commit(grammar, walked: int, accepted: int, seed: int) -> None:
    """After a round that accepted `accepted` of the `walked` drafts the matcher went through:
    roll back the rest and advance by the next seed."""
    if not 0 <= accepted <= walked:
        raise ValueError(f"a round accepted {accepted} drafts, the grammar walked {walked}")
    if walked > accepted:
        grammar.rollback(walked - accepted)
    grammar.accept_token(seed)


# ---- hook (listed in `hooks.HOOK_TARGETS`) ----------------------------------------------------------
def release_ready_grammar_requests(scheduler, *args, **kwargs):
    """Before each dLLM batch: requests whose grammar has compiled (or failed, or timed out: SGLang
    then aborts them) go from the grammar queue to the waiting queue, as SGLang's AR prefill path
    does (`Scheduler._get_new_batch_prefill_raw`). A request there passed `validate_dllm_request`:
    the algorithm accepted its grammar."""
    manager = getattr(scheduler, "grammar_manager", None)
    if manager is not None and manager.has_waiting_grammars():
        for req in manager.get_ready_grammar_requests():
            scheduler._add_request_to_queue(req)
    return None
