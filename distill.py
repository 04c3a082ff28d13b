"""
Supervised fine-tuning on sampled reasoning, and distillation: the non-RL steps of the DeepSeek-R1 pipeline.

- Rejection sampling (DeepSeek-R1 sec 2.3.3): n samples per prompt from the RL checkpoint, scored by the rule
  reward (rewards.countdown_reward), only the correct ones kept, identical responses once. keep='shortest' keeps
  one per problem, the shortest correct (Kimi k1.5 sec 2.4, long2short's "shortest rejection sampling").
- SFT (R1 sec 2.3.1 cold start, 2.3.3): next-token cross-entropy on the response tokens only; the prompt is context,
  never a target:
      L_SFT = -(1 / |M|) sum_{(b,t) in M} log p_theta(y_{b,t} | y_{b,<t})         M = the response positions
- Distillation (R1 sec 2.4): R1 distils by SFT alone (the student trains on the teacher's samples, "we do not
  include an RL stage"). We also offer logit distillation (Hinton et al. 2015, "Distilling the Knowledge in a
  Neural Network", sec 2): forward KL from the teacher's to the student's distribution at temperature tau, over
  the same response positions, scaled by tau^2 so its gradients keep their size as tau changes:
      L_KD = tau^2 (1 / |M|) sum_{(b,t) in M} KL( softmax(z_t / tau) || softmax(z_s / tau) )
  It needs one vocabulary for both models.

Where we deviate, and why
- A batch is drawn uniformly from the examples each step (with reshuffled epochs), not sorted by length: the
  tiny world's responses are all of a similar length, and padding costs little there.
- Warmup + cosine to 10% of the peak, as pretraining (model.lr_at); no weight decay, the datasets are small.

Under torchrun every rank holds the same examples and draws the same global batch; it trains its contiguous
slice, each loss normalised by the global batch's response tokens, and the ranks' gradients are summed: the
weights are one process's on the same batch. Sampling (rejection sampling, distillation data) is sharded by
problem, each sample drawn from its own seed, and all-gathered.
"""
import dataclasses
import json
import os
import random
import time

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import sample
from harness import (all_reduce_sum, autocast, checkpoint, die, encode_prompt, gather_list, print0, rank_world,
                     save_stage, shard, sum_gradients)
from report import MetricsLog, evaluate, plot_curves, write_json, write_report
from hf import is_hf_folder
from model import lr_at
from moe import update_moe_biases
from rewards import countdown_reward
from shard import gathered, load_model
from corpus import arithmetic_response, cold_start_trace, has_number_words
from tasks import problems


def sft_loss(logits, targets, loss_mask, n_tokens=None):
    """logits (B, T, V), targets (B, T), loss_mask (B, T) bool -> token-mean cross-entropy over the mask.
    n_tokens: the whole batch's masked tokens when this is a slice of it (default: this batch's own)."""
    if logits.shape[:2] != targets.shape or targets.shape != loss_mask.shape:
        raise ValueError(f"shapes differ: logits {tuple(logits.shape)}, targets {tuple(targets.shape)}, "
                         f"mask {tuple(loss_mask.shape)}")
    m = loss_mask.bool()
    # gather only the masked positions: what the prompt's logits say can never reach the loss
    ce = F.cross_entropy(logits[m].float(), targets[m], reduction='sum')      # (N, V) -> ()
    return ce / (m.sum().clamp(min=1) if n_tokens is None else n_tokens)


def logit_distill_loss(student_logits, teacher_logits, mask, temperature=1.0, n_tokens=None):
    """(B, T, V) student and teacher logits, mask (B, T) -> tau^2 * token-mean KL(teacher || student).
    n_tokens as in sft_loss."""
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"logit distillation needs one vocabulary: student has {student_logits.shape[-1]} "
                         f"logits per token, teacher {teacher_logits.shape[-1]}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}")
    m = mask.bool()
    s = F.log_softmax(student_logits[m].float() / temperature, -1)           # (N, V)
    t = F.log_softmax(teacher_logits[m].float() / temperature, -1)           # (N, V)
    # forward KL: the student covers where the teacher puts mass; the teacher is a fixed target
    kl = (t.exp() * (t - s)).sum(-1)                                          # (N,)
    return kl.sum() / (m.sum().clamp(min=1) if n_tokens is None else n_tokens) * temperature ** 2


# -----------------------------------------------------------------------------
# rejection sampling

def is_correct(text, p):
    """The rule check a kept sample must pass: R1's accuracy reward, the answer tag only."""
    return countdown_reward(text, p.numbers, p.target) > 0


@torch.no_grad()
def sample_scored(model, tok, probs, n, temperature, max_new_tokens, template='short', seed=0, batch_prompts=64):
    """
    n samples per countdown problem, each checked by is_correct: one list per problem of dicts {'problem',
    'prompt_ids', 'response_ids' (as sampled: ending with eos if it stopped), 'text' (decoded), 'n_tokens',
    'correct'}. What rejection sampling filters and long2short's DPO pairs up. Sample j of problem i draws from
    its own seed (seed, i, j); under torchrun each rank samples its shard of the problems and the groups are
    all-gathered, so every rank holds what one process samples.
    """
    if n < 1:
        raise ValueError(f"need n >= 1 samples per problem, got {n}")
    was_training = model.training
    model.eval()
    mine = range(len(probs))[shard(len(probs))]
    groups = []
    with gathered(model):   # --fsdp: the ranks' shards differ in batches and decode steps (shard.gathered)
        for s in tqdm(mine[::batch_prompts], desc=f'sampling x{n}', mininterval=2, disable=rank_world()[0] != 0):
            chunk = probs[s:min(s + batch_prompts, mine.stop)]
            prompts = [encode_prompt(tok, p, template) for p in chunk]
            with autocast(next(model.parameters()).device):
                gen = sample.group_rollouts(model, prompts, n, max_new_tokens, tok.stop_ids, tok.pad,
                                            temperature=temperature, seeds=[sample.row_seed(seed, s + i, j)
                                                                            for i in range(len(chunk))
                                                                            for j in range(n)])
            for i, p in enumerate(chunk):
                group = []
                for r in range(i * n, (i + 1) * n):   # group_rollouts: rows [i*n, (i+1)*n) answer prompt i
                    ids = gen.tokens[r, :int(gen.lengths[r])].tolist()
                    text = tok.decode(ids)
                    group.append({'problem': p, 'prompt_ids': prompts[i], 'response_ids': ids, 'text': text,
                                  'n_tokens': len(ids), 'correct': is_correct(text, p)})
                groups.append(group)
    model.train(was_training)
    return gather_list(groups)   # in problem order: the ranks' shards are contiguous


def rejection_sample(model, tok, probs, n, temperature, max_new_tokens, template='short', keep='correct', seed=0,
                     batch_prompts=64):
    """
    n samples per countdown problem, keep the correct ones. keep='correct': every distinct correct response;
    keep='shortest': only the shortest correct one per problem (the first on ties). Each kept sample is a dict
    {'problem', 'prompt_ids', 'response_ids' (ending with a stop token), 'text' (the decoded response, stop token
    and all),
    'n_tokens' (len of response_ids), 'correct'}.
    """
    if keep not in ('correct', 'shortest'):
        raise ValueError(f"unknown keep {keep!r}; choose 'correct' or 'shortest'")
    out = []
    for group in sample_scored(model, tok, probs, n, temperature, max_new_tokens, template, seed, batch_prompts):
        kept, seen = [], set()
        for e in group:
            ids = e['response_ids']
            if not e['correct'] or tuple(ids) in seen:
                continue
            seen.add(tuple(ids))
            if ids[-1] not in tok.stop_ids:   # ran out of budget right after </answer>: an SFT target still ends
                ids = ids + [tok.eos]
            kept.append({**e, 'response_ids': ids, 'n_tokens': len(ids)})
        if keep == 'shortest' and kept:
            kept = [min(kept, key=lambda e: e['n_tokens'])]
        out.extend(kept)
    return out


# -----------------------------------------------------------------------------
# SFT (and logit distillation)

def sft_batch(examples, pad_id, device):
    """
    Right-padded (B, T) inputs and targets and the (B, T) loss mask: position t predicts token t + 1, and counts
    iff that token belongs to the response. Every row starts at position 0, so plain causal attention applies
    (pads sit after the real tokens, where no counted position can see them).
    """
    seqs = [list(e['prompt_ids']) + list(e['response_ids']) for e in examples]
    T = max(len(q) for q in seqs) - 1
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    tgt = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for b, (e, q) in enumerate(zip(examples, seqs)):
        idx[b, :len(q) - 1] = torch.tensor(q[:-1])
        tgt[b, :len(q) - 1] = torch.tensor(q[1:])
        P = len(e['prompt_ids'])
        mask[b, P - 1:len(q) - 1] = True    # logits at P-1 predict the first response token
    return idx.to(device), tgt.to(device), mask.to(device)


def sft(model, examples, steps, batch_size, lr, device, desc='sft', teacher=None, kd_weight=0.0,
        kd_temperature=1.0, seed=0, log=None):
    """
    Fine-tune `model` in place on examples ({'prompt_ids' starting with bos, 'response_ids' ending with eos}):
    AdamW, linear warmup over the first 10% of steps then cosine to 10% of lr, loss on response tokens only;
    with a teacher, loss = L_SFT + kd_weight * L_KD. Returns one metrics row per step (also written to `log`).
    Under torchrun each rank trains its slice of every batch (module docstring).
    """
    if not examples:
        raise ValueError("sft needs at least one example")
    if teacher is not None and kd_weight <= 0:
        raise ValueError("a teacher without kd_weight > 0 would only cost forward passes")
    longest = max(len(e['prompt_ids']) + len(e['response_ids']) - 1 for e in examples)
    if longest > model.config.block_size:
        raise ValueError(f"an example needs {longest} positions but block_size is {model.config.block_size}")
    if teacher is not None:
        teacher.eval()
    model.train()
    opt = torch.optim.AdamW(model.optim_groups(0.0), lr=lr, betas=(0.9, 0.95), fused=str(device).startswith('cuda'))
    rng = random.Random(seed)
    order, rows = [], []
    warmup = max(1, steps // 10)
    bar = tqdm(range(steps), desc=desc, mininterval=2, disable=rank_world()[0] != 0)
    for step in bar:
        lr_t = lr_at(step, steps, warmup, lr, 0.1)
        for g in opt.param_groups:
            g['lr'] = lr_t
        batch = []
        while len(batch) < min(batch_size, len(examples)):   # epochs of a reshuffled order
            if not order:
                order = rng.sample(range(len(examples)), len(examples))
            batch.append(examples[order.pop()])
        # this rank's slice of the global batch, normalised by the global batch's response tokens; a rank whose
        # slice is empty (batch smaller than the world) runs the first example at weight 0, so every rank runs
        # the same forward and backward
        n_tok = sum(len(e['response_ids']) for e in batch)   # = the loss mask's positions in the whole batch
        part, w = batch[shard(len(batch))], 1.0
        if not part:
            part, w = batch[:1], 0.0
        # pads sit after every real token and are never counted targets, so any id would do; eos is one we know
        idx, tgt, mask = sft_batch(part, part[0]['response_ids'][-1], device)
        with autocast(device):
            logits, _ = model(idx)                                             # (B, T, V)
        loss_sft = w * sft_loss(logits, tgt, mask, n_tok)
        loss, stats = loss_sft, {'sft_loss': loss_sft}
        if teacher is not None:
            with torch.no_grad(), autocast(device):
                t_logits, _ = teacher(idx)                                     # (B, T, V)
            loss_kd = w * logit_distill_loss(logits, t_logits, mask, kd_temperature, n_tok)
            loss = loss + kd_weight * loss_kd
            stats['kd_loss'] = loss_kd
        loss.backward()
        sum_gradients(model)   # the global batch's gradient: the sum of the ranks' shares
        stats['loss'] = loss
        # the ranks' shares summed, in one collective (and one device sync for the step's metrics)
        stats = dict(zip(stats, all_reduce_sum(torch.stack([v.detach().float() for v in stats.values()]))))
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        stats['grad_norm'] = gnorm.full_tensor() if isinstance(gnorm, DTensor) else gnorm   # --fsdp: a DTensor
        opt.step()
        opt.zero_grad(set_to_none=True)
        if model.config.ffn == 'moe':
            update_moe_biases(model)   # DeepSeek-V3's aux-loss-free balancing, as in pretraining
        values = torch.stack(list(stats.values())).tolist()
        row = {'step': step + 1, 'lr': lr_t, **dict(zip(stats, values)), 'response_tokens': n_tok}
        rows.append(row)
        if log is not None:
            log.log(**row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
    bar.close()
    return rows



# -----------------------------------------------------------------------------
# the stages of train.py's pipeline: sft (R1's cold start), rs (rejection sampling + SFT of the base), distill

def sft_stage(tc, task_cfg, device, name='sft', init=''):
    """R1 sec 2.3.1: SFT the base on a few readable long CoTs that stop at their first verified hit."""
    t0 = time.time()
    model, tok, _ = load_model(init or os.path.join(tc.out_dir, 'pretrain', 'ckpt.pt'), device, tc)
    cd_train = problems('countdown', 'train', tc.n_train_problems, tc.seed, task_cfg)
    rng = random.Random(tc.seed + 31)
    picks = rng.sample(cd_train, min(tc.sft_examples, len(cd_train)))
    examples = [{'prompt_ids': encode_prompt(tok, p, task_cfg.template),
                 'response_ids': tok.encode(cold_start_trace(rng, p, task_cfg)) + [tok.eos]} for p in picks]
    # a trace longer than the response budget teaches a length that rollouts and evaluation never reach
    examples = [e for e in examples if len(e['response_ids']) <= tc.max_new_tokens]
    if not examples:
        die(f"{name}: no cold-start trace fits in --max-new-tokens {tc.max_new_tokens}")
    print0(f"{name}: cold start on {len(examples)} readable traces of {len(picks)} within {tc.max_new_tokens} "
           f"tokens, {tc.sft_steps} steps x {tc.sft_batch_size}")
    sft_and_finish(tc, task_cfg, device, name, model, tok, examples, t0,
                   [f"Cold start (R1 sec 2.3.1) from `{init or 'pretrain'}` on {len(examples)} traces of "
                    "corpus.cold_start_trace: digits only, ending at the first attempt checked `yes`."])


def correct_samples(tc, task_cfg, model, tok, seed):
    """rs and distill's data: rs_samples samples of rs_problems train problems, the distinct correct ones, minus
    those whose CoT mixes in number words when rs_filter_mixed (R1 filters mixed languages out of its SFT data).
    Returns (pool, kept samples, correct samples before the filter)."""
    cd_train = problems('countdown', 'train', tc.n_train_problems, tc.seed, task_cfg)
    pool = random.Random(seed).sample(cd_train, min(tc.rs_problems, len(cd_train)))
    samples = rejection_sample(model, tok, pool, tc.rs_samples, tc.rs_temperature, tc.max_new_tokens,
                               task_cfg.template, 'correct', seed=seed + 1)
    n_correct = len(samples)
    if tc.rs_filter_mixed:
        samples = [e for e in samples if not has_number_words(e['text'])]
    return pool, samples, n_correct


def rs_stage(tc, task_cfg, device, name='rs', init=''):
    """R1 sec 2.3.3: the RL model's correct samples + general samples; SFT of the base on them."""
    t0 = time.time()
    policy, ptok, _ = load_model(init or os.path.join(tc.out_dir, 'grpo', 'ckpt.pt'), device, tc, frozen=True)
    pool, samples, n_correct = correct_samples(tc, task_cfg, policy, ptok, tc.seed + 41)
    base = tc.rs_base or os.path.join(tc.out_dir, 'pretrain', 'ckpt.pt')
    model, tok, _ = load_model(base, device, tc)
    if tok.to_dict() != ptok.to_dict():
        die(f"rs: {base} and the sampled model use different tokenizers")
    general = [{'prompt_ids': encode_prompt(tok, p, task_cfg.template),
                'response_ids': tok.encode(arithmetic_response(p)) + [tok.eos]}
               for p in problems('arithmetic', 'train', tc.rs_general, tc.seed, task_cfg)] if tc.rs_general else []
    print0(f"{name}: {n_correct} correct of {len(pool)} x {tc.rs_samples} samples, {len(samples)} kept, "
           f"+ {len(general)} general; SFT of {base}")
    sft_and_finish(tc, task_cfg, device, name, model, tok, samples + general, t0,
                   [f"Rejection sampling (R1 sec 2.3.3) from `{init or 'grpo'}`: {n_correct} distinct correct "
                    f"samples of {len(pool)} train problems x {tc.rs_samples} (temperature {tc.rs_temperature}), "
                    f"{len(samples)} kept after the mixed-language filter, + {len(general)} worked-arithmetic "
                    f"samples; SFT of the base `{base}`."],
                   {'n_correct_samples': n_correct, 'n_reasoning_examples': len(samples),
                    'n_general_examples': len(general)})


def distill_stage(tc, task_cfg, device, name='distill', init=''):
    """R1 sec 2.4: SFT (or SFT + KL) of a student pretrained here on the teacher's correct samples."""
    t0 = time.time()
    if tc.distill_mode not in ('sft', 'logits'):
        die(f"unknown distill_mode {tc.distill_mode!r}; choose 'sft' or 'logits'")
    if not (os.path.isfile(tc.teacher_from) or is_hf_folder(tc.teacher_from)):
        die(f"no teacher checkpoint at {tc.teacher_from!r}: train one first (python train.py --preset tiny) or "
            "pass --teacher-from")
    teacher, ttok, _ = load_model(tc.teacher_from, device, tc, frozen=True)
    model, tok, _ = load_model(init or os.path.join(tc.out_dir, 'pretrain', 'ckpt.pt'), device, tc)
    kd = tc.distill_mode == 'logits'
    if kd and ttok.to_dict() != tok.to_dict():
        die("distill_mode logits needs the teacher's vocabulary: pretrain the student with the teacher's seed, "
            "corpus and task settings (the tokenizer is built from them)")
    cd_test = problems('countdown', 'test', tc.n_eval, tc.seed, task_cfg)
    pool, samples, n_correct = correct_samples(tc, task_cfg, teacher, ttok, tc.seed + 51)
    # text, not ids, crosses over: in sft mode a student with its own tokenizer re-encodes the teacher's samples
    # (decoded without the teacher's stop token, which is the student's eos)
    examples = [{'prompt_ids': encode_prompt(tok, e['problem'], task_cfg.template),
                 'response_ids': tok.encode(ttok.decode(e['response_ids'][:-1])) + [tok.eos]} for e in samples]
    t_acc, t_len = evaluate(teacher, ttok, cd_test, 'countdown', task_cfg.template, tc.max_new_tokens)
    print0(f"{name}: teacher {teacher.num_params():,} params (pass@1 {t_acc:.3f}), student {model.num_params():,}; "
           f"{n_correct} correct samples, {len(examples)} kept; mode {tc.distill_mode}")
    sft_and_finish(tc, task_cfg, device, name, model, tok, examples, t0,
                   [f"Distillation (R1 sec 2.4), mode `{tc.distill_mode}`: teacher `{tc.teacher_from}` "
                    f"({teacher.num_params():,} params), student {model.num_params():,} params; {n_correct} "
                    f"distinct correct samples of {len(pool)} train problems x {tc.rs_samples}, {len(examples)} kept"
                    + (f"; loss = SFT + {tc.kd_weight} x KL(teacher || student) at T={tc.kd_temperature}." if kd
                       else "; plain SFT.")],
                   {'teacher': tc.teacher_from, 'teacher_params': teacher.num_params(),
                    'teacher_countdown_pass@1': t_acc, 'teacher_mean_response_tokens': t_len,
                    'student_params': model.num_params(), 'distill_mode': tc.distill_mode,
                    'n_correct_samples': n_correct},
                   teacher=teacher if kd else None)


def sft_and_finish(tc, task_cfg, device, name, model, tok, examples, t0, notes, extra=None, teacher=None):
    """The SFT stages' shared half: held-out eval before and after, SFT, checkpoint, summary.json, report.md."""
    rank = rank_world()[0]
    stage_dir = os.path.join(tc.out_dir, name)
    cd_test = problems('countdown', 'test', tc.n_eval, tc.seed, task_cfg)
    acc0, len0 = evaluate(model, tok, cd_test, 'countdown', task_cfg.template, tc.max_new_tokens)
    rows = []
    if examples:
        try:
            rows = sft(model, examples, tc.sft_steps, tc.sft_batch_size, tc.sft_lr, device, desc=name,
                       teacher=teacher, kd_weight=tc.kd_weight if teacher is not None else 0.0,
                       kd_temperature=tc.kd_temperature, seed=tc.seed + 61,
                       log=MetricsLog(os.path.join(stage_dir, 'metrics.jsonl')) if rank == 0 else None)
        except ValueError as e:
            die(f"{name}: {e}")
    else:
        print0(f"{name}: no examples, nothing to train on; the checkpoint is the initial model")
    acc, n_tok = evaluate(model, tok, cd_test, 'countdown', task_cfg.template, tc.max_new_tokens)
    # rank 0's file, or under --fsdp every rank's shards; weights only (an SFT stage does not resume: it runs again)
    save_stage(os.path.join(stage_dir, 'ckpt.pt'), model, None, checkpoint(model, tok, tc, task_cfg, len(rows)))
    if rank != 0:   # one writer
        return
    if rows:
        plot_curves(os.path.join(stage_dir, 'loss.png'), rows, ['loss', 'sft_loss', 'kd_loss'], name)
    summary = {'countdown_pass@1': acc, 'mean_response_tokens': n_tok, 'init_countdown_pass@1': acc0,
               'init_mean_response_tokens': len0, 'n_examples': len(examples),
               'example_mean_response_tokens': sum(len(e['response_ids']) for e in examples) / max(1, len(examples)),
               'sft_steps': len(rows), 'final_sft_loss': rows[-1]['sft_loss'] if rows else None,
               **(extra or {}), 'n_eval': len(cd_test), 'wall_seconds': round(time.time() - t0, 1)}
    write_json(os.path.join(stage_dir, 'summary.json'), summary)
    write_report(os.path.join(stage_dir, 'report.md'), f'nanoR1 {name} report',
                 notes + ['', '![loss](loss.png)'] if rows else notes, summary,
                 {**dataclasses.asdict(tc), **dataclasses.asdict(task_cfg), **model.config.to_dict()})
    print0(json.dumps(summary, indent=2))
