"""
Tests for grpo.py: advantages and the scale each loss type needs, per-token log-probs, every loss_type's value
and gradient, clipping, the KL term, Kimi's gradient against the paper's formula, and the micro-batch identity
(micro-batch losses given the batch's normalisers sum to the whole batch's loss). Every expected number is worked
by hand in the comments and computed here with plain Python arithmetic, never through grpo.py's internals.
loss_from_hidden (chunked, no logits) is held to its slow twin: the logits h W^T built in full, torch's
log_softmax, policy_loss, autograd, and the entropy -sum p log p written out here.

Run:  python -m pytest tests/test_grpo.py -q      (CPU, about a second)
"""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fused_loss import loss_from_hidden  # noqa: E402
from grpo import (LOSS_NEAR_ZERO_NOTE, LOSS_TYPES, advantage_scale, group_advantages, kl_k3,  # noqa: E402
                  masked_entropy, policy_loss, token_logprobs, zero_variance_groups)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               atol=tol, rtol=tol)


# -----------------------------------------------------------------------------
# advantages

# two groups of G=4: [1,0,0,0] (mean 0.25) and [1,1,1,1] (zero variance)
REWARDS = torch.tensor([1., 0., 0., 0., 1., 1., 1., 1.])


def test_advantages_group():
    # group 1: deviations [0.75, -0.25, -0.25, -0.25]; unbiased var = (0.5625 + 3 * 0.0625) / 3 = 0.25, std 0.5
    # group 2: deviations 0 and std 0 -> 0 / (0 + eps) = 0, not NaN
    eps = 1e-4
    s = 0.5 + eps
    expected = [0.75 / s, -0.25 / s, -0.25 / s, -0.25 / s, 0., 0., 0., 0.]
    close(group_advantages(REWARDS, 4, 'group', eps), expected)


def test_advantages_batch():
    # batch mean 5/8; squared deviations 5 * (3/8)^2 + 3 * (5/8)^2 = 120/64; unbiased var (120/64)/7 = 15/56
    eps = 1e-4
    s = math.sqrt(15 / 56) + eps
    expected = [0.75 / s, -0.25 / s, -0.25 / s, -0.25 / s, 0., 0., 0., 0.]
    close(group_advantages(REWARDS, 4, 'batch', eps), expected)


def test_advantages_none():
    # Dr.GRPO / Kimi: r - group mean only
    close(group_advantages(REWARDS, 4, 'none'), [0.75, -0.25, -0.25, -0.25, 0., 0., 0., 0.])


def test_advantages_bad_inputs():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(7), 4)
    with pytest.raises(ValueError, match="unknown advantage scale"):
        group_advantages(torch.zeros(8), 4, scale='rank')
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.zeros(8), 1, scale='group')
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 4), 4)


def test_advantage_scale_auto_and_allowed():
    assert [advantage_scale(t) for t in LOSS_TYPES] == ['group', 'group', 'group', 'none', 'none']
    assert advantage_scale('kimi', 'none') == advantage_scale('dr_grpo', 'none') == 'none'
    # the std-free ablation of grpo-like losses, and the batch std, are legitimate choices
    assert advantage_scale('grpo', 'none') == 'none' and advantage_scale('dapo', 'batch') == 'batch'


@pytest.mark.parametrize('loss_type', ['kimi', 'dr_grpo'])
@pytest.mark.parametrize('scale', ['group', 'batch'])
def test_advantage_scale_rejects_std_for_kimi_and_dr_grpo(loss_type, scale):
    with pytest.raises(ValueError, match=f"--loss-type {loss_type} needs --adv-scale none.*got {scale}$"):
        advantage_scale(loss_type, scale)


def test_advantage_scale_bad_inputs():
    with pytest.raises(ValueError, match="unknown loss_type"):
        advantage_scale('ppo')
    with pytest.raises(ValueError, match="unknown advantage scale"):
        advantage_scale('grpo', 'rank')
    with pytest.raises(ValueError, match="unknown advantage scale"):
        group_advantages(torch.zeros(8), 4, scale='auto')      # the caller resolves 'auto' first


def test_group_scale_changes_kimis_temperature():
    # the defect advantage_scale prevents. Groups [1,0,0,0] and [1,1,0,0]:
    #   r - mean = [0.75, -0.25, -0.25, -0.25 | 0.5, 0.5, -0.5, -0.5]      (Kimi's A = r - rbar)
    #   unbiased std: 0.5 and sqrt((4 * 0.25) / 3) = 1/sqrt(3); with eps = 0 the group scale gives
    #   [1.5, -0.5, -0.5, -0.5 | sqrt(3)/2, sqrt(3)/2, -sqrt(3)/2, -sqrt(3)/2]
    rewards = torch.tensor([1., 0., 0., 0., 1., 1., 0., 0.])
    centred = [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5]
    sigma = [0.5] * 4 + [1 / math.sqrt(3)] * 4
    h = math.sqrt(3) / 2
    scaled = group_advantages(rewards, 4, 'group', eps=0.0)
    close(scaled, [1.5, -0.5, -0.5, -0.5, h, h, -h, -h])
    assert (scaled - torch.tensor(centred)).abs().max() > 0.5
    close(group_advantages(rewards, 4, advantage_scale('kimi')), centred)
    # with the scaled A, Kimi's gradient on row i is -(A_i / sigma_i - tau s_i) / B per token
    #   = -(1 / sigma_i) (A_i - (tau sigma_i) s_i) / B: a temperature tau * sigma_i that differs per group
    tau, B = 0.5, 8
    g = torch.Generator().manual_seed(5)
    logp = (-torch.rand(B, 3, generator=g)).requires_grad_()
    old = logp.detach() + 0.2 * torch.randn(B, 3, generator=g)
    s = (logp.detach() - old).sum(1).tolist()                   # sequence log ratios, every token trained
    loss, _ = policy_loss(logp, old, None, scaled, torch.ones(B, 3), 'kimi', tau=tau)
    loss.backward()
    expected = [[-(centred[i] - tau * sigma[i] * s[i]) / (sigma[i] * B)] * 3 for i in range(B)]
    close(logp.grad, expected)


def test_zero_variance_groups():
    close(zero_variance_groups(REWARDS, 4).float(), [0., 1.])
    close(zero_variance_groups(torch.tensor([0., 0., 0.5, 0.5, 1., 0.]), 2).float(), [1., 1., 0.])
    with pytest.raises(ValueError):
        zero_variance_groups(torch.zeros(5), 2)


# -----------------------------------------------------------------------------
# per-token quantities

def test_token_logprobs_by_hand_and_vs_log_softmax():
    # logits [0, ln 3]: softmax = [1/4, 3/4]
    logits = torch.tensor([[[0., math.log(3.)], [0., math.log(3.)]]])      # (1, 2, 2)
    lp = token_logprobs(logits, torch.tensor([[1, 0]]))
    close(lp, [[math.log(0.75), math.log(0.25)]])
    # bf16 logits in, fp32 out, equal to the reference library's log_softmax on the fp32 cast
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 11, generator=g).to(torch.bfloat16)
    tokens = torch.randint(0, 11, (2, 3), generator=g)
    lp = token_logprobs(logits, tokens)
    assert lp.dtype == torch.float32
    ref = torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None])[..., 0]
    close(lp, ref)


def test_kl_k3_value_and_grad():
    # d = ref - logp: k3 = e^d - d - 1, d k3 / d logp = 1 - e^d
    d = [0.5, -0.5, 0.0]
    logp = torch.tensor([-1., -2., -3.], requires_grad=True)
    ref = logp.detach() + torch.tensor(d)
    k = kl_k3(logp, ref)
    close(k, [math.exp(x) - x - 1 for x in d])
    assert (k >= 0).all()
    k.sum().backward()
    close(logp.grad, [1 - math.exp(x) for x in d])


def test_masked_entropy():
    # uniform over V=4 -> ln 4; a near one-hot row -> ~0; the masked third token is ignored
    logits = torch.tensor([[[0., 0., 0., 0.], [50., 0., 0., 0.], [9., 1., 2., 3.]]])   # (1, 3, 4)
    mask = torch.tensor([[1, 1, 0]])
    close(masked_entropy(logits, mask), (math.log(4) + 0.0) / 2)
    close(masked_entropy(logits, mask, chunk=1), masked_entropy(logits, mask, chunk=256))


# -----------------------------------------------------------------------------
# the loss at mu = 1 (old_logp = logp.detach(): rho == 1, every token unclipped)
#
# B=2, T=3, mask [[1,1,0],[1,1,1]] -> |o| = [2, 3], 5 tokens; A = [1, -2]
# per token l_it = -rho * A_i = -A_i in value, d l_it / d logp_it = -rho * A_i = -A_i

MASK = torch.tensor([[1., 1., 0.], [1., 1., 1.]])
ADV = torch.tensor([1., -2.])
LOGP = [[-1., -2., -3.], [-0.5, -1.5, -2.5]]


def run_loss(loss_type, old_shift=None, **kw):
    logp = torch.tensor(LOGP, requires_grad=True)
    old = logp.detach() if old_shift is None else logp.detach() - torch.tensor(old_shift)
    loss, metrics = policy_loss(logp, old, None, ADV, MASK, loss_type=loss_type, **kw)
    loss.backward()
    return loss, logp.grad, metrics


def test_grpo_mu1():
    # value: mean_i (sum_t l / |o_i|) = mean(-1*2/2, 2*3/3) = mean(-1, 2) = 0.5
    # grad: -A_i / |o_i| / B: row 0 -1/2/2 = -0.25, row 1 2/3/2 = 1/3; 0 on the masked token
    loss, grad, m = run_loss('grpo')
    close(loss, 0.5)
    close(grad, [[-0.25, -0.25, 0.], [1 / 3, 1 / 3, 1 / 3]])
    close(m['ratio_mean'], 1.0)
    close(m['clip_frac_low'], 0.)
    close(m['clip_frac_high'], 0.)
    close(m['pg_loss'], 0.5)
    close(m['kl_loss'], 0.)
    assert 'kl' not in m and not m['pg_loss'].requires_grad


def test_bnpo_mu1():
    # value: (-1*2 + 2*3) / 5 = 0.8; grad -A_i / 5: row 0 -0.2, row 1 0.4
    loss, grad, _ = run_loss('bnpo')
    close(loss, 0.8)
    close(grad, [[-0.2, -0.2, 0.], [0.4, 0.4, 0.4]])


def test_dapo_mu1():
    # global batch of 20 tokens: 4 / 20 = 0.2; grad -A_i / 20
    loss, grad, _ = run_loss('dapo', global_tokens=20)
    close(loss, 0.2)
    close(grad, [[-0.05, -0.05, 0.], [0.1, 0.1, 0.1]])


def test_dr_grpo_mu1():
    # budget max_len = 4: 4 / (B * max_len) = 4 / 8 = 0.5; grad -A_i / 8
    loss, grad, _ = run_loss('dr_grpo', max_len=4)
    close(loss, 0.5)
    close(grad, [[-0.125, -0.125, 0.], [0.25, 0.25, 0.25]])


def test_batch_normalisers_by_hand():
    # these 2 rows as a micro-batch of a batch of batch_rows = 5 completions holding batch_tokens = 8 tokens:
    #   grpo:    (-1 + 2) / 5 = 0.2           grad -A_i / (|o_i| * 5)
    #   bnpo:    4 / 8 = 0.5                  grad -A_i / 8
    #   dr_grpo: 4 / (5 * max_len 4) = 0.2    grad -A_i / 20, the constant normaliser
    #   kimi at s = 0: (1 + 4) / (5 * 2 * tau 0.25) = 2
    loss, grad, _ = run_loss('grpo', batch_rows=5, batch_tokens=8)
    close(loss, 0.2)
    close(grad, [[-0.1, -0.1, 0.], [2 / 15, 2 / 15, 2 / 15]])
    loss, grad, _ = run_loss('bnpo', batch_rows=5, batch_tokens=8)
    close(loss, 0.5)
    close(grad, [[-0.125, -0.125, 0.], [0.25, 0.25, 0.25]])
    loss, grad, _ = run_loss('dr_grpo', batch_rows=5, batch_tokens=8, max_len=4)
    close(loss, 0.2)
    close(grad, [[-0.05, -0.05, 0.], [0.1, 0.1, 0.1]])
    loss, _, _ = run_loss('kimi', batch_rows=5, tau=0.25)
    close(loss, 2.0)


# Kimi: log ratios logp - old = [[0.1, 0.2, 5.0 (masked)], [-0.1, 0.0, 0.3]] -> s = [0.3, 0.2]; tau = 0.25
KIMI_SHIFT = [[0.1, 0.2, 5.0], [-0.1, 0.0, 0.3]]


def test_kimi_value_and_grad_by_hand():
    # A - tau s = [1 - 0.075, -2 - 0.05] = [0.925, -2.05]
    # L = 1/(2 tau) mean_i (A_i - tau s_i)^2 = 2 * (0.925^2 + 2.05^2) / 2 = 0.855625 + 4.2025
    # grad = -(A_i - tau s_i) * mask / B: row 0 -0.925/2 = -0.4625, row 1 2.05/2 = 1.025; masked token 0
    loss, grad, _ = run_loss('kimi', old_shift=KIMI_SHIFT, tau=0.25)
    close(loss, 0.925 ** 2 + 2.05 ** 2)
    close(grad, [[-0.4625, -0.4625, 0.], [1.025, 1.025, 1.025]])


def test_kimi_grad_is_minus_paper_formula():
    # the paper's update direction 1/k sum_j [grad log pi(y_j) (r_j - rbar) - tau/2 grad (log pi/pi_i)(y_j)^2],
    # built from sequence log-ratios with its own autograd graph: J = 1/k sum_j [A_j s_j - tau/2 s_j^2]
    tau = 0.7
    g = torch.Generator().manual_seed(1)
    logp = torch.randn(4, 5, generator=g).requires_grad_()
    old = logp.detach() + 0.1 * torch.randn(4, 5, generator=g)
    mask = (torch.rand(4, 5, generator=g) > 0.3).float()
    A = group_advantages(torch.tensor([1., 0., 0., 1.]), 2, scale='none')
    loss, _ = policy_loss(logp, old, None, A, mask, loss_type='kimi', tau=tau)
    ours = torch.autograd.grad(loss, logp)[0]
    seq_logratio = [sum((logp[j, t] - old[j, t]) * mask[j, t] for t in range(5)) for j in range(4)]
    J = sum(A[j] * seq_logratio[j] - tau / 2 * seq_logratio[j] ** 2 for j in range(4)) / 4
    paper = torch.autograd.grad(J, logp)[0]
    close(ours, -paper)


# -----------------------------------------------------------------------------
# clipping in both directions, mu > 1 (rho != 1), eps_low 0.2, eps_high 0.28 (clip-higher)
#
#   row 0, A = +1: rho [1.5, 1.1, 0.5]: 1.5 > 1.28 clipped high (l = -1.28, grad 0); 1.1 inside (l = -1.1);
#                  0.5 below 0.8 but A > 0 so min picks rho*A (l = -0.5, not clipped)
#   row 1, A = -1: rho [0.5, 0.9, 1.5]: 0.5 < 0.8 clipped low (l = +0.8, grad 0); 0.9 inside (l = 0.9);
#                  1.5 above 1.28 but A < 0 so min picks rho*A = -1.5 (l = 1.5, not clipped)
#   unclipped grad of l = -rho A per token; grpo scales by 1/(|o_i| B) = 1/6

def test_clipping_both_directions():
    rho = [[1.5, 1.1, 0.5], [0.5, 0.9, 1.5]]
    A = torch.tensor([1., -1.])
    logp = torch.tensor(LOGP, requires_grad=True)
    old = logp.detach() - torch.log(torch.tensor(rho))
    loss, m = policy_loss(logp, old, None, A, torch.ones(2, 3), 'grpo', eps_low=0.2, eps_high=0.28)
    loss.backward()
    # value: mean((-1.28 - 1.1 - 0.5) / 3, (0.8 + 0.9 + 1.5) / 3)
    close(loss, ((-1.28 - 1.1 - 0.5) / 3 + (0.8 + 0.9 + 1.5) / 3) / 2)
    close(logp.grad, [[0., -1.1 / 6, -0.5 / 6], [0., 0.9 / 6, 1.5 / 6]])
    close(m['clip_frac_low'], 1 / 6)
    close(m['clip_frac_high'], 1 / 6)
    close(m['ratio_mean'], (1.5 + 1.1 + 0.5 + 0.5 + 0.9 + 1.5) / 6)


# -----------------------------------------------------------------------------
# the KL term, beta = 0.1, A = 0 so only KL contributes; grpo aggregation
#   d = ref - logp = [[0.5, -0.5, (masked 2.0)], [1.0, 0.0, 0.2]]
#   loss = beta * mean_i (sum_t k3(d_it) / |o_i|),  grad = beta * (1 - e^d) / (|o_i| B)

def test_kl_term_value_and_grad():
    beta = 0.1
    d = [[0.5, -0.5, 2.0], [1.0, 0.0, 0.2]]
    k3 = lambda x: math.exp(x) - x - 1
    logp = torch.tensor(LOGP, requires_grad=True)
    ref = logp.detach() + torch.tensor(d)
    loss, m = policy_loss(logp, logp.detach(), ref, torch.zeros(2), MASK, 'grpo', beta=beta)
    loss.backward()
    row0 = (k3(0.5) + k3(-0.5)) / 2
    row1 = (k3(1.0) + k3(0.0) + k3(0.2)) / 3
    close(loss, beta * (row0 + row1) / 2)
    close(m['kl_loss'], beta * (row0 + row1) / 2)
    close(m['kl'], (k3(0.5) + k3(-0.5) + k3(1.0) + k3(0.0) + k3(0.2)) / 5)
    g = [[beta * (1 - math.exp(d[0][t])) / 4 for t in range(2)] + [0.],
         [beta * (1 - math.exp(d[1][t])) / 6 for t in range(3)]]
    close(logp.grad, g)


def test_kimi_with_kl():
    # kimi adds beta * KL aggregated per sequence, the same number as grpo's KL term
    d = [[0.5, -0.5, 2.0], [1.0, 0.0, 0.2]]
    logp = torch.tensor(LOGP, requires_grad=True)
    ref = logp.detach() + torch.tensor(d)
    _, m_kimi = policy_loss(logp, logp.detach(), ref, torch.zeros(2), MASK, 'kimi', beta=0.1)
    _, m_grpo = policy_loss(logp, logp.detach(), ref, torch.zeros(2), MASK, 'grpo', beta=0.1)
    close(m_kimi['kl_loss'], m_grpo['kl_loss'])


# -----------------------------------------------------------------------------
# "the loss is 0, is it training?"

def test_loss_near_zero_at_mu1_but_grad_is_not():
    # group-normalised A sums to 0 in each group; grpo at rho == 1 gives -mean_i A_i = 0 whatever the lengths
    A = group_advantages(torch.tensor([1., 0., 0., 0., 1., 1., 0., 0.]), 4)
    g = torch.Generator().manual_seed(2)
    logp = (-torch.rand(8, 5, generator=g)).requires_grad_()
    mask = torch.ones(8, 5)
    mask[0, 3:] = 0
    mask[5, 1:] = 0
    loss, _ = policy_loss(logp, logp.detach(), None, A, mask, 'grpo')
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert logp.grad.abs().sum() > 0.1
    assert "mu=1" in LOSS_NEAR_ZERO_NOTE and "\n" not in LOSS_NEAR_ZERO_NOTE


# -----------------------------------------------------------------------------
# micro-batches: given the batch's normalisers, their losses add up to the batch loss

def _random_batch(seed, B=4, T=5):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g)).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(B, T, generator=g)    # far enough from 1 that some tokens clip
    A = torch.randn(B, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3)                  # bool mask
    mask[:, 0] = True
    return logp, old, A, mask


def test_dapo_equals_bnpo_with_local_count():
    logp, old, A, mask = _random_batch(3)
    l_bnpo, _ = policy_loss(logp, old, None, A, mask, 'bnpo')
    g_bnpo = torch.autograd.grad(l_bnpo, logp)[0]
    l_dapo, _ = policy_loss(logp, old, None, A, mask, 'dapo', global_tokens=int(mask.sum()))
    g_dapo = torch.autograd.grad(l_dapo, logp)[0]
    close(l_dapo, l_bnpo)
    close(g_dapo, g_bnpo)


def test_dapo_microbatches_sum_to_full_bnpo():
    logp, old, A, mask = _random_batch(4)
    full, _ = policy_loss(logp, old, None, A, mask, 'bnpo')
    g_full = torch.autograd.grad(full, logp)[0]
    n = mask.sum()                                               # tensor count, as after an all_reduce
    parts = [policy_loss(logp[s], old[s], None, A[s], mask[s], 'dapo', global_tokens=n)[0]
             for s in (slice(0, 1), slice(1, 4))]
    total = parts[0] + parts[1]
    g_total = torch.autograd.grad(total, logp)[0]
    close(total, full)
    close(g_total, g_full)


def test_bnpo_microbatches_sum_to_batch_token_mean():
    # completions of 5, 1, 2 and 3 tokens; micro-batches [row 0] (5 tokens) and [rows 1-3] (6 tokens)
    logp, old, A, _ = _random_batch(6)
    mask = torch.arange(5) < torch.tensor([5, 1, 2, 3])[:, None]          # (4, 5)
    # the batch token mean, by hand: l_it = -min(rho A, clip(rho, 0.8, 1.2) A), summed over 11 tokens / 11
    rho = torch.exp(logp - old)
    l = -torch.minimum(rho * A[:, None], rho.clamp(0.8, 1.2) * A[:, None])
    token_mean = (l * mask).sum() / 11
    g_mean = torch.autograd.grad(token_mean, logp)[0]
    mbs = (slice(0, 1), slice(1, 4))
    parts = [policy_loss(logp[s], old[s], None, A[s], mask[s], 'bnpo', batch_tokens=11)[0] for s in mbs]
    close(sum(parts), token_mean)
    close(torch.autograd.grad(sum(parts), logp)[0], g_mean)
    # the old recipe, each micro-batch's own token mean weighted by its share of rows, is not the token mean:
    # it weighs row 0's tokens by 1/4 / 5 = 1/20 and the others' by 3/4 / 6 = 1/8 instead of 1/11 each
    old_recipe = sum(policy_loss(logp[s], old[s], None, A[s], mask[s], 'bnpo')[0] * w
                     for s, w in zip(mbs, (1 / 4, 3 / 4)))
    assert abs(float(old_recipe.detach() - token_mean.detach())) > 1e-3


@pytest.mark.parametrize('loss_type', LOSS_TYPES)
def test_microbatches_sum_to_whole_batch(loss_type):
    # what the trainer relies on: every loss type, the KL term included, micro-batches of unequal size
    logp, old, A, mask = _random_batch(7)
    ref = logp.detach() + 0.2 * torch.randn(4, 5, generator=torch.Generator().manual_seed(8))
    n = mask.sum()                                               # tensor counts, as the trainer has them
    kw = dict(loss_type=loss_type, beta=0.05, tau=0.5, max_len=7, global_tokens=n)
    whole, _ = policy_loss(logp, old, ref, A, mask, **kw)
    g_whole = torch.autograd.grad(whole, logp)[0]
    total = sum(policy_loss(logp[s], old[s], ref[s], A[s], mask[s], batch_rows=4, batch_tokens=n, **kw)[0]
                for s in (slice(0, 1), slice(1, 4)))
    close(total, whole)
    close(torch.autograd.grad(total, logp)[0], g_whole)


# -----------------------------------------------------------------------------
# the loss from the hidden states (chunked over rows and vocabulary) against the logits built in full

HB, HT, HC, HV = 4, 6, 16, 37    # 24 token rows; V = 37 spans three vocabulary blocks of 16, the last ragged


def hidden_batch(seed=0, dtype=torch.float32):
    """hidden (B, T, C), head W (V, C), tokens, old/ref log-probs ~0.5 nats off (both clip bounds bind), A of both
    signs, a mask with holes and one sequence with no trained token."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(HB, HT, HC, generator=g).to(dtype)
    W = (0.7 * torch.randn(HV, HC, generator=g)).to(dtype)
    tokens = torch.randint(0, HV, (HB, HT), generator=g)
    with torch.no_grad():
        logp = torch.log_softmax(h.float() @ W.float().T, -1).gather(-1, tokens[..., None])[..., 0]
    old = logp + 0.5 * torch.randn(HB, HT, generator=g)
    ref = logp + 0.5 * torch.randn(HB, HT, generator=g)
    A = torch.tensor([1.0, -0.5, 0.7, -1.2])
    mask = (torch.rand(HB, HT, generator=g) > 0.25).float()
    mask[3] = 0
    return h, W, tokens, old, ref, A, mask


def full_logits_reference(h, W, tokens, *args, **kw):
    """The slow twin: logits = h W^T in full, log_softmax, policy_loss, autograd; entropy -sum p log p by hand."""
    h, W = h.detach().float().requires_grad_(), W.detach().float().requires_grad_()
    logits = h @ W.T                                                              # (B, T, V)
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]    # (B, T)
    loss, metrics = policy_loss(logp, *args, **kw)
    loss.backward()
    p = torch.softmax(logits.detach(), -1)
    ent = -(p * p.log()).sum(-1)                                                  # (B, T)
    mask = args[-1]
    metrics['entropy'] = (ent * mask).sum() / mask.sum()
    return loss.detach(), metrics, h.grad, W.grad


def chunked(h, W, tokens, *args, **kw):
    h, W = h.detach().requires_grad_(), W.detach().requires_grad_()
    loss, metrics = loss_from_hidden(h, W, tokens, *args, **kw)
    loss.backward()
    return loss.detach(), metrics, h.grad, W.grad


@pytest.mark.parametrize('chunks', [(5, 16), (1024, 4096)], ids=['many_blocks', 'one_block'])
@pytest.mark.parametrize('on_policy', [False, True], ids=['old', 'on_policy'])
@pytest.mark.parametrize('beta', [0.0, 0.04])
@pytest.mark.parametrize('loss_type', LOSS_TYPES)
def test_loss_from_hidden_equals_full_logits(loss_type, beta, on_policy, chunks):
    """Value, every metric (entropy included) and the gradients to hidden and to the head, within 1e-5 in fp32."""
    h, W, tokens, old, ref, A, mask = hidden_batch()
    old = None if on_policy else old
    kw = dict(loss_type=loss_type, beta=beta, eps_low=0.2, eps_high=0.28, tau=0.5, max_len=HT + 2,
              global_tokens=37)
    loss_r, met_r, dh_r, dW_r = full_logits_reference(h, W, tokens, old, ref, A, mask, **kw)
    loss_c, met_c, dh_c, dW_c = chunked(h, W, tokens, old, ref, A, mask, chunk_rows=chunks[0],
                                        chunk_vocab=chunks[1], **kw)
    close(loss_c, loss_r)
    close(dh_c, dh_r)
    close(dW_c, dW_r)
    assert met_c.keys() == met_r.keys()
    for k in met_r:
        close(met_c[k], met_r[k])
    assert not met_c['entropy'].requires_grad


@pytest.mark.parametrize('loss_type', LOSS_TYPES)
def test_loss_from_hidden_microbatches_sum_to_whole_batch(loss_type):
    h, W, tokens, old, ref, A, mask = hidden_batch(1)
    n = mask.sum()
    kw = dict(loss_type=loss_type, beta=0.04, tau=0.5, max_len=HT + 2, global_tokens=n, chunk_rows=5,
              chunk_vocab=16)
    whole, _, dh, dW = chunked(h, W, tokens, old, ref, A, mask, **kw)
    hh, WW = h.detach().requires_grad_(), W.detach().requires_grad_()
    total = sum(loss_from_hidden(hh[s], WW, tokens[s], old[s], ref[s], A[s], mask[s], batch_rows=HB,
                                 batch_tokens=n, **kw)[0] for s in (slice(0, 1), slice(1, 4)))
    total.backward()
    close(total, whole)
    close(hh.grad, dh)
    close(WW.grad, dW)


def test_loss_from_hidden_bf16_is_fp32_math_on_the_bf16_inputs():
    """bf16 hidden and head are upcast a block at a time: the fp32 result of the same (rounded) inputs, the
    gradients in bf16."""
    h, W, tokens, old, ref, A, mask = hidden_batch(2, torch.bfloat16)
    kw = dict(loss_type='grpo', beta=0.04, chunk_rows=5, chunk_vocab=16)
    loss_r, _, dh_r, dW_r = full_logits_reference(h, W, tokens, old, ref, A, mask, loss_type='grpo', beta=0.04)
    loss_c, _, dh_c, dW_c = chunked(h, W, tokens, old, ref, A, mask, **kw)
    assert dh_c.dtype == dW_c.dtype == torch.bfloat16
    close(loss_c, loss_r)
    torch.testing.assert_close(dh_c.float(), dh_r, atol=1e-2, rtol=1e-2)   # one bf16 rounding of the gradient
    torch.testing.assert_close(dW_c.float(), dW_r, atol=1e-2, rtol=1e-2)


def test_loss_from_hidden_frozen_head_and_bad_shapes():
    h, W, tokens, old, ref, A, mask = hidden_batch(3)
    hh = h.detach().requires_grad_()
    loss_from_hidden(hh, W, tokens, old, ref, A, mask, chunk_rows=5, chunk_vocab=16)[0].backward()
    _, _, dh_r, _ = full_logits_reference(h, W, tokens, old, ref, A, mask)
    close(hh.grad, dh_r)                     # the head gets no gradient and needs none
    with pytest.raises(ValueError, match="lm_head_weight"):
        loss_from_hidden(h, W[:, :-1], tokens, old, ref, A, mask)
    with pytest.raises(ValueError, match="tokens"):
        loss_from_hidden(h, W, tokens[:, :-1], old, ref, A, mask)


# -----------------------------------------------------------------------------
# bad inputs

def test_policy_loss_bad_inputs():
    logp = torch.zeros(2, 3)
    A = torch.zeros(2)
    ok = dict(old_logp=logp, ref_logp=None, advantages=A, mask=MASK)
    with pytest.raises(ValueError, match="unknown loss_type"):
        policy_loss(logp, **ok, loss_type='ppo')
    with pytest.raises(ValueError, match="global_tokens"):
        policy_loss(logp, **ok, loss_type='dapo')
    with pytest.raises(ValueError, match="global_tokens must be positive"):
        policy_loss(logp, **ok, loss_type='dapo', global_tokens=0)
    with pytest.raises(ValueError, match="max_len"):
        policy_loss(logp, **ok, loss_type='dr_grpo')
    with pytest.raises(ValueError, match="tau"):
        policy_loss(logp, **ok, loss_type='kimi', tau=0.0)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, **ok, beta=0.1)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, logp, None, torch.zeros(3), MASK)
    with pytest.raises(ValueError, match="mask"):
        policy_loss(logp, logp, None, A, torch.ones(2, 4))
    with pytest.raises(ValueError, match="old_logp"):
        policy_loss(logp, torch.zeros(2, 4), None, A, MASK)
    with pytest.raises(ValueError, match=r"logp must be \(B, T\)"):
        policy_loss(torch.zeros(2, 3, 1), torch.zeros(2, 3, 1), None, A, MASK)
    with pytest.raises(ValueError, match="tokens"):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_batch_normalisers_must_be_positive():
    logp = torch.zeros(2, 3)
    ok = dict(old_logp=logp, ref_logp=None, advantages=torch.zeros(2), mask=MASK)
    with pytest.raises(ValueError, match="batch_rows must be positive, got 0"):
        policy_loss(logp, **ok, batch_rows=0)
    with pytest.raises(ValueError, match="batch_tokens must be positive, got -3"):
        policy_loss(logp, **ok, loss_type='bnpo', batch_tokens=-3)
    with pytest.raises(ValueError, match="global_tokens must be positive"):
        policy_loss(logp, **ok, loss_type='grpo', global_tokens=0.0)
    # a tensor count is not read (that would sync the device): it passes the check
    policy_loss(logp, **ok, loss_type='bnpo', batch_rows=torch.tensor(2), batch_tokens=torch.tensor(0.))
