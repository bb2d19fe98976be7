"""`FastDVLMSpeculative`: self-speculative block decoding as an SGLang dLLM algorithm.

Per request (SGLang's separate-context-encoding flow plus the scheduler step of
`spec_scheduler.py`):

1. admission (`validate_request`, SGLang's per-request algorithm entry point): refuse what the
   algorithm cannot honour (beam search, custom logit processors, sampling masks) and put a `SpecState`
   with the request's sampling settings on the request (`req.dllm_algo_state`); a grammar
   (json_schema, regex, ...) is SGLang's matcher on `req.grammar`, walked through each round's
   drafts (`structured_output.py`);
2. the prompt (after a retraction: prompt + committed output) goes through one causal EXTEND
   forward, which writes its KV; its last logits give the *seed*, the next token: committed and
   streamed at once (`spec_scheduler.adopt_context_state`, so the first token arrives as soon as
   AR's), its KV not yet written; it is kept on the request's `SpecState`;
3. every round is one DLLM_EXTEND batch; request i holds w_i slots starting at its seed's
   position (the committed tokens whose KV exists end right before it), w_i chosen for the
   whole batch by `draft_length.py` (1: an AR step, up to `block_size`), run twice in place:
   - draft: [seed, MASK, ..., MASK] block-bidirectionally over the cached context; every mask is
     filled by argmax with the token shift (d_j = argmax logits[j-1]);
   - verify: [seed, d_1, ..., d_{w-1}] causally (same slots: its KV overwrites the draft's);
     v_j = the token chosen from logits[j-1] (argmax, or a sample from the request's own
     generator);
   - k = `accept_longest_prefix(d, v[:, :w-1], draft_len)` (the function the reference decoder
     uses, vectorised over the batch, on device); the round commits d_1..d_k and v_{k+1}, the
     next seed (k + 1 new tokens; the verify pass wrote the causal KV of the seed and of
     d_1..d_k, the next seed's is written by the next round).
   A row uses L = min(w, budget) verify tokens (the budget: tokens the request may still emit
   after the seed; the scheduler already caps w by it), so draft_len = L - 1: exactly the
   reference decoder's round of that width. When no row drafts (L == 1 everywhere: a batch of
   AR steps; or AR runs, `draft_length.py`) the round runs its steps as SGLang DECODE forwards
   over its slots (`_ar_steps`, `decode_steps.py`; under CUDA graphs one causal block forward,
   the verify pass alone). A request whose seed ends it (EOS, stop, last token of the budget)
   runs no further round. One host sync per round: the packed accept lengths, next seeds and
   drafts (a round of AR steps: its tokens).

Rows of different widths share the forwards: SGLang's extend metadata (`extend_seq_lens`) is per
row, only the positions SGLang lays out for a dLLM batch assume `block_size` slots per request,
so the round rewrites them (`round_layout`, one host-to-device copy with the seeds and the
index tables). The inputs are rewritten in place in `forward_batch.input_ids`, which SGLang's
runners copy into their static buffers on every forward. The verify pass is causal through
`attention_modes.causal_pass()`. A captured CUDA graph freezes one attention mode and one
canvas width, so with `cuda_graph: true` in the `--dllm-algorithm-config` YAML SGLang's decode
graph runner captures two graphs per batch size (bidirectional and causal,
`attention_modes.SpecAttentionModes`) of `block_size` slots per request, every row keeps the
whole block (`draft_length.py`: the batch drafts a full block or runs AR steps) and the causal
graph replays the verify pass; without it (the default, until this runs on a GPU with SGLang)
the decode CUDA graph is disabled for this algorithm (`configure_server_args`).

Sampling (temperature > 0): the draft stays argmax; the verify tokens of the first L
positions are drawn with `decoding.sampling.sample_tokens` from the
request's distribution (temperature / top-k / top-p) and a per-request `torch.Generator` seeded
with the request's `sampling_seed` (OpenAI `seed`); a token is accepted while the draft equals the
verify sample, so every emitted token is an AR sample given the accepted prefix. Each request's
generator is consumed exactly as the reference decoder consumes its own, so the same seed gives
the same output whatever else is in the batch. `min_p` filters the verify distribution;
penalties, `logit_bias` and `min_new_tokens` adjust the logits of every verify position (and of
the draft positions, so drafts propose what verify can accept) as SGLang's AR sampler adjusts them
at that position: `decoding.sampling.adjust_logits`, with the output before the position (the
committed output, `SpecState.produced` / `history`, then the row's drafts before it). A grammar
masks every verify position the walk reached, after those adjustments (a -inf stays -inf under
them, so the order is AR's in effect). Output logprobs (`logprob_tensors`) come from the same
logits at each committed token's position, as SGLang's AR sampler computes them. Hidden states
(`return_hidden_states`, with the server's `--enable-return-hidden-states`): the prompt's from
the context pass, then one per committed token from the verify row (or decode step) that
produced it (`SpecState.hidden_rows`), what AR's decode steps return for the same tokens
(`spec_scheduler.record_prompt_hidden_states` / `record_hidden_states`).

Per-request state lives on the request; this object holds configuration only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import secrets
from dataclasses import dataclass, field
from typing import Any

import torch
from sglang.srt.arg_groups.overrides import declare_resolution, resolving_view
from sglang.srt.dllm.algorithm.base import DllmAlgorithm
from sglang.srt.dllm.config import DllmConfig

from fast_dvlm_sglang.config import ARCHITECTURE
from fast_dvlm_sglang.decoding.draft_policy import AcceptanceEstimate
from fast_dvlm_sglang.decoding.sampling import SamplingParams, adjust_logits, sample_rows, sample_tokens
from fast_dvlm_sglang.decoding.spec import accept_longest_prefix

from . import SPEC_ALGORITHM_NAME as ALGORITHM_NAME
from . import decode_steps, structured_output
from .algorithm import require_fdfo
from .attention_modes import algorithm_config, causal_pass, check_graph_runner
from .draft_length import POLICY_KEYS, policy_from_config
from .model import copy_to_device, inputs_prepared, prepare_block_embeds, set_extend_mrope_positions

UNLIMITED = 1 << 30
CONFIG_KEYS = frozenset({"block_size", "cuda_graph", "constrain_drafts"}) | POLICY_KEYS


def check_algorithm_config(algorithm_config: dict | None, block_size: int) -> None:
    """Refuse a `--dllm-algorithm-config` with unknown keys or bad draft-length settings at startup."""
    cfg = algorithm_config or {}
    unknown = sorted(set(cfg) - CONFIG_KEYS)
    if unknown:
        raise ValueError(f"{ALGORITHM_NAME}: unknown --dllm-algorithm-config keys {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(CONFIG_KEYS))})")
    if not isinstance(cfg.get("constrain_drafts", True), bool):
        raise ValueError(f"{ALGORITHM_NAME}: --dllm-algorithm-config: constrain_drafts must be true or false, "
                         f"got {cfg['constrain_drafts']!r}")
    try:
        policy_from_config(cfg, block_size, "cpu")
    except (TypeError, ValueError) as e:
        raise ValueError(f"{ALGORITHM_NAME}: --dllm-algorithm-config: {e}") from None


@dataclass(frozen=True)
class SpecState:
    """What one request carries between forwards (`req.dllm_algo_state`)."""

    seed: int | None = None  # last committed token; its KV is written by the next round's verify pass
    budget: int = UNLIMITED  # most tokens the next round may commit (max_new_tokens - len(output))
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: whole vocabulary
    sampling_seed: int | None = None
    # The generator's seed of a sampling request without `sampling_seed`: derived from the
    # request id and the server's random seed (`rank_shared_seed`), the same on every
    # tensor-parallel rank, whose schedulers each draw the request's tokens (ranks that drew
    # differently would feed different tokens into one all-reduced forward).
    unseeded_seed: int | None = None
    generator: torch.Generator | None = field(default=None, compare=False, repr=False)
    # AR's logit adjustments and min-p (`decoding.sampling`), applied per verify position
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()  # what min_new_tokens bans: EOS and stop tokens, as SGLang's
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    produced: int = 0  # output tokens committed so far: the seed's successor is output token `produced`
    # The committed output (a copy, kept only for a request with penalties, which count it).
    history: tuple[int, ...] = field(default=(), compare=False, repr=False)
    # The next round's width (verify tokens: the seed + its drafts), chosen by the scheduler
    # (`draft_length.py`); 0: not chosen (a full block, capped by the budget).
    width: int = 0
    # The round runs its width as AR steps (an AR run: `width` causal passes, `draft_policy.py`),
    # not as a draft and its verify.
    ar_run: bool = False
    draft_length: int | None = None  # this request's own pin (`custom_params`), None: the server's policy
    acceptance: AcceptanceEstimate = AcceptanceEstimate()  # of this request's drafts so far
    rounds: int = 0  # draft/verify rounds run so far
    # Forwards after the prompt's prefill, as the reference decoder counts them: 2 per round (1
    # with no room for a draft) plus any context pass re-encoding output (after a retraction).
    nfe: int = 0
    # The request's grammar matcher (`req.grammar`, SGLang's; attached when the request is scheduled,
    # `spec_scheduler.init_fill_ids_for_dllm`) and the drafts the round's walk advanced it by
    # (`structured_output.py`; rolled back at commit).
    grammar: Any = field(default=None, compare=False, repr=False)
    grammar_walked: int | None = None  # None: the round walked no grammar
    # Output logprobs (`logprobs` / `top_logprobs`, SGLang's return_logprob): None: not asked;
    # else how many top alternatives per token; `token_ids_logprob`: ids scored at every output
    # position too (SGLang's token_ids_logprob; /v1/score reads them). `logprob_rows`: the last
    # forward's, per position it chose a token at (chosen token's logprob, top values, top ids,
    # the given ids' values), read at commit.
    top_logprobs: int | None = None
    token_ids_logprob: tuple[int, ...] | None = None
    logprob_rows: tuple = field(default=(), compare=False, repr=False)
    # Hidden states (SGLang's return_hidden_states, served with --enable-return-hidden-states):
    # whether the request asked; `hidden_rows`: the last forward's final hidden states at the
    # positions it chose tokens at (the row that produced each token, as AR's decode step
    # returns its input's), on the device until the commit reads the committed ones.
    hidden_states: bool = False
    hidden_rows: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_request(cls, sampling_params, stop_token_ids=(), top_logprobs: int | None = None,
                     token_ids_logprob=None) -> SpecState:
        """SGLang's normalised sampling params: temperature 0 arrives as top_k == 1.
        `stop_token_ids`: the request's stop set as SGLang's min_new_tokens penalizer builds it;
        `top_logprobs`: None, or the top alternatives to return with each token's logprob;
        `token_ids_logprob`: ids whose logprobs to return at each output position too."""
        top_k = int(sampling_params.top_k)
        pin = (sampling_params.custom_params or {}).get("draft_length")
        # SGLang sets (not adds) each bias; keys "1" and "01" are one token, the last one wins.
        bias = {int(k): float(v) for k, v in (getattr(sampling_params, "logit_bias", None) or {}).items()}
        min_new = int(getattr(sampling_params, "min_new_tokens", 0) or 0)
        common = dict(sampling_seed=sampling_params.sampling_seed, draft_length=pin, top_logprobs=top_logprobs,
                      token_ids_logprob=tuple(int(t) for t in token_ids_logprob) if token_ids_logprob else None,
                      logit_bias=tuple(sorted(bias.items())), min_new_tokens=min_new,
                      stop_token_ids=tuple(sorted(set(stop_token_ids))) if min_new else (),
                      frequency_penalty=float(getattr(sampling_params, "frequency_penalty", 0.0) or 0.0),
                      presence_penalty=float(getattr(sampling_params, "presence_penalty", 0.0) or 0.0),
                      repetition_penalty=float(getattr(sampling_params, "repetition_penalty", 1.0) or 1.0))
        if top_k == 1 or sampling_params.temperature <= 0:
            return cls(**common)
        return cls(temperature=float(sampling_params.temperature), top_p=float(sampling_params.top_p),
                   top_k=0 if top_k < 0 or top_k >= UNLIMITED else top_k,
                   min_p=float(getattr(sampling_params, "min_p", 0.0) or 0.0), **common)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def params(self, vocab_size: int) -> SamplingParams:
        top_k = self.top_k if 0 < self.top_k < vocab_size else 0
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=top_k, min_p=self.min_p,
                              logit_bias=self.logit_bias, min_new_tokens=self.min_new_tokens,
                              frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
                              repetition_penalty=self.repetition_penalty)

    @property
    def drafted(self) -> int:
        """Draft tokens the last round ran with (after a round: `width` is its verify width); an
        AR run's inputs after the seed are its own AR steps, not drafts."""
        return 0 if self.ar_run else max(self.width - 1, 0)

    @property
    def penalizes(self) -> bool:
        return bool(self.frequency_penalty) or bool(self.presence_penalty) or self.repetition_penalty != 1.0

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.logit_bias) or self.min_new_tokens > self.produced or self.penalizes

    def committed(self, output_ids, **changes) -> SpecState:
        """This state after a commit that left `output_ids` as the request's output."""
        history = tuple(output_ids) if self.penalizes else ()
        return dataclasses.replace(self, produced=len(output_ids), history=history, grammar_walked=None,
                                   logprob_rows=(), hidden_rows=None, **changes)

    def with_generator(self, device) -> SpecState:
        if self.greedy or self.generator is not None:
            return self
        gen = torch.Generator(device=device)
        # An unseeded request without a rank-shared seed draws one from the OS: torch.seed() would
        # reseed the process's global (and CUDA) generators on every such request.
        seed = next((s for s in (self.sampling_seed, self.unseeded_seed) if s is not None), None)
        gen.manual_seed(seed if seed is not None else secrets.randbits(63))
        return dataclasses.replace(self, generator=gen)


def rank_shared_seed(rid: str, server_seed: int | None) -> int:
    """A 63-bit generator seed for an unseeded sampling request: a hash of its id and the
    server's `--random-seed`, equal on every rank (each rank's scheduler gets the same request)
    and apart for different requests (SGLang gives each of n choices its own id)."""
    digest = hashlib.blake2b(f"{server_seed}:{rid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def stop_token_ids(req) -> set[int]:
    """The tokens SGLang's min_new_tokens penalizer bans (penaltylib/min_new_tokens.py): the
    request's stop tokens, the model's EOS ids, the tokenizer's extra stop tokens and its EOS."""
    tokenizer = getattr(req, "tokenizer", None)
    ids = set(req.sampling_params.stop_token_ids or ()) | set(getattr(req, "eos_token_ids", None) or ())
    if tokenizer is not None:
        ids |= set(getattr(tokenizer, "additional_stop_token_ids", None) or ())
        if getattr(tokenizer, "eos_token_id", None) is not None:
            ids.add(tokenizer.eos_token_id)
    return {int(t) for t in ids if t is not None}


def adjusted_rows(logits: torch.Tensor, state: SpecState, start: int, n: int,
                  inputs: torch.Tensor | None = None) -> torch.Tensor:
    """Row `state`'s logits at flat positions [start, start + n), the first choosing its output
    token `state.produced`, with AR's logit adjustments (`decoding.sampling.adjust_logits`);
    `inputs`: the flat input ids, whose row tokens after the seed (the drafts) the penalties count
    for the positions after them (None: every position counts the committed output only)."""
    row_tokens = None if inputs is None or not state.penalizes else inputs[start + 1:start + n]
    return adjust_logits(logits[start:start + n], state.params(logits.shape[-1]), state.produced,
                         state.stop_token_ids, history=state.history, row_tokens=row_tokens)


def choose_tokens(logits: torch.Tensor, states: list[SpecState], starts: list[int], lengths: list[int],
                  inputs: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens [T] for flat logits [T, V]: argmax, then for each row that samples or adjusts its
    logits, its choice for its `lengths[i]` positions from `starts[i]` on (a draw from its own
    generator, or the argmax of its adjusted logits); other positions stay argmax. `inputs`: the
    flat input ids of a verify pass (`adjusted_rows`)."""
    tokens = logits.argmax(dim=-1)
    for state, start, n in zip(states, starts, lengths):
        if state.greedy and not state.adjusts_logits:
            continue
        rows = adjusted_rows(logits, state, start, n, inputs) if state.adjusts_logits else logits[start:start + n]
        tokens[start:start + n] = (rows.argmax(dim=-1) if state.greedy else
                                   sample_tokens(rows, state.params(logits.shape[-1]), state.generator)[0])
    return tokens


def choose_step(logits: torch.Tensor, states: list[SpecState], step: int,
                previous: list[torch.Tensor]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Tokens [n] of AR step `step` of a round without drafts, from its logits [n, V] (one
    position for each of the n rows stepping): argmax, or for a row that samples or adjusts its
    logits its own choice given the tokens its earlier steps chose (`previous[i]`, [step]: the
    penalties count them, min_new_tokens counts `produced + step`). Also returns the adjusted
    logits [1, V] of the rows that have them (what their logprobs are read from).

    Unseeded rows that sample with the same parameters draw together (`sample_rows`: one
    distribution computation for all of them, a draw from each row's generator), each the token
    it would draw alone (row-wise kernels; tested bitwise on CPU); a seeded row (`sampling_seed`)
    still draws alone, so that no kernel's batch-size dependence on another device can make its
    answer depend on the traffic."""
    tokens = logits.argmax(dim=-1)
    adjusted = {}
    vocab = logits.shape[-1]
    groups: dict[tuple, list[tuple[int, torch.Tensor, torch.Generator | None]]] = {}
    for i, state in enumerate(states):
        adjusts = state.penalizes or bool(state.logit_bias) or state.min_new_tokens > state.produced + step
        if state.greedy and not adjusts:
            continue
        params = state.params(vocab)
        row = logits[i:i + 1]
        if adjusts:  # as output token `produced + step`, after the committed output and this run's steps
            row = adjust_logits(row, params, state.produced + step, state.stop_token_ids, history=state.history,
                                prior_tokens=previous[i])  # [step]: empty at step 0
            adjusted[i] = row
        if state.greedy:
            tokens[i] = row.argmax(dim=-1)[0]
        else:
            key = (SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                  min_p=params.min_p), i if state.sampling_seed is not None else None)
            groups.setdefault(key, []).append((i, row, state.generator))
    for (params, _), members in groups.items():
        chosen = sample_rows(torch.cat([row for _, row, _ in members]) if len(members) > 1 else members[0][1],
                             params, [g for _, _, g in members])
        tokens[torch.tensor([i for i, _, _ in members], device=tokens.device)] = chosen
    return tokens, adjusted


def logprob_tensors(rows: torch.Tensor, state: SpecState, tokens: torch.Tensor) -> torch.Tensor:
    """[n, 1 + 2N + M] for `rows` [n, V], the logits a row chose `tokens` [n] from (after AR's
    adjustments and its grammar's mask): per position the chosen token's logprob, the top N
    values, the top N ids (as float64: exact for any vocabulary), the M `token_ids_logprob`
    values. As SGLang's AR sampler returns them: log_softmax of those logits, divided by the
    temperature when sampling (the distribution before top-k / top-p / min-p filtering)."""
    lp = torch.log_softmax(rows.float() / (state.temperature if not state.greedy else 1.0), dim=-1)
    cols = [lp.gather(-1, tokens.long()[:, None])]
    if state.top_logprobs:
        top = lp.topk(min(state.top_logprobs, lp.shape[-1]), dim=-1)
        cols += [top.values, top.indices.to(lp.dtype)]
    if state.token_ids_logprob:
        cols.append(lp[:, list(state.token_ids_logprob)])
    return torch.cat(cols, dim=1).double()


def logprob_rows(tensors: list[torch.Tensor | None], states: list[SpecState]) -> list[tuple]:
    """Host rows (logprob, top values, top ids, token_ids_logprob values) of each
    `logprob_tensors` block (made with `states[i]`), () for rows that did not ask; one host sync
    for the batch."""
    blocks = [t for t in tensors if t is not None]
    host = iter(torch.cat([b.reshape(-1) for b in blocks]).tolist() if blocks else [])
    out = []
    for t, state in zip(tensors, states):
        if t is None:
            out.append(())
            continue
        n, width = t.shape
        given = len(state.token_ids_logprob or ())
        top = (width - 1 - given) // 2
        rows = []
        for _ in range(n):
            vals = [next(host) for _ in range(width)]
            rows.append((vals[0], vals[1:1 + top], [int(v) for v in vals[1 + top:1 + 2 * top]], vals[1 + 2 * top:]))
        out.append(tuple(rows))
    return out


def last_hidden_rows(hidden: torch.Tensor | None, forward_batch, states: list[SpecState]) -> list:
    """Each asking request's hidden state at the last position of a causal context pass (the
    row its seed comes from), [1, H]; None for the others. `hidden`: the pass's capture, a row
    per position (FULL) or per request (LAST)."""
    if hidden is None or not any(s.hidden_states for s in states):
        return [None] * len(states)
    if hidden.shape[0] == len(states):
        ends = list(range(len(states)))
    else:
        ends = [int(e) - 1 for e in itertools.accumulate(forward_batch.extend_seq_lens_cpu)]
    return [hidden[e:e + 1] if s.hidden_states else None for s, e in zip(states, ends)]


def round_layout(slots: list[int], prefix_lens: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Host index tables of a round whose row i has `slots[i]` tokens from position
    `prefix_lens[i]` (the seed's): row starts in the flat batch, the flat index of (row i, slot j)
    for j < max(slots) (the row's last slot past its end), and every token's position."""
    starts, row_index, positions = [], [], []
    width = max(slots)
    at = 0
    for n, p in zip(slots, prefix_lens):
        starts.append(at)
        row_index.extend(at + min(j, n - 1) for j in range(width))
        positions.extend(range(p, p + n))
        at += n
    return starts, row_index, positions


# Why spec's two-capture CUDA graphs need the triton backend (`cuda_graph: true`). Both captures
# of a batch size must read the attention metadata that the replay refreshes. SGLang's triton
# backend keeps its DLLM_EXTEND metadata in shared buffers that `init_forward_metadata_out_graph`
# refills before every replay (layers/attention/triton_backend.py `_update_dllm_buffers`).
# flashinfer creates new prefill wrappers at each capture and stores them by batch size only
# (flashinfer_backend.py `_prepare_cuda_graph_metadata`); a replay re-plans the last set, so the
# first-captured (bidirectional) graph would keep its capture-time plan and draft over a wrong
# slice of the context: outputs stay correct (the verify decides) but acceptance collapses.
GRAPH_BACKEND = "triton"
# Backends whose DLLM_EXTEND graph metadata is refreshed in place at every replay, so the draft's
# and the verify's captures both read the current batch: SGLang's triton and ours.
GRAPH_SAFE_BACKENDS = frozenset({GRAPH_BACKEND, "fast_dvlm_triton"})


@dataclass(frozen=True)
class GrammarWalk:
    """A round's walk of its constrained rows (`FastDVLMSpeculative._walk_grammars`)."""

    mask: torch.Tensor  # [T, words] host bitmask of the verify positions (all allowed elsewhere)
    walked: list[int | None]  # per row: drafts the matcher advanced by (None: a row without a grammar)
    draft_caps: list[int]  # per row: most drafts it may accept


class FastDVLMSpeculative(DllmAlgorithm):
    supported_architectures = (ARCHITECTURE,)
    requires_separate_context_encoding = True
    # Backends with a DLLM_EXTEND path that honours the layer's attention type per forward (the
    # draft's ENCODER_ONLY view, the verify's causal layer). SGLang's dLLM resolution
    # (arg_groups/overrides.py `_dllm_attention_backend`, before `configure_server_args`) keeps
    # these and replaces any other (fa3, SGLang's default on Hopper, has no DLLM_EXTEND
    # metadata) by the required one, the backend whose graphs are right for both passes.
    supported_attention_backends = ("triton", "flashinfer", "torch_native", "fast_dvlm_triton")
    required_attention_backend = GRAPH_BACKEND

    def __init__(self, config: DllmConfig):
        super().__init__(config)
        if self.block_size < 2:
            raise ValueError(f"{ALGORITHM_NAME} needs block_size >= 2, got {self.block_size}")
        check_algorithm_config(config.algorithm_config, self.block_size)
        self.constrain_drafts = bool((config.algorithm_config or {}).get("constrain_drafts", True))
        # Under CUDA graphs a round of AR steps stays one causal block forward (`decode_steps.py`).
        self.graph_mode = bool((config.algorithm_config or {}).get("cuda_graph", False))

    @classmethod
    def configure_server_args(cls, server_args) -> None:
        require_fdfo(server_args, cls.__name__, "carries per-request state between rounds")
        from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, with_phase

        view = resolving_view(server_args)
        grammar_backend = getattr(view, "grammar_backend", None) or "xgrammar"
        if grammar_backend not in (*structured_output.SUPPORTED_BACKENDS, "none"):
            raise ValueError(f"{cls.__name__} walks grammars through xgrammar's token bitmask: use --grammar-backend "
                             f"{' or '.join(structured_output.SUPPORTED_BACKENDS)} (or none), got {grammar_backend}")
        graphs = view.cuda_graph_config  # resolved before the dLLM hook (arg_groups/pipeline.py)
        if graphs is None or graphs.decode.backend == Backend.DISABLED:
            return
        if algorithm_config(view.dllm_algorithm_config).get("cuda_graph", False):
            # Two captures per batch size, bidirectional and causal (`attention_modes.py`).
            backends = {view.attention_backend, view.decode_attention_backend} - {None}
            if not backends or not backends <= GRAPH_SAFE_BACKENDS:
                raise ValueError(
                    f"{cls.__name__} with cuda_graph: true needs --attention-backend {GRAPH_BACKEND} "
                    f"(or fast_dvlm_triton), got "
                    f"{', '.join(sorted(map(str, backends))) or 'none'}: its draft and verify graphs must both "
                    "read the attention metadata refreshed at replay (flashinfer keeps one plan per capture "
                    "and would replay the draft with a stale one)"
                )
            return
        # One captured DLLM_EXTEND graph would freeze one attention mode; verify must be causal.
        declare_resolution(server_args, cls.__name__, cuda_graph_config=with_phase(
            graphs, Phase.DECODE, backend=Backend.DISABLED))

    @classmethod
    def validate_request(cls, req) -> str | None:
        """Refuse what the draft/verify sampler cannot honour; attach the request's `SpecState`."""
        from .request_checks import spec_refusal

        # The HTTP process refuses these first (`request_checks.py`, a 400 before any stream
        # byte); this is the same rule for requests that reach the scheduler another way.
        sp = req.sampling_params
        logprob = getattr(req, "logprob", None)
        error = spec_refusal(lambda name: getattr(sp, name, None),
                             getattr(req, "custom_logit_processor", None), lambda: req.dllm_config.block_size)
        if error:
            return error
        if not isinstance(req.dllm_algo_state, SpecState):
            top = int(getattr(logprob, "top_logprobs_num", 0) or 0) if req.return_logprob else None
            given = getattr(logprob, "token_ids_logprob", None) if req.return_logprob else None
            state = SpecState.from_request(sp, stop_token_ids(req), top_logprobs=top, token_ids_logprob=given)
            if getattr(req, "return_hidden_states", False):
                state = dataclasses.replace(state, hidden_states=True)
            if not state.greedy and state.sampling_seed is None:
                from sglang.srt.runtime_context import get_server_args

                try:
                    server_seed = get_server_args().random_seed
                except ValueError:  # no published server args (outside a server)
                    server_seed = None
                state = dataclasses.replace(state, unseeded_seed=rank_shared_seed(req.rid, server_seed))
            req.dllm_algo_state = state
        return None

    # ---- SGLang entry point ----------------------------------------------------------------
    def run(self, model_runner, forward_batch, algo_states=None):
        if not forward_batch.forward_mode.is_dllm_extend():
            return self._context_pass(model_runner, forward_batch, algo_states)
        if algo_states is None or any(not isinstance(s, SpecState) or s.seed is None for s in algo_states):
            raise RuntimeError(
                f"{ALGORITHM_NAME}: a round started without the seed of its causal context pass "
                "(is the fast_dvlm plugin's speculative scheduler hook loaded?)"
            )
        return self._round(model_runner, forward_batch, algo_states)

    def _context_pass(self, model_runner, forward_batch, algo_states):
        if forward_batch.input_ids.numel() == 0:
            return None, [], None, None, False
        set_extend_mrope_positions(forward_batch)
        with inputs_prepared():
            out = model_runner.forward(forward_batch, pp_proxy_tensors=None)
        logits = out.logits_output.next_token_logits  # [bs, V]: the last position of each context
        bs = logits.shape[0]
        # No state: a request SGLang is aborting (it still runs one tiny prefill); greedy is fine.
        states = [s if isinstance(s, SpecState) else SpecState() for s in (algo_states or [None] * bs)]
        states = [s.with_generator(logits.device) for s in states]
        constrained = [i for i, s in enumerate(states) if structured_output.usable(s.grammar)]
        if constrained:  # the seed under its grammar's mask (the matcher accepts it at commit)
            grammar = states[constrained[0]].grammar
            mask = structured_output.allocate(grammar, bs, logits.shape[-1])
            for i in constrained:
                states[i].grammar.fill_vocab_mask(mask, i)
            structured_output.apply(logits, grammar, mask)
        chosen = choose_tokens(logits, states, list(range(bs)), [1] * bs)
        tensors = [logprob_tensors(adjusted_rows(logits, s, i, 1) if s.adjusts_logits else logits[i:i + 1], s,
                                   chosen[i:i + 1]) if s.top_logprobs is not None else None
                   for i, s in enumerate(states)]
        seeds = chosen.tolist()  # the one host sync (and one more for logprobs, when asked)
        rows = logprob_rows(tensors, states)
        last = last_hidden_rows(out.logits_output.hidden_states, forward_batch, states)
        states = [dataclasses.replace(s, seed=int(t), nfe=s.nfe + (s.rounds > 0), logprob_rows=r, hidden_rows=h)
                  for s, t, r, h in zip(states, seeds, rows, last)]
        return out.logits_output, [], None, states, out.can_run_graph

    def _round(self, model_runner, forward_batch, states: list[SpecState]):
        check_graph_runner(model_runner)
        bs = forward_batch.batch_size
        # Each row holds [seed, w - 1 slots] (`draft_length.py` chose w; under CUDA graphs every
        # row keeps the whole block and uses its first w). Verify tokens a row uses: its width,
        # capped by the budget left after the seed (the reference decoder's `length`).
        slots = [int(n) for n in forward_batch.extend_seq_lens_cpu]
        lengths = [max(1, min(n, s.width or n, s.budget)) for s, n in zip(states, slots)]
        prefix_lens = [int(p) for p in forward_batch.extend_prefix_lens_cpu]
        starts, row_index, positions = round_layout(slots, prefix_lens)
        if max(lengths) == 1 or any(s.ar_run for s in states):  # no row drafts
            if not self.graph_mode and decode_steps.usable(model_runner, forward_batch):
                # The round's steps are AR decode steps (`decode_steps.py`).
                return self._ar_steps(model_runner, forward_batch, states, lengths, starts, prefix_lens)
            # No decode forwards here (DP attention; CUDA graphs run no AR runs): one AR step
            # each, the verify pass alone over the seeds (the rest of a run's slots are freed).
            lengths = [1] * bs
        width = max(slots)
        host = torch.tensor([s.seed for s in states] + lengths + row_index + positions, dtype=torch.long)
        table = copy_to_device(host, forward_batch.input_ids.device)  # one copy for the round
        seeds, draft_len = table[:bs], table[bs:2 * bs] - 1
        rows = table[2 * bs:2 * bs + bs * width].view(bs, width)
        # SGLang lays a dLLM block out at `block_size` positions per request; ours vary.
        pos = table[2 * bs + bs * width:]
        forward_batch.positions = pos.to(forward_batch.positions.dtype)
        if forward_batch.mrope_positions is not None:
            forward_batch.mrope_positions = pos.unsqueeze(0).repeat(3, 1).to(forward_batch.mrope_positions.dtype)
        set_extend_mrope_positions(forward_batch)  # once per round: both passes share positions

        ids = forward_batch.input_ids
        constrained = [i for i, s in enumerate(states) if structured_output.usable(s.grammar)]
        walk = None
        first = rows[:, 0]
        is_start = torch.zeros_like(ids, dtype=torch.bool).index_fill_(0, first, True)
        with inputs_prepared():
            # Draft: [seed, MASK...] block-bidirectionally; d_j = argmax(logits[j-1]) (token shift).
            # Skipped when no row drafts (a batch of AR steps: each needs its seed's successor only).
            ids.fill_(self.mask_id)
            ids.index_copy_(0, first, seeds.to(ids.dtype))
            if max(lengths) > 1:
                prepare_block_embeds(model_runner, forward_batch)
                out = model_runner.forward(forward_batch, pp_proxy_tensors=None)
                # The verify pass attends over the same slots and context: the attention metadata
                # just planned serves it too (what SGLang's own dLLM loop does between steps).
                forward_batch.mark_forward_metadata_ready(replan_equivalent=True)
                draft_logits = out.logits_output.full_logits
                shifted = draft_logits.argmax(dim=-1)
                adjusted = {}
                for i, (state, start, n) in enumerate(zip(states, starts, lengths)):
                    if state.adjusts_logits:  # draft what the verify pass can accept
                        adjusted[i] = adjusted_rows(draft_logits, state, start, n)
                        shifted[start:start + n] = adjusted[i].argmax(dim=-1)
                ids[1:] = torch.where(is_start[1:], ids[1:], shifted.to(ids.dtype)[:-1])
                if constrained:
                    walk = self._walk_grammars(states, starts, lengths, constrained, ids, draft_logits, adjusted,
                                               shifted)
                    draft_len = copy_to_device(torch.tensor(walk.draft_caps, dtype=torch.long), ids.device)

            # Verify: [seed, d_1..d_{w-1}] causal; writes the KV kept for the committed tokens.
            prepare_block_embeds(model_runner, forward_batch)
            with causal_pass():
                out = model_runner.forward(forward_batch, pp_proxy_tensors=None)
        verify_logits = out.logits_output.full_logits
        if constrained and walk is None:  # AR steps (no draft pass): only position 0 has a mask
            walk = self._walk_grammars(states, starts, lengths, constrained, ids, verify_logits)
        if walk is not None:  # every verify position the walk reached gets its grammar's mask
            structured_output.apply(verify_logits, states[constrained[0]].grammar, walk.mask)
        chosen = choose_tokens(verify_logits, states, starts, lengths, ids)
        verify = chosen[rows]  # [bs, width]
        tensors = [logprob_tensors(adjusted_rows(verify_logits, s, start, n, ids) if s.adjusts_logits
                                   else verify_logits[start:start + n], s, chosen[start:start + n])
                   if s.top_logprobs is not None else None for s, start, n in zip(states, starts, lengths)]
        draft = ids.long()[rows[:, 1:]]  # [bs, width - 1]: d_1..d_{width-1} (clamped past a row's end)

        # Accept d_1..d_k with k < lengths, then v_{k+1} is the next seed (committed too).
        accepted = accept_longest_prefix(draft.to(verify.dtype), verify[:, :-1], draft_len)
        next_seed = verify.gather(1, accepted[:, None])
        packed = torch.cat([accepted[:, None], next_seed, draft], dim=1).tolist()  # the sync

        logprobs = logprob_rows(tensors, states)  # per verify position; the commit keeps the first k + 1
        hidden = out.logits_output.hidden_states  # [tokens, H] when the server captures them

        commits, states_out = [], []
        walked = walk.walked if walk is not None else [None] * bs
        for state, row, length, m, lp, start in zip(states, packed, lengths, walked, logprobs, starts):
            k = int(row[0])
            commits.append(row[2:2 + k] + row[1:2])  # d_1..d_k, the next seed
            nfe = 1 + (length > 1)  # as the reference counts it: no draft pass at length 1
            # Verify row j (the seed, then d_j) produced committed token j.
            rows_h = hidden[start:start + k + 1] if state.hidden_states and hidden is not None else None
            states_out.append(dataclasses.replace(state, seed=int(row[1]), rounds=state.rounds + 1, width=length,
                                                  nfe=state.nfe + nfe, grammar_walked=m,
                                                  logprob_rows=lp[:k + 1], hidden_rows=rows_h))
        return out.logits_output, commits, [len(c) for c in commits], states_out, out.can_run_graph

    def _ar_steps(self, model_runner, forward_batch, states: list[SpecState], lengths: list[int], starts: list[int],
                  prefix_lens: list[int]):
        """A round without drafts: row i runs `lengths[i]` AR steps (1, or an AR run) as SGLang
        DECODE forwards over the round's slots (`decode_steps.py`; step j holds the rows with more
        than j steps), each step choosing the row's next token as an AR step does (its own
        sampling, adjustments and grammar); commits them all. One host sync for the round."""
        bs, steps = len(states), max(lengths)
        device = forward_batch.input_ids.device
        plan = decode_steps.StepPlan.of(prefix_lens, lengths, starts)
        deltas = decode_steps.mrope_deltas(forward_batch)
        host = torch.tensor([s.seed for s in states] + (deltas or []) + plan.table, dtype=torch.long)
        table = copy_to_device(host, device)  # one copy for the round
        last = table[:bs].to(forward_batch.input_ids.dtype)  # each row's latest token: its next input
        delta = table[bs:2 * bs] if deltas is not None else None
        steps_table = table[bs + len(deltas or []):]
        tokens = torch.zeros((bs, steps), dtype=torch.long, device=device)  # [row, step]: its choices
        constrained = [i for i, s in enumerate(states) if structured_output.usable(s.grammar)]
        walk = None
        logprob_parts: list[list[torch.Tensor]] = [[] for _ in states]
        hidden_parts: list[list[torch.Tensor]] = [[] for _ in states]  # each step's row, when asked
        out = None
        for j, step in enumerate(plan.steps):
            rows, slots, pos, seq = (steps_table[a:b] for a, b in step.spans)
            everyone = len(step.rows) == bs  # (step 0 always)
            inputs = last if everyone else last[rows]
            fb = decode_steps.decode_batch(forward_batch, model_runner, inputs, slots, pos, seq, step.seq_lens,
                                           None if delta is None else (delta if everyone else delta[rows]),
                                           rows=None if everyone else (rows, step.rows))
            out = model_runner.forward(fb, pp_proxy_tensors=None)
            logits = out.logits_output.next_token_logits  # [rows, V]: each stepping row's next token
            if j == 0 and constrained:  # grammar rows take one step (`draft_length.py`): its mask
                walk = self._walk_grammars(states, list(range(bs)), [1] * bs, constrained, inputs, logits)
                structured_output.apply(logits, states[constrained[0]].grammar, walk.mask)
            stepping = [states[i] for i in step.rows]
            chosen, adjusted = choose_step(logits, stepping, j, [tokens[i, :j] for i in step.rows])
            hidden = out.logits_output.hidden_states  # [rows, H]: each stepping row's input position
            for at, (i, s) in enumerate(zip(step.rows, stepping)):
                if s.top_logprobs is not None:
                    logprob_parts[i].append(logprob_tensors(adjusted.get(at, logits[at:at + 1]), s, chosen[at:at + 1]))
                if s.hidden_states and hidden is not None:
                    hidden_parts[i].append(hidden[at:at + 1])
            if everyone:
                tokens[:, j] = chosen
                last = chosen.to(last.dtype)
            else:
                tokens[:, j].index_copy_(0, rows, chosen)
                last = last.index_copy(0, rows, chosen.to(last.dtype))
        packed = tokens.tolist()  # the sync
        logprobs = logprob_rows([torch.cat(p) if p else None for p in logprob_parts], states)
        walked = walk.walked if walk is not None else [None] * bs
        commits, states_out = [], []
        for state, row, length, m, lp, hp in zip(states, packed, lengths, walked, logprobs, hidden_parts):
            commits.append(row[:length])  # the steps' tokens; the last is the next seed
            states_out.append(dataclasses.replace(state, seed=int(row[length - 1]), rounds=state.rounds + 1,
                                                  width=length, nfe=state.nfe + length, grammar_walked=m,
                                                  logprob_rows=lp[:length],
                                                  hidden_rows=torch.cat(hp) if hp else None))
        return out.logits_output, commits, [len(c) for c in commits], states_out, out.can_run_graph

    def _walk_grammars(self, states, starts, lengths, constrained, ids, logits, adjusted=None, shifted=None):
        """Walk each constrained row's grammar through its drafts (`structured_output.walk`) and
        write the walked drafts into `ids`. `logits`: the draft pass's (the candidates: its top
        tokens per position with `constrain_drafts`, else its argmax `shifted`), or the verify
        pass's when there was no draft pass (no drafts: position 0's mask only)."""
        drafting = [i for i in constrained if lengths[i] > 1 and shifted is not None]
        candidates: dict[int, list[list[int]]] = {i: [] for i in constrained}
        if drafting:
            blocks = []
            for i in drafting:
                start, n = starts[i], lengths[i]
                if self.constrain_drafts:  # position j's logits propose d_{j+1} (the token shift)
                    block = adjusted[i][:n - 1] if i in adjusted else logits[start:start + n - 1]
                    blocks.append(block.topk(min(structured_output.DRAFT_CANDIDATES, block.shape[-1]), dim=-1).indices)
                else:
                    blocks.append(shifted[start:start + n - 1, None])
            flat = torch.cat(blocks).tolist()  # the one host sync of the walk
            at = 0
            for i in drafting:
                candidates[i] = flat[at:at + lengths[i] - 1]
                at += lengths[i] - 1
        mask = structured_output.allocate(states[constrained[0]].grammar, ids.shape[0], logits.shape[-1])
        walked, caps = [None] * len(states), [n - 1 for n in lengths]
        index, values = [], []
        for i in constrained:
            width = lengths[i] if i in drafting else 1
            drafts, terminated = structured_output.walk(states[i].grammar, candidates[i], width, mask, starts[i])
            walked[i] = len(drafts)
            caps[i] = structured_output.acceptable_drafts(len(drafts), terminated)
            index.extend(range(starts[i] + 1, starts[i] + 1 + len(drafts)))
            values.extend(drafts)
        if index:
            table = copy_to_device(torch.tensor(index + values, dtype=torch.long), ids.device)
            ids.index_copy_(0, table[:len(index)], table[len(index):].to(ids.dtype))
        return GrammarWalk(mask=mask, walked=walked, draft_caps=caps)

    # Unused by `run` (kept for SGLang's base-class contract).
    def step(self, forward_batch, full_logits: torch.Tensor, states: list[Any]) -> list[bool]:
        raise NotImplementedError(f"{ALGORITHM_NAME} runs its own draft/verify round in run()")


Algorithm = FastDVLMSpeculative
