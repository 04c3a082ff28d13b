"""
Cached generation against its slow twin (generate_naive: no cache, no shared prefill, every row to the end):
greedy and sampled, batch generator and per-row seeds, ragged prompts, stop tokens, G > 1, dense GQA and
MLA + MoE, the eager and the static-shape decode step; plus that the shared prefill and the leaving of finished
rows really happen, and GPT.forward's return_hidden.

Run: python -m pytest tests/test_sample.py -q
"""
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


def test_pick_when_the_uniform_rounds_up_to_the_total():
    # u = 1 puts u * total at the cdf's end, past every token (searchsorted answers V): pick must still return a
    # token of positive probability, the last one that adds mass, whatever the filtered tail behind it
    for logits, k, want in (([2.0, 1.0, 0.5, -1.0], 2, 1), ([2.0, 1.0, 0.5, -1.0, 0.0, 1.5], 4, 5)):
        tok, lp = pick(torch.tensor([logits]), 0.7, k, 1.0, torch.ones(1))
        assert tok.item() == want and torch.isfinite(lp).all()


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


# -----------------------------------------------------------------------------
# the fast rollout paths: shared prefill, rows leaving the batch, the static step, all against generate_naive

STOPS = {EOS, 7, 9}   # with the tiny model some rows hit one of these early and others run to the end


@pytest.mark.parametrize('static', [False, True], ids=['eager', 'static'])
@pytest.mark.parametrize('rand', ['generator', 'seeds'])
@pytest.mark.parametrize('sampling', [dict(temperature=0), dict(temperature=0.8, top_k=20, top_p=0.95),
                                      dict(temperature=1.0)], ids=['greedy', 'filtered', 't1'])
@pytest.mark.parametrize('kw', [{}, MLA_MOE], ids=['dense', 'mla_moe'])
def test_group_rollouts_equal_naive(kw, sampling, rand, static):
    """G = 4 samples of 6 ragged prompts: token for token and logprob within 1e-5 of the slow twin, which
    prefills every row and keeps finished rows in the batch; the random stream is the same whether a batch
    generator or a generator per row draws it."""
    m = tiny_model(**kw)
    prompts, G = ragged_prompts(6, seed=1), 4
    rows = [p for p in prompts for _ in range(G)]
    if rand == 'generator':
        a = group_rollouts(m, prompts, G, 40, STOPS, PAD, generator=torch.Generator().manual_seed(3), static=static,
                           **sampling)
        b = generate_naive(m, rows, 40, STOPS, PAD, generator=torch.Generator().manual_seed(3), **sampling)
    else:
        seeds = list(range(100, 100 + len(rows)))
        a = generate(m, rows, 40, STOPS, PAD, seeds=seeds, static=static, **sampling)
        b = generate_naive(m, rows, 40, STOPS, PAD, seeds=seeds, **sampling)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.lengths, b.lengths) and torch.equal(a.finished, b.finished)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    if sampling['temperature'] > 0:  # rows stopped at different steps: the batch shrank while others went on
        assert a.finished.any() and (a.lengths == 40).any(), a.lengths


@pytest.mark.parametrize('static', [False, True], ids=['eager', 'static'])
@pytest.mark.parametrize('kw', [{}, MLA_MOE], ids=['dense', 'mla_moe'])
def test_prefill_once_per_prompt_and_finished_rows_leave(kw, static):
    """The model sees the 3 distinct prompts once in the prefill (not their 3 x 8 rows), and later decode steps
    run fewer rows than 24 once rows have stopped: read off the batch size of every forward call."""
    m = tiny_model(**kw)
    sizes = []
    m.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape))
    gen = group_rollouts(m, ragged_prompts(3, seed=4), 8, 40, STOPS, PAD, temperature=1.0,
                         generator=torch.Generator().manual_seed(0), static=static)
    assert sizes[0][0] == 3 and sizes[0][1] > 1              # the prefill: distinct prompts, whole prompt
    decode = [s[0] for s in sizes[1:]]
    assert decode[0] == 24 and min(decode) < 24, decode
    assert min(decode) >= int((~gen.finished).sum())          # an unfinished row never leaves
    assert decode == sorted(decode, reverse=True)


@pytest.mark.parametrize('kw', [{}, MLA_MOE], ids=['dense', 'mla_moe'])
@torch.no_grad()
def test_cache_select_equals_separate_prefills(kw):
    """KVCache.select after one prefill of 2 prompts holds what 5 separate prefills would (rows 0,0,1,1,0)."""
    m = tiny_model(**kw)
    x = torch.randint(2, V, (2, 7))
    rows = torch.tensor([0, 0, 1, 1, 0])
    a, b = m.new_cache(2, 10), m.new_cache(5, 10)
    m(x, cache=a)
    m(x[rows], cache=b)
    a.select(rows)
    assert a.batch_size == 5
    for la, lb in zip(a.layers, b.layers):
        assert la.keys() == lb.keys()
        for k in la:
            torch.testing.assert_close(la[k], lb[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize('kw', [{}, MLA_MOE], ids=['dense', 'mla_moe'])
@torch.no_grad()
def test_return_hidden_is_what_lm_head_reads(kw):
    """return_hidden gives the final-norm states: lm_head of them is the logits, sliced alike; the MoE balance
    loss is still recorded."""
    m = tiny_model(**kw).train()
    x = torch.randint(2, V, (3, 20))
    for s in (None, slice(7, 19)):
        logits, _ = m(x, logits_slice=s)
        aux = m.aux_loss
        h, loss = m(x, logits_slice=s, return_hidden=True)
        assert loss is None and h.shape == (*logits.shape[:2], m.config.n_embd)
        torch.testing.assert_close(m.lm_head(h), logits, atol=0, rtol=0)
        if kw:
            torch.testing.assert_close(m.aux_loss, aux)
    with pytest.raises(ValueError, match='targets'):
        m(x, x, return_hidden=True)
