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
  per token per layer, in one buffer [c_KV ; k_R]. W_UK is folded into the query (q_C . W_UK c_KV =
  (W_UK^T q_C) . c_KV) and W_UV into the output, as V2 section 2.1.2 suggests, so attention is multi-query
  attention over the latent cache with d_qk = kv_lora_rank + qk_rope_head_dim and d_v = kv_lora_rank: the H
  heads fold into the query axis, so the cache is read once for all of them. This is the decode path.
- 'auto': absorb when a cache is given (rollouts: the latent cache, folded decode), naive otherwise (training
  and scoring, where T queries meet T keys and decompressing once beats folding per head). What serving
  engines do, and the default.

Conventions and deviations
- RoPE layout. DeepSeek checkpoints rotate interleaved pairs (x0, x1), (x2, x3), ...; layers.apply_rope rotates
  halves (x_i, x_{i + D/2}). Instead of a second RoPE code path, hf.load_pretrained permutes the rope rows of
  wq/wq_b and wkv_a once (even dims first, then odd: `rope_deinterleave`), which makes the rotate-half rotation
  compute exactly what the interleaved one does; save_pretrained permutes them back. Dot products, hence logits,
  are unchanged by a permutation applied to both q_R and k_R.
- YaRN (Peng et al. 2023; V3 section 4.3 long-context extension). When config.rope_factor > 1 the RoPE table
  comes from `yarn_rope_table` (ramped interpolation of the frequencies, times YaRN's attention factor), and
  the softmax scale gains mscale^2 with mscale = 0.1 * rope_mscale_all_dim * ln(rope_factor) + 1, as in
  DeepSeek's inference code and Hugging Face's DeepseekV3Attention. rope_factor = 1 is plain RoPE.
- Both paths run through F.scaled_dot_product_attention (the absorbed one as MQA with one latent head), so
  masks, dropout and fused kernels behave the same, except one cached decode step on the CPU, where two batched
  matmuls replace SDPA's math path (it would scale a copy of the whole cache at every step); mla_impl can be
  switched per module (`block.attn.impl`) between calls, but not in the middle of a cached generation, as the
  two paths fill different cache buffers.
- Decode kernel. One cached decode step of the absorbed path on CUDA, without grad and without a mask, runs
  `mla_decode` instead: a Triton split-K (flash-decoding) kernel over the latent cache, contiguous or paged, the
  computation FlashMLA does on Hopper (section at the end of this file). `mla_decode_ref` is its slow twin;
  tests/test_mla_triton.py holds the kernel to the twin and the twin to this module. A left-padded batch (the
  sampler passes a mask) keeps SDPA: the kernel takes valid lengths, not a mask.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import RMSNorm, apply_rope, cos_sin, decode_attention, resolve_mask


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
    """cos/sin (block_size, qk_rope_head_dim) with YaRN frequencies, halves duplicated like layers.rope_table.

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
    cos, sin = cos_sin(torch.cat([freqs, freqs], dim=-1))                                     # (T, dim) each
    return cos * attn_factor, sin * attn_factor


def rope_deinterleave(dim):
    """Row permutation taking DeepSeek's interleaved rope layout to rotate-half: [0, 2, 4, ..., 1, 3, 5, ...]."""
    return torch.cat([torch.arange(0, dim, 2), torch.arange(1, dim, 2)])


def kv_cache_bytes_per_token(config, dtype_bytes=2):
    """Cache bytes per token per layer of MLA and of the MHA/GQA it replaces (DeepSeek-V2 section 2.1.4, Table 1).

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

        # 'auto': the latent cache whenever there is a cache (rollouts), decompressed K/V without one (training
        # and scoring, where T queries meet T keys and decompressing once is cheaper than folding per head)
        absorb = self.impl == 'absorb' or (self.impl == 'auto' and cache is not None)
        if not absorb:
            kv = self.wkv_b(c_kv).view(B, T, H, dn + dv)                               # (B, T, H, dn+dv)
            k_nope, v = kv.split([dn, dv], dim=-1)                                     # (B, T, H, dn), (.., dv)
            k = torch.cat([k_nope, k_pe.expand(-1, -1, H, -1)], dim=-1)                # (B, T, H, dn+dr)
            if cache is not None:
                k = cache.write(self.layer_id, 'k', k, start)                          # (B, Tk, H, dn+dr)
                v = cache.write(self.layer_id, 'v', v, start)                          # (B, Tk, H, dv)
            q = torch.cat([q_nope, q_pe], dim=-1)                                      # (B, T, H, dn+dr)
            # SDPA's fused CPU kernel needs one head width for q, k and v; with dv < dn+dr it falls back to
            # the unfused math path (and its mask bookkeeping). Zero columns of v cost less than the fallback
            # (EXPERIMENTS.md t2) and come out as zero columns of y. Only where that kernel may run: the flag
            # (torch.backends.cuda's, which gates the CPU kernel too) is off under sdpa_kernel(MATH)
            fused = not x.is_cuda and p_drop == 0 and torch.backends.cuda.flash_sdp_enabled()
            pad = dn + dr - dv if fused and dv < dn + dr else 0
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), (F.pad(v, (0, pad)) if pad else v).transpose(1, 2),
                attn_mask=mask, is_causal=is_causal, dropout_p=p_drop, scale=self.scale)  # (B, H, T, dv+pad)
            y = y.transpose(1, 2)[..., :dv]                                            # (B, T, H, dv)
        else:
            # one buffer per layer holds [c_KV ; k_R] per token, so the key is the buffer itself and the value
            # its first d_c columns: no per-step concatenation of the whole cache
            kvpe = torch.cat([c_kv, k_pe.squeeze(2)], dim=-1)                          # (B, T, dc+dr)
            if cache is not None:
                kvpe = cache.write(self.layer_id, 'kvpe', kvpe, start)                 # (B, Tk, dc+dr)
            Tk = kvpe.shape[1]
            w = self.wkv_b.weight.view(H, dn + dv, dc)                                 # (H, dn+dv, dc)
            w_uk, w_uv = w[:, :dn], w[:, dn:]                                          # (H, dn, dc), (H, dv, dc)
            # fold W_UK into the query: the score against c_KV is (W_UK^T q_C) . c_KV
            q_lat = torch.einsum('bthd,hdc->bthc', q_nope, w_uk)                       # (B, T, H, dc)
            if (T == 1 and cache is not None and mask is None and p_drop == 0 and x.is_cuda
                    and triton is not None and not torch.is_grad_enabled()):
                # one sampled token on the GPU: the Triton kernel below reads each cached latent once for all
                # H heads. Without a mask every row has the same Tk valid slots; a left-padded batch (mask
                # given) and training (no backward for the kernel) keep SDPA
                lens = torch.full((B,), Tk, dtype=torch.int32, device=x.device)       # (B,)
                y, _ = mla_decode(q_lat[:, 0], q_pe[:, 0], kvpe[..., :dc], kvpe[..., dc:], lens,
                                  self.scale)                                          # (B, H, dc)
                y = y.unsqueeze(1)                                                     # (B, 1, H, dc)
            elif T == 1 and p_drop == 0 and not x.is_cuda:
                # one sampled token per row on the CPU: SDPA would take its math path here (key and value
                # widths differ) and scale a copy of the whole cache at every step, a fifth of a tiny rollout
                q = torch.cat([q_lat, q_pe], dim=-1).view(B, 1, H, dc + dr)            # (B, 1, H, dc+dr)
                y = decode_attention(q, kvpe.unsqueeze(1), kvpe[..., :dc].unsqueeze(1), self.scale,
                                     mask)                                             # (B, 1, H, dc)
            else:
                # multi-query attention with one latent head: fold the H heads into the query axis (row
                # t*H + h), so one (T*H, Tk) score matrix per sequence serves every head and the cache is never
                # repeated per head (SDPA's enable_gqa does that on its CPU path)
                q = torch.cat([q_lat, q_pe], dim=-1).reshape(B, 1, T * H, dc + dr)     # (B, 1, T*H, dc+dr)
                if is_causal:
                    mask = torch.ones(T, Tk, dtype=torch.bool, device=x.device).tril(Tk - T)  # (T, Tk)
                if mask is not None:
                    mask = mask.repeat_interleave(H, dim=-2)                           # (.., T*H, Tk)
                y = F.scaled_dot_product_attention(
                    q, kvpe.unsqueeze(1), kvpe[..., :dc].unsqueeze(1), attn_mask=mask, dropout_p=p_drop,
                    scale=self.scale)                                                  # (B, 1, T*H, dc)
                y = y.view(B, T, H, dc)                                                # (B, T, H, dc)
            # fold W_UV into the output: each head's value is W_UV applied to its latent mixture
            y = torch.einsum('bthc,hdc->bthd', y, w_uv)                                # (B, T, H, dv)
        return self.wo(y.reshape(B, T, H * dv))                                        # (B, T, C)


# -----------------------------------------------------------------------------
# decode kernel: one new token per row against the latent cache (flash-decoding, split-K)
#
# In the absorbed path one decode step is multi-query attention with a single latent head: per row, H queries of
# width d_c + d_R against Tk cached (c_KV, k_R) pairs, output width d_c. It is bound by reading the cache
# (Tk * (d_c + d_R) elements per row per layer; the H queries are tiny), so the kernel reads each cached token
# once and uses it for all H heads: one program holds the (H, d_c) queries and accumulator and walks a range of
# the row's tokens in tiles of BLOCK_N, with the online softmax of FlashAttention (Dao et al. 2022, alg. 1).
# A batch of few rows would leave most SMs idle, so each row's tokens are also split into num_splits ranges
# (flash-decoding, Dao et al. 2023): every split writes its normalised partial output and its lse, and a second
# small kernel merges them, out = sum_s exp(lse_s - lse) out_s with lse = logsumexp_s lse_s.
# Layouts: contiguous (kv_cache (B, S_max, d_c), as model.KVCache holds it) or paged (kv_cache (num_blocks,
# page, d_c) with a block_table (B, max_blocks), FlashMLA's layout with page = 64). Slots at or past a row's
# length are never loaded, so garbage (NaN) there cannot reach the result. Inference only: no backward.
try:  # Triton is optional: without it (e.g. a CPU-only install) only the PyTorch path exists
    import triton
    import triton.language as tl
except ImportError:
    triton = None

IMPLS = ('auto', 'torch', 'triton')
DECODE_BLOCK_N = 32  # cached tokens per tile: 32 x 512 bf16 = 32 KB of latents per stage (first guess, untuned)


def _check_decode_inputs(q_nope, q_pe, kv_cache, pe_cache, cache_seqlens, block_table):
    """Shapes, dtypes and devices of mla_decode's inputs (no values: that would sync with the GPU)."""
    if q_nope.dim() != 3 or q_pe.dim() != 3 or q_nope.shape[:2] != q_pe.shape[:2]:
        raise ValueError(f"expected q_nope (B, H, d_c) and q_pe (B, H, d_R), got {tuple(q_nope.shape)} and "
                         f"{tuple(q_pe.shape)}")
    B, H, dc = q_nope.shape
    dr = q_pe.shape[2]
    if kv_cache.dim() != 3 or pe_cache.dim() != 3 or kv_cache.shape[2] != dc or pe_cache.shape[2] != dr \
            or kv_cache.shape[:2] != pe_cache.shape[:2]:
        raise ValueError(f"expected kv_cache (N, S, d_c={dc}) and pe_cache (N, S, d_R={dr}) with the same N, S, "
                         f"got {tuple(kv_cache.shape)} and {tuple(pe_cache.shape)}")
    if block_table is None and kv_cache.shape[0] != B:
        raise ValueError(f"contiguous layout: kv_cache must be (B={B}, S_max, d_c), got {tuple(kv_cache.shape)} "
                         f"(pass block_table for a paged cache)")
    if block_table is not None and (block_table.dim() != 2 or block_table.shape[0] != B
                                    or block_table.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"block_table must be (B={B}, max_blocks) int32, got {tuple(block_table.shape)} "
                         f"{block_table.dtype}")
    if cache_seqlens.shape != (B,) or cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cache_seqlens must be (B={B},) int32, got {tuple(cache_seqlens.shape)} "
                         f"{cache_seqlens.dtype}")
    dtypes = {q_nope.dtype, q_pe.dtype, kv_cache.dtype, pe_cache.dtype}
    if len(dtypes) != 1 or q_nope.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"queries and caches must share one dtype of float32, bfloat16, float16; got {dtypes}")
    tensors = [q_pe, kv_cache, pe_cache, cache_seqlens] + ([block_table] if block_table is not None else [])
    if any(t.device != q_nope.device for t in tensors):
        raise ValueError("all mla_decode inputs must be on one device")


def mla_decode_ref(q_nope, q_pe, kv_cache, pe_cache, cache_seqlens, scale, block_table=None):
    """The slow, obvious twin of the kernel: gather each row's pages, zero the slots past its length, scores and
    softmax in fp32. Returns out (B, H, d_c) in the queries' dtype and lse (B, H) fp32. Lengths must be in
    [1, capacity] (checked here, which syncs with the GPU)."""
    _check_decode_inputs(q_nope, q_pe, kv_cache, pe_cache, cache_seqlens, block_table)
    lens = cache_seqlens.long()                                                      # (B,)
    if block_table is not None:
        # table entries past a row's last page may be garbage: point them at page 0 (zeroed below anyway)
        page = kv_cache.shape[1]
        used = torch.arange(block_table.shape[1], device=lens.device) < (lens[:, None] + page - 1) // page
        table = torch.where(used, block_table.long(), 0)                             # (B, max_blocks)
        kv_cache = kv_cache[table].flatten(1, 2)                                     # (B, max_blocks*page, d_c)
        pe_cache = pe_cache[table].flatten(1, 2)                                     # (B, max_blocks*page, d_R)
    S = kv_cache.shape[1]
    if bool((lens < 1).any()) or bool((lens > S).any()):
        raise ValueError(f"cache_seqlens must lie in [1, {S}], got {cache_seqlens.tolist()}")
    valid = torch.arange(S, device=lens.device)[None, :] < lens[:, None]             # (B, S)
    # torch.where, not a multiply: 0 * NaN would still be NaN
    kv = torch.where(valid[..., None], kv_cache.float(), 0.0)                        # (B, S, d_c)
    pe = torch.where(valid[..., None], pe_cache.float(), 0.0)                        # (B, S, d_R)
    s = torch.einsum('bhc,bsc->bhs', q_nope.float(), kv) + torch.einsum('bhr,bsr->bhs', q_pe.float(), pe)
    s = (scale * s).masked_fill(~valid[:, None, :], float('-inf'))                   # (B, H, S)
    lse = torch.logsumexp(s, dim=-1)                                                 # (B, H)
    out = torch.einsum('bhs,bsc->bhc', torch.exp(s - lse[..., None]), kv)            # (B, H, d_c)
    return out.to(q_nope.dtype), lse


if triton is not None:

    @triton.jit
    def _mla_decode_split_kernel(q_nope_ptr, q_pe_ptr, kv_ptr, pe_ptr, lens_ptr, table_ptr,   # inputs
                                 out_ptr, lse_ptr,                                            # outputs
                                 scale, H, D_C, D_R, S_CAP,
                                 stride_qb, stride_qh, stride_qpb, stride_qph,
                                 stride_kvb, stride_kvn, stride_peb, stride_pen, stride_tb,
                                 stride_ob, stride_os, stride_oh, stride_lb, stride_ls,
                                 PAGED: tl.constexpr, PAGE: tl.constexpr, PRECISION: tl.constexpr,
                                 BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                                 BLOCK_N: tl.constexpr):
        # one program per (row b, split); int64 offsets because a cache passes 2^31 elements at real sizes
        b = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        offs_h = tl.arange(0, BLOCK_H)
        offs_c = tl.arange(0, BLOCK_C)
        offs_r = tl.arange(0, BLOCK_R)
        h_ok, c_ok, r_ok = offs_h < H, offs_c < D_C, offs_r < D_R

        # -- 1. this split's token range: the row's tiles are dealt out in equal runs, so ranges start on a
        # tile boundary; a split past the row's end gets nothing and writes out = 0, lse = -inf (weight 0).
        # A length past the cache's capacity is clamped so that no load ever leaves the cache
        L = tl.maximum(tl.minimum(tl.load(lens_ptr + b), S_CAP), 0)
        per_split = tl.cdiv(tl.cdiv(L, BLOCK_N), n_splits) * BLOCK_N
        start = split * per_split
        end = tl.minimum(start + per_split, L)

        # -- 2. the H queries stay in registers for the whole range (the padded heads and columns load as 0)
        q_nope = tl.load(q_nope_ptr + b * stride_qb + offs_h[:, None] * stride_qh + offs_c[None, :],
                         mask=h_ok[:, None] & c_ok[None, :], other=0.0)                       # (BLOCK_H, BLOCK_C)
        q_pe = tl.load(q_pe_ptr + b * stride_qpb + offs_h[:, None] * stride_qph + offs_r[None, :],
                       mask=h_ok[:, None] & r_ok[None, :], other=0.0)                         # (BLOCK_H, BLOCK_R)

        # -- 3. online softmax over the tiles: running max m, running sum l, unnormalised output acc.
        # m starts finite so a fully masked tile gives exp(-inf - m) = 0, never exp(-inf + inf) = NaN
        m = tl.full((BLOCK_H,), -3.0e38, dtype=tl.float32)
        l = tl.zeros((BLOCK_H,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < end
            if PAGED:
                # token n of row b lives in page table[b, n // PAGE] at slot n % PAGE
                page = tl.load(table_ptr + b * stride_tb + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
                kv_row = page * stride_kvb + (offs_n % PAGE) * stride_kvn                     # (BLOCK_N,)
                pe_row = page * stride_peb + (offs_n % PAGE) * stride_pen
            else:
                kv_row = b * stride_kvb + offs_n * stride_kvn
                pe_row = b * stride_peb + offs_n * stride_pen
            # the latent tile is both key (with k_R) and value: loaded once, used twice
            kv = tl.load(kv_ptr + kv_row[:, None] + offs_c[None, :],
                         mask=n_ok[:, None] & c_ok[None, :], other=0.0)                       # (BLOCK_N, BLOCK_C)
            pe = tl.load(pe_ptr + pe_row[:, None] + offs_r[None, :],
                         mask=n_ok[:, None] & r_ok[None, :], other=0.0)                       # (BLOCK_N, BLOCK_R)
            s = tl.dot(q_nope, tl.trans(kv), input_precision=PRECISION)
            s += tl.dot(q_pe, tl.trans(pe), input_precision=PRECISION)                       # (BLOCK_H, BLOCK_N)
            s = tl.where(n_ok[None, :], s * scale, float('-inf'))
            m_new = tl.maximum(m, tl.max(s, axis=1))                                          # (BLOCK_H,)
            alpha = tl.exp(m - m_new)          # rescales what was summed under the old max
            p = tl.exp(s - m_new[:, None])                                                    # (BLOCK_H, BLOCK_N)
            l = l * alpha + tl.sum(p, axis=1)
            # p in the cache's dtype for the tensor-core product, as FlashAttention does; fp32 accumulation
            acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv, input_precision=PRECISION)
            m = m_new

        # -- 4. normalise and write this split's output and natural-log lse (an empty split: 0 and -inf)
        l_safe = tl.where(l > 0, l, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(l > 0, m + tl.log(l_safe), float('-inf'))
        tl.store(out_ptr + b * stride_ob + split * stride_os + offs_h[:, None] * stride_oh + offs_c[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=h_ok[:, None] & c_ok[None, :])
        tl.store(lse_ptr + b * stride_lb + split * stride_ls + offs_h, lse, mask=h_ok)

    @triton.jit
    def _mla_decode_combine_kernel(part_ptr, part_lse_ptr, out_ptr, lse_ptr, D_C, n_splits,
                                   stride_pb, stride_ps, stride_ph, stride_plb, stride_pls,
                                   stride_ob, stride_oh, stride_lb,
                                   BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
        # one program per (row, head): merge the splits' partial outputs by their share of the softmax mass
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_c = tl.arange(0, BLOCK_C)
        s_ok = offs_s < n_splits
        lse_s = tl.load(part_lse_ptr + b * stride_plb + offs_s * stride_pls + h, mask=s_ok,
                        other=float('-inf'))                                                  # (BLOCK_S,)
        m = tl.max(lse_s, axis=0)
        m = tl.where(m == float('-inf'), 0.0, m)       # an empty row: every weight 0, no NaN from -inf + inf
        w = tl.exp(lse_s - m)                                                                 # (BLOCK_S,)
        total = tl.sum(w, axis=0)
        total_safe = tl.where(total > 0, total, 1.0)
        part = tl.load(part_ptr + b * stride_pb + offs_s[:, None] * stride_ps + h * stride_ph + offs_c[None, :],
                       mask=s_ok[:, None] & (offs_c < D_C)[None, :], other=0.0)               # (BLOCK_S, BLOCK_C)
        out = tl.sum(w[:, None] * part, axis=0) / total_safe                                 # (BLOCK_C,)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_c, out.to(out_ptr.dtype.element_ty),
                 mask=offs_c < D_C)
        tl.store(lse_ptr + b * stride_lb + h, tl.where(total > 0, m + tl.log(total_safe), float('-inf')))


def _num_splits(B, capacity, device):
    """Splits per row: enough (row, split) programs for about two per SM, but at least 4 tiles per split and no
    more than 64, so the partials stay small next to the cache read. Uses the capacity, not the lengths, so it
    never syncs with the GPU; without one (the interpreter) it assumes an H100's 132 SMs. A first guess, not
    tuned on a GPU yet (bench.py mla_decode --num-splits)."""
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count if device.type == 'cuda' else 132
    n_tiles = triton.cdiv(capacity, DECODE_BLOCK_N)
    return max(1, min(triton.cdiv(2 * n_sm, B), n_tiles // 4, 64))


def mla_decode_triton(q_nope, q_pe, kv_cache, pe_cache, cache_seqlens, scale, block_table=None, num_splits=None):
    """Check the inputs and launch the split kernel (and the combine kernel when num_splits > 1).

    Lengths are not checked (that would sync): a length past the capacity is clamped to it, and a row of
    length 0 gets out = 0, lse = -inf."""
    _check_decode_inputs(q_nope, q_pe, kv_cache, pe_cache, cache_seqlens, block_table)
    if kv_cache.stride(-1) != 1 or pe_cache.stride(-1) != 1:
        raise ValueError("kv_cache and pe_cache need a unit stride along d_c / d_R (copying a cache per step "
                         "would cost more than the attention)")
    q_nope = q_nope if q_nope.stride(-1) == 1 else q_nope.contiguous()
    q_pe = q_pe if q_pe.stride(-1) == 1 else q_pe.contiguous()
    B, H, dc = q_nope.shape
    dr = q_pe.shape[2]
    paged = block_table is not None
    page = kv_cache.shape[1] if paged else 1
    capacity = block_table.shape[1] * page if paged else kv_cache.shape[1]
    n_splits = num_splits or _num_splits(B, capacity, q_nope.device)
    if n_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {n_splits}")
    out = torch.empty(B, H, dc, device=q_nope.device, dtype=q_nope.dtype)
    lse = torch.empty(B, H, device=q_nope.device, dtype=torch.float32)
    if n_splits == 1:  # the split kernel writes the result directly
        part, part_lse = out.unsqueeze(1), lse.unsqueeze(1)                                   # (B, 1, H, dc)
    else:
        part = torch.empty(B, n_splits, H, dc, device=q_nope.device, dtype=torch.float32)
        part_lse = torch.empty(B, n_splits, H, device=q_nope.device, dtype=torch.float32)
    table = block_table if paged else cache_seqlens  # the kernel ignores the table without PAGED
    pow2 = lambda n: max(16, triton.next_power_of_2(n))  # noqa: E731 tl.dot needs power-of-2 sides of >= 16
    _mla_decode_split_kernel[(B, n_splits)](
        q_nope, q_pe, kv_cache, pe_cache, cache_seqlens, table, part, part_lse,
        float(scale), H, dc, dr, capacity,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), pe_cache.stride(0), pe_cache.stride(1), table.stride(0),
        part.stride(0), part.stride(1), part.stride(2), part_lse.stride(0), part_lse.stride(1),
        PAGED=paged, PAGE=page, PRECISION='ieee' if q_nope.dtype == torch.float32 else 'tf32',
        BLOCK_H=pow2(H), BLOCK_C=pow2(dc), BLOCK_R=pow2(dr), BLOCK_N=DECODE_BLOCK_N, num_warps=4)
    if n_splits > 1:
        _mla_decode_combine_kernel[(B, H)](
            part, part_lse, out, lse, dc, n_splits,
            part.stride(0), part.stride(1), part.stride(2), part_lse.stride(0), part_lse.stride(1),
            out.stride(0), out.stride(1), lse.stride(0),
            BLOCK_S=triton.next_power_of_2(n_splits), BLOCK_C=triton.next_power_of_2(dc), num_warps=4)
    return out, lse


def triton_interpreted():
    """True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 when mla was imported)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_mla_decode_split_kernel, InterpretedFunction)


def select_impl(x, impl='auto'):
    """'torch' or 'triton'. 'auto' takes the kernel only for CUDA tensors with Triton installed; 'triton' forces
    it (CPU tensors then need the interpreter, as in the tests); 'torch' forces the reference."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}, expected one of {IMPLS}")
    if impl == 'auto':
        return 'triton' if triton is not None and x.is_cuda else 'torch'
    if impl == 'triton':
        if triton is None:
            raise RuntimeError("impl='triton' needs the triton package")
        if not x.is_cuda and not triton_interpreted():
            raise RuntimeError("impl='triton' on CPU tensors runs only in Triton's interpreter: set "
                               "TRITON_INTERPRET=1 before mla is imported")
    return impl


def mla_decode(q_nope, q_pe, kv_cache, pe_cache, cache_seqlens, scale, block_table=None, num_splits=None,
               impl='auto'):
    """One decode step of absorbed MLA for a batch: out (B, H, d_c) = softmax(scale * (q_nope.kv + q_pe.pe)) kv
    over each row's first cache_seqlens[b] cached tokens, and lse (B, H) fp32, the natural log-sum-exp of the
    scaled scores. q_nope (B, H, d_c) is the query with W_UK folded in, q_pe (B, H, d_R) its rotated rope part.
    Contiguous cache: kv_cache (B, S_max, d_c), pe_cache (B, S_max, d_R). Paged: kv_cache (num_blocks, page,
    d_c), pe_cache (num_blocks, page, d_R), block_table (B, max_blocks) int32. num_splits (Triton only) splits
    each row's tokens for flash-decoding; None picks it from the batch size and capacity."""
    if select_impl(q_nope, impl) == 'torch':
        return mla_decode_ref(q_nope, q_pe, kv_cache, pe_cache, cache_seqlens, scale, block_table)
    return mla_decode_triton(q_nope, q_pe, kv_cache, pe_cache, cache_seqlens, scale, block_table, num_splits)
