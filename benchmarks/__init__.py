"""Benchmarks (installed as `fast_dvlm_sglang.benchmarks`; `fast-dvlm bench` is `cli.py`).

The suite behind `fast-dvlm bench` and `make bench`:
- `cli.py`: `fast-dvlm bench serve | online | forward`, its flags and errors;
- `suite.py`: serve (our SGLang server per configuration) and online (any running server);
- `load.py`: datasets and the streaming OpenAI client at a fixed concurrency;
- `serving_metrics.py`: every reported number's definition, the report schema, the table;
- `prometheus.py`: our server's counters (NFE, spec's round histograms) from `/metrics`;
- `plots.py`: the PNGs;
- `forward.py`: model-level forward timings of the PyTorch reference (`gpu.sh` on a GPU).

The `bench_*.py` scripts measure one question each (adaptive speculation, prefix cache, ...)
and are run as scripts (`python benchmarks/bench_x.py`); results go to `results/`.
"""
