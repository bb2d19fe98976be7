"""W8A8 FP8 arithmetic: the computation every FP8 path of this project must reproduce.

The scheme (compressed-tensors' "float-quantized" W8A8 with dynamic activations, what SGLang's
compressed-tensors W8A8 FP8 linear method runs on CUDA):

    y = (q(x) * s_x) @ (W_q * s_w)^T + b

- weights `W_q`: float8 e4m3 (`torch.float8_e4m3fn`, largest finite 448), one static scale per
  output channel, `s_w[o] = max_i |W[o, i]| / 448` (shape [out, 1], float32);
- activations: quantized per token at every linear, `s_x[t] = max_i |x[t, i]| / 448` (dynamic);
- the product accumulates in float32 and is rescaled by `s_x[t] * s_w[o]` afterwards.

`fp8_linear` computes it with `torch._scaled_mm` where the device has it (CUDA SM89+, and CPU in
torch >= 2.6), else with an emulation that multiplies the same float8 values in float32 (float8 x
float8 products are exact in float32, so the two differ only in summation order). The Triton FP8
GEMM (`kernels/fp8_gemm.py`) is checked against this file.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# A row of zeros gets this scale rather than 0 (its quantized values are 0 either way).
MIN_SCALE = 1e-12


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] weight -> (float8 weight, float32 scale [out, 1]) with one scale per output row."""
    w = weight.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(MIN_SCALE)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., k] activations -> (float8 values, float32 scale [..., 1]) with one scale per token."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(MIN_SCALE)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def dequantize(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (values.float() * scale).to(dtype)


def _scaled_mm_available(device: torch.device) -> bool:
    return hasattr(torch, "_scaled_mm") and (device.type == "cpu" or (
        device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)))


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
               *, out_dtype: torch.dtype | None = None, use_scaled_mm: bool | None = None) -> torch.Tensor:
    """`y = (q(x) s_x) (W_q s_w)^T + b` for x [..., in], float8 `weight` [out, in], `weight_scale`
    [out, 1]. Output dtype: `out_dtype`, else x's. `use_scaled_mm`: None picks by device."""
    out_dtype = out_dtype or x.dtype
    shape = x.shape
    xq, sx = quantize_per_token(x.reshape(-1, shape[-1]))
    sw = weight_scale.float().reshape(1, -1)
    if use_scaled_mm is None:
        use_scaled_mm = _scaled_mm_available(x.device)
    if use_scaled_mm and xq.shape[0] > 0:
        try:
            y = torch._scaled_mm(xq, weight.t(), scale_a=sx, scale_b=sw, out_dtype=torch.float32)
        except RuntimeError:  # some torch / cuBLASLt builds take row-wise scales with a bf16 output only
            y = torch._scaled_mm(xq, weight.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16).float()
    else:
        y = (xq.float() @ weight.float().t()) * sx * sw
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*shape[:-1], weight.shape[0])


class FP8Linear(torch.nn.Module):
    """A linear layer holding a float8 weight and its per-channel scale (compressed-tensors names:
    `weight`, `weight_scale`); activations are quantized per token at every call.

    On CUDA SM89+ the product runs in our Triton small-M GEMM (`kernels/fp8_gemm.py`, the same
    math, tested against `fp8_linear`) unless `use_triton` is False; elsewhere `fp8_linear`."""

    use_triton = True

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.nn.Parameter(torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                         requires_grad=False)
        self.weight_scale = torch.nn.Parameter(torch.ones(out_features, 1, dtype=torch.float32, device=device),
                                               requires_grad=False)
        self.bias = torch.nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> FP8Linear:
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=linear.weight.device)
        w, s = quantize_per_channel(linear.weight.detach())
        out.weight.data.copy_(w)
        out.weight_scale.data.copy_(s)
        if linear.bias is not None:
            out.bias.data.copy_(linear.bias.detach().float())
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_triton and x.is_cuda:
            from fast_dvlm_sglang.kernels import fp8_gemm

            if fp8_gemm.supported(x.device):
                return fp8_gemm.fp8_gemm(x, self.weight, self.weight_scale, self.bias)
        return fp8_linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 w8a8 per-token"
