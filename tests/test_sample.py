"""Cached generation against its slow twin. Run: python -m pytest tests/test_sample.py -q"""
import pytest
import torch

from model import GPT, ModelConfig
from sample import generate, generate_naive, group_rollouts, filter_logits, pick

V, PAD, EOS = 50, 0, 1


def tiny_model(**kw):
    torch.manual_seed(0)
    kw = {'attn': 'gqa', 'ffn': 'dense', **kw}  # a dense GQA model unless a test asks for MLA/MoE
    cfg = ModelConfig(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, **kw)
    m = GPT(cfg).eval()
    # bigger weights than the 0.02 init so that logits are far from uniform and the stop token gets hit
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    return m


def ragged_prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 9, (n,), generator=g).tolist()
    return [torch.randint(2, V, (l,), generator=g).tolist() for l in lens]


@pytest.mark.parametrize('B', [1, 3, 8])
def test_greedy_cached_equals_naive(B):
    m = tiny_model()
    prompts = ragged_prompts(B, seed=B)
    a = generate(m, prompts, 20, {EOS}, PAD, temperature=0)
    b = generate_naive(m, prompts, 20, {EOS}, PAD, temperature=0)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.lengths, b.lengths)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


def test_stop_tokens_and_per_row_finish():
    m = tiny_model()
    prompts = ragged_prompts(16, seed=5)
    # use the token most often generated first as a stop token, so some rows stop early and others do not
    first = generate(m, prompts, 12, set(), PAD, temperature=0).tokens
    stop = int(first[:, 1:4].flatten().mode().values)
    a = generate(m, prompts, 12, {stop, EOS}, PAD, temperature=0)
    b = generate_naive(m, prompts, 12, {stop, EOS}, PAD, temperature=0)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    assert a.finished.any() and (a.lengths < 12).any()
    for r in range(16):
        n = int(a.lengths[r])
        assert a.mask[r, :n].all() and not a.mask[r, n:].any()
        assert (a.tokens[r, n:] == PAD).all()
        if a.finished[r]:
            assert int(a.tokens[r, n - 1]) in (stop, EOS)


def test_row_independent_of_padding_and_batchmates():
    m = tiny_model()
    prompts = ragged_prompts(5, seed=2)
    batch = generate(m, prompts, 10, {EOS}, PAD, temperature=0)
    for r, p in enumerate(prompts):
        alone = generate(m, [p], 10, {EOS}, PAD, temperature=0)
        n = int(alone.lengths[0])
        assert batch.tokens[r, :n].tolist() == alone.tokens[0, :n].tolist()
        torch.testing.assert_close(batch.logprobs[r, :n], alone.logprobs[0, :n], atol=1e-5, rtol=0)


def test_sampling_with_per_row_seeds_matches_naive_and_is_reproducible():
    m = tiny_model()
    prompts = ragged_prompts(6, seed=9)
    kw = dict(temperature=0.8, top_k=20, top_p=0.9, seeds=[11, 12, 13, 14, 15, 16])
    a = generate(m, prompts, 15, {EOS}, PAD, **kw)
    b = generate_naive(m, prompts, 15, {EOS}, PAD, **kw)
    c = generate(m, prompts[:3], 15, {EOS}, PAD, **{**kw, 'seeds': kw['seeds'][:3]})
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    n = c.tokens.shape[1]
    assert torch.equal(a.tokens[:3, :n], c.tokens)  # a row's sample does not depend on its batch-mates


def test_logprobs_match_model_distribution_at_temperature_one():
    m = tiny_model()
    prompts = ragged_prompts(4, seed=4)
    g = torch.Generator().manual_seed(0)
    gen = group_rollouts(m, prompts, 3, 8, {EOS}, PAD, temperature=1.0, generator=g)
    assert gen.tokens.shape[0] == 12
    # recompute each row's logprobs from scratch with the plain model, one row at a time
    for r in range(12):
        p, n = prompts[r // 3], int(gen.lengths[r])
        seq = torch.tensor([p + gen.tokens[r, :n].tolist()])
        logits, _ = m(seq)
        lp = torch.log_softmax(logits[0, len(p) - 1:-1].float(), -1).gather(1, seq[0, len(p):, None]).squeeze(1)
        torch.testing.assert_close(gen.logprobs[r, :n], lp, atol=1e-5, rtol=0)


@torch.no_grad()
def test_pick_draws_from_the_filtered_distribution():
    """pick's inverse-CDF draw against the distribution it samples: 200k draws of a 6-token softmax at T=0.7
    after top-k 4 land within 4 standard errors of each probability, and never on a filtered token."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0, 1.5]]).repeat(200_000, 1)
    tok, lp = pick(logits, 0.7, 4, 1.0, torch.Generator().manual_seed(0))
    p = filter_logits(logits[:1] / 0.7, top_k=4).softmax(-1)[0]          # (6,) reference, zeros off the top 4
    freq = torch.bincount(tok, minlength=6).double() / tok.numel()
    se = (p * (1 - p) / tok.numel()).sqrt()
    assert (freq[p == 0] == 0).all()
    assert ((freq - p).abs() <= 4 * se + 1e-12).all(), (freq, p)
    torch.testing.assert_close(lp, p.log()[tok].float())


def test_filter_logits_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))  # 0.5 < 0.7 <= 0.8: keep the first two
    assert kept.tolist() == [[True, True, False, False]]


def test_empty_prompt_is_a_clear_error():
    with pytest.raises(ValueError, match='empty'):
        generate(tiny_model(), [[3], []], 4, {EOS}, PAD)


def test_chunked_prefill_equals_full_forward():
    """A prompt fed to the cache in two chunks (start > 0, T > 1, no mask) gives the full forward's logits."""
    m = tiny_model()
    x = torch.randint(2, V, (2, 12))
    full, _ = m(x)
    cache = m.new_cache(2, 12)
    a, _ = m(x[:, :5], cache=cache, start=0)
    b, _ = m(x[:, 5:], cache=cache, start=5)
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-5, rtol=1e-5)


MLA_MOE = dict(attn='mla', ffn='moe', kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
               n_routed_experts=4, moe_intermediate_size=16, first_k_dense_replace=1, aux_loss_alpha=0.01)


@pytest.mark.parametrize('kw', [{}, MLA_MOE], ids=['dense', 'mla_moe'])
@torch.no_grad()
def test_logits_slice_equals_slicing_the_full_logits(kw):
    """logits_slice (the RL trainer's response positions) gives exactly those columns of the full logits, and
    the MoE balance loss of the forward is still recorded."""
    m = tiny_model(**kw).train()  # train mode: MoE computes aux_loss, and no dropout is configured
    x = torch.randint(2, V, (3, 20))
    full, _ = m(x)
    aux_full = m.aux_loss
    for s in (slice(7, 19), slice(0, 1), slice(19, 20), slice(None)):
        part, loss = m(x, logits_slice=s)
        assert loss is None and part.shape == full[:, s].shape
        torch.testing.assert_close(part, full[:, s], atol=1e-6, rtol=0)
        if kw:
            assert m.aux_loss is not None
            torch.testing.assert_close(m.aux_loss, aux_full)
        else:
            assert m.aux_loss is None
    with pytest.raises(ValueError, match='targets'):
        m(x, x, logits_slice=slice(7, 19))
