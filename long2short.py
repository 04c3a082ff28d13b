"""
Kimi k1.5's long2short (Kimi Team 2025, sec 2.4): four ways to keep a long-CoT model's accuracy at fewer tokens.

    python long2short.py merge    --from out/tiny/grpo/ckpt.pt --alpha 0.5 --alphas 0,0.25,0.5,0.75,1
    python long2short.py shortest --from out/tiny/grpo/ckpt.pt
    python long2short.py dpo      --from out/tiny/grpo/ckpt.pt --dpo-beta 0.1
    python long2short.py rl       --from out/tiny/grpo/ckpt.pt --length-weight 0.2
    python long2short.py all      --from out/tiny/grpo/ckpt.pt --out-dir out/tiny/long2short
    torchrun --nproc_per_node=2 long2short.py dpo --from out/tiny/grpo/ckpt.pt   # any method, on N ranks
    torchrun --nproc_per_node=8 long2short.py all --from CKPT --fsdp             # the trained models sharded (FSDP2)

1. merge: weight averaging, theta = alpha * theta_long + (1 - alpha) * theta_short, tensor by tensor.
2. shortest: shortest rejection sampling: n = 8 samples per train problem, keep the shortest correct one, SFT the
   long model on those (distill.rejection_sample(keep='shortest') and distill.sft).
3. dpo: Rafailov et al. 2023 eq. 7 on Kimi's pairs: chosen = the shortest correct sample of a problem, rejected =
   the longer responses, wrong ones longer than the chosen and correct ones longer than 1.5x the chosen:
       L_DPO = -E[ log sigmoid( beta * log pi(y_w|x)/pi_ref(y_w|x) - beta * log pi(y_l|x)/pi_ref(y_l|x) ) ]
   with pi_ref the frozen source and log pi(y|x) summed over the response tokens only.
4. rl: GRPO from the long model with Kimi's length reward (sec 2.3.3, rewards.kimi_length_reward, weight
   --length-weight) and a much smaller rollout budget, by calling train.py's grpo stage unchanged.

Under torchrun every rank samples its shard of the problems (distill.sample_scored), trains its slice of each
global batch with its loss normalised by the global batch, and the ranks' gradients are summed (as distill.sft,
whose SFT shortest uses); rank 0 alone writes. rl is train.py's grpo stage, which does the same. With --fsdp the
policies shortest and dpo train and dpo's frozen reference are sharded as train.py's (shard.load_model: each rank
holds 1/N of the weights, gradients and AdamW state; generation runs on the gathered model) and their checkpoints
are sharded ones; rl passes --fsdp on; merge trains nothing and averages whole weights on every rank.

Every method writes <out-dir>/<method>/summary.json (held-out greedy countdown pass@1, mean response tokens, wall
seconds), report.md and a checkpoint in train.py's format (train.py --init-from accepts it); `all` runs the four
and writes <out-dir>/summary.json and report.md, a table against the source.

Where we deviate, and why
- The tiny world has no separately trained short-CoT model; `merge` uses the source's base (the checkpoint its
  grpo stage started from), which answers about 10% shorter (README) and shares its architecture and tokenizer.
- Kimi's RL warm-up (train without the length penalty first) is the source's own grpo run: long2short RL starts
  from its checkpoint with the penalty on from step 0.
- rl scales advantages by the batch std (--adv-scale batch), not per group: with the group std, groups whose
  samples are all wrong differ by length alone and get unit-size "be shorter" advantages whatever the weight
  (the tiny model collapsed to 12-token guesses; run_rl has the numbers).
- Every model is evaluated on the source's held-out split, seed and max_new_tokens, so that a method which trained
  with a smaller budget (rl) is measured at the same budget as the rest.
"""
import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import distill
import grpo
import harness
import report
import hf
import train
from distill import sample_scored  # n checked samples per problem: DPO's pairs come from them
from sample import Generation, sequences_for_training
from shard import load_model
from tasks import TaskConfig, problems

METHODS = ('merge', 'shortest', 'dpo', 'rl')


@dataclass
class L2SConfig:
    method: str = 'all'                      # merge | shortest | dpo | rl | all (the subcommand)
    source: str = 'out/tiny/grpo/ckpt.pt'    # --from: the long-CoT checkpoint (train.py's grpo stage) or HF folder
    out_dir: str = ''                        # each method writes <out_dir>/<method>/ (default <source run>/long2short)
    device: str = ''                         # cuda | cpu (default: cuda when available)
    threads: int = 0                         # torch CPU threads (0: leave torch's default)
    n_eval: int = 0                          # held-out problems (0: the source's n_eval)
    # merge
    short: str = ''                          # the short-CoT checkpoint or HF folder (default: the source's base)
    alpha: float = 0.5                       # weight of the long model in the saved merge
    alphas: str = ''                         # comma-separated alphas to evaluate and report as well (a sweep)
    # sampling for shortest and dpo
    n_problems: int = 256                    # train problems sampled (the first n of the source's train split)
    n_samples: int = 8                       # samples per problem (Kimi: 8)
    temperature: float = 1.0                 # sampling temperature
    # shortest: SFT on the shortest correct samples
    sft_steps: int = 50                      # optimizer steps
    sft_batch_size: int = 32                 # examples per step
    sft_lr: float = 1e-4                     # AdamW learning rate
    # dpo
    dpo_beta: float = 0.1                    # beta of DPO eq. 7: strength of the implicit KL to the source
    dpo_ratio: float = 1.5                   # a correct sample longer than this x the chosen one is rejected
    dpo_steps: int = 100                     # optimizer steps
    dpo_batch_size: int = 16                 # pairs per step
    dpo_lr: float = 2e-5                     # AdamW learning rate
    # rl: train.py --stage grpo with the length reward
    length_weight: float = 0.2               # weight of Kimi's length reward added to the accuracy reward
    rl_steps: int = 30                       # RL iterations
    rl_max_new_tokens: int = 0               # rollout budget (0: two thirds of the source's max_new_tokens)
    rl_adv_scale: str = 'batch'              # advantage scale (train.py --adv-scale); see run_rl for why not 'group'
    rl_n_eval: int = 100                     # held-out problems for the grpo stage's own evaluations
    preset: str = ''                         # train.py preset for the rl run (default: the source's)
    # torchrun: train.py's sharding flags, for shortest, dpo and rl
    fsdp: bool = False                       # shard the trained models (and dpo's reference) over ranks (FSDP2)
    hsdp: int = 0                            # --fsdp on a 2-D mesh: this many replicas, each sharding over world/hsdp
    activation_checkpointing: bool = False   # with --fsdp: recompute each block's activations in backward


def parse_args(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    harness.add_flags(common, [L2SConfig], skip=('method',), rename={'source': '--from'})
    p = harness.Parser(description="Kimi k1.5 long2short: merge | shortest | dpo | rl | all")
    sub = p.add_subparsers(dest='method', required=True, metavar='{' + ','.join(METHODS + ('all',)) + '}')
    for m in METHODS + ('all',):
        sub.add_parser(m, parents=[common], help=f"run {m}")
    cfg = L2SConfig(**{k: v for k, v in vars(p.parse_args(argv)).items() if v is not None})
    if not (os.path.isfile(cfg.source) or hf.is_hf_folder(cfg.source)):
        sys.exit(f"long2short.py: error: no source checkpoint at {cfg.source} (nor a Hugging Face folder; train "
                 "one: python train.py --preset tiny)")
    if cfg.fsdp and 'RANK' not in os.environ:
        sys.exit("long2short.py: error: --fsdp shards over the ranks of torchrun: torchrun --nproc_per_node=N "
                 "long2short.py ... --fsdp")
    if (cfg.hsdp or cfg.activation_checkpointing) and not cfg.fsdp:
        sys.exit("long2short.py: error: --hsdp and --activation-checkpointing go with --fsdp")
    stage_dir = cfg.source if os.path.isdir(cfg.source) else os.path.dirname(cfg.source)
    run_dir = os.path.dirname(os.path.abspath(stage_dir))
    cfg.out_dir = cfg.out_dir or os.path.join(run_dir, 'long2short')
    return cfg


# -----------------------------------------------------------------------------
# the source: its checkpoint, its world (task config, seed, splits), its held-out score

@dataclass
class Source:
    ck: dict               # the source checkpoint
    tok: object            # its tokenizer
    task_cfg: TaskConfig   # its task config (problems are a pure function of it and the seed)
    seed: int
    max_new_tokens: int    # its rollout budget: every model is evaluated at it
    train: list            # countdown train problems (the first n_problems of its train split)
    test: list             # held-out countdown problems
    eval: tuple = None     # (pass@1, mean tokens) of the source, computed once


def load_source(cfg):
    model, tok, ck = load_model(cfg.source, cfg.device, cfg, frozen=True)   # --fsdp: sharded
    tc = ck.get('train_config', {})
    names = {f.name for f in dataclasses.fields(TaskConfig)}
    task_cfg = TaskConfig(**{k: v for k, v in ck.get('task_config', {}).items() if k in names})
    seed = tc.get('seed', train.TrainConfig.seed)
    n_eval = cfg.n_eval or tc.get('n_eval', train.TrainConfig.n_eval)
    n_train = tc.get('n_train_problems', train.TrainConfig.n_train_problems)
    return Source(ck, tok, task_cfg, seed, tc.get('max_new_tokens', train.TrainConfig.max_new_tokens),
                  problems('countdown', 'train', n_train, seed, task_cfg)[:cfg.n_problems],
                  problems('countdown', 'test', n_eval, seed, task_cfg)), model


def held_out(model, src):
    """Greedy countdown pass@1 and mean response tokens on the source's held-out split, at its budget."""
    return report.evaluate(model, src.tok, src.test, 'countdown', src.task_cfg.template, src.max_new_tokens)


def save(path, model, src, cfg, **extra):
    """The one checkpoint format (harness.checkpoint), so train.py --init-from takes it: rank 0's file, or under
    --fsdp every rank's shards (harness.save_stage); every rank calls it."""
    harness.save_stage(path, model, None, harness.checkpoint(model, src.tok, src.ck.get('train_config', {}),
                                                             src.task_cfg, 0, long2short_config=dataclasses.asdict(cfg),
                                                             **extra))


def finish(method, out, model, src, cfg, t0, extra=None, notes=()):
    """Evaluate, then write <out>/summary.json and <out>/report.md; returns the summary."""
    acc, n_tok = held_out(model, src)
    s_acc, s_tok = src.eval
    summary = {'method': method, 'countdown_pass@1': acc, 'mean_response_tokens': n_tok,
               'source_countdown_pass@1': s_acc, 'source_mean_response_tokens': s_tok,
               'n_eval': len(src.test), 'max_new_tokens': src.max_new_tokens, **(extra or {}),
               'wall_seconds': round(time.time() - t0, 1)}
    if harness.rank_world()[0] != 0:   # one writer
        return summary
    report.write_json(os.path.join(out, 'summary.json'), summary)
    report.write_report(os.path.join(out, 'report.md'), f'long2short: {method}', [
        f"source `{cfg.source}`, {len(src.test)} held-out countdown problems, greedy, max_new_tokens "
        f"{src.max_new_tokens}, wall {summary['wall_seconds']} s", '', '| model | pass@1 | mean tokens |', '|---|---|---|',
        f'| source | {s_acc:.3f} | {s_tok:.1f} |', f'| {method} | {acc:.3f} | {n_tok:.1f} |', '', *notes],
        config=dataclasses.asdict(cfg))
    harness.print0(json.dumps(summary, indent=2))
    return summary


# -----------------------------------------------------------------------------
# 1. model merging

def merge_state_dicts(long_sd, short_sd, alpha):
    """alpha * long + (1 - alpha) * short for every floating tensor; others (integer buffers) must agree."""
    out = {}
    for k, a in long_sd.items():
        b = short_sd[k]
        if a.is_floating_point():
            out[k] = alpha * a + (1 - alpha) * b   # alpha 1 gives a exactly, 0 gives b exactly (x*0 + y == y)
        elif torch.equal(a, b):
            out[k] = a
        else:
            raise ValueError(f"cannot average non-floating tensor {k!r}: the two checkpoints differ there")
    return out


def check_mergeable(path_a, ck_a, path_b, ck_b):
    """Same architecture and tokenizer, or one clear line on what differs."""
    diff = {k: (v, ck_b['model_config'].get(k)) for k, v in ck_a['model_config'].items()
            if ck_b['model_config'].get(k) != v}
    if diff:
        sys.exit(f"long2short.py: error: cannot merge {path_a} and {path_b}: different model configs "
                 f"(field: long vs short): {diff}")
    if ck_a['tokenizer'] != ck_b['tokenizer']:
        sys.exit(f"long2short.py: error: cannot merge {path_a} and {path_b}: different tokenizers")


def default_short(src_path, ck):
    """The checkpoint the source's grpo stage started from: its init_from, else <run>/pretrain/ckpt.pt."""
    tc = ck.get('train_config', {})
    return tc.get('init_from') or os.path.join(tc.get('out_dir', os.path.dirname(os.path.dirname(src_path))),
                                               'pretrain', 'ckpt.pt')


def run_merge(cfg, src, out):
    t0 = time.time()
    short = cfg.short or default_short(cfg.source, src.ck)
    if not (os.path.isfile(short) or hf.is_hf_folder(short)):
        sys.exit(f"long2short.py: error: no short-CoT checkpoint at {short} (pass --short CKPT)")
    if os.path.realpath(short) == os.path.realpath(cfg.source):
        sys.exit(f"long2short.py: error: --from {cfg.source} is its own short model (a base, not an RL checkpoint?): "
                 "merging it with itself changes nothing; pass the long-CoT RL checkpoint or --short CKPT")
    # the configs before the weights (a sharded checkpoint's file is a manifest: configs, no weights); whole weights
    # on every rank, also under --fsdp (nothing here trains): load_policy reads a folder, a file and shards alike
    short_model, ck_short = None, None if hf.is_hf_folder(short) else harness.load_checkpoint(short)
    if ck_short is None:
        short_model, _, ck_short = harness.load_policy(short, 'cpu')
    check_mergeable(cfg.source, src.ck, short, ck_short)
    if short_model is None:
        short_model = harness.load_policy(short, 'cpu')[0]
    if cfg.fsdp:
        harness.print0("merge: averages whole weights on every rank (it trains nothing: --fsdp does not apply)")
    model, _, _ = harness.load_policy(cfg.source, cfg.device)
    long_sd = {k: v.clone() for k, v in model.state_dict().items()}
    short_sd = {k: v.to(cfg.device) for k, v in short_model.state_dict().items()}
    del short_model
    sweep = []
    for a in [float(x) for x in cfg.alphas.split(',') if x.strip()]:
        model.load_state_dict(merge_state_dicts(long_sd, short_sd, a))
        acc, n_tok = held_out(model, src)
        sweep.append({'alpha': a, 'countdown_pass@1': acc, 'mean_response_tokens': n_tok})
        harness.print0(f"merge alpha {a:.2f}: pass@1 {acc:.3f}, mean tokens {n_tok:.1f}")
    model.load_state_dict(merge_state_dicts(long_sd, short_sd, cfg.alpha))
    save(os.path.join(out, 'ckpt.pt'), model, src, cfg, merged_from=[cfg.source, short], alpha=cfg.alpha)
    notes = ['## Sweep (alpha = weight of the long model)', '', '| alpha | pass@1 | mean tokens |', '|---|---|---|',
             *[f"| {r['alpha']:.2f} | {r['countdown_pass@1']:.3f} | {r['mean_response_tokens']:.1f} |" for r in sweep]]
    return finish('merge', out, model, src, cfg, t0, {'alpha': cfg.alpha, 'short': short, 'sweep': sweep,
                                                      'ckpt': os.path.join(out, 'ckpt.pt')}, notes if sweep else ())


# -----------------------------------------------------------------------------
# 2. shortest rejection sampling + SFT

def run_shortest(cfg, src, out):
    t0 = time.time()
    model, tok, _ = load_model(cfg.source, cfg.device, cfg)   # --fsdp: sharded
    examples = distill.rejection_sample(model, tok, src.train, cfg.n_samples, cfg.temperature, src.max_new_tokens,
                                        template=src.task_cfg.template, keep='shortest', seed=src.seed + 21)
    harness.print0(f"shortest: {len(examples)} of {len(src.train)} problems have a correct sample in {cfg.n_samples}")
    rows = []
    if examples:
        log = report.MetricsLog(os.path.join(out, 'metrics.jsonl'), False) if harness.rank_world()[0] == 0 else None
        rows = distill.sft(model, examples, cfg.sft_steps, cfg.sft_batch_size, cfg.sft_lr, cfg.device,
                           desc='shortest', seed=src.seed + 22, log=log)
    save(os.path.join(out, 'ckpt.pt'), model, src, cfg)
    mean_len = sum(e['n_tokens'] for e in examples) / max(1, len(examples))
    return finish('shortest', out, model, src, cfg, t0,
                  {'n_examples': len(examples), 'example_mean_tokens': mean_len, 'sft_steps': cfg.sft_steps if
                   examples else 0, 'ckpt': os.path.join(out, 'ckpt.pt')},
                  [f"SFT on the shortest correct of {cfg.n_samples} samples for {len(examples)} of {len(src.train)} "
                   f"train problems (mean {mean_len:.1f} tokens), {len(rows) and cfg.sft_steps} steps."])


# -----------------------------------------------------------------------------
# 3. DPO on shortest-vs-long pairs

def dpo_pairs(samples, ratio=1.5):
    """
    Kimi k1.5 sec 2.4's pairs for one problem's samples (dicts with 'n_tokens' and 'correct'): chosen = the shortest
    correct sample (the first on ties); rejected = the longer responses: every wrong one longer than the chosen
    and every correct one longer than ratio x the chosen (Kimi: 1.5). A wrong response no longer than the chosen is
    no negative: the pairs teach "shorter", and it is not longer. No correct sample, no pairs.
    """
    correct = [s for s in samples if s['correct']]
    if not correct:
        return []
    chosen = min(correct, key=lambda s: s['n_tokens'])
    n = chosen['n_tokens']
    return [(chosen, s) for s in samples if s['n_tokens'] > (ratio * n if s['correct'] else n)]


def dpo_loss(pol_chosen, pol_rejected, ref_chosen, ref_rejected, beta, n_pairs=None):
    """
    DPO, Rafailov et al. 2023 eq. 7, its sign flipped for minimisation, averaged over pairs. Inputs (B,): summed
    response logprobs of the chosen / rejected answers under the policy and under the frozen reference.
    beta * (log pi/pi_ref) is the implicit reward; the loss pushes the chosen one above the rejected one.
    n_pairs: the whole batch's pairs when these are a slice of it (default B).
    """
    margin = beta * ((pol_chosen - ref_chosen) - (pol_rejected - ref_rejected))   # (B,)
    return -F.logsigmoid(margin).sum() / (n_pairs or margin.numel())


def response_logprobs(model, prompts, responses, pad_id):
    """(B,) sum over the response tokens of log pi(token | prompt, earlier tokens); the prompt is never scored."""
    device = next(model.parameters()).device
    B, L = len(responses), max(len(r) for r in responses)
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros(B, L)
    for b, r in enumerate(responses):
        tokens[b, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, :len(r)] = 1.0
    lengths = mask.sum(1).long()
    gen = Generation(tokens, torch.zeros(B, L), mask, lengths, torch.ones(B, dtype=torch.bool))
    idx, pos, amask, P = sequences_for_training(prompts, gen, pad_id, device)   # (B, P + L)
    logits, _ = model(idx, pos=pos, mask=amask)
    lp = grpo.token_logprobs(logits[:, P - 1:P - 1 + L], tokens.to(device))         # (B, L) fp32
    return (lp * mask.to(device)).sum(1)                                              # (B,)


def run_dpo(cfg, src, out):
    t0 = time.time()
    model, tok, _ = load_model(cfg.source, cfg.device, cfg)                 # --fsdp: both sharded
    ref, _, _ = load_model(cfg.source, cfg.device, cfg, frozen=True)
    groups = sample_scored(ref, tok, src.train, cfg.n_samples, cfg.temperature, src.max_new_tokens,
                           src.task_cfg.template, src.seed + 31)
    pairs = [pr for grp in groups for pr in dpo_pairs(grp, cfg.dpo_ratio)]
    n_solved = sum(any(s['correct'] for s in grp) for grp in groups)
    harness.print0(f"dpo: {len(pairs)} pairs from {n_solved} of {len(groups)} problems with a correct sample")
    rows = []
    if pairs:
        # the reference is frozen: its logprobs of every pair, once
        with torch.no_grad(), harness.autocast(cfg.device):
            ref_lp = torch.cat([_pair_logprobs(ref, pairs[i:i + 64], tok.pad) for i in range(0, len(pairs), 64)])
        # (every rank scores every pair: the same forwards on each, and no gather)
        opt = torch.optim.AdamW(model.optim_groups(0.0), lr=cfg.dpo_lr, betas=(0.9, 0.99),
                                fused=str(cfg.device).startswith('cuda'))
        g = torch.Generator().manual_seed(src.seed + 32)
        order, at = torch.randperm(len(pairs), generator=g), 0
        rank = harness.rank_world()[0]
        log = report.MetricsLog(os.path.join(out, 'metrics.jsonl'), False) if rank == 0 else None
        bar = tqdm(range(cfg.dpo_steps), desc='dpo', mininterval=2, disable=rank != 0)
        for step in bar:
            if at + cfg.dpo_batch_size > len(order):   # a fresh permutation per epoch
                order, at = torch.randperm(len(pairs), generator=g), 0
            ids = order[at:at + cfg.dpo_batch_size]
            at += cfg.dpo_batch_size
            # this rank's slice of the global batch (every rank draws the same order); a rank whose slice is
            # empty runs the first pair at weight 0, so every rank runs the same forward and backward
            mine, w = ids[harness.shard(len(ids))], 1.0
            if len(mine) == 0:
                mine, w = ids[:1], 0.0
            with harness.autocast(cfg.device):
                lp = _pair_logprobs(model, [pairs[i] for i in mine], tok.pad)         # (b, 2): chosen, rejected
            rl = ref_lp[mine].to(lp.device)                                            # (b, 2)
            loss = w * dpo_loss(lp[:, 0], lp[:, 1], rl[:, 0], rl[:, 1], cfg.dpo_beta, len(ids))
            loss.backward()
            harness.sum_gradients(model)   # the global batch's gradient: the sum of the ranks' shares
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            gnorm = gnorm.full_tensor() if isinstance(gnorm, DTensor) else gnorm   # --fsdp: a DTensor
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                margin = cfg.dpo_beta * ((lp[:, 0] - rl[:, 0]) - (lp[:, 1] - rl[:, 1]))
                sums = harness.all_reduce_sum(torch.stack([loss.detach(), w * margin.sum() / len(ids),
                                                           w * (margin > 0).float().sum() / len(ids)]))
            row = {'step': step + 1, 'loss': float(sums[0]), 'reward_margin': float(sums[1]),
                   'reward_acc': float(sums[2]), 'grad_norm': float(gnorm)}
            rows.append(row)
            if log is not None:
                log.log(**row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['reward_acc']:.2f}")
        bar.close()
    save(os.path.join(out, 'ckpt.pt'), model, src, cfg)
    chosen = [c['n_tokens'] for c, _ in pairs]
    rejected = [r['n_tokens'] for _, r in pairs]
    extra = {'n_pairs': len(pairs), 'n_problems_with_correct': n_solved,
             'chosen_mean_tokens': sum(chosen) / max(1, len(chosen)),
             'rejected_mean_tokens': sum(rejected) / max(1, len(rejected)),
             'dpo_steps': len(rows), 'final_loss': rows[-1]['loss'] if rows else None,
             'ckpt': os.path.join(out, 'ckpt.pt')}
    if rows and harness.rank_world()[0] == 0:
        report.plot_curves(os.path.join(out, 'dpo.png'), rows, ['loss', 'reward_margin', 'reward_acc'], 'dpo')
    return finish('dpo', out, model, src, cfg, t0, extra,
                  [f"{len(pairs)} pairs (chosen {extra['chosen_mean_tokens']:.1f} tokens on average, rejected "
                   f"{extra['rejected_mean_tokens']:.1f}), {len(rows)} steps of {cfg.dpo_batch_size} pairs, "
                   f"beta {cfg.dpo_beta}." + (' ![dpo](dpo.png)' if rows else '')])


def _pair_logprobs(model, pairs, pad_id):
    """(b, 2) summed response logprobs of (chosen, rejected) for each pair, in one forward pass (fp32)."""
    rows = [s for pr in pairs for s in pr]                                             # chosen, rejected, ...
    lp = response_logprobs(model, [s['prompt_ids'] for s in rows], [s['response_ids'] for s in rows], pad_id)
    return lp.view(len(pairs), 2)


# -----------------------------------------------------------------------------
# 4. long2short RL: the grpo stage, from the long model, with the length reward and a smaller budget

def run_rl(cfg, src, out):
    t0 = time.time()
    tc = src.ck.get('train_config', {})
    budget = cfg.rl_max_new_tokens or (2 * src.max_new_tokens) // 3
    # Not the per-group std of GRPO: a group whose samples are all wrong then differs by the length reward alone,
    # and dividing by its (small) std turns "be shorter" into a unit-size advantage whatever --length-weight is;
    # in the tiny world that collapsed the model to 12-token guesses within 30 steps at weights 0.5 and 0.1 alike.
    # The batch std (or none, as in Kimi's own loss: r - rbar) keeps the weight meaningful.
    argv = [f'--preset={cfg.preset or tc.get("preset", "tiny")}', '--stage=grpo', f'--init-from={cfg.source}',
            f'--out-dir={out}', f'--length-weight={cfg.length_weight}', f'--max-new-tokens={budget}',
            f'--rl-steps={cfg.rl_steps}', f'--rl-eval-interval={cfg.rl_steps}', f'--n-eval={cfg.rl_n_eval}',
            f'--adv-scale={cfg.rl_adv_scale}',
            f'--seed={src.seed}', f'--n-train-problems={tc.get("n_train_problems", train.TrainConfig.n_train_problems)}',
            f'--threads={cfg.threads}', f'--device={cfg.device}']
    argv += ['--fsdp', f'--hsdp={cfg.hsdp}'] if cfg.fsdp else []
    argv += ['--activation-checkpointing'] if cfg.activation_checkpointing else []
    # the source's task world, so RL draws from the same train split it was trained on
    argv += [f'--{k.replace("_", "-")}={v}' for k, v in dataclasses.asdict(src.task_cfg).items()]
    train.main(argv)
    ckpt = os.path.join(out, 'grpo', 'ckpt.pt')
    model, _, _ = load_model(ckpt, cfg.device, cfg, frozen=True)   # --fsdp: its shards, sharded again
    grpo_summary = json.load(open(os.path.join(out, 'grpo', 'summary.json')))
    return finish('rl', out, model, src, cfg, t0,
                  {'length_weight': cfg.length_weight, 'rl_steps': cfg.rl_steps, 'rl_max_new_tokens': budget,
                   'ckpt': ckpt, 'grpo_summary': grpo_summary},
                  [f"train.py --stage grpo from the source, {cfg.rl_steps} steps, length weight {cfg.length_weight}, "
                   f"rollout budget {budget} tokens; its curves and report are in grpo/."])


RUNNERS = {'merge': run_merge, 'shortest': run_shortest, 'dpo': run_dpo, 'rl': run_rl}


# -----------------------------------------------------------------------------

def write_overview(cfg, src, results):
    """<out_dir>/summary.json and report.md: source and each method, with the change in points and in % tokens."""
    s_acc, s_tok = src.eval
    table = {'source': {'countdown_pass@1': s_acc, 'mean_response_tokens': s_tok}}
    for m, s in results.items():
        table[m] = {'countdown_pass@1': s['countdown_pass@1'], 'mean_response_tokens': s['mean_response_tokens'],
                    'delta_points': round(100 * (s['countdown_pass@1'] - s_acc), 2),
                    'delta_tokens_pct': round(100 * (s['mean_response_tokens'] / s_tok - 1), 2) if s_tok else None,
                    'wall_seconds': s['wall_seconds']}
    summary = {'source': cfg.source, 'n_eval': len(src.test), 'max_new_tokens': src.max_new_tokens,
               'methods': table}
    if harness.rank_world()[0] != 0:   # one writer
        return summary
    with open(os.path.join(cfg.out_dir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    lines = ['# long2short (Kimi k1.5 sec 2.4)', '', f"source `{cfg.source}`; held-out greedy countdown pass@1 on "
             f"{len(src.test)} problems at max_new_tokens {src.max_new_tokens}", '',
             '| model | pass@1 | mean tokens | change (points) | change (% tokens) | wall s |', '|---|---|---|---|---|---|',
             f'| source | {s_acc:.3f} | {s_tok:.1f} | | | |']
    for m, r in table.items():
        if m != 'source':
            lines.append(f"| {m} | {r['countdown_pass@1']:.3f} | {r['mean_response_tokens']:.1f} | "
                         f"{r['delta_points']:+.1f} | {r['delta_tokens_pct']:+.1f}% | {r['wall_seconds']} |")
    lines += ['', 'Each method\'s own report.md, summary.json and checkpoint are in its folder.', '', '## Config', '',
              '```json', json.dumps(dataclasses.asdict(cfg), indent=1), '```', '']
    with open(os.path.join(cfg.out_dir, 'report.md'), 'w') as f:
        f.write('\n'.join(lines))
    harness.print0('\n'.join(lines[4:4 + len(table) + 1]))
    return summary


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    owns_group = not torch.distributed.is_initialized()
    _, _, local = harness.setup_distributed()
    cfg.device = harness.pick_device(cfg.device, local)
    if cfg.device.startswith('cuda'):
        torch.set_float32_matmul_precision('high')   # TF32 for what runs outside bf16 autocast
    harness.print0(json.dumps(dataclasses.asdict(cfg)))
    src, model = load_source(cfg)
    src.eval = held_out(model, src)
    del model
    harness.print0(f"source: held-out pass@1 {src.eval[0]:.3f}, mean tokens {src.eval[1]:.1f}")
    results = {}
    for m in (METHODS if cfg.method == 'all' else (cfg.method,)):
        out = os.path.join(cfg.out_dir, m)
        os.makedirs(out, exist_ok=True)
        results[m] = RUNNERS[m](cfg, src, out)
    out = write_overview(cfg, src, results) if cfg.method == 'all' else results[cfg.method]
    if owns_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return out


if __name__ == '__main__':
    main()
