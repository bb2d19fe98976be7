"""Every change the plugin makes to SGLang, as HookRegistry hooks, in one table.

`HOOK_TARGETS` lists (SGLang dotted target, our hook "module:function", hook type). Tests assert
that every target still resolves in the installed SGLang, so a renamed SGLang symbol fails a test
instead of silently disabling a hook. Hook functions live here and import SGLang lazily.
"""

from __future__ import annotations

import logging

from fast_dvlm_sglang.config import ARCHITECTURE

logger = logging.getLogger(__name__)

_ME = "fast_dvlm_sglang.sglang_plugin.hooks"
_KV = "fast_dvlm_sglang.sglang_plugin.kv_pressure"
_PC = "fast_dvlm_sglang.sglang_plugin.prefix_cache"
_HG = "fast_dvlm_sglang.sglang_plugin.http_guard"
_RC = "fast_dvlm_sglang.sglang_plugin.request_checks"
_MP = "fast_dvlm_sglang.sglang_plugin.media_policy"
_F8 = "fast_dvlm_sglang.sglang_plugin.fp8_linear_method"

HOOK_TARGETS: tuple[tuple[str, str, str], ...] = (
    # Block size / mask id for our architecture (SGLang's table is hard-coded per architecture).
    ("sglang.srt.dllm.config.DllmConfig.from_server_args",
     "fast_dvlm_sglang.sglang_plugin.dllm_config:from_server_args_hook", "AROUND"),
    # Our architecture is multimodal (SGLang's list is a module constant; env var otherwise).
    ("sglang.srt.configs.model_config.is_multimodal_model", f"{_ME}:is_multimodal_model", "AROUND"),
    # Processor mapping: Qwen2.5-VL's processor for our architecture, with our video path
    # (`processor.py`, `video_input.py`: PyAV clips under the caps, the clip's real frame rate).
    ("sglang.srt.managers.multimodal_processor.import_processors", f"{_ME}:after_import_processors", "AFTER"),
    # The scheduler step. FastDVLMBlock: around SGLang's own step, the next block's state on the
    # request after a context pass, NFE per token, a block whose first token ends the answer
    # emitted without denoising (`mdm_scheduler.py`). FastDVLMSpeculative: replaces the step
    # (variable commits and KV rollback, `spec_scheduler.py`). Other algorithms: untouched.
    ("sglang.srt.dllm.mixin.scheduler.SchedulerDllmMixin.process_batch_result_dllm",
     f"{_ME}:process_batch_result_dllm", "AROUND"),
    # FastDVLMSpeculative keeps the verify pass's KV of the committed tokens: no re-encoding.
    ("sglang.srt.dllm.mixin.scheduler.SchedulerDllmMixin._stash_dllm_context",
     "fast_dvlm_sglang.sglang_plugin.spec_scheduler:stash_dllm_context", "AROUND"),
    # FastDVLMSpeculative's next block starts at its seed (committed and streamed, no KV yet).
    ("sglang.srt.managers.schedule_batch.Req._init_fill_ids_for_dllm",
     "fast_dvlm_sglang.sglang_plugin.spec_scheduler:init_fill_ids_for_dllm", "AROUND"),
    # ... and is as wide as `draft_length.py` chooses for the batch (1: an AR step .. block size).
    ("sglang.srt.dllm.mixin.scheduler.SchedulerDllmMixin.process_dllm_staging_reqs",
     "fast_dvlm_sglang.sglang_plugin.draft_length:process_dllm_staging_reqs", "AROUND"),
    # The KV pool under pressure (`kv_pressure.py`): refuse what can never fit, admit a context
    # pass only if it fits with a block of room per running request, run block rounds when no
    # context pass can start, retract instead of stalling, keep the queued requests' cached
    # prefixes from the LRU eviction.
    ("sglang.srt.dllm.mixin.scheduler.SchedulerDllmMixin.validate_dllm_request",
     f"{_KV}:validate_dllm_request", "AROUND"),
    ("sglang.srt.dllm.mixin.scheduler.SchedulerDllmMixin.process_dllm_incoming_reqs",
     f"{_KV}:process_dllm_incoming_reqs", "AROUND"),
    # (and chunked prefill: a batch of context passes computes at most --chunked-prefill-size
    # tokens, `prefix_cache.cap_context_budget`)
    ("sglang.srt.dllm.mixin.scheduler.SchedulerDllmMixin._process_dllm_batches",
     f"{_KV}:process_dllm_batches", "AROUND"),
    ("sglang.srt.dllm.mixin.scheduler.SchedulerDllmMixin.get_new_batch_dllm",
     f"{_KV}:get_new_batch_dllm", "AROUND"),
    # Structured outputs (`structured_output.py`): SGLang's dLLM path never polls the grammar
    # queue, so a request whose grammar compiles asynchronously would wait forever.
    ("sglang.srt.dllm.mixin.scheduler.SchedulerDllmMixin.get_new_batch_dllm",
     "fast_dvlm_sglang.sglang_plugin.structured_output:release_ready_grammar_requests", "BEFORE"),
    # The radix cache and chunked prefill (`prefix_cache.py`): a finished request's causal KV
    # goes into the tree (and ends at the pool's capacity, `kv_pressure.next_block_fits_pool`).
    ("sglang.srt.dllm.mixin.scheduler.SchedulerDllmMixin._finish_dllm_request_if_needed",
     f"{_PC}:finish_dllm_request_if_needed", "AROUND"),
    # Prefix matches as fine as AR's (no whole-block rounding, any page size up to the block).
    ("sglang.srt.managers.schedule_batch.Req._compute_max_prefix_len",
     f"{_PC}:compute_max_prefix_len", "AROUND"),
    ("sglang.srt.arg_groups.overrides._dllm_page_size", f"{_PC}:dllm_page_size", "AROUND"),
    # The CPU path: extend attention of our layers in O(new x context) (SGLang's torch_native
    # backend computes a square attention over the whole sequence per extend, `cpu_attention.py`).
    ("sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend.forward_extend",
     "fast_dvlm_sglang.sglang_plugin.cpu_attention:forward_extend", "AROUND"),
    # ... and its decode attention with whole-row KV gathers (advanced indexing cost ~6x more).
    ("sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend.forward_decode",
     "fast_dvlm_sglang.sglang_plugin.cpu_attention:forward_decode", "AROUND"),
    # CUDA graphs for FastDVLMSpeculative (opt-in): a bidirectional and a causal capture.
    ("sglang.srt.model_executor.runner.decode_cuda_graph_runner.create_attention_graph_variants",
     "fast_dvlm_sglang.sglang_plugin.attention_modes:create_attention_graph_variants", "AROUND"),
    # Hostile clients. The HTTP edge (`http_guard.py`): a request-body limit before parsing,
    # error bodies without tracebacks, `/generate` stream refusals as a 4xx before any byte.
    ("sglang.srt.entrypoints.http_server._setup_and_run_http_server", f"{_HG}:setup_and_run_http_server", "AROUND"),
    ("sglang.srt.entrypoints.http_server.serve_generate_request", f"{_HG}:serve_generate_request", "AROUND"),
    # (and SGLang's post-warmup GC freeze waits for its own port: with --skip-server-warmup it
    # raced uvicorn's start and failed at every CPU start)
    ("sglang.srt.entrypoints.http_server._freeze_gc_after_server_warmup",
     f"{_HG}:freeze_gc_after_server_warmup", "AROUND"),
    # One validation layer for chat, completions and /generate (`request_checks.py`).
    ("sglang.srt.managers.tokenizer_manager.TokenizerManager.generate_request", f"{_RC}:generate_request", "AROUND"),
    ("sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request",
     f"{_RC}:after_validate_one_request", "AFTER"),
    ("sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._validate_request",
     f"{_RC}:after_validate_chat_request", "AFTER"),
    ("sglang.srt.entrypoints.openai.serving_completions.OpenAIServingCompletion._validate_request",
     f"{_RC}:after_validate_completion_request", "AFTER"),
    # The n choices of a seeded request are n samples, choice k with seed + k (`parallel_sampling.py`):
    # SGLang sends the n copies of a request with one SamplingParams, seed included.
    ("sglang.srt.managers.tokenizer_manager.TokenizerManager._send_one_request",
     "fast_dvlm_sglang.sglang_plugin.parallel_sampling:before_send_one_request", "BEFORE"),
    # W8A8 FP8 checkpoints (`fast-dvlm quantize`, `fp8_linear_method.py`): on a host without CUDA
    # the scheme without a CUDA capability query, float32 activations, the reference's fp8_linear;
    # on CUDA, small-M per-channel linears through our Triton GEMM (`kernels/fp8_gemm.py`).
    ("sglang.srt.layers.quantization.compressed_tensors.compressed_tensors.CompressedTensorsConfig"
     "._check_scheme_supported", f"{_F8}:check_scheme_supported", "AROUND"),
    ("sglang.srt.layers.quantization.compressed_tensors.compressed_tensors.CompressedTensorsConfig"
     ".get_supported_act_dtypes", f"{_F8}:supported_act_dtypes", "AROUND"),
    ("sglang.srt.layers.quantization.compressed_tensors.schemes.compressed_tensors_w8a8_fp8"
     ".CompressedTensorsW8A8Fp8.apply_weights", f"{_F8}:apply_weights", "AROUND"),
    # Media sources and sizes where SGLang fetches and decodes (`media_policy.py`): every
    # redirect hop's address, every decoded image's pixel count.
    ("sglang.srt.utils.common._assert_media_url_allowed", f"{_MP}:assert_media_url_allowed", "AROUND"),
    ("sglang.srt.utils.common._fully_load_pil_image", f"{_MP}:fully_load_pil_image", "AROUND"),
)


def _resolve(spec: str):
    import pkgutil

    return pkgutil.resolve_name(spec)


def register_all() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for target, hook, kind in HOOK_TARGETS:
        fn = _resolve(hook)
        if any(h is fn for _, h, _ in HookRegistry._hooks.get(target, [])):
            continue  # idempotent
        HookRegistry.register(target, fn, HookType[kind])


# ---- hook functions ---------------------------------------------------------------------------
def is_multimodal_model(original, model_architectures):
    if model_architectures and ARCHITECTURE in model_architectures:
        return True
    return original(model_architectures)


def after_import_processors(result, package_name, overwrite=False):
    from sglang.srt.managers.multimodal_processor import PROCESSOR_MAPPING

    from .processor import FastDVLMImageProcessor

    for model_cls in FastDVLMImageProcessor.models:
        PROCESSOR_MAPPING[model_cls] = FastDVLMImageProcessor
    return None


def process_batch_result_dllm(original, scheduler, batch, result):
    from . import ALGORITHM_NAME, SPEC_ALGORITHM_NAME

    algorithm = getattr(getattr(scheduler, "dllm_config", None), "algorithm", None)
    if algorithm == SPEC_ALGORITHM_NAME:
        from .spec_scheduler import process_batch_result_dllm as spec_step

        return spec_step(original, scheduler, batch, result)
    if algorithm == ALGORITHM_NAME:
        from .mdm_scheduler import process_batch_result_dllm as mdm_step

        return mdm_step(original, scheduler, batch, result)
    return original(scheduler, batch, result)
