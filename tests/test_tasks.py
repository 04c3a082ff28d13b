"""Task generator tests: solvable by construction, deterministic, disjoint splits, impossible configs refused
in bounded work. Run: python -m pytest tests/test_tasks.py -q"""
import random
import re
from fractions import Fraction

import pytest

import rollouts
import tasks
from corpus import arithmetic_response, corpus_document, countdown_trace
from tasks import (TaskConfig, problems, make_countdown, all_attempts, format_prompt, in_test_split,
                   R1_ZERO_TEMPLATE)


def eval_expr(s):
    """Independent slow evaluator (shunting-yard over Fractions) for checking generated solutions."""
    out, ops, num = [], [], ''
    prec = {'+': 1, '-': 1, '*': 2, '/': 2}

    def apply():
        b, a, op = out.pop(), out.pop(), ops.pop()
        out.append({'+': a + b, '-': a - b, '*': a * b, '/': a / b}[op])
    for ch in s + ' ':
        if ch.isdigit():
            num += ch
            continue
        if num:
            out.append(Fraction(int(num)))
            num = ''
        if ch in prec:
            while ops and ops[-1] in prec and prec[ops[-1]] >= prec[ch]:
                apply()
            ops.append(ch)
        elif ch == '(':
            ops.append(ch)
        elif ch == ')':
            while ops[-1] != '(':
                apply()
            ops.pop()
    while ops:
        apply()
    return out[0]


def numbers_of(s):
    return sorted(int(t) for t in ''.join(c if c.isdigit() else ' ' for c in s).split())


@pytest.mark.parametrize('n', [3, 4])
def test_countdown_solvable_by_construction(n):
    cfg = TaskConfig(n_numbers=n)
    rng = random.Random(0)
    for _ in range(50):
        p = make_countdown(rng, cfg)
        assert eval_expr(p.solution) == p.target
        assert numbers_of(p.solution) == sorted(p.numbers)
        assert 0 < p.solve_rate <= 1


def test_splits_disjoint_and_deterministic():
    cfg = TaskConfig()
    for kind in ('countdown', 'arithmetic'):
        tr = problems(kind, 'train', 300, 0, cfg)
        te = problems(kind, 'test', 100, 0, cfg)
        assert not {p.key for p in tr} & {p.key for p in te}
        assert all(in_test_split(p.key, cfg.test_frac) for p in te)
        assert [p.key for p in problems(kind, 'test', 100, 0, cfg)] == [p.key for p in te]
    # a different seed draws different train problems, never a test one
    tr2 = problems('countdown', 'train', 300, 1, cfg)
    assert not any(in_test_split(p.key, cfg.test_frac) for p in tr2)


def test_corpus_never_holds_held_out_problems():
    cfg = TaskConfig()
    cd_tr, ar_tr = problems('countdown', 'train', 300, 0, cfg), problems('arithmetic', 'train', 300, 0, cfg)
    test_prompts = {format_prompt(p) for p in problems('countdown', 'test', 300, 0, cfg)}
    rng = random.Random(0)
    for _ in range(500):
        doc = corpus_document(rng, cfg, cd_tr, ar_tr)
        assert doc.split('<think>')[0] not in test_prompts
    for p in ar_tr:  # an arithmetic drill must not spell out a held-out countdown answer
        assert not in_test_split(f"cd:{numbers_of(p.expr)}:{p.result}", cfg.test_frac)


@pytest.mark.parametrize('search', ['enumerate', 'random', 'sorted'])
def test_trace_computes_correctly_and_answers_with_last_attempt(search):
    cfg = TaskConfig(search=search, **tasks.WALK_PAST_HITS)   # the honest walk: no slips, no re-checks
    rng = random.Random(3)
    for p in problems('countdown', 'train', 40, 0, cfg):
        trace = countdown_trace(rng, p, cfg)
        think = trace.split('<think>')[1].split('</think>')[0]
        attempts = [a for a in think.split('.') if a]
        assert 1 <= len(attempts) <= cfg.max_attempts
        for a in attempts:
            *steps, vs, tgt, verdict = a.split(' ')
            assert vs == 'vs' and int(tgt) == p.target
            for st in steps:
                lhs, rhs = st.split('=')
                assert eval_expr(lhs) == int(rhs)
            assert verdict == ('yes' if int(steps[-1].split('=')[1]) == p.target else 'no')
        answer = trace.split('<answer>')[1].split('</answer>')[0]
        assert eval_expr(answer) == int(attempts[-1].split(' ')[-4].split('=')[1])
        assert numbers_of(answer) == sorted(p.numbers)


def test_enumerated_trace_is_a_contiguous_run_of_a_brute_force_walk():
    # independent twin of the canonical order: a plain triple loop over positions and operators
    cfg = TaskConfig(search='enumerate', **tasks.WALK_PAST_HITS)
    rng = random.Random(5)
    starts = set()
    for p in problems('countdown', 'train', 30, 0, cfg):
        walk, seen = [], set()
        n = p.numbers
        for i, j, k in [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]:
            for o1 in cfg.ops:
                for o2 in cfg.ops:
                    a, b, c = n[i], n[j], n[k]
                    if o1 in '+*' and a < b:  # commutative first moves are written larger-first
                        continue
                    r1 = {'+': a + b, '-': a - b if a > b else None, '*': a * b,
                          '/': a // b if b > 1 and a % b == 0 else None}[o1]
                    if r1 is None:
                        continue
                    r2 = {'+': r1 + c, '-': r1 - c if r1 > c else None, '*': r1 * c,
                          '/': r1 // c if c > 1 and r1 % c == 0 else None}[o2]
                    line = f"{a}{o1}{b}={r1} {r1}{o2}{c}={r2}"
                    if r2 is not None and line not in seen:
                        seen.add(line)
                        walk.append(line)
        think = countdown_trace(rng, p, cfg).split('<think>')[1].split('</think>')[0]
        lines = [a.rsplit(' vs ', 1)[0] for a in think.split('.') if a]
        s = walk.index(lines[0])
        starts.add(s)
        assert lines == [walk[(s + t) % len(walk)] for t in range(len(lines))]
    assert len(starts) > 5  # random starts: the samples of a group do not all begin the same walk
    with pytest.raises(ValueError, match='search'):
        countdown_trace(rng, p, TaskConfig(search='bfs'))


def test_stop_at_yes_is_the_chance_of_stopping_at_a_hit():
    ps = problems('countdown', 'train', 200, 0, TaskConfig())
    def verdicts(q):
        rng, out = random.Random(9), []
        for p in ps:
            cfg = TaskConfig(**{**tasks.WALK_PAST_HITS, 'stop_at_yes': q})
            think = countdown_trace(rng, p, cfg).split('<think>')[1].split('</think>')[0]
            out.append([a.endswith('yes') for a in think.split('.') if a])
        return out
    always = verdicts(1.0)
    assert all(True not in v[:-1] for v in always)            # never walks past a hit
    assert sum(v[-1] for v in always) > 20                    # and does stop on hits
    never = verdicts(0.0)
    assert sum(True in v[:-1] for v in never) > 20            # without it, writers walk past hits


def test_arithmetic_response_and_templates():
    cfg = TaskConfig()
    p = problems('arithmetic', 'test', 5, 0, cfg)[0]
    assert eval_expr(p.expr) == p.result
    assert arithmetic_response(p).endswith(f"<answer>{p.result}</answer>")
    assert format_prompt(p, 'r1zero').startswith(R1_ZERO_TEMPLATE[:40])
    assert format_prompt(p, 'r1zero').endswith(f"User: {p.prompt()}. Assistant:")
    with pytest.raises(ValueError, match='template'):
        format_prompt(p, 'nope')


def test_all_attempts_covers_the_known_solution():
    cfg = TaskConfig()
    p = problems('countdown', 'train', 1, 0, cfg)[0]
    att = all_attempts(p.numbers, cfg.ops)
    assert any(e == p.solution for _, _, e in att)
    assert all(eval_expr(e) == v for v, _, e in att)


@pytest.mark.parametrize('kw, words', [
    (dict(max_target=0), 'max_target must be >= 1'),      # `--max-target 0` used to make make_countdown spin
    (dict(lo=5, hi=3), 'lo=5, hi=3'),
    (dict(lo=0), 'lo=0'),
    (dict(n_numbers=1), 'n_numbers must be in 2..6, got 1'),
    (dict(n_numbers=7), 'n_numbers must be in 2..6, got 7'),
    (dict(ops=''), 'ops must be'),
    (dict(ops='+^'), r"ops must be .*'\+\^'"),
    (dict(task='gsm8k'), 'task must be one of'),
    (dict(template='qwen'), 'template must be one of'),
    (dict(n_numbers=4, min_numbers=5), 'min_numbers must be 0 or in 2..n_numbers=4, got 5'),
])
def test_task_config_refuses_nonsense(kw, words):
    with pytest.raises(ValueError, match=words):
        TaskConfig(**kw)


@pytest.mark.parametrize('kw', [dict(lo=1, hi=1, ops='-'),                   # 1-1 is not a move
                                dict(lo=1, hi=1, ops='/'),                   # nor is x/1
                                dict(n_numbers=4, lo=9, hi=9, ops='*')])     # 9^4 > max_target
def test_make_countdown_gives_up_on_impossible_fields(monkeypatch, kw):
    """Valid fields that admit no problem: make_countdown stops after COUNTDOWN_DRAWS draws, naming the fields.
    The guard turns the old endless loop into a failure instead of a hang."""
    real, draws = tasks.random_moves, []

    def counting(rng, numbers, ops):
        draws.append(numbers)
        if len(draws) > 20_000:
            raise RuntimeError("still drawing: make_countdown would spin forever")
        return real(rng, numbers, ops)
    monkeypatch.setattr(tasks, 'random_moves', counting)
    cfg = TaskConfig(**kw)
    with pytest.raises(ValueError) as e:
        problems('countdown', 'train', 10, 0, cfg)
    e.match(re.escape(f"no countdown problem in {tasks.COUNTDOWN_DRAWS} draws with n_numbers={cfg.n_numbers}, "
                      f"lo={cfg.lo}, hi={cfg.hi}, ops={cfg.ops!r}, max_target={cfg.max_target}"))
    assert len(draws) == tasks.COUNTDOWN_DRAWS


# -----------------------------------------------------------------------------
# task='tinyzero': TinyZero's countdown (Countdown-Tasks-3to4: 3-4 numbers in 1..100, targets 1..100)

TZ = TaskConfig(task='tinyzero', n_numbers=4, min_numbers=3, lo=1, hi=100, max_target=100, template='tinyzero')


def test_tinyzero_problems_at_its_distribution_and_solvable():
    ps = problems('countdown', 'train', 400, 0, TZ)
    assert {len(p.numbers) for p in ps} == {3, 4}
    assert 120 < sum(len(p.numbers) == 4 for p in ps) < 280               # each count equally likely
    assert all(1 <= x <= 100 for p in ps for x in p.numbers) and all(1 <= p.target <= 100 for p in ps)
    assert max(p.target for p in ps) > 90 and max(x for p in ps for x in p.numbers) > 90
    for p in ps:   # the known solution uses every number once and reaches the target (independent evaluator)
        assert eval_expr(p.solution) == p.target
        assert sorted(int(t) for t in re.findall(r'[0-9]+', p.solution)) == sorted(p.numbers)
    assert any(re.search(r'\d \S \(', p.solution) for p in ps)            # right-nested: not only left-deep chains
    test = problems('countdown', 'test', 100, 0, TZ)
    assert not {p.key for p in ps} & {p.key for p in test}
    assert [p.key for p in problems('countdown', 'train', 400, 0, TZ)] == [p.key for p in ps]


def test_tinyzero_prompts_are_tinyzeros_words():
    p = tasks.TinyZeroCountdown([44, 19, 35], 28, '(44 + 19) - 35', float('nan'))
    assert format_prompt(p, 'tinyzero') == (
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
        "assistant first thinks about the reasoning process in the mind and then provides the user with the answer.\n"
        "User: Using the numbers [44, 19, 35], create an equation that equals 28. You can use basic arithmetic "
        "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. "
        "And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.\n"
        "Assistant: Let me solve this step by step.\n<think>")
    chat = format_prompt(p, 'chat')
    assert chat.startswith("<|im_start|>system\nYou are a helpful assistant. You first thinks about the reasoning "
                           "process in the mind and then provides the user with the answer.<|im_end|>\n"
                           "<|im_start|>user\n Using the numbers [44, 19, 35], create an equation that equals 28.")
    assert chat.endswith("</answer>.<|im_end|>\n<|im_start|>assistant\nLet me solve this step by step.\n<think>")
    # the tiny world is unchanged: its default task and template
    q = problems('countdown', 'train', 1, 0, TaskConfig())[0]
    assert type(q) is tasks.Countdown and format_prompt(q, TaskConfig().template) == f"User: {q.prompt()}. Assistant:"


def test_curriculum_needs_difficulty_labels():
    ps = problems('countdown', 'train', 20, 0, TZ)
    assert all(p.solve_rate != p.solve_rate for p in ps)                  # nan: no label
    with pytest.raises(ValueError, match='difficulty labels'):
        rollouts.PromptSampler(ps, 'curriculum')
    assert len(rollouts.PromptSampler(ps, 'prioritized').draw(4)) == 4


class FixedRng:
    """A stand-in for random.Random whose every chance fires (random() -> u), whose count is the most
    (randint -> b) and whose walk starts at the front (randrange -> 0): the writer's path is then fixed."""

    def __init__(self, u):
        self.u = u

    def random(self):
        return self.u

    def randint(self, a, b):
        return b

    def randrange(self, n):
        return 0


def test_slips_rechecks_and_giving_up_by_hand():
    # make 24 from 3 2 4 with + and *: the walk (worked out by hand) is (3+2)+4=9, (3+2)*4=20, (3*2)+4=10,
    # (3*2)*4=24, (4+2)+3, ...
    p = tasks.Countdown([3, 2, 4], 24, '(3*2)*4', 0.0)
    cfg = dict(ops='+*', stop_at_yes=1.0, give_up=0.0, slip=0.0, recheck=0.0)
    # every miss slips and its redo catches it; the first real hit is redone too, confirmed, and ends the walk
    t = countdown_trace(FixedRng(0.0), p, TaskConfig(**{**cfg, 'slip': 1.0, 'recheck': 1.0}))
    assert t == ('<think>3+2=5 5+4=24 vs 24 yes.wait 5+4=9 vs 24 no.3+2=5 5*4=24 vs 24 yes.wait 5*4=20 vs 24 no.'
                 '3*2=6 6+4=24 vs 24 yes.wait 6+4=10 vs 24 no.3*2=6 6*4=24 vs 24 yes.wait 6*4=24 vs 24 yes.'
                 '</think><answer>(3*2)*4</answer>')
    # an under-thinking writer gives up after its first caught slip (a `no` like any other), answering with it
    t = countdown_trace(FixedRng(0.0), p, TaskConfig(**{**cfg, 'slip': 1.0, 'recheck': 1.0, 'give_up': 0.5}))
    assert t == '<think>3+2=5 5+4=24 vs 24 yes.wait 5+4=9 vs 24 no.</think><answer>(3+2)+4</answer>'
    # ... and after a plain `no` (u=0 < give_up)
    t = countdown_trace(FixedRng(0.0), p, TaskConfig(**{**cfg, 'give_up': 0.5}))
    assert t == '<think>3+2=5 5+4=9 vs 24 no.</think><answer>(3+2)+4</answer>'
    # a slip nobody re-checks is believed: the writer stops there and answers wrong
    t = countdown_trace(FixedRng(0.0), p, TaskConfig(**{**cfg, 'slip': 1.0}))
    assert t == '<think>3+2=5 5+4=24 vs 24 yes.</think><answer>(3+2)+4</answer>'
    # no chance fires (u=0.99): an honest walk to the first hit, stopping there (stop_at_yes=1)
    t = countdown_trace(FixedRng(0.99), p, TaskConfig(**{**cfg, 'slip': 0.5, 'recheck': 0.5, 'give_up': 0.5}))
    assert t == ('<think>3+2=5 5+4=9 vs 24 no.3+2=5 5*4=20 vs 24 no.3*2=6 6+4=10 vs 24 no.3*2=6 6*4=24 vs 24 yes.'
                 '</think><answer>(3*2)*4</answer>')
    assert tasks.self_checks(t) == (0, 0, 0, 1)
    with pytest.raises(ValueError, match='give_up'):
        TaskConfig(give_up=1.5)


def test_persistent_writers():
    # persist: the share of writers who never give up. give_up=1 makes everyone else answer after the first `no`
    p = tasks.Countdown([3, 2, 4], 24, '(3*2)*4', 0.0)
    cfg = dict(ops='+*', stop_at_yes=1.0, give_up=1.0)
    assert countdown_trace(FixedRng(0.0), p, TaskConfig(**cfg, persist=1.0)) == (
        '<think>3+2=5 5+4=9 vs 24 no.3+2=5 5*4=20 vs 24 no.3*2=6 6+4=10 vs 24 no.3*2=6 6*4=24 vs 24 yes.'
        '</think><answer>(3*2)*4</answer>')
    assert countdown_trace(FixedRng(0.0), p, TaskConfig(**cfg)) == \
        '<think>3+2=5 5+4=9 vs 24 no.</think><answer>(3+2)+4</answer>'
    # over many problems: of the traces whose first attempt misses, a share persist goes on
    vcfg = TaskConfig(give_up=1.0, persist=0.3, stop_at_yes=1.0)
    rng, on = random.Random(0), []
    for q in problems('countdown', 'train', 1500, 0, vcfg):
        checks = countdown_trace(rng, q, vcfg).split('</think>')[0].split('.')
        if checks[0].endswith('no'):
            on.append(len([c for c in checks if c]) > 1)
    assert len(on) > 1000 and abs(sum(on) / len(on) - 0.3) < 0.05


def test_persistent_writers_recheck():
    # persist_recheck is a persistent writer's re-check chance and recheck the others': u = 0 fires every chance
    # above 0. The persistent writer redoes every slip (the worked walk of test_slips_rechecks_and_giving_up_by_hand)
    p = tasks.Countdown([3, 2, 4], 24, '(3*2)*4', 0.0)
    cfg = dict(ops='+*', stop_at_yes=1.0, give_up=1.0, slip=1.0)
    assert countdown_trace(FixedRng(0.0), p, TaskConfig(**cfg, persist=1.0, persist_recheck=1.0)) == (
        '<think>3+2=5 5+4=24 vs 24 yes.wait 5+4=9 vs 24 no.3+2=5 5*4=24 vs 24 yes.wait 5*4=20 vs 24 no.'
        '3*2=6 6+4=24 vs 24 yes.wait 6+4=10 vs 24 no.3*2=6 6*4=24 vs 24 yes.wait 6*4=24 vs 24 yes.'
        '</think><answer>(3*2)*4</answer>')
    # ... and believes its first slip when only the others re-check; an under-thinker then redoes it and gives up
    believed = '<think>3+2=5 5+4=24 vs 24 yes.</think><answer>(3+2)+4</answer>'
    assert countdown_trace(FixedRng(0.0), p, TaskConfig(**cfg, persist=1.0, recheck=1.0)) == believed
    assert countdown_trace(FixedRng(0.0), p, TaskConfig(**cfg, persist_recheck=1.0)) == believed
    assert countdown_trace(FixedRng(0.0), p, TaskConfig(**cfg, recheck=1.0, persist_recheck=0.5)) == \
        '<think>3+2=5 5+4=24 vs 24 yes.wait 5+4=9 vs 24 no.</think><answer>(3+2)+4</answer>'
    # over many problems, no slips: of the traces that hit at once, those of persistent writers (a share persist)
    # are redone, the others not
    vcfg = TaskConfig(give_up=1.0, persist=0.4, persist_recheck=1.0, stop_at_yes=1.0, recheck_kind='attempt')
    rng, redone = random.Random(0), []
    for q in 2 * problems('countdown', 'train', 1500, 0, vcfg):
        t = countdown_trace(rng, q, vcfg)
        if t.split('.')[0].endswith('yes'):
            redone.append('wait' in t)
    assert len(redone) > 150 and abs(sum(redone) / len(redone) - 0.4) < 0.1
    with pytest.raises(ValueError, match='persist_recheck'):
        TaskConfig(persist_recheck=-0.1)
    # a world re-checks when either kind of writer does (the forced re-check is measured there)
    assert TaskConfig(persist_recheck=0.4).rechecks and TaskConfig(recheck=0.1).rechecks and not TaskConfig().rechecks


def test_under_thinking_corpus_rates():
    # the writer's chances, counted over many traces: one attempt, then a `no` ends the trace with chance give_up;
    # a believed `yes` is redone with chance recheck; a miss slips with chance slip
    cfg = TaskConfig(give_up=0.6, slip=0.15, recheck=0.3, stop_at_yes=1.0)
    rng, ps = random.Random(0), problems('countdown', 'train', 600, 0, cfg)
    nos = ends_after_no = yes = redone = misses = slips = 0
    for p in ps:
        think = countdown_trace(rng, p, cfg).split('<think>')[1].split('</think>')[0]
        checks = [c for c in think.split('.') if c]
        for i, c in enumerate(checks):
            last = i == len(checks) - 1
            if c.startswith('wait'):
                continue
            steps, verdict = c.split(' vs ')[0].split(' '), c.split(' ')[-1]
            a, b = steps[-1].split('=')
            slipped = eval_expr(a) != int(b)
            misses += slipped or verdict == 'no'
            slips += slipped
            caught = not last and checks[i + 1].startswith('wait') and checks[i + 1].endswith('no')
            if verdict == 'yes':
                yes += 1
                redone += not last and checks[i + 1].startswith('wait')
            if verdict == 'no' or caught:
                nos += 1
                ends_after_no += last or (caught and i + 1 == len(checks) - 1)
    assert abs(ends_after_no / nos - 0.6) < 0.06 and abs(redone / yes - 0.3) < 0.07
    assert abs(slips / misses - 0.15) < 0.04


def test_rechecks_of_the_whole_attempt_by_hand():
    # recheck_kind='attempt': the redo rewrites every step of the attempt, computed right (the same walk as above)
    p = tasks.Countdown([3, 2, 4], 24, '(3*2)*4', 0.0)
    cfg = dict(ops='+*', stop_at_yes=1.0, give_up=0.5, slip=1.0, recheck=1.0, recheck_kind='attempt')
    t = countdown_trace(FixedRng(0.0), p, TaskConfig(**cfg))                 # a step slip, caught, then given up
    assert t == '<think>3+2=5 5+4=24 vs 24 yes.wait 3+2=5 5+4=9 vs 24 no.</think><answer>(3+2)+4</answer>'
    t = countdown_trace(FixedRng(0.0), p, TaskConfig(**{**cfg, 'slip_kind': 'verdict', 'give_up': 0.0}))
    assert t == ('<think>3+2=5 5+4=9 vs 24 yes.wait 3+2=5 5+4=9 vs 24 no.3+2=5 5*4=20 vs 24 yes.wait 3+2=5 5*4=20 vs'
                 ' 24 no.3*2=6 6+4=10 vs 24 yes.wait 3*2=6 6+4=10 vs 24 no.3*2=6 6*4=24 vs 24 yes.wait 3*2=6 6*4=24'
                 ' vs 24 yes.</think><answer>(3*2)*4</answer>')
    assert tasks.self_checks(t) == (4, 3, 3, 4)   # four yes verdicts, each redone (the redos' own are not counted)
    # the default redoes the last step only, and draws the same chances: the corpus of recheck_kind 'step' is the
    # one every earlier run trained on
    redone = 0
    for seed in range(20):
        kw = {**cfg, 'slip': 0.3, 'recheck': 0.5}
        a = countdown_trace(random.Random(seed), p, TaskConfig(**kw))
        b = countdown_trace(random.Random(seed), p, TaskConfig(**{**kw, 'recheck_kind': 'step'}))
        assert re.sub(r'wait \d+[-+*/]\d+=\d+ ', 'wait ', a) == b
        redone += 'wait' in a
    assert redone >= 5
    with pytest.raises(ValueError, match='recheck_kind'):
        TaskConfig(recheck_kind='twice')


def test_self_checks_counts_rechecks_and_wrong_steps():
    t = ('<think>9-3=6 6+5=24 vs 24 yes.wait 6+5=11 vs 24 no.7/2=3 3*8=24 vs 24 yes.wait 3*8=24 vs 24 yes.'
         '</think><answer>(7/2)*8</answer>')
    assert tasks.self_checks(t) == (2, 1, 2, 2)         # 6+5=24 and 7/2=3 (not exact) are wrong steps
    assert tasks.self_checks('<think>8-9=1 vs 1 yes.</think>') == (0, 0, 1, 1)   # no negative moves either
    assert tasks.self_checks('') == (0, 0, 0, 0)
    # yes verdicts are the attempts', after the think block nothing counts, and a redo may follow a `no`
    t = '<think>2+2=4 vs 5 no.wait 2+2=4 vs 5 no.1+4=5 vs 5 yes.</think><answer>1+4</answer> 3=3 vs 3 yes.'
    assert tasks.self_checks(t) == (1, 1, 0, 1)


def test_first_yes_end_by_hand():
    # the end of the first attempt that says yes; a redo's yes does not count, nor anything after the think block
    t = '<think>2+2=4 vs 5 no.wait 2+2=4 vs 4 yes.1+4=5 vs 5 yes.2+3=5 vs 5 yes.</think><answer>1+4</answer>'
    assert t[:tasks.first_yes_end(t)] == '<think>2+2=4 vs 5 no.wait 2+2=4 vs 4 yes.1+4=5 vs 5 yes.'
    assert tasks.first_yes_end('<think>3*2=6 6*4=24 vs 24 yes.</think>') == len('<think>3*2=6 6*4=24 vs 24 yes.')
    assert tasks.first_yes_end('<think>2+2=4 vs 5 no.</think><answer>x</answer> 1+4=5 vs 5 yes.') is None
    assert tasks.first_yes_end('') is None


def test_copy_slips_by_hand():
    p = tasks.Countdown([7, 6, 5], 210, '(7*6)*5', 0.0)
    # a target copied as the result: right arithmetic and a consistent verdict, so self_checks sees no slip
    t = '<think>7*5=35 35+6=41 vs 41 yes.wait 7*5=35 35+6=41 vs 210 no.7*6=42 42*5=210 vs 210 yes.</think><answer>x'
    assert tasks.copy_slips(t, p) == (1, 0) and tasks.self_checks(t)[2] == 0
    # operands: a first step's two and a later step's right one come from the prompt (8 and 4 do not); a later
    # step's left operand is the previous result; after the think block nothing counts
    t = '<think>8*5=40 40+6=46 vs 210 no.7*4=28 28*5=140 vs 210 no.</think><answer>3+3=6 vs 5 no.</answer>'
    assert tasks.copy_slips(t, p) == (0, 2)
    assert tasks.copy_slips('', p) == (0, 0)
    # the corpus writers copy right: no trace of tiny's world has a copy slip, though its verdicts slip
    rng, cfg = random.Random(1), TaskConfig(**tasks.UNDER_THINKER)
    pairs = [(q, countdown_trace(rng, q, cfg)) for q in problems('countdown', 'train', 300, 1, cfg)]
    assert all(tasks.copy_slips(t, q) == (0, 0) for q, t in pairs)
    assert sum(tasks.self_checks(t)[2] for _, t in pairs) > 0
    # and it does see a wrong copy: the same traces, checked against another problem's numbers and target
    other = tasks.Countdown([1, 1, 1], 1000, '', 0.0)
    assert all(sum(tasks.copy_slips(t, other)) > 0 for _, t in pairs)


def test_verdict_slips_by_hand():
    # slip_kind='verdict': the arithmetic stays right and the check says yes to a miss (5+4=9 vs 24 yes.); the redo
    # of the last step says no. Same walk as test_slips_rechecks_and_giving_up_by_hand: (3+2)+4=9, (3+2)*4=20, ...
    p = tasks.Countdown([3, 2, 4], 24, '(3*2)*4', 0.0)
    cfg = dict(ops='+*', stop_at_yes=1.0, give_up=0.0, slip=1.0, slip_kind='verdict')
    t = countdown_trace(FixedRng(0.0), p, TaskConfig(**cfg, recheck=1.0))
    assert t == ('<think>3+2=5 5+4=9 vs 24 yes.wait 5+4=9 vs 24 no.3+2=5 5*4=20 vs 24 yes.wait 5*4=20 vs 24 no.'
                 '3*2=6 6+4=10 vs 24 yes.wait 6+4=10 vs 24 no.3*2=6 6*4=24 vs 24 yes.wait 6*4=24 vs 24 yes.'
                 '</think><answer>(3*2)*4</answer>')
    assert tasks.self_checks(t) == (4, 3, 3, 4)         # three wrong verdicts, each caught by its redo
    t = countdown_trace(FixedRng(0.0), p, TaskConfig(**cfg, recheck=0.0))   # believed: stops there, answers wrong
    assert t == '<think>3+2=5 5+4=9 vs 24 yes.</think><answer>(3+2)+4</answer>'
    # every step of a verdict-slipping corpus is right: its slips are in the verdicts only
    rng, vcfg = random.Random(0), TaskConfig(**tasks.UNDER_THINKER)   # tiny's writer
    traces = [countdown_trace(rng, q, vcfg) for q in problems('countdown', 'train', 300, 0, vcfg)]
    steps = [s for t in traces for s in tasks._STEP.findall(t)]
    assert steps and all(tasks.apply_move(int(a), op, int(b)) == int(r) for a, op, b, r in steps)
    assert any(tasks.self_checks(t)[2] for t in traces)
    with pytest.raises(ValueError, match='slip_kind'):
        TaskConfig(slip_kind='digit')
