"""Tie-aware spec == AR assertions for the reference-model tests (the rule: decoding/parity.py).

Outputs must be equal, or part where AR's logit gap is within the noise bound measured on the
same model between 1-token steps and block forwards, and then follow AR's greedy choices on
their own prefix. The bound is measured lazily: only when two outputs differ.
"""

from __future__ import annotations

from fast_dvlm_sglang.decoding.parity import measure_reference_noise, reference_verdict


class TieAware:
    def __init__(self, model, calibration_prompts, n_tokens: int = 64):
        self.model, self._prompts, self._n = model, list(calibration_prompts), n_tokens
        self._noise = None
        self.ties: list = []

    @property
    def noise(self):
        if self._noise is None:
            self._noise = measure_reference_noise(self.model, self._prompts, n_tokens=self._n)
        return self._noise

    def check(self, prompt, ar_tokens, other_tokens, what: str = "") -> bool:
        """Assert spec == AR up to near ties; returns True if they are token-for-token equal."""
        if list(ar_tokens) == list(other_tokens):
            return True
        verdict = reference_verdict(self.model, prompt, ar_tokens, other_tokens, self.noise.bound, check_rest=True)
        assert verdict.ok, f"{what}: {verdict} (noise: {self.noise.summary()})"
        self.ties.append((what, verdict))
        print(f"\n{what}: {verdict}")
        return False
