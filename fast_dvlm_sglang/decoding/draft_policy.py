"""How many tokens a speculative round drafts: per request, from its acceptance and a cost model.

A round of width w runs the block [seed, MASK x (w-1)] through a draft forward and
[seed, d_1..d_{w-1}] through a verify forward, and commits the accepted drafts plus one verify
token. Width 1 drafts nothing: the round is one causal forward over the seed, exactly an AR step.
Whatever the width, the verify pass decides what is emitted, so the width only changes speed,
never the output (greedy) or its distribution (sampling).

Acceptance model (`AcceptanceEstimate`, one per request): a draft token is accepted only if all
before it were, so each drafted position is a trial that succeeds with probability p until the
first failure; a round of width w then commits E(p, w) = 1 + p + ... + p^(w-1) tokens on average.
p is estimated from the request's own rounds (successes / trials), discounted so recent rounds
count most, with a prior for a request that has no history. AR steps measure nothing, so a request is
*due* for a probe while it has no evidence (a new request) or after `probe_interval` AR steps in
a row; a probe is a round of width 8. Due requests ride along in any drafting
round (the draft forward is paid anyway: a few tokens more). In a batch of AR steps, a probe
costs a draft forward the batch would not have run, so it runs only once half the batch is due
(at batch 1: at once), every due request in that one draft pass; at the default interval of 64
that bounds the probes' share of the time on unpredictable text to a few percent.

Workload prior (`DraftPolicy.seed`, scheduler side): probing every new request costs, at a few
requests in flight, a draft forward of the whole batch per new request, all of it lost where
nothing is guessable. So the server keeps one more estimate of the same kind over the drafting
rounds of all its requests (`workload_update`, aged by `workload_decay` per round), and a new
request starts from it, with the weight of one trial, instead of being probed, once it holds at
least `workload_min_trials` trials. Each request it seeds ages it by `seed_decay`, so after a few
seeded requests the next new one is probed again and refreshes it (on text no draft guesses:
about one new request in four is probed). A seeded sampling request never takes it: its widths
must not depend on other traffic.

Cost model (`ForwardCost`): seconds of one forward over T tokens in total, R rows and A attended
(query, key) pairs (sum over rows of width x context): base + per_row R + per_token T + per_pair A,
plus `per_round`, the serving engine's bookkeeping between two rounds (SGLang's dLLM scheduler
builds a new extend batch for every round, with no overlap: ~2 ms on the 2-core CPU, where an AR
step's forward of the demo model is ~6 ms). A round costs one forward if no row drafts (all
width 1) and two (draft + verify) otherwise, the rows of width 1 riding along in both.

AR runs (`ar_run`): when the batch would run AR steps, a round may instead run r of them for
each unconstrained request, to pay `per_round` once per r tokens: r AR steps in a row, each one
token per request over the context and the steps before it (on the server SGLang DECODE forwards
over the round's slots, `sglang_plugin/decode_steps.py`; a request with fewer steps leaves the
batch after its last), each choosing its token as an AR step does (argmax, or a sample from the request's
own generator, with its logit adjustments). r forwards, r tokens: an AR run is AR steps
(tokens/NFE 1, the same tokens and the same draws as r single steps), and it counts as AR steps
for the acceptance estimate. A run of r costs r steps and one `per_round` (`run_seconds`); it
pays wherever the bookkeeping is a real share of a step, and the policy takes the length with
the most tokens per second if it beats single steps by the margin. (What a run costs a new
request: its context pass waits for the round's r steps, as it waits for one step otherwise.)

`choose_widths` picks one width per request from `widths` (the block sizes Fast-dVLM was trained
with, capped by each request's budget and the block size) to maximise the batch's expected
tokens per second: E_total / round_cost. Coordinate ascent from "all AR": each row in turn takes
the width that maximises the objective given the others; two sweeps (the objective is a ratio of
sums, each sweep O(rows x widths)). The drafting round is taken only if it beats the round of AR
steps by the policy's `margin` (10%): both the cost table and the acceptance estimates are noisy,
and a draft at break-even buys nothing. Pure functions of host numbers: the same inputs give the same
widths on every tensor-parallel rank.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

TRAINED_WIDTHS = (4, 8, 16, 32)  # block-size annealing of the training recipe


@dataclass(frozen=True)
class ForwardCost:
    """Seconds per forward: base + per_row * rows + per_token * tokens + per_pair * attended pairs."""

    base: float
    per_token: float
    per_row: float = 0.0
    per_pair: float = 0.0
    per_round: float = 0.0  # the engine's bookkeeping between rounds, once per round (not per forward)
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("base", "per_token", "per_row", "per_pair", "per_round"):
            value = getattr(self, name)
            if not value >= 0.0:
                raise ValueError(f"forward cost {name} must be >= 0, got {value}")
        if self.base + self.per_token <= 0.0:
            raise ValueError("forward cost base + per_token must be > 0")

    def seconds(self, tokens: int, rows: int, pairs: float) -> float:
        return self.base + self.per_row * rows + self.per_token * tokens + self.per_pair * pairs

    @classmethod
    def load(cls, spec, default_per_round: float = 0.0) -> ForwardCost:
        """From a mapping ({base, per_token, per_row?, per_pair?, per_round?}) or a JSON file
        holding one (at top level or under "fit", as `benchmarks/bench_forward_cost.py` writes
        it). `per_round` is not in that bench's fit (its sweep times forwards): absent, it is
        `default_per_round`."""
        source = ""
        if isinstance(spec, (str, Path)):
            source = str(spec)
            try:
                spec = json.loads(Path(spec).read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot read forward cost table {source}: {e}") from None
            spec = spec.get("fit", spec) if isinstance(spec, dict) else spec
        if not isinstance(spec, dict):
            raise ValueError(f"forward_cost must be a mapping or a JSON file path, got {type(spec).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)} - {"source"}
        unknown = set(spec) - fields - {"source", "unit", "device", "model", "residual", "ratio_residual"}
        if unknown:
            raise ValueError(f"unknown forward_cost keys: {', '.join(sorted(unknown))}")
        try:
            values = {k: float(spec[k]) for k in fields if k in spec}
        except (TypeError, ValueError):
            raise ValueError("forward_cost values must be numbers") from None
        values.setdefault("per_round", default_per_round)
        return cls(**values, source=source or str(spec.get("source", "inline")))


# Defaults when `forward_cost` is not configured (document any change in the README):
# - cpu: fitted from SGLang's own serving path on the 2-core CI machine with the demo model
#   (benchmarks/results/forward_cost_cpu_demo.json, benchmarks/bench_forward_cost.py: contexts
#   64, 384 and 1024 at 1, 4 and 16 requests, the median of 3 interleaved sweeps; RMS relative
#   error 13% on a drafting round's cost next to an AR step, what the choice depends on);
# - cuda: no GPU measurement yet; a memory-bound forward (the weights are read once whatever the
#   token count: a 32-token block costs about one AR step at batch 1, the paper's premise), with
#   compute per token of a 3B model on a Hopper GPU. Measure it with `fast-dvlm bench cost-table`
#   (benchmarks/gpu.sh, step 3) and pass the file as `forward_cost`, or make it the default here.
DEFAULT_COSTS = {
    "cpu": ForwardCost(base=0.0144, per_token=5.39e-5, per_row=0.000721, per_pair=4.19e-8, per_round=0.004,
                       source="default cpu (benchmarks/results/forward_cost_cpu_demo.json; per_round: "
                              "benchmarks/results/adaptive_spec_cpu_demo.json, README 'AR runs')"),
    "cuda": ForwardCost(base=0.0060, per_token=0.000015, per_row=0.00002, per_pair=2.0e-9, per_round=0.001,
                        source="default cuda (memory-bound assumption, not measured)"),
}


@dataclass(frozen=True)
class AcceptanceEstimate:
    """Discounted successes / trials of one request's drafted positions (see module docstring)."""

    successes: float = 0.0
    trials: float = 0.0
    ar_streak: int = 0  # rounds since the request last drafted

    def p(self, prior_p: float, prior_weight: float) -> float:
        return (self.successes + prior_p * prior_weight) / (self.trials + prior_weight)

    def update(self, drafted: int, accepted: int, decay: float, steps: int = 1) -> AcceptanceEstimate:
        """After a round that drafted `drafted` tokens and accepted `accepted` of them (a round
        that drafted nothing ran `steps` AR steps)."""
        if drafted <= 0:
            return dataclasses.replace(self, ar_streak=self.ar_streak + steps)
        trials = accepted + (accepted < drafted)
        return AcceptanceEstimate(self.successes * decay + accepted, self.trials * decay + trials, 0)


@dataclass(frozen=True)
class DraftPolicy:
    """Configuration of the adaptive draft length (`--dllm-algorithm-config` keys, README)."""

    block_size: int
    cost: ForwardCost
    fixed_width: int | None = None  # `draft_length: k` pins width k + 1 (0: AR steps only)
    widths: tuple[int, ...] = (1,) + TRAINED_WIDTHS
    prior_p: float = 0.5  # below the break-even of a lone draft: new requests are explored by probes
    prior_weight: float = 1.0
    decay: float = 0.7
    probe_interval: int = 64
    # A probe wide enough that one fully accepted probe lifts the estimate to whole blocks at
    # once (short answers cannot afford a slow ramp), and a failed one costs about what a
    # 4-token probe costs (a forward's cost grows little with its width at small batches).
    probe_width: int = 8
    # How much faster (expected tokens per second) a drafting round must look than a round of AR
    # steps before the batch drafts: the cost table and the acceptance estimates are both
    # measured with noise, and at break-even a draft buys nothing, so marginal drafting is left
    # to AR steps (README "Draft length").
    margin: float = 0.1
    # Longest AR run (AR steps per round for one request, see the module docstring); 1: none.
    max_ar_run: int = 8
    # The workload prior (module docstring): evidence it needs before it seeds a new request, its
    # ageing per drafting round, and per request it seeds.
    workload_min_trials: float = 1.0
    workload_decay: float = 0.9
    seed_decay: float = 0.8

    def __post_init__(self) -> None:
        if self.fixed_width is not None and not 1 <= self.fixed_width <= self.block_size:
            raise ValueError(f"draft_length must be in [0, {self.block_size - 1}], got {self.fixed_width - 1}")
        if not 0.0 <= self.prior_p < 1.0 or self.prior_weight <= 0.0:
            raise ValueError("prior_p (prior_acceptance) must be in [0, 1) and prior_weight > 0")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")
        if not 0.0 <= self.margin <= 10.0:
            raise ValueError(f"draft_margin must be in [0, 10], got {self.margin}")
        if self.probe_interval < 1:
            raise ValueError(f"probe_interval must be >= 1, got {self.probe_interval}")
        if self.max_ar_run < 1:
            raise ValueError(f"max_ar_run must be >= 1, got {self.max_ar_run}")
        object.__setattr__(self, "max_ar_run", min(self.max_ar_run, self.block_size))  # a run fits one block
        widths = tuple(sorted({w for w in self.widths if 1 <= w <= self.block_size} | {1}))
        object.__setattr__(self, "widths", widths)

    def acceptance(self, estimate: AcceptanceEstimate) -> float:
        return estimate.p(self.prior_p, self.prior_weight)

    def update(self, estimate: AcceptanceEstimate, drafted: int, accepted: int, steps: int = 1) -> AcceptanceEstimate:
        """After a round that drafted `drafted` tokens and accepted `accepted` (`steps`: the AR
        steps of a round that drafted nothing: 1, or an AR run's length)."""
        return estimate.update(drafted, accepted, self.decay, steps)

    def workload_update(self, workload: AcceptanceEstimate, drafted: int, accepted: int) -> AcceptanceEstimate:
        """The server's estimate after one request's round (rounds that drafted nothing: unchanged)."""
        return workload.update(drafted, accepted, self.workload_decay) if drafted > 0 else workload

    def seed(self, workload: AcceptanceEstimate) -> tuple[AcceptanceEstimate | None, AcceptanceEstimate]:
        """A new request's starting estimate from the server's (None: too little evidence, the
        request is probed) and the server's estimate after seeding it."""
        if workload.trials < self.workload_min_trials:
            return None, workload
        p = workload.successes / workload.trials
        return (AcceptanceEstimate(successes=p, trials=1.0),
                AcceptanceEstimate(workload.successes * self.seed_decay, workload.trials * self.seed_decay))

    def ar_run(self, contexts: list[int], budgets: list[int], eligible: list[bool]) -> int:
        """How many AR steps a round of AR steps runs for each `eligible` request (unconstrained,
        not pinned; the rest take one): 1, or the run length in 2, 4, 8, .. `max_ar_run` that
        maximises the batch's tokens per second (`run_seconds`), if that beats single steps by
        the policy's margin. Each eligible request's run is capped by its budget."""
        if self.fixed_width is not None or self.max_ar_run < 2 or not any(eligible):
            return 1
        caps = [max(1, b) for b in budgets]

        def value(r: int) -> float:
            widths = [min(r, c) if e else 1 for e, c in zip(eligible, caps)]
            return sum(widths) / run_seconds(self.cost, widths, contexts)

        single = value(1)
        best_r, best = 1, single * (1.0 + self.margin)
        r = 2
        while r <= self.max_ar_run:
            v = value(r)
            if v > best:
                best_r, best = r, v
            r *= 2
        return best_r

    def choose(self, estimates: list[AcceptanceEstimate], contexts: list[int], budgets: list[int],
               pinned: list[int | None] | None = None, alone: list[bool] | None = None) -> list[int]:
        """One width per request (see `choose_widths`); `budgets`: tokens each may still emit;
        `pinned`: a request's own draft length (None: the policy's); `alone`: requests whose
        width must not depend on the rest of the batch (seeded sampling: a width changes how many
        draws a round takes from the request's generator, so a batch-aware width would make the
        same seed give another answer under other traffic): chosen as if each ran alone."""
        caps = [max(1, min(self.block_size, b)) for b in budgets]
        pinned = list(pinned or [None] * len(caps))
        if alone is not None and len(caps) > 1:
            for i, solo in enumerate(alone):
                if solo and pinned[i] is None:
                    pinned[i] = self.choose([estimates[i]], [contexts[i]], [budgets[i]])[0] - 1
        fixed = [self.fixed_width if k is None else k + 1 for k in pinned]
        if self.fixed_width is not None and all(k is None for k in pinned):
            return [min(self.fixed_width, c) for c in caps]
        # A budget shorter than a trained width still drafts up to its end (as a whole block would).
        allowed = [[min(f, c)] if f is not None else sorted({w for w in self.widths if w <= c} | {c})
                   for f, c in zip(fixed, caps)]
        chosen = choose_widths([self.acceptance(e) for e in estimates], contexts, allowed, self.cost, self.margin)
        due = [f is None and (e.trials == 0 or e.ar_streak >= self.probe_interval) for e, f in zip(estimates, fixed)]
        drafting = any(w > 1 for w in chosen)
        if any(due) and (drafting or 2 * sum(due) >= len(due)):
            probe = self.probe_width if self.probe_width in self.widths else self.widths[min(2, len(self.widths) - 1)]
            chosen = [max(w, min(probe, c)) if d else w for w, d, c in zip(chosen, due, caps)]
        return chosen


def expected_tokens(p: float, width: int) -> float:
    """Mean tokens a round of `width` commits when each draft token survives with probability p."""
    if p >= 1.0:
        return float(width)
    return (1.0 - p ** width) / (1.0 - p)


def run_seconds(cost: ForwardCost, widths: list[int], contexts: list[int]) -> float:
    """A round of AR steps in which row i runs `widths[i]` of them (an AR run, or 1): max(widths)
    steps of one token per row, step j holding the rows with more than j steps, each attending
    its context and the j tokens before it; plus the engine's per-round bookkeeping once."""
    seconds = cost.per_round
    for j in range(max(widths)):
        active = [c for w, c in zip(widths, contexts) if w > j]
        seconds += cost.seconds(len(active), len(active), float(sum(c + 1 + j for c in active)))
    return seconds


def round_seconds(cost: ForwardCost, widths: list[int], contexts: list[int]) -> float:
    tokens = sum(widths)
    pairs = sum(w * (c + w) for w, c in zip(widths, contexts))
    forwards = 2 if any(w > 1 for w in widths) else 1
    return forwards * cost.seconds(tokens, len(widths), pairs)  # the forwards only (no per_round)


def choose_widths(p: list[float], contexts: list[int], allowed: list[list[int]], cost: ForwardCost,
                  margin: float = 0.0) -> list[int]:
    """Widths maximising sum_i E(p_i, w_i) / round_seconds(w), each w_i in `allowed[i]`; a
    drafting round must beat the round of AR steps by the factor 1 + `margin`.

    Two candidates: every row an AR step (one forward; only if every row allows width 1), or a
    drafting round (two forwards), whose widths come from coordinate ascent started at every
    row's widest width (a row may still take width 1 and ride along). Starting the drafting
    round from all-AR would never leave it at a large batch: the first row to draft alone pays
    the whole second forward.
    """
    n = len(p)
    if n == 0:
        return []
    gain = [{w: expected_tokens(p[i], w) for w in allowed[i]} for i in range(n)]
    fixed = cost.base + cost.per_row * n

    def seconds(t, a):
        return fixed + cost.per_token * t + cost.per_pair * a

    chosen = [max(a) for a in allowed]
    total_e = sum(gain[i][w] for i, w in enumerate(chosen))
    tokens = sum(chosen)
    pairs = float(sum(w * (c + w) for w, c in zip(chosen, contexts)))
    # per_round is left out here: the alternative to drafting is AR runs, which pay it once per
    # several tokens (`DraftPolicy.ar_run`), so both sides are compared per forward.
    best = total_e / ((2 if tokens > n else 1) * seconds(tokens, pairs))
    order = sorted(range(n), key=lambda i: p[i])  # the least promising rows shrink first
    for _ in range(2):
        changed = False
        for i in order:
            w0 = chosen[i]
            base_e, base_t = total_e - gain[i][w0], tokens - w0
            base_a = pairs - w0 * (contexts[i] + w0)
            pick, pick_val = w0, best
            for w in allowed[i]:
                if w != w0:
                    t = base_t + w
                    val = (base_e + gain[i][w]) / ((2 if t > n else 1) * seconds(t, base_a + w * (contexts[i] + w)))
                    if val > pick_val * (1 + 1e-9):
                        pick, pick_val = w, val
            if pick != w0:
                total_e, tokens = base_e + gain[i][pick], base_t + pick
                pairs = base_a + pick * (contexts[i] + pick)
                chosen[i], best, changed = pick, pick_val, True
        if not changed:
            break
    if all(1 in a for a in allowed):
        ar_value = n / seconds(n, float(sum(c + 1 for c in contexts)))
        if ar_value * (1.0 + margin) >= best:
            return [1] * n
    return chosen
