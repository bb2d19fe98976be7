"""Train the bundled demo model: a tiny Qwen2.5-VL trained AR, then converted to Fast-dVLM.

Deterministic CPU training on the synthetic shapes task (``demo/shapes.py``, training samples
from seed 0; evaluation uses other seeds):

1. tokenizer: byte-level BPE (512 ids incl. the Qwen2.5-VL special tokens and ``|<MASK>|``)
   trained on ``corpus_for_tokenizer(seed=0, n=2000)``;
2. stage 1: AR training of the whole model (vision tower included), loss on assistant tokens;
3. stage 2: direct conversion to block diffusion with the Fast-dVLM recipe (``recipe.py``):
   block-size annealing {4, 8, 16, 32} with sqrt(progress) (progress passed explicitly),
   [noisy | clean] layout with causal-context attention, complementary masking,
   auto-truncation, vision only in the clean stream, 0.5 x diffusion CE + 1.0 x AR CE.

Regenerate the committed checkpoint (740 s on 2 CPU cores, deterministic)::

    python -m fast_dvlm_sglang.demo.train --out fast_dvlm_sglang/demo/checkpoint

Small runs for tests: ``--stage1-steps 2 --stage2-steps 2 --batch-size 2 --tiny``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from ..checkpoint import save_checkpoint
from ..config import FastDVLMConfig
from ..model import FastDVLMForConditionalGeneration
from ..tiny import fast_dvlm_config, generation_config
from . import recipe

TRAIN_SEED = 0  # data seed of the training split (evaluation uses other seeds)

DEMO_TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, mrope_section=[4, 6, 6])
DEMO_VISION = dict(depth=3, hidden_size=96, intermediate_size=192, num_heads=4, fullatt_block_indexes=[2])
TEST_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, mrope_section=[2, 1, 1])
TEST_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1])


def build_tokenizer():
    from ..tokenizer import train_tokenizer
    from .shapes import corpus_for_tokenizer

    return train_tokenizer(corpus_for_tokenizer(seed=TRAIN_SEED, n=2000), vocab_size=512)


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    from ..tokenizer import write_tokenizer_files
    from .shapes import IMAGE_SIZE

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(tokenizer, tmp, image_size=IMAGE_SIZE)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir()}


class Data:
    """Encodes training samples (seed TRAIN_SEED) into recipe examples."""

    def __init__(self, processor, model, ids: dict[str, int]) -> None:
        self.processor, self.model, self.ids = processor, model, ids

    def encode(self, index: int):
        from ..processing import encode_training_conversation
        from .shapes import make_sample

        if index < 0:  # grounding warm-up: the -index-th description of the training split
            j = -index * 4
            while (sample := make_sample(TRAIN_SEED, j)).kind != "describe":
                j += 1
        else:
            sample = make_sample(TRAIN_SEED, index)
        enc = encode_training_conversation(self.processor, sample.messages)
        ids = torch.tensor(enc.input_ids)
        pos = self.model.rope_positions(ids[None], enc.image_grid_thw)[:, 0]
        return enc, ids, pos

    def examples(self, indices, block_size, gen, random_offset_prob: float = 0.0, pad_tail_prob: float = 0.0):
        """[(recipe.Example, pixel_values or None, image_grid_thw or None)] for sample ``indices``."""
        out = []
        for index in indices:
            enc, ids, pos = self.encode(index)
            offset = block_size is not None and bool(torch.rand((), generator=gen) < random_offset_prob)
            pad_tail = block_size is not None and bool(torch.rand((), generator=gen) < pad_tail_prob)
            example = recipe.build_example(
                ids, pos, torch.tensor(enc.labels_mask), torch.tensor(enc.turn_ids), block_size=block_size,
                mask_id=self.ids["mask"], end_id=self.ids["end"], generator=gen, random_offset=offset,
                pad_tail=pad_tail, pad_id=self.ids["pad"])
            out.append((example, enc.pixel_values, enc.image_grid_thw))
        return out

    def collate(self, items):
        pixels = [pv for _, pv, _ in items if pv is not None]
        grids = [g for _, _, g in items if g is not None]
        batch = recipe.collate([e for e, _, _ in items], self.ids["pad"])
        return batch, (torch.cat(pixels) if pixels else None), (torch.cat(grids) if grids else None)

    def batch(self, indices, block_size, gen, random_offset_prob: float = 0.0, pad_tail_prob: float = 0.0):
        return self.collate(self.examples(indices, block_size, gen, random_offset_prob, pad_tail_prob))

    def length_grouped(self, indices, n_batches, block_size, gen, random_offset_prob=0.0, pad_tail_prob=0.0):
        """The samples of ``n_batches`` consecutive steps, sorted by length and split into batches
        of similar length (less padding), in a random (seeded) order."""
        items = self.examples(indices, block_size, gen, random_offset_prob, pad_tail_prob)
        items.sort(key=lambda item: item[0].token_ids.shape[0])
        size = -(-len(items) // n_batches)
        groups = [items[i * size:(i + 1) * size] for i in range(n_batches)]
        order = torch.randperm(n_batches, generator=gen).tolist()
        return [self.collate(groups[i]) for i in order if groups[i]]


def init_weights(model: torch.nn.Module, seed: int, gain: float = 1.0) -> None:
    """Fan-in scaled normal init (std = gain / sqrt(fan_in)), zero biases, unit norm weights.

    The usual LLM init (std 0.02) is tuned for hidden sizes in the thousands; at width 128 it
    leaves attention logits so flat that the model settles on the mean image feature (it learns
    the background colour, nothing per cell) and never learns to pick out one vision token.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.dim() >= 2:
                fan_in = param.shape[1] if name.endswith("embed_tokens.weight") else param[0].numel()
                param.copy_(torch.randn(param.shape, generator=gen) * (gain / fan_in**0.5))
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.fill_(1.0)


def lr_at(step: int, total: int, peak: float, warmup: int, final_frac: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def run_stage(name, model, data, steps, *, batch_size, lr, warmup, start_index, diffusion, gen,
              random_offset_prob=0.0, pad_tail_prob=0.0, log=None, progress=True, weight_decay=0.01, group_steps=4,
              warmup_describe_steps=0):
    from tqdm import tqdm

    if steps <= 0:
        return
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    model.train()
    bar = tqdm(range(steps), desc=name, disable=not progress, mininterval=5)
    queue: list = []
    for step in bar:
        progress_frac = step / max(1, steps - 1)  # fed explicitly to the block-size schedule
        block_size = recipe.block_size_schedule(progress_frac) if diffusion else None
        if not queue or queue[0][0] != block_size or (step == warmup_describe_steps):
            n = min(group_steps, steps - step)
            if step < warmup_describe_steps:
                n = min(n, warmup_describe_steps - step)
                idx = range(-(step + n) * batch_size, -step * batch_size)
            else:
                idx = range(start_index + step * batch_size, start_index + (step + n) * batch_size)
            queue = [(block_size, b) for b in data.length_grouped(idx, n, block_size, gen, random_offset_prob,
                                                                  pad_tail_prob)]
        batch, pv, grid = queue.pop(0)[1]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        embeds = model.embed(batch.token_ids, pv, grid)
        logits = model(embeds, batch.positions, batch.attention)
        out = recipe.losses(logits, batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(ar=f"{float(out['ar']):.3f}", dif=f"{float(out['diffusion']):.3f}", bs=block_size or 0)
        if log is not None and (step % 25 == 0 or step == steps - 1):
            log.append({"stage": name, "step": step, "block_size": block_size, "ar": round(float(out["ar"]), 4),
                        "diffusion": round(float(out["diffusion"]), 4)})
    model.eval()


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="checkpoint directory (written atomically)")
    ap.add_argument("--seed", type=int, default=0, help="seed for initialisation and masking")
    ap.add_argument("--stage1-steps", type=int, default=4000)
    ap.add_argument("--describe-warmup", type=int, default=800,
                    help="first stage-1 steps on descriptions only (where the model learns to read "
                         "each vision token; on the full mixture a small model keeps to the mean image)")
    ap.add_argument("--stage2-steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr1", type=float, default=1e-3)
    ap.add_argument("--lr2", type=float, default=5e-4)
    ap.add_argument("--random-offset-prob", type=float, default=0.5,
                    help="share of stage-2 samples whose response blocks start at a random offset")
    ap.add_argument("--pad-tail-prob", type=float, default=0.5,
                    help="share of stage-2 samples whose final block is filled with masked pad targets")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="a much smaller model (tests)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    # Training changes process-wide torch settings; put them back for callers (tests, notebooks).
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(args, argv)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(args, argv) -> Path:
    torch.manual_seed(args.seed)
    t0 = time.time()

    from ..tokenizer import SPECIAL_TOKENS, load_processor

    tokenizer = build_tokenizer()
    files = tokenizer_files(tokenizer)
    token_ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // 64) * 64
    text, vision = (TEST_TEXT, TEST_VISION) if args.tiny else (DEMO_TEXT, DEMO_VISION)
    config = fast_dvlm_config(token_ids, vocab_size, **text, vision=vision, tie_word_embeddings=True)
    cfg = FastDVLMConfig.from_dict(config)
    model = FastDVLMForConditionalGeneration(cfg)
    init_weights(model, args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        for name, content in files.items():
            (Path(tmp) / name).write_bytes(content)
        processor = load_processor(tmp)
    ids = {"mask": cfg.mask_token_id, "end": token_ids["<|im_end|>"], "pad": token_ids["<|endoftext|>"]}
    data = Data(processor, model, ids)
    gen = torch.Generator().manual_seed(args.seed)
    log: list[dict] = []
    progress = not args.no_progress
    run_stage("stage1-ar", model, data, args.stage1_steps, batch_size=args.batch_size, lr=args.lr1,
              warmup=min(50, max(1, args.stage1_steps // 10)), start_index=0, diffusion=False, gen=gen,
              log=log, progress=progress, warmup_describe_steps=min(args.describe_warmup, args.stage1_steps))
    t1 = time.time()
    run_stage("stage2-diffusion", model, data, args.stage2_steps, batch_size=args.batch_size, lr=args.lr2,
              warmup=min(30, max(1, args.stage2_steps // 10)), start_index=10_000_000, diffusion=True, gen=gen,
              random_offset_prob=args.random_offset_prob, pad_tail_prob=args.pad_tail_prob, log=log, progress=progress)
    t2 = time.time()

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    meta = {
        "command": "python -m fast_dvlm_sglang.demo.train " + " ".join(argv if argv is not None else os.sys.argv[1:]),
        "args": vars(args),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": {"stage1": round(t1 - t0, 1), "stage2": round(t2 - t1, 1), "total": round(t2 - t0, 1)},
        "torch": torch.__version__,
        "log": log,
    }
    extra = dict(files)
    extra["generation_config.json"] = json.dumps(generation_config(token_ids), indent=2) + "\n"
    extra["training_log.json"] = json.dumps(meta, indent=1) + "\n"
    out = save_checkpoint(state, config, args.out, extra_files=extra)
    print(f"wrote {out} ({meta['parameters']} parameters) in {t2 - t0:.0f}s")
    return out


if __name__ == "__main__":
    main()
