"""
The fused GRPO loss kernel in fused_loss.py (loss_from_logits, logprobs_from_logits) against the PyTorch reference
policy_loss(token_logprobs(logits, tokens), ...) with autograd: the loss, every metric and the logits' gradient,
for every loss_type, beta 0 and > 0, vocabularies that are not a power of two and span many kernel blocks,
masked tokens (and a sequence with none), fp32 within 1e-5 and bf16 within one bf16 rounding of the gradient;
and micro-batches given the batch's normalisers summing to the whole batch's loss, as the trainer sums them.

Without CUDA the kernels run in Triton's interpreter (numpy on the CPU, slow), so shapes are tiny (B*T = 24).
TRITON_INTERPRET=1 must be set before anything imports triton (it is read when a kernel is decorated): this
module sets it at the top, and tests/conftest.py sets it for `pytest tests`, where other test modules import
fused_loss (hence triton) first. With CUDA the same tests run the compiled kernels on the GPU.

Run:  TRITON_INTERPRET=1 python -m pytest tests/test_grpo_triton.py -q     (CPU, about 15 s)
      python -m pytest tests -q                                            (works too)
"""
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ['TRITON_INTERPRET'] = '1'  # before the first import of triton, which grpo does
pytest.importorskip('triton')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fused_loss import logprobs_from_logits, loss_from_logits, select_impl, triton_interpreted  # noqa: E402
from grpo import LOSS_TYPES, policy_loss, token_logprobs  # noqa: E402

if not CUDA and not triton_interpreted():
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on the "
                       "CPU: set it in the environment (tests/conftest.py does for pytest)")

DEVICE = 'cuda' if CUDA else 'cpu'
B, T = 4, 6        # 24 token rows


def block(V):
    # the kernel's block over V, always smaller than V: 37, 100 and 1000 take 2, 4 and 8 blocks, the last ragged
    return 32 if V <= 100 else 128


def make_batch(V, dtype=torch.float32, seed=0):
    """Random logits (B, T, V) as a strided view (the usual logits[:, :-1]) and rollout tensors around them:
    old/ref log-probs off by ~0.5 nats so both clip bounds bind, advantages of both signs, a mask with holes
    and one sequence without any trained token."""
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(B, T + 1, V, generator=g)).to(dtype)[:, :-1]    # (B, T, V), not contiguous
    tokens = torch.randint(0, V, (B, T), generator=g)                         # (B, T)
    logp = token_logprobs(logits, tokens)                                     # (B, T)
    old_logp = logp + 0.5 * torch.randn(B, T, generator=g)
    ref_logp = logp + 0.5 * torch.randn(B, T, generator=g)
    advantages = torch.tensor([1.0, -0.5, 0.7, -1.2])                         # (B,)
    mask = (torch.rand(B, T, generator=g) > 0.25).float()
    mask[0, :2] = 0    # a "prompt" prefix
    mask[3] = 0        # a sequence with no trainable token (|o_i| counts as 1)
    to = lambda x: x.to(DEVICE)  # noqa: E731
    return to(logits), to(tokens), to(old_logp), to(ref_logp), to(advantages), to(mask)


def reference(logits, tokens, *args, **kw):
    """policy_loss on token_logprobs, gradient by autograd: the slow, obvious twin."""
    logits = logits.detach().requires_grad_()
    loss, metrics = policy_loss(token_logprobs(logits, tokens), *args, **kw)
    loss.backward()
    return loss.detach(), metrics, logits.grad


def fused(logits, tokens, *args, **kw):
    logits = logits.detach().requires_grad_()
    loss, metrics = loss_from_logits(logits, tokens, *args, impl='triton', block_v=block(logits.size(-1)), **kw)
    loss.backward()
    return loss.detach(), metrics, logits.grad


def kwargs(loss_type, beta):
    # dapo: some other micro-batch shares the global count; dr_grpo: a budget longer than T; kimi: tau != 1
    return dict(loss_type=loss_type, beta=beta, eps_low=0.2, eps_high=0.28, tau=0.5, max_len=T + 2,
                global_tokens=37)


def assert_close(a, b, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


# -----------------------------------------------------------------------------
# fp32: value, metrics and gradient within 1e-5


@pytest.mark.parametrize('V', [37, 100, 1000])
@pytest.mark.parametrize('beta', [0.0, 0.04])
@pytest.mark.parametrize('loss_type', LOSS_TYPES)
def test_loss_and_grad_match_reference(loss_type, beta, V):
    logits, tokens, old, ref, adv, mask = make_batch(V)
    # beta == 0 runs without a reference model, as the trainer does
    ref = ref if beta else None
    loss_r, metrics_r, grad_r = reference(logits, tokens, old, ref, adv, mask, **kwargs(loss_type, beta))
    loss_f, metrics_f, grad_f = fused(logits, tokens, old, ref, adv, mask, **kwargs(loss_type, beta))
    assert_close(loss_f, loss_r)
    assert metrics_f.keys() == metrics_r.keys()
    for k in metrics_r:
        assert_close(metrics_f[k], metrics_r[k])
    assert grad_f.dtype == logits.dtype and grad_f.shape == logits.shape
    assert_close(grad_f, grad_r)
    # rows of untrained tokens get exactly zero gradient (kimi's sequence term is masked too)
    assert (grad_f[mask == 0] == 0).all()
    # the batch exercises both clip bounds and both signs of the gradient
    if loss_type != 'kimi':
        assert metrics_r['clip_frac_low'] > 0 and metrics_r['clip_frac_high'] > 0


def test_kl_metric_without_kl_loss():
    # beta == 0 with a reference given: no KL in the loss, but the drift is still reported
    logits, tokens, old, ref, adv, mask = make_batch(100)
    loss_r, metrics_r, grad_r = reference(logits, tokens, old, ref, adv, mask, **kwargs('grpo', 0.0))
    loss_f, metrics_f, grad_f = fused(logits, tokens, old, ref, adv, mask, **kwargs('grpo', 0.0))
    assert 'kl' in metrics_f and metrics_f['kl_loss'] == 0
    assert_close(metrics_f['kl'], metrics_r['kl'])
    assert_close(grad_f, grad_r)


def test_on_policy_ratio_one():
    # mu = 1: old_logp == logp, so rho == 1 everywhere (the tie between the clip branches) and the grpo loss is
    # -mean(A) over sequences with tokens, while the gradient is -A grad logp (LOSS_NEAR_ZERO_NOTE)
    logits, tokens, _, _, adv, mask = make_batch(100)
    old = token_logprobs(logits, tokens)
    loss_r, _, grad_r = reference(logits, tokens, old, None, adv, mask, **kwargs('grpo', 0.0))
    loss_f, metrics_f, grad_f = fused(logits, tokens, old, None, adv, mask, **kwargs('grpo', 0.0))
    assert_close(loss_f, loss_r)
    assert_close(metrics_f['ratio_mean'], torch.tensor(1.0))
    assert_close(grad_f, grad_r)


@pytest.mark.parametrize('V', [37, 1000])
def test_logprobs_from_logits(V):
    logits, tokens, *_ = make_batch(V)
    logits = logits.detach().requires_grad_()
    logp = logprobs_from_logits(logits, tokens, impl='triton', block_v=block(V))
    assert logp.dtype == torch.float32 and logp.shape == (B, T)
    assert_close(logp, token_logprobs(logits, tokens))
    # it is differentiable too: d sum(w * logp) / d logits against autograd through token_logprobs
    w = torch.linspace(-1, 1, B * T, device=DEVICE).view(B, T)
    grad_f, = torch.autograd.grad((w * logp).sum(), logits)
    grad_r, = torch.autograd.grad((w * token_logprobs(logits, tokens)).sum(), logits)
    assert_close(grad_f, grad_r)


def test_other_layouts():
    # int32 ids, and logits whose V axis is not contiguous (the wrapper copies them; the gradient keeps the shape)
    logits, tokens, old, ref, adv, mask = make_batch(37)
    logits = logits.transpose(1, 2).contiguous().transpose(1, 2)              # (B, T, V), stride 1 over T
    assert logits.stride(-1) != 1
    loss_r, _, grad_r = reference(logits, tokens, old, ref, adv, mask, **kwargs('dapo', 0.04))
    loss_f, _, grad_f = fused(logits, tokens.int(), old, ref, adv, mask, **kwargs('dapo', 0.04))
    assert_close(loss_f, loss_r)
    assert_close(grad_f, grad_r)


def test_default_block_and_large_logits():
    # the wrapper's own block choice (one block here), and logits far from 0 (the online max keeps exp finite)
    logits, tokens, old, ref, adv, mask = make_batch(100)
    logits = logits + 1e4
    loss_r, _, grad_r = reference(logits, tokens, old, ref, adv, mask, **kwargs('bnpo', 0.04))
    logits = logits.detach().requires_grad_()
    loss_f, _ = loss_from_logits(logits, tokens, old, ref, adv, mask, impl='triton', **kwargs('bnpo', 0.04))
    loss_f.backward()
    assert torch.isfinite(loss_f)
    assert_close(loss_f, loss_r, atol=1e-4, rtol=1e-4)  # |logits| ~ 1e4: fp32 keeps ~1e-3 absolute in z
    assert_close(logits.grad, grad_r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('loss_type', LOSS_TYPES)
def test_microbatches_sum_to_whole_batch(loss_type):
    # micro-batches of 1 and 3 rows through the kernel, each given the whole batch's normalisers, add up to the
    # reference loss of the whole batch, value and logits' gradient
    logits, tokens, old, ref, adv, mask = make_batch(37)
    n = mask.sum()                                                            # a tensor count, as in training
    kw = {**kwargs(loss_type, 0.04), 'global_tokens': n}
    loss_r, _, grad_r = reference(logits, tokens, old, ref, adv, mask, **kw)
    logits = logits.detach().requires_grad_()
    total = sum(loss_from_logits(logits[s], tokens[s], old[s], ref[s], adv[s], mask[s], batch_rows=B,
                                 batch_tokens=n, impl='triton', block_v=block(37), **kw)[0]
                for s in (slice(0, 1), slice(1, B)))
    total.backward()
    assert_close(total.detach(), loss_r)
    assert_close(logits.grad, grad_r)


# -----------------------------------------------------------------------------
# bf16 logits: the log-probs are computed in fp32 from the same bf16 values, so the loss still agrees to ~1e-6;
# the gradient is rounded to bf16 by both paths, so it agrees to one bf16 rounding (relative 2^-8, allowed 2^-7)


@pytest.mark.parametrize('loss_type,beta', [('grpo', 0.04), ('kimi', 0.0)])
def test_bf16(loss_type, beta):
    logits, tokens, old, ref, adv, mask = make_batch(100, dtype=torch.bfloat16)
    ref = ref if beta else None
    loss_r, metrics_r, grad_r = reference(logits, tokens, old, ref, adv, mask, **kwargs(loss_type, beta))
    loss_f, metrics_f, grad_f = fused(logits, tokens, old, ref, adv, mask, **kwargs(loss_type, beta))
    assert grad_f.dtype == torch.bfloat16
    assert_close(loss_f, loss_r, atol=1e-5, rtol=1e-5)
    for k in metrics_r:
        assert_close(metrics_f[k], metrics_r[k])
    assert_close(grad_f, grad_r, atol=1e-7, rtol=2 ** -7)
    assert_close(logprobs_from_logits(logits, tokens, impl='triton', block_v=block(100)),
                 token_logprobs(logits, tokens))


# -----------------------------------------------------------------------------
# the selector and the errors


@pytest.mark.skipif(CUDA, reason="checks the CPU choice")
def test_auto_picks_torch_on_cpu():
    logits, tokens, old, ref, adv, mask = make_batch(37)
    assert select_impl(logits, 'auto') == 'torch'
    assert select_impl(logits, 'torch') == 'torch'
    # auto on CPU is the reference itself, bit for bit
    loss_a, _ = loss_from_logits(logits, tokens, old, ref, adv, mask, **kwargs('grpo', 0.04))
    loss_r, _ = policy_loss(token_logprobs(logits, tokens), old, ref, adv, mask, **kwargs('grpo', 0.04))
    assert torch.equal(loss_a, loss_r)
    assert torch.equal(logprobs_from_logits(logits, tokens), token_logprobs(logits, tokens))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_auto_picks_triton_on_cuda():
    assert select_impl(torch.zeros(1, 1, 2, device='cuda'), 'auto') == 'triton'


def test_errors():
    logits, tokens, old, ref, adv, mask = make_batch(37)
    call = lambda **kw: loss_from_logits(**{**dict(logits=logits, tokens=tokens, old_logp=old,  # noqa: E731
                                                   ref_logp=ref, advantages=adv, mask=mask, impl='triton'), **kw})
    with pytest.raises(ValueError, match='impl'):
        call(impl='cuda')
    with pytest.raises(ValueError, match='expected logits'):
        call(tokens=tokens[:, :-1])
    with pytest.raises(ValueError, match='expected logits'):
        call(logits=logits[0])
    with pytest.raises(TypeError, match='logits must be'):
        call(logits=logits.double())
    with pytest.raises(TypeError, match='tokens must be'):
        call(tokens=tokens.float())
    with pytest.raises(ValueError, match='old_logp'):
        call(old_logp=old[:, :-1])
    with pytest.raises(ValueError, match='advantages'):
        call(advantages=adv[:-1])
    with pytest.raises(ValueError, match='needs ref_logp'):
        call(ref_logp=None, beta=0.1)
    with pytest.raises(ValueError, match='global_tokens'):
        call(loss_type='dapo')
    with pytest.raises(ValueError, match='block_v'):
        call(block_v=48)


def test_out_of_range_id_reads_nan():
    # the kernel does not sync to check ids on the host; a bad id must poison its row, not read out of bounds
    logits, tokens, *_ = make_batch(37)
    tokens = tokens.clone()
    tokens[1, 2], tokens[2, 3] = 37, -1
    logp = logprobs_from_logits(logits, tokens, impl='triton', block_v=block(37))
    bad = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
    bad[1, 2] = bad[2, 3] = True
    assert logp[bad].isnan().all() and logp[~bad].isfinite().all()


@pytest.mark.parametrize('loss_type', LOSS_TYPES)
def test_on_policy_without_old_logp_equals_the_reference_with_old_equal_to_logp(loss_type):
    """old_logp=None is the trainer's mu = 1 path: rho == 1 exactly, gradient -A grad log pi (+ the KL's)."""
    logits, tokens, _, ref, adv, mask = make_batch(100)

    def on_policy_reference():
        x = logits.detach().requires_grad_()
        lp = token_logprobs(x, tokens)
        loss, _ = policy_loss(lp, lp.detach(), ref, adv, mask, **kwargs(loss_type, 0.1))
        loss.backward()
        return loss.detach(), x.grad
    want_loss, want_grad = on_policy_reference()
    got_loss, metrics, got_grad = fused(logits, tokens, None, ref, adv, mask, **kwargs(loss_type, 0.1))
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-5)
    assert float(metrics['ratio_mean']) == pytest.approx(1.0, abs=1e-6)
