"""
Every stage under torchrun: 2 gloo ranks on CPU end with the weights of one process on the same global batch.
pretrain (DDP: one process's micro-batches split over the ranks); grpo for every loss type, with and without DAPO's
dynamic sampling, with Kimi's partial rollouts; sharded evaluation; sft, rs, distill (logits) and long2short dpo;
a killed 2-rank partial-rollout grpo run resumed. The reference is one process running the same `worker` here, in this process; the 2 ranks run it as one
torchrun launch of this file (starting python and torch is most of a run's cost on CPU), then a second launch
resumes the run the first one killed.
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_dist.py -q
"""
import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import distill      # noqa: E402
import harness      # noqa: E402
import long2short   # noqa: E402
import report       # noqa: E402
import rollouts     # noqa: E402
import sample       # noqa: E402
import train        # noqa: E402
from tasks import TaskConfig, problems   # noqa: E402

# every run: the test preset, 3 steps; 3 prompts split 1 / 2 over the ranks, so the rank with fewer rows runs a
# zero-weight micro-batch; --rl-micro 4 (one group) makes one process's micro-batches those of the two ranks
GRPO = ['--preset', 'test', '--stage', 'grpo', '--rl-steps', '3', '--rl-prompts', '3', '--rl-micro', '4',
        '--n-eval', '5', '--rl-eval-interval', '3', '--threads', '1']
RUNS = {   # together: every loss type, dynamic sampling on and off, prioritized sampling, mu = 2, batch std, compile
    'grpo': ['--loss-type', 'grpo', '--dynamic-sampling', '--prompt-sampling', 'prioritized'],
    'dapo': ['--loss-type', 'dapo', '--dynamic-sampling', '--rl-mu', '2', '--adv-scale', 'batch'],
    'dr_grpo': ['--loss-type', 'dr_grpo', '--dynamic-sampling', '--mask-truncated'],
    # one prompt: rank 0 generates nothing and trains group 0 at weight 0
    'kimi': ['--loss-type', 'kimi', '--rl-prompts', '1'],
    # bnpo is a token mean over each rank's own rows: one process's loss only when the ranks hold as many tokens,
    # so an even split (4 prompts) and no stop token at all (every response runs to max_new_tokens)
    'bnpo': ['--loss-type', 'bnpo', '--rl-prompts', '4'],
    # the update's forwards (policy, old policy, reference) through torch.compile (test_rl.py holds it to eager)
    'compiled': ['--loss-type', 'dapo', '--rl-mu', '2', '--compile'],
    # Kimi's partial rollouts: 8 tokens a pass of 24, a buffer of unfinished groups carried between steps (every
    # rank holds all of it and generates its share of each pass's rows; repeat detection, tests/test_sampling.py,
    # reads the gathered rows, but this base never repeats a 4-gram)
    'partial': ['--loss-type', 'grpo', '--rollout-budget', '8', '--dynamic-sampling', '--prompt-sampling',
                'prioritized'],
}
SFT = ['--preset', 'test', '--threads', '1', '--sft-steps', '3', '--sft-batch-size', '5', '--max-new-tokens', '60',
       '--n-eval', '4']
STAGES = {   # name: flags (the base is the init, the rs policy and base, and the distillation teacher)
    'sft': ['--stage', 'sft', '--sft-examples', '16'],
    'rs': ['--stage', 'rs', '--rs-problems', '7', '--rs-samples', '2', '--rs-general', '4'],
    'distill': ['--stage', 'distill', '--distill-mode', 'logits', '--rs-problems', '7', '--rs-samples', '2'],
}
# pretrain's global batch of 4: one process x 2 micro-batches of 2 == 2 ranks x 1 micro-batch of 2
PRETRAIN = ['--preset', 'test', '--stage', 'pretrain', '--log-interval', '1', '--pt-steps', '4', '--pt-batch-size', '2',
            '--threads', '1']
EARLY = set(range(40, 2048, 16))
STOPS = {'extra': EARLY}   # what generate stops at besides eos; None: nothing


@contextlib.contextmanager
def varied(base):
    """The test preset's base never answers right and never stops before max_new_tokens. Make one token in 16 a
    stop token (varied lengths: token counts differ between ranks), reward a text by its characters (groups
    with and without variance: dynamic sampling drops and refills) and call such a text correct (rs, distill
    and dpo get data). Plots are not compared here and cost a second each: skipped."""
    saved = sample.generate, report.generate, train.rl_rewards, distill.is_correct, rollouts.generate
    plots = distill.plot_curves, report.plot_curves

    def generate(model, prompts, max_new_tokens, stop_ids, *args, **kw):
        stops = set() if STOPS['extra'] is None else set(stop_ids) | STOPS['extra']
        return saved[0](model, prompts, max_new_tokens, stops, *args, **kw)

    def rl_rewards(texts, *args, **kwargs):
        acc = torch.tensor([float(sum(map(ord, t)) % 3 == 0) for t in texts])
        return acc, {'accuracy': acc, 'format': torch.zeros_like(acc)}
    sample.generate = report.generate = rollouts.generate = generate
    train.rl_rewards, distill.is_correct = rl_rewards, lambda text, p: sum(map(ord, text)) % 3 == 0
    distill.plot_curves = report.plot_curves = lambda *a, **kw: None
    try:
        yield
    finally:
        sample.generate, report.generate, train.rl_rewards, distill.is_correct, rollouts.generate = saved
        distill.plot_curves, report.plot_curves = plots


def worker(out, base, kill=False, resume=False):
    """What both sides run: pretrain, the grpo runs, an evaluation, the SFT stages, dpo; under torchrun last a grpo
    run killed after its step-2 checkpoint (kill), or, in the second launch, that run resumed (resume)."""
    if not resume:
        train.main(PRETRAIN + ['--pt-grad-accum', str(2 // harness.rank_world()[1]), '--out-dir', f'{out}/pretrain'])
    with varied(base):
        killed = GRPO + RUNS['partial'] + ['--init-from', base, '--out-dir', f'{out}/killed', '--ckpt-interval', '2']
        if resume:
            return train.main(killed + ['--resume'])
        for name, flags in RUNS.items():
            STOPS['extra'] = None if name == 'bnpo' else EARLY
            train.main(GRPO + flags + ['--init-from', base, '--out-dir', f'{out}/{name}'])
        STOPS['extra'] = EARLY
        model, tok, ck = harness.load_policy(base, 'cpu')
        probs = problems('countdown', 'test', 7, ck['train_config']['seed'], TaskConfig())
        evals = {'greedy': report.evaluate(model, tok, probs, 'countdown', 'short', 24, batch_size=4),
                 'sampled': report.evaluate(model, tok, probs, 'countdown', 'short', 24, batch_size=4, k=3,
                                             temperature=1.0, seed=5, detail=True)}
        for name, flags in STAGES.items():
            train.main(SFT + flags + ['--init-from', base, '--rs-base', base, '--teacher-from', base,
                                      '--out-dir', f'{out}/{name}'])
        long2short.main(['dpo', '--from', f'{out}/kimi/grpo/ckpt.pt', '--out-dir', f'{out}/l2s', '--n-problems', '6',
                         '--n-samples', '4', '--dpo-steps', '3', '--dpo-batch-size', '3', '--n-eval', '4',
                         '--threads', '1', '--device', 'cpu'])
        if harness.rank_world()[0] == 0:
            report.write_json(f'{out}/worker.json', {'evals': evals, 'world': harness.rank_world()[1]})
        if kill:
            train.main(killed + ['--exit-after', '2'])


def torchrun(*args):
    # --standalone: the rendezvous binds a free port itself (a port picked here could be taken before it binds)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.abspath(__file__), *args]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def base(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('base'))
    train.main(['--preset', 'test', '--stage', 'pretrain', '--out-dir', out, '--threads', '1'])
    return os.path.join(out, 'pretrain', 'ckpt.pt')


@pytest.fixture(scope='module')
def one(base, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('one'))
    worker(out, base)
    return out


@pytest.fixture(scope='module')
def two(base, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('two'))
    p = torchrun(out, base, 'kill')
    # the kill: rank 0 wrote the step-2 checkpoint, every rank exits 3
    assert p.returncode != 0 and 'exitcode  : 3' in p.stderr and os.path.isfile(f'{out}/worker.json'), \
        p.stdout[-3000:] + p.stderr[-5000:]
    p = torchrun(out, base, 'resume')
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return out


def weights(path):
    return torch.load(path, weights_only=True)['model']


def same_weights(a, b, atol=1e-5):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    assert worst <= atol, f"max |difference| {worst:.2e} between {a} and {b}"
    return worst


def metrics(path):
    return [json.loads(line) for line in open(path)]


def test_pretrain_two_ranks_match_one_process(one, two):
    l1, l2 = (metrics(f'{d}/pretrain/pretrain/metrics.jsonl') for d in (one, two))
    assert len(l1) == len(l2) == 4
    for r1, r2 in zip(l1, l2):
        assert abs(r1['loss'] - r2['loss']) < 1e-4, (r1, r2)


@pytest.mark.parametrize('name', list(RUNS))
def test_grpo_two_ranks_match_one_process(one, two, base, name):
    a, b = f'{one}/{name}/grpo', f'{two}/{name}/grpo'
    same_weights(f'{a}/ckpt.pt', f'{b}/ckpt.pt')
    init = weights(base)
    assert any(not torch.equal(v, init[k]) for k, v in weights(f'{a}/ckpt.pt').items())   # it did train
    ra, rb = metrics(f'{a}/metrics.jsonl'), metrics(f'{b}/metrics.jsonl')
    assert [r['step'] for r in ra] == [r['step'] for r in rb] == [0, 1, 2, 3]
    for x, y in zip(ra, rb):   # the same rollouts, kept groups and rounds; the ranks' shares of every metric
        assert x.keys() == y.keys()
        for k in set(x) - {'step_seconds'}:
            assert x[k] == (None if y[k] is None else pytest.approx(y[k], rel=1e-4, abs=1e-6)), (name, k, x, y)
    if name == 'bnpo':
        assert all(r['response_len'] == 24 for r in ra[1:])   # as many tokens on each rank
    sa, sb = (json.load(open(f'{d}/summary.json')) for d in (a, b))
    assert {k: v for k, v in sa.items() if 'wall' not in k} == {k: v for k, v in sb.items() if 'wall' not in k}


def test_dynamic_sampling_refilled(one):
    rounds = [r.get('rollout_rounds', 1) for n in RUNS if '--dynamic-sampling' in RUNS[n]
              for r in metrics(f'{one}/{n}/grpo/metrics.jsonl')]
    assert max(rounds) > 1   # some step dropped groups and drew more: rounds decided on the gathered rewards


def test_sharded_evaluation_matches_one_process(one, two):
    wa, wb = json.load(open(f'{one}/worker.json')), json.load(open(f'{two}/worker.json'))
    assert (wa['world'], wb['world']) == (1, 2)
    assert wa['evals'] == wb['evals']   # greedy and sampled: each sample drawn from its own seed
    assert wb['evals']['sampled']['mean_tokens'] < 24   # the early stops vary the lengths being compared


@pytest.mark.parametrize('name', list(STAGES) + ['dpo'])
def test_sft_stages_and_dpo_match_one_process(one, two, name):
    d = 'l2s/dpo' if name == 'dpo' else f'{name}/{name}'
    same_weights(f'{one}/{d}/ckpt.pt', f'{two}/{d}/ckpt.pt')
    ra, rb = metrics(f'{one}/{d}/metrics.jsonl'), metrics(f'{two}/{d}/metrics.jsonl')
    assert len(ra) == len(rb) == 3
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys() and all(x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6) for k in x), (x, y)
    sa, sb = (json.load(open(f'{run}/{d}/summary.json')) for run in (one, two))
    for k in ('n_examples', 'n_correct_samples', 'n_pairs', 'countdown_pass@1', 'mean_response_tokens'):
        assert sa.get(k) == sb.get(k), k   # every rank sampled its shard; the gathered data is one process's


def test_killed_torchrun_grpo_resumes_to_the_same_weights(two):
    same_weights(f'{two}/partial/grpo/ckpt.pt', f'{two}/killed/grpo/ckpt.pt', atol=0)   # the buffer resumed too
    ra, rb = metrics(f'{two}/partial/grpo/metrics.jsonl'), metrics(f'{two}/killed/grpo/metrics.jsonl')
    assert [r['step'] for r in rb] == [0, 1, 2, 3]
    for x, y in zip(ra, rb):
        assert {k: v for k, v in x.items() if k != 'step_seconds'} == \
            {k: v for k, v in y.items() if k != 'step_seconds'}


def test_partial_rollouts_carried_groups_over(one):
    rows = metrics(f'{one}/partial/grpo/metrics.jsonl')[1:]
    assert any(r['buffer_groups'] > 0 for r in rows)          # groups waited in the buffer between steps
    assert any(r['continued_token_frac'] > 0 for r in rows)   # and were trained on their newest segments


if __name__ == '__main__':   # a torchrun rank: tests/test_dist.py OUT BASE kill|resume
    harness.setup_distributed()   # one process group for every stage the worker runs
    worker(sys.argv[1], sys.argv[2], kill=sys.argv[3] == 'kill', resume=sys.argv[3] == 'resume')
