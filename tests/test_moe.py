"""
DeepSeekMoE (moe.py): the sorted dispatch against its dense twin, aux-loss-free balancing, the sequence-wise
balance loss against a value worked by hand, and the wiring into GPT.

Run: python -m pytest tests/test_moe.py -q
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from layers import MLP  # noqa: E402
from model import GPT, ModelConfig  # noqa: E402
from moe import MoE, moe_load_stats, update_moe_biases  # noqa: E402

torch.set_num_threads(1)  # tiny shapes: extra threads only spin on a shared 2-core box


def cfg(**kw):
    base = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=16, attn='gqa', ffn='moe',
                n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=12, num_experts_per_tok=2,
                first_k_dense_replace=0)
    base.update(kw)
    return ModelConfig(**base)


def make_moe(seed=0, bias_std=0.0, **kw):
    torch.manual_seed(seed)
    m = MoE(cfg(**kw))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    m.e_score_correction_bias.normal_(0.0, bias_std)
    return m


ROUTINGS = {
    'v3_groups': dict(scoring_func='sigmoid', n_group=4, topk_group=2, norm_topk_prob=True,
                      routed_scaling_factor=2.5),
    'v3_flat_raw': dict(scoring_func='sigmoid', norm_topk_prob=False, num_experts_per_tok=3),
    'v2_groups': dict(scoring_func='softmax', n_group=2, topk_group=1, norm_topk_prob=False,
                      routed_scaling_factor=1.5, n_shared_experts=2),
    'v2_flat_norm_noshared': dict(scoring_func='softmax', norm_topk_prob=True, n_shared_experts=0),
}


@pytest.mark.parametrize('name', list(ROUTINGS))
def test_sorted_dispatch_matches_dense(name):
    m = make_moe(bias_std=0.1, **ROUTINGS[name])
    x = torch.randn(3, 7, 16, requires_grad=True)
    y = m(x)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x] + list(m.parameters()), gy)
    y_ref = m(x, dense=True)
    grads_ref = torch.autograd.grad(y_ref, [x] + list(m.parameters()), gy)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
    assert m.load.sum() == 3 * 7 * m.top_k


def test_routing_rules_by_hand():
    """Bias selects but never weights; groups limit the choice; weights renormalise and scale."""
    m = make_moe(n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.0)
    s = torch.tensor([[0.9, 0.8, 0.1, 0.1, 0.7, 0.7, 0.7, 0.2]])    # group scores (top-2 sums): 1.7 vs 1.4
    m.gate.weight.data = torch.eye(8, 16)
    x = torch.zeros(1, 16)
    x[0, :8] = torch.logit(s[0])
    w, idx, scores = m.route(x)
    assert sorted(idx[0].tolist()) == [0, 1]
    torch.testing.assert_close(w.sort(descending=True).values, 2.0 * torch.tensor([[0.9, 0.8]]) / 1.7)
    # a bias on expert 4 moves group 1 ahead (0.7+5 + 0.7 > 1.7) and expert 4 into the top-K ...
    m.e_score_correction_bias[4] = 5.0
    w, idx, _ = m.route(x)
    assert set(idx[0].tolist()) <= {4, 5, 6, 7} and 4 in idx[0].tolist()
    # ... but its weight is still its unbiased score
    torch.testing.assert_close(w[0].sum(), torch.tensor(2.0))
    torch.testing.assert_close(w[0, idx[0].tolist().index(4)] / w[0].sum(), torch.tensor(0.7 / 1.4))


@pytest.mark.parametrize('scoring', ['softmax', 'sigmoid'])
def test_balance_loss_worked_by_hand(scoring):
    """E=4, K=2, T=2, alpha=0.1. Normalised scores t1 = [.4 .3 .2 .1] (picks 0,1), t2 = [.1 .5 .3 .1] (picks 1,2).
    f_i = E/(K T) * count = [1, 2, 1, 0]; P = mean over t = [.25, .4, .25, .1];
    sum f P = .25 + .8 + .25 + 0 = 1.3, so the loss is 0.13."""
    m = MoE(cfg(n_embd=4, n_head=2, n_kv_head=2, n_routed_experts=4, num_experts_per_tok=2, scoring_func=scoring,
                aux_loss_alpha=0.1))
    m.gate.weight.data = torch.eye(4)
    if scoring == 'softmax':  # softmax(log p) = p
        x = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.5, 0.3, 0.1]]).log()
    else:  # sigmoid scores that normalise to the same rows (sums 2.0 and 1.0)
        x = torch.logit(torch.tensor([[0.8, 0.6, 0.4, 0.2], [0.1, 0.5, 0.3, 0.1]]))
    m(x.view(1, 2, 4).repeat(3, 1, 1))  # three identical sequences: the batch mean is the same number
    torch.testing.assert_close(m.aux_loss, torch.tensor(0.13))


def test_bias_update_balances_skewed_router():
    """A router skewed towards experts 0 and 1 starts with max/mean load > 2; 300 update_bias calls on a stream
    of fresh batches bring it under 1.3. The sign update makes the bias jitter by +-gamma around its balance
    point, so the final load is summed over 20 further steps, as a training metric would average it."""
    torch.manual_seed(0)
    C, E = 16, 8
    m = MoE(cfg(n_embd=C, n_routed_experts=E, num_experts_per_tok=2, n_group=2, topk_group=2,
                bias_update_speed=0.005))
    u = torch.nn.functional.normalize(torch.randn(C), dim=0)
    with torch.no_grad():
        m.gate.weight.normal_(0.0, 0.3)
        m.gate.weight[:2] += 2.0 * u  # experts 0 and 1 love the shared direction of the data
    gen = torch.Generator().manual_seed(1)

    def batch():
        return torch.randn(8, 64, C, generator=gen) + 1.5 * u

    with torch.no_grad():
        m(batch())
        assert m.load.max() / m.load.mean() > 2.0
        for _ in range(300):
            m(batch())
            m.update_bias()
        total = torch.zeros(E)
        for _ in range(20):
            m(batch())
            total += m.load
            m.update_bias()
    assert total.max() / total.mean() < 1.3
    assert m.e_score_correction_bias[:2].max() < m.e_score_correction_bias[2:].min()  # the favourites paid


def test_gpt_wiring_first_k_dense_aux_and_stats():
    c = cfg(first_k_dense_replace=1, aux_loss_alpha=0.01, n_layer=3)
    torch.manual_seed(0)
    model = GPT(c)
    assert isinstance(model.layers[0].mlp, MLP) and all(isinstance(b.mlp, MoE) for b in model.layers[1:])
    idx = torch.randint(0, 64, (2, 16))
    _, loss = model(idx, idx)
    aux = model.layers[1].mlp.aux_loss + model.layers[2].mlp.aux_loss
    torch.testing.assert_close(model.aux_loss, aux)
    model.eval()
    _, ce = model(idx, idx)  # eval: the plain cross-entropy, the number a validation loss should report
    torch.testing.assert_close(loss, ce + aux)
    loss.backward()
    assert model.layers[1].mlp.gate.weight.grad.abs().sum() > 0
    stats = moe_load_stats(model)
    assert len(stats['moe/load']) == 2 and stats['moe/max_over_mean'] >= 1.0
    before = model.layers[1].mlp.e_score_correction_bias.clone()
    update_moe_biases(model, gamma=0.5)  # the train-mode forward's load counts, not the eval one's
    assert not torch.equal(before, model.layers[1].mlp.e_score_correction_bias)
    assert model.layers[1].mlp.load_since_update.sum() == 0
    assert 'layers.1.mlp.e_score_correction_bias' in model.state_dict()
    assert not any('e_score' in n for n, _ in model.named_parameters())  # a buffer: no gradient, no decay


def test_config_validation():
    with pytest.raises(ValueError, match='divisible'):
        cfg(n_routed_experts=8, n_group=3)
    with pytest.raises(ValueError, match='num_experts_per_tok'):
        cfg(n_group=4, topk_group=1, num_experts_per_tok=3)
    with pytest.raises(ValueError, match='scoring_func'):
        cfg(scoring_func='relu')
