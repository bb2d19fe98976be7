"""How wide each speculative round is, per request: the scheduler side of `decoding.draft_policy`.

SGLang's dLLM scheduler gives every request of a `DLLM_EXTEND` batch `block_size` slots
(`Req._init_fill_ids_for_dllm`). Before the staging adder sizes the batch
(`SchedulerDllmMixin.process_dllm_staging_reqs`, an AROUND hook listed in `hooks.HOOK_TARGETS`),
this module chooses a width w for every `FastDVLMSpeculative` request about to run a round, over
the whole candidate batch at once (`DraftPolicy.choose`), and cuts the request's block to
[seed, w - 1 placeholders]: the adder then allocates w KV slots for it (`len(fill) - prefix_len`)
and the round drafts w - 1 tokens. Width 1 is an AR step (the seed alone, causal, no draft
pass). A seeded sampling request's width is chosen as if it ran alone: its width decides how
many draws a round takes from its generator, so the same seed gives the same answer under any
traffic. Rows of different widths share one forward (SGLang's extend metadata is per-row
variable length; `speculative.py` lays the positions out), so at high concurrency requests that
draft badly fall back to AR steps while the others keep drafting.

Configuration (`--dllm-algorithm-config` YAML, validated at startup by `policy_from_config`):
- `draft_length: N` pins every round to N draft tokens (width N + 1; 0 = AR steps only);
  without it the adaptive policy runs (a request can pin its own: `/generate` sampling params
  `custom_params: {draft_length: N}`);
- `forward_cost`: the cost model, a mapping {base, per_token, per_row, per_pair, per_round}
  (seconds) or the path of a JSON table written by `benchmarks/bench_forward_cost.py`; default:
  the table of the serving device type (`draft_policy.DEFAULT_COSTS`), whose `per_round` also
  fills a table that has none;
- `draft_widths`: the widths the adaptive policy picks from (default 4, 8, 16, 32, the training
  recipe's block sizes, plus 1);
- `prior_acceptance`, `probe_interval`: the acceptance prior of a new request and how many AR
  steps in a row before a request is probed again;
- `draft_margin`: how much faster a drafting round must be expected to be than a round of AR
  steps (0.1: 10%) before the batch drafts;
- `max_ar_run`: the most AR steps one round runs for a request when the batch runs AR steps
  (`DraftPolicy.ar_run`: r DECODE steps over r slots, `decode_steps.py`, paying the scheduler's
  per-round bookkeeping once per r tokens; default 8, 1 turns AR runs off).
With `cuda_graph: true` every row keeps the full block (SGLang's dLLM decode graphs are captured
for `block_size` slots per request): the policy then only decides, per round, whether the batch
drafts at all (a round of AR steps skips the draft pass), and runs no AR runs (each of their
passes would replay a whole-block graph).
"""

from __future__ import annotations

import json
import math
import weakref

from fast_dvlm_sglang.decoding.draft_policy import DEFAULT_COSTS, AcceptanceEstimate, DraftPolicy, ForwardCost

POLICY_KEYS = frozenset({"draft_length", "forward_cost", "draft_widths", "prior_acceptance", "probe_interval",
                         "draft_margin", "max_ar_run"})
_POLICIES: dict[str, DraftPolicy] = {}  # configuration only (frozen), keyed by its inputs


def policy_from_config(algorithm_config: dict, block_size: int, device: str) -> DraftPolicy:
    """The `DraftPolicy` of a `--dllm-algorithm-config` mapping (cached; errors name the key)."""
    key = json.dumps([algorithm_config, block_size, device], sort_keys=True, default=str)
    policy = _POLICIES.get(key)
    if policy is not None:
        return policy
    cfg = algorithm_config or {}
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    default = DEFAULT_COSTS[device_type]
    cost = (ForwardCost.load(cfg["forward_cost"], default_per_round=default.per_round)
            if cfg.get("forward_cost") is not None else default)
    kwargs = {}
    draft_length = cfg.get("draft_length")
    if draft_length is not None:
        if isinstance(draft_length, bool) or not isinstance(draft_length, int) or not 0 <= draft_length < block_size:
            raise ValueError(f"draft_length must be an integer in [0, {block_size - 1}] (the block size is "
                             f"{block_size}), got {draft_length!r}")
        kwargs["fixed_width"] = draft_length + 1
    if cfg.get("draft_widths") is not None:
        widths = cfg["draft_widths"]
        if not isinstance(widths, list) or not widths or not all(isinstance(w, int) and 1 <= w <= block_size
                                                                  for w in widths):
            raise ValueError(f"draft_widths must be a list of integers in [1, {block_size}], got {widths!r}")
        kwargs["widths"] = tuple(widths)
    for key, field, kind in (("prior_acceptance", "prior_p", float), ("probe_interval", "probe_interval", int),
                             ("draft_margin", "margin", float), ("max_ar_run", "max_ar_run", int)):
        value = cfg.get(key)
        if value is None:
            continue
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or (kind is int and value != int(value))):
            raise ValueError(f"{key} must be a finite number{' (an integer)' if kind is int else ''}, got {value!r}")
        kwargs[field] = kind(value)
    policy = DraftPolicy(block_size=block_size, cost=cost, **kwargs)
    _POLICIES[key] = policy
    return policy


def scheduler_policy(scheduler) -> DraftPolicy:
    cfg = scheduler.dllm_config
    return policy_from_config(cfg.algorithm_config, cfg.block_size, scheduler.server_args.device)


def graph_mode(algorithm_config: dict) -> bool:
    return bool((algorithm_config or {}).get("cuda_graph", False))


def set_block_width(req, width: int) -> None:
    """Cut (or regrow) a request's next block to [seed, width - 1 placeholders]."""
    fill = req.full_untruncated_fill_ids
    seed_at = req.seqlen - 1
    del fill[seed_at + 1:]
    fill.extend([0] * (width - 1))


# The server's acceptance estimate over all its requests' drafting rounds (`DraftPolicy.seed`):
# server state, kept per scheduler (one per process and rank; every rank sees the same rounds).
_WORKLOAD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def workload(scheduler) -> AcceptanceEstimate:
    return _WORKLOAD.get(scheduler, AcceptanceEstimate())


def record_workload(scheduler, policy: DraftPolicy, drafted: int, accepted: int) -> None:
    """One request's round into the server's estimate (after the round's commit)."""
    if drafted > 0:
        _WORKLOAD[scheduler] = policy.workload_update(workload(scheduler), drafted, accepted)


def _seed_new_requests(scheduler, policy: DraftPolicy, states: list) -> list:
    """New requests (no round yet, no evidence, no pin) start from the server's estimate where it
    has enough (else they stay due for a probe); seeded sampling requests never do."""
    import dataclasses

    current = workload(scheduler)
    out = []
    for s in states:
        if (s.rounds == 0 and s.acceptance.trials == 0 and s.draft_length is None and policy.fixed_width is None
                and (s.greedy or s.sampling_seed is None)):
            estimate, current = policy.seed(current)
            if estimate is not None:
                s = dataclasses.replace(s, acceptance=estimate)
        out.append(s)
    _WORKLOAD[scheduler] = current
    return out


def _round_candidates(reqs) -> list:
    from .speculative import SpecState

    return [r for r in reqs if isinstance(r.dllm_algo_state, SpecState) and r.dllm_algo_state.seed is not None
            and not r.dllm_incomplete_ids and not r.is_dllm_prefill() and r.dllm_block_offset == r.seqlen - 1]


def choose_round_widths(scheduler, reqs) -> list[int]:
    """Choose and apply the width of every spec request of `reqs` about to run a round."""
    import dataclasses

    rows = _round_candidates(reqs)
    if not rows:
        return []
    cfg = scheduler.dllm_config
    policy = scheduler_policy(scheduler)
    states = _seed_new_requests(scheduler, policy, [r.dllm_algo_state for r in rows])
    widths = policy.choose([s.acceptance for s in states], [r.seqlen - 1 for r in rows], [s.budget for s in states],
                           [s.draft_length for s in states],
                           [not s.greedy and s.sampling_seed is not None for s in states])
    runs = [False] * len(rows)
    if graph_mode(cfg.algorithm_config):
        # One captured canvas width: draft (every row a full block) or not at all (AR steps).
        drafting = any(w > 1 for w in widths)
        widths = [min(cfg.block_size, s.budget) if drafting else 1 for s in states]
        slots = [cfg.block_size] * len(rows)
    else:
        if all(w == 1 for w in widths):  # a round of AR steps: AR runs where they pay
            # Not: a pinned request, a grammar (its matcher must accept each step's token before
            # the next step's mask: a host round trip per token), a seeded sampling request (its
            # rounds' boundaries decide when it is probed, a probe draws its generator otherwise,
            # and the run length depends on the batch: the same seed must give the same answer).
            eligible = [s.draft_length is None and s.grammar is None and r.grammar is None
                        and (s.greedy or s.sampling_seed is None) for r, s in zip(rows, states)]
            run = policy.ar_run([r.seqlen - 1 for r in rows], [s.budget for s in states], eligible)
            if run > 1:
                widths = [min(run, s.budget) if e else 1 for s, e in zip(states, eligible)]
                runs = [w > 1 for w in widths]
        slots = widths
    for req, state, width, n, ar_run in zip(rows, states, widths, slots, runs):
        req.dllm_algo_state = dataclasses.replace(state, width=width, ar_run=ar_run)
        set_block_width(req, n)
    return widths


# ---- hook ----------------------------------------------------------------------------------------
def process_dllm_staging_reqs(original, scheduler, adder, reqs):
    from . import SPEC_ALGORITHM_NAME

    cfg = getattr(scheduler, "dllm_config", None)
    if cfg is not None and cfg.algorithm == SPEC_ALGORITHM_NAME:
        choose_round_widths(scheduler, reqs)
    return original(scheduler, adder, reqs)
