"""`FastDVLMBlock`: Fast-dLLM v2 MDM block decoding as an SGLang dLLM algorithm.

Per block (SGLang's separate-context-encoding flow, sglang/srt/dllm/mixin/req.py):
1. a causal EXTEND forward encodes the context (the prompt, later each completed block) and
   writes its KV; its last-position logits give the block's first token (token shift: the logit
   at position i-1 predicts token i), stored on the request (`req.dllm_algo_state`, moved there
   by the scheduler hook in `hooks.py`);
2. DLLM_EXTEND forwards run the whole block block-bidirectionally over the cached context, one
   forward per scheduler round (FDFO), each followed by `select_unmask` (shared with the
   reference decoder): within the first sub-block that still has masks, commit every masked
   position whose confidence > threshold, at least the most confident one;
3. a complete block is emitted; SGLang discards its bidirectional KV and step 1 re-encodes it
   causally in the next round.

A block is complete when nothing in it is masked, or earlier (`stop_early`, on by default) once
its filled prefix (the committed positions before the first mask) holds one of the request's
stop tokens (SGLang's `Req._check_token_based_finish` set) or reaches its `max_new_tokens`: as
in the reference decoder (`decoding.mdm._ends_inside`), nothing after that cut is ever shown and
committed positions never change, so the answer is the same and the forwards that would only
denoise hidden positions are not run. The positions left masked are emitted as the mask token
and cut by SGLang's own finish check. Requests with stop strings or regexes denoise whole blocks
(SGLang matches those on detokenized text after the block is emitted).

NFE per request, counted here as the reference counts it (`session.nfe`): every forward after the
prompt's prefill, i.e. each denoising forward of a block and each causal re-encoding pass of a
completed block; reported per output token in `meta_info["dllm_nfe"]` (as spec does; the
scheduler side, stops, budgets and counts, is `mdm_scheduler.py`). With `stop_early: false` the
server runs the paper's (and the authors' SGLang code's) convention: every block to its end.

Per-request state lives on the request (a small dict carried by SGLang through
`req.dllm_algo_state`); this object holds only configuration. Greedy; `logit_bias` is added to
every position's logits (`with_logit_bias`); what MDM cannot apply is refused at admission
(`request_checks.mdm_refusal`).
"""

from __future__ import annotations

from typing import Any

import torch
from sglang.srt.arg_groups.overrides import resolving_view
from sglang.srt.dllm.algorithm.base import DllmAlgorithm
from sglang.srt.dllm.config import DllmConfig

from fast_dvlm_sglang.config import ARCHITECTURE, DEFAULT_SUB_BLOCK_SIZE
from fast_dvlm_sglang.decoding.mdm import select_unmask, without_mask
from fast_dvlm_sglang.sglang_plugin.model import (
    inputs_prepared,
    prepare_block_embeds,
    set_extend_mrope_positions,
)

DEFAULT_THRESHOLD = 0.9


def require_fdfo(server_args, owner: str, why: str) -> None:
    """What both algorithms need from the server: FDFO rounds (state is carried on the request
    between forwards). SGLang's radix cache and chunked prefill stay on (`prefix_cache.py` says
    why that is correct for both algorithms)."""
    if not resolving_view(server_args).dllm_fdfo:
        raise ValueError(f"{owner} {why}: remove --no-dllm-fdfo")


def with_logit_bias(logits: torch.Tensor, forward_batch, positions: int) -> torch.Tensor:
    """`logits` ([bs, V], or [bs, positions, V]) plus each request's `logit_bias`, the dense rows
    SGLang builds for the batch (`SamplingBatchInfo.logit_bias`, its own reading of the request's
    token-id keys), the same at every position: the one logit adjustment that does not depend on
    the output before a position, so MDM applies it exactly (the reference decoder's `biased`)."""
    info = getattr(forward_batch, "sampling_info", None)
    bias = getattr(info, "logit_bias", None)
    if bias is None:
        return logits
    bias = bias[:, :logits.shape[-1]].to(logits.dtype)
    return logits + (bias[:, None, :] if logits.dim() == 3 else bias)


class FastDVLMBlock(DllmAlgorithm):
    supported_architectures = (ARCHITECTURE,)
    requires_separate_context_encoding = True
    # Attention backends with a DLLM_EXTEND path that honours ENCODER_ONLY layers; SGLang's dLLM
    # resolution (arg_groups/overrides.py `_dllm_attention_backend`) keeps these and replaces any
    # other (fa3, SGLang's default on Hopper, has no DLLM_EXTEND metadata) by the required one.
    # One attention mode per forward, so SGLang's single DLLM_EXTEND capture per batch size is
    # right on either GPU backend.
    supported_attention_backends = ("flashinfer", "triton", "torch_native", "fast_dvlm_triton")
    required_attention_backend = "flashinfer"

    def __init__(self, config: DllmConfig):
        super().__init__(config)
        algo = config.algorithm_config or {}
        self.sub_block_size = int(algo.get("sub_block_size", DEFAULT_SUB_BLOCK_SIZE))
        self.threshold = float(algo.get("threshold", DEFAULT_THRESHOLD))
        self.stop_early = algo.get("stop_early", True)
        if not isinstance(self.stop_early, bool):
            raise ValueError(f"stop_early must be true or false, got {self.stop_early!r}")
        if not 1 <= self.sub_block_size <= self.block_size:
            raise ValueError(f"sub_block_size must be in [1, block_size={self.block_size}], got {self.sub_block_size}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")

    @classmethod
    def validate_request(cls, req) -> str | None:
        """The HTTP process's refusals (`request_checks.mdm_refusal`), for requests that reach
        the scheduler another way."""
        from .request_checks import mdm_refusal

        sp = req.sampling_params
        return mdm_refusal(lambda name: getattr(sp, name, None), req.return_logprob,
                           getattr(req, "custom_logit_processor", None),
                           hidden_states=bool(getattr(req, "return_hidden_states", False)))

    @classmethod
    def configure_server_args(cls, server_args) -> None:
        require_fdfo(server_args, cls.__name__, "runs one denoising step per scheduler round")

    # ---- SGLang entry point ----------------------------------------------------------------
    def run(self, model_runner, forward_batch, algo_states=None):
        set_extend_mrope_positions(forward_batch)  # before the runner copies them into its buffers
        with inputs_prepared():
            return self._run(model_runner, forward_batch, algo_states)

    def _run(self, model_runner, forward_batch, algo_states):
        if not forward_batch.forward_mode.is_dllm_extend():
            # Causal context encoding: KV written; the last logits give each block's first token.
            if forward_batch.input_ids.numel() == 0:
                return None, [], None, None, False
            out = model_runner.forward(forward_batch, pp_proxy_tensors=None)
            logits = with_logit_bias(out.logits_output.next_token_logits, forward_batch, 1)
            first = without_mask(logits, self.mask_id).argmax(dim=-1).tolist()
            states = [{"first_token": int(t), "masked": None, "nfe": 0, "stops": None, "room": None}
                      for t in first]  # `start_block` fills in the request's part
            return out.logits_output, [], None, states, out.can_run_graph
        if algo_states is None or any(s is None or "first_token" not in s for s in algo_states):
            raise RuntimeError(
                f"{type(self).__name__}: a block started without its causal context pass "
                "(is the fast_dvlm plugin's scheduler hook loaded?)"
            )
        return super().run(model_runner, forward_batch, algo_states)

    def prepare_inputs(self, model_runner, forward_batch, states: list[Any]) -> None:
        ids = forward_batch.input_ids.view(forward_batch.batch_size, self.block_size)
        for i, state in enumerate(states):
            if state["masked"] is None:  # first forward of this block: [first, MASK, ...]
                masked = torch.ones(self.block_size, dtype=torch.bool, device=ids.device)
                masked[0] = False
                row = torch.full((self.block_size,), self.mask_id, dtype=ids.dtype, device=ids.device)
                row[0] = state["first_token"]
                ids[i].copy_(row)
                state["masked"] = masked
        prepare_block_embeds(model_runner, forward_batch)  # the ids are final for this forward

    def step(self, forward_batch, full_logits: torch.Tensor, states: list[Any]) -> list[bool]:
        batch = forward_batch.batch_size
        logits = full_logits.view(batch, self.block_size, -1)
        shifted = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # position j <- logits of j-1
        shifted = with_logit_bias(shifted, forward_batch, self.block_size)
        ids = forward_batch.input_ids.view(batch, self.block_size)
        masked = torch.stack([s["masked"] for s in states])
        pos = torch.arange(self.block_size, device=ids.device)
        sub = (pos // self.sub_block_size).expand(batch, -1)
        big = self.block_size  # larger than any sub-block index
        current = torch.where(masked, sub, big).min(dim=1, keepdim=True).values
        active = sub == current
        tokens, commit = select_unmask(shifted, masked, active, self.threshold, mask_id=self.mask_id)
        ids.copy_(torch.where(commit, tokens.to(ids.dtype), ids))
        masked = masked & ~commit
        for i, state in enumerate(states):
            state["masked"] = masked[i]
            state["nfe"] = state.get("nfe", 0) + 1
        done = ~masked.any(dim=1)
        if self.stop_early:
            done |= self._decided(ids, masked, states)
        return done.tolist()

    @staticmethod
    def _decided(ids: torch.Tensor, masked: torch.Tensor, states: list[Any]) -> torch.Tensor:
        """Rows whose filled prefix already holds a stop token or reaches the request's budget."""
        batch, width = ids.shape
        filled = (~masked).long().cumprod(dim=1).bool()  # the committed positions before the first mask
        # (`start_block` sets both per request; a state without them never ends early)
        room = torch.tensor([width + 1 if s.get("room") is None else s["room"] for s in states], device=ids.device)
        decided = filled.sum(dim=1) >= room
        stops = [s.get("stops") for s in states]
        if any(t is not None and t.numel() for t in stops):
            padded = torch.nn.utils.rnn.pad_sequence(
                [t if t is not None else ids.new_empty(0) for t in stops], batch_first=True, padding_value=-1)
            hit = (ids[:, :, None] == padded[:, None, :].to(ids.device)).any(dim=2)
            decided |= (hit & filled).any(dim=1)
        return decided


Algorithm = FastDVLMBlock
