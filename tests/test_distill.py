"""
SFT, logit distillation and rejection sampling (distill.py), the words "language" and cold-start traces (tasks.py),
and the R1 pipeline stages of train.py (sft, rs, distill) end to end on the 'test' preset.
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_distill.py -q
"""
import json
import math
import os
import random
import re

import pytest
import torch
import torch.nn.functional as F

import distill
import sample
import corpus
import tasks
import train
from rewards import countdown_reward, language_consistency_reward
from tokenizer import Tokenizer


# -----------------------------------------------------------------------------
# losses

def test_sft_loss_ignores_prompt_positions_and_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    B, T, V = 2, 6, 5
    logits = torch.randn(B, T, V, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)   # prompt, response, pad
    # by hand: -log softmax(logits)[target], averaged over the 5 response positions
    terms = []
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                row = logits[b, t].tolist()
                terms.append(-(row[targets[b, t]] - math.log(sum(math.exp(x) for x in row))))
    loss = distill.sft_loss(logits, targets, mask)
    assert abs(float(loss) - sum(terms) / len(terms)) < 1e-5
    # whatever the prompt (and pad) logits say, the loss is the same and they get no gradient
    other = logits.clone()
    other[~mask] = torch.randn(int((~mask).sum()), V, generator=g) * 10
    other.requires_grad_(True)
    loss2 = distill.sft_loss(other, targets, mask)
    assert float(loss2.detach()) == float(loss)
    loss2.backward()
    assert other.grad[~mask].abs().max() == 0 and other.grad[mask].abs().max() > 0


def kd_slow(s, t, mask, T):
    """tau^2 * mean over masked positions of sum_v p_t(v) (log p_t(v) - log p_s(v)), plain Python sums."""
    out = []
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if not mask[b, i]:
                continue
            zs, zt = [x / T for x in s[b, i].tolist()], [x / T for x in t[b, i].tolist()]
            ls, lt = math.log(sum(map(math.exp, zs))), math.log(sum(map(math.exp, zt)))
            out.append(sum(math.exp(a - lt) * ((a - lt) - (c - ls)) for a, c in zip(zt, zs)))
    return T * T * sum(out) / len(out)


@pytest.mark.parametrize('T', [1.0, 2.5])
def test_logit_distill_loss_matches_slow_twin_and_kl_div(T):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g) * 2
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    loss = float(distill.logit_distill_loss(s, t, mask, T))
    assert abs(loss - kd_slow(s, t, mask, T)) < 1e-5
    ref = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction='none').sum(-1)
    assert abs(loss - float(ref[mask].mean()) * T * T) < 1e-5
    assert abs(float(distill.logit_distill_loss(t, t, mask, T))) < 1e-6    # KL(p || p) = 0
    with pytest.raises(ValueError, match='one vocabulary'):
        distill.logit_distill_loss(s, torch.randn(2, 5, 8), mask, T)


# -----------------------------------------------------------------------------
# rejection sampling, on a stub generator whose outcome we know

P1 = tasks.Countdown([2, 3, 4], 20, '(2+3)*4', 0.1)
P2 = tasks.Countdown([5, 6, 7], 100, '', 0.0)   # every sample below is wrong for it
LONG = "<think>2*3=6 6+4=10 vs 20 no.3*4=12 12+2=14 vs 20 no.2+3=5 5*4=20 vs 20 yes.</think><answer>(2+3)*4</answer>"
SHORT = "<think>2+3=5 5*4=20 vs 20 yes.</think><answer>(2+3)*4</answer>"
WRONG = "<think>2*3=6 6+4=10 vs 20 no.</think><answer>(2*3)+4</answer>"
RESPONSES = {P1.prompt(): [LONG, SHORT, WRONG, SHORT], P2.prompt(): [WRONG, SHORT, LONG, WRONG]}


@pytest.fixture
def stub_rollouts(monkeypatch):
    tok = Tokenizer()

    def rollouts(model, prompts, n, max_new_tokens, stop_ids, pad_id, temperature=1.0, generator=None, **kw):
        rows = []
        for pr in prompts:
            key = re.search(r'make \d+ from [\d ]+', tok.decode(pr)).group(0)
            rows += [tok.encode(r) + [tok.eos] for r in RESPONSES[key]]
        L = max(map(len, rows))
        tokens = torch.tensor([r + [pad_id] * (L - len(r)) for r in rows])
        lengths = torch.tensor([len(r) for r in rows])
        m = (torch.arange(L)[None] < lengths[:, None]).float()
        return sample.Generation(tokens, torch.zeros(len(rows), L), m, lengths, torch.ones(len(rows), dtype=torch.bool))
    monkeypatch.setattr(sample, 'group_rollouts', rollouts)
    return tok


def test_rejection_sampling_keeps_only_correct_and_shortest(stub_rollouts):
    tok, model = stub_rollouts, torch.nn.Linear(1, 1)
    out = distill.rejection_sample(model, tok, [P1, P2], 4, 1.0, 64, keep='correct')
    # P1: LONG and SHORT once each (the second SHORT is a duplicate); P2: SHORT and LONG answer another problem
    assert sorted(e['text'].removesuffix('<|eos|>') for e in out) == sorted([LONG, SHORT])
    for e in out:
        assert e['problem'] is P1 and countdown_reward(e['text'], P1.numbers, P1.target) == 1.0
        assert e['prompt_ids'][0] == tok.bos and e['response_ids'][-1] == tok.eos
        assert e['n_tokens'] == len(e['response_ids']) == len(tok.encode(e['text']))
    short = distill.rejection_sample(model, tok, [P1, P2], 4, 1.0, 64, keep='shortest')
    assert [e['text'].removesuffix('<|eos|>') for e in short] == [SHORT]
    assert short[0]['n_tokens'] == min(e['n_tokens'] for e in out) == len(tok.encode(SHORT)) + 1
    with pytest.raises(ValueError):
        distill.rejection_sample(model, tok, [P1], 4, 1.0, 64, keep='longest')


# -----------------------------------------------------------------------------
# tasks: number words, mixed-language traces, cold-start traces

VAL = {w: i for i, w in enumerate('zero one two three four five six seven eight nine ten eleven twelve thirteen '
                                  'fourteen fifteen sixteen seventeen eighteen nineteen'.split())}
VAL.update({w: 10 * i for i, w in enumerate('twenty thirty forty fifty sixty seventy eighty ninety'.split(), 2)})


def words_value(s):
    total = 0
    for w in s.split():
        total = total * 100 if w == 'hundred' else total + VAL[w]
    return total


def test_number_words_read_back():
    assert [words_value(corpus.number_words(n)) for n in range(1000)] == list(range(1000))
    assert corpus.number_words(305) == 'three hundred five'


def test_word_traces_score_by_their_answer_and_lose_language_reward():
    cfg, rng = tasks.TaskConfig(words_frac=1.0, **tasks.WALK_PAST_HITS), random.Random(0)   # no slips
    ops = {'plus': '+', 'minus': '-', 'times': '*', 'over': '/'}
    probs = tasks.problems('countdown', 'train', 40, 0, cfg)
    for p in probs:
        t = corpus.countdown_trace(rng, p, cfg)
        cot, answer = t.removeprefix('<think>').split('</think>')
        assert not re.search(r'\d', cot) and re.search(r'\d', answer)   # CoT in words, answer in digits
        last = cot.split('.')[-2]   # "a op b is r, r op c is v vs target yes|no"
        steps, check = last.split(' vs ')
        v = words_value(steps.split(' is ')[-1])
        assert words_value(check.rsplit(' ', 1)[0]) == p.target
        # the reward reads the answer tag only: right iff the last attempt (the answer) reaches the target
        assert countdown_reward(t, p.numbers, p.target) == float(v == p.target) == float(check.endswith('yes'))
        assert language_consistency_reward(t, 'digits') == 0.0 and corpus.has_number_words(t)
        # an attempt in words is the same attempt as the digits one: rewrite and compare with the answer
        expr = answer.removeprefix('<answer>').removesuffix('</answer>')
        a, op, b = re.match(r'(.+?) (plus|minus|times|over) (.+?) is', steps).groups()
        assert expr.startswith('(' + str(words_value(a)) + ops[op] + str(words_value(b)) + ')')
    # words_frac=0 never writes words; 0.5 mixes both languages within traces
    assert not any(corpus.has_number_words(corpus.countdown_trace(rng, p, tasks.TaskConfig())) for p in probs)
    mixed = [corpus.countdown_trace(rng, p, tasks.TaskConfig(words_frac=0.5)) for p in probs]
    assert any(corpus.has_number_words(t) and re.search(r'\d=\d', t) for t in mixed)


def test_cold_start_traces_end_at_their_first_yes():
    cfg, rng = tasks.TaskConfig(), random.Random(1)
    for p in tasks.problems('countdown', 'train', 60, 0, cfg):
        t = corpus.cold_start_trace(rng, p, cfg)
        checks = t.split('</think>')[0].removeprefix('<think>').split('.')[:-1]
        assert len(checks) <= cfg.max_attempts and len(set(checks)) == len(checks)
        assert [c.endswith(' yes') for c in checks] == [False] * (len(checks) - 1) + [True]
        assert countdown_reward(t, p.numbers, p.target) == 1.0 and not corpus.has_number_words(t)


# -----------------------------------------------------------------------------
# the stages end to end (in process: a subprocess per run would double the time)

def main(argv, capsys=None):
    train.main(argv)
    return capsys.readouterr().out if capsys else ''


def test_r1_pipeline_end_to_end(tmp_path, capsys):
    out = str(tmp_path / 'r1')
    log = main(['--preset', 'test', '--stage', 'pretrain,sft,grpo,rs,grpo', '--out-dir', out, '--max-new-tokens', '60',
                '--sft-steps', '3', '--sft-examples', '16', '--rs-problems', '8', '--rs-general', '8',
                '--words-frac', '0.3', '--lang-weight', '0.5', '--rl-steps', '2'], capsys)
    dirs = ['pretrain', 'sft', 'grpo', 'rs', 'grpo2']
    for d in dirs:
        s = json.load(open(os.path.join(out, d, 'summary.json')))
        for k in ('countdown_pass@1', 'mean_response_tokens', 'stage_wall_seconds'):
            assert isinstance(s[k], (int, float)), (d, k)
        assert os.path.isfile(os.path.join(out, d, 'report.md')) and os.path.isfile(os.path.join(out, d, 'ckpt.pt'))
    top = json.load(open(os.path.join(out, 'summary.json')))
    assert top['pipeline'] == dirs and list(top['stages']) == dirs
    assert 'rl_countdown_pass@1' in top   # the last stage's own keys, as --stage all always wrote
    # each stage starts from the one before; rs samples from grpo and trains the base
    for a, b in zip(dirs, dirs[1:]):
        assert f"=== stage {b} " in log and f"from {os.path.join(out, a, 'ckpt.pt')}" in log.split(f"=== stage {b} ")[1].split('\n')[0]
    assert f"SFT of {os.path.join(out, 'pretrain', 'ckpt.pt')}" in log
    rows = [json.loads(l) for l in open(os.path.join(out, 'grpo', 'metrics.jsonl'))]
    assert all(0 <= r['lang_reward'] <= 1 for r in rows if 'loss' in r)
    sft_rows = [json.loads(l) for l in open(os.path.join(out, 'sft', 'metrics.jsonl'))]
    assert [r['step'] for r in sft_rows] == [1, 2, 3] and all('kd_loss' not in r for r in sft_rows)


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('teacher'))
    train.main(['--preset', 'test', '--stage', 'pretrain', '--out-dir', out, '--pt-steps', '2'])
    return os.path.join(out, 'pretrain', 'ckpt.pt')


@pytest.fixture
def right_answers(monkeypatch, teacher):
    """The test preset's models never answer right: sample the known solution (in a readable trace) instead, so
    the distillation stage has data. Prompts come in the teacher's tokenizer."""
    tok = Tokenizer.from_dict(torch.load(teacher, weights_only=True)['tokenizer'])

    def rollouts(model, prompts, n, max_new_tokens, stop_ids, pad_id, temperature=1.0, generator=None, **kw):
        rows = []
        for i, pr in enumerate(prompts):
            t, nums = re.search(r'make (\d+) from ([\d ]+)', tok.decode(pr)).groups()
            p = tasks.Countdown([int(x) for x in nums.split()], int(t), '', 0.0)
            rows += [tok.encode(corpus.cold_start_trace(random.Random(i * n + j), p, tasks.TaskConfig(max_attempts=1)))
                     + [tok.eos] for j in range(n)]
        L = max(map(len, rows))
        lengths = torch.tensor([len(r) for r in rows])
        return sample.Generation(torch.tensor([r + [pad_id] * (L - len(r)) for r in rows]), torch.zeros(len(rows), L),
                                 (torch.arange(L)[None] < lengths[:, None]).float(), lengths,
                                 torch.ones(len(rows), dtype=torch.bool))
    monkeypatch.setattr(sample, 'group_rollouts', rollouts)


@pytest.mark.parametrize('mode', ['sft', 'logits'])
def test_distill_smaller_student_in_both_modes(tmp_path, teacher, right_answers, mode):
    out = str(tmp_path / mode)
    main(['--preset', 'test', '--stage', 'pretrain,distill', '--out-dir', out, '--teacher-from', teacher,
          '--distill-mode', mode, '--n-layer', '1', '--n-embd', '24', '--pt-steps', '2', '--sft-steps', '3',
          '--rs-problems', '6', '--rs-samples', '2', '--max-new-tokens', '40'])
    s = json.load(open(os.path.join(out, 'distill', 'summary.json')))
    assert s['student_params'] < s['teacher_params'] and s['distill_mode'] == mode
    assert s['n_examples'] == s['n_correct_samples'] > 0 and s['sft_steps'] == 3
    rows = [json.loads(l) for l in open(os.path.join(out, 'distill', 'metrics.jsonl'))]
    assert all(('kd_loss' in r) == (mode == 'logits') for r in rows)
    if mode == 'logits':   # the logged total is SFT + kd_weight (1) * KL
        assert all(abs(r['loss'] - r['sft_loss'] - r['kd_loss']) < 1e-4 and r['kd_loss'] > 0 for r in rows)


def test_distill_needs_one_vocabulary_for_logits_and_a_teacher(tmp_path, teacher, right_answers):
    out = str(tmp_path / 'other_tok')
    args = ['--preset', 'test', '--out-dir', out, '--teacher-from', teacher, '--sft-steps', '1', '--rs-problems', '2',
            '--max-new-tokens', '40']
    main(args + ['--stage', 'pretrain,distill', '--bpe-merges', '5', '--pt-steps', '1'])   # sft mode: re-encoded
    assert json.load(open(os.path.join(out, 'distill', 'summary.json')))['n_examples'] > 0
    with pytest.raises(SystemExit, match='needs the teacher.s vocabulary'):
        main(args + ['--stage', 'distill', '--bpe-merges', '5', '--distill-mode', 'logits', '--overwrite'])
    with pytest.raises(SystemExit, match='no teacher checkpoint'):
        main(args[:4] + ['--stage', 'distill', '--teacher-from', str(tmp_path / 'none.pt'), '--overwrite'])


@pytest.mark.parametrize('stage, msg', [('pretrain,dance', "unknown stage 'dance'"), ('sft,,grpo', "unknown stage ''"),
                                        ('pretrain,grpo,pretrain', 'pretrain can appear once')])
def test_bad_stages_give_one_line_errors(stage, msg):
    with pytest.raises(SystemExit) as e:
        train.main(['--preset', 'test', '--stage', stage])
    assert msg in str(e.value) and '\n' not in str(e.value)
