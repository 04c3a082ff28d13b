"""
The small layers every other model file shares, so that imports run one way: layers.py <- mla.py, moe.py <-
model.py. Nothing here knows about a config.

- RMSNorm: Zhang & Sennrich 2019, "Root Mean Square Layer Normalization", eq. 4 (no mean subtraction, no bias).
- Rotary position embeddings: Su et al. 2021, "RoFormer", section 3.4.2, eq. 34. Deviation: the "rotate half"
  layout (pairs (i, i + D/2)) of Hugging Face's Llama/Qwen2, not the paper's adjacent pairs (2i, 2i + 1), so HF
  checkpoints load without a permutation; mla.py permutes DeepSeek's interleaved rows once on load instead.
- SwiGLU feed-forward: Shazeer 2020, "GLU Variants Improve Transformer", FFN_SwiGLU, without biases (Llama's
  FFN, and one DeepSeekMoE expert).
- resolve_mask: the causal mask for F.scaled_dot_product_attention, including the offset one a chunked
  prefill into a KV cache needs; decode_attention: one decode step's attention on the CPU, without SDPA.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """x / RMS(x) * g (Zhang & Sennrich 2019, eq. 4)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self):   # what the constructor set, again (torch's convention; harness.init_sharded calls it)
        nn.init.ones_(self.weight)

    def forward(self, x):
        # normalise in fp32 (bf16 squares lose precision), cast back
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


def rope_table(dim, max_pos, theta):
    """cos/sin of RoPE for positions [0, max_pos): each (max_pos, dim), halves duplicated.
    Position m rotates pair i by m theta_i with theta_i = theta^(-2i/dim) (RoFormer section 3.2.2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # (dim/2,)
    t = torch.arange(max_pos, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)                                                  # (max_pos, dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)                                           # (max_pos, dim)
    return cos_sin(emb)


def cos_sin(angles):
    """cos and sin of float32 angles, by numpy in float64 on the CPU and rounded once (then on the angles' device):
    the same bits in every process. torch's CPU cos on two threads came out one of two ways per process (last bits),
    and whole runs diverged from that (EXPERIMENTS.md det)."""
    if angles.is_meta:   # a model built on the meta device: shapes only (materialize recomputes the tables)
        return angles.cos(), angles.sin()
    a = angles.detach().double().cpu().numpy()
    return tuple(torch.from_numpy(f(a)).float().to(angles.device) for f in (np.cos, np.sin))


def apply_rope(x, cos, sin):
    """x (B, T, H, D); cos/sin (B, T, D). Rotate-half layout (HF Llama): pairs are (i, i + D/2)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    rot = torch.cat([-x2, x1], dim=-1)                            # (B, T, H, D)
    return x * cos.unsqueeze(2) + rot * sin.unsqueeze(2)


def resolve_mask(mask, T, start, device):
    """
    (mask, is_causal) for SDPA. Without a mask, queries [start, start+T) see keys [0, start+T); SDPA's
    is_causal aligns its triangle top-left, which is only right when start == 0, so a chunked prefill
    (start > 0, T > 1) gets an explicit offset mask instead.
    """
    if mask is not None or T == 1:
        return mask, False
    if start == 0:
        return None, True
    return torch.ones(T, start + T, dtype=torch.bool, device=device).tril(start), False   # (T, Tk)


def decode_attention(q, k, v, scale, mask=None):
    """One decode step's attention as two batched matmuls, where SDPA's CPU kernels are slower (dense GQA) or
    fall back to a math path that scales a copy of the whole cache at every step (MLA's latent cache, whose key
    and value widths differ). q (..., Q, D), k (..., Tk, D), v (..., Tk, Dv); mask broadcastable to (..., Q, Tk),
    True = attend, or None. Returns (..., Q, Dv)."""
    s = (q * scale) @ k.transpose(-1, -2)                                  # (..., Q, Tk): scale the few queries
    if mask is not None:
        s = s.masked_fill(~mask, float('-inf'))
    return s.softmax(-1) @ v                                               # (..., Q, Dv)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) (Shazeer 2020's FFN_SwiGLU; the dense FFN and one MoE expert)."""

    def __init__(self, n_embd, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
