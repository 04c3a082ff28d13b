"""
End-to-end tests of train.py on the 'test' preset (seconds each): resume after a kill, DDP equivalence,
clear errors. Run: python -m pytest tests/test_train.py -q
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT}


def run(args, check=True, torchrun=False):
    cmd = ([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29533']
           if torchrun else [sys.executable]) + [os.path.join(ROOT, 'train.py')] + args
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def losses(out):
    return [json.loads(l) for l in open(os.path.join(out, 'pretrain', 'metrics.jsonl'))]


BASE = ['--preset', 'test', '--stage', 'pretrain', '--log-interval', '1', '--pt-steps', '6']


def test_pretrain_writes_outputs(tmp_path):
    out = str(tmp_path / 'run')
    run(BASE + ['--out-dir', out])
    s = json.load(open(os.path.join(out, 'pretrain', 'summary.json')))
    for k in ('params', 'wall_seconds', 'final_train_loss', 'final_val_loss', 'base_arith_acc', 'base_countdown_pass@1'):
        assert k in s, k
    assert os.path.isfile(os.path.join(out, 'pretrain', 'ckpt.pt'))
    assert os.path.isfile(os.path.join(out, 'pretrain', 'loss.png'))
    rows = losses(out)
    assert [r['step'] for r in rows] == list(range(6))
    assert rows[-1]['loss'] < rows[0]['loss']


def test_killed_run_resumes_to_the_same_loss(tmp_path):
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    run(BASE + ['--out-dir', a])
    p = run(BASE + ['--out-dir', b, '--exit-after', '3'], check=False)   # dies right after the step-3 checkpoint
    assert p.returncode == 3 and not os.path.exists(os.path.join(b, 'pretrain', 'summary.json'))
    run(BASE + ['--out-dir', b, '--resume'])
    la, lb = losses(a), losses(b)
    assert [r['step'] for r in lb] == list(range(6))        # the log continues where it stopped
    for ra, rb in zip(la, lb):
        assert abs(ra['loss'] - rb['loss']) < 1e-4
    sa = json.load(open(os.path.join(a, 'pretrain', 'summary.json')))
    sb = json.load(open(os.path.join(b, 'pretrain', 'summary.json')))
    assert abs(sa['final_train_loss'] - sb['final_train_loss']) < 1e-4
    assert abs(sa['final_val_loss'] - sb['final_val_loss']) < 1e-4


def test_torchrun_two_ranks_match_one_process(tmp_path):
    one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
    # same global batch: 1 process x 2 micro-batches of 2 == 2 ranks x 1 micro-batch of 2
    run(BASE + ['--out-dir', one, '--pt-batch-size', '2', '--pt-grad-accum', '2', '--pt-steps', '4'])
    run(BASE + ['--out-dir', two, '--pt-batch-size', '2', '--pt-grad-accum', '1', '--pt-steps', '4'], torchrun=True)
    l1, l2 = losses(one), losses(two)
    assert len(l1) == len(l2) == 4
    for r1, r2 in zip(l1, l2):
        assert abs(r1['loss'] - r2['loss']) < 1e-4, (r1, r2)


@pytest.mark.parametrize('args,needle', [
    (['--n-head', '0'], '--n-head must be >= 1'), (['--ckpt-interval', '0'], '--ckpt-interval must be > 0'),
    (['--rl-micro', '0'], '--rl-micro must be > 0'), (['--rl-prompts', '0'], '--rl-prompts must be > 0'),
    (['--resume', 'maybe'], 'argument --resume: expected true or false'),
    (['--max-new-tokens', '-1'], '--max-new-tokens must be > 0'), (['--rl-group', '1'], '--rl-group must be >= 2'),
    (['--lo', '9', '--hi', '1'], '--lo <= --hi'), (['--max-target', '0'], '--max-target must be >= 1'),
    (['--pt-steps', '0'], '--pt-steps must be > 0'), (['--temperature', '0'], '--temperature must be > 0'),
    (['--pt-batch-size', '0'], '--pt-batch-size must be > 0'), (['--pt-lr', 'nan'], '--pt-lr must be > 0'),
    (['--max-new-tokens', '300'], 'leaves no room for the prompt'), (['--loss-type', 'ppo'], '--loss-type must be one of'),
    (['--preset', 'nope'], "unknown preset 'nope'"),
    (['--preset', 'test', '--no-such-flag', '1'], 'unrecognized arguments: --no-such-flag'),
    (['--preset', 'test', '--stage', 'dance'], "unknown stage 'dance'"),
    (['--preset', 'test', '--n-head', '3', '--n-kv-head', '2'], 'must be a multiple of --n-kv-head'),
])
def test_bad_input_gives_one_line_error(args, needle):
    p = run(args if args[0] == '--preset' else ['--preset', 'test'] + args, check=False)
    assert p.returncode != 0
    err = p.stderr.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_out_dir_that_is_a_file(tmp_path):
    f = tmp_path / 'afile'
    f.write_text('x')
    p = run(['--preset', 'test', '--out-dir', str(f)], check=False)
    assert p.returncode != 0 and 'is a file' in p.stderr and len(p.stderr.strip().splitlines()) == 1


def one_line_error(p, *needles):
    err = p.stderr.strip()
    assert p.returncode != 0 and len(err.splitlines()) == 1 and all(n in err for n in needles), err


def test_incompatible_checkpoint_and_missing_checkpoint(tmp_path):
    out = str(tmp_path / 'run')
    run(BASE + ['--out-dir', out, '--pt-steps', '4', '--ckpt-interval', '2', '--exit-after', '2'], check=False)
    one_line_error(run(BASE + ['--out-dir', out, '--pt-steps', '4', '--resume', '--n-embd', '48'], check=False),
                   'differ from the run that wrote it', "'n_embd': (32, 48)")
    # another seed draws other BPE merges: the trained ids would mean other tokens
    one_line_error(run(BASE + ['--out-dir', out, '--pt-steps', '4', '--resume', '--seed', '7'], check=False),
                   "'seed': (1337, 7)")
    one_line_error(run(BASE + ['--out-dir', out, '--pt-steps', '4', '--resume', '--pt-lr', '1e-2'], check=False),
                   "'pt_lr'")
    p = run(['--preset', 'test', '--stage', 'grpo', '--out-dir', str(tmp_path / 'empty')], check=False)
    assert p.returncode != 0 and 'no checkpoint at' in p.stderr


def test_bench_model_measures_a_preset():
    """bench.py model builds each named preset's model and prints one row per preset; an unknown one is an error."""
    bench = [sys.executable, os.path.join(ROOT, 'bench.py'), 'model', '--device', 'cpu', '--rows', '2',
             '--new-tokens', '3', '--iters', '1', '--threads', '1']
    p = subprocess.run(bench + ['--presets', 'test,tiny'], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in p.stdout.splitlines()[2:]}
    assert set(rows) == {'test', 'tiny'}
    assert int(rows['tiny'][0].replace(',', '')) > int(rows['test'][0].replace(',', ''))  # params
    p = subprocess.run(bench + ['--presets', 'nope'], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "unknown preset 'nope'" in p.stderr


def test_a_finished_stage_is_kept_and_reported(tmp_path):
    """A fresh run into a directory that holds a checkpoint refuses without --overwrite (before any work), and
    --resume of a finished stage reports it instead of re-running it or rewriting its summary."""
    out = str(tmp_path / 'run')
    run(BASE + ['--out-dir', out])
    ck = os.path.join(out, 'pretrain', 'ckpt.pt')
    before = open(ck, 'rb').read(), open(os.path.join(out, 'pretrain', 'summary.json')).read()
    one_line_error(run(BASE + ['--out-dir', out, '--pt-steps', '2'], check=False), 'exists', '--overwrite')
    p = run(BASE + ['--out-dir', out, '--resume'])
    assert 'finished already' in p.stdout
    assert (open(ck, 'rb').read(), open(os.path.join(out, 'pretrain', 'summary.json')).read()) == before
    run(BASE + ['--out-dir', out, '--pt-steps', '2', '--overwrite'])
    assert torch.load(ck, weights_only=True)['step'] == 2


def test_a_diverging_run_stops_and_keeps_its_checkpoint(tmp_path):
    """A huge learning rate makes the loss non-finite: the run stops with one line naming the step and the
    quantity, exits non-zero, and the last good checkpoint stays on disk untouched."""
    out = str(tmp_path / 'run')
    args = BASE + ['--out-dir', out, '--pt-steps', '6', '--ckpt-interval', '1', '--pt-warmup', '1',
                   '--pt-grad-clip', '0']
    p = run(args + ['--pt-lr', '1e30'], check=False)
    last = p.stderr.strip().splitlines()[-1]   # after tqdm's progress lines
    assert p.returncode != 0 and last.startswith('train.py: error: step ') and ' is nan' in last, p.stderr
    ck = torch.load(os.path.join(out, 'pretrain', 'ckpt.pt'), weights_only=True)
    assert all(bool(torch.isfinite(v).all()) for v in ck['model'].values() if v.is_floating_point())
    assert not os.path.exists(os.path.join(out, 'pretrain', 'summary.json'))


def test_unreadable_checkpoints_give_one_line_naming_the_file(tmp_path):
    torn = tmp_path / 'torn.pt'
    run(BASE + ['--out-dir', str(tmp_path / 'run'), '--pt-steps', '2'])
    torn.write_bytes(open(tmp_path / 'run' / 'pretrain' / 'ckpt.pt', 'rb').read()[:5000])   # a kill mid-copy
    foreign = tmp_path / 'foreign.pt'
    torch.save({'weights': torch.zeros(2)}, foreign)
    text = tmp_path / 'text.pt'
    text.write_text('not a checkpoint')
    for path, needle in ((torn, 'is not a readable checkpoint'), (foreign, 'missing'), (text, 'is not a readable')):
        one_line_error(run(['--preset', 'test', '--stage', 'grpo', '--out-dir', str(tmp_path / 'g'), '--init-from',
                            str(path)], check=False), str(path), needle)
