"""
--fsdp (FSDP2, shard.py), distributed checkpoints (harness.py) and the memory plan (shard.py), on the CPU with gloo.
Run: python -m pytest tests/test_fsdp.py -q   (about 80 s on 2 quiet cores, more when shared; this file is also the script torchrun launches
for the 2-rank checks: python -m torch.distributed.run --nproc_per_node=2 tests/test_fsdp.py OUT.json)

- a sharded fresh init (meta device, fully_shard, to_empty, init_sharded) is GPT(config) after the same seed in one
  process, bit for bit, on the 1-D mesh and the HSDP (replicate x shard) mesh, for dense GQA and MLA + MoE + MTP
- a few fp32 AdamW steps under FSDP2, HSDP and FSDP2 + activation checkpointing equal DDP's to 1e-5
- a sharded checkpoint loads onto another mesh (and into a frozen, sharded reference) unchanged
- train.py --fsdp at 2 ranks, killed after step 3, resumes in one process to the losses and weights of the
  uninterrupted 2-rank run
- grpo --fsdp at 2 ranks (policy and reference sharded, from a sharded pretrain checkpoint; rollouts whose
  lengths and batch sizes differ between ranks; resumed from its sharded checkpoint after step 2) ends with the
  weights and metrics of one process on the same global batch, and of DDP; so does distill (logits) --fsdp, and
  so does long2short.py all --fsdp (merge, shortest, dpo and rl, from that sharded grpo checkpoint)
- the plan's weight, gradient, AdamW, KV-cache and logits bytes equal those of real tensors (one process, and
  rank 0 of 2 under FSDP); Qwen2.5-3B's shape has its published 3,085,938,688 parameters, and its plan prints
  under a 2 GiB address-space cap (the model is only built on the meta device)
"""
import contextlib
import dataclasses
import json
import os
import resource
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import distill  # noqa: E402
import long2short  # noqa: E402
import report  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from harness import load_policy, load_sharded, save_sharded  # noqa: E402
from shard import (fsdp_mesh, init_sharded, materialize, memory_plan, prompt_bound, shard_frozen,  # noqa: E402
                   shard_model)
from model import GPT, ModelConfig  # noqa: E402
from tasks import TaskConfig  # noqa: E402
from train import PRESETS, TrainConfig  # noqa: E402

ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT}
TEST = {k: v for k, v in PRESETS['test'].items() if k in {f.name for f in dataclasses.fields(ModelConfig)}}
CONFIGS = {'dense': ModelConfig(**TEST, vocab_size=97, attn_bias=True),                     # the test preset's shape
           'mla_moe_mtp': ModelConfig(n_layer=2, n_embd=32, n_head=2, n_kv_head=2, kv_lora_rank=16, qk_nope_head_dim=8,
                                      qk_rope_head_dim=8, v_head_dim=8, moe_intermediate_size=16, vocab_size=97,
                                      mtp_depth=1)}
QWEN25_3B = ModelConfig(vocab_size=151936, n_embd=2048, n_layer=36, n_head=16, n_kv_head=2, intermediate_size=11008,
                        tie_embeddings=True, attn_bias=True, attn='gqa', ffn='dense', block_size=4096)
QWEN25_3B_FLAGS = ['--vocab-size', '151936', '--n-embd', '2048', '--n-layer', '36', '--n-head', '16', '--n-kv-head',
                   '2', '--intermediate-size', '11008', '--tie-embeddings', '--attn-bias', '--attn', 'gqa', '--ffn',
                   'dense', '--block-size', '4096']


def torchrun(args, n=2, check=True):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={n}'] + args
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def full(t):
    return t.full_tensor() if hasattr(t, 'full_tensor') else t


def max_diff(a, b):
    """Largest |a - b| over two models' parameters and buffers (sharded ones gathered)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    d = [(full(sa[k]).detach() - sb[k].detach()).abs().max().item() for k in sa]
    d += [(full(x) - y).abs().max().item() for x, y in zip(a.buffers(), b.buffers())]   # RoPE tables too
    return max(d)


def step_bytes(model, opt):
    """Bytes this rank holds in weights, gradients and AdamW state (its shards under FSDP)."""
    local = lambda t: t.to_local() if hasattr(t, 'to_local') else t  # noqa: E731
    size = lambda ts: sum(local(t).numel() * local(t).element_size() for t in ts)  # noqa: E731
    params = list(model.parameters())
    return {'weights': size(params), 'gradients': size(p.grad for p in params),
            'AdamW state': size(t for s in opt.state.values() for t in s.values())}


# -----------------------------------------------------------------------------
# the rank script (torchrun): every check that needs 2 ranks, measured values written to one JSON file

def sharded(cfg, mesh, seed, **kw):
    with torch.device('meta'):
        m = GPT(cfg)
    shard_model(m, mesh, **kw)
    materialize(m, 'cpu')
    return init_sharded(m, seed)


def worker(out):
    dist.init_process_group('gloo')
    rank, res = dist.get_rank(), {}
    meshes = {'fsdp': fsdp_mesh('cpu'), 'hsdp': fsdp_mesh('cpu', hsdp=2)}   # HSDP: 2 replicas x 1 shard
    # 1. a sharded fresh init is one process's init, and leaves the generator where one process leaves it
    for name, cfg in CONFIGS.items():
        torch.manual_seed(7)
        one = GPT(cfg)
        after = torch.rand(3)
        for mesh_name, mesh in meshes.items():
            m = sharded(cfg, mesh, 7)
            res[f'init_{name}_{mesh_name}'] = max_diff(m, one)
            res[f'rng_{name}_{mesh_name}'] = float((torch.rand(3) - after).abs().max())
    # 2. a few AdamW steps: DDP against FSDP2, HSDP and FSDP2 + activation checkpointing, fp32, each rank its batch
    cfg = CONFIGS['dense']
    torch.manual_seed(7)
    ddp = torch.nn.parallel.DistributedDataParallel(GPT(cfg))
    models = {'ddp': ddp, 'fsdp': sharded(cfg, meshes['fsdp'], 7), 'hsdp': sharded(cfg, meshes['hsdp'], 7),
              'fsdp_ac': sharded(cfg, meshes['fsdp'], 7, activation_checkpointing=True)}
    opts = {k: torch.optim.AdamW((m.module if k == 'ddp' else m).optim_groups(0.1), lr=1e-2, betas=(0.9, 0.95))
            for k, m in models.items()}
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        x = torch.randint(0, cfg.vocab_size, (2, 4, 17), generator=g)[rank]          # (B, T + 1) this rank's rows
        for k, m in models.items():
            _, loss = m(x[:, :-1], x[:, 1:])
            loss.backward()
            res[f'gnorm_{k}'] = float(torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5))
            if step == 2 and k == 'fsdp':   # rank 0 holds the largest shard of every parameter
                kept = dict(step_bytes(m, opts[k]))
            opts[k].step()
            if step == 2 and k == 'fsdp':
                kept['AdamW state'] = step_bytes(m, opts[k])['AdamW state']
                res['fsdp_rank_bytes'] = kept
            opts[k].zero_grad(set_to_none=True)
    for k in ('fsdp', 'hsdp', 'fsdp_ac'):
        res[f'train_{k}_vs_ddp'] = max_diff(models[k], ddp.module)
    # 3. a sharded checkpoint onto another mesh, and into a frozen sharded reference
    path = os.path.join(os.path.dirname(out), 'w', 'ckpt.pt')
    save_sharded(path, models['fsdp'], opts['fsdp'], {'model': {}, 'model_config': cfg.to_dict(), 'tokenizer': {},
                                                      'step': 3})
    other = sharded(cfg, meshes['hsdp'], 1)
    other_opt = torch.optim.AdamW(other.optim_groups(0.1), lr=1e-2, betas=(0.9, 0.95))
    res['dcp_step'] = load_sharded(path, other, other_opt)['step']
    res['dcp_weights'] = max_diff(other, ddp.module)
    moments = [(full(opts['fsdp'].state[p]['exp_avg_sq']) - full(other_opt.state[q]['exp_avg_sq'])).abs().max().item()
               for p, q in zip(models['fsdp'].parameters(), other.parameters())]
    res['dcp_moments'] = max(moments)
    with torch.device('meta'):
        ref = GPT(cfg)
    shard_frozen(ref, meshes['fsdp'])
    load_sharded(path, materialize(ref, 'cpu'))
    x = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    with torch.no_grad():
        res['ref_logits'] = float((ref(x)[0] - ddp.module(x)[0]).abs().max())
    res['ref_trainable'] = sum(p.requires_grad for p in ref.parameters())
    train_runs(os.path.dirname(out))
    if rank == 0:
        json.dump(res, open(out, 'w'))
    dist.destroy_process_group()


# grpo: 3 steps of dapo with dynamic sampling and mu = 2; 3 prompts split 1 / 2 over the ranks
GRPO = ['--preset', 'test', '--stage', 'grpo', '--rl-steps', '3', '--rl-prompts', '3', '--rl-micro', '4',
        '--n-eval', '5', '--rl-eval-interval', '3', '--threads', '1', '--loss-type', 'dapo', '--dynamic-sampling',
        '--rl-mu', '2', '--rl-lr', '1e-3', '--rl-warmup', '1']   # weights that move by ~1e-3, not 1e-5


# distillation (R1 sec 2.4) with the KL to the teacher: a frozen sharded teacher that samples, SFT of the student
DISTILL = ['--preset', 'test', '--stage', 'distill', '--distill-mode', 'logits', '--rs-problems', '7',
           '--rs-samples', '2', '--sft-steps', '3', '--sft-batch-size', '5', '--n-eval', '4', '--threads', '1']


@contextlib.contextmanager
def varied():
    """As tests/test_dist.py's: one token in 16 also stops a rollout (each rank decodes its own number of steps)
    and a text's reward is its characters mod 3 (groups with and without variance; distillation keeps such
    samples as correct); plots skipped."""
    saved = sample.generate, report.generate, train.rl_rewards, report.plot_curves, distill.is_correct

    def generate(model, prompts, max_new_tokens, stop_ids, *args, **kw):
        return saved[0](model, prompts, max_new_tokens, set(stop_ids) | set(range(40, 2048, 16)), *args, **kw)

    def rl_rewards(texts, *args, **kwargs):
        acc = torch.tensor([float(sum(map(ord, t)) % 3 == 0) for t in texts])
        return acc, {'accuracy': acc, 'format': torch.zeros_like(acc)}
    sample.generate = report.generate = generate
    train.rl_rewards, report.plot_curves = rl_rewards, lambda *a, **kw: None
    distill.is_correct = lambda text, p: sum(map(ord, text)) % 3 == 0
    try:
        yield
    finally:
        sample.generate, report.generate, train.rl_rewards, report.plot_curves, distill.is_correct = saved


# long2short's four methods, small: 6 problems x 4 samples, 3 SFT and 3 DPO steps of 3, 2 RL steps
L2S = ['--n-problems', '6', '--n-samples', '4', '--sft-steps', '3', '--sft-batch-size', '3', '--dpo-steps', '3',
       '--dpo-batch-size', '3', '--rl-steps', '2', '--rl-n-eval', '4', '--n-eval', '4', '--alphas', '0.5',
       '--threads', '1', '--device', 'cpu']


# pretraining under --fsdp: 2 ranks x 1 micro-batch of 2 (a global batch of 4), a checkpoint at step 3 and 6
PRETRAIN = ['--preset', 'test', '--stage', 'pretrain', '--log-interval', '1', '--pt-steps', '6', '--ckpt-interval',
            '3', '--pt-batch-size', '2']


def train_runs(d):
    """The 2-rank train.py runs, in this launch (a launch costs seconds): pretraining under --fsdp (whole/:
    test_fsdp_checkpoint_resumes_at_another_world_size, and the grpo runs' base, a sharded checkpoint); grpo
    under --fsdp for 2 steps, then resumed for the third; grpo under DDP (test_grpo_fsdp_matches_...); distill
    under --fsdp (test_distill_fsdp_matches_one_process); long2short all --fsdp from the sharded grpo checkpoint
    (test_long2short_fsdp_matches_one_process)."""
    train.main(PRETRAIN + ['--out-dir', f'{d}/whole', '--fsdp'])
    with varied():
        grpo = GRPO + ['--init-from', f'{d}/whole/pretrain/ckpt.pt']
        train.main(grpo + ['--out-dir', f'{d}/fsdp', '--fsdp', '--rl-steps', '2'])
        train.main(grpo + ['--out-dir', f'{d}/fsdp', '--fsdp', '--resume'])
        train.main(grpo + ['--out-dir', f'{d}/ddp', '--loss-impl', 'torch'])
        base = f'{d}/whole/pretrain/ckpt.pt'
        train.main(DISTILL + ['--init-from', base, '--teacher-from', base, '--out-dir', f'{d}/distill', '--fsdp'])
        long2short.main(['all', '--from', f'{d}/fsdp/grpo/ckpt.pt', '--out-dir', f'{d}/l2s', '--fsdp'] + L2S)


@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('fsdp') / 'res.json')
    torchrun([os.path.abspath(__file__), out])
    return {**json.load(open(out)), 'dir': os.path.dirname(out)}


def test_sharded_init_is_one_process_init(ranks):
    for name in CONFIGS:
        for mesh in ('fsdp', 'hsdp'):
            assert ranks[f'init_{name}_{mesh}'] == 0.0, (name, mesh)
            assert ranks[f'rng_{name}_{mesh}'] == 0.0, (name, mesh)


def test_fsdp_hsdp_and_checkpointing_train_like_ddp(ranks):
    for k in ('fsdp', 'hsdp', 'fsdp_ac'):
        assert ranks[f'train_{k}_vs_ddp'] < 1e-5, k
        assert abs(ranks[f'gnorm_{k}'] - ranks['gnorm_ddp']) < 1e-5, k


def test_sharded_checkpoint_loads_on_another_mesh_and_into_the_reference(ranks):
    assert ranks['dcp_step'] == 3
    assert ranks['dcp_weights'] < 1e-5 and ranks['dcp_moments'] == 0.0   # the weights after 3 steps, as DDP's
    assert ranks['ref_logits'] < 1e-4 and ranks['ref_trainable'] == 0


def test_fsdp_plan_is_rank_zero_shards(ranks):
    """Rank 0 of 2 holds the first (the larger) half of each parameter's rows: the plan counts exactly that."""
    tc = TrainConfig(**{k: v for k, v in PRESETS['test'].items() if k in TrainConfig.__dataclass_fields__}, fsdp=True)
    with torch.device('meta'):
        model = GPT(CONFIGS['dense'])
    plan = memory_plan(model, tc, 2, 'cpu', 8)
    for k, b in ranks['fsdp_rank_bytes'].items():
        assert plan[k][0] == b, (k, plan[k][0], b)
    total = 4 * model.num_params()
    rows = sum(4 * p.numel() // p.shape[0] for p in model.parameters())   # one row of every parameter
    assert total / 2 <= plan['weights'][0] <= total / 2 + rows


# -----------------------------------------------------------------------------
# train.py --fsdp end to end, and the plan in one process

def losses(out):
    return [json.loads(line)['loss'] for line in open(os.path.join(out, 'pretrain', 'metrics.jsonl'))]


def test_fsdp_checkpoint_resumes_at_another_world_size(ranks, tmp_path):
    """2 ranks x 1 micro-batch of 2 and 1 process x 2 micro-batches of 2 are the same global batch of 4."""
    base = [os.path.join(ROOT, 'train.py')] + PRETRAIN
    whole, cut = os.path.join(ranks['dir'], 'whole'), str(tmp_path / 'cut')   # whole: run in the ranks' launch
    p = torchrun(base + ['--out-dir', cut, '--fsdp', '--exit-after', '3'], check=False)
    shards = os.listdir(os.path.join(cut, 'pretrain', 'ckpt.pt.dcp'))
    assert p.returncode != 0 and len(shards) == 1 and shards[0].startswith('step3-')
    assert sorted(f for f in os.listdir(os.path.join(cut, 'pretrain', 'ckpt.pt.dcp', shards[0]))
                  if f.endswith('.distcp')) == ['__0_0.distcp', '__1_0.distcp']     # one file per rank
    def resume(*args):   # in one process, no torchrun
        return subprocess.run([sys.executable] + base + ['--out-dir', cut, '--resume', *args], cwd=ROOT, env=ENV,
                              capture_output=True, text=True, timeout=600)
    r = resume()   # one process with the 2-rank accumulation would see half the global batch: refused
    assert r.returncode != 0 and 'its global batch is 4 sequences, these settings give 2' in r.stderr, r.stderr
    r = resume('--pt-grad-accum', '2')
    assert r.returncode == 0 and 'resumed from' in r.stdout, r.stderr[-3000:]
    assert max(abs(a - b) for a, b in zip(losses(whole), losses(cut))) < 1e-5
    assert len(losses(cut)) == 6
    a, _, ck_a = load_policy(os.path.join(whole, 'pretrain', 'ckpt.pt'), 'cpu')   # the DCP shards, gathered
    b, _, ck_b = load_policy(os.path.join(cut, 'pretrain', 'ckpt.pt'), 'cpu')     # a one-file checkpoint now
    assert ck_a['sharded'] and not ck_b.get('sharded') and ck_a['step'] == ck_b['step'] == 6
    assert max_diff(a, b) < 1e-5
    assert not os.path.exists(os.path.join(cut, 'pretrain', 'ckpt.pt.dcp'))   # its shards went with the manifest


def test_grpo_fsdp_matches_one_process_and_ddp(ranks):
    """2 ranks under --fsdp (policy and reference sharded, from a sharded checkpoint; 3 prompts split 1 / 2, and
    rollouts that stop at different steps: each rank runs its own number of forwards in generation) and under
    DDP end with one process's weights on the same global batch; the --fsdp run stopped after step 2 and was
    resumed from its sharded checkpoint for step 3."""
    d = ranks['dir']
    base = f'{d}/whole/pretrain/ckpt.pt'
    with varied():   # one process on the same global batch, with the loss from the logits as --fsdp's (the
        # chunked loss of the default here agrees with it to ~3e-6 after these 3 steps)
        train.main(GRPO + ['--init-from', base, '--out-dir', f'{d}/one', '--loss-impl', 'torch'])
    one, _, ck = load_policy(f'{d}/one/grpo/ckpt.pt', 'cpu')
    assert not ck.get('sharded') and ck['step'] == 3
    for run in ('fsdp', 'ddp'):
        m, _, ck = load_policy(f'{d}/{run}/grpo/ckpt.pt', 'cpu')   # a sharded checkpoint's shards, gathered
        assert ck['step'] == 3 and bool(ck.get('sharded')) == (run == 'fsdp'), run
        assert max_diff(m, one) < 1e-5, run
        rows, ref = metrics(f'{d}/{run}/grpo'), metrics(f'{d}/one/grpo')
        assert [r['step'] for r in rows] == [r['step'] for r in ref] == [0, 1, 2, 3], run
        for x, y in zip(rows, ref):   # the same rollouts, kept groups, losses, evaluations
            assert run == 'fsdp' or x.keys() == y.keys()   # the --fsdp run also evaluated at step 2, its end then
            for k in (set(x) & set(y)) - {'step_seconds'}:
                assert x[k] == (None if y[k] is None else pytest.approx(y[k], rel=1e-4, abs=1e-6)), (run, k, x, y)
    assert max(r.get('rollout_rounds', 1) for r in metrics(f'{d}/one/grpo')) > 1   # dynamic sampling refilled
    assert not torch.equal(one.lm_head.weight, load_policy(base, 'cpu')[0].lm_head.weight)   # it did train


def test_distill_fsdp_matches_one_process(ranks):
    """The student and the frozen teacher sharded, the teacher sampling its shard of the problems, 3 SFT + KD
    steps: one process's weights, data and evaluations."""
    d = ranks['dir']
    base = f'{d}/whole/pretrain/ckpt.pt'
    with varied():
        train.main(DISTILL + ['--init-from', base, '--teacher-from', base, '--out-dir', f'{d}/distill1'])
    (a, _, ck), (b, _, _) = (load_policy(f'{d}/{run}/distill/ckpt.pt', 'cpu') for run in ('distill', 'distill1'))
    assert ck.get('sharded') and max_diff(a, b) < 1e-5
    sa, sb = (json.load(open(f'{d}/{run}/distill/summary.json')) for run in ('distill', 'distill1'))
    assert sa['n_examples'] > 0
    for k in ('n_examples', 'n_correct_samples', 'countdown_pass@1', 'mean_response_tokens', 'final_sft_loss',
              'teacher_countdown_pass@1', 'init_countdown_pass@1'):
        assert sa[k] == pytest.approx(sb[k], rel=1e-5), k


def test_long2short_fsdp_matches_one_process(ranks):
    """long2short.py all at 2 ranks under --fsdp (source: the sharded grpo checkpoint; its base, the merge's short
    model, a sharded pretrain checkpoint): shortest's and dpo's policies (and dpo's reference) sharded, rl the grpo
    stage under --fsdp, merge whole on every rank. Every method's weights, data and evaluations are one process's."""
    d = ranks['dir']
    with varied():
        long2short.main(['all', '--from', f'{d}/fsdp/grpo/ckpt.pt', '--out-dir', f'{d}/l2s1'] + L2S)
    for m in long2short.METHODS:
        ckpt = f'{m}/grpo/ckpt.pt' if m == 'rl' else f'{m}/ckpt.pt'
        (a, _, ck), (b, _, _) = (load_policy(f'{d}/{run}/{ckpt}', 'cpu') for run in ('l2s', 'l2s1'))
        assert bool(ck.get('sharded')) == (m != 'merge'), m   # merge's model is whole: rank 0's file
        assert max_diff(a, b) < 1e-5, m
        sa, sb = (json.load(open(f'{d}/{run}/{m}/summary.json')) for run in ('l2s', 'l2s1'))
        keys = {'countdown_pass@1', 'mean_response_tokens', 'n_examples', 'example_mean_tokens', 'n_pairs',
                'final_loss'} & set(sb)
        for k in keys:
            assert sa[k] == pytest.approx(sb[k], rel=1e-5), (m, k)
        for x, y in zip(sa.get('sweep', []), sb.get('sweep', [])):   # merge's alphas
            assert x == pytest.approx(y, rel=1e-5), (m, x, y)
    s = json.load(open(f'{d}/l2s/dpo/summary.json'))
    assert s['n_pairs'] > 0 and s['dpo_steps'] == 3
    assert json.load(open(f'{d}/l2s/shortest/summary.json'))['n_examples'] > 0


def metrics(stage_dir):
    return [json.loads(line) for line in open(os.path.join(stage_dir, 'metrics.jsonl'))]


@pytest.mark.parametrize('name', list(CONFIGS))
def test_plan_counts_what_one_process_holds(name):
    cfg = CONFIGS[name]
    tc = TrainConfig(**{k: v for k, v in PRESETS['test'].items() if k in TrainConfig.__dataclass_fields__})
    P = prompt_bound(TaskConfig())
    T = P + tc.max_new_tokens
    assert T <= cfg.block_size
    torch.manual_seed(0)
    model = GPT(cfg)
    plan = memory_plan(model, tc, 1, 'cpu', P)
    opt = torch.optim.AdamW(model.optim_groups(0.1), lr=1e-3)
    x = torch.randint(0, cfg.vocab_size, (8, 33))   # enough tokens that every routed expert gets a gradient
    model(x[:, :-1], x[:, 1:])[1].backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    held = step_bytes(model, opt)
    for k in ('weights', 'gradients', 'AdamW state'):
        assert plan[k][0] == held[k], k
    rows = tc.rl_prompts * tc.rl_group
    cache = model.new_cache(rows, T)
    with torch.no_grad():
        # sample.generate: the distinct prompts' last position only; the G samples' cache rows are copies
        prefill, _ = model(torch.randint(0, cfg.vocab_size, (tc.rl_prompts, P)), logits_slice=slice(P - 1, P))
        model(torch.randint(0, cfg.vocab_size, (rows, P)), cache=cache)                # allocates all T positions
        logits, _ = model(torch.randint(0, cfg.vocab_size, (tc.rl_micro, T)), logits_slice=slice(P - 1, T - 1))
    assert plan['KV cache'][0] == cache.nbytes()
    assert plan['prefill logits'][0] == prefill.numel() * prefill.element_size()
    assert plan['logits'][0] == logits.float().numel() * 4 and logits.shape[1] == tc.max_new_tokens


def test_qwen25_3b_shape_has_its_published_parameter_count():
    with torch.device('meta'):
        model = GPT(QWEN25_3B)
    assert model.num_params() == 3_085_938_688   # tied embeddings: the 151936 x 2048 matrix counted once


def test_dry_run_plans_3b_without_allocating_it():
    """Under an address-space cap of what importing the code maps plus 2 GiB (the fp32 weights alone are 11.5 GiB)
    the plan of 8 GPUs of 80 GiB prints, finds that plain DDP does not fit and names --fsdp as a fix."""
    # the imports alone map ~0.9 GiB with torch's CPU build and ~3.2 GiB with a CUDA build (its libraries)
    probe = subprocess.run([sys.executable, '-c', "import train; print(next(int(line.split()[1]) for line in "
                            "open('/proc/self/status') if line.startswith('VmPeak')))"],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    cap = int(probe.stdout) * 1024 + 2 * 2 ** 30
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), '--preset', 'tiny-dense', *QWEN25_3B_FLAGS, '--dry-run',
           '--world-size', '8', '--device', 'cuda', '--plan-gib', '80']
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap)))
    assert p.returncode == 0, p.stderr[-2000:]
    assert '3,085,938,688 parameters, world 8, weights replicated (DDP), bf16 compute on cuda' in p.stdout
    gib = {line.split('|')[1].strip(): float(line.split('|')[2]) for line in p.stdout.splitlines()
           if line.startswith('| ') and line.split('|')[2].strip() not in ('GiB', '')}
    assert gib['weights'] == gib['gradients'] == pytest.approx(3_085_938_688 * 4 / 2 ** 30, abs=0.01)
    assert gib['AdamW state'] == pytest.approx(2 * gib['weights'], abs=0.02)   # printed to 0.01 GiB
    assert 'does not fit' in p.stdout and '  fix: --fsdp -> ' in p.stdout


if __name__ == '__main__':
    worker(sys.argv[1])
