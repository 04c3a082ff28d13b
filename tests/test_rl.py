"""
The GRPO stage end to end on the 'test' preset (seconds): outputs, report, resume after a kill.
Run: python -m pytest tests/test_rl.py -q
"""
import json
import os

from test_train import run


def test_stage_all_writes_summary_report_and_plots(tmp_path):
    out = str(tmp_path / 'run')
    p = run(['--preset', 'test', '--stage', 'all', '--out-dir', out])
    assert 'loss near 0 is expected' in p.stdout        # the mu=1 explanation is in the log
    s = json.load(open(os.path.join(out, 'summary.json')))
    for k in ('base_countdown_pass@1', 'rl_countdown_pass@1', 'rl_countdown_pass@1_sampled', 'rl_countdown_pass@2',
              'wall_seconds', 'base_arith_acc', 'n_eval'):
        assert k in s, k
    g = os.path.join(out, 'grpo')
    for f in ('report.md', 'reward.png', 'length.png', 'stability.png', 'metrics.jsonl', 'samples.jsonl', 'ckpt.pt'):
        assert os.path.isfile(os.path.join(g, f)), f
    rows = [json.loads(l) for l in open(os.path.join(g, 'metrics.jsonl'))]
    assert [r['step'] for r in rows] == [0, 1, 2, 3, 4]
    assert all('kl' in r and 'clip_frac_low' in r and 'entropy' in r for r in rows[1:] if 'loss' in r)
    assert '| countdown pass@1 |' in open(os.path.join(g, 'report.md')).read()


def test_grpo_resume_matches_uninterrupted(tmp_path):
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    run(['--preset', 'test', '--stage', 'pretrain', '--out-dir', a])
    init = os.path.join(a, 'pretrain', 'ckpt.pt')
    common = ['--preset', 'test', '--stage', 'grpo', '--init-from', init, '--ckpt-interval', '2']
    run(common + ['--out-dir', a])
    p = run(common + ['--out-dir', b, '--exit-after', '2'], check=False)
    assert p.returncode == 3
    run(common + ['--out-dir', b, '--resume'])
    ra = [json.loads(l) for l in open(os.path.join(a, 'grpo', 'metrics.jsonl'))]
    rb = [json.loads(l) for l in open(os.path.join(b, 'grpo', 'metrics.jsonl'))]
    assert [r['step'] for r in rb] == [r['step'] for r in ra]
    for x, y in zip(ra, rb):
        for k in ('reward', 'response_len', 'eval_pass@1'):
            if k in x:
                assert abs(x[k] - y[k]) < 1e-6, (k, x, y)


def test_mla_moe_model_runs_the_pipeline(tmp_path):
    """The DeepSeek-V3 architecture (MLA with the absorbed cache in rollouts, DeepSeekMoE with the aux-loss-free
    bias updated after each step, MTP) through pretrain and grpo."""
    out = str(tmp_path / 'moe')
    run(['--preset', 'test', '--stage', 'all', '--out-dir', out, '--attn', 'mla', '--mla-impl', 'absorb',
         '--kv-lora-rank', '16', '--qk-nope-head-dim', '8', '--qk-rope-head-dim', '8', '--v-head-dim', '8',
         '--ffn', 'moe', '--n-routed-experts', '4', '--num-experts-per-tok', '2', '--moe-intermediate-size', '16',
         '--mtp-depth', '1', '--log-interval', '1'])
    rows = [json.loads(l) for l in open(os.path.join(out, 'pretrain', 'metrics.jsonl'))]
    assert all('moe_max_over_mean' in r and 'mtp_loss' in r for r in rows)
    assert os.path.isfile(os.path.join(out, 'summary.json'))
