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


# ---- Two pytest processes side by side (`make test-sglang`) --------------------------------------
# A server start is ~35 s of CPU, nearly all SGLang's imports in its three processes, and a module's
# servers then spend much of their time waiting on HTTP: one pytest process leaves CPU idle (39% of
# the two cores over test_spec_server, test_server and test_hostile_clients; modules that keep
# the CPU busy gain nothing from running beside others). `make
# test-sglang` runs two, `-m "many_servers_side"` and `-m "not many_servers_side"`. Memory decides
# the split: a live server holds ~2.6 GB (3 demo servers: 7.9 GB), so the modules that run three or
# more server processes at once (marker `many_servers`) and the users of the session's demo
# spec+AR pair (test_scale_out adds a two-rank server to it) are one side, run in that order (the
# pair starts once the three-server modules are done, then lives to the end), and everything else
# the other: at most ~3.5 live servers per side. Whole modules stay on one side, so module-scoped
# servers start once; `spec_server_tiny` lives on the second side only. (pytest-xdist's
# `--dist loadgroup` would do this split, but 3.8 cannot group under pytest 9.2:
# pytest-dev/pytest-xdist#1386.)
@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by the marker added here
def pytest_collection_modifyitems(config, items):
    demo_pair, many = set(), set()
    for item in items:
        if "demo_spec_and_ar" in item.fixturenames:
            demo_pair.add(item.module)
        if item.get_closest_marker("many_servers"):
            many.add(item.module)
    # 0: many servers at once, 1: uses the demo pair, 2: the other side
    rank = {item.module: 1 if item.module in demo_pair else 0 if item.module in many else 2 for item in items}
    for item in items:
        if rank[item.module] < 2:
            item.add_marker(pytest.mark.many_servers_side)
    items.sort(key=lambda item: rank[item.module])  # stable: module and test order otherwise kept


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
    context passes), the radix cache on (SGLang's default), /metrics on, hidden states returned
    on request."""
    from fast_dvlm_sglang.server_process import ServeProcess

    log = tmp_path_factory.mktemp("spec_logs") / "spec_tiny.log"
    server = ServeProcess(tiny_checkpoints["new"], "spec", log, max_running=SPEC_MAX_RUNNING,
                          sglang_args=["--chunked-prefill-size", "48", "--enable-metrics",
                                       "--enable-return-hidden-states"])
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def demo_spec_and_ar(tmp_path_factory):
    """A spec and an AR server on the demo model with the same SGLang flags: JSON without free
    whitespace (so JSON answers end), /metrics on, hidden states returned on request, and AR
    without SGLang's overlap scheduler, as the dLLM servers always run (with it AR applies
    penalties one token late: the counts of a step miss the token chosen just before it, visible
    in the returned logprobs)."""
    from fast_dvlm_sglang.demo import DEMO_CHECKPOINT
    from fast_dvlm_sglang.server_process import ServeProcess

    logs = tmp_path_factory.mktemp("demo_spec_ar_logs")
    flags = ["--constrained-json-disable-any-whitespace", "--enable-metrics", "--enable-return-hidden-states"]
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
