"""The adaptive draft length (`decoding.draft_policy`): its estimate, cost model and choice."""

import itertools
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fast_dvlm_sglang.decoding.draft_policy import (
    DEFAULT_COSTS,
    AcceptanceEstimate,
    DraftPolicy,
    ForwardCost,
    choose_widths,
    expected_tokens,
    round_seconds,
)

WIDTHS = (1, 4, 8, 16, 32)


def _objective(p, widths, contexts, cost):
    return sum(expected_tokens(q, w) for q, w in zip(p, widths)) / round_seconds(cost, widths, contexts)


@settings(max_examples=300, deadline=None)
@given(st.floats(0.0, 0.999), st.integers(1, 32), st.integers(0, 2**31 - 1))
def test_expected_tokens_is_the_mean_of_a_simulated_round(p, width, seed):
    """E(p, w): a round commits the accepted run of draft tokens (each survives with p, until the
    first miss, at most w - 1) plus one verify token."""
    rng = random.Random(seed)
    n, total = 4000, 0
    for _ in range(n):
        k = 0
        while k < width - 1 and rng.random() < p:
            k += 1
        total += k + 1
    mean = total / n
    # the committed count lies in [1, w]: its standard deviation is at most (w - 1) / 2
    assert abs(mean - expected_tokens(p, width)) <= 5 * ((width - 1) / 2) / n ** 0.5 + 1e-9


costs = st.builds(ForwardCost, base=st.floats(1e-4, 0.05), per_token=st.floats(0.0, 2e-3),
                  per_row=st.floats(0.0, 2e-3), per_pair=st.floats(0.0, 1e-6))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(0.0, 0.999), min_size=1, max_size=3), costs, st.integers(0, 2**31 - 1))
def test_choice_is_near_the_exhaustive_optimum_for_small_batches(p, cost, seed):
    """Coordinate ascent over the two candidates (AR round, drafting round) lands within 5% of
    the best of all |widths|^n assignments, and never below all-AR or all-widest."""
    rng = random.Random(seed)
    contexts = [rng.randint(0, 4000) for _ in p]
    caps = [rng.choice([1, 3, 8, 32, 100]) for _ in p]
    allowed = [[w for w in WIDTHS if w <= c] for c in caps]
    got = choose_widths(p, contexts, allowed, cost)
    assert all(w in a for w, a in zip(got, allowed))
    best = max(_objective(p, list(ws), contexts, cost) for ws in itertools.product(*allowed))
    value = _objective(p, got, contexts, cost)
    assert value >= 0.95 * best
    assert value >= _objective(p, [1] * len(p), contexts, cost) * (1 - 1e-9)
    assert value >= _objective(p, [max(a) for a in allowed], contexts, cost) * (1 - 1e-9)


def test_unpredictable_text_gets_ar_steps_and_predictable_text_full_blocks():
    cost = DEFAULT_COSTS["cpu"]
    allowed = [list(WIDTHS)]
    assert choose_widths([0.0], [500], allowed, cost) == [1]
    assert choose_widths([0.3], [500], allowed, cost) == [1]
    assert choose_widths([0.99], [500], allowed, cost) == [32]
    # a mixed batch: the predictable rows keep drafting, the others ride along as AR steps
    got = choose_widths([0.98] * 4 + [0.05] * 4, [500] * 8, allowed * 8, cost)
    assert got[:4] == [32] * 4 and got[4:] == [1] * 4
    # more acceptance never means a narrower draft
    for c in DEFAULT_COSTS.values():
        chosen = [choose_widths([p / 100], [500], allowed, c)[0] for p in range(0, 100)]
        assert chosen == sorted(chosen) and chosen[0] == 1 and chosen[-1] == 32


def test_margin_leaves_marginal_drafting_to_ar_steps():
    """A drafting round must look `margin` faster than the round of AR steps; where drafting
    pays by more (predictable text), the margin changes nothing."""
    cost = ForwardCost(base=0.01, per_token=1e-4)
    allowed = [list(WIDTHS)]
    ar = _objective([0.0], [1], [100], cost)
    # the acceptance where the best drafting round beats AR by 5%
    for p in (x / 1000 for x in range(1000)):
        widths = choose_widths([p], [100], allowed, cost)
        if widths != [1] and _objective([p], widths, [100], cost) >= 1.05 * ar:
            break
    assert 1.05 * ar <= _objective([p], widths, [100], cost) < 1.06 * ar
    assert choose_widths([p], [100], allowed, cost, margin=0.1) == [1]
    assert choose_widths([0.95], [100], allowed, cost, margin=0.1) == choose_widths([0.95], [100], allowed, cost)
    policy = DraftPolicy(block_size=32, cost=cost)
    assert policy.margin == 0.1
    for bad in (-0.1, 11.0):
        with pytest.raises(ValueError, match="draft_margin"):
            DraftPolicy(block_size=32, cost=cost, margin=bad)


def test_estimate_follows_the_requests_rounds():
    policy = DraftPolicy(block_size=32, cost=DEFAULT_COSTS["cpu"])
    e = AcceptanceEstimate()
    assert policy.acceptance(e) == pytest.approx(policy.prior_p)
    full = policy.update(e, drafted=31, accepted=31)
    assert policy.acceptance(full) > 0.9 and full.ar_streak == 0
    miss = policy.update(e, drafted=7, accepted=0)
    assert policy.acceptance(miss) < policy.prior_p
    # an AR step measures nothing: the estimate stays, the streak grows
    ar = policy.update(miss, drafted=0, accepted=0)
    assert (ar.successes, ar.trials, ar.ar_streak) == (miss.successes, miss.trials, 1)
    # recent rounds weigh most: after a miss, a run of full acceptances wins the estimate back
    back = miss
    for _ in range(4):
        back = policy.update(back, drafted=15, accepted=15)
    assert policy.acceptance(back) > 0.9


def test_probes_new_and_long_ar_requests_at_most_when_worth_a_draft_pass():
    policy = DraftPolicy(block_size=32, cost=DEFAULT_COSTS["cpu"], prior_p=0.1)  # prior alone: AR
    new, known_bad = AcceptanceEstimate(), AcceptanceEstimate(successes=0.0, trials=5.0)
    stale = AcceptanceEstimate(successes=0.0, trials=5.0, ar_streak=policy.probe_interval)
    # batch 1: a new request is probed at once (width 8), a known bad one not
    assert policy.choose([new], [100], [50]) == [8]
    assert policy.choose([known_bad], [100], [50]) == [1]
    assert policy.choose([stale], [100], [50]) == [8]
    # a batch of AR steps runs a draft pass only once half of it is due
    assert policy.choose([new] + [known_bad] * 3, [100] * 4, [50] * 4) == [1] * 4
    assert policy.choose([new, stale, known_bad, known_bad], [100] * 4, [50] * 4) == [8, 8, 1, 1]
    # one fully accepted probe is enough for whole blocks
    assert policy.choose([policy.update(new, drafted=7, accepted=7)], [100], [50]) == [32]
    # a probe never exceeds the budget
    assert policy.choose([new], [100], [2]) == [2]


def test_pins_and_caps():
    cost = DEFAULT_COSTS["cpu"]
    pinned = DraftPolicy(block_size=32, cost=cost, fixed_width=9)
    assert pinned.choose([AcceptanceEstimate()] * 2, [10, 10], [100, 3]) == [9, 3]
    adaptive = DraftPolicy(block_size=16, cost=cost)
    assert adaptive.widths == (1, 4, 8, 16)  # 32 is past the block
    good = AcceptanceEstimate(successes=300.0, trials=301.0)
    # a request's own pin holds whatever the policy would choose for it
    assert adaptive.choose([good, good], [10, 10], [100, 100], [0, None]) == [1, 16]
    assert adaptive.choose([good], [10], [5]) == [5]  # a short budget: drafted to its end
    with pytest.raises(ValueError, match="draft_length"):
        DraftPolicy(block_size=8, cost=cost, fixed_width=9)


def test_forward_cost_loads_a_mapping_or_a_benchmark_file(tmp_path):
    cost = ForwardCost.load({"base": 0.01, "per_token": 0.001})
    assert cost.seconds(tokens=10, rows=2, pairs=0) == pytest.approx(0.02)
    path = tmp_path / "cost.json"
    path.write_text(json.dumps({"device": "x", "fit": {"base": 0.002, "per_token": 1e-5, "per_row": 1e-4,
                                                       "per_pair": 1e-9}}))
    loaded = ForwardCost.load(str(path))
    assert loaded.per_row == 1e-4 and loaded.source == str(path)
    for bad, match in (({"base": -1, "per_token": 0}, "base"), ({"base": 1, "per_tok": 0}, "unknown"),
                       ({"base": "x", "per_token": 0}, "numbers"), (str(tmp_path / "none.json"), "cannot read"),
                       (3, "mapping")):
        with pytest.raises(ValueError, match=match):
            ForwardCost.load(bad)


def test_cpu_default_is_the_committed_measurement():
    """The CPU table is the fit of `benchmarks/results/forward_cost_cpu_demo.json` (to the digits
    written in the code), and the policy's decision quantity, what a drafting round costs next
    to a round of AR steps, is within 35% of every measured cell (the cells themselves vary by
    about that between sweeps on this machine)."""
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks/results/forward_cost_cpu_demo.json"
    table = json.loads(path.read_text())
    cost, fit = DEFAULT_COSTS["cpu"], table["fit"]
    assert ForwardCost.load(str(path)).per_pair == fit["per_pair"]  # the file is a valid `forward_cost`
    for name in ("base", "per_token", "per_row", "per_pair"):
        assert getattr(cost, name) == pytest.approx(fit[name], rel=0.02, abs=1e-9), name
    measured = {(r["concurrency"], r["context"], r["draft_length"]): r["round_s"] for r in table["spec"]}
    long = table["settings"]["long"]
    for (c, ctx, k), seconds in measured.items():
        if k == 0:
            continue
        contexts = [ctx + long // 2] * c
        predicted = round_seconds(cost, [k + 1] * c, contexts) / round_seconds(cost, [1] * c, contexts)
        ratio = seconds / measured[(c, ctx, 0)]
        assert abs(predicted / ratio - 1) <= 0.35, (c, ctx, k, predicted, ratio)


def test_seeded_sampling_rows_choose_as_if_alone():
    """A seeded sampling request's widths decide how its generator is consumed: they must not
    depend on the rest of the batch (same seed, same answer under any traffic)."""
    policy = DraftPolicy(block_size=32, cost=DEFAULT_COSTS["cpu"])
    rng = random.Random(3)
    for _ in range(50):
        n = rng.randint(2, 12)
        est = [AcceptanceEstimate(successes=rng.uniform(0, 30), trials=rng.uniform(0, 40),
                                  ar_streak=rng.choice([0, 70])) for _ in range(n)]
        ctx = [rng.randint(10, 3000) for _ in range(n)]
        budgets = [rng.randint(1, 60) for _ in range(n)]
        alone = [rng.random() < 0.5 for _ in range(n)]
        got = policy.choose(est, ctx, budgets, alone=alone)
        for i in range(n):
            if alone[i]:
                assert got[i] == policy.choose([est[i]], [ctx[i]], [budgets[i]])[0]


def _run_value(cost, r, contexts, budgets, eligible):
    """Tokens per second of a round of AR steps in which each eligible row runs min(r, budget)."""
    widths = [min(r, max(1, b)) if e else 1 for e, b in zip(eligible, budgets)]
    seconds = cost.per_round
    for j in range(max(widths)):  # one token per row per step; a row leaves after its last step
        rows = [c for w, c in zip(widths, contexts) if w > j]
        seconds += cost.seconds(len(rows), len(rows), sum(c + 1 + j for c in rows))
    return sum(widths) / seconds


@settings(max_examples=200, deadline=None)
@given(st.builds(ForwardCost, base=st.floats(1e-4, 0.05), per_token=st.floats(0.0, 2e-3),
                 per_row=st.floats(0.0, 2e-3), per_pair=st.floats(0.0, 1e-6), per_round=st.floats(0.0, 0.02)),
       st.integers(1, 24), st.integers(0, 2**31 - 1))
def test_ar_run_is_the_best_run_length_and_beats_single_steps_by_the_margin(cost, n, seed):
    """`ar_run` returns the run length in {1, 2, 4, 8} with the most tokens per second (a round
    of max(min(r, budget)) one-token steps, each of the rows with steps left, the engine's
    per-round bookkeeping paid once), and a run only where it beats single steps by the margin."""
    rng = random.Random(seed)
    policy = DraftPolicy(block_size=32, cost=cost)
    contexts = [rng.randint(0, 4000) for _ in range(n)]
    budgets = [rng.choice([1, 2, 3, 8, 50]) for _ in range(n)]
    eligible = [rng.random() < 0.8 for _ in range(n)]
    got = policy.ar_run(contexts, budgets, eligible)
    values = {r: _run_value(cost, r, contexts, budgets, eligible) for r in (1, 2, 4, 8)}
    assert got in values
    if got == 1:
        assert all(v <= values[1] * (1 + policy.margin) * (1 + 1e-9) for v in values.values())
    else:
        assert values[got] > values[1] * (1 + policy.margin)
        assert values[got] >= max(values.values()) * (1 - 1e-9)


def test_ar_runs_where_the_bookkeeping_dominates_and_not_where_tokens_cost():
    """On the CPU defaults one request on a short context runs 8 steps a round; with no
    per-round cost, no eligible row, a pinned width or `max_ar_run: 1` it never runs more than
    one; a token cost far above the bookkeeping keeps single steps at large batches."""
    cpu = DEFAULT_COSTS["cpu"]
    assert DraftPolicy(block_size=32, cost=cpu).ar_run([300], [100], [True]) == 8
    assert DraftPolicy(block_size=32, cost=cpu).ar_run([300], [3], [True]) == 4  # budget 3: runs of 3 fit
    assert DraftPolicy(block_size=32, cost=cpu, max_ar_run=4).ar_run([300], [100], [True]) == 4
    assert DraftPolicy(block_size=4, cost=cpu).max_ar_run == 4  # a run fits one block
    free = ForwardCost(base=0.01, per_token=1e-5)  # per_round 0
    assert DraftPolicy(block_size=32, cost=free).ar_run([300], [100], [True]) == 1
    assert DraftPolicy(block_size=32, cost=cpu).ar_run([300], [100], [False]) == 1
    assert DraftPolicy(block_size=32, cost=cpu, fixed_width=1).ar_run([300], [100], [True]) == 1
    assert DraftPolicy(block_size=32, cost=cpu, max_ar_run=1).ar_run([300], [100], [True]) == 1
    dear = ForwardCost(base=0.005, per_token=2e-3, per_round=0.001)
    assert DraftPolicy(block_size=32, cost=dear).ar_run([300] * 16, [100] * 16, [True] * 16) == 1
    with pytest.raises(ValueError, match="max_ar_run"):
        DraftPolicy(block_size=32, cost=cpu, max_ar_run=0)


def test_ar_steps_of_a_run_count_toward_the_next_probe():
    """An AR run of r tokens is r AR steps for the probe interval (a run drafts nothing)."""
    policy = DraftPolicy(block_size=32, cost=DEFAULT_COSTS["cpu"])
    est = policy.update(AcceptanceEstimate(), 7, 0)
    after = policy.update(est, 0, 7, steps=8)
    assert (after.successes, after.trials, after.ar_streak) == (est.successes, est.trials, 8)


def test_a_table_without_per_round_takes_the_device_default(tmp_path):
    """`bench_forward_cost.py`'s fit times forwards only: a table without `per_round` gets the
    serving device's default (so `--forward-cost` with that bench's output keeps AR runs); an
    explicit value, 0 included, is kept."""
    from fast_dvlm_sglang.sglang_plugin.draft_length import policy_from_config

    table = tmp_path / "cost.json"
    table.write_text(json.dumps({"fit": {"base": 0.01, "per_token": 1e-5, "unit": "seconds per forward"}}))
    assert ForwardCost.load(table).per_round == 0.0
    assert ForwardCost.load(table, default_per_round=0.003).per_round == 0.003
    assert ForwardCost.load({"base": 0.01, "per_token": 1e-5, "per_round": 0.0}, default_per_round=0.003).per_round == 0
    got = policy_from_config({"forward_cost": str(table)}, 32, "cpu").cost
    assert (got.base, got.per_round) == (0.01, DEFAULT_COSTS["cpu"].per_round)
    with pytest.raises(ValueError, match="per_round"):
        ForwardCost(base=0.01, per_token=1e-5, per_round=-1.0)


def test_the_workload_prior_seeds_new_requests_and_probes_every_few():
    """`seed`: no estimate until the server's holds `workload_min_trials`; a seeded request starts
    at the server's acceptance with the weight of one trial; on text where every probe fails,
    about one new request in four is probed (each seeding ages the server's estimate)."""
    policy = DraftPolicy(block_size=32, cost=DEFAULT_COSTS["cpu"])
    empty = AcceptanceEstimate()
    assert policy.seed(empty) == (None, empty)
    good = policy.workload_update(policy.workload_update(empty, 7, 7), 15, 15)
    est, aged = policy.seed(good)
    assert est.trials == 1.0 and est.successes == pytest.approx(1.0)
    assert aged.trials == pytest.approx(good.trials * policy.seed_decay)
    assert policy.workload_update(good, 0, 0) == good  # AR steps tell nothing about drafts
    # every probe fails: new requests arrive one by one
    server, probed = empty, 0
    for _ in range(40):
        est, server = policy.seed(server)
        if est is None:  # probed: a width-8 round that accepts nothing
            probed += 1
            server = policy.workload_update(server, 7, 0)
        else:
            assert policy.acceptance(est) < 0.3  # the request starts on AR steps, not a probe
    assert 8 <= probed <= 14, probed
