"""
DeepSeek-V3 multi-token prediction (model.MTP): depth 0 allocates nothing, a few Adam steps lower the MTP loss
on a fixed batch, and the loss is the one the module docstring describes (checked by recomputing depth 1).

Run: python -m pytest tests/test_mtp.py -q
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from model import GPT, ModelConfig  # noqa: E402

torch.set_num_threads(1)  # tiny shapes: extra threads only spin on a shared 2-core box
V = 32


def cfg(**kw):
    base = dict(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, mtp_depth=2,
                mtp_loss_weight=0.3)
    base.update(kw)
    return ModelConfig(**base)


def pattern_batch():
    """A fixed batch of repeated random 5-token patterns: t_{i+2}, t_{i+3} are predictable from the prefix."""
    g = torch.Generator().manual_seed(0)
    pats = torch.randint(0, V, (4, 5), generator=g)
    seq = pats.repeat(1, 5)                                            # (4, 25)
    return seq[:, :-1], seq[:, 1:]


def test_depth_zero_has_no_mtp_parameters():
    model = GPT(cfg(mtp_depth=0))
    assert model.mtp is None and not any('mtp' in n for n, _ in model.named_parameters())
    x, y = pattern_batch()
    model.train()
    _, loss = model(x, y)
    assert model.mtp_loss is None
    torch.testing.assert_close(loss, F.cross_entropy(model(x)[0].reshape(-1, V), y.reshape(-1)))
    n_with = GPT(cfg(mtp_depth=1)).num_params()
    assert n_with > model.num_params()


def test_mtp_loss_definition():
    """Depth 1 at position i: [Emb(t_{i+1}); h_i] through M_1 and its block, scored against t_{i+2}."""
    torch.manual_seed(0)
    model = GPT(cfg(mtp_depth=1, moe_intermediate_size=0)).train()
    x, y = pattern_batch()
    logits, loss = model(x, y)
    ce = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
    torch.testing.assert_close(loss, ce + 0.3 * model.mtp_loss)
    # recompute depth 1 by hand from the main model's final hidden states
    h = model.embed_tokens(x)
    for block in model.layers:
        h = block(h, model.rope_cos[:24][None], model.rope_sin[:24][None])
    h = model.norm(h)
    m = model.mtp[0]
    S = x.shape[1] - 1
    z = m.eh_proj(torch.cat([m.enorm(model.embed_tokens(x[:, 1:])), m.hnorm(h[:, :S])], dim=-1))
    z = m.block(z, model.rope_cos[:S][None], model.rope_sin[:S][None])
    want = F.cross_entropy(model.lm_head(m.norm(z)).reshape(-1, V), y[:, 1:].reshape(-1))
    torch.testing.assert_close(model.mtp_loss, want)


def test_adam_steps_lower_mtp_loss():
    torch.manual_seed(0)
    model = GPT(cfg(attn='mla', ffn='moe', kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                    v_head_dim=8, n_routed_experts=4, moe_intermediate_size=16)).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = pattern_batch()
    losses = []
    for _ in range(15):
        _, loss = model(x, y)
        losses.append(model.mtp_loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.8 * losses[0], losses
    # every MTP parameter was trained
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if n.startswith('mtp.') and 'experts.' not in n)
