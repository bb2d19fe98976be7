"""Draft quality per draft length for the self-speculative decoder, and forward cost per new token.

    .venv/bin/python benchmarks/bench_draft_length.py --out benchmarks/results/draft_length_cpu_demo.json

Informs an adaptive draft-length policy. On the demo checkpoint (or `--model DIR`), greedy, batch 1,
float32, reference PyTorch decoders (`fast_dvlm_sglang.decoding`), on the CPU:

1. Acceptance per block size B (draft length B - 1) for `spec`, `--max-new-tokens` per request, on
   - `demo`: in-domain prompts, `shapes.make_split(--seed, --n-demo)` (a held-out seed);
   - `random`: unfamiliar prompts, one user message of random ids / numbers / words, no image;
   - `random_noeos`: the same prompts with EOS ignored, so every request runs `--max-new-tokens`
     tokens (the model's continuation past its own EOS is unfamiliar text too, and it gives
     enough rounds to estimate acceptance at long draft lengths).
   Per (set, B): accepted drafts per round (mean, histogram), tokens per round, tokens/NFE, the
   per-position conditional acceptance P(accept j | accepted j-1, j drafted), and how many
   requests' tokens differ from AR greedy (`algorithm="ar"`; self-speculation must give zero).
2. Truncated long drafts: the default 32-block draft ([seed, MASK x 31], bidirectional) with only
   its first k draft tokens verified, k in `--truncate-k`:
   - `min_estimate`: min(accepted, k) over the rounds of the native B=32 run (what the brief of
     the experiment asks: the 32-block's rounds, re-scored);
   - `loop`: an actual decode loop that drafts 32 and verifies k (rounds then start where that
     policy puts them), checked against AR greedy as well.
   Compare with the native block B = k + 1 (draft [seed, MASK x k]): is a short block drafted
   better than the prefix of a long one? (The demo was trained with block-size annealing
   4, 8, 16, 32, `demo/recipe.py`.)
3. Forward cost: `DecodeSession.forward` of n new tokens after c cached tokens (prefilled with
   random text ids), causal (`write=False`, the verify pass's shape) and block-bidirectional (the
   draft pass), for n in `--new-tokens`, c in `--contexts`; median / min ms over `--repeats`
   interleaved repeats after `--warmup`, and the ratio to n = 1.
4. Predicted decode throughput per policy from 1 and 3: tokens per round / (t_bidir(draft block)
   + t_causal(verify block)) at each measured context, vs AR's 1 / t_causal(1); plus the measured
   end-to-end wall time of each (set, B) run (prefill included; noisy on a shared machine).

Writes JSON to `--out`. Timings are for this machine and thread count only (recorded in the JSON,
with the load average before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path

import torch

from fast_dvlm_sglang.decoding import DecodeSession, GenerationConfig, Prompt, generate
from fast_dvlm_sglang.decoding.output import OutputTokens
from fast_dvlm_sglang.decoding.sampling import SamplingParams, sample_tokens
from fast_dvlm_sglang.decoding.spec import accept_longest_prefix, committed_tokens
from fast_dvlm_sglang.decoding.stopping import StopCriteria

DEFAULT_OUT = str(Path(__file__).parent / "results" / "draft_length_cpu_demo.json")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------

_WORDS = ("kappa", "zeta", "ortho", "vex", "quill", "nimbus", "lorem", "flux", "grommet", "tundra",
          "opal", "wicket", "sprocket", "haze", "juniper", "basalt", "cobalt", "rune", "xylem", "fjord")


def _random_item(rng: random.Random) -> str:
    kind = rng.randrange(5)
    hexd = "0123456789abcdef"
    if kind == 0:  # hex id with a dash: 8f3a-22c9
        return "".join(rng.choice(hexd) for _ in range(4)) + "-" + "".join(rng.choice(hexd) for _ in range(4))
    if kind == 1:  # a number
        return str(rng.randrange(10 ** rng.randint(2, 6)))
    if kind == 2:  # key=value
        return f"{rng.choice(_WORDS)}_{rng.randrange(100)}={rng.randrange(10000)}"
    if kind == 3:  # mixed-case alnum
        alnum = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        return "".join(rng.choice(alnum) for _ in range(rng.randint(3, 8)))
    return rng.choice(_WORDS)


def random_prompts(n: int, seed: int, items: int = 12) -> list[list[dict]]:
    """`n` single-turn user chats of `items` random ids / numbers / words each (no image)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = " ".join(["id"] + [_random_item(rng) for _ in range(items)])
        out.append([{"role": "user", "content": text}])
    return out


def encode_prompts(processor, chats: list[list[dict]]) -> list[Prompt]:
    from fast_dvlm_sglang.processing import encode_chat

    prompts = []
    for messages in chats:
        enc = encode_chat(processor, messages)
        prompts.append(Prompt.from_encoded(enc))
    return prompts


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def spec_truncated(model, prompt: Prompt, *, draft_block: int, verify_len: int, max_new_tokens: int,
                   eos: tuple[int, ...]) -> tuple[list[int], int, list[int], list[int]]:
    """Greedy self-speculation that drafts a `draft_block` block but verifies only `verify_len` drafts.

    Mirrors `decoding.spec.spec_decode` (greedy) except that the verify pass covers
    [seed, d_1 .. d_k] with k = min(verify_len, drafted); with verify_len = draft_block - 1 it is
    exactly `spec` with block size `draft_block`. Returns (tokens, nfe, accepted, verified) where
    `verified[r]` is how many drafts round r verified (the cap on its accepted length).
    """
    greedy = SamplingParams()
    cfg = model.config
    session = DecodeSession(model, prompt)
    out = OutputTokens(StopCriteria(max_new_tokens, frozenset(eos), ()), None)
    accepted, verified = [], []
    seed = sample_tokens(session.prefill(), greedy)[0].view(1)
    out.extend(seed.tolist())
    while not out.finished:
        length = max(1, min(draft_block, out.remaining))
        if length > 1:
            masks = torch.full((length - 1,), cfg.mask_token_id, dtype=torch.long, device=model.device)
            logits = session.forward(torch.cat([seed, masks]), bidirectional=True, write=False)
            draft = sample_tokens(logits[:-1], greedy)[0][:verify_len]
        else:
            draft = seed.new_empty(0)
        base = session.cache.length
        verify = sample_tokens(session.forward(torch.cat([seed, draft]), bidirectional=False, write=True), greedy)[0]
        k = accept_longest_prefix(draft[None], verify[None, :-1])
        new = committed_tokens(draft[None], verify[None], k)[0]
        k = int(k[0])
        session.cache.truncate(base + 1 + k)
        accepted.append(k)
        verified.append(int(draft.numel()))
        out.extend(new[: k + 1].tolist())
        seed = new[k : k + 1]
    return list(out.tokens), session.nfe, accepted, verified


def spec_caps(accepted: list[int], block_size: int, max_new_tokens: int) -> list[int]:
    """Drafts verified per round of a `spec` run (block shrinks to the remaining length at the end)."""
    caps, emitted = [], 1  # the prefill emits the first token
    for k in accepted:
        caps.append(max(1, min(block_size, max_new_tokens - emitted)) - 1)
        emitted += k + 1
    return caps


def summarise(runs: list[dict], ar_tokens: list[list[int]], max_len: int) -> dict:
    """Acceptance statistics of one (set, policy) over its requests."""
    acc = [k for r in runs for k in r["accepted"]]
    caps = [c for r in runs for c in r["verified"]]
    rounds = len(acc)
    tokens = sum(len(r["tokens"]) for r in runs)
    nfe = sum(r["nfe"] for r in runs)
    # P(draft j accepted | drafts 1..j-1 accepted and j was verified), j = 1..max_len
    cond = []
    for j in range(1, max_len + 1):
        at_risk = [(k, c) for k, c in zip(acc, caps) if c >= j and k >= j - 1]
        cond.append(round(sum(k >= j for k, _ in at_risk) / len(at_risk), 4) if at_risk else None)
    mismatches = sum(r["tokens"] != ref for r, ref in zip(runs, ar_tokens))
    return {
        "requests": len(runs),
        "rounds": rounds,
        "tokens": tokens,
        "nfe": nfe,
        "mean_accepted": round(sum(acc) / max(rounds, 1), 4),
        "mean_committed_per_round": round(sum(k + 1 for k in acc) / max(rounds, 1), 4),  # before EOS cut
        "tokens_per_round": round((tokens - len(runs)) / max(rounds, 1), 4),  # output tokens, prefill's excluded
        "tokens_per_nfe": round(tokens / max(nfe, 1), 4),
        "mean_tokens_per_nfe_per_request": round(statistics.mean(len(r["tokens"]) / max(r["nfe"], 1) for r in runs), 4),
        "full_accept_rate": round(sum(k == c for k, c in zip(acc, caps)) / max(rounds, 1), 4),
        "accepted_hist": {str(k): v for k, v in sorted(Counter(acc).items())},
        "cond_accept_by_position": cond,
        "ar_mismatches": mismatches,
        "seconds": round(sum(r["seconds"] for r in runs), 3),
    }


@torch.inference_mode()
def draft_agreement(model, prompt: Prompt, ar_tokens: list[int], block_sizes: list[int]) -> list[dict[int, tuple]]:
    """Drafts of every block size from the same contexts: the prefixes of the AR greedy answer.

    At each answer position t (seed y_t after prompt + y_0..y_t-1), draft [y_t, MASK x (B-1)] for
    every B and count how many leading drafts equal the AR continuation y_t+1.. (what a greedy
    verify would accept). Returns per position {B: (accepted, cap, drafts)} with cap = the drafts
    that have an AR target. Unlike the decode runs, every block size is scored on identical contexts.
    """
    mask_id = model.config.mask_token_id
    session = DecodeSession(model, prompt)
    session.prefill()
    rows = []
    for t in range(len(ar_tokens) - 1):
        seed = torch.tensor([ar_tokens[t]], device=model.device)
        row = {}
        for b in block_sizes:
            masks = torch.full((b - 1,), mask_id, dtype=torch.long, device=model.device)
            logits = session.forward(torch.cat([seed, masks]), bidirectional=True, write=False)
            draft = logits[:-1].argmax(-1).tolist()
            target = ar_tokens[t + 1 : t + b]
            k = 0
            while k < len(target) and draft[k] == target[k]:
                k += 1
            row[b] = (k, len(target), draft)
        rows.append(row)
        session.forward(seed, bidirectional=False, write=True)
    return rows


def summarise_agreement(rows: list[dict[int, tuple]], block_sizes: list[int], full: int) -> dict:
    """Same-context comparison of native short blocks with the prefix of the `full` block's draft."""
    out = {"positions": len(rows), "native": {}, "short_vs_truncated_full": {}}
    for b in block_sizes:
        acc = [r[b][0] for r in rows if r[b][1] >= 1]
        first = [r[b][0] >= 1 for r in rows if r[b][1] >= 1]
        out["native"][str(b)] = {
            "mean_accepted": round(sum(acc) / max(len(acc), 1), 4),
            "first_draft_correct": round(sum(first) / max(len(first), 1), 4),
        }
    if full in block_sizes:
        for b in block_sizes:
            k = b - 1
            if b == full:
                continue
            sel = [r for r in rows if r[b][1] >= k]  # positions with all k targets
            if not sel:
                continue
            short = [r[b][0] for r in sel]
            trunc = [min(r[full][0], k) for r in sel]
            out["short_vs_truncated_full"][str(k)] = {
                "positions": len(sel),
                "native_block": b,
                "native_mean_accepted": round(sum(short) / len(sel), 4),
                "truncated_mean_accepted": round(sum(trunc) / len(sel), 4),
                "native_better": sum(a > c for a, c in zip(short, trunc)),
                "truncated_better": sum(a < c for a, c in zip(short, trunc)),
                "identical_draft_prefix": round(sum(r[b][2][:k] == r[full][2][:k] for r in sel) / len(sel), 4),
            }
    return out


def acceptance(model, prompts: list[Prompt], args, eos: tuple[int, ...] | None) -> dict:
    """Native blocks via `generate`, and truncated 32-drafts, for one prompt set."""
    n_new = args.max_new_tokens
    cfg_eos = model.config.eos_token_ids if eos is None else eos
    ar_runs = []
    for p in prompts:
        t = time.perf_counter()
        r = generate(model, p, GenerationConfig("ar", max_new_tokens=n_new, eos_token_ids=eos))
        ar_runs.append({"tokens": r.token_ids, "nfe": r.nfe, "accepted": [], "verified": [],
                        "seconds": time.perf_counter() - t})
    ar_tokens = [r["tokens"] for r in ar_runs]
    out = {"ar": {"requests": len(prompts), "tokens": sum(len(t) for t in ar_tokens),
                  "nfe": sum(r["nfe"] for r in ar_runs),
                  "mean_answer_tokens": round(statistics.mean(len(t) for t in ar_tokens), 2),
                  "seconds": round(sum(r["seconds"] for r in ar_runs), 3)},
           "native": {}, "truncated_loop": {}, "truncated_min_estimate": {}}
    native_runs = {}
    for b in args.block_sizes:
        runs = []
        for p in prompts:
            t = time.perf_counter()
            r = generate(model, p, GenerationConfig("spec", max_new_tokens=n_new, block_size=b, eos_token_ids=eos))
            runs.append({"tokens": r.token_ids, "nfe": r.nfe, "accepted": r.accepted_lengths,
                         "verified": spec_caps(r.accepted_lengths, b, n_new), "seconds": time.perf_counter() - t})
        native_runs[b] = runs
        out["native"][str(b)] = {"block_size": b, "draft_len": b - 1, **summarise(runs, ar_tokens, b - 1)}
        s = out["native"][str(b)]
        print(f"  B={b:>2}: acc/round {s['mean_accepted']:.2f} tok/round {s['tokens_per_round']:.2f} "
              f"tok/NFE {s['tokens_per_nfe']:.2f} AR mismatches {s['ar_mismatches']}", file=sys.stderr)

    full = args.draft_block
    long_runs = native_runs.get(full)
    for k in args.truncate_k:
        if long_runs is not None:  # re-score the native 32-block rounds
            acc = [min(a, k) for r in long_runs for a in r["accepted"]]
            caps = [min(c, k) for r in long_runs for c in r["verified"]]
            out["truncated_min_estimate"][str(k)] = {
                "verify_len": k, "rounds": len(acc),
                "mean_accepted": round(sum(acc) / max(len(acc), 1), 4),
                "full_accept_rate": round(sum(a == c for a, c in zip(acc, caps)) / max(len(acc), 1), 4),
                "accepted_hist": {str(a): v for a, v in sorted(Counter(acc).items())},
            }
        runs = []
        for p in prompts:
            t = time.perf_counter()
            tokens, nfe, acc, ver = spec_truncated(model, p, draft_block=full, verify_len=k, max_new_tokens=n_new,
                                                   eos=tuple(cfg_eos))
            runs.append({"tokens": tokens, "nfe": nfe, "accepted": acc, "verified": ver,
                         "seconds": time.perf_counter() - t})
        out["truncated_loop"][str(k)] = {"draft_block": full, "verify_len": k, **summarise(runs, ar_tokens, k)}
        s = out["truncated_loop"][str(k)]
        print(f"  draft {full} verify {k:>2}: acc/round {s['mean_accepted']:.2f} tok/round {s['tokens_per_round']:.2f} "
              f"AR mismatches {s['ar_mismatches']}", file=sys.stderr)

    rows = [row for p, ref in zip(prompts, ar_tokens) for row in draft_agreement(model, p, ref, args.block_sizes)]
    out["same_context_drafts"] = summarise_agreement(rows, args.block_sizes, full)
    print("  same context: " + ", ".join(f"k={k}: native {v['native_mean_accepted']:.2f} vs truncated "
                                         f"{v['truncated_mean_accepted']:.2f}"
                                         for k, v in out["same_context_drafts"]["short_vs_truncated_full"].items()),
          file=sys.stderr)

    # Self-check: the truncated loop with every draft verified is `spec` itself.
    if long_runs is not None:
        same = 0
        for p, r in zip(prompts, long_runs):
            tokens, nfe, acc, _ = spec_truncated(model, p, draft_block=full, verify_len=full - 1,
                                                 max_new_tokens=n_new, eos=tuple(cfg_eos))
            same += tokens == r["tokens"] and nfe == r["nfe"] and acc == r["accepted"]
        out["truncated_loop_selfcheck_equal_to_spec"] = f"{same}/{len(prompts)}"
    return out


# ----------------------------------------------------------------------------------------------
# Forward cost
# ----------------------------------------------------------------------------------------------


def forward_cost(model, args) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    low = min(model.config.eos_token_ids + (model.config.mask_token_id,)) - 8  # ordinary text ids only
    out = {}
    for c in args.contexts:
        ids = torch.randint(0, low, (c,), generator=gen).tolist()
        session = DecodeSession(model, Prompt(ids))
        session.prefill()
        assert session.cache.length == c
        times: dict[tuple[int, bool], list[float]] = {(n, bi): [] for n in args.new_tokens for bi in (False, True)}
        keys = list(times)
        tokens = {n: torch.randint(0, low, (n,), generator=gen) for n in args.new_tokens}
        for rep in range(args.warmup + args.repeats):
            random.Random(rep).shuffle(keys)  # interleave so drift from other load spreads evenly
            for n, bi in keys:
                t = time.perf_counter()
                session.forward(tokens[n], bidirectional=bi, write=False)
                dt = time.perf_counter() - t
                if rep >= args.warmup:
                    times[(n, bi)].append(dt * 1e3)
        assert session.cache.length == c
        row = {}
        for mode, bi in (("causal", False), ("bidirectional", True)):
            base = statistics.median(times[(args.new_tokens[0], bi)])
            row[mode] = {
                str(n): {"median_ms": round(statistics.median(times[(n, bi)]), 4),
                         "min_ms": round(min(times[(n, bi)]), 4),
                         "ratio_to_n1": round(statistics.median(times[(n, bi)]) / base, 3)}
                for n in args.new_tokens
            }
        out[str(c)] = row
        print(f"  c={c}: causal ms " + " ".join(f"n{n}={row['causal'][str(n)]['median_ms']:.2f}"
                                                for n in args.new_tokens), file=sys.stderr)
    return out


def _cost(cost_row: dict, mode: str, n: int, stat: str = "median_ms") -> float | None:
    """`stat` ms of a forward of n tokens, linearly interpolated between measured n."""
    pts = sorted((int(k), v[stat]) for k, v in cost_row[mode].items())
    for (n0, t0), (n1, t1) in zip(pts, pts[1:]):
        if n0 <= n <= n1:
            return t0 + (t1 - t0) * (n - n0) / (n1 - n0)
    return dict(pts).get(n)


def predicted_throughput(acc: dict, cost: dict, args, stat: str = "median_ms") -> dict:
    """Decode tokens/s per policy from the measured tokens per round and forward costs (`stat`)."""
    out = {}
    for c, row in cost.items():
        ar_tps = 1e3 / _cost(row, "causal", 1, stat)
        per_set = {}
        for name, res in acc.items():
            pol = {"ar": round(ar_tps, 1)}
            policies = [(f"spec_B{b}", int(b), int(b), s) for b, s in res["native"].items()]
            policies += [(f"draft{args.draft_block}_verify{k}", args.draft_block, int(k) + 1, s)
                         for k, s in res["truncated_loop"].items()]
            for label, n_draft, n_verify, s in policies:
                draft_ms = _cost(row, "bidirectional", n_draft, stat)
                verify_ms = _cost(row, "causal", n_verify, stat)
                if draft_ms is not None and verify_ms is not None:  # None: outside the measured n
                    pol[label] = round(s["tokens_per_round"] / (draft_ms + verify_ms) * 1e3, 1)
            best = max(pol, key=pol.get)
            per_set[name] = {"tokens_per_s": pol, "best": best, "best_speedup_vs_ar": round(pol[best] / pol["ar"], 2)}
        out[c] = per_set
    return out


def print_tables(report: dict) -> None:
    """Compact markdown tables of the report, to stdout."""
    for name, res in report.get("acceptance", {}).items():
        print(f"\n### {name} (AR: {res['ar']['mean_answer_tokens']} tokens/request)\n")
        print("| policy | drafts verified | acc/round | tok/round | tok/NFE | full-accept | AR mismatches | accepted histogram |")
        print("|---|---|---|---|---|---|---|---|")
        rows = [(f"B={b}", b - 1, s) for b, s in ((int(b), s) for b, s in res["native"].items())]
        rows += [(f"draft {s['draft_block']} verify {k}", int(k), s) for k, s in res["truncated_loop"].items()]
        for label, n, s in sorted(rows, key=lambda r: (r[1], r[0])):
            hist = " ".join(f"{a}:{c}" for a, c in s["accepted_hist"].items())
            print(f"| {label} | {n} | {s['mean_accepted']:.2f} | {s['tokens_per_round']:.2f} | {s['tokens_per_nfe']:.2f} "
                  f"| {s['full_accept_rate']:.2f} | {s['ar_mismatches']} | {hist} |")
        if res["truncated_min_estimate"]:
            print("\nmin(accepted_B32, k) over the B=32 rounds: " + ", ".join(
                f"k={k}: {s['mean_accepted']:.2f} (full {s['full_accept_rate']:.2f})"
                for k, s in res["truncated_min_estimate"].items()))
        same = res.get("same_context_drafts")
        if same:
            print(f"\nsame contexts ({same['positions']} AR positions): first draft correct by B: " + ", ".join(
                f"B={b}: {v['first_draft_correct']:.3f}" for b, v in same["native"].items()))
            print("native B=k+1 vs first k of the 32-draft: " + "; ".join(
                f"k={k}: {v['native_mean_accepted']:.2f} vs {v['truncated_mean_accepted']:.2f} "
                f"(better {v['native_better']}/{v['truncated_better']}, same prefix {v['identical_draft_prefix']:.2f})"
                for k, v in same["short_vs_truncated_full"].items()))
    cost = report.get("forward_cost_ms")
    if cost:
        ns = list(next(iter(cost.values()))["causal"])
        print("\n### forward ms (median; ratio to n=1)\n")
        print("| context | mode | " + " | ".join(f"n={n}" for n in ns) + " |")
        print("|---|---|" + "---|" * len(ns))
        for c, row in cost.items():
            for mode, r in row.items():
                print(f"| {c} | {mode} | " + " | ".join(f"{r[n]['median_ms']:.2f} ({r[n]['ratio_to_n1']:.2f}x)" for n in ns) + " |")
    for key, what in (("predicted_decode_tokens_per_s", "median"), ("predicted_decode_tokens_per_s_from_min_ms", "min")):
        for c, per_set in report.get(key, {}).items():
            print(f"\n### predicted decode tokens/s at context {c} ({what} forward times)\n")
            for name, d in per_set.items():
                print(f"- {name}: best {d['best']} ({d['best_speedup_vs_ar']}x AR): "
                      + ", ".join(f"{p} {v}" for p, v in d["tokens_per_s"].items()))


# ----------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo", help="checkpoint directory or 'demo'")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=4321, help="shapes split seed (not the training seed)")
    ap.add_argument("--random-seed", type=int, default=7)
    ap.add_argument("--n-demo", type=int, default=24)
    ap.add_argument("--n-random", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--block-sizes", type=_ints, default=[2, 4, 8, 16, 32])
    ap.add_argument("--draft-block", type=int, default=32, help="the long draft that --truncate-k truncates")
    ap.add_argument("--truncate-k", type=_ints, default=[1, 2, 3, 4, 7, 8, 15, 16],
                    help="verified prefixes of the long draft (3, 7, 15 match native B = 4, 8, 16)")
    ap.add_argument("--contexts", type=_ints, default=[64, 512, 1536])
    ap.add_argument("--new-tokens", type=_ints, default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--skip-acceptance", action="store_true")
    ap.add_argument("--skip-cost", action="store_true")
    args = ap.parse_args()

    from fast_dvlm_sglang.config import resolve_model_dir
    from fast_dvlm_sglang.demo.shapes import make_split
    from fast_dvlm_sglang.model import FastDVLMForConditionalGeneration
    from fast_dvlm_sglang.tokenizer import load_processor

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    model_dir = resolve_model_dir(args.model)
    model = FastDVLMForConditionalGeneration.from_pretrained(model_dir).eval()
    report = {
        "date": date.today().isoformat(),
        "device": f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), batch 1, float32",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": str(args.model),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "loadavg_before": [round(x, 2) for x in load_before],
    }
    if not args.skip_acceptance:
        processor = load_processor(model_dir)
        sets = {
            "demo": (encode_prompts(processor, [s.prompt_messages for s in make_split(args.seed, args.n_demo)]), None),
            "random": (encode_prompts(processor, random_prompts(args.n_random, args.random_seed)), None),
            "random_noeos": (encode_prompts(processor, random_prompts(args.n_random, args.random_seed)), ()),
        }
        report["prompt_tokens"] = {name: round(statistics.mean(len(p.input_ids) for p in ps), 1)
                                   for name, (ps, _) in sets.items()}
        report["random_prompt_example"] = random_prompts(1, args.random_seed)[0][0]["content"]
        report["acceptance"] = {}
        for name, (prompts, eos) in sets.items():
            print(f"[{name}] {len(prompts)} prompts", file=sys.stderr)
            report["acceptance"][name] = acceptance(model, prompts, args, eos)
    if not args.skip_cost:
        print("[forward cost]", file=sys.stderr)
        report["forward_cost_ms"] = forward_cost(model, args)
    if "acceptance" in report and "forward_cost_ms" in report:
        report["predicted_decode_tokens_per_s"] = predicted_throughput(report["acceptance"], report["forward_cost_ms"], args)
        report["predicted_decode_tokens_per_s_from_min_ms"] = predicted_throughput(
            report["acceptance"], report["forward_cost_ms"], args, stat="min_ms")
    report["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    report["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out} ({report['seconds']} s)", file=sys.stderr)
    print_tables(report)


if __name__ == "__main__":
    main()
