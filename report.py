"""
What a run reports: the metrics log, plots, report.md and summary.json, the held-out evaluation (greedy pass@1,
sampled pass@k, sharded over ranks under torchrun), and the GRPO stage's per-step metrics and final report.
Rank 0 writes; every rank evaluates (each answers its shard of the problems).
"""
import dataclasses
import json
import math
import os
import re
import time

import numpy as np
import torch

from harness import autocast, encode_prompt, gather_list, print0, rank_world, shard
from model import document_mask
from rewards import arithmetic_reward, countdown_reward
from sample import generate, row_seed
from shard import gathered
from tasks import copy_slips, first_yes_end, problems, self_checks


class MetricsLog:
    """
    A jsonl file, one object per line, flushed at once so a killed run keeps what it logged. Resuming from a
    checkpoint at step s keeps the lines with step <= s and drops the rest (the steps between the checkpoint and
    the kill run again), so every step is in the file once.
    """

    def __init__(self, path, resume_step=None):
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        keep = []
        if resume_step is not None and os.path.isfile(path):
            for line in open(path):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:   # a line torn by the kill
                    continue
                if row.get('step', 0) <= resume_step:
                    keep.append(line if line.endswith('\n') else line + '\n')
        self.f = open(path, 'w')
        self.f.writelines(keep)
        self.f.flush()

    def log(self, **kv):
        self.f.write(json.dumps(kv) + '\n')
        self.f.flush()


def read_jsonl(path):
    return [json.loads(line) for line in open(path)] if os.path.isfile(path) else []


def plot_curves(path, rows, keys, title):
    """One PNG, one panel per key, against step. Quietly skipped when matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return
    keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r['step'], r[k]) for r in rows if r.get(k) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='.' if len(pts) < 30 else None)
        ax.set_title(k)
        ax.set_xlabel('step')
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'w') as f:
        json.dump(obj, f, indent=2)


def write_report(path, title, body, summary=None, config=None):
    """The one report writer: a title, the stage's own markdown lines, its summary as a table, its config."""
    lines = [f'# {title}', '', *body, '']
    if summary:
        lines += ['| metric | value |', '|---|---|']
        lines += [f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()
                  if not isinstance(v, (dict, list))]
        lines.append('')
    if config:
        lines += ['## Config', '', '```json', json.dumps(config, indent=1), '```', '']
    with open(path, 'w') as f:
        f.write('\n'.join(lines))


# -----------------------------------------------------------------------------
# evaluation: greedy and sampled pass@k on held-out problems

def score(kind, text, p):
    return countdown_reward(text, p.numbers, p.target) if kind == 'countdown' else arithmetic_reward(text, p.result)


@torch.no_grad()
def evaluate(model, tok, probs, kind, template, max_new_tokens, batch_size=512, k=1, temperature=0.0, seed=0,
             detail=False):
    """
    Mean pass@k over problems (k samples each; k=1 with temperature 0 is greedy pass@1) and the mean response
    length in tokens. With n = k samples the unbiased pass@k estimator of Chen et al. 2021 is "any correct".
    detail=True returns a dict that adds the sampled pass@1 of the same samples (their mean accuracy), each
    problem's score ('scores': the best of its k), every response, its length and whether it is right ('texts',
    'lengths', 'correct', problem-major).
    Under torchrun each rank answers its shard of the problems and the scores are all-gathered: sample j of
    problem i draws from its own seed (seed, i, j), so N ranks score exactly what one process scores.
    """
    was_training = model.training
    model.eval()
    mine = shard(len(probs))
    rows = [(i, j) for i in range(len(probs))[mine] for j in range(k)]
    correct, lengths, texts = [], [], []
    with gathered(model):   # --fsdp: the ranks' shards differ in batches and decode steps (shard.gathered)
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            with autocast(next(model.parameters()).device):
                gen = generate(model, [encode_prompt(tok, probs[i], template) for i, _ in chunk], max_new_tokens,
                               tok.stop_ids, tok.pad, temperature=temperature,
                               seeds=[row_seed(seed, i, j) for i, j in chunk] if temperature > 0 else None)
            for r, (i, _) in enumerate(chunk):
                n = int(gen.lengths[r])
                texts.append(tok.decode(gen.tokens[r, :n].tolist()))
                correct.append(score(kind, texts[-1], probs[i]))
                lengths.append(n)
    model.train(was_training)
    correct, lengths = gather_list(correct), gather_list(lengths)   # in problem order: ranks hold contiguous shards
    texts = gather_list(texts) if detail else texts
    c = np.array(correct).reshape(len(probs), k)
    out = {'pass@k': float((c.max(1) > 0).mean()), 'pass@1': float((c > 0).mean()),
           'mean_tokens': float(np.mean(lengths)) if lengths else math.nan, 'scores': c.max(1).tolist(),
           'lengths': lengths, 'texts': texts, 'correct': (c > 0).flatten().tolist()}
    return out if detail else (out['pass@k'], out['mean_tokens'])


def base_evals(model, tok, tc, task_cfg):
    """Greedy held-out accuracy of a model on worked arithmetic and on countdown (at the RL stage's budget, so
    that this is the base figure the grpo stage's step 0 reports too)."""
    ar_test = problems('arithmetic', 'test', tc.n_eval, tc.seed, task_cfg)
    cd_test = problems('countdown', 'test', tc.n_eval, tc.seed, task_cfg)
    arith, _ = evaluate(model, tok, ar_test, 'arithmetic', task_cfg.template, 40)
    cd, cd_len = evaluate(model, tok, cd_test, 'countdown', task_cfg.template, tc.max_new_tokens)
    return {'base_arith_acc': arith, 'base_countdown_pass@1': cd, 'base_countdown_mean_tokens': cd_len}


@torch.no_grad()
def val_loss(model, val, device, bos):
    """Mean next-token loss over packed rows (B, T + 1), each document attending to itself only."""
    model.eval()
    losses = [model(val[i:i + 16, :-1].to(device), val[i:i + 16, 1:].to(device),
                    mask=document_mask(val[i:i + 16, :-1].to(device), bos))[1] for i in range(0, len(val), 16)]
    model.train()
    return float(torch.stack(losses).mean())



def self_check_metrics(texts, correct):
    """
    R1-Zero's "aha moment" (DeepSeek-R1 sec 2.2.4: the model re-evaluates a step and corrects it), measured in
    the tiny world's words (tasks.self_checks): the share of responses with a re-check (`wait 5*4=20 vs 24 no.`),
    the share whose re-check said no (a slip caught), how often those end correct (the rescue rate: None when
    none was caught), the share with a slip (a wrong step or verdict), and re-checks per `yes` verdict (None
    without one): RL's responses are longer and hold more yes verdicts, so the share of responses that re-check
    can rise while the habit, what a yes is followed by, falls (EXPERIMENTS.md an). texts and correct align.
    """
    checks = torch.tensor([self_checks(t) for t in texts]).view(-1, 4)   # (N, 4) re-checks, said no, wrong, yes
    correct = torch.as_tensor(correct, dtype=torch.bool)
    caught, yes = checks[:, 1] > 0, int(checks[:, 3].sum())
    return {'recheck_frac': float((checks[:, 0] > 0).float().mean()), 'caught_frac': float(caught.float().mean()),
            'caught_acc': float(correct[caught].float().mean()) if caught.any() else None,
            'slip_frac': float((checks[:, 2] > 0).float().mean()),
            'recheck_per_yes': int(checks[:, 0].sum()) / yes if yes else None}


def rl_metrics(seen, terms, batch, mask, G, pool):
    """One step's rollout metrics as floats: `seen` holds every dynamic-sampling round's (rewards, terms, texts)."""
    gen_r = torch.cat([r for r, _, _ in seen]).view(-1, G)                                # (groups, G)
    gen_t = {k: torch.cat([t[k] for _, t, _ in seen]) for k in seen[0][1]}
    lens, right = batch.lengths.float(), terms['accuracy'] > 0
    drawn = [pool[i].solve_rate for i in batch.drawn]   # the difficulty label of the new prompts
    trained = batch.gen.mask.sum(1)                     # (N,) tokens each row trains
    row = {'reward': gen_r.mean(), 'reward_std': gen_r.std(), 'accuracy': (gen_t['accuracy'] > 0).float().mean(),
           **{f'{k}_reward': v.mean() for k, v in gen_t.items() if k != 'accuracy'},
           'response_len': lens.mean(), 'response_len_correct': lens[right].mean() if right.any() else None,
           'response_len_wrong': lens[~right].mean() if (~right).any() else None,
           'zero_var_frac': (gen_r == gen_r[:, :1]).all(1).float().mean(), 'kept_groups': len(batch.ids),
           'rollout_rounds': len(seen), 'truncated_frac': (~batch.gen.finished).float().mean(),
           'trained_tokens': mask.sum(), 'prompt_solve_rate': sum(drawn) / len(drawn) if drawn else None,
           'buffer_groups': batch.buffered, 'repeat_stops': batch.repeat_stops,
           'continued_token_frac': trained[batch.continued].sum() / trained.sum().clamp(min=1),
           **self_check_metrics([x for _, _, ts in seen for x in ts], gen_t['accuracy'] > 0)}
    if torch.cuda.is_initialized():   # this step's peak (rollouts, logprobs, loss), what --dry-run plans; then reset
        row['cuda_peak_gib'] = torch.cuda.max_memory_allocated() / 2 ** 30
        torch.cuda.reset_peak_memory_stats()
    return {k: float(v) if torch.is_tensor(v) else v for k, v in row.items()}


def rl_eval(model, tok, cd_test, tc, template, step):
    """
    The GRPO loop's held-out greedy evaluation at `step`: every rl_eval_interval steps on the split's first
    n_eval_subset problems (a fixed subset: a curve cheap enough to draw every few steps), at step 0 and at the
    last step on the whole split (the base and final figures; their first n_eval_subset give the subset's point).
    Returns {} between evaluations, else 'eval_sub_pass@1', 'eval_sub_mean_tokens', the greedy responses'
    'eval_recheck_frac', and with the whole split 'eval_pass@1' and 'eval_mean_tokens'.
    """
    n = min(tc.n_eval_subset or len(cd_test), len(cd_test))
    full = step in (0, tc.rl_steps) or n == len(cd_test)
    if step not in (0, tc.rl_steps) and step % tc.rl_eval_interval:
        return {}
    d = evaluate(model, tok, cd_test if full else cd_test[:n], 'countdown', template, tc.max_new_tokens, detail=True)
    row = {'eval_sub_pass@1': float(np.mean(d['scores'][:n])), 'eval_sub_mean_tokens': float(np.mean(d['lengths'][:n])),
           'eval_recheck_frac': self_check_metrics(d['texts'], [s > 0 for s in d['scores']])['recheck_frac']}
    if full:
        row.update({'eval_pass@1': d['pass@1'], 'eval_mean_tokens': d['mean_tokens']})
    return row


def sampled_eval(model, tok, cd_test, tc, template, forced=False):
    """
    pass_k samples per held-out problem at the rollout temperature, the way R1 reports pass@1 (sec 3, "Evaluation
    Setup": the mean over k samples at temperature 0.6), on the base (the loop's step 0) and on the final model:
    the same problems and temperature before and after, so the re-check share of 2 x pass_k x n_eval responses says
    whether RL amplified the aha. Returns ({'eval_sampled_pass@1', 'eval_pass@k', 'eval_sampled_recheck_frac',
    'eval_sampled_caught_frac', 'eval_sampled_caught_acc', 'eval_sampled_recheck_per_yes',
    'eval_sampled_copy_slip_frac'}, evaluate's detail dict). The last is the share of responses that miscopy a
    prompt number or the target (tasks.copy_slips): the slip by which MLA's bases sample worse than dense ones
    (EXPERIMENTS.md cp). forced=True (a world whose corpus re-checks) adds forced_recheck's figures on the same
    samples, as 'eval_sampled_recheck_gain' etc.
    """
    d = evaluate(model, tok, cd_test, 'countdown', template, tc.max_new_tokens, k=tc.pass_k, temperature=tc.temperature,
                 seed=2, detail=True)
    m = self_check_metrics(d['texts'], d['correct'])
    copied = [any(copy_slips(t, p)) for p, t in zip((p for p in cd_test for _ in range(tc.pass_k)), d['texts'])]
    del m['slip_frac']   # the rollouts' figure (rl_metrics); here the copy slips stand beside the re-checks
    m['copy_slip_frac'] = sum(copied) / max(1, len(copied))
    if forced:
        m.update(forced_recheck(model, tok, cd_test, d['texts'], tc.pass_k, template, tc.max_new_tokens, tc.temperature))
    return {'eval_sampled_pass@1': d['pass@1'], 'eval_pass@k': d['pass@k'],
            **{f'eval_sampled_{k}': v for k, v in m.items()}}, d


@torch.no_grad()
def forced_recheck(model, tok, probs, texts, k, template, max_new_tokens, temperature, seed=3, chunk=64):
    """
    What a re-check is worth where a response first says `yes`, the causal side of R1's aha (DeepSeek-R1 sec
    2.2.4; EXPERIMENTS.md fw): each response with an attempt that said yes (tasks.first_yes_end) is cut after
    that `yes.` and continued twice within the rest of its own response budget, once with `wait` appended (a
    forced re-check: the corpus's redo follows) and once with `</think><answer>` (stop: the answer copied from
    that attempt, right iff the yes was). texts: k per problem, problem-major. Returns {'recheck_gain': the
    re-check's accuracy minus stopping's, 'recheck_after_true' / 'recheck_after_false': the re-check's accuracy
    where stopping was right / wrong (None without such cases), 'first_yes_false': the share where stopping was
    wrong}, or {} when no response said yes. Every rank computes all of it (the texts are gathered).
    """
    cases = [(probs[i // k], t[:e], i) for i, t in enumerate(texts) if (e := first_yes_end(t)) is not None]
    if not cases:
        return {}
    was_training = model.training
    model.eval()
    right = {}
    with gathered(model):
        prompts = [encode_prompt(tok, p, template) for p, _, _ in cases]
        for name, tail in (('recheck', 'wait'), ('stop', '</think><answer>')):
            rows = [(a, tok.encode(pre + tail), p, pre + tail, i) for a, (p, pre, i) in zip(prompts, cases)]
            order = sorted(range(len(rows)), key=lambda r: len(rows[r][0]) + len(rows[r][1]))   # similar lengths
            out = [False] * len(rows)
            for s in range(0, len(order), chunk):
                part = [rows[r] for r in order[s:s + chunk]]
                left = [max_new_tokens - len(cont) for _, cont, *_ in part]   # each row's own budget
                P = max(len(a) + len(b) for a, b, *_ in part)
                n = max(1, min(max(left), model.config.block_size - P))
                with autocast(next(model.parameters()).device):
                    gen = generate(model, [a + b for a, b, *_ in part], n, tok.stop_ids, tok.pad, temperature=temperature,
                                   seeds=[row_seed(seed, i, 0) for *_, i in part] if temperature > 0 else None)
                for r, ((_, _, p, text, _), m) in enumerate(zip(part, left)):
                    cut = max(0, min(int(gen.lengths[r]), m))   # a continuation past the budget is cut there
                    out[order[s + r]] = score('countdown', text + tok.decode(gen.tokens[r, :cut].tolist()), p) > 0
            right[name] = torch.tensor(out, dtype=torch.float)
    model.train(was_training)
    rc, stop = right['recheck'], right['stop'] > 0
    return {'recheck_gain': float(rc.mean() - stop.float().mean()),
            'recheck_after_true': float(rc[stop].mean()) if stop.any() else None,
            'recheck_after_false': float(rc[~stop].mean()) if (~stop).any() else None,
            'first_yes_false': float((~stop).float().mean())}


def finish_pretrain(tc, task_cfg, model, tok, val, device, final_loss, stage_dir, t0):
    """The base's summary.json (losses, held-out greedy countdown and arithmetic), loss plot and report.md."""
    summary = {'params': model.num_params(), 'final_train_loss': final_loss,
               'final_val_loss': val_loss(model, val, device, tok.bos), **base_evals(model, tok, tc, task_cfg)}
    if rank_world()[0] != 0:   # one writer
        return
    summary['wall_seconds'] = round(time.time() - t0, 1)
    plot_curves(os.path.join(stage_dir, 'loss.png'), read_jsonl(os.path.join(stage_dir, 'metrics.jsonl')),
                ['loss', 'val_loss'], 'pretrain')
    write_json(os.path.join(stage_dir, 'summary.json'), summary)
    write_report(os.path.join(stage_dir, 'report.md'), 'nanoR1 pretrain report', ['![loss](loss.png)'], summary,
                 {**dataclasses.asdict(tc), **dataclasses.asdict(task_cfg), **model.config.to_dict()})
    print0(json.dumps(summary, indent=2))


def _mean(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


_CAUGHT = re.compile(r'=(\d+) vs \d+ yes\.wait [^.<]* no\.')   # the re-checked result, where the redo said no


def self_correction_examples(texts, probs, k, n=3):
    """Up to n responses that re-checked a wishful `yes` (its result is not the target), heard the redo say no,
    and still ended correct: what the aha looks like here. A redo that says no to a true hit is not one."""
    out = []
    for i, t in enumerate(texts):
        p = probs[i // k]
        caught = any(int(r) != p.target for r in _CAUGHT.findall(t.split('</think>')[0]))
        if caught and countdown_reward(t, p.numbers, p.target) > 0 and len(out) < n:
            out += [f"- `{p.prompt()}`: `{t.replace('<|eos|>', '')}`"]
    return out or ['- (none among these samples)']


def finish_grpo(tc, task_cfg, model, tok, rows, cd_test, stage_dir, t0):
    """Final evaluation, summary.json, plots and report.md: accuracy, length and self-correction, base vs RL."""
    tmpl, last = task_cfg.template, rows[-1]
    if last.get('step') == tc.rl_steps and 'eval_pass@1' in last:   # the loop just evaluated the final model
        rl_cd, rl_len = last['eval_pass@1'], last['eval_mean_tokens']
    else:
        rl_cd, rl_len = evaluate(model, tok, cd_test, 'countdown', tmpl, tc.max_new_tokens)
    # k samples per problem at the rollout temperature: the sampled pass@1 (their mean), pass@k, the re-check share
    fin, d = sampled_eval(model, tok, cd_test, tc, tmpl, forced=task_cfg.rechecks)
    if rank_world()[0] != 0:   # one writer
        return
    steps = [r for r in rows if 'accuracy' in r]
    sub = [r for r in rows if 'eval_sub_pass@1' in r]
    best = max(sub, key=lambda r: r['eval_sub_pass@1']) if sub else {}
    base_cd, base_len = rows[0]['eval_pass@1'], rows[0]['eval_mean_tokens']
    s = {'base_countdown_pass@1': base_cd, 'rl_countdown_pass@1': rl_cd,
         **{f'{w}_countdown_pass@1_sampled': r.get('eval_sampled_pass@1') for w, r in (('base', rows[0]), ('rl', fin))},
         # with --pass-k 1 the sampled pass@k is the sampled pass@1: its key must not overwrite the greedy figure
         **({f'{w}_countdown_pass@{tc.pass_k}': r.get('eval_pass@k') for w, r in (('base', rows[0]), ('rl', fin))}
            if tc.pass_k > 1 else {}),
         'rl_mean_response_tokens': rl_len, 'base_mean_response_tokens': base_len,
         'pass@1_ratio': rl_cd / base_cd if base_cd else None, 'length_ratio': rl_len / base_len if base_len else None,
         # the curve on the fixed subset: its best point and the final one (the issue's "no more than 3 points
         # below its best at the end")
         'sub_n': min(tc.n_eval_subset or len(cd_test), len(cd_test)), 'sub_best_pass@1': best.get('eval_sub_pass@1'),
         'sub_best_step': best.get('step'), 'sub_final_pass@1': sub[-1]['eval_sub_pass@1'] if sub else None,
         # self-correction (R1 sec 2.2.4): rollouts at the training temperature, mean of the first and last 5 steps
         **{f'{w}_{k}': _mean(part, k) for w, part in (('base', steps[:5]), ('rl', steps[-5:]))
            for k in ('recheck_frac', 'caught_frac', 'caught_acc', 'slip_frac', 'recheck_per_yes')},
         'base_greedy_recheck_frac': rows[0].get('eval_recheck_frac'),
         'rl_greedy_recheck_frac': last.get('eval_recheck_frac'),
         # the aha on the held-out split: the same problems and temperature, pass_k samples each, base vs final
         **{f'{w}_sampled_{k}': r.get(f'eval_sampled_{k}') for w, r in (('base', rows[0]), ('rl', fin))
            for k in ('recheck_frac', 'caught_frac', 'caught_acc', 'recheck_per_yes', 'copy_slip_frac', 'recheck_gain',
                      'recheck_after_true', 'recheck_after_false', 'first_yes_false')},
         'sample_temperature': tc.temperature,
         'n_eval': len(cd_test), 'rl_steps': tc.rl_steps, 'grpo_wall_seconds': round(time.time() - t0, 1)}
    pre = os.path.join(tc.out_dir, 'pretrain', 'summary.json')
    if os.path.isfile(pre):
        s['base_arith_acc'] = json.load(open(pre)).get('base_arith_acc')
    write_json(os.path.join(stage_dir, 'summary.json'), s)
    plots = {'reward': ['reward', 'accuracy', 'eval_sub_pass@1', 'eval_pass@1'],
             'length': ['response_len', 'response_len_correct', 'response_len_wrong', 'eval_sub_mean_tokens'],
             'selfcheck': ['recheck_frac', 'caught_frac', 'caught_acc', 'slip_frac', 'recheck_per_yes',
                           'eval_recheck_frac'],
             'stability': ['kl', 'entropy', 'clip_frac_low', 'clip_frac_high', 'grad_norm']}
    for plot, keys in plots.items():
        plot_curves(os.path.join(stage_dir, f'{plot}.png'), rows, keys, f'grpo: {plot}')
    first, f3 = steps[0] if steps else {}, lambda v: 'n/a' if v is None else f'{v:.3f}'
    write_report(os.path.join(stage_dir, 'report.md'), 'nanoR1 grpo report', [
        f"preset `{tc.preset}`, {model.num_params():,} parameters, {tc.rl_steps} RL steps, loss `{tc.loss_type}`",
        '', '## Before / after RL (held-out greedy, unless the row says)', '', '| metric | base | after RL |', '|---|---|---|',
        f"| countdown pass@1 | {base_cd:.3f} | {rl_cd:.3f} |",
        f"| mean response tokens | {base_len:.1f} | {rl_len:.1f} |",
        f"| train accuracy (first / last step) | {first.get('accuracy', math.nan):.3f} | "
        f"{last.get('accuracy', math.nan):.3f} |",
        f"| rollouts with a re-check (first / last 5 steps) | {f3(s['base_recheck_frac'])} | {f3(s['rl_recheck_frac'])} |",
        f"| rollouts whose re-check said no | {f3(s['base_caught_frac'])} | {f3(s['rl_caught_frac'])} |",
        f"| ... of which correct (the rescue rate) | {f3(s['base_caught_acc'])} | {f3(s['rl_caught_acc'])} |",
        f"| sampled pass@1, T={tc.temperature} ({tc.pass_k} per problem) | {f3(s['base_countdown_pass@1_sampled'])} | "
        f"{f3(s['rl_countdown_pass@1_sampled'])} |",
        f"| sampled pass@{tc.pass_k} | {f3(rows[0].get('eval_pass@k'))} | {f3(fin['eval_pass@k'])} |",
        f"| sampled responses with a re-check | {f3(s['base_sampled_recheck_frac'])} | "
        f"{f3(s['rl_sampled_recheck_frac'])} |",
        f"| sampled re-checks per `yes` verdict (the habit, apart from length) | "
        f"{f3(s['base_sampled_recheck_per_yes'])} | {f3(s['rl_sampled_recheck_per_yes'])} |",
        f"| sampled responses that miscopy a prompt number or the target | {f3(s['base_sampled_copy_slip_frac'])} | "
        f"{f3(s['rl_sampled_copy_slip_frac'])} |",
        f"| a re-check forced at the first `yes`: accuracy minus stopping there (after a true / a false yes) | "
        f"{f3(s['base_sampled_recheck_gain'])} ({f3(s['base_sampled_recheck_after_true'])} / "
        f"{f3(s['base_sampled_recheck_after_false'])}) | {f3(s['rl_sampled_recheck_gain'])} "
        f"({f3(s['rl_sampled_recheck_after_true'])} / {f3(s['rl_sampled_recheck_after_false'])}) |", '',
        f"held-out greedy curve ({s['sub_n']} problems, every {tc.rl_eval_interval} steps): best "
        f"{f3(s['sub_best_pass@1'])} at step {s['sub_best_step']}, final {f3(s['sub_final_pass@1'])}", '',
        f'## Self-correction: sampled responses (T={tc.temperature}) whose re-check caught a slip and still ended '
        'correct', '',
        *self_correction_examples(d['texts'], cd_test, tc.pass_k), '', '## Plots', '',
        *[f'![{p}]({p}.png)\n' for p in plots]], s,
        {**dataclasses.asdict(tc), **dataclasses.asdict(task_cfg), **model.config.to_dict()})
    print0(json.dumps(s, indent=2))


def run_summary(out_dir, stages, wall):
    """<out_dir>/summary.json of a run: the last stage's keys at the top, every stage's headline figures below.
    stages: {stage dir: its stage_summary}, in pipeline order."""
    last = list(stages.values())[-1]
    top = {**{k: v for k, v in last.items() if k != 'stage_wall_seconds'}, 'pipeline': list(stages),
           'stages': {d: {k: v[k] for k in ('countdown_pass@1', 'mean_response_tokens', 'stage_wall_seconds')}
                      for d, v in stages.items()}, 'wall_seconds': round(wall, 1)}
    write_json(os.path.join(out_dir, 'summary.json'), top)
    if len(stages) > 1:
        print0(json.dumps(top['stages'], indent=2))


def stage_summary(tc, d, wall):
    """A stage's summary.json with the keys every stage shares filled in (held-out greedy pass@1, mean response
    tokens, stage wall seconds)."""
    path = os.path.join(tc.out_dir, d, 'summary.json')
    s = json.load(open(path))
    for key, names in (('countdown_pass@1', ('rl_countdown_pass@1', 'base_countdown_pass@1')),
                       ('mean_response_tokens', ('rl_mean_response_tokens', 'base_countdown_mean_tokens'))):
        s.setdefault(key, next((s[n] for n in names if n in s), None))
    s.setdefault('stage_wall_seconds', round(wall, 1))
    write_json(path, s)
    return s
