"""
End-to-end tests of train.py on the 'test' preset (seconds each): resume after a kill, clear errors (DDP
equivalence: test_dist.py). Starting python and importing torch costs seconds a process on CPU, so most runs call
train.main in this process; a subprocess remains where the process itself is under test: the kill (--exit-after
hard-exits), the command line's one-line error on stderr, a diverging run's last line on stderr. (run() also starts
torchrun, for test_realckpt.py.)
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_train.py -q
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT}
sys.path.insert(0, ROOT)
import bench  # noqa: E402
import train  # noqa: E402


def run(args, check=True, torchrun=False):
    cmd = ([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
           if torchrun else [sys.executable]) + [os.path.join(ROOT, 'train.py')] + args
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def main(args):
    """train.main in this process; --threads 1 as a subprocess's OMP_NUM_THREADS=1 (the same sums, the same losses)."""
    return train.main(args + ['--threads', '1'])


def dies(capsys, args, *needles):
    """train.main(args) in this process stops as harness.die does: SystemExit with a one-line message naming every
    needle (python prints it as the one line on stderr and exits 1), and nothing else written to stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(args)
    msg, err = e.value.code, capsys.readouterr().err
    assert isinstance(msg, str) and ': error: ' in msg and '\n' not in msg, msg
    assert all(n in msg for n in needles) and err == '', (msg, err)
    return msg


def losses(out):
    return [json.loads(l) for l in open(os.path.join(out, 'pretrain', 'metrics.jsonl'))]


BASE = ['--preset', 'test', '--stage', 'pretrain', '--log-interval', '1', '--pt-steps', '6']


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    """One finished BASE run, shared: tests read it or copy it, none writes into it."""
    out = str(tmp_path_factory.mktemp('pretrained') / 'run')
    main(BASE + ['--out-dir', out])
    return out


@pytest.fixture(scope='module')
def killed(tmp_path_factory):
    """The same run killed right after its step-3 checkpoint (a hard exit: a process of its own), shared: tests
    copy it before they resume it."""
    out = str(tmp_path_factory.mktemp('killed') / 'run')
    p = run(BASE + ['--out-dir', out, '--exit-after', '3'], check=False)
    assert p.returncode == 3 and not os.path.exists(os.path.join(out, 'pretrain', 'summary.json')), p.stderr[-3000:]
    assert os.path.isfile(os.path.join(out, 'pretrain', 'ckpt.pt'))
    return out


def test_pretrain_writes_outputs(pretrained):
    out = pretrained
    s = json.load(open(os.path.join(out, 'pretrain', 'summary.json')))
    for k in ('params', 'wall_seconds', 'final_train_loss', 'final_val_loss', 'base_arith_acc', 'base_countdown_pass@1'):
        assert k in s, k
    assert os.path.isfile(os.path.join(out, 'pretrain', 'ckpt.pt'))
    assert os.path.isfile(os.path.join(out, 'pretrain', 'loss.png'))
    rows = losses(out)
    assert [r['step'] for r in rows] == list(range(6))
    assert rows[-1]['loss'] < rows[0]['loss']


def test_killed_run_resumes_to_the_same_loss(pretrained, killed, tmp_path):
    a, b = pretrained, str(tmp_path / 'b')
    shutil.copytree(killed, b)
    assert [r['step'] for r in losses(b)] == [0, 1, 2]      # the kill came after step 3's checkpoint, before its log
    main(BASE + ['--out-dir', b, '--resume'])
    la, lb = losses(a), losses(b)
    assert [r['step'] for r in lb] == list(range(6))        # the log continues where it stopped
    for ra, rb in zip(la, lb):
        assert abs(ra['loss'] - rb['loss']) < 1e-4
    sa = json.load(open(os.path.join(a, 'pretrain', 'summary.json')))
    sb = json.load(open(os.path.join(b, 'pretrain', 'summary.json')))
    assert abs(sa['final_train_loss'] - sb['final_train_loss']) < 1e-4
    assert abs(sa['final_val_loss'] - sb['final_val_loss']) < 1e-4


BAD_INPUT = [
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
]


@pytest.mark.parametrize('args,needle', BAD_INPUT)
def test_bad_input_gives_one_line_error(args, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # the default --out-dir is relative: nothing may appear there either
    dies(capsys, args if args[0] == '--preset' else ['--preset', 'test'] + args, needle)
    assert os.listdir(tmp_path) == []


def test_bad_input_on_the_command_line_is_one_line_on_stderr():
    """The process itself, once: an argparse error (argparse alone would print its usage and exit 2) is exactly
    one line on stderr and a non-zero exit. (A check of ours failing: test_a_diverging_run_stops_...)"""
    args, needle = BAD_INPUT[16]
    p = run(args, check=False)
    err = p.stderr.strip()
    assert p.returncode != 0 and len(err.splitlines()) == 1, err
    assert err.startswith('train.py: error: ') and needle in err, err


def test_out_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / 'afile'
    f.write_text('x')
    dies(capsys, ['--preset', 'test', '--out-dir', str(f)], 'is a file')


def test_incompatible_checkpoint_and_missing_checkpoint(killed, tmp_path, capsys):
    out = str(tmp_path / 'run')
    shutil.copytree(killed, out)   # a run stopped at step 3 of 6
    ck = open(os.path.join(out, 'pretrain', 'ckpt.pt'), 'rb').read()
    dies(capsys, BASE + ['--out-dir', out, '--resume', '--n-embd', '48'],
         'differ from the run that wrote it', "'n_embd': (32, 48)")
    # another seed draws other BPE merges: the trained ids would mean other tokens
    dies(capsys, BASE + ['--out-dir', out, '--resume', '--seed', '7'], "'seed': (1337, 7)")
    dies(capsys, BASE + ['--out-dir', out, '--resume', '--pt-lr', '1e-2'], "'pt_lr'")
    assert open(os.path.join(out, 'pretrain', 'ckpt.pt'), 'rb').read() == ck
    dies(capsys, ['--preset', 'test', '--stage', 'grpo', '--out-dir', str(tmp_path / 'empty')], 'no checkpoint at')


def test_bench_model_measures_a_preset(capsys, monkeypatch):
    """bench.py model builds each named preset's model and prints one row per preset; an unknown one is an error.
    bench.main in this process, on the command line it would read."""
    argv = ['bench.py', 'model', '--device', 'cpu', '--rows', '2', '--new-tokens', '3', '--iters', '1',
            '--threads', '1']
    monkeypatch.setattr(sys, 'argv', argv + ['--presets', 'test,tiny'])
    bench.main()
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == {'test', 'tiny'}
    assert int(rows['tiny'][0].replace(',', '')) > int(rows['test'][0].replace(',', ''))  # params
    monkeypatch.setattr(sys, 'argv', argv + ['--presets', 'nope'])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert "unknown preset 'nope'" in str(e.value.code)


def test_a_finished_stage_is_kept_and_reported(pretrained, tmp_path, capsys):
    """A fresh run into a directory that holds a checkpoint refuses without --overwrite (before any work), and
    --resume of a finished stage reports it instead of re-running it or rewriting its summary."""
    out = str(tmp_path / 'run')
    shutil.copytree(pretrained, out)
    ck = os.path.join(out, 'pretrain', 'ckpt.pt')
    before = open(ck, 'rb').read(), open(os.path.join(out, 'pretrain', 'summary.json')).read()
    dies(capsys, BASE + ['--out-dir', out, '--pt-steps', '2'], 'exists', '--overwrite')
    main(BASE + ['--out-dir', out, '--resume'])
    assert 'finished already' in capsys.readouterr().out
    assert (open(ck, 'rb').read(), open(os.path.join(out, 'pretrain', 'summary.json')).read()) == before
    main(BASE + ['--out-dir', out, '--pt-steps', '2', '--overwrite'])
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


def test_unreadable_checkpoints_give_one_line_naming_the_file(pretrained, tmp_path, capsys):
    torn = tmp_path / 'torn.pt'
    torn.write_bytes(open(os.path.join(pretrained, 'pretrain', 'ckpt.pt'), 'rb').read()[:5000])   # a kill mid-copy
    foreign = tmp_path / 'foreign.pt'
    torch.save({'weights': torch.zeros(2)}, foreign)
    text = tmp_path / 'text.pt'
    text.write_text('not a checkpoint')
    for path, needle in ((torn, 'is not a readable checkpoint'), (foreign, 'missing'), (text, 'is not a readable')):
        dies(capsys, ['--preset', 'test', '--stage', 'grpo', '--out-dir', str(tmp_path / 'g'), '--init-from',
                      str(path)], str(path), needle)
