"""
Multi-head Latent Attention (mla.py): the absorbed path against the naive one (prefill, cached decode, chunked
prefill, left padding, gradients) and the cache footprint read off the allocated KVCache tensors.

Run: python -m pytest tests/test_mla.py -q
"""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from layers import rope_table  # noqa: E402
from model import GPT, ModelConfig  # noqa: E402
from mla import kv_cache_bytes_per_token, yarn_rope_table  # noqa: E402

torch.set_num_threads(1)  # tiny shapes: extra threads only spin on a shared 2-core box
V = 64


def cfg(**kw):
    base = dict(vocab_size=V, block_size=48, n_layer=2, n_head=4, n_embd=32, attn='mla', kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, ffn='dense')
    base.update(kw)
    return ModelConfig(**base)


def twins(**kw):
    """The same weights behind a naive and an absorbed model."""
    torch.manual_seed(0)
    naive = GPT(cfg(mla_impl='naive', **kw)).eval()
    absorb = GPT(cfg(mla_impl='absorb', **kw)).eval()
    absorb.load_state_dict(naive.state_dict())
    return naive, absorb


def tokens(B=2, T=20, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


VARIANTS = {'q_lora': dict(q_lora_rank=12), 'no_q_lora': dict(q_lora_rank=0),
            'yarn': dict(q_lora_rank=12, rope_factor=4.0, rope_original_max_pos=12)}


@pytest.mark.parametrize('variant', list(VARIANTS))
@torch.no_grad()
def test_absorbed_prefill_matches_naive(variant):
    naive, absorb = twins(**VARIANTS[variant])
    x = tokens()
    torch.testing.assert_close(absorb(x)[0], naive(x)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize('variant', ['q_lora', 'no_q_lora'])
@torch.no_grad()
def test_cached_decode_matches_naive_and_uncached(variant):
    naive, absorb = twins(**VARIANTS[variant])
    x = tokens(T=16)
    full = naive(x)[0]                                                    # (B, T, V) no cache at all
    for model in (naive, absorb):
        cache = model.new_cache(2, 16)
        steps = [model(x[:, :6], cache=cache)[0]]                         # prefill 6, then one token at a time
        steps += [model(x[:, t:t + 1], cache=cache, start=t)[0] for t in range(6, 16)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_auto_decompresses_without_cache_and_absorbs_with_one():
    """mla_impl='auto' (the tiny presets): an uncached forward is the naive path's, exactly; a cached run keeps
    only the latent buffer and its step-by-step logits equal the naive model's uncached ones."""
    naive, _ = twins(q_lora_rank=12)
    auto = GPT(cfg(mla_impl='auto', q_lora_rank=12)).eval()
    auto.load_state_dict(naive.state_dict())
    x = tokens(T=16)
    full = naive(x)[0]                                                    # (B, T, V)
    assert torch.equal(auto(x)[0], full)
    cache = auto.new_cache(2, 16)
    steps = [auto(x[:, :6], cache=cache)[0]]
    steps += [auto(x[:, t:t + 1], cache=cache, start=t)[0] for t in range(6, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert all(set(layer) == {'kvpe'} for layer in cache.layers)


@torch.no_grad()
def test_cpu_decode_step_with_peaked_attention_and_a_left_padded_row():
    """The absorbed path's CPU decode step (two matmuls over the latent cache, not SDPA's math path): with the
    query and key weights scaled up, so that attention is far from uniform and its scale matters, and a
    left-padded row that must not attend to its pads, each step's logits equal the row's own uncached naive run."""
    naive, absorb = twins(q_lora_rank=0)
    for model in (naive, absorb):
        for block in model.layers:
            block.attn.wq.weight.mul_(8)
            block.attn.wkv_b.weight.mul_(8)
    x = tokens(T=16)
    pad, P = 4, 8                                        # row 1: row 0's tokens after its first 4, left-padded
    xp = torch.stack([x[0], torch.cat([torch.zeros(pad, dtype=torch.long), x[0, pad:]])])   # (2, 16)
    valid = torch.tensor([[True] * 16, [False] * pad + [True] * 12])                        # (2, 16)
    pos = (valid.cumsum(1) - 1).clamp(min=0)                                                # (2, 16)
    cache = absorb.new_cache(2, 16)
    m0 = torch.ones(P, P, dtype=torch.bool).tril() & valid[:, None, :P] | torch.eye(P, dtype=torch.bool)
    steps = [absorb(xp[:, :P], pos=pos[:, :P], mask=m0.unsqueeze(1), cache=cache)[0]]     # prefill (2, P, V)
    for t in range(P, 16):                                                                  # one token a step
        steps.append(absorb(xp[:, t:t + 1], pos=pos[:, t:t + 1], mask=valid[:, None, None, :t + 1], cache=cache,
                            start=t)[0])
    out = torch.cat(steps, dim=1)                                                           # (2, 16, V)
    ref0, ref1 = naive(x[:1])[0], naive(x[:1, pad:])[0]                                     # uncached, unpadded
    attn = naive.layers[0].attn                          # the scores are far from uniform: the test can fail
    assert attn.wq.weight.abs().mean() > 0.1
    torch.testing.assert_close(out[:1], ref0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1:, pad:], ref1, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_chunked_prefill_and_left_padding():
    """start > 0 with T > 1 needs an offset causal mask; a left-padded row with pos/mask equals its unpadded run."""
    for model in twins():
        x = tokens(T=16)
        full = model(x)[0]
        cache = model.new_cache(2, 16)
        chunks = [model(x[:, :5], cache=cache)[0], model(x[:, 5:12], cache=cache, start=5)[0],
                  model(x[:, 12:], cache=cache, start=12)[0]]
        torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)
        # row 1 is row 0's last 12 tokens, left-padded by 4 pad tokens that nobody attends to
        pad = 4
        xp = torch.stack([x[0], torch.cat([torch.zeros(pad, dtype=torch.long), x[0, pad:]])])
        valid = torch.tensor([[True] * 16, [False] * pad + [True] * 12])              # (B, T)
        pos = (valid.cumsum(1) - 1).clamp(min=0)                                      # (B, T)
        mask = torch.ones(16, 16, dtype=torch.bool).tril() & valid[:, None, :]        # (B, T, T)
        mask = mask | torch.eye(16, dtype=torch.bool)  # pad queries see themselves: no all-masked rows
        out = model(xp, pos=pos, mask=mask.unsqueeze(1))[0]
        ref = model(x[:1, pad:])[0]
        torch.testing.assert_close(out[1, pad:], ref[0], atol=1e-5, rtol=0)


def test_absorbed_gradients_match_naive():
    naive, absorb = twins(q_lora_rank=12)
    naive.train(), absorb.train()
    x = tokens()
    for model in (naive, absorb):
        model(x, x)[1].backward()
    for (n, p), (_, q) in zip(naive.named_parameters(), absorb.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=n)


@torch.no_grad()
def test_cache_footprint():
    c = cfg()
    naive, absorb = twins()
    B, L = 2, 16
    for model in (naive, absorb):
        cache = model.new_cache(B, L)
        model(tokens(B=B, T=L), cache=cache)
        model.cache = cache
    # absorbed: per layer one (B, L, kv_lora_rank + qk_rope_head_dim) buffer, the latent and the rope key
    for layer in absorb.cache.layers:
        assert {k: tuple(t.shape) for k, t in layer.items()} == {'kvpe': (B, L, 16 + 8)}
    per_token = absorb.cache.nbytes() / (c.n_layer * B * L * 4)
    assert per_token == c.kv_lora_rank + c.qk_rope_head_dim == 24
    assert absorb.cache.nbytes() == kv_cache_bytes_per_token(c, 4)['mla'] * c.n_layer * B * L
    # naive: decompressed per-head keys (dn + dR) and values (dv)
    assert naive.cache.nbytes() == kv_cache_bytes_per_token(c, 4)['mla_naive'] * c.n_layer * B * L
    assert naive.cache.nbytes() / absorb.cache.nbytes() == 4 * (8 + 8 + 12) / 24


def test_kv_cache_bytes_deepseek_v3():
    """DeepSeek-V2 section 2.1.4, Table 1 (same dims in V3): MLA caches (d_c + d_R) = 576 elements per token per
    layer, as much as GQA with 2.25 groups of d_h = 128."""
    v3 = ModelConfig(n_embd=7168, n_head=128, n_kv_head=8, attn='mla', kv_lora_rank=512, qk_nope_head_dim=128,
                     qk_rope_head_dim=64, v_head_dim=128, q_lora_rank=1536)
    b = kv_cache_bytes_per_token(v3, dtype_bytes=2)
    assert b['mla'] == 576 * 2 and b['mha'] == 2 * 128 * 128 * 2 and b['gqa'] == 2 * 8 * 128 * 2
    assert b['mla_as_gqa_groups'] == 2.25


def test_rope_table_is_the_rounded_float64_value():
    """Every entry is math.cos / math.sin of its float32 angle, rounded once to float32: a fixed function of the
    angle (torch's float32 CPU cos on two threads gave one of two tables per process, EXPERIMENTS.md det)."""
    for dim, n in ((16, 192), (32, 192), (128, 512)):
        cos, sin = rope_table(dim, n, 10000.0)
        inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        ang = torch.cat([torch.outer(torch.arange(n, dtype=torch.float32), inv)] * 2, -1).double().tolist()
        assert torch.equal(cos, torch.tensor([[math.cos(a) for a in r] for r in ang]).float())
        assert torch.equal(sin, torch.tensor([[math.sin(a) for a in r] for r in ang]).float())
    with torch.device('meta'):   # a model built on the meta device gets shapes only
        assert rope_table(16, 8, 10000.0)[0].is_meta


def test_yarn_table_reduces_to_plain_rope_at_long_wavelengths():
    """YaRN keeps the fast dimensions (first columns) and divides the slowest ones' frequency by the factor."""
    c = cfg(rope_factor=4.0, rope_original_max_pos=4096, rope_mscale=1.0, rope_mscale_all_dim=1.0,
            qk_rope_head_dim=64, rope_theta=10000.0, block_size=64)
    cos, sin = yarn_rope_table(c)
    cos0, sin0 = rope_table(64, 64, 10000.0)
    torch.testing.assert_close(cos[:, 0], cos0[:, 0])             # fastest pair untouched (attn factor 1 here)
    t = torch.arange(64.0)
    slow = 1.0 / 10000.0 ** (62 / 64) / 4.0                         # slowest pair interpolated by the factor
    torch.testing.assert_close(cos[:, 31], torch.cos(t * slow))
