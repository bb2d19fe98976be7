"""`--attention-backend fast_dvlm_triton`: our block-diffusion kernel as an SGLang attention backend.

One kernel (`kernels/block_attention.py`) serves every forward of our model: EXTEND (prefill over
a cached prefix, chunked prefill, MIXED), DECODE (an AR step) and DLLM_EXTEND (a block), causal or
block-bidirectional per layer: `layer.attn_type == ENCODER_ONLY` is the bidirectional view our
`mode_selected` layers hand to the backend for a draft / denoising forward (`model.py`), any other
layer is causal. The new tokens' K/V are written into SGLang's pool first (`set_kv_buffer`, as
every backend does), then the kernel reads the whole context through `req_to_token`.

It subclasses SGLang's smallest complete backend, `TorchNativeAttnBackend`, for its pool handles
and sliding-window bookkeeping, and delegates to it what the kernel does not do (cross-attention,
sliding windows, encoder-decoder lengths, logit capping, attention sinks, Q/K and V head dims
that differ): those layers run SGLang's code unchanged (eager only).

CUDA graphs (`init_cuda_graph_state`, `init_forward_metadata_out_graph`): the kernel's inputs for
DECODE and DLLM_EXTEND captures live in buffers allocated once per server and refreshed in place
before every capture and every replay, so every captured graph (one per batch size, and one per
attention variant: the speculative draft's bidirectional capture and the verify's causal capture)
reads the current batch's tables and lengths. Nothing is kept per capture. The grid depends only on
the captured batch size and the per-request token count (1 or the block size).

Registered from the plugin's `register()` (`register_backend`): SGLang's attention registry
(`attention_registry.register_attention_backend`) and the `--attention-backend` choices
(`arg_groups/choices.add_attention_backend_choices`); both algorithms list it in
`supported_attention_backends`, so SGLang's dLLM backend resolution keeps it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

BACKEND_NAME = "fast_dvlm_triton"


def register_backend() -> None:
    """Idempotent: the registry entry and the command-line choice."""
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend

    if BACKEND_NAME not in ATTENTION_BACKENDS:
        register_attention_backend(BACKEND_NAME)(create_backend)
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])


def create_backend(runner):
    if runner.use_mla_backend:
        raise ValueError(f"--attention-backend {BACKEND_NAME} serves multi-head attention models, not MLA")
    if torch.device(runner.device).type == "cpu":
        check_interpreter()
    return _backend_class()(runner)


def check_interpreter() -> None:
    """On a CPU the kernel runs in Triton's interpreter. `triton.jit` decides at decoration time,
    and Triton's own library (`tl.sum`, `tl.cdiv`, ...) is decorated when `triton.language` is
    first imported, which SGLang does long before it builds the backend: TRITON_INTERPRET=1 must
    be in the server's environment from the start (`fast-dvlm serve` sets it)."""
    import sys

    if "triton.language" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        return
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.sum, InterpretedFunction):
        raise RuntimeError(f"--attention-backend {BACKEND_NAME} on a CPU runs in Triton's interpreter: start "
                           "the server with TRITON_INTERPRET=1 in its environment (fast-dvlm serve does)")


@dataclass
class KernelInputs:
    """What one forward's kernel launches read (the same for every layer of the forward)."""

    req_pool_indices: torch.Tensor  # [B] int
    q_start: torch.Tensor  # [B] int32: first row of each request in q
    q_lens: torch.Tensor  # [B] int32: new tokens per request
    seq_lens: torch.Tensor  # [B] int32: context + new tokens
    split_row: torch.Tensor  # [B] int32: first split-partial row, -1 when not split
    max_q_len: int
    partials: tuple[torch.Tensor, torch.Tensor] | None  # split-KV scratch (None: per launch)


_CLASS = None


def _backend_class():
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.layers.radix_attention import AttentionType
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    from fast_dvlm_sglang.kernels import block_attention as kernel

    class FastDVLMTritonAttnBackend(TorchNativeAttnBackend):
        """Block-diffusion attention over the paged KV cache (see the module docstring)."""

        def __init__(self, model_runner):
            super().__init__(model_runner)
            self.page_size = getattr(model_runner, "page_size", 1) or 1
            self.config = kernel.default_config(model_runner.device)
            self.kv_cache_dtype = model_runner.kv_cache_dtype
            if self.kv_cache_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                raise ValueError(f"--attention-backend {BACKEND_NAME} reads a 16/32-bit KV cache; "
                                 "drop --kv-cache-dtype fp8 or use SGLang's triton backend")
            from sglang.srt.runtime_context import get_exec

            self.block_size = (model_runner.decode_num_tokens_per_req()
                               if get_exec().dllm.dllm_algorithm is not None else 1)
            from sglang.srt.runtime_context import get_parallel

            # As SGLang's triton backend sizes its split buffers: query heads of this rank.
            self.num_q_heads = model_runner.model_config.get_max_num_attention_heads() // get_parallel().attn_tp_size
            pool = model_runner.token_to_kv_pool
            self.v_head_dim = pool.get_value_buffer(pool.start_layer).shape[-1]
            self.graph = None  # buffers shared by every captured graph (init_cuda_graph_state)
            self.forward_metadata = None

        # ---- metadata ------------------------------------------------------------------------
        def init_forward_metadata(self, forward_batch):
            super().init_forward_metadata(forward_batch)  # sliding-window slot translation
            self.forward_metadata = self._eager_inputs(forward_batch)

        def _eager_inputs(self, fb) -> KernelInputs:
            mode = fb.forward_mode
            if mode.is_decode_or_idle():
                bs = fb.batch_size
                q_lens = torch.ones(bs, dtype=torch.int32, device=self.device)
                q_start = torch.arange(bs, dtype=torch.int32, device=self.device)
                seq_lens, max_q, tokens = fb.seq_lens.to(torch.int32), 1, bs
            elif fb.extend_seq_lens is not None:
                q_lens = fb.extend_seq_lens.to(torch.int32)
                seq_lens = (fb.extend_prefix_lens + fb.extend_seq_lens).to(torch.int32)
                q_start = (fb.extend_start_loc.to(torch.int32) if fb.extend_start_loc is not None
                           else (torch.cumsum(q_lens, 0) - q_lens).to(torch.int32))
                lens_cpu = fb.extend_seq_lens_cpu or q_lens.tolist()
                max_q, tokens = max(lens_cpu), sum(lens_cpu)
            else:  # a DLLM_EXTEND batch without extend lengths: full blocks
                return self._fixed_width_inputs(fb, self.block_size, buffers=None)
            return KernelInputs(fb.req_pool_indices, q_start, q_lens, seq_lens,
                                kernel.split_rows(q_lens, seq_lens, self.config), max_q,
                                self._partials(tokens, q_lens.shape[0]))

        def _partials(self, tokens: int, batch: int):
            """Split-KV scratch for one forward, shared by its layers (None: no splitting)."""
            if self.config.max_splits <= 1:
                return None
            rows = kernel.partial_rows_bound(tokens, batch, self.config)
            return kernel.allocate_partials(rows, self.num_q_heads, self.v_head_dim, self.config, self.device)

        def _fixed_width_inputs(self, fb, width: int, buffers) -> KernelInputs:
            """DECODE (width 1) and DLLM_EXTEND (width = block size) batches: every request brings
            `width` tokens. With `buffers`, written in place (graph capture and replay)."""
            bs = fb.batch_size
            seq = fb.seq_lens[:bs].to(torch.int32)
            q_lens = torch.full((bs,), width, dtype=torch.int32, device=self.device)
            # Padded rows of a replay carry seq_len = the fill value (1): clamp so the block
            # still fits (their outputs are discarded).
            seq = torch.maximum(seq, q_lens)
            q_start = torch.arange(0, bs * width, width, dtype=torch.int32, device=self.device)
            split_row = kernel.split_rows(q_lens, seq, self.config)
            req = fb.req_pool_indices[:bs]
            if buffers is None:
                return KernelInputs(req, q_start, q_lens, seq, split_row, width, self._partials(bs * width, bs))
            b = buffers
            b["req_pool_indices"][:bs].copy_(req)
            b["q_start"][:bs].copy_(q_start)
            b["q_lens"][:bs].copy_(q_lens)
            b["seq_lens"][:bs].copy_(seq)
            b["split_row"][:bs].copy_(split_row)
            return KernelInputs(b["req_pool_indices"][:bs], b["q_start"][:bs], b["q_lens"][:bs],
                                b["seq_lens"][:bs], b["split_row"][:bs], width, b["partials"])

        def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
            def ints():
                return torch.zeros(max_bs, dtype=torch.int32, device=self.device)

            rows = kernel.partial_rows_bound(max_num_tokens, max_bs, self.config)
            self.graph = {"req_pool_indices": torch.zeros(max_bs, dtype=torch.int64, device=self.device),
                          "q_start": ints(), "q_lens": ints(), "seq_lens": ints(), "split_row": ints(),
                          "partials": kernel.allocate_partials(rows, self.num_q_heads, self.v_head_dim,
                                                               self.config, self.device)}

        def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
            # Before every capture and every replay: refresh the shared buffers in place.
            mode = forward_batch.forward_mode
            if mode.is_decode_or_idle():
                width = 1
            elif mode.is_dllm_extend():
                width = self.block_size
            else:
                # Full prefill captures need per-capture extend layouts this backend does not keep.
                raise ValueError(f"--attention-backend {BACKEND_NAME} captures DECODE and DLLM_EXTEND graphs only, "
                                 f"not {mode.name}: add --cuda-graph-backend-prefill=disabled")
            self.forward_metadata = self._fixed_width_inputs(forward_batch, width, self.graph)

        def get_cuda_graph_seq_len_fill_value(self):
            return 1

        # ---- attention -----------------------------------------------------------------------
        def _ours(self, layer) -> bool:
            sliding = getattr(layer, "sliding_window_size", None)
            return (not layer.is_cross_attention and (sliding is None or sliding <= -1)
                    and layer.qk_head_dim == layer.v_head_dim and not getattr(layer, "logit_cap", 0)
                    and getattr(layer, "sinks", None) is None)

        def _attend(self, q, k, v, layer, forward_batch, save_kv_cache, *, causal: bool):
            if save_kv_cache and k is not None and v is not None:
                self.token_to_kv_pool.set_kv_buffer(
                    layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v)
            meta = self.forward_metadata
            q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
            out = q3.new_empty((q3.shape[0], layer.tp_q_head_num, layer.v_head_dim))
            kernel.block_attention(
                q3, self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                self.token_to_kv_pool.get_value_buffer(layer.layer_id),
                self.req_to_token_pool.req_to_token, meta.req_pool_indices, meta.q_start, meta.q_lens,
                meta.seq_lens, max_q_len=meta.max_q_len, causal=causal, sm_scale=layer.scaling,
                page_size=self.page_size, out=out, config=self.config, partials=meta.partials,
                split_row=meta.split_row)
            return out.view(q3.shape[0], -1)

        def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
            if not self._ours(layer) or forward_batch.encoder_lens is not None:
                return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
            return self._attend(q, k, v, layer, forward_batch, save_kv_cache,
                                causal=layer.attn_type != AttentionType.ENCODER_ONLY)

        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
            if not self._ours(layer) or forward_batch.encoder_lens is not None:
                return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
            return self._attend(q, k, v, layer, forward_batch, save_kv_cache, causal=True)

        def support_triton(self):
            return True

    _CLASS = FastDVLMTritonAttnBackend
    return _CLASS
