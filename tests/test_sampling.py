"""
Kimi k1.5's sampling strategies (rollouts.PromptSampler) and partial rollouts with repeat detection
(rollouts.PartialRollouts), alone and inside the grpo stage on the 'test' preset.
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_sampling.py -q
"""
import json
import math
import os
import random
from types import SimpleNamespace

import pytest
import torch

import grpo
import rollouts
import train
from model import GPT, ModelConfig
from rewards import is_repeating
from rollouts import PartialRollouts, PromptSampler
from sample import generate, sequences_for_training
from tasks import TaskConfig, problems

V, PAD, EOS = 50, 0, 1


def tiny_model():
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)).eval()
    with torch.no_grad():   # logits far from uniform, so the stop tokens get hit at varied lengths
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    return m


def pool(rates):
    return [SimpleNamespace(solve_rate=r) for r in rates]


# -----------------------------------------------------------------------------
# prompt sampling

def test_uniform_draws_what_grpo_stage_drew_before():
    cd = problems('countdown', 'train', 50, 1337, TaskConfig())
    s = PromptSampler(cd, 'uniform', 1337 + 11, total_steps=10)
    ref = random.Random(1337 + 11)
    for step in range(10):
        assert s.draw(16, step) == ref.sample(range(len(cd)), 16)


def test_curriculum_goes_from_the_easiest_to_the_whole_pool():
    rates = [random.Random(i).random() for i in range(200)]
    s = PromptSampler(pool(rates), 'curriculum', 0, total_steps=100, frac=0.5, start_frac=0.1)
    easiest = set(sorted(range(200), key=lambda i: -rates[i])[:20])   # 10% of the pool
    early = [i for _ in range(50) for i in s.draw(8, step=0)]
    assert set(early) <= easiest and len(set(early)) == 20            # all of the window, nothing else
    assert s.window(25) == math.ceil(200 * (0.1 + 0.9 * 0.5)) and s.window(50) == s.window(99) == 200
    late = {i for _ in range(200) for i in s.draw(8, step=60)}
    assert len(late) > 150 and min(rates[i] for i in late) < 0.05      # the hardest come in


def test_prioritized_frequencies_follow_one_minus_success():
    s = PromptSampler(pool([0.5] * 5), 'prioritized', 3, prior=0.4, floor=0.05, ema=0.5)
    s.update([0, 1, 2, 3], [0.0, 0.25, 1.0, 0.5])
    s.update([3], [1.0])                                               # EMA: 0.5 * 0.5 + 0.5 * 1.0
    assert s.success == [0.0, 0.25, 1.0, 0.75, None]
    w = [1.0, 0.75, 0.05, 0.25, 0.6]                                   # max(1 - s, floor), unseen at 1 - prior
    n = 40000
    counts = [0] * 5
    for i in s.draw(n):
        counts[i] += 1
    exp = [n * x / sum(w) for x in w]
    chi2 = sum((c - e) ** 2 / e for c, e in zip(counts, exp))
    assert chi2 < 18.5                                                 # chi-square, 4 dof, p = 0.001
    assert counts[2] > 0                                               # the floor: a solved problem stays drawable


def test_sampler_state_round_trip():
    a = PromptSampler(pool([0.1, 0.9, 0.5]), 'prioritized', 5)
    a.update([0], [1.0])
    a.draw(7)
    b = PromptSampler(pool([0.1, 0.9, 0.5]), 'prioritized', 99)
    b.load_state_dict(a.state_dict())
    assert [a.draw(4) for _ in range(5)] == [b.draw(4) for _ in range(5)]


# -----------------------------------------------------------------------------
# partial rollouts

def run_partial(m, budget, steps, temperature=1.0, repeat_stop=0.0, G=2, groups=3, max_new=14, stops=(EOS, 7, 11),
                update=None):
    pr = PartialRollouts(G, max_new, groups, budget=budget, max_groups=groups + 1, repeat_stop=repeat_stop)
    prompts = {i: torch.randint(2, V, (1 + i % 4,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(1000)}
    nxt = iter(range(1000))
    out = []
    for _ in range(steps):
        pb = pr.step(m, lambda n: [next(nxt) for _ in range(n)], prompts.__getitem__, set(stops), PAD,
                     temperature=temperature, seed=len(out), version=len(out))
        if update is not None:   # the trainer's optimizer step: the policy changes between iterations
            update(m, pb)
        assert pb.buffered == len(pr.groups) <= groups + 1                         # the bound
        assert sum(not r['done'] for g in pr.groups for r in g['rows']) <= groups * G
        out.append((pb, prompts))
    return out


def test_greedy_partial_rollouts_continue_exactly_where_they_stopped():
    """With the policy fixed, generating 3 tokens per iteration and continuing from the buffer gives the same
    responses as one uninterrupted generation; the earlier segments become the context, the newest is trained."""
    m = tiny_model()
    seen = 0
    for pb, prompts in run_partial(m, budget=3, steps=8, temperature=0.0):
        for b, pid in enumerate(i for i in pb.ids for _ in range(2)):
            ref = generate(m, [prompts[pid]], 14, {EOS, 7, 11}, PAD, temperature=0)
            assert pb.responses[b] == ref.tokens[0, :int(ref.lengths[0])].tolist()
            # worked check on the mask: context = prompt + whole earlier segments, trained = the rest
            n_seg = int(pb.gen.lengths[b])
            earlier = pb.contexts[b][len(prompts[pid]):]
            assert pb.contexts[b][:len(prompts[pid])] == prompts[pid] and len(earlier) % 3 == 0
            assert earlier + pb.gen.tokens[b, :n_seg].tolist() == pb.responses[b]
            assert pb.gen.mask[b, :n_seg].all() and not pb.gen.mask[b, n_seg:].any() and 1 <= n_seg <= 3
            assert bool(pb.continued[b]) == (len(earlier) > 0)
            seen += len(earlier) > 0
    assert seen > 0


def test_earlier_segments_carry_no_gradient():
    m = tiny_model().train()
    batches = [pb for pb, _ in run_partial(m, budget=4, steps=6)]
    pb = next(b for b in batches if b.continued.any())
    idx, pos, mask, P = sequences_for_training(pb.contexts, pb.gen, PAD, 'cpu')
    logits, _ = m(idx, pos=pos, mask=mask)                                         # (B, P + L, V)
    logits.retain_grad()
    L = pb.gen.tokens.shape[1]
    lp = grpo.token_logprobs(logits[:, P - 1:P - 1 + L], pb.gen.tokens)            # (B, L)
    A = torch.randn(len(pb.contexts))
    loss, _ = grpo.policy_loss(lp, lp.detach(), None, A, pb.gen.mask, loss_type='bnpo')
    loss.backward()
    g = logits.grad.abs().sum(-1)                                                  # (B, P + L)
    for b in range(len(pb.contexts)):
        n = int(pb.gen.lengths[b])
        # the logit at P - 1 + t predicts segment token t: only those get gradient; prompt, earlier segments
        # (all left of P - 1) and the pads after the segment get exactly none
        assert (g[b, :P - 1] == 0).all() and (g[b, P - 1 + n:] == 0).all()
        # (a segment generated under an earlier version is masked whole: it gets none either)
        assert (g[b, P - 1:P - 1 + n] > 0).all() or A[b] == 0 or not pb.gen.mask[b].any()


def test_segments_of_an_earlier_policy_are_not_trained():
    """Kimi k1.5 sec 2.6.2: with the weights changed between iterations, a trajectory that ended under an earlier
    policy and waited for its group is excluded from the loss. Every token left in the loss is on-policy: its
    stored behaviour logprob equals the current model's logprob of it (what rho == 1 assumes)."""
    seen = {'on': 0, 'stale': 0}

    def check_then_step(model, pb):
        idx, pos, mask, P = sequences_for_training(pb.contexts, pb.gen, PAD, 'cpu')
        L = pb.gen.tokens.shape[1]
        with torch.no_grad():
            logits, _ = model(idx, pos=pos, mask=mask)
            lp = grpo.token_logprobs(logits[:, P - 1:P - 1 + L], pb.gen.tokens)    # (B, L) under the current policy
            on = pb.gen.mask.bool()
            torch.testing.assert_close(lp[on], pb.gen.logprobs[on], atol=1e-4, rtol=0)
            seen['on'] += int(on.sum())
            seen['stale'] += int(((pb.gen.lengths > 0) & ~on.any(1)).sum())     # a segment, all of it masked
            for p in model.parameters():   # the optimizer step: the next iteration samples from another policy
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seen['on'])))
    run_partial(tiny_model(), budget=2, steps=12, max_new=12, update=check_then_step)
    assert seen['on'] > 0 and seen['stale'] > 0


def test_small_budget_buffer_stays_bounded_and_fills_the_batch():
    m = tiny_model()
    out = run_partial(m, budget=2, steps=12, max_new=12)
    assert max(pb.buffered for pb, _ in out) > 0
    assert any(pb.continued.any() for pb, _ in out)
    assert all(len(pb.ids) >= 1 and pb.gen.tokens.shape[0] == 2 * len(pb.ids) for pb, _ in out)
    # prompt + max_new_tokens == block_size: passes that mix long contexts with fresh prompts must still fit
    out = run_partial(m, budget=7, steps=10, max_new=60, stops=(EOS, 7))
    assert any(pb.continued.any() for pb, _ in out) and max(len(r) for pb, _ in out for r in pb.responses) > 30


def test_repeat_detection_stops_looping_rollouts():
    m = tiny_model()

    def responses(**kw):
        out = {}
        for pb, _ in run_partial(m, budget=5, steps=4, temperature=0.0, max_new=30, **kw):
            for b, pid in enumerate(i for i in pb.ids for _ in range(2)):
                out[pid] = pb.responses[b]
        return out, pb
    free, _ = responses()
    cut, _ = responses(repeat_stop=0.3)
    common = set(free) & set(cut)
    assert len(common) >= 3
    n_cut = 0
    for pid in common:
        ra = free[pid]
        # the cut response is the free one up to the first checked length (a multiple of 8) that repeats;
        # a rollout that ended by itself at that length is not cut
        t = next((t for t in range(8, len(ra) + 1, 8) if is_repeating(ra[:t], 4, 0.3)
                  and not (t == len(ra) and ra[-1] in (EOS, 7, 11))), len(ra))
        assert cut[pid] == ra[:t], pid
        n_cut += t < len(ra)
    assert n_cut > 0


# -----------------------------------------------------------------------------
# in the grpo stage (in-process, the 'test' preset, a text reward with variance so that weights move)

def text_reward(texts, *args, **kwargs):
    acc = torch.tensor([float(sum(map(ord, t)) % 3 == 0) for t in texts])
    return acc, {'accuracy': acc, 'format': torch.zeros_like(acc)}


@pytest.fixture
def early_stops(monkeypatch):
    """The test preset's base is close to uniform and never stops before max_new_tokens: make one token in 16 a
    stop token as well, so responses end at varied lengths and groups leave the buffer at different times."""
    import sample
    real = sample.generate

    def gen(model, prompts, max_new_tokens, stop_ids, *args, **kw):
        return real(model, prompts, max_new_tokens, set(stop_ids) | set(range(40, 2048, 16)), *args, **kw)
    monkeypatch.setattr(sample, 'generate', gen)     # group_rollouts' generate
    monkeypatch.setattr(rollouts, 'generate', gen)   # PartialRollouts'
    monkeypatch.setattr(train, 'rl_rewards', text_reward)


@pytest.fixture(scope='module')
def base(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('base'))
    train.main(['--preset', 'test', '--stage', 'pretrain', '--out-dir', out, '--threads', '1'])
    return os.path.join(out, 'pretrain', 'ckpt.pt')


def grpo_run(base, out, *extra):
    train.main(['--preset', 'test', '--stage', 'grpo', '--init-from', base, '--out-dir', out, '--threads', '1',
                '--rl-steps', '4', '--rl-eval-interval', '100', '--n-eval', '2', *extra])
    ck = torch.load(os.path.join(out, 'grpo', 'ckpt.pt'), weights_only=True)
    rows = [json.loads(l) for l in open(os.path.join(out, 'grpo', 'metrics.jsonl'))]
    return ck, rows


def test_budget_at_max_new_tokens_trains_the_same_weights(base, tmp_path, early_stops):
    a, _ = grpo_run(base, str(tmp_path / 'a'), '--prompt-sampling', 'prioritized')
    b, rows = grpo_run(base, str(tmp_path / 'b'), '--prompt-sampling', 'prioritized', '--rollout-budget', '24')
    init = torch.load(base, weights_only=True)['model']
    assert any(not torch.equal(a['model'][k], init[k]) for k in init)             # it did train
    for k in a['model']:
        torch.testing.assert_close(a['model'][k], b['model'][k], atol=1e-6, rtol=0)
    assert all(r['buffer_groups'] == 0 and r['continued_token_frac'] == 0 for r in rows if 'loss' in r)


def test_resume_with_sampler_and_buffer_matches_uninterrupted(base, tmp_path, early_stops, monkeypatch):
    common = ['--prompt-sampling', 'prioritized', '--rollout-budget', '6', '--repeat-stop', '0.3', '--rl-prompts', '4',
              '--ckpt-interval', '2']
    a, ra = grpo_run(base, str(tmp_path / 'a'), *common)

    def killed(code):
        raise SystemExit(code)
    monkeypatch.setattr(os, '_exit', killed)                                       # --exit-after's kill, in-process
    with pytest.raises(SystemExit):
        grpo_run(base, str(tmp_path / 'b'), *common, '--exit-after', '2')
    b, rb = grpo_run(base, str(tmp_path / 'b'), *common, '--resume')
    assert [r['step'] for r in rb] == [r['step'] for r in ra]
    assert ra[2]['step'] == 2 and ra[2]['buffer_groups'] > 0                       # the buffer crossed the kill
    assert any(r.get('continued_token_frac', 0) > 0 for r in ra)
    for x, y in zip(ra, rb):
        for k in ('reward', 'response_len', 'buffer_groups', 'prompt_solve_rate', 'continued_token_frac',
                  'repeat_stops'):
            assert x.get(k) == pytest.approx(y.get(k), abs=1e-6), (k, x, y)
    for k in a['model']:
        torch.testing.assert_close(a['model'][k], b['model'][k], atol=1e-6, rtol=0)


def test_curriculum_run_logs_the_easiest_prompts_first(base, tmp_path):
    _, rows = grpo_run(base, str(tmp_path / 'c'), '--prompt-sampling', 'curriculum', '--curriculum-frac', '1')
    rates = sorted((p.solve_rate for p in problems('countdown', 'train', 200, 1337, TaskConfig())), reverse=True)
    assert rows[1]['prompt_solve_rate'] >= rates[19]                              # step 1: the easiest 10%
    assert rows[1]['prompt_solve_rate'] > rows[-1]['prompt_solve_rate']
