"""Fixtures for the SGLang tests: tiny checkpoints (both key layouts) and live servers."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("sglang.srt")  # not "sglang": this folder itself is a namespace package of that name


def _tokenizer():
    """The tiny tokenizer; its added special tokens are listed explicitly (transformers 5.19's
    `all_special_tokens` no longer includes them, which `make_tiny_checkpoint` relies on)."""
    from fast_dvlm_sglang import tiny

    try:
        tok = tiny.tokenizer_for_tiny()
    except ImportError:  # demo corpus not there yet
        from fast_dvlm_sglang.tokenizer import train_tokenizer

        corpus = ["a red circle on the left", "the blue square is big", "What shape is in the image?",
                  "There is a green triangle at the top right of the picture."] * 50
        tok = train_tokenizer(corpus, vocab_size=400)
    cls = type(tok)
    tok.__class__ = type(cls.__name__, (cls,), {
        "all_special_tokens": property(lambda s: sorted(set(cls.all_special_tokens.fget(s)) | set(s.get_added_vocab())))
    })
    return tok


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    from fast_dvlm_sglang.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    tok = _tokenizer()
    return {
        "new": make_tiny_checkpoint(root / "new", seed=0, layout="new", tokenizer=tok),
        "old": make_tiny_checkpoint(root / "old", seed=1, layout="old", tie_word_embeddings=False, tokenizer=tok),
    }




# ---- FastDVLMSpeculative servers (shared by tests/sglang/test_spec_*.py) -------------------------
SPEC_MAX_RUNNING = 16


@pytest.fixture(scope="session")
def spec_server_tiny(tiny_checkpoints, tmp_path_factory):
    """`fast-dvlm serve --algorithm spec` on the tiny random model (tied embeddings, new layout),
    16 concurrent requests, chunked prefill at 48 tokens (long prompts and images run in several
    context passes), the radix cache on (SGLang's default), /metrics on."""
    from fast_dvlm_sglang.server_process import ServeProcess

    log = tmp_path_factory.mktemp("spec_logs") / "spec_tiny.log"
    server = ServeProcess(tiny_checkpoints["new"], "spec", log, max_running=SPEC_MAX_RUNNING,
                          sglang_args=["--chunked-prefill-size", "48", "--enable-metrics"])
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def demo_spec_and_ar(tmp_path_factory):
    """A spec and an AR server on the demo model with the same SGLang flags: JSON without free
    whitespace (so JSON answers end), /metrics on, and AR without SGLang's overlap scheduler, as
    the dLLM servers always run (with it AR applies penalties one token late: the counts of a
    step miss the token chosen just before it, visible in the returned logprobs)."""
    from fast_dvlm_sglang.demo import DEMO_CHECKPOINT
    from fast_dvlm_sglang.server_process import ServeProcess

    logs = tmp_path_factory.mktemp("demo_spec_ar_logs")
    flags = ["--constrained-json-disable-any-whitespace", "--enable-metrics"]
    spec = ServeProcess(DEMO_CHECKPOINT, "spec", logs / "spec.log", max_running=16, sglang_args=flags)
    ar = ServeProcess(DEMO_CHECKPOINT, "ar", logs / "ar.log", max_running=16,
                      sglang_args=[*flags, "--disable-overlap-schedule"])
    try:
        spec.wait_ready()
        ar.wait_ready()
        yield spec, ar
    finally:
        spec.stop()
        ar.stop()
