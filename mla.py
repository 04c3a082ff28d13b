"""
Multi-head Latent Attention (MLA): DeepSeek-V2 (arXiv 2405.04434) section 2.1.2-2.1.3, eqs. 9-19, used
unchanged by DeepSeek-V3 (arXiv 2412.19437) section 2.1.1, eqs. 1-11.

    c_KV = W_DKV h                    eq. 9      wkv_a (first kv_lora_rank outputs), then kv_norm
    k_C = W_UK c_KV ; v_C = W_UV c_KV eqs. 10-11 wkv_b (per head: qk_nope_head_dim rows of K, v_head_dim of V)
    c_Q = W_DQ h ; q_C = W_UQ c_Q     eqs. 12-13 wq_a, q_norm, wq_b; one wq when q_lora_rank = 0 (V2-Lite)
    q_R = RoPE(W_QR c_Q)              eq. 14     per head: the last qk_rope_head_dim of each head's query
    k_R = RoPE(W_KR h)                eq. 15     wkv_a (last qk_rope_head_dim outputs): ONE key shared by all heads
    o = softmax([q_C; q_R].[k_C; k_R] / sqrt(d_nope + d_R)) v_C ; u = W_O o     eqs. 16-19, wo

One module, two paths (config.mla_impl), equal up to float rounding (tests/test_mla.py):
- 'naive':  decompress K and V per head and cache them (the obvious twin; cheapest for training and prefill).
- 'absorb': cache only c_KV (after kv_norm) and the rotated k_R, i.e. kv_lora_rank + qk_rope_head_dim elements
  per token per layer. W_UK is folded into the query (q_C . W_UK c_KV = (W_UK^T q_C) . c_KV) and W_UV into the
  output, as V2 section 2.1.2 suggests, so attention is multi-query attention over the latent cache with
  d_qk = kv_lora_rank + qk_rope_head_dim and d_v = kv_lora_rank. This is the decode path.

Conventions and deviations
- RoPE layout. DeepSeek checkpoints rotate interleaved pairs (x0, x1), (x2, x3), ...; model.apply_rope rotates
  halves (x_i, x_{i + D/2}). Instead of a second RoPE code path, GPT.from_pretrained permutes the rope rows of
  wq/wq_b and wkv_a once (even dims first, then odd: `rope_deinterleave`), which makes the rotate-half rotation
  compute exactly what the interleaved one does; save_pretrained permutes them back. Dot products, hence logits,
  are unchanged by a permutation applied to both q_R and k_R.
- YaRN (Peng et al. 2023; V3 section 4.3 long-context extension). When config.rope_factor > 1 the RoPE table
  comes from `yarn_rope_table` (ramped interpolation of the frequencies, times YaRN's attention factor), and
  the softmax scale gains mscale^2 with mscale = 0.1 * rope_mscale_all_dim * ln(rope_factor) + 1, as in
  DeepSeek's inference code and Hugging Face's DeepseekV3Attention. rope_factor = 1 is plain RoPE.
- Both paths run through F.scaled_dot_product_attention (the absorbed one as MQA with enable_gqa), so masks,
  dropout and fused kernels behave the same; mla_impl can be switched per module (`block.attn.impl`) between
  calls, but not in the middle of a cached generation, as the two paths fill different cache buffers.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import RMSNorm, apply_rope, resolve_mask


def yarn_mscale(factor, mscale=1.0):
    """YaRN's attention temperature correction: 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(config):
    """1/sqrt(d_nope + d_R), times mscale^2 under YaRN when rope_mscale_all_dim is set (DeepSeek-V3 config)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    if config.rope_factor > 1 and config.rope_mscale_all_dim:
        scale *= yarn_mscale(config.rope_factor, config.rope_mscale_all_dim) ** 2
    return scale


def yarn_rope_table(config):
    """cos/sin (block_size, qk_rope_head_dim) with YaRN frequencies, halves duplicated like model.rope_table.

    Dimensions that rotate fewer than beta_slow times over the original context are interpolated (divided by
    the factor), those rotating more than beta_fast times are kept, with a linear ramp between (YaRN's
    "NTK-by-parts"); the same numbers as Hugging Face's yarn rope for DeepSeek-V3 configs (tests/test_hf.py).
    """
    dim, base, factor = config.qk_rope_head_dim, config.rope_theta, config.rope_factor
    orig = config.rope_original_max_pos

    def correction_dim(n_rot):  # the dimension index whose wavelength fits n_rot times into `orig` tokens
        return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(config.rope_beta_fast)), 0)
    high = min(math.ceil(correction_dim(config.rope_beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # (dim/2,)
    extrap = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))            # (dim/2,)
    inv_freq = extrap / factor * ramp + extrap * (1 - ramp)                                   # (dim/2,)
    # YaRN's attention factor scales cos and sin (so q_R.k_R by its square); 1 for DeepSeek-V3's config
    if config.rope_mscale and config.rope_mscale_all_dim:
        attn_factor = yarn_mscale(factor, config.rope_mscale) / yarn_mscale(factor, config.rope_mscale_all_dim)
    else:
        attn_factor = yarn_mscale(factor)
    t = torch.arange(config.block_size, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)                                                          # (T, dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)                                                   # (T, dim)
    return emb.cos() * attn_factor, emb.sin() * attn_factor


def rope_deinterleave(dim):
    """Row permutation taking DeepSeek's interleaved rope layout to rotate-half: [0, 2, 4, ..., 1, 3, 5, ...]."""
    return torch.cat([torch.arange(0, dim, 2), torch.arange(1, dim, 2)])


def kv_cache_bytes_per_token(config, dtype_bytes=2):
    """Cache bytes per token per layer of MLA and of the MHA/GQA it replaces (REFERENCE.md section 2).

    MHA and GQA use n_head heads of width d_h = v_head_dim (DeepSeek-V2's comparison: 2 n_h d_h and 2 n_g d_h,
    with n_g = config.n_kv_head groups); 'mla_naive' is what the naive path caches, 'mla' the absorbed path.
    """
    d_h = config.v_head_dim
    mla = config.kv_lora_rank + config.qk_rope_head_dim
    return {
        'mla': mla * dtype_bytes,
        'mla_naive': config.n_head * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
        * dtype_bytes,
        'mha': 2 * config.n_head * d_h * dtype_bytes,
        'gqa': 2 * config.n_kv_head * d_h * dtype_bytes,
        'mla_as_gqa_groups': mla / (2 * d_h),  # 2.25 for V2/V3 (576 / 256)
    }


class MLA(nn.Module):
    """Multi-head Latent Attention; same call signature as model.Attention."""

    def __init__(self, config, layer_id):
        super().__init__()
        self.layer_id = layer_id
        self.n_head = config.n_head
        self.q_lora_rank, self.kv_lora_rank = config.q_lora_rank, config.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.impl = config.mla_impl
        self.dropout = config.dropout
        self.scale = softmax_scale(config)
        C, H = config.n_embd, config.n_head
        if self.q_lora_rank:
            self.wq_a = nn.Linear(C, self.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(self.q_lora_rank, config.norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, H * self.qk_head_dim, bias=False)
        else:
            self.wq = nn.Linear(C, H * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(C, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, config.norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.wo = nn.Linear(H * self.v_head_dim, C, bias=False)

    def forward(self, x, cos, sin, mask=None, cache=None, start=0):
        B, T, C = x.shape
        H, dn, dr, dv, dc = self.n_head, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim, \
            self.kv_lora_rank
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_lora_rank else self.wq(x)  # (B, T, H*(dn+dr))
        q = q.view(B, T, H, dn + dr)                                                   # (B, T, H, dn+dr)
        q_nope, q_pe = q.split([dn, dr], dim=-1)                                       # (B, T, H, dn), (.., dr)
        q_pe = apply_rope(q_pe, cos, sin)                                              # (B, T, H, dr)
        c_kv, k_pe = self.wkv_a(x).split([dc, dr], dim=-1)                             # (B, T, dc), (B, T, dr)
        c_kv = self.kv_norm(c_kv)                                                      # (B, T, dc)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin)                                 # (B, T, 1, dr)

        mask, is_causal = resolve_mask(mask, T, start, x.device)  # chunked prefill needs an offset mask
        p_drop = self.dropout if self.training else 0.0

        if self.impl == 'naive':
            kv = self.wkv_b(c_kv).view(B, T, H, dn + dv)                               # (B, T, H, dn+dv)
            k_nope, v = kv.split([dn, dv], dim=-1)                                     # (B, T, H, dn), (.., dv)
            k = torch.cat([k_nope, k_pe.expand(-1, -1, H, -1)], dim=-1)                # (B, T, H, dn+dr)
            if cache is not None:
                k = cache.write(self.layer_id, 'k', k, start)                          # (B, Tk, H, dn+dr)
                v = cache.write(self.layer_id, 'v', v, start)                          # (B, Tk, H, dv)
            q = torch.cat([q_nope, q_pe], dim=-1)                                      # (B, T, H, dn+dr)
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                is_causal=is_causal, dropout_p=p_drop, scale=self.scale)               # (B, H, T, dv)
            y = y.transpose(1, 2)                                                      # (B, T, H, dv)
        else:
            if cache is not None:
                c_kv = cache.write(self.layer_id, 'kv', c_kv, start)                   # (B, Tk, dc)
                k_pe = cache.write(self.layer_id, 'pe', k_pe.squeeze(2), start).unsqueeze(2)  # (B, Tk, 1, dr)
            w = self.wkv_b.weight.view(H, dn + dv, dc)                                 # (H, dn+dv, dc)
            w_uk, w_uv = w[:, :dn], w[:, dn:]                                          # (H, dn, dc), (H, dv, dc)
            # fold W_UK into the query: the score against c_KV is (W_UK^T q_C) . c_KV
            q_lat = torch.einsum('bthd,hdc->bthc', q_nope, w_uk)                       # (B, T, H, dc)
            q = torch.cat([q_lat, q_pe], dim=-1).transpose(1, 2)                       # (B, H, T, dc+dr)
            k = torch.cat([c_kv.unsqueeze(2), k_pe], dim=-1).transpose(1, 2)           # (B, 1, Tk, dc+dr)
            v = c_kv.unsqueeze(1)                                                      # (B, 1, Tk, dc)
            # one latent key/value head serves all H query heads: multi-query attention
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=p_drop, scale=self.scale,
                enable_gqa=True)                                                       # (B, H, T, dc)
            # fold W_UV into the output: each head's value is W_UV applied to its latent mixture
            y = torch.einsum('bhtc,hdc->bthd', y, w_uv)                                # (B, T, H, dv)
        return self.wo(y.reshape(B, T, H * dv))                                        # (B, T, C)
