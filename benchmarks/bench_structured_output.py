"""What a grammar costs and saves speculative decoding: tokens/NFE and tokens/s, spec against AR.

    .venv-sglang/bin/python benchmarks/bench_structured_output.py --model demo

Three `fast-dvlm serve` processes, all with `--constrained-json-disable-any-whitespace` (JSON
without free whitespace, so answers end): `ar`; `spec` (drafts are the best grammatical
candidate of the draft pass, `structured_output.py`); `spec --unconstrained-drafts` (the plain
argmax draft; the walk stops at its first forbidden token). Each runs the same demo
conversations (most with an image) through native /generate, greedy, under four workloads:

- `none`: no grammar (the baseline);
- `sentences`: a permissive regex every demo answer matches (capitalised sentences), the
  grammar's overhead on in-distribution text;
- `describe`: the description prompts under a regex of the description format (in distribution);
- `json_schema`: an object of enums and a boolean, a format the demo model never saw.

Per configuration and workload: tokens/NFE (spec: `meta_info["dllm_nfe"]`, every forward after the
prefill; AR: one forward per token), output tokens/s at concurrency 1 (requests one after the
other) and at `--concurrency`, answers equal to AR's, and for JSON the share that validates.
Writes `benchmarks/results/structured_output_<device>_<model>.json`.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import platform
import re
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx

from fast_dvlm_sglang.config import resolve_model_dir
from fast_dvlm_sglang.server_process import ServeProcess

RESULTS = Path(__file__).parent / "results"
CONFIGS = {"ar": ("ar", []), "spec": ("spec", []), "spec_unconstrained_drafts": ("spec", ["--unconstrained-drafts"])}
SGLANG_ARGS = ["--constrained-json-disable-any-whitespace"]
SENTENCES = r"[A-Z][A-Za-z0-9 ,:'-]*[.?!]( [A-Z][A-Za-z0-9 ,:'-]*[.?!])*"
DESCRIBE = (r"There (is one shape|are (two|three|four) shapes) on a (black|white) background\."
            r"( (Top left|Top|Top right|Left|Center|Right|Bottom left|Bottom|Bottom right): [a-z ]+\.){9}")
SCHEMA = {"type": "object", "properties": {
    "shape": {"type": "string", "enum": ["circle", "square", "triangle"]},
    "color": {"type": "string", "enum": ["red", "green", "blue", "yellow"]},
    "count": {"type": "integer", "enum": [0, 1, 2, 3, 4]}, "present": {"type": "boolean"}},
    "required": ["shape", "color", "count", "present"], "additionalProperties": False}
WORKLOADS = {"none": {}, "sentences": {"regex": SENTENCES}, "describe": {"regex": DESCRIBE},
             "json_schema": {"json_schema": json.dumps(SCHEMA)}}


def _png_url(image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def conversations(model_dir: Path, n: int, seed: int = 97) -> dict[str, list[tuple[str, str | None]]]:
    """(rendered prompt, image URL) per workload: `describe` gets description prompts only."""
    from fast_dvlm_sglang.demo import shapes
    from fast_dvlm_sglang.processing import render_chat
    from fast_dvlm_sglang.tokenizer import load_processor

    proc = load_processor(model_dir)
    samples = shapes.make_split(seed, 8 * n)

    def job(s):
        return render_chat(proc, s.prompt_messages, add_generation_prompt=True), (
            _png_url(s.image) if s.image is not None else None)

    every = [job(s) for s in samples[:n]]
    described = [job(s) for s in samples if s.kind == "describe"][:n]
    return {name: described if name == "describe" else every for name in WORKLOADS}


def _generate(server, prompt: str, url: str | None, max_new_tokens: int, options: dict) -> dict:
    body = {"text": prompt, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, **options}}
    if url is not None:
        body["image_data"] = url
    r = httpx.post(server.base_url + "/generate", json=body, timeout=600)
    r.raise_for_status()
    return r.json()


def _valid_json(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def run(server, jobs, options: dict, max_new_tokens: int, concurrency: int) -> tuple[list[dict], float]:
    start = time.perf_counter()
    if concurrency == 1:
        bodies = [_generate(server, p, u, max_new_tokens, options) for p, u in jobs]
    else:
        with cf.ThreadPoolExecutor(concurrency) as pool:
            bodies = list(pool.map(lambda j: _generate(server, j[0], j[1], max_new_tokens, options), jobs))
    return bodies, time.perf_counter() - start


def summarise(bodies: list[dict], seconds: float, spec: bool) -> dict:
    tokens = sum(len(b["output_ids"]) for b in bodies)
    # forwards after the prefill (its logits give the first token), as spec counts them
    nfe = sum(b["meta_info"]["dllm_nfe"][-1] for b in bodies) if spec else tokens - len(bodies)
    return {"requests": len(bodies), "output_tokens": tokens, "nfe": nfe, "tokens_per_nfe": tokens / max(nfe, 1),
            "seconds": seconds, "output_tokens_per_s": tokens / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    model_dir = resolve_model_dir(args.model)
    convs = conversations(model_dir, args.requests)
    report = {"what": __doc__.split("\n\n")[0], "date": str(date.today()), "model": args.model,
              "device": f"CPU ({platform.processor() or platform.machine()}), float32, torch_native attention",
              "sglang_args": SGLANG_ARGS, "max_new_tokens": args.max_new_tokens, "workloads": {
                  k: next(iter(v.values()), None) for k, v in WORKLOADS.items()}, "results": {}}
    log_dir = Path(tempfile.mkdtemp(prefix="bench_structured_output_"))
    servers = {name: ServeProcess(model_dir, algo, log_dir / f"{name}.log", serve_args=extra, sglang_args=SGLANG_ARGS,
                                  max_running=16) for name, (algo, extra) in CONFIGS.items()}
    try:
        for server in servers.values():
            server.wait_ready()
        for workload, options in WORKLOADS.items():
            jobs = convs[workload]
            answers = {}
            for name, server in servers.items():
                _generate(server, *jobs[0], 4, options)  # compile the grammar, warm the caches
                rows = {}
                for c in (1, args.concurrency):
                    httpx.post(server.base_url + "/flush_cache", timeout=60)
                    bodies, seconds = run(server, jobs, options, args.max_new_tokens, c)
                    rows[f"c{c}"] = summarise(bodies, seconds, CONFIGS[name][0] == "spec")
                    answers.setdefault(name, [b["output_ids"] for b in bodies])
                    if workload == "json_schema":
                        rows[f"c{c}"]["valid_json"] = sum(_valid_json(b["text"]) for b in bodies) / len(bodies)
                    if workload in ("sentences", "describe"):
                        rows[f"c{c}"]["matches_regex"] = sum(
                            re.fullmatch(options["regex"], b["text"]) is not None for b in bodies) / len(bodies)
                rows["answers_equal_ar"] = (sum(a == b for a, b in zip(answers[name], answers["ar"]))
                                            if "ar" in answers else None)
                report["results"].setdefault(workload, {})[name] = rows
                print(workload, name, json.dumps({c: {k: round(v, 3) if isinstance(v, float) else v
                                                      for k, v in r.items()} if isinstance(r, dict) else r
                                                  for c, r in rows.items()}), flush=True)
    finally:
        for server in servers.values():
            server.stop()
    c = f"c{args.concurrency}"
    lines = ["| workload | config | tokens/NFE | tok/s c1 | tok/s " + c + " | x AR c1 | x AR " + c + " | = AR |",
             "|---|---|---|---|---|---|---|---|"]
    for workload, rows in report["results"].items():
        for name, r in rows.items():
            ar = rows["ar"]
            lines.append(f"| {workload} | {name} | {r['c1']['tokens_per_nfe']:.2f} | {r['c1']['output_tokens_per_s']:.0f} "
                         f"| {r[c]['output_tokens_per_s']:.0f} "
                         f"| {r['c1']['output_tokens_per_s'] / ar['c1']['output_tokens_per_s']:.2f} "
                         f"| {r[c]['output_tokens_per_s'] / ar[c]['output_tokens_per_s']:.2f} "
                         f"| {r['answers_equal_ar']}/{r['c1']['requests']} |")
    report["table"] = lines
    out = args.out or RESULTS / f"structured_output_cpu_{Path(str(args.model)).name}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(out)
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
