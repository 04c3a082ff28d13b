"""
DeepSeek-V3 multi-token prediction (model.MTP): depth 0 allocates nothing, a few Adam steps lower the MTP loss
on a fixed batch, and the loss equals V3 section 2.2's eqs. 21-25 written out position by position (which hidden
state, which token's embedding, which target), independently of GPT._mtp_loss's slicing.

Run: python -m pytest tests/test_mtp.py -q
"""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from model import GPT, ModelConfig  # noqa: E402

torch.set_num_threads(1)  # tiny shapes: extra threads only spin on a shared 2-core box
V = 32


def cfg(**kw):
    base = dict(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, attn='gqa', ffn='dense',
                mtp_depth=2, mtp_loss_weight=0.3)
    base.update(kw)
    return ModelConfig(**base)


def pattern_seq():
    """A fixed batch of repeated random 5-token patterns: t_{i+2}, t_{i+3} are predictable from the prefix."""
    g = torch.Generator().manual_seed(0)
    pats = torch.randint(0, V, (4, 5), generator=g)
    return pats.repeat(1, 5)                                           # (4, 25)


def pattern_batch():
    seq = pattern_seq()
    return seq[:, :-1], seq[:, 1:]                                     # (4, 24) inputs, (4, 24) targets


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


def mtp_loss_by_hand(model, seq, scored):
    """DeepSeek-V3 section 2.2, eqs. 21-25, one position at a time with the paper's 1-based indices.

    seq (B, T+1) holds t_1 .. t_{T+1}; the main model reads t_1 .. t_T. scored[b, j - 1] says whether t_j is a
    training target (False where the targets hold -1). Two deviations of the model are kept so the numbers
    match: its concatenation is [Emb; h] (DeepSeek-V3's released eh_proj layout, see model.MTP), and each
    depth's cross-entropy is the mean over the positions it scores, where eq. 24 writes 1/T.
    """
    B, T = seq.shape[0], seq.shape[1] - 1

    def t(b, j):  # t_j, 1-based
        return int(seq[b, j - 1])

    # h^0_i: the main model's representation of t_1 .. t_i, read at its final norm (model.MTP's docstring)
    seen = {}
    hook = model.norm.register_forward_hook(lambda mod, args, out: seen.update(h=out))
    model(seq[:, :T])
    hook.remove()
    h_prev = {(b, i): seen['h'][b, i - 1] for b in range(B) for i in range(1, T + 1)}
    depth_losses = []
    for k, mod in enumerate(model.mtp, start=1):
        n = T - k  # positions i = 1 .. T - k still have a token t_{i+k+1} to predict
        # eq. 21: h'^k_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]
        rows = []
        for b in range(B):
            row = []
            for i in range(1, n + 1):
                e = model.embed_tokens.weight[t(b, i + k)]                         # (C,)
                row.append(mod.eh_proj(torch.cat([mod.enorm(e), mod.hnorm(h_prev[(b, i)])])))
            rows.append(torch.stack(row))                                         # (n, C)
        h_in = torch.stack(rows)                                                  # (B, n, C)
        # eq. 22: h^k_{1:T-k} = TRM_k(h'^k_{1:T-k}), a causal block over positions 1 .. T-k
        h_out = mod.block(h_in, model.rope_cos[:n][None], model.rope_sin[:n][None])  # (B, n, C)
        h_prev = {(b, i): h_out[b, i - 1] for b in range(B) for i in range(1, n + 1)}
        # eqs. 23-24: P^k_{i+k+1} = OutHead(h^k_i), scored against t_{i+k+1}
        nll = []
        for b in range(B):
            for i in range(1, n + 1):
                if scored[b, i + k]:  # t_{i+k+1} sits at 0-based column i + k
                    logp = torch.log_softmax(model.lm_head(mod.norm(h_out[b, i - 1])), dim=-1)  # (V,)
                    nll.append(-logp[t(b, i + k + 1)])
        depth_losses.append(torch.stack(nll).mean())
    # eq. 25 without lambda: the model multiplies by mtp_loss_weight when it adds the term to the loss
    return torch.stack(depth_losses).mean()


@pytest.mark.parametrize('kw', [{}, dict(attn='mla', ffn='moe', kv_lora_rank=16, qk_nope_head_dim=8,
                                         qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                                         moe_intermediate_size=16, first_k_dense_replace=1)],
                         ids=['dense', 'mla_moe'])
@torch.no_grad()
def test_mtp_loss_matches_the_paper_position_by_position(kw):
    """Depths 1 and 2 against mtp_loss_by_hand, with ragged masked prefixes (row b trains on t_{b+3} ..), so a
    model that combined h_i with the wrong token's embedding, or scored the wrong target, would differ."""
    torch.manual_seed(0)
    model = GPT(cfg(mtp_depth=2, **kw)).train()
    for p in model.parameters():  # larger than the 0.02 init, so that every misalignment moves the loss
        if p.dim() == 2:
            p.mul_(5.0)
    seq = pattern_seq()                                                # (B, T+1) t_1 .. t_{T+1}
    seq[:, -6:] = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(1))  # break the pattern
    x, y = seq[:, :-1], seq[:, 1:].clone()                             # (B, T) each
    for b in range(4):
        y[b, :b + 1] = -1                                              # a prompt the loss must not train on
    scored = torch.cat([torch.zeros(4, 1, dtype=torch.bool), y != -1], dim=1)  # (B, T+1): t_1 is never a target
    logits, loss = model(x, y)
    mtp, aux = model.mtp_loss, model.aux_loss                          # the next forward resets them
    ce = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), ignore_index=-1)
    torch.testing.assert_close(loss, ce + 0.3 * mtp + (aux if aux is not None else 0.0))
    torch.testing.assert_close(mtp, mtp_loss_by_hand(model, seq, scored), atol=1e-5, rtol=1e-5)


def test_adam_steps_lower_mtp_loss():
    torch.manual_seed(0)
    model = GPT(cfg(attn='mla', ffn='moe', kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                    v_head_dim=8, n_routed_experts=4, moe_intermediate_size=16, first_k_dense_replace=0)).train()
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
