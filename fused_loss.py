"""
The GRPO / Kimi loss of grpo.py without the (B, T, V) fp32 logits: the largest tensors of an RL step.

At Qwen2.5's vocabulary (V = 151,936) the logits of 16k response tokens take ~10 GB in fp32, and autograd's
softmax of them as much again. Two ways around it, each equal in value and gradient to
grpo.policy_loss(grpo.token_logprobs(logits, tokens), ...), the reference it is tested against:
- loss_from_hidden: from the final hidden states and the output head, in (rows x vocab) blocks; torch on every
  device (the trainer's path off CUDA). Liger-Kernel's fused linear losses and Cut Cross-Entropy (Wijmans et al.
  2024) do the same; the online logsumexp is Milakov & Gimelshein (2018).
- loss_from_logits: a Triton kernel that reads the logits a row at a time (the trainer's path on CUDA, where
  the logits of the response positions are cheap to build in bf16 and expensive to keep in fp32).
The reduction over tokens (every loss_type, Kimi's square) stays grpo.py's on (B, T) tensors, so no fast path
carries its own normalisation.
"""
import torch

from grpo import (aggregate, check_policy_inputs, kimi_loss, loss_metrics, masked_entropy, policy_loss,
                  token_logprobs)

# -----------------------------------------------------------------------------
# the same loss from the hidden states: the (N, V) logits are never built
#
# The trainer's logits (N, V) fp32 and autograd's softmax of them are the largest tensors of a step. Here h (N, C)
# and the head W (V, C) come in and one (chunk_rows, chunk_vocab) block of logits exists at a time, as in
# Liger-Kernel's fused linear losses and Cut Cross-Entropy (Wijmans et al. 2024). The forward keeps per row the
# online logsumexp over V blocks (Milakov & Gimelshein 2018) and the entropy; the backward recomputes each block
# and adds dz = g (onehot - softmax) into dh = dz W and dW = dz^T h: a fourth (N, C, V) matmul for no (N, V)
# buffer. The surrogate stays policy_loss on (N,) log-probs, so every loss_type is the reference's by
# construction. Torch only, on every device; bf16 inputs are upcast a block at a time (fp32 math).


class ChunkedLogp(torch.autograd.Function):
    """h (N, C), W (V, C), tokens (N,) -> logp (N,) fp32 with grad to h and W, entropy (N,) fp32 detached."""

    @staticmethod
    def forward(ctx, h, W, tokens, chunk_rows, chunk_vocab):
        N, V = h.shape[0], W.shape[0]
        lse, ent = torch.empty(N, device=h.device), torch.empty(N, device=h.device)   # (N,) fp32
        for r0 in range(0, N, chunk_rows):
            hr = h[r0:r0 + chunk_rows].float()                                       # (R, C)
            # running max m, s = sum e^(z-m) and t = sum e^(z-m) z over the blocks so far; -inf: nothing yet
            m = torch.full(hr.shape[:1], float('-inf'), device=h.device)             # (R,)
            s, t = torch.zeros_like(m), torch.zeros_like(m)                          # (R,) x 2
            for v0 in range(0, V, chunk_vocab):
                z = hr @ W[v0:v0 + chunk_vocab].float().T                             # (R, Vc)
                M = torch.maximum(m, z.amax(-1))                                      # (R,)
                z -= M[:, None]
                e = z.exp()                                                           # (R, Vc)
                a, s_c = torch.exp(m - M), e.sum(-1)   # a rescales the sums taken under the old max
                s = a * s + s_c
                t = a * t + z.mul_(e).sum(-1) + M * s_c
                m = M
            lse[r0:r0 + chunk_rows] = m + s.log()
            # H = -sum p log p = lse - sum p z: no probability tensor kept
            ent[r0:r0 + chunk_rows] = lse[r0:r0 + chunk_rows] - t / s
        z_tok = (h.float() * W[tokens].float()).sum(-1)                               # (N,) the sampled logits
        ctx.save_for_backward(h, W, tokens, lse)
        ctx.chunks = (chunk_rows, chunk_vocab)
        ctx.mark_non_differentiable(ent)
        return z_tok - lse, ent

    @staticmethod
    def backward(ctx, g, _):
        h, W, tokens, lse = ctx.saved_tensors
        (R, Vc), V = ctx.chunks, W.shape[0]
        dh = torch.zeros(h.shape, device=h.device) if ctx.needs_input_grad[0] else None      # (N, C) fp32
        dW = torch.zeros(W.shape, device=W.device) if ctx.needs_input_grad[1] else None      # (V, C) fp32
        # d logp / dz = onehot(token) - softmax(z): the onehot part is one row of W (of h) per token ...
        if dh is not None:
            dh += g[:, None] * W[tokens].float()
        if dW is not None:
            dW.index_add_(0, tokens, g[:, None] * h.float())
        # ... the softmax part needs every logit again. A token with g == 0 (masked) adds nothing: skipped.
        # -g softmax(z) = -sign(g) exp(z - lse + log|g|): the shift rides in the matmul as its bias (fp32) and
        # the sign on the (R, C) sides, so the block sees one elementwise pass (exp)
        live = g.nonzero().squeeze(1)                                                # (n,)
        for r0 in range(0, live.numel(), R):
            rows = live[r0:r0 + R]
            hr, gr = h[rows].float(), g[rows]                                        # (R, C), (R,)
            shift, sign = (gr.abs().log() - lse[rows])[:, None], -gr.sign()[:, None]  # (R, 1) x 2
            hs, dhr = hr * sign, torch.zeros_like(hr)                                # (R, C) x 2
            for v0 in range(0, V, Vc):
                Wv = W[v0:v0 + Vc].float()                                           # (Vc, C)
                e = torch.addmm(shift, hr, Wv.T).exp_()                              # (R, Vc) |g| softmax
                if dh is not None:
                    dhr.addmm_(e, Wv)
                if dW is not None:
                    dW[v0:v0 + Vc].addmm_(e.T, hs)
            if dh is not None:
                dh.index_add_(0, rows, dhr * sign)
        return (dh.to(h.dtype) if dh is not None else None, dW.to(W.dtype) if dW is not None else None,
                None, None, None)


def logprobs_from_hidden(hidden, lm_head_weight, tokens, chunk_rows=1024, chunk_vocab=4096):
    """token_logprobs(hidden @ lm_head_weight.T, tokens) without the logits: (B, T, C), (V, C), (B, T) -> (B, T)."""
    B, T, C = hidden.shape
    return ChunkedLogp.apply(hidden.reshape(B * T, C), lm_head_weight, tokens.reshape(-1), chunk_rows,
                             chunk_vocab)[0].view(B, T)


def loss_from_hidden(hidden, lm_head_weight, tokens, old_logp, ref_logp, advantages, mask, loss_type='grpo',
                     beta=0.0, eps_low=0.2, eps_high=0.2, tau=1.0, max_len=None, global_tokens=None,
                     batch_rows=None, batch_tokens=None, chunk_rows=1024, chunk_vocab=4096):
    """loss_from_logits(hidden @ lm_head_weight.T, ...) in value, gradient (to hidden and the weight) and metrics,
    without the logits. hidden (B, T, C) (divided by the rollout temperature beforehand, if any: (h/T) W^T =
    logits / T), lm_head_weight (V, C). metrics also hold 'entropy', the masked token mean, detached.
    chunk_rows x chunk_vocab is the block of logits held at once (fp32: 16 MB at the defaults)."""
    if hidden.dim() != 3 or lm_head_weight.dim() != 2 or hidden.shape[-1] != lm_head_weight.shape[1] or \
            tokens.shape != hidden.shape[:2]:
        raise ValueError(f"expected hidden (B, T, C), lm_head_weight (V, C) and tokens (B, T), got "
                         f"{tuple(hidden.shape)}, {tuple(lm_head_weight.shape)} and {tuple(tokens.shape)}")
    B, T, C = hidden.shape
    logp, ent = ChunkedLogp.apply(hidden.reshape(B * T, C), lm_head_weight, tokens.reshape(-1), chunk_rows,
                                  chunk_vocab)                                  # (N,) x 2
    loss, metrics = policy_loss(logp.view(B, T), old_logp, ref_logp, advantages, mask, loss_type, beta, eps_low,
                                eps_high, tau, max_len, global_tokens, batch_rows, batch_tokens)
    m = mask.float()
    metrics['entropy'] = (ent.view(B, T) * m).sum() / m.sum().clamp(min=1)
    return loss, metrics


# -----------------------------------------------------------------------------
# fused kernel: the same loss straight from the logits
#
# token_logprobs makes an fp32 copy of the (B, T, V) logits and autograd keeps an fp32 softmax of the same size:
# ~10 GB each at N = B*T = 16k tokens, V = 152k. The kernels never hold a (B, T, V) fp32 tensor. The forward
# reads each row once, in blocks of V, with the online logsumexp, and writes per token logp, the lse, the clipped
# surrogate, the k3 term and their derivatives w.r.t. logp. The backward reads the row again and writes
# dlogits = g (onehot(token) - softmax) in the logits' dtype, g = dloss/dlogp: 3 N V elements moved, 6 N V bytes
# in bf16, the least for a gradient left to the backward. The reduction over tokens (every loss_type, Kimi's
# square) stays in torch on (B, T) tensors, so autograd hands the kernel g per token whatever the loss_type: a
# fused path with its own normalisation can drift from its reference (Liger-Kernel issue #1082: a fused GRPO
# loss with ~100x its trainer's gradient norm, from a missing correction factor and another dapo normaliser).
try:  # Triton is optional: without it (e.g. a CPU-only install) only the PyTorch path exists
    import triton
    import triton.language as tl
except ImportError:
    triton = None

IMPLS = ('auto', 'torch', 'triton')

if triton is not None:

    @triton.jit
    def _logp_loss_fwd_kernel(logits_ptr, tokens_ptr, old_ptr, ref_ptr, adv_ptr,        # inputs
                              logp_ptr, lse_ptr, pg_ptr, dpg_ptr, kl_ptr, dkl_ptr,      # outputs, (B*T,) fp32
                              T, V, stride_b, stride_t, clip_lo, clip_hi,
                              LOSS: tl.constexpr, HAS_REF: tl.constexpr, BLOCK_V: tl.constexpr):
        # one program per token row; int64 offsets because N * V passes 2^31 at real sizes
        row = tl.program_id(0).to(tl.int64)
        b = row // T
        z_ptr = logits_ptr + b * stride_b + (row % T) * stride_t
        tok = tl.load(tokens_ptr + row)

        # -- 1. online logsumexp over V: only the running max m and sum s = sum exp(z - m) survive a block.
        # m starts finite so that a block of -inf logits gives exp(0) = 1, not exp(-inf + inf) = NaN
        m = -3.0e38
        s = 0.0
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            z = tl.load(z_ptr + offs, mask=offs < V, other=-float('inf')).to(tl.float32)  # (BLOCK_V,)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            # rescale the old sum to the new max before adding this block, so no exp ever overflows
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        # an id outside [0, V) reads as NaN rather than out of bounds (checking it on the host would sync)
        z_tok = tl.load(z_ptr + tok, mask=(tok >= 0) & (tok < V), other=float('nan')).to(tl.float32)
        logp = z_tok - lse
        tl.store(logp_ptr + row, logp)
        tl.store(lse_ptr + row, lse)

        # -- 2. clipped surrogate, negated: pg = -min(rho A, clip(rho) A), and d pg / d logp
        if LOSS:
            A = tl.load(adv_ptr + b)
            rho = tl.exp(logp - tl.load(old_ptr + row))
            unclipped = rho * A
            clipped = tl.minimum(tl.maximum(rho, clip_lo), clip_hi) * A
            tl.store(pg_ptr + row, -tl.minimum(unclipped, clipped))
            # d rho / d logp = rho. Where the clipped branch is strictly smaller it is flat in theta: 0. At a tie
            # rho is inside the clip range (or A = 0) and both branches have slope rho A, as autograd says
            tl.store(dpg_ptr + row, tl.where(unclipped <= clipped, -unclipped, 0.0))

        # -- 3. k3 KL to the reference, d = ref - logp: e^d - d - 1, and its derivative 1 - e^d
        if HAS_REF:
            d = tl.load(ref_ptr + row) - logp
            e = tl.exp(d)
            tl.store(kl_ptr + row, e - d - 1)
            tl.store(dkl_ptr + row, 1 - e)

    @triton.jit
    def _logp_bwd_kernel(logits_ptr, tokens_ptr, lse_ptr, g_ptr, dlogits_ptr,
                         T, V, stride_b, stride_t, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        z_ptr = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
        dz_ptr = dlogits_ptr + row * V                   # the gradient is written as a contiguous (B, T, V)
        tok = tl.load(tokens_ptr + row)
        lse = tl.load(lse_ptr + row)
        g = tl.load(g_ptr + row)                         # dloss / dlogp of this token
        # d logp / d z_v = onehot(v == tok) - softmax(z)_v, the softmax recomputed from the saved lse.
        # A row with g == 0 (a masked token) skips the read and writes zeros
        v_read = tl.where(g != 0, V, 0)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            z = tl.load(z_ptr + offs, mask=offs < v_read, other=0.0).to(tl.float32)  # (BLOCK_V,)
            dz = g * (tl.where(offs == tok, 1.0, 0.0) - tl.exp(z - lse))             # (BLOCK_V,)
            tl.store(dz_ptr + offs, dz.to(dlogits_ptr.dtype.element_ty), mask=offs < V)


def _check_logits(logits, tokens):
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(f"expected logits (B, T, V) and tokens (B, T), got {tuple(logits.shape)} "
                         f"and {tuple(tokens.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if tokens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tokens must be int32 or int64 ids, got {tokens.dtype}")
    if tokens.device != logits.device:
        raise ValueError(f"tokens are on {tokens.device}, logits on {logits.device}")


def _launch_config(V, block_v):
    # 4096 bf16 logits = 8 KB per block and 8 warps: a first guess, not tuned on a GPU yet
    block_v = block_v or min(triton.next_power_of_2(V), 4096)
    if block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    return block_v, (8 if block_v >= 2048 else 4)


class FusedLogpLoss(torch.autograd.Function):
    """logits (B, T, V) -> logp, pg, kl, each (B, T) fp32 and differentiable (pg None without old_logp, kl None
    without ref_logp). The backward folds the three incoming gradients into one g per token (chain rule through
    the saved derivatives) and lets the kernel expand it over V into dlogits, the only (B, T, V) allocation."""

    @staticmethod
    def forward(ctx, logits, tokens, old_logp, ref_logp, advantages, clip_lo, clip_hi, block_v):
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()  # unit stride over V is all it needs
        B, T, V = logits.shape
        f32 = lambda x: x.detach().float().contiguous()      # noqa: E731 (B, T) or (B,) side inputs, in fp32
        new = lambda: torch.empty(B, T, device=logits.device, dtype=torch.float32)  # noqa: E731
        loss, has_ref = old_logp is not None, ref_logp is not None
        logp, lse = new(), new()
        pg, dpg = (new(), new()) if loss else (None, None)
        kl, dkl = (new(), new()) if has_ref else (None, None)
        # the kernel skips the pointers it does not use (LOSS / HAS_REF are compile-time), logp stands in for them
        old, ref, adv = (f32(old_logp) if loss else logp), (f32(ref_logp) if has_ref else logp), \
            (f32(advantages) if loss else logp)
        block_v, num_warps = _launch_config(V, block_v)
        _logp_loss_fwd_kernel[(B * T,)](
            logits, tokens.contiguous(), old, ref, adv,
            logp, lse, pg if loss else logp, dpg if loss else logp, kl if has_ref else logp, dkl if has_ref else logp,
            T, V, logits.stride(0), logits.stride(1), float(clip_lo), float(clip_hi),
            LOSS=loss, HAS_REF=has_ref, BLOCK_V=block_v, num_warps=num_warps)
        ctx.save_for_backward(logits, tokens, lse, dpg, dkl)
        ctx.block_v, ctx.num_warps = block_v, num_warps
        ctx.set_materialize_grads(False)                     # an unused output gives None, not a zero tensor
        return logp, pg, kl

    @staticmethod
    def backward(ctx, g_logp, g_pg, g_kl):
        logits, tokens, lse, dpg, dkl = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        # (B, T) dloss / dlogp: g_logp carries Kimi's sequence term, or a caller's use of logp
        g = sum(x for x in (g_logp, g_pg * dpg if g_pg is not None else None,
                            g_kl * dkl if g_kl is not None else None) if x is not None)
        B, T, V = logits.shape
        dlogits = torch.empty((B, T, V), device=logits.device, dtype=logits.dtype)
        _logp_bwd_kernel[(B * T,)](logits, tokens.contiguous(), lse, g.float().contiguous(), dlogits, T, V,
                                   logits.stride(0), logits.stride(1), BLOCK_V=ctx.block_v, num_warps=ctx.num_warps)
        return dlogits, None, None, None, None, None, None, None


def triton_interpreted():
    """True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 when fused_loss was imported)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_logp_bwd_kernel, InterpretedFunction)


def select_impl(logits, impl='auto'):
    """'torch' or 'triton'. 'auto' takes the kernel only for CUDA tensors with Triton installed; 'triton' forces
    it (CPU tensors then need the interpreter, as in the tests); 'torch' forces the reference."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}, expected one of {IMPLS}")
    if impl == 'auto':
        return 'triton' if triton is not None and logits.is_cuda else 'torch'
    if impl == 'triton':
        if triton is None:
            raise RuntimeError("impl='triton' needs the triton package")
        if not logits.is_cuda and not triton_interpreted():
            raise RuntimeError("impl='triton' on CPU tensors runs only in Triton's interpreter: set "
                               "TRITON_INTERPRET=1 before fused_loss is imported")
    return impl


def logprobs_from_logits(logits, tokens, impl='auto', block_v=None):
    """token_logprobs through the fused kernel: (B, T, V), (B, T) -> (B, T) fp32, differentiable. For the old
    and the reference policy it is the whole cost: one read of the logits, no (B, T, V) temporary."""
    if select_impl(logits, impl) == 'torch':
        return token_logprobs(logits, tokens)
    _check_logits(logits, tokens)
    return FusedLogpLoss.apply(logits, tokens, None, None, None, 0.0, 0.0, block_v)[0]


def loss_from_logits(logits, tokens, old_logp, ref_logp, advantages, mask, loss_type='grpo', beta=0.0,
                     eps_low=0.2, eps_high=0.2, tau=1.0, max_len=None, global_tokens=None, batch_rows=None,
                     batch_tokens=None, impl='auto', block_v=None):
    """policy_loss(token_logprobs(logits, tokens), ...) with the same arguments (normalisers included), value,
    gradient and metrics, through the fused kernel where select_impl picks it. block_v overrides the kernel's
    block over V (tests use a small one to cross many blocks)."""
    if select_impl(logits, impl) == 'torch' or old_logp is None:
        # on-policy (old_logp None): the kernel's logprobs, then the surrogate on (B, T) tensors in torch
        logp = token_logprobs(logits, tokens) if select_impl(logits, impl) == 'torch' else \
            logprobs_from_logits(logits, tokens, impl, block_v)
        return policy_loss(logp, old_logp, ref_logp, advantages, mask, loss_type, beta, eps_low, eps_high, tau,
                           max_len, global_tokens, batch_rows, batch_tokens)
    _check_logits(logits, tokens)
    # tokens stand in for logp: same (B, T) shape, already checked against the logits
    check_policy_inputs(tokens, old_logp, ref_logp, advantages, mask, loss_type, beta, tau, max_len,
                         global_tokens, batch_rows, batch_tokens)
    norm = (batch_rows, batch_tokens, global_tokens, max_len)
    # old and ref are constants. The kernel computes pg and kl per token: pg except for kimi (its sequence term
    # is taken from logp below), kl whenever ref is given (for the metric, even with beta == 0)
    old = old_logp.detach() if loss_type != 'kimi' else None
    ref = ref_logp.detach() if ref_logp is not None else None
    logp, pg, kl = FusedLogpLoss.apply(logits, tokens, old, ref, advantages, 1 - eps_low, 1 + eps_high,
                                       block_v)                # (B, T) x 3
    mask = mask.to(logp.dtype)                                 # (B, T)
    A_tok = advantages.to(logp.dtype).unsqueeze(1)             # (B, 1)

    # from here on it is policy_loss on (B, T) tensors: same aggregation, same sign, same metrics
    if loss_type == 'kimi':
        pg_loss = kimi_loss(logp, old_logp.detach(), A_tok.squeeze(1), mask, tau, batch_rows)
    else:
        pg_loss = aggregate(pg, mask, loss_type, *norm)
    if kl is not None and beta != 0:
        kl_loss = beta * aggregate(kl, mask, loss_type, *norm)
    else:
        kl_loss = torch.zeros((), device=logp.device, dtype=logp.dtype)
    loss = pg_loss + kl_loss

    with torch.no_grad():
        rho = torch.exp(logp - old_logp)                       # (B, T)
    return loss, loss_metrics(rho, A_tok, mask, eps_low, eps_high, pg_loss, kl_loss, kl)


# -----------------------------------------------------------------------------
# the trainer's entry: one name for both paths

def trainer_impl(loss_impl, device, sharded=False):
    """--loss-impl -> 'chunked' (from the hidden states) or an impl of the logits path. 'auto': the kernel over the
    response logits on CUDA, chunked elsewhere (no (N, V) logits, and no Triton interpreter on a CPU). A sharded
    (FSDP) model takes the logits path: the chunked loss reads the head's weight outside the model's forward,
    where FSDP holds only this rank's rows of it (train.py refuses --loss-impl chunked with --fsdp)."""
    if loss_impl == 'chunked' or (loss_impl == 'auto' and not str(device).startswith('cuda')):
        return 'torch' if sharded else 'chunked'
    return loss_impl


def response_logprobs(out, lm_head_weight, tokens, impl):
    """(B, T) log-probs of tokens. out: final hidden states (B, T, C) if impl == 'chunked', else logits (B, T, V)."""
    if impl == 'chunked':
        return logprobs_from_hidden(out, lm_head_weight, tokens)
    return logprobs_from_logits(out, tokens, impl)


def response_loss(out, lm_head_weight, tokens, old_logp, ref_logp, advantages, mask, impl, **loss_options):
    """(loss, metrics incl. 'entropy') of out as in response_logprobs; the entropy of the chunked path comes out
    of its own pass over the vocabulary."""
    if impl == 'chunked':
        return loss_from_hidden(out, lm_head_weight, tokens, old_logp, ref_logp, advantages, mask, **loss_options)
    loss, metrics = loss_from_logits(out, tokens, old_logp, ref_logp, advantages, mask, impl=impl, **loss_options)
    metrics['entropy'] = masked_entropy(out.detach(), mask)
    return loss, metrics
