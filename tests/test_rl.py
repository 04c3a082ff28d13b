"""
The GRPO stage: dynamic sampling's refill (rollouts.dynamic_batch) against scripted batches, the trainer's loss path
(logits for the response positions only, fused_loss.loss_from_logits, the Triton kernel under the interpreter) against
the full-logits reference, and the stage end to end on the 'test' preset (outputs, report, resume, errors).
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_rl.py -q
"""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import fused_loss
import grpo
import report
import train
from model import GPT, ModelConfig
from rollouts import RolloutBatch, TrainShard, dynamic_batch, training_shard
from sample import Generation, sequences_for_training
from tasks import Countdown
from test_train import ENV, ROOT, dies, main

G, PAD = 4, 0


# -----------------------------------------------------------------------------
# dynamic sampling (DAPO sec 3.2): refill until the batch holds n_groups groups with signal

def scripted(group_rewards):
    """roll(n) hands out the next n groups of a script; each group's rewards are given, its tokens encode its id."""
    queue = iter(enumerate(group_rewards))
    calls = []

    def roll(n):
        groups = [next(queue) for _ in range(n)]
        calls.append(n)
        ids = [i for i, _ in groups]
        N = len(ids) * G
        tok = torch.tensor([[i + 1] * (2 + i % 3) + [PAD] * (2 - i % 3) for i in ids for _ in range(G)])
        lengths = torch.tensor([2 + i % 3 for i in ids for _ in range(G)])
        mask = (torch.arange(4)[None] < lengths[:, None]).float()
        gen = Generation(tok, torch.zeros(N, 4), mask, lengths, torch.ones(N, dtype=torch.bool))
        return RolloutBatch(ids, [[9]] * N, gen, [[i + 1] for i in ids for _ in range(G)], lengths,
                            torch.zeros(N, dtype=torch.bool), ids, 0, 0)

    def score(b):
        r = torch.tensor([x for i in b.ids for x in group_rewards[i]], dtype=torch.float)
        return r, {'accuracy': r.clone()}, [f'text{i}' for i in b.ids for _ in range(G)]
    return roll, score, calls


SIGNAL, FLAT = [1, 0, 0, 1], [0, 0, 0, 0]


def test_dynamic_sampling_refills_to_the_requested_groups():
    script = [SIGNAL, FLAT, FLAT, SIGNAL, FLAT, SIGNAL, SIGNAL, [1, 1, 1, 1], SIGNAL] + [SIGNAL] * 10
    roll, score, calls = scripted(script)
    batch, reward, terms, texts, seen = dynamic_batch(roll, score, G, 4, PAD, rounds=3)
    # round 1: 4 groups, 2 kept (0, 3); round 2 draws the 2 missing x 4 drawn / 2 kept = 4 -> groups 4..7, of which
    # 5 and 6 fill the batch (7 is flat; the rest of the round is cut)
    assert calls == [4, 4] and len(seen) == 2
    assert batch.ids == [0, 3, 5, 6] and texts == [f'text{i}' for i in (0, 3, 5, 6) for _ in range(G)]
    assert reward.tolist() == [x for i in (0, 3, 5, 6) for x in script[i]] == terms['accuracy'].tolist()
    assert batch.gen.tokens.shape == (16, 4) and batch.gen.lengths.tolist() == [2 + i % 3 for i in (0, 3, 5, 6)
                                                                                  for _ in range(G)]
    assert (batch.gen.tokens[:, 0] == torch.tensor([i + 1 for i in (0, 3, 5, 6) for _ in range(G)])).all()
    # advantages over the kept batch: no group has A = 0 everywhere
    A = grpo.group_advantages(reward, G, 'group').view(-1, G)
    assert (A.abs().sum(1) > 0).all()


def test_dynamic_sampling_stops_at_its_round_cap_and_keeps_all_without_the_filter():
    roll, score, calls = scripted([FLAT] * 30)
    batch, reward, _, _, seen = dynamic_batch(roll, score, G, 4, PAD, rounds=3)
    assert len(seen) == 3 and len(calls) == 3 and calls[0] == 4
    assert len(batch.ids) == calls[-1] and (reward == 0).all()      # nothing with signal: the last round whole
    roll, score, calls = scripted([FLAT, SIGNAL, FLAT, FLAT])
    batch, _, _, _, seen = dynamic_batch(roll, score, G, 4, PAD, rounds=1)
    assert calls == [4] and batch.ids == [0, 1, 2, 3]                # rounds=1: no filter


# -----------------------------------------------------------------------------
# the trainer's loss path equals the full-logits reference, in value and in gradient

def trainer_loss(model, idx, pos, amask, P, tokens, A, mask, temperature, impl, loss_type, compiled=None):
    """What grpo_stage computes for one micro-batch (mu = 1: on-policy, old_logp None): the hidden states of the
    response positions (TrainShard.response; through `compiled` under --compile) into
    fused_loss.loss_from_hidden (off CUDA), or their logits into fused_loss.loss_from_logits."""
    tb = TrainShard(idx, pos, amask, P, tokens, mask, A, [])
    out = tb.response(model, slice(None), tokens.shape[1], impl == 'chunked', compiled)
    kw = dict(loss_type=loss_type, max_len=8, global_tokens=mask.sum())
    if impl == 'chunked':   # off CUDA: from the hidden states in blocks (small ones here, to cross several)
        return fused_loss.loss_from_hidden(out / temperature, model.lm_head.weight, tokens, None, None, A, mask,
                                     chunk_rows=5, chunk_vocab=16, **kw)[0]
    return fused_loss.loss_from_logits(out / temperature, tokens, None, None, A, mask, impl=impl, **kw)[0]


def reference_loss(model, idx, pos, amask, P, tokens, A, mask, temperature, loss_type):
    """The path before: the whole (B, P + L, V) logits, sliced, torch logprobs, policy_loss with old = logp."""
    L = tokens.shape[1]
    logits, _ = model(idx, pos=pos, mask=amask)
    lp = grpo.token_logprobs(logits[:, P - 1:P - 1 + L] / temperature, tokens)
    return grpo.policy_loss(lp, lp.detach(), None, A, mask, loss_type=loss_type, max_len=8,
                            global_tokens=mask.sum())[0]


@pytest.mark.parametrize('impl', ['chunked', 'torch', 'triton'])
@pytest.mark.parametrize('arch', ['dense', 'mla_moe'])
def test_trainer_loss_path_equals_the_full_logits_reference(impl, arch):
    if impl == 'triton' and fused_loss.triton is None:
        pytest.skip('triton not installed')
    kw = dict(attn='gqa', ffn='dense') if arch == 'dense' else dict(kv_lora_rank=16, qk_nope_head_dim=8,
                                                                      qk_rope_head_dim=8, v_head_dim=8,
                                                                      n_routed_experts=4, moe_intermediate_size=16)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, **kw))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 40, (n,), generator=g).tolist() for n in (3, 5, 4)]    # ragged: pos and mask
    tokens = torch.randint(2, 40, (3, 6), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.float)
    gen = Generation(tokens, torch.zeros(3, 6), mask, mask.sum(1).long(), torch.ones(3, dtype=torch.bool))
    idx, pos, amask, P = sequences_for_training(prompts, gen, PAD, 'cpu', 32)
    A = torch.tensor([0.7, -1.2, 0.4])
    for loss_type in ('grpo', 'dapo', 'kimi'):
        model.zero_grad()
        a = trainer_loss(model, idx, pos, amask, P, tokens, A, mask, 0.7, impl, loss_type)
        a.backward()
        ga = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        b = reference_loss(model, idx, pos, amask, P, tokens, A, mask, 0.7, loss_type)
        b.backward()
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        assert ga and any(v.abs().sum() > 0 for v in ga.values())
        for n, p in model.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(ga[n], p.grad, atol=1e-6, rtol=1e-4, msg=f"{loss_type} {n}")


@pytest.mark.parametrize('impl', ['chunked', 'torch'])
@pytest.mark.parametrize('loss_type', ['grpo', 'bnpo', 'dapo', 'dr_grpo', 'kimi'])
def test_length_sorted_micro_batches_give_the_whole_batch_loss_and_gradient(loss_type, impl):
    """rollouts.training_shard puts the rows longest first and cuts each micro-batch to its own longest trained
    row. The micro-batches' losses with the batch's normalisers (as train.py passes them) add up to the loss of
    the whole batch in its own row order and full width (full logits, grpo.policy_loss), in value and gradient:
    ragged prompts (positions and masks), responses of 1 to 10 tokens, and a row DAPO's overlong filter left
    with nothing to train."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, attn='gqa',
                            ffn='dense'))
    g = torch.Generator().manual_seed(2)
    n, L = 3, 10
    contexts = [torch.randint(2, 40, (k,), generator=g).tolist() for k in (3, 5, 4) for _ in range(G)]
    lengths = torch.randint(1, L + 1, (n * G,), generator=g)
    lengths[5] = L                                                                      # one row runs to the end
    mask = (torch.arange(L) < lengths[:, None]).float()                                 # (N, L)
    tokens = torch.where(mask.bool(), torch.randint(2, 40, (n * G, L), generator=g), PAD)
    gen = Generation(tokens, torch.zeros(n * G, L), mask, lengths, lengths < L)
    batch = RolloutBatch(list(range(n)), contexts, gen, tokens.tolist(), lengths, torch.zeros(n * G, dtype=torch.bool),
                         list(range(n)), 0, 0)
    trained = mask.clone()
    trained[7] = 0                                                                      # filtered out: no tokens
    A = torch.randn(n * G, generator=g)
    tb = training_shard(batch, trained, A, G, slice(0, n), 1, 5, PAD, 'cpu', 32)
    last = [int(r.nonzero().max()) + 1 if r.any() else 1 for r in tb.mask]              # (N,) sorted rows' widths
    assert last == sorted(last, reverse=True)
    assert [w for _, w, _ in tb.micro] == [max(last[sl]) for sl, _, _ in tb.micro]
    assert min(w for _, w, _ in tb.micro) < L                                           # something was cut
    norm = dict(batch_rows=n * G, batch_tokens=trained.sum(), global_tokens=trained.sum(), max_len=L)
    model.zero_grad()
    total = 0
    for sl, width, w in tb.micro:
        out = tb.response(model, sl, width, impl == 'chunked') / 0.7
        loss, _ = fused_loss.response_loss(out, model.lm_head.weight, tb.resp[sl, :width], None, None, tb.A[sl],
                                           tb.mask[sl, :width], impl, loss_type=loss_type, **norm)
        (loss * w).backward()
        total = total + loss.detach() * w
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    idx, pos, amask, P = sequences_for_training(contexts, gen, PAD, 'cpu', 32)          # the rows as they came
    lp = grpo.token_logprobs(model(idx, pos=pos, mask=amask)[0][:, P - 1:P - 1 + L] / 0.7, tokens)
    ref = grpo.policy_loss(lp, None, None, A, trained, loss_type=loss_type, **norm)[0]
    ref.backward()
    torch.testing.assert_close(total, ref.detach(), atol=1e-6, rtol=1e-5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(got[k], p.grad, atol=1e-6, rtol=1e-4, msg=k)


def test_compiled_update_forward_equals_eager_and_compiles_once_for_all_lengths():
    """--compile: the update's forward through torch.compile(model, dynamic=True), the response cut outside the
    graph, gives the eager path's loss and gradients (hidden states for the chunked loss, and logits); responses
    of other lengths (nearly every step has its own) and other row counts reuse the graph instead of compiling
    again (at most one recompile, which dynamo spends on turning the first-seen sizes dynamic)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, attn='gqa',
                            ffn='dense'))
    compiled = torch.compile(model, dynamic=True)
    g = torch.Generator().manual_seed(1)
    frames = []
    for rows, L in ((3, 6), (3, 9), (2, 4), (3, 11)):
        prompts = [torch.randint(2, 40, (n,), generator=g).tolist() for n in (3, 5, 4)[:rows]]
        tokens = torch.randint(2, 40, (rows, L), generator=g)
        mask = (torch.arange(L) < torch.randint(1, L + 1, (rows, 1), generator=g)).float()
        gen = Generation(tokens, torch.zeros(rows, L), mask, mask.sum(1).long(), torch.ones(rows, dtype=torch.bool))
        idx, pos, amask, P = sequences_for_training(prompts, gen, PAD, 'cpu', 32)
        A = torch.randn(rows, generator=g)
        grads = []
        for c in (compiled, None):
            model.zero_grad()
            loss = trainer_loss(model, idx, pos, amask, P, tokens, A, mask, 0.7, 'chunked', 'grpo', c)
            loss.backward()
            grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-6, rtol=1e-5)
        for a, b in zip(grads[0][1], grads[1][1]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
        frames.append(torch._dynamo.utils.counters['stats']['unique_graphs'])
    assert frames[0] >= 1 and frames[-1] - frames[0] <= 1, frames   # compiled, and not once per length
    # the logits path (CUDA's default, the Triton kernel's input): the head after the compiled trunk
    for c in (compiled, None):
        model.zero_grad()
        loss = trainer_loss(model, idx, pos, amask, P, tokens, A, mask, 0.7, 'torch', 'dapo', c)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[-2][0], grads[-1][0], atol=1e-6, rtol=1e-5)
    for a, b in zip(grads[-2][1], grads[-1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_compiled_update_forward_of_mla_moe_equals_eager_with_its_expert_loads():
    """The same for MLA + DeepSeekMoE, whose forward also counts each expert's load into buffers (the aux-loss-free
    bias update reads them after the step): the compiled forward must leave the counts eager leaves."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, kv_lora_rank=16,
                            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                            moe_intermediate_size=16))
    compiled = torch.compile(model, dynamic=True)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, 40, (n,), generator=g).tolist() for n in (3, 5, 4)]
    tokens = torch.randint(2, 40, (3, 7), generator=g)
    mask = (torch.arange(7) < torch.tensor([[7], [3], [5]])).float()
    gen = Generation(tokens, torch.zeros(3, 7), mask, mask.sum(1).long(), torch.ones(3, dtype=torch.bool))
    idx, pos, amask, P = sequences_for_training(prompts, gen, PAD, 'cpu', 32)
    A = torch.tensor([0.7, -1.2, 0.4])
    out = []
    for c in (compiled, None):
        model.zero_grad()
        moes = [m for m in model.modules() if hasattr(m, 'load_since_update')]   # the experts' load counters
        for m in moes:
            m.load_since_update.zero_()
        loss = trainer_loss(model, idx, pos, amask, P, tokens, A, mask, 0.7, 'chunked', 'dapo', c)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None],
                    [m.load_since_update.clone() for m in moes]))
    (la, ga, ca), (lb, gb, cb) = out
    torch.testing.assert_close(la, lb, atol=1e-6, rtol=1e-5)
    assert len(ga) == len(gb) > 0 and len(ca) == len(cb) > 0 and all(c.sum() > 0 for c in cb)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    for a, b in zip(ca, cb):
        torch.testing.assert_close(a, b)


# -----------------------------------------------------------------------------
# the stage end to end

@pytest.fixture(scope='module')
def stage_all(tmp_path_factory):
    """One `--stage all` run in this process, shared (tests copy what they would write to): its directory and
    what it printed."""
    out = str(tmp_path_factory.mktemp('all') / 'run')
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        main(['--preset', 'test', '--stage', 'all', '--out-dir', out])
    return out, log.getvalue()


def test_stage_all_writes_summary_report_and_plots(stage_all):
    out, stdout = stage_all
    assert 'loss near 0 is expected' in stdout          # the mu=1 explanation is in the log
    s = json.load(open(os.path.join(out, 'summary.json')))
    for k in ('base_countdown_pass@1', 'rl_countdown_pass@1', 'rl_countdown_pass@1_sampled', 'rl_countdown_pass@2',
              'wall_seconds', 'base_arith_acc', 'n_eval'):
        assert k in s, k
    g = os.path.join(out, 'grpo')
    for f in ('report.md', 'reward.png', 'length.png', 'selfcheck.png', 'stability.png', 'metrics.jsonl',
              'samples.jsonl', 'ckpt.pt'):
        assert os.path.isfile(os.path.join(g, f)), f
    rows = [json.loads(line) for line in open(os.path.join(g, 'metrics.jsonl'))]
    assert [r['step'] for r in rows] == [0, 1, 2, 3, 4]
    assert all('kl' in r and 'clip_frac_low' in r and 'entropy' in r and 'recheck_frac' in r for r in rows[1:])
    # the subset every rl_eval_interval (2) steps, the whole split at step 0 and at the end
    assert [r['step'] for r in rows if 'eval_sub_pass@1' in r] == [0, 2, 4]
    assert [r['step'] for r in rows if 'eval_pass@1' in r] == [0, 4]
    assert 'eval_sampled_recheck_frac' in rows[0] and 'eval_pass@k' in rows[0]   # the base, sampled as the final is
    for k in ('sub_best_pass@1', 'sub_final_pass@1', 'length_ratio', 'base_recheck_frac', 'rl_caught_frac',
              'base_sampled_recheck_frac', 'rl_sampled_recheck_frac', 'base_countdown_pass@2', 'rl_countdown_pass@2',
              'base_sampled_recheck_per_yes', 'rl_recheck_per_yes', 'base_sampled_copy_slip_frac',
              'rl_sampled_copy_slip_frac', 'base_sampled_recheck_gain', 'rl_sampled_recheck_after_false'):
        assert k in json.load(open(os.path.join(g, 'summary.json'))), k
    assert '| countdown pass@1 |' in open(os.path.join(g, 'report.md')).read()


def text_reward(texts, *args, **kwargs):
    """A reward that varies inside groups: the test preset's base never answers right, and with every reward 0
    no advantage moves the weights, so a resume that lost its optimizer state would still match."""
    acc = torch.tensor([float(sum(map(ord, t)) % 3 == 0) for t in texts])
    return acc, {'accuracy': acc, 'format': torch.zeros_like(acc)}


def varied_main(args):
    """train.main with text_reward; what the killed run's own process runs (python -c, below)."""
    train.rl_rewards = text_reward
    return train.main(args + ['--threads', '1'])


def test_grpo_resume_matches_uninterrupted(stage_all, tmp_path, capsys, monkeypatch):
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    init = os.path.join(a, 'pretrain', 'ckpt.pt')   # the test preset's pretrain, as `--stage pretrain` writes it
    shutil.copytree(os.path.join(stage_all[0], 'pretrain'), os.path.join(a, 'pretrain'))
    common = ['--preset', 'test', '--stage', 'grpo', '--init-from', init, '--ckpt-interval', '2', '--loss-type', 'dapo',
              '--dynamic-sampling', '--rl-mu', '2']
    monkeypatch.setattr(train, 'rl_rewards', text_reward)
    main(common + ['--out-dir', a])
    killed = common + ['--out-dir', b, '--exit-after', '3']   # a hard exit (os._exit): a process of its own
    p = subprocess.run([sys.executable, '-c', f"import test_rl; test_rl.varied_main({killed!r})"], cwd=ROOT,
                       env={**ENV, 'PYTHONPATH': os.pathsep.join([ROOT, os.path.dirname(__file__)])},
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 3, p.stderr[-3000:]
    main(common + ['--out-dir', b, '--resume'])
    ra = [json.loads(line) for line in open(os.path.join(a, 'grpo', 'metrics.jsonl'))]
    rb = [json.loads(line) for line in open(os.path.join(b, 'grpo', 'metrics.jsonl'))]
    assert [r['step'] for r in rb] == [r['step'] for r in ra] == [0, 1, 2, 3, 4]   # each step once
    for x, y in zip(ra, rb):
        for k in ('reward', 'response_len', 'eval_pass@1', 'loss'):
            if k in x:
                assert abs(x[k] - y[k]) < 1e-6, (k, x, y)
    # the weights: trained away from the base (so the comparison can fail), equal after the resume (optimizer
    # moments, RNG, sampler state all restored)
    base, wa, wb = [torch.load(f, weights_only=True)['model'] for f in
                    (init, os.path.join(a, 'grpo', 'ckpt.pt'), os.path.join(b, 'grpo', 'ckpt.pt'))]
    assert max((wa[k] - base[k]).abs().max().item() for k in wa) > 1e-4
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0)
    capsys.readouterr()
    main(common + ['--out-dir', b, '--resume'])                                     # finished: reported, not re-run
    assert 'finished already' in capsys.readouterr().out
    assert [json.loads(line)['step'] for line in open(os.path.join(b, 'grpo', 'metrics.jsonl'))] == [0, 1, 2, 3, 4]


def test_rl_learning_rate_warms_up_then_follows_the_cosine_to_its_floor(stage_all, tmp_path):
    """--rl-min-lr-frac 0.1 over 4 steps, 1 warmup step: the logged lr by hand, 2e-4 * (0.1 + 0.9 * (1 + cos(pi *
    t)) / 2) at t = (step - 1) / 3 after the warmup step; at the default floor 1 the rate stays at its peak."""
    init = os.path.join(stage_all[0], 'pretrain', 'ckpt.pt')
    want = {'0.1': [2e-4, 2e-4, 1.55e-4, 6.5e-5], '1.0': [2e-4] * 4}
    for frac, lrs in want.items():
        out = str(tmp_path / frac)
        main(['--preset', 'test', '--stage', 'grpo', '--init-from', init, '--out-dir', out, '--rl-warmup', '1',
              '--rl-min-lr-frac', frac])
        rows = [json.loads(line) for line in open(os.path.join(out, 'grpo', 'metrics.jsonl'))][1:]
        assert [r['lr'] for r in rows] == pytest.approx(lrs, rel=1e-6), frac


@pytest.mark.parametrize('args,needle', [
    (['--loss-type', 'kimi', '--adv-scale', 'group'], '--adv-scale none'),
    (['--loss-type', 'dr_grpo', '--adv-scale', 'batch'], '--adv-scale none'),
])
def test_loss_type_and_advantage_scale_that_disagree_are_refused(args, needle, capsys):
    dies(capsys, ['--preset', 'test', '--stage', 'grpo'] + args, needle)


def test_mla_moe_model_runs_the_pipeline(tmp_path):
    """The DeepSeek-V3 architecture (MLA with the absorbed cache in rollouts, DeepSeekMoE with the aux-loss-free
    bias updated after each step, MTP) through pretrain and grpo, with DAPO's overlong shaping and filtering."""
    out = str(tmp_path / 'moe')
    main(['--preset', 'test', '--stage', 'all', '--out-dir', out, '--attn', 'mla', '--mla-impl', 'absorb',
         '--kv-lora-rank', '16', '--qk-nope-head-dim', '8', '--qk-rope-head-dim', '8', '--v-head-dim', '8',
         '--ffn', 'moe', '--n-routed-experts', '4', '--num-experts-per-tok', '2', '--moe-intermediate-size', '16',
         '--mtp-depth', '1', '--log-interval', '1', '--overlong-buffer', '8', '--mask-truncated'])
    rows = [json.loads(line) for line in open(os.path.join(out, 'pretrain', 'metrics.jsonl'))]
    assert all('moe_max_over_mean' in r and 'mtp_loss' in r for r in rows)
    rl = [json.loads(line) for line in open(os.path.join(out, 'grpo', 'metrics.jsonl'))][1:]
    # the test model never stops within 24 tokens: every response is truncated, so the overlong term is -1 and
    # DAPO's filter leaves no token to train
    assert all(r['overlong_reward'] == -1.0 and r['truncated_frac'] == 1.0 and r['trained_tokens'] == 0 for r in rl)


# -----------------------------------------------------------------------------
# what the loop reports: self-correction metrics and the evaluation cadence (report.py)

def test_self_check_metrics_by_hand():
    texts = ['<think>3+2=5 5+4=24 vs 24 yes.wait 5+4=9 vs 24 no.3*2=6 6*4=24 vs 24 yes.</think>',   # caught, right
             '<think>3+2=5 5+4=24 vs 24 yes.</think>',                                             # slipped, believed
             '<think>3*2=6 6*4=24 vs 24 yes.wait 6*4=24 vs 24 yes.</think>',                         # confirmed
             '<think>3+2=5 5+4=9 vs 24 no.wait 5+4=9 vs 24 no.</think>']                             # caught, wrong
    m = report.self_check_metrics(texts, [True, False, True, False])
    # 3 re-checks over 4 yes verdicts (2 + 1 + 1 + 0: the redos' own verdicts are not counted, the last re-checks a no)
    assert m == {'recheck_frac': 0.75, 'caught_frac': 0.5, 'caught_acc': 0.5, 'slip_frac': 0.5, 'recheck_per_yes': 0.75}
    assert report.self_check_metrics(texts[1:3], [False, True])['caught_acc'] is None   # none caught: no rate
    # longer responses with more yes verdicts: the share of responses that re-check rises, the rate per yes falls
    long = ['<think>' + '1+1=2 vs 2 yes.' * 4 + 'wait 1+1=2 vs 2 yes.</think>'] * 2 + ['<think>1+1=2 vs 2 yes.</think>']
    m2 = report.self_check_metrics(long, [True] * 3)
    assert m2['recheck_frac'] == pytest.approx(2 / 3) and m2['recheck_per_yes'] == pytest.approx(2 / 9)
    assert report.self_check_metrics(['<think>2+2=4 vs 5 no.</think>'], [False])['recheck_per_yes'] is None


def test_self_correction_examples_are_caught_slips_that_end_correct():
    from tasks import Countdown
    p = Countdown([3, 2, 4], 24, '(3*2)*4', float('nan'))
    texts = ['<think>3+2=5 5+4=9 vs 24 yes.wait 5+4=9 vs 24 no.3*2=6 6*4=24 vs 24 yes.</think><answer>(3*2)*4</answer>',
             '<think>3*2=6 6*4=24 vs 24 yes.wait 6*4=24 vs 42 no.</think><answer>(3*2)*4</answer>',  # refutes a hit
             '<think>3+2=5 5+4=9 vs 24 yes.wait 5+4=9 vs 24 no.</think><answer>(3+2)+4</answer>',   # caught, wrong
             '<think>3*2=6 6*4=24 vs 24 yes.</think><answer>(3*2)*4</answer>']                      # no re-check
    shown = report.self_correction_examples(texts, [p], k=4)
    assert shown == [f"- `{p.prompt()}`: `{texts[0]}`"]
    assert report.self_correction_examples(texts[1:], [p], k=3) == ['- (none among these samples)']


def test_sampled_eval_at_the_rollout_temperature_by_hand(monkeypatch):
    seen = {}

    def fake_evaluate(model, tok, probs, kind, template, max_new_tokens, k=1, temperature=0.0, seed=0, detail=False):
        seen.update(k=k, temperature=temperature, n=len(probs))
        # 2 problems x 2 samples: a re-check that said no and still ended right, a plain right one, two wrong ones
        # that miscopy an operand (7) and the target (8)
        return {'pass@1': 0.5, 'pass@k': 0.5, 'mean_tokens': 3.0, 'scores': [1.0, 0.0], 'lengths': [3] * 4,
                'texts': ['1+2=3 vs 4 yes.wait 1+2=3 vs 4 no.2+2=4 vs 4 yes.', '2+2=4 vs 4 yes.', '3+7=10 vs 9 no.',
                          '3+5=8 vs 8 no.'],
                'correct': [True, True, False, False]}
    monkeypatch.setattr(report, 'evaluate', fake_evaluate)
    tc = SimpleNamespace(pass_k=2, temperature=0.7, max_new_tokens=8)
    probs = [Countdown([1, 2, 2], 4, '(1+2)+2', 0.0), Countdown([3, 5, 6], 9, '(3+6)', 0.0)]
    row, d = report.sampled_eval(None, None, probs, tc, 'short')
    assert seen == {'k': 2, 'temperature': 0.7, 'n': 2} and d['texts'][1] == '2+2=4 vs 4 yes.'
    assert row == {'eval_sampled_pass@1': 0.5, 'eval_pass@k': 0.5, 'eval_sampled_recheck_frac': 0.25,
                   'eval_sampled_caught_frac': 0.25, 'eval_sampled_caught_acc': 1.0, 'eval_sampled_recheck_per_yes': 1 / 3,
                   'eval_sampled_copy_slip_frac': 0.5}
    # a world whose corpus re-checks: forced_recheck's figures on the same samples join the row
    monkeypatch.setattr(report, 'forced_recheck', lambda model, tok, probs, texts, k, *a: {
        'recheck_gain': -0.25, 'first_yes_false': len(texts) / (4 * k)})
    assert report.sampled_eval(None, None, probs, tc, 'short', forced=True)[0] == {
        **row, 'eval_sampled_recheck_gain': -0.25, 'eval_sampled_first_yes_false': 0.5}


def test_forced_recheck_by_hand(monkeypatch):
    # three responses say yes (a true hit, a slip, a true hit late in the budget), one never does; a scripted
    # generate continues each from the decoded text it is handed, so the figures can be counted by hand
    from tokenizer import Tokenizer
    tok = Tokenizer()
    # (the late one first: forced_recheck sorts by length, so its chunks see them in another order)
    probs = [Countdown([6, 2, 3], 9, '(6/2)*3', 0.0), Countdown([3, 2, 4], 24, '(3*2)*4', 0.0),
             Countdown([5, 3, 1], 8, '(5+3)*1', 0.0), Countdown([1, 1, 1], 3, '(1+1)+1', 0.0)]
    late = '6+2=8 8+3=11 vs 9 no.6+2=8 8-3=5 vs 9 no.'
    texts = [f'<think>{late}6/2=3 3*3=9 vs 9 yes.</think><answer>(6/2)*3</answer>',
             '<think>3*2=6 6*4=24 vs 24 yes.</think><answer>(3*2)*4</answer>',
             '<think>5*3=15 15-1=14 vs 8 yes.</think><answer>(5*3)-1</answer>',
             '<think>1+1=2 2*1=2 vs 3 no.</think><answer>(1+1)*1</answer>']
    go_on = {24: (' 3*2=6 6*4=24 vs 24 yes.</think><answer>(3*2)*4</answer>', '(3*2)*4</answer>'),   # confirms
             8: (' 5*3=15 15-1=14 vs 8 no.5+3=8 8*1=8 vs 8 yes.</think><answer>(5+3)*1</answer>',  # a rescue
                 '(5*3)-1</answer>'),
             9: (' 6/2=3 3*3=9 vs 9 yes.</think><answer>(6/2)*3</answer>', '(6/2)*3</answer>')}   # out of budget
    budgets = []

    def fake_generate(model, prompts, n, stop_ids, pad_id, temperature=1.0, seeds=None):
        budgets.append(n)
        outs = []
        for ids in prompts:
            text = tok.decode(ids)
            target = int(text.split('make ')[1].split(' ')[0])
            outs.append(tok.encode(go_on[target][0 if text.endswith('wait') else 1])[:n])
        L = max(len(o) for o in outs)
        return SimpleNamespace(tokens=torch.tensor([o + [pad_id] * (L - len(o)) for o in outs]),
                               lengths=torch.tensor([len(o) for o in outs]))
    monkeypatch.setattr(report, 'generate', fake_generate)
    model = torch.nn.Linear(1, 1)
    model.config = SimpleNamespace(block_size=10_000)
    budget = len(tok.encode(texts[0].split('</think>')[0] + 'wait' + go_on[9][0])) - 1   # the late redo misses by one
    m = report.forced_recheck(model, tok, probs, texts, 1, 'short', budget, 0.7)   # one chunk: the cut is ours
    # stopping is right after the two true hits; the re-check is right after the first hit and the slip (the
    # rescue), and wrong after the late hit, whose redo is cut one token before its answer closes
    assert m == pytest.approx({'recheck_gain': 2 / 3 - 2 / 3, 'recheck_after_true': 0.5, 'recheck_after_false': 1.0,
                               'first_yes_false': 1 / 3})
    assert len(budgets) == 2 and model.training   # 2 variants x 1 chunk; the model's mode is restored
    assert report.forced_recheck(model, tok, probs, texts, 1, 'short', budget, 0.7, chunk=1) == m and len(budgets) == 8
    # with room for the late redo, it ends right too
    assert report.forced_recheck(model, tok, probs, texts, 1, 'short', budget + 1, 0.7)['recheck_after_true'] == 1.0
    assert report.forced_recheck(model, tok, probs[3:], texts[3:], 1, 'short', budget, 0.7) == {}


def test_rl_eval_cadence_subset_and_whole_split(monkeypatch):
    calls = []

    def fake_evaluate(model, tok, probs, kind, template, max_new_tokens, detail=False):
        calls.append(len(probs))
        n = len(probs)   # problem i right iff i is even; response i has i + 1 tokens and re-checks when i % 4 == 0
        return {'pass@1': sum(i % 2 == 0 for i in range(n)) / n, 'pass@k': 0.0, 'mean_tokens': (n + 1) / 2,
                'scores': [float(i % 2 == 0) for i in range(n)], 'lengths': [i + 1 for i in range(n)],
                'texts': ['wait 1+1=2 vs 2 yes.' if i % 4 == 0 else '' for i in range(n)]}
    monkeypatch.setattr(report, 'evaluate', fake_evaluate)
    tc = SimpleNamespace(rl_steps=12, rl_eval_interval=5, n_eval_subset=4, max_new_tokens=8)
    rows = {s: report.rl_eval(None, None, list(range(10)), tc, 'short', s) for s in range(13)}
    assert calls == [10, 4, 4, 10] and [s for s, r in rows.items() if r] == [0, 5, 10, 12]
    assert rows[5] == {'eval_sub_pass@1': 0.5, 'eval_sub_mean_tokens': 2.5, 'eval_recheck_frac': 0.25}
    # the whole split at the end: its own figures, and its first 4 problems as the subset's point
    assert rows[12] == pytest.approx({'eval_sub_pass@1': 0.5, 'eval_sub_mean_tokens': 2.5, 'eval_recheck_frac': 0.3,
                                      'eval_pass@1': 0.5, 'eval_mean_tokens': 5.5})
