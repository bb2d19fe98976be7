"""Plugin registration: entry points, hook targets, model registry, DllmConfig, algorithm step."""

from __future__ import annotations

import json
import os
import pkgutil
import shutil

import pytest

pytestmark = pytest.mark.sglang

from fast_dvlm_sglang.config import ARCHITECTURE  # noqa: E402
from fast_dvlm_sglang.sglang_plugin.hooks import HOOK_TARGETS  # noqa: E402


@pytest.fixture(scope="module")
def loaded():
    from sglang.srt.plugins import load_plugins

    load_plugins()
    return True


def test_entry_points_declared():
    from importlib.metadata import entry_points

    plugins = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    platforms = {ep.name: ep.value for ep in entry_points(group="sglang.srt.platforms")}
    assert plugins.get("fast_dvlm") == "fast_dvlm_sglang.sglang_plugin:register"
    assert platforms.get("fast_dvlm_cpu") == "fast_dvlm_sglang.sglang_plugin.platform:activate"


@pytest.mark.parametrize("target,hook,kind", HOOK_TARGETS, ids=[t for t, _, _ in HOOK_TARGETS])
def test_hook_target_resolves(target, hook, kind):
    from sglang.srt.plugins.hook_registry import HookType

    assert pkgutil.resolve_name(target) is not None  # a renamed SGLang symbol fails here
    assert callable(pkgutil.resolve_name(hook))
    assert kind in HookType.__members__


def test_load_plugins_registers_everything(loaded):
    from sglang.srt.dllm.algorithm import algo_name_to_cls
    from sglang.srt.models.registry import ModelRegistry
    from sglang.srt.plugins.hook_registry import HookRegistry

    from fast_dvlm_sglang.sglang_plugin import register
    from fast_dvlm_sglang.sglang_plugin.algorithm import FastDVLMBlock
    from fast_dvlm_sglang.sglang_plugin.model import Fast_dVLMForConditionalGeneration
    from fast_dvlm_sglang.sglang_plugin.speculative import FastDVLMSpeculative

    register()  # idempotent
    assert algo_name_to_cls["FastDVLMBlock"] is FastDVLMBlock
    assert algo_name_to_cls["FastDVLMSpeculative"] is FastDVLMSpeculative
    cls, arch = ModelRegistry.resolve_model_cls([ARCHITECTURE])
    assert cls is Fast_dVLMForConditionalGeneration and arch == ARCHITECTURE
    for target, hook, _ in HOOK_TARGETS:
        assert target in HookRegistry._patched, target
        ours = [h for _, h, _ in HookRegistry._hooks[target] if h.__module__.startswith("fast_dvlm")]
        listed = [pkgutil.resolve_name(h) for t, h, _ in HOOK_TARGETS if t == target]
        assert pkgutil.resolve_name(hook) in listed
        assert ours == listed, target  # exactly our hooks on this target, each once



def test_registry_scans_only_our_models_under_serve_env_and_still_resolves_others():
    """`fast-dvlm serve` gives SGLang's processes `SGLANG_EXTERNAL_MODEL_PACKAGE` (our models
    package, `serve.backend_env`): SGLang's registry then imports none of its own ~290 model
    modules to find ours (a fresh process: the registry reads the variable at import), and an
    architecture that is not ours still resolves, loading SGLang's models on demand."""
    import subprocess
    import sys

    from fast_dvlm_sglang import serve

    env = serve.backend_env(["--device", "cpu"])
    probe = (
        "import sys, json\n"
        "from sglang.srt.models.registry import ModelRegistry\n"
        "from sglang.srt.plugins import load_plugins\n"
        "load_plugins()\n"
        "before = sorted(m for m in sys.modules if m.startswith('sglang.srt.models.') and m != 'sglang.srt.models.registry')\n"
        f"ours, _ = ModelRegistry.resolve_model_cls([{ARCHITECTURE!r}])\n"
        "other, arch = ModelRegistry.resolve_model_cls(['Qwen2ForCausalLM'])\n"
        "print(json.dumps({'before': before, 'ours': ours.__module__, 'other': other.__name__, 'archs': len(ModelRegistry.models)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=300, check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert env["SGLANG_EXTERNAL_MODEL_PACKAGE"] == "fast_dvlm_sglang.sglang_plugin.models"
    assert got["ours"] == "fast_dvlm_sglang.sglang_plugin.model"
    # only what our model class itself builds on (Qwen2.5-VL's modules), not the whole package
    assert 0 < len(got["before"]) < 20, got["before"]
    assert got["other"] == "Qwen2ForCausalLM" and got["archs"] > 100

def test_hooks_are_live(loaded):
    from sglang.srt.configs.model_config import is_multimodal_model
    from sglang.srt.managers import multimodal_processor as mp

    assert is_multimodal_model([ARCHITECTURE])
    assert not is_multimodal_model(["NoSuchArch"])
    mp.import_processors("sglang.srt.multimodal.processors")
    names = {m.__name__: p.__name__ for m, p in mp.PROCESSOR_MAPPING.items()}
    assert names[ARCHITECTURE] == "FastDVLMImageProcessor"


def test_transformers_knows_fast_dvlm(tiny_checkpoints, loaded):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_checkpoints["new"])
    assert cfg.model_type == "fast_dvlm" and cfg.architectures == [ARCHITECTURE]
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg.get_text_config(), "rope_parameters", None) or {}
    assert "mrope_section" in rope


def test_cpu_platform_is_out_of_tree(loaded):
    from sglang.srt.platforms import current_platform

    from fast_dvlm_sglang.sglang_plugin.platform import activate

    assert activate() is not None  # this host has no accelerator
    assert current_platform.is_out_of_tree() and current_platform.device_type == "cpu"


def _server_args(path, **kw):
    from sglang.srt.server_args import ServerArgs

    return ServerArgs(model_path=str(path), dllm_algorithm="FastDVLMBlock", device="cpu",
                      attention_backend="torch_native", sampling_backend="pytorch", dtype="float32",
                      disable_cuda_graph=True, **kw)


def test_dllm_config_from_checkpoint(tiny_checkpoints, loaded):
    from sglang.srt.dllm.config import DllmConfig

    cfg = json.loads((tiny_checkpoints["old"] / "config.json").read_text())
    dc = DllmConfig.from_server_args(_server_args(tiny_checkpoints["old"], max_running_requests=4))
    assert dc.block_size == cfg["bd_size"] == 32
    assert dc.mask_id == cfg["mask_token_id"]
    assert dc.max_running_requests == 4 and dc.requires_separate_context_encoding


def _variant(src, dst, edit):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_dllm_config_mask_from_tokenizer_and_bd_size(tiny_checkpoints, tmp_path, loaded):
    from sglang.srt.dllm.config import DllmConfig

    src = tiny_checkpoints["new"]
    mask = json.loads((src / "config.json").read_text())["mask_token_id"]

    def edit(c):
        c.pop("mask_token_id")
        c["bd_size"] = 16

    dc = DllmConfig.from_server_args(_server_args(_variant(src, tmp_path / "m", edit)))
    assert dc.block_size == 16 and dc.mask_id == mask


def test_dllm_config_refuses_without_mask(tiny_checkpoints, tmp_path, loaded):
    from sglang.srt.dllm.config import DllmConfig

    dst = _variant(tiny_checkpoints["new"], tmp_path / "nomask", lambda c: c.pop("mask_token_id"))
    tok = json.loads((dst / "tokenizer.json").read_text())
    for added in tok["added_tokens"]:
        if added["content"] == "|<MASK>|":
            added["content"] = "<|unused_mask|>"
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(RuntimeError, match="no mask token"):
        DllmConfig.from_server_args(_server_args(dst))


class _FakeBatch:
    def __init__(self, ids):
        import torch

        self.input_ids = torch.tensor(ids, dtype=torch.long).view(-1)
        self.batch_size = len(ids)


def test_algorithm_step_matches_select_unmask():
    """prepare_inputs seeds [first, MASK...]; step applies select_unmask on shifted logits,
    restricted to the first sub-block that still has masks; state stays per request; the mask
    id is never committed, even where it is the argmax."""
    import torch
    from sglang.srt.dllm.config import DllmConfig

    from fast_dvlm_sglang.decoding.mdm import select_unmask
    from fast_dvlm_sglang.sglang_plugin.algorithm import FastDVLMBlock

    B, L, V, MASK = 3, 8, 11, 10
    algo = FastDVLMBlock(DllmConfig("FastDVLMBlock", {"sub_block_size": 4, "threshold": 0.5}, L, MASK, B))
    fb = _FakeBatch([[0] * L] * B)
    states = [{"first_token": t, "masked": None, "nfe": 0, "stops": None, "room": None} for t in (1, 2, 3)]
    algo.prepare_inputs(None, fb, states)
    ids = fb.input_ids.view(B, L)
    assert ids[:, 0].tolist() == [1, 2, 3] and (ids[:, 1:] == MASK).all()
    gen = torch.Generator().manual_seed(0)
    for _ in range(L):
        logits = torch.randn(B * L, V, generator=gen) * 3
        logits[:, MASK] += 100  # the argmax everywhere: the rule must still never commit it
        before = torch.stack([s["masked"] for s in states])
        shifted = torch.cat([logits.view(B, L, V)[:, :1], logits.view(B, L, V)[:, :-1]], dim=1)
        first_sub = torch.where(before, torch.arange(L) // 4, L).min(1, keepdim=True).values
        tokens, commit = select_unmask(shifted, before, (torch.arange(L) // 4) == first_sub, 0.5, mask_id=MASK)
        expect = torch.where(commit, tokens, fb.input_ids.view(B, L).clone())
        done = algo.step(fb, logits, states)
        assert torch.equal(fb.input_ids.view(B, L), expect)
        assert done == (~(before & ~commit).any(1)).tolist()
        if all(done):
            break
    assert all(done)
    assert not (fb.input_ids == MASK).any()
    assert all(st["nfe"] == _ + 1 for st in states)  # one forward per step, counted per request


@pytest.mark.parametrize("seed", range(6))
def test_mdm_block_ends_once_its_filled_prefix_decides_the_answer(seed):
    """`stop_early`: a row is done as soon as its filled prefix (committed positions before the
    first mask) holds one of its stop ids or reaches its room, and not before; a whole-block run
    (stop_early false, same logits) never changes a committed position afterwards, so it ends
    with the same tokens where the early row ended. Random logits, stops and budgets."""
    import torch
    from sglang.srt.dllm.config import DllmConfig

    from fast_dvlm_sglang.sglang_plugin.algorithm import FastDVLMBlock

    B, L, V, MASK = 4, 16, 13, 12
    gen = torch.Generator().manual_seed(seed)
    cfg = {"sub_block_size": 4, "threshold": 0.6}
    early = FastDVLMBlock(DllmConfig("FastDVLMBlock", cfg, L, MASK, B))
    whole = FastDVLMBlock(DllmConfig("FastDVLMBlock", {**cfg, "stop_early": False}, L, MASK, B))
    stops = [torch.randint(0, MASK, (int(n),), generator=gen) for n in torch.randint(0, 3, (B,), generator=gen)]
    rooms = [None if r == 0 else int(r) for r in torch.randint(0, L + 2, (B,), generator=gen)]
    firsts = torch.randint(0, MASK, (B,), generator=gen).tolist()

    def fresh():
        return [{"first_token": f, "masked": None, "nfe": 0, "stops": st, "room": r}
                for f, st, r in zip(firsts, stops, rooms)]

    fa, fb = _FakeBatch([[0] * L] * B), _FakeBatch([[0] * L] * B)
    sa, sb = fresh(), fresh()
    early.prepare_inputs(None, fa, sa)
    whole.prepare_inputs(None, fb, sb)
    ended_at = [None] * B
    snapshot = [None] * B
    for step in range(1, 4 * L):
        logits = torch.randn(B * L, V, generator=gen) * 3
        before = fb.input_ids.view(B, L).clone()
        before_masked = torch.stack([s["masked"] for s in sb])
        done_a = early.step(fa, logits, sa)
        done_b = whole.step(fb, logits, sb)
        after = fb.input_ids.view(B, L)
        assert torch.equal(after[~before_masked], before[~before_masked]), "a committed position changed"
        for i in range(B):
            masked = sa[i]["masked"]
            filled = int((~masked).long().cumprod(0).sum())
            prefix = fa.input_ids.view(B, L)[i, :filled].tolist()
            decides = (not masked.any()) or (rooms[i] is not None and filled >= rooms[i]) or any(
                t in prefix for t in stops[i].tolist())
            if ended_at[i] is None:
                assert done_a[i] == decides, (i, step)
                assert done_b[i] == (not masked.any()), (i, step)
                if decides:
                    ended_at[i], snapshot[i] = step, fa.input_ids.view(B, L)[i].clone()
                    assert sa[i]["nfe"] == step
        if all(done_b):
            break
    assert all(done_b) and all(e is not None for e in ended_at)
    for i in range(B):  # the whole-block run ends with what the early row had committed, unchanged
        committed = snapshot[i] != MASK
        assert torch.equal(fb.input_ids.view(B, L)[i][committed], snapshot[i][committed])


def test_post_warmup_gc_freeze_waits_for_the_server_port():
    """`http_guard.freeze_gc_after_server_warmup`: SGLang's `/freeze_gc` call (made at once under
    --skip-server-warmup, before uvicorn listens) goes out only once the port accepts."""
    import socket
    import threading
    import time

    from fast_dvlm_sglang.sglang_plugin.http_guard import freeze_gc_after_server_warmup

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    port = sock.getsockname()[1]
    opened = {}

    def listen_later():
        time.sleep(0.5)
        opened["at"] = time.monotonic()
        sock.listen()

    thread = threading.Thread(target=listen_later)
    thread.start()

    class Args:
        def url(self):
            return f"http://127.0.0.1:{port}"

    called = {}
    freeze_gc_after_server_warmup(lambda args: called.setdefault("at", time.monotonic()), Args())
    thread.join()
    sock.close()
    assert called["at"] >= opened["at"]
