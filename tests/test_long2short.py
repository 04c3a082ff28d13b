"""
long2short.py (Kimi k1.5 sec 2.4) on a 'test'-preset source built in-process: merge endpoints and mean, Kimi's
pair rule and the DPO loss by hand, response-only logprobs against a slow twin, the length reward in
rewards.rl_rewards by hand, every method end to end, clear errors.
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_long2short.py -q
"""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import harness
import long2short
import tasks
import train
from long2short import dpo_loss, dpo_pairs, merge_state_dicts
from rewards import rl_rewards


@pytest.fixture(scope='module')
def source(tmp_path_factory):
    """A test-preset run: pretrain (the base) then grpo (the 'long' model), as train.py lays them out."""
    out = str(tmp_path_factory.mktemp('src'))
    train.main(['--preset', 'test', '--stage', 'all', '--out-dir', out, '--threads', '1'])
    return os.path.join(out, 'grpo', 'ckpt.pt'), os.path.join(out, 'pretrain', 'ckpt.pt')


def l2s(method, src, out, *extra):
    return long2short.main([method, '--from', src, '--out-dir', out, '--threads', '1', *extra])


# -----------------------------------------------------------------------------
# merge

def test_merge_state_dicts_endpoints_and_mean():
    g = torch.Generator().manual_seed(0)
    a = {'w': torch.randn(5, 7, generator=g), 'n': torch.tensor([3, 4])}
    b = {'w': torch.randn(5, 7, generator=g), 'n': torch.tensor([3, 4])}
    assert torch.equal(merge_state_dicts(a, b, 1.0)['w'], a['w'])
    assert torch.equal(merge_state_dicts(a, b, 0.0)['w'], b['w'])
    torch.testing.assert_close(merge_state_dicts(a, b, 0.5)['w'], (a['w'] + b['w']) / 2, rtol=0, atol=1e-7)
    assert torch.equal(merge_state_dicts(a, b, 0.5)['n'], a['n'])
    with pytest.raises(ValueError, match='non-floating'):
        merge_state_dicts(a, {**b, 'n': torch.tensor([3, 5])}, 0.5)


def test_merge_checkpoints_give_back_each_end_and_the_mean(source, tmp_path):
    _, short_path = source
    # the test preset's RL sees no reward variance and leaves the weights alone: move them by hand instead; the copy
    # keeps the source's train_config, which is how merge finds its base
    ck = torch.load(source[0], weights_only=True)
    # (a function of the values, so that tied embeddings stay tied)
    long_sd = {k: v + 0.01 * torch.sin(1000 * v) + 0.001 for k, v in ck['model'].items()}
    long_path = str(tmp_path / 'long.pt')
    torch.save({**ck, 'model': long_sd}, long_path)
    short_sd = torch.load(short_path, weights_only=True)['model']
    for alpha, want in [(1.0, long_sd), (0.0, short_sd), (0.5, None)]:
        out = str(tmp_path / f'a{alpha}')
        s = l2s('merge', long_path, out, '--alpha', str(alpha))   # --short defaults to the source's base
        assert s['short'] == short_path
        model, _, _ = harness.load_policy(os.path.join(out, 'merge', 'ckpt.pt'), 'cpu')
        for k, v in model.state_dict().items():
            ref = want[k] if want is not None else (long_sd[k] + short_sd[k]) / 2
            torch.testing.assert_close(v, ref, rtol=0, atol=0 if want is not None else 1e-7)


def test_merge_refuses_mismatched_checkpoints(source, tmp_path):
    long_path, short_path = source
    ck = torch.load(short_path, weights_only=True)
    other = {**ck, 'model_config': {**ck['model_config'], 'n_layer': 3}}
    torch.save(other, tmp_path / 'other.pt')
    with pytest.raises(SystemExit, match=r"different model configs .*'n_layer': \(2, 3\)"):
        l2s('merge', long_path, str(tmp_path / 'o'), '--short', str(tmp_path / 'other.pt'))
    tok = {**ck, 'tokenizer': {**ck['tokenizer'], 'name': 'other'}}
    torch.save(tok, tmp_path / 'tok.pt')
    with pytest.raises(SystemExit, match='different tokenizers'):
        l2s('merge', long_path, str(tmp_path / 'o'), '--short', str(tmp_path / 'tok.pt'))


# -----------------------------------------------------------------------------
# DPO: the pair rule, the loss, the logprobs it needs

def test_dpo_pairs_kimi_rule():
    s = [dict(id=i, n_tokens=n, correct=c) for i, (n, c) in
         enumerate([(10, False), (20, True), (12, True), (18, True), (19, True), (30, False), (12, True),
                    (12, False), (13, False)])]
    pairs = dpo_pairs(s, 1.5)
    assert all(c['id'] == 2 for c, _ in pairs)   # the shortest correct one, the first of the two 12s
    # Kimi's negatives are the longer responses: wrong ones longer than 12 (13 and 30, not the shorter 10 nor the
    # equal 12) and correct ones longer than 1.5 * 12 = 18 (19 and 20; 18 itself is not longer)
    assert sorted(r['id'] for _, r in pairs) == [1, 4, 5, 8]
    assert dpo_pairs([dict(n_tokens=5, correct=False)] * 3) == []
    assert dpo_pairs([dict(n_tokens=5, correct=True), dict(n_tokens=4, correct=False)]) == []


def test_dpo_loss_by_hand_and_gradient_direction():
    x = [torch.tensor(v, dtype=torch.float64, requires_grad=True)
         for v in ([-1.0, -5.0], [-3.0, -1.0], [-2.0, -4.0], [-2.0, -2.0])]   # pol_c, pol_r, ref_c, ref_r
    # pair 1: 0.5 * ((-1 + 2) - (-3 + 2)) = 1 -> log(1 + e^-1); pair 2: 0.5 * ((-5 + 4) - (-1 + 2)) = -1 -> log(1 + e)
    want = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2
    loss = dpo_loss(*x, 0.5)
    assert abs(loss.item() - want) < 1e-12
    loss.backward()
    # d/d pol_chosen = -beta * sigmoid(-margin) / B: raising the chosen logprob lowers the loss, the rejected raises it
    sig = torch.sigmoid(-torch.tensor([1.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(x[0].grad, -0.5 * sig / 2)
    torch.testing.assert_close(x[1].grad, 0.5 * sig / 2)
    assert (x[0].grad < 0).all() and (x[1].grad > 0).all() and (x[2].grad > 0).all() and (x[3].grad < 0).all()
    # every partial derivative by central finite differences
    h = 1e-6
    for j in range(4):
        for i in range(2):
            up = [a.detach().clone() for a in x]
            dn = [a.detach().clone() for a in x]
            up[j][i] += h
            dn[j][i] -= h
            fd = (dpo_loss(*up, 0.5) - dpo_loss(*dn, 0.5)).item() / (2 * h)
            assert abs(fd - x[j].grad[i].item()) < 1e-8, (j, i, fd, x[j].grad[i].item())


def test_response_logprobs_match_a_slow_twin(source):
    """Batched, left-padded, response-only sums == one unpadded forward per row, summed over response positions."""
    model, tok, _ = harness.load_policy(source[0], 'cpu')
    prompts = [[tok.bos, 5, 6, 7], [tok.bos, 9], [tok.bos, 11, 12]]   # ragged: exercises the padding mask
    responses = [[20, 21, 22], [30], [40, 41, 42, 43, 44]]
    with torch.no_grad():
        got = long2short.response_logprobs(model, prompts, responses, tok.pad)
        for b, (p, r) in enumerate(zip(prompts, responses)):
            logits, _ = model(torch.tensor([p + r]))
            lp = F.log_softmax(logits[0].double(), -1)
            want = sum(lp[len(p) - 1 + t, r[t]] for t in range(len(r)))
            assert abs(got[b].item() - want.item()) < 1e-4, (b, got[b].item(), want.item())


# -----------------------------------------------------------------------------
# rewards.rl_rewards: + length_weight * Kimi's length reward per group of G (the rl method's reward)

def test_rl_rewards_adds_length_reward_per_group():
    probs = tasks.problems('countdown', 'train', 2, 0, tasks.TaskConfig())
    texts = [f"<think>x</think><answer>{probs[0].solution}</answer>", "<think>x</think><answer>1+1</answer>",
             "<think>x</think><answer>1+1</answer>", "<think>x</think><answer>1+1</answer>"]
    rp = [probs[0], probs[0], probs[1], probs[1]]
    lengths = [10, 20, 5, 5]
    r0, parts = rl_rewards(texts, rp, lengths, 2, 40)
    r1, _ = rl_rewards(texts, rp, lengths, 2, 40, length_weight=0.5)
    assert parts['accuracy'].tolist() == [1.0, 0.0, 0.0, 0.0]
    # group 1: lambda = 0.5 - (len - 10) / 10 = [0.5, -0.5], the wrong one kept at min(0, -0.5); group 2: equal -> 0
    torch.testing.assert_close(r1 - r0, 0.5 * torch.tensor([0.5, -0.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match='whole groups'):
        rl_rewards(texts, rp, lengths, 3, 40, length_weight=0.5)


# -----------------------------------------------------------------------------
# every method end to end, and the errors

@pytest.fixture
def varied(monkeypatch):
    """The test preset's model never answers right and never stops early: make one token in 16 a stop token and
    call a text 'correct' by a hash, so samples differ in length and correctness and every method has data."""
    import sample
    real = sample.generate

    def gen(model, prompts, max_new_tokens, stop_ids, *args, **kw):
        return real(model, prompts, max_new_tokens, set(stop_ids) | set(range(40, 2048, 16)), *args, **kw)
    monkeypatch.setattr(sample, 'generate', gen)
    import distill   # the one correctness check, which long2short's sampling shares with rejection sampling
    monkeypatch.setattr(distill, 'is_correct', lambda text, p: sum(map(ord, text)) % 3 == 0)


def test_all_methods_end_to_end(source, tmp_path, varied):
    out = str(tmp_path / 'l2s')
    s = l2s('all', source[0], out, '--n-problems', '6', '--n-samples', '4', '--sft-steps', '2', '--sft-batch-size',
            '4', '--dpo-steps', '2', '--dpo-batch-size', '4', '--rl-steps', '2', '--rl-n-eval', '2', '--alphas', '0,1')
    keys = ('countdown_pass@1', 'mean_response_tokens', 'source_countdown_pass@1', 'wall_seconds', 'ckpt')
    for m in long2short.METHODS:
        ms = json.load(open(os.path.join(out, m, 'summary.json')))
        assert all(k in ms for k in keys), (m, ms)
        assert os.path.isfile(os.path.join(out, m, 'report.md'))
        harness.load_policy(ms['ckpt'], 'cpu')   # train.py's format: --init-from takes it
        assert m in s['methods']
    dpo = json.load(open(os.path.join(out, 'dpo', 'summary.json')))
    assert dpo['n_pairs'] > 0 and dpo['dpo_steps'] == 2
    assert len(json.load(open(os.path.join(out, 'merge', 'summary.json')))['sweep']) == 2
    rows = [json.loads(l) for l in open(os.path.join(out, 'rl', 'grpo', 'metrics.jsonl'))]
    assert all('length_reward' in r for r in rows if 'loss' in r)
    report = open(os.path.join(out, 'report.md')).read()
    assert '| dpo |' in report and '| source |' in report
    src = s['methods']['source']
    for m in long2short.METHODS:
        r = s['methods'][m]
        assert abs(r['delta_points'] - 100 * (r['countdown_pass@1'] - src['countdown_pass@1'])) < 0.01


def test_clear_errors(source, tmp_path):
    with pytest.raises(SystemExit, match='no source checkpoint at'):
        l2s('merge', str(tmp_path / 'missing.pt'), str(tmp_path))
    with pytest.raises(SystemExit, match="invalid choice: 'shorter'"):
        l2s('shorter', source[0], str(tmp_path))
    with pytest.raises(SystemExit, match='no short-CoT checkpoint'):
        l2s('merge', source[0], str(tmp_path), '--short', str(tmp_path / 'nope.pt'))
    # a base model is its own default short model: merging it with itself would silently change nothing
    with pytest.raises(SystemExit, match='is its own short model'):
        l2s('merge', source[1], str(tmp_path))
    # sharding needs ranks: refused before any work, with the command that gives them
    with pytest.raises(SystemExit, match='--fsdp shards over the ranks of torchrun: torchrun --nproc_per_node=N'):
        l2s('dpo', source[0], str(tmp_path), '--fsdp')
    with pytest.raises(SystemExit, match='--hsdp and --activation-checkpointing go with --fsdp'):
        l2s('dpo', source[0], str(tmp_path), '--hsdp', '2')
