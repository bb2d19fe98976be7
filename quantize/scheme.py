"""The FP8 checkpoint format we write and read: compressed-tensors "float-quantized" W8A8.

`config.json` gets a `quantization_config` (compressed-tensors 0.19 writes it; SGLang 0.5.23 reads
it with compressed-tensors 0.18):

    {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
     "config_groups": {"group_0": {"targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": true, "dynamic": false},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": true,
                              "dynamic": true}}},
     "ignore": ["lm_head", "model.visual....", ...]}

and every quantized linear stores `<name>.weight` (float8_e4m3fn, [out, in]) and
`<name>.weight_scale` (float32, [out, 1]); biases and everything in `ignore` keep the source
precision. This module reads that config without compressed-tensors (the reference model and
`fast-dvlm generate` need no quantization library) and swaps the quantized linears of a model for
`fp8.FP8Linear`, so the reference computes exactly `fp8.fp8_linear`.
"""

from __future__ import annotations

import re

import torch

from .fp8 import FP8Linear

QUANT_METHOD = "compressed-tensors"
FORMAT = "float-quantized"
WEIGHTS = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}
INPUT_ACTIVATIONS = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True}
SCHEMES = ("w8a8-fp8",)


class UnsupportedQuantization(ValueError):
    pass


def quantization_config(raw_config: dict) -> dict | None:
    """The checkpoint's W8A8 FP8 quantization config, checked (None: not quantized)."""
    q = raw_config.get("quantization_config")
    if q is None:
        return None
    if q.get("quant_method") != QUANT_METHOD:
        raise UnsupportedQuantization(f"quantization method {q.get('quant_method')!r} is not supported "
                                      f"(only {QUANT_METHOD!r} {FORMAT!r} W8A8 FP8)")
    if q.get("format") != FORMAT:
        raise UnsupportedQuantization(f"compressed-tensors format {q.get('format')!r} is not supported (only {FORMAT!r})")
    for name, group in (q.get("config_groups") or {}).items():
        for key, expected in (("weights", WEIGHTS), ("input_activations", INPUT_ACTIVATIONS)):
            got = group.get(key) or {}
            wrong = {k: got.get(k) for k, v in expected.items() if got.get(k) != v}
            if wrong:
                raise UnsupportedQuantization(f"quantization group {name}: {key} {wrong} is not W8A8 FP8 "
                                              f"(expected {expected})")
        if group.get("targets") != ["Linear"]:
            raise UnsupportedQuantization(f"quantization group {name}: targets {group.get('targets')} (expected ['Linear'])")
    if not q.get("config_groups"):
        raise UnsupportedQuantization("quantization_config has no config_groups")
    return q


def _ignored(name: str, ignore: list[str]) -> bool:
    for pattern in ignore:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif name == pattern:
            return True
    return False


def quantized_linear_names(model: torch.nn.Module, qconfig: dict) -> list[str]:
    """The linear layers the config quantizes: every nn.Linear not in `ignore`."""
    ignore = list(qconfig.get("ignore") or [])
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not _ignored(name, ignore)]


def swap_in_fp8(model: torch.nn.Module, names: list[str]) -> torch.nn.Module:
    """Replace the named nn.Linear modules by (empty) `FP8Linear`s of the same shape, on the same
    device (meta included), ready for `load_state_dict`."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        fp8 = FP8Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                        device=linear.weight.device)
        setattr(parent, child, fp8)
    return model


def is_fp8_parameter(key: str) -> bool:
    """State-dict keys whose dtype the model's float dtype must not change."""
    return key.endswith(".weight_scale")
