"""Tie-aware spec == AR for the server tests (the rule: `fast_dvlm_sglang/decoding/parity.py`).

A spec server's greedy answer must equal the reference model's AR answer, or part from it where
the reference's AR step logits have a gap within the noise bound between the reference's 1-token
steps and SGLang's causal extend (the shape of spec's verify pass) in the server's dtype, and then
follow the reference's greedy choices on the server answer's own prefix. The bound is measured on
an `ar` server of the same checkpoint, started only when a divergence needs it, once per
checkpoint and session.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from fast_dvlm_sglang.decoding import Prompt
from fast_dvlm_sglang.decoding.parity import greedy_ar_with_logits, reference_verdict
from fast_dvlm_sglang.processing import encode_chat, render_chat
from fast_dvlm_sglang.server_parity import ServerPrompt, measure_server_noise, top_entries
from fast_dvlm_sglang.server_process import ServeProcess

CALIBRATION = ["What shape is in the image?", "the blue square is big", "Name three colours",
               "There is a green triangle at the top right of the picture. What colour is it?"]
_NOISE: dict[str, object] = {}


class ReferenceTieCheck:
    def __init__(self, model, processor, checkpoint, calibration: list[list[dict]] | None = None,
                 sglang_args: list[str] | None = None, video_policy=None):
        self.model, self.proc, self.checkpoint = model, processor, str(checkpoint)
        self.video_policy = video_policy  # the server's video caps (`processing.video_policy`)
        self.calibration = calibration or [[{"role": "user", "content": t}] for t in CALIBRATION]
        self.sglang_args = sglang_args or []
        self.ties: list = []

    def prompt(self, messages) -> Prompt:
        enc = encode_chat(self.proc, messages, video_policy=self.video_policy)
        return Prompt.from_encoded(enc)

    @property
    def noise(self):
        key = self.checkpoint + " " + " ".join(self.sglang_args)
        if key not in _NOISE:
            _NOISE[key] = self._measure()
        return _NOISE[key]

    def _measure(self):
        refs = {}
        for msgs in self.calibration:
            sp = ServerPrompt(render_chat(self.proc, msgs, add_generation_prompt=True), None, 64)
            tokens, logits = greedy_ar_with_logits(self.model, self.prompt(msgs), 64, eos_token_ids=())
            refs[sp] = (tokens, top_entries(logits))
        log = Path(tempfile.mkdtemp(prefix="tie_check_")) / "ar.log"
        server = ServeProcess(self.checkpoint, "ar", log, sglang_args=self.sglang_args)
        try:
            server.wait_ready()
            return measure_server_noise(server, list(refs), lambda t: self.proc.tokenizer(t, add_special_tokens=False)["input_ids"],
                                        steps=refs.__getitem__, source="reference steps vs SGLang causal extend")
        finally:
            server.stop()

    def check(self, messages, want: list[int], got: list[int], what: str = "") -> bool:
        """Assert the server's answer `got` equals the reference AR answer `want` up to a near tie;
        True if token for token equal."""
        if list(got) == list(want):
            return True
        noise = self.noise
        verdict = reference_verdict(self.model, self.prompt(messages), want, got, noise.bound, check_rest=True)
        assert verdict.ok, f"{what}: {verdict} (noise: {noise.summary()})"
        self.ties.append((what, verdict))
        print(f"\n{what}: {verdict}")
        return False
