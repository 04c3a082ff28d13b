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
  (derivation at `kimi_loss`); E is sum_i / batch_rows, as for grpo.

Every loss here is the paper's objective with its sign flipped: the objectives are maximised, we minimise.

Where we deviate, and why
- std in the advantage is the unbiased (n-1) one, torch.std's default and what TRL / most peers use; the papers
  do not say. It differs from the biased one by sqrt(G/(G-1)) only, i.e. a constant learning-rate factor.
- eps = 1e-4 is added to the std (not inside a sqrt) so a zero-variance group gets A = 0 rather than NaN.
- k3 KL: exp(ref - logp) - (ref - logp) - 1, unbiased for KL(pi_theta || pi_ref) and never negative, as in
  DeepSeekMath eq. 4; it is computed per token and aggregated like the policy term.
- Kimi: the paper gives no clipping and no KL to a fixed reference (pi_i plays that role); we allow the same
  optional beta * k3 term as GRPO (aggregated per sequence, like `grpo`) so the trainer can switch algorithms
  without other changes. The loss is scaled by 1 / (2 tau) (see `kimi_loss`).
- Sequences with no trainable token count as |o_i| = 1 (they contribute 0) instead of dividing by zero.

This file is the reference: (B, T) log-probs in, loss out. fused_loss.py computes the same loss without ever
holding the (B, T, V) fp32 logits (from the hidden states in blocks, and a Triton kernel over the logits on CUDA)
and is held to these functions by tests/test_grpo.py and tests/test_grpo_triton.py.
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


def aggregate(x, mask, loss_type, batch_rows, batch_tokens, global_tokens, max_len):
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


def kimi_loss(logp, old_logp, advantages, mask, tau, batch_rows):
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
def loss_metrics(rho, A_tok, mask, eps_low, eps_high, pg_loss, kl_loss, kl):
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


def check_policy_inputs(logp, old_logp, ref_logp, advantages, mask, loss_type, beta, tau, max_len,
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
    kimi: the squared surrogate of `kimi_loss` (no clipping) plus beta * KL aggregated per sequence.

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
    check_policy_inputs(logp, old_logp, ref_logp, advantages, mask, loss_type, beta, tau, max_len,
                         global_tokens, batch_rows, batch_tokens)
    norm = (batch_rows, batch_tokens, global_tokens, max_len)  # the batch's normalisers, for aggregate
    old_logp = logp.detach() if old_logp is None else old_logp  # on-policy: rho == 1
    mask = mask.to(logp.dtype)                                 # (B, T) bool -> float
    A = advantages.to(logp.dtype)                              # (B,)
    log_ratio = logp - old_logp.detach()                       # (B, T) the rollout policy is a constant
    rho = torch.exp(log_ratio)                                 # (B, T)
    A_tok = A.unsqueeze(1)                                     # (B, 1) the same advantage on every token of o_i

    if loss_type == 'kimi':
        pg_loss = kimi_loss(logp, old_logp.detach(), A, mask, tau, batch_rows)
    else:
        unclipped = rho * A_tok                                # (B, T)
        clipped = rho.clamp(1 - eps_low, 1 + eps_high) * A_tok  # (B, T)
        # the pessimistic (min) bound: once rho has moved past the trust region in the direction A favours, the
        # clipped branch wins and is constant in theta, so that token's gradient is 0
        surrogate = torch.minimum(unclipped, clipped)          # (B, T)
        pg_loss = aggregate(-surrogate, mask, loss_type, *norm)  # minus: we minimise

    if ref_logp is not None and beta != 0:
        kl = kl_k3(logp, ref_logp.detach())                    # (B, T)
        # + beta * KL: the objective subtracts it, the loss (its negation) adds it; same aggregation as the
        # policy term (per sequence for kimi), so the loss is exactly the aggregated l_it above
        kl_loss = beta * aggregate(kl, mask, loss_type, *norm)
    else:
        kl, kl_loss = None, torch.zeros((), device=logp.device, dtype=logp.dtype)
    loss = pg_loss + kl_loss

    drift = kl
    if drift is None and ref_logp is not None:  # beta == 0 but a reference is given: still worth logging
        drift = kl_k3(logp.detach(), ref_logp.detach())
    metrics = loss_metrics(rho, A_tok, mask, eps_low, eps_high, pg_loss, kl_loss, drift)
    return loss, metrics
