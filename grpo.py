"""
Policy optimisation for reasoning RL: GRPO and its aggregation variants, and Kimi k1.5's mirror-descent loss.

What it implements
- GRPO, DeepSeekMath (Shao et al. 2024) sec 4.1, eq. 3, with the outcome-supervision advantage of sec 4.1.2:
  every token of completion o_i gets A_i = (r_i - mean(r_group)) / std(r_group). DeepSeek-R1 sec 2.2.1 uses
  the same objective with rule rewards. The KL to the reference model is the "k3" estimator of eq. 4.
- Aggregation variants of the same per-token term l_it (named as TRL's GRPOTrainer names its `loss_type`). Each
  is a sum over this micro-batch's tokens or sequences divided by a normaliser of the whole batch, so the losses
  of a batch's micro-batches add up to the batch loss:
    grpo     sum_i (sum_t l_it / |o_i|) / batch_rows           per-sequence mean      DeepSeekMath eq. 3
    bnpo     sum_it l_it / batch_tokens                        local batch token mean
    dapo     sum_it l_it / global_tokens                       global token mean      DAPO (Yu et al. 2025) eq. 8
    dr_grpo  sum_it l_it / (batch_rows * max_len), A = r - mean(r)                    Dr.GRPO (Liu et al. 2025)
  batch_rows: completions in the batch (all its micro-batches; under torchrun train.py passes the global batch's);
  batch_tokens: trained tokens in this process's batch; global_tokens: trained tokens in the global batch (all
  ranks). Left out, batch_rows and batch_tokens default to this micro-batch's own count (a call on the whole
  batch). Plus DAPO's clip-higher (eps_low != eps_high)
  and dynamic-sampling filter (`zero_variance_groups`). `advantage_scale` ties the advantage to the loss type.
- Kimi k1.5 (Kimi Team 2025) sec 2.3.2: the online-mirror-descent squared surrogate
    L = E[(r - rbar - tau * log(pi_theta(y|x) / pi_i(y|x)))^2]
  with the sequence-level log ratio, scaled so that its gradient is exactly minus the paper's update direction
  (derivation at `_kimi_loss`); E is sum_i / batch_rows, as for grpo.

Every loss here is the paper's objective with its sign flipped: the objectives are maximised, we minimise.

Where we deviate, and why
- std in the advantage is the unbiased (n-1) one, torch.std's default and what TRL / most peers use; the papers
  do not say. It differs from the biased one by sqrt(G/(G-1)) only, i.e. a constant learning-rate factor.
- eps = 1e-4 is added to the std (not inside a sqrt) so a zero-variance group gets A = 0 rather than NaN.
- k3 KL: exp(ref - logp) - (ref - logp) - 1, unbiased for KL(pi_theta || pi_ref) and never negative, as in
  DeepSeekMath eq. 4; it is computed per token and aggregated like the policy term.
- Kimi: the paper gives no clipping and no KL to a fixed reference (pi_i plays that role); we allow the same
  optional beta * k3 term as GRPO (aggregated per sequence, like `grpo`) so the trainer can switch algorithms
  without other changes. The loss is scaled by 1 / (2 tau) (see `_kimi_loss`).
- Sequences with no trainable token count as |o_i| = 1 (they contribute 0) instead of dividing by zero.

Fast paths, each held to the PyTorch functions above (STYLE.md 6): `loss_from_hidden` computes the loss from the
final hidden states and the output head in blocks, never building the (B, T, V) logits (tests/test_grpo.py);
`loss_from_logits` runs a fused Triton kernel over the logits on CUDA (tests/test_grpo_triton.py).
"""
import torch

LOSS_NEAR_ZERO_NOTE = ("note: a policy loss near 0 is expected with one update per batch (mu=1): rho == 1 so "
                       "the surrogate is about -mean(A) = 0, but its gradient -A * grad log pi is not; judge "
                       "progress by reward, KL, clip fraction and entropy, not by the loss")

LOSS_TYPES = ('grpo', 'bnpo', 'dapo', 'dr_grpo', 'kimi')
ADVANTAGE_SCALES = ('group', 'batch', 'none')                # what group_advantages takes
ADVANTAGE_SCALE_CHOICES = ('auto',) + ADVANTAGE_SCALES        # what advantage_scale takes (--adv-scale)


# -----------------------------------------------------------------------------
# advantages and group filters


def group_advantages(rewards, group_size, scale='group', eps=1e-4):
    """Outcome advantages (DeepSeekMath sec 4.1.2). rewards (N,) ordered group by group, N = n_prompts * G.

    scale='group': (r - group mean) / (group std + eps)        GRPO
    scale='batch': (r - group mean) / (batch std + eps)        mean per group, std over the whole batch
    scale='none':  r - group mean                              Dr.GRPO; also Kimi's r - rbar
    std is the unbiased (n-1) estimator, like torch.std.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    N = rewards.numel()
    if group_size < 1 or N % group_size != 0:
        raise ValueError(f"rewards has {N} entries, not a multiple of group_size={group_size}")
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}, expected one of {ADVANTAGE_SCALES}")
    r = rewards.float().view(-1, group_size)                   # (n_groups, G)
    centred = r - r.mean(dim=1, keepdim=True)                  # (n_groups, G)
    if scale == 'none':
        return centred.view(-1)                                # (N,)
    if scale == 'group':
        # an unbiased std needs two samples; a group of one would give NaN
        if group_size < 2:
            raise ValueError("scale='group' needs group_size >= 2 (the std of one sample is undefined)")
        std = r.std(dim=1, keepdim=True)                       # (n_groups, 1)
    else:
        if N < 2:
            raise ValueError("scale='batch' needs at least 2 rewards")
        std = r.std()                                          # () one std for the whole batch
    # eps outside the std: a group whose rewards are all equal gets exactly 0 / eps = 0
    return (centred / (std + eps)).view(-1)                    # (N,)


def advantage_scale(loss_type, adv_scale='auto'):
    """The group_advantages scale a loss type needs: 'auto' picks it, an explicit choice is checked.
    Kimi k1.5 sec 2.3.2 writes A = r - mean(r): a std division would make its KL temperature tau * std per group.
    Dr.GRPO (Liu et al. 2025) sec 3.1 drops the std division on purpose (it up-weights the questions whose
    rewards barely vary, the too easy and the too hard). So both take 'none' only; grpo, bnpo and dapo default
    to 'group' and may take 'batch' or 'none' (an ablation)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}, expected one of {LOSS_TYPES}")
    if adv_scale not in ADVANTAGE_SCALE_CHOICES:
        raise ValueError(f"unknown advantage scale {adv_scale!r}, expected one of {ADVANTAGE_SCALE_CHOICES}")
    unscaled = loss_type in ('kimi', 'dr_grpo')
    if adv_scale == 'auto':
        return 'none' if unscaled else 'group'
    if unscaled and adv_scale != 'none':
        paper = ("Kimi k1.5 sec 2.3.2 writes A = r - mean(r)" if loss_type == 'kimi' else
                 "Dr.GRPO sec 3.1 removes the std division")
        raise ValueError(f"--loss-type {loss_type} needs --adv-scale none or auto ({paper}); got {adv_scale}")
    return adv_scale


def zero_variance_groups(rewards, group_size):
    """(n_groups,) bool, True where every reward in the group is equal: the group carries no learning signal
    (all its advantages are 0), so DAPO's dynamic sampling drops it and the trainer refills the batch."""
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} cannot be split into groups of {group_size}")
    r = rewards.view(-1, group_size)                           # (n_groups, G)
    return (r == r[:, :1]).all(dim=1)                          # (n_groups,)


# -----------------------------------------------------------------------------
# per-token quantities


def token_logprobs(logits, tokens):
    """log pi(tokens[b, t]) under logits[b, t], in fp32. (B, T, V), (B, T) -> (B, T).
    The caller aligns them: logits[:, t] must be the distribution tokens[:, t] was sampled from."""
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(f"expected logits (B, T, V) and tokens (B, T), got {tuple(logits.shape)} "
                         f"and {tuple(tokens.shape)}")
    # fp32: bf16 has ~3 significant digits, and rho = exp(logp - old_logp) amplifies any rounding in logp
    logits = logits.float()                                    # (B, T, V)
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)
    # log softmax at one index = z_tok - logsumexp(z): no (B, T, V) log-prob tensor is kept
    return picked - torch.logsumexp(logits, dim=-1)            # (B, T)


def kl_k3(logp, ref_logp):
    """k3 estimator of KL(pi_theta || pi_ref) per token (DeepSeekMath eq. 4), elementwise, >= 0.
    With d = ref - logp: e^d - d - 1; its derivative w.r.t. logp is 1 - e^d."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


@torch.no_grad()
def masked_entropy(logits, mask, chunk=256):
    """Mean entropy of the policy over masked tokens, in fp32; a detached metric (entropy collapse shows up here
    first). logits (B, T, V), mask (B, T). Works on `chunk` positions at a time so the fp32 copy stays small."""
    if logits.dim() != 3 or mask.shape != logits.shape[:2]:
        raise ValueError(f"expected logits (B, T, V) and mask (B, T), got {tuple(logits.shape)}, {tuple(mask.shape)}")
    mask = mask.float()                                        # (B, T)
    total = torch.zeros((), device=logits.device)
    for t0 in range(0, logits.size(1), chunk):
        z = logits[:, t0:t0 + chunk].float()                   # (B, c, V)
        logz = torch.logsumexp(z, dim=-1)                      # (B, c)
        p = torch.exp(z - logz.unsqueeze(-1))                  # (B, c, V)
        # H = -sum p log p = -sum p (z - logz) = logz - sum p z, no log-prob tensor needed
        h = logz - (p * z).sum(dim=-1)                         # (B, c)
        total += (h * mask[:, t0:t0 + chunk]).sum()
    return total / mask.sum().clamp(min=1)


# -----------------------------------------------------------------------------
# the loss


def _aggregate(x, mask, loss_type, batch_rows, batch_tokens, global_tokens, max_len):
    """This micro-batch's share of the batch aggregate of a per-token term x (B, T) (module docstring)."""
    x = x * mask                                               # (B, T) untrained tokens contribute nothing
    rows = x.size(0) if batch_rows is None else batch_rows
    if loss_type in ('grpo', 'kimi'):
        # 1/|o_i| per sequence: every completion weighs the same, whatever its length (DeepSeekMath eq. 3)
        return (x.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum() / rows   # (B,) -> ()
    if loss_type == 'bnpo':
        # every token of this process's batch weighs the same; the weight still depends on the batch's lengths
        return x.sum() / (mask.sum().clamp(min=1) if batch_tokens is None else batch_tokens)
    if loss_type == 'dapo':
        # every token of the global batch (all ranks) weighs the same
        return x.sum() / global_tokens
    # dr_grpo: a constant normaliser removes the length bias of 1/|o_i| (Dr.GRPO sec 3.1)
    return x.sum() / (rows * max_len)


def _kimi_loss(logp, old_logp, advantages, mask, tau, batch_rows):
    """Kimi k1.5 sec 2.3.2, scaled to 1 / (2 tau) of the paper's squared surrogate:

        L = 1/(2 tau) * mean_i (A_i - tau * s_i)^2,   s_i = sum_t mask_it (logp_it - old_logp_it) = log pi/pi_i
        A_i = r_i - rbar (advantages with scale='none'); pi_i = the rollout policy, so old_logp is a constant.

    Derivation (s_i depends on theta, A_i does not; grad s_i = grad log pi(y_i)):
        grad L = 1/(2 tau) * mean_i 2 (A_i - tau s_i) (-tau grad s_i) = -mean_i (A_i - tau s_i) grad s_i
               = -mean_i [ A_i grad log pi(y_i) - tau/2 grad s_i^2 ]          (since grad s_i^2 = 2 s_i grad s_i)
    which is exactly minus the paper's gradient 1/k sum_j [grad log pi(y_j) (r_j - rbar) - tau/2 grad s_j^2],
    so a descent step on L is the paper's ascent step. Unscaled, the paper's L has gradient -2 tau times that
    direction: it would couple the learning rate to tau. The value at s = 0 is mean(A^2) / (2 tau), not 0.
    The mean is over the batch's batch_rows sequences (default: this micro-batch's B), like grpo's.
    """
    s = ((logp - old_logp) * mask).sum(dim=1)                  # (B,) sequence log ratio log pi_theta / pi_i
    # (A - tau s) is the residual of the closed-form optimum tau * log(pi*/pi_i) = r - tau log Z ~ r - rbar
    rows = s.size(0) if batch_rows is None else batch_rows
    return ((advantages - tau * s) ** 2).sum() / (rows * 2 * tau)


@torch.no_grad()
def _metrics(rho, A_tok, mask, eps_low, eps_high, pg_loss, kl_loss, kl):
    """Token means over the micro-batch, detached, no .item() (the caller syncs once per step). kl may be None."""
    n_tok = mask.sum().clamp(min=1)
    mean = lambda x: (x * mask).sum() / n_tok              # noqa: E731
    metrics = {
        # the low clip binds when A < 0 and rho fell below 1 - eps_low; the high one when A > 0, rho > 1+eps
        # (kimi does not clip; there they only report how far rho strayed past the same bounds)
        'clip_frac_low': mean((A_tok < 0) & (rho < 1 - eps_low)),
        'clip_frac_high': mean((A_tok > 0) & (rho > 1 + eps_high)),
        'ratio_mean': mean(rho),
        'pg_loss': pg_loss.detach(),
        'kl_loss': kl_loss.detach(),
    }
    if kl is not None:
        metrics['kl'] = mean(kl)
    return metrics


def _check_policy_inputs(logp, old_logp, ref_logp, advantages, mask, loss_type, beta, tau, max_len,
                         global_tokens, batch_rows, batch_tokens):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}, expected one of {LOSS_TYPES}")
    if logp.dim() != 2:
        raise ValueError(f"logp must be (B, T), got shape {tuple(logp.shape)}")
    for name, t in (('old_logp', old_logp), ('mask', mask), ('ref_logp', ref_logp)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, logp has {tuple(logp.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be (B,) = ({logp.size(0)},), got {tuple(advantages.shape)}")
    if beta != 0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp for the KL term")
    if loss_type == 'dapo' and global_tokens is None:
        raise ValueError("loss_type='dapo' needs global_tokens: the token count of the whole global batch")
    # python numbers only: a tensor count (e.g. mask.sum(), or after an all_reduce) would sync the device to read
    for name, n in (('global_tokens', global_tokens), ('batch_rows', batch_rows), ('batch_tokens', batch_tokens)):
        if isinstance(n, (int, float)) and n <= 0:
            raise ValueError(f"{name} must be positive, got {n}")
    if loss_type == 'dr_grpo' and (max_len is None or max_len <= 0):
        raise ValueError(f"loss_type='dr_grpo' needs max_len, the generation budget in tokens, got {max_len}")
    if loss_type == 'kimi' and tau <= 0:
        raise ValueError(f"loss_type='kimi' needs tau > 0, got {tau}")


def policy_loss(logp, old_logp, ref_logp, advantages, mask, loss_type='grpo', beta=0.0, eps_low=0.2,
                eps_high=0.2, tau=1.0, max_len=None, global_tokens=None, batch_rows=None, batch_tokens=None):
    """The policy loss (the objective with its sign flipped) and detached metrics.

    logp (B, T) log pi_theta of the sampled tokens, with grad; old_logp (B, T) the same under the rollout policy,
    detached, or None when the batch is trained once (mu = 1: the policy is its own old policy, rho == 1 exactly
    in value with the gradient of log pi); ref_logp (B, T) under the frozen reference model, or None when beta == 0; advantages (B,) one per
    completion; mask (B, T) float or bool, 1 on the response tokens to train on.

    grpo/bnpo/dapo/dr_grpo, per token (DeepSeekMath eq. 3, DAPO clip-higher):
        l_it = -( min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) - beta * KL_it ),
        rho_it = exp(logp - old_logp), then aggregated as the module docstring lists.
    kimi: the squared surrogate of `_kimi_loss` (no clipping) plus beta * KL aggregated per sequence.

    Why the loss sits near 0 with mu = 1 (one optimisation step per batch): then old_logp == logp in value, so
    rho == 1 and the surrogate equals A_i, whose group mean is 0 by construction; the `grpo` loss is -mean(A) = 0.
    Its gradient is not: grad rho = rho * grad log pi, so the loss pushes -A_i grad log pi(o_it). The loss value is
    therefore no progress measure; watch reward, KL, clip fraction and entropy (LOSS_NEAR_ZERO_NOTE).

    Gradient accumulation / DDP: given the whole batch's normalisers (batch_rows, batch_tokens, global_tokens),
    every loss type returns this micro-batch's exact share of the batch loss: sum the micro-batch losses, divide
    by nothing. For dr_grpo pass a constant batch_rows (the requested prompts x G) so that dropping zero-variance
    groups never changes the normaliser. Several ranks: with global normalisers (batch_rows and global_tokens of
    the global batch, dr_grpo's constant) the ranks' losses add up to the global batch loss, so their gradients
    are summed (train.py: harness.sum_gradients; under DDP, which averages, multiply the loss by world_size).
    bnpo's batch_tokens is by definition the rank's own count: summed over ranks it takes 1/world (train.py
    passes batch_tokens * world), the mean of the ranks' token means.
    """
    _check_policy_inputs(logp, old_logp, ref_logp, advantages, mask, loss_type, beta, tau, max_len,
                         global_tokens, batch_rows, batch_tokens)
    norm = (batch_rows, batch_tokens, global_tokens, max_len)  # the batch's normalisers, for _aggregate
    old_logp = logp.detach() if old_logp is None else old_logp  # on-policy: rho == 1
    mask = mask.to(logp.dtype)                                 # (B, T) bool -> float
    A = advantages.to(logp.dtype)                              # (B,)
    log_ratio = logp - old_logp.detach()                       # (B, T) the rollout policy is a constant
    rho = torch.exp(log_ratio)                                 # (B, T)
    A_tok = A.unsqueeze(1)                                     # (B, 1) the same advantage on every token of o_i

    if loss_type == 'kimi':
        pg_loss = _kimi_loss(logp, old_logp.detach(), A, mask, tau, batch_rows)
    else:
        unclipped = rho * A_tok                                # (B, T)
        clipped = rho.clamp(1 - eps_low, 1 + eps_high) * A_tok  # (B, T)
        # the pessimistic (min) bound: once rho has moved past the trust region in the direction A favours, the
        # clipped branch wins and is constant in theta, so that token's gradient is 0
        surrogate = torch.minimum(unclipped, clipped)          # (B, T)
        pg_loss = _aggregate(-surrogate, mask, loss_type, *norm)  # minus: we minimise

    if ref_logp is not None and beta != 0:
        kl = kl_k3(logp, ref_logp.detach())                    # (B, T)
        # + beta * KL: the objective subtracts it, the loss (its negation) adds it; same aggregation as the
        # policy term (per sequence for kimi), so the loss is exactly the aggregated l_it above
        kl_loss = beta * _aggregate(kl, mask, loss_type, *norm)
    else:
        kl, kl_loss = None, torch.zeros((), device=logp.device, dtype=logp.dtype)
    loss = pg_loss + kl_loss

    drift = kl
    if drift is None and ref_logp is not None:  # beta == 0 but a reference is given: still worth logging
        drift = kl_k3(logp.detach(), ref_logp.detach())
    metrics = _metrics(rho, A_tok, mask, eps_low, eps_high, pg_loss, kl_loss, drift)
    return loss, metrics


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
    """True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 when grpo was imported)."""
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
                               "TRITON_INTERPRET=1 before grpo is imported")
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
    _check_policy_inputs(tokens, old_logp, ref_logp, advantages, mask, loss_type, beta, tau, max_len,
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
        pg_loss = _kimi_loss(logp, old_logp.detach(), A_tok.squeeze(1), mask, tau, batch_rows)
    else:
        pg_loss = _aggregate(pg, mask, loss_type, *norm)
    if kl is not None and beta != 0:
        kl_loss = beta * _aggregate(kl, mask, loss_type, *norm)
    else:
        kl_loss = torch.zeros((), device=logp.device, dtype=logp.dtype)
    loss = pg_loss + kl_loss

    with torch.no_grad():
        rho = torch.exp(logp - old_logp)                       # (B, T)
    return loss, _metrics(rho, A_tok, mask, eps_low, eps_high, pg_loss, kl_loss, kl)
