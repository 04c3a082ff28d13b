"""
The run harness: what every stage shares and no paper defines. The process group and the device, the one
checkpoint format (atomic, verified, never non-finite), RNG state, the metrics log, plots, the one report
writer, and held-out evaluation (greedy pass@1, sampled pass@k).

A stage (train.py's pretrain and grpo, distill.py's sft / rs / distill, long2short.py's methods) builds on
these; none of them builds on another stage's file.
"""
import argparse
import copy
import dataclasses
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.utils.checkpoint
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from mla import kv_cache_bytes_per_token
from model import GPT, Block, ModelConfig, document_mask
from rewards import arithmetic_reward, countdown_reward
from sample import generate
from tasks import Countdown, format_prompt, problems
from tokenizer import Tokenizer


def die(msg):
    """One clear line on stderr and a non-zero exit: what a user sees instead of a traceback."""
    sys.exit(f"{os.path.basename(sys.argv[0]) or 'nanoR1'}: error: {msg}")


# -----------------------------------------------------------------------------
# flags: every field of a flat config dataclass is a --kebab-case flag whose help is the field's comment

class Parser(argparse.ArgumentParser):
    def error(self, message):
        die(message)   # one clear line instead of argparse's usage dump


def parse_bool(s):
    v = {'1': True, 'true': True, 'yes': True, '0': False, 'false': False, 'no': False}.get(s.lower())
    if v is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return v


def add_flags(parser, classes, skip=(), rename=None):
    """One flag per field (the first class that has it wins), default None so that only what was given
    overrides a preset; --help shows the field's comment and default. rename maps a field to another flag."""
    seen = set(skip)
    for cls in classes:
        helps = dict(re.findall(r'^\s+(\w+): [^#\n]*#\s*(.*)$', inspect.getsource(cls), re.M))
        for f in dataclasses.fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            typ = {'int': int, 'float': float, 'str': str, 'bool': bool}.get(f.type, f.type)
            kw = dict(nargs='?', const=True, type=parse_bool) if typ is bool else dict(type=typ)
            parser.add_argument((rename or {}).get(f.name, '--' + f.name.replace('_', '-')), dest=f.name,
                                default=None, help=f"{helps.get(f.name, '')} (default {f.default!r})".replace('%', '%%'),
                                **kw)


def flags_named(message, fields):
    """A config error with its field names written as the flags a user typed."""
    return re.sub(r'(?<![\w-])(' + '|'.join(fields) + r')\b', lambda m: '--' + m[1].replace('_', '-'), message)


# -----------------------------------------------------------------------------
# processes and devices (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)

def setup_distributed():
    """(rank, world, local_rank); without torchrun's variables a single process (0, 1, 0)."""
    if 'RANK' not in os.environ:
        return 0, 1, 0
    rank, world, local = int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ['LOCAL_RANK'])
    backend = 'nccl' if torch.cuda.is_available() else 'gloo'
    dist.init_process_group(backend)
    if backend == 'nccl':
        torch.cuda.set_device(local)
    return rank, world, local


def print0(*a, **kw):
    """print on rank 0 only: under torchrun every rank runs the same lines."""
    if int(os.environ.get('RANK', 0)) == 0:
        print(*a, **kw, flush=True)


def pick_device(name='', local_rank=0):
    if name:
        if name.startswith('cuda') and not torch.cuda.is_available():
            die("--device cuda but CUDA is not available here")
        return name
    return f'cuda:{local_rank}' if torch.cuda.is_available() else 'cpu'


def encode_prompt(tok, problem, template):
    """A problem's prompt ids, as every stage and the evaluation build them: <|bos|> + the template."""
    return [tok.bos] + tok.encode(format_prompt(problem, template))


# -----------------------------------------------------------------------------
# checkpoints: one format for every stage

def config_dict(c):
    return c.to_dict() if hasattr(c, 'to_dict') else dict(vars(c)) if hasattr(c, '__dataclass_fields__') else dict(c)


def checkpoint(model, tok, train_config, task_config, step, **state):
    """The one checkpoint format: weights, what rebuilds the model and its tokenizer, the configs that defined the
    run, the step it ended, plus stage state (optimizer, rng, sampler, ...) as keyword arguments."""
    return {'model': model.state_dict(), 'model_config': model.config.to_dict(), 'tokenizer': tok.to_dict(),
            'train_config': config_dict(train_config), 'task_config': config_dict(task_config), 'step': step,
            **state}


def _nonfinite(obj, prefix=''):
    """The name of the first non-finite floating tensor in a (nested) state, or None."""
    if torch.is_tensor(obj):
        return prefix if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        bad = _nonfinite(v, f"{prefix}.{k}" if prefix else str(k))
        if bad is not None:
            return bad
    return None


def save_checkpoint(path, obj):
    """
    Write to a temp file, read it back, then rename over the old one: a kill mid-write never leaves a torn
    checkpoint, and a non-finite weight or optimizer moment (a run that diverged) never replaces a good one.
    """
    bad = _nonfinite({'model': obj['model'], 'optimizer': obj.get('optimizer', {})})
    if bad is not None:
        die(f"refusing to save {path}: {bad} is not finite (the run diverged; the previous checkpoint is kept)")
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = path + '.tmp'
    torch.save(obj, tmp)
    back = torch.load(tmp, map_location='cpu', weights_only=True, mmap=True)   # verify before it replaces
    if set(back['model']) != set(obj['model']):
        die(f"checkpoint {tmp} did not read back whole; {path} is kept")
    os.replace(tmp, path)
    if not obj.get('sharded'):   # a single-file checkpoint replaced a sharded one: its shards are no one's now
        shutil.rmtree(path + '.dcp', ignore_errors=True)


REQUIRED_KEYS = ('model', 'model_config', 'tokenizer')


def load_checkpoint(path, mc=None):
    """A checkpoint of ours, or one line naming the file and what is wrong with it."""
    if not os.path.isfile(path):
        die(f"no checkpoint at {path}")
    try:
        ck = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated, not a torch file, or a pickle that needs code to load
        die(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    missing = [k for k in REQUIRED_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        die(f"{path} is not a nanoR1 checkpoint: missing {missing}")
    if mc is not None:
        stored = ck['model_config']
        diff = {k: (stored.get(k), v) for k, v in mc.to_dict().items() if stored.get(k) != v}
        if diff:
            die(f"checkpoint {path} has an incompatible model config (field: stored vs requested): {diff}")
    return ck


def load_policy(path, device):
    """(model, tokenizer, checkpoint dict) from one of our checkpoints."""
    ck = load_checkpoint(path)
    try:
        model = GPT(ModelConfig.from_dict(ck['model_config']))
        if ck.get('sharded'):   # an --fsdp run's checkpoint: DCP gathers its shards into this one process
            load_sharded(path, model)
        else:
            model.load_state_dict(ck['model'])
        tok = Tokenizer.from_dict(ck['tokenizer'])
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        die(f"{path}: cannot rebuild the model ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    return model.to(device), tok, ck


# what --resume may change: where and how fast a run goes, and the RL step budget (its lr is constant after
# warmup); anything else defines the data, the tokenizer or the schedule, and a mismatch is refused
RESUME_MAY_CHANGE = {'resume', 'overwrite', 'exit_after', 'threads', 'device', 'compile', 'log_interval',
                     'ckpt_interval', 'pt_eval_interval', 'rl_eval_interval', 'stage', 'out_dir', 'init_from',
                     'rl_steps', 'pass_k', 'preset', 'fsdp', 'hsdp', 'activation_checkpointing', 'dry_run',
                     'world_size', 'plan_gib', 'pt_grad_accum'}   # pt_grad_accum: pretrain checks the global batch


def open_stage(tc, task_cfg, stage_dir, total_steps, mc=None):
    """
    The checkpoint to continue from (--resume), or None to start afresh. Refuses to replace a checkpoint without
    --resume or --overwrite, and to resume with settings that change the data, tokenizer or schedule (one line
    naming the fields). Returns 'done' when --resume finds the stage finished.
    """
    path = os.path.join(stage_dir, 'ckpt.pt')
    if not os.path.isfile(path):
        return None
    if not tc.resume:
        if not tc.overwrite:
            die(f"{path} exists: pass --resume to continue it or --overwrite to start the stage over")
        return None
    ck = load_checkpoint(path)
    now = {**config_dict(tc), **config_dict(task_cfg)}
    was = {**ck.get('train_config', {}), **ck.get('task_config', {})}
    if mc is not None:   # the model being trained (its vocabulary comes from the tokenizer, checked by the stage)
        now.update({k: v for k, v in mc.to_dict().items() if k != 'vocab_size'})
        was.update(ck['model_config'])
    diff = {k: (was[k], v) for k, v in now.items() if k in was and was[k] != v and k not in RESUME_MAY_CHANGE}
    if diff:
        die(f"--resume {path}: these settings differ from the run that wrote it (field: stored vs now): {diff}")
    if ck.get('step', 0) >= total_steps and os.path.isfile(os.path.join(stage_dir, 'summary.json')):
        return 'done'
    return ck


def check_finite(step, **values):
    """Stop with one line at the first non-finite loss or grad norm: training on would only write NaN."""
    for k, v in values.items():
        if not math.isfinite(float(v)):
            die(f"step {step}: {k} is {float(v)}; stopping (the last good checkpoint is kept)")


def rng_state():
    return {'python': list(random.getstate()[1]), 'python_pos': random.getstate()[2],
            'numpy': np.random.get_state()[1].tolist(), 'torch': torch.get_rng_state()}


def set_rng_state(s):
    random.setstate((3, tuple(s['python']), s['python_pos']))
    st = np.random.get_state()
    np.random.set_state((st[0], np.array(s['numpy'], dtype=np.uint32), *st[2:]))
    torch.set_rng_state(s['torch'])


# -----------------------------------------------------------------------------
# what a run writes: metrics.jsonl, plots, report.md

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
    detail=True returns a dict that adds the sampled pass@1 of the same samples (their mean accuracy).
    """
    was_training = model.training
    model.eval()
    prompts = [encode_prompt(tok, p, template) for p in probs]
    correct, lengths = [], []
    g = torch.Generator(device=next(model.parameters()).device)
    g.manual_seed(seed)
    rows = [(i, pr) for i, pr in enumerate(prompts) for _ in range(k)]
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        gen = generate(model, [pr for _, pr in chunk], max_new_tokens, {tok.eos}, tok.pad,
                       temperature=temperature, generator=g)
        for r, (i, _) in enumerate(chunk):
            n = int(gen.lengths[r])
            correct.append(score(kind, tok.decode(gen.tokens[r, :n].tolist()), probs[i]))
            lengths.append(n)
    model.train(was_training)
    c = np.array(correct).reshape(len(probs), k)
    out = {'pass@k': float((c.max(1) > 0).mean()), 'pass@1': float((c > 0).mean()),
           'mean_tokens': float(np.mean(lengths)) if lengths else math.nan}
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


# -----------------------------------------------------------------------------
# sharding: FSDP2, distributed checkpoints, the memory plan
#
# Under --fsdp each rank keeps 1/S of every weight, gradient and AdamW moment (S = the shard group: all ranks,
# or one node's under HSDP) and all-gathers a block's weights just before the block runs (ZeRO-3, Rajbhandari
# et al. 2020, as torch's FSDP2 `fully_shard` over DTensors). A model it shards is built on the meta device,
# sharded, then filled shard by shard (init_sharded or load_sharded): no rank holds the whole model. How a stage
# uses it (pretrain does; the GRPO loop and the SFT stages call the same lines):
#
#     mesh = fsdp_mesh(device_type, tc.hsdp)
#     with torch.device('meta'):
#         model = GPT(config)
#     shard_model(model, mesh, mixed_precision(device_type), activation_checkpointing=tc.activation_checkpointing)
#     materialize(model, device)
#     init_sharded(model, seed)     # a fresh init, equal to GPT(config) after torch.manual_seed(seed)
#     ck = load_sharded(path, model, opt)   # or: resume (after building the optimizer on the sharded model)
#     ... forward / backward / clip_grad_norm_ / opt.step() on every rank, as without sharding ...
#     save_sharded(path, model, opt, checkpoint(model, tok, tc, task_cfg, step, rng=...))   # every rank
#
# and a frozen reference model: meta, shard_frozen(ref, mesh, mp), materialize, load_sharded(path, ref).

def fsdp_mesh(device_type, hsdp=0):
    """
    The DeviceMesh --fsdp shards over: 1-D ('shard',) over all ranks, or, with hsdp = R > 1, the 2-D HSDP mesh
    ('replicate', 'shard') of R replicas (e.g. nodes), each sharding over world / R ranks (e.g. one node's GPUs):
    the all-gathers stay inside a replica and only the gradient all-reduce crosses between them.
    """
    world = dist.get_world_size()
    if hsdp > 1:
        if world % hsdp:
            die(f"--hsdp {hsdp} does not divide the {world} ranks")
        return init_device_mesh(device_type, (hsdp, world // hsdp), mesh_dim_names=('replicate', 'shard'))
    return init_device_mesh(device_type, (world,), mesh_dim_names=('shard',))


def shard_group_size(world, fsdp, hsdp):
    """Ranks one copy of the weights is spread over: 1 without --fsdp (DDP replicates), world / hsdp with HSDP."""
    return (world // hsdp if hsdp > 1 else world) if fsdp else 1


def mixed_precision(device_type):
    """bf16 weights in forward and backward, gradients reduced in fp32 (CUDA); fp32 throughout on the CPU."""
    if device_type == 'cuda':
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def fsdp_units(model):
    """The modules fully_shard wraps one by one: each block and each MTP module. The root takes the rest (the
    embedding, the tied head, the final norm), all-gathered for the whole forward."""
    return list(model.layers) + list(model.mtp or [])


def checkpoint_blocks(model):
    """
    Activation checkpointing: each block keeps only its input and recomputes its activations in backward
    (torch.utils.checkpoint, non-reentrant). Cached generation and no-grad forwards run as before. The module
    tree and the state-dict names do not change. A recomputed MoE block counts its routed tokens twice into
    load_since_update; the bias step uses sign(mean - load), which doubling every count leaves unchanged.
    """
    for block in [m for m in model.modules() if isinstance(m, Block)]:   # the main blocks and the MTP modules'
        fwd = block.forward

        def forward(x, cos, sin, mask=None, cache=None, start=0, fwd=fwd):
            if cache is not None or not torch.is_grad_enabled():
                return fwd(x, cos, sin, mask, cache, start)
            return torch.utils.checkpoint.checkpoint(fwd, x, cos, sin, mask, None, start, use_reentrant=False)
        block.forward = forward
    return model


def shard_model(model, mesh, mp=None, reshard=True, activation_checkpointing=False):
    """
    fully_shard each block and MTP module, then the root, in place; returns the model, now an FSDPModule that
    is called as before. Its parameters are DTensors holding this rank's shard: build the optimizer after this
    call (AdamW over model.parameters() then keeps sharded moments). Call it on a model built on the meta device,
    then materialize + init_sharded / load_sharded; on a real model it shards what is there.
    reshard=False keeps every unit's gathered weights from forward to backward (one all-gather fewer per unit,
    more memory), but only a backward frees them: a no-grad forward between backward and opt.step() leaves them
    in place, and the next forward then runs on the weights from before the step (seen on 2 CPU ranks). With
    reshard=False, evaluate and roll out only after opt.step().
    """
    if activation_checkpointing:
        checkpoint_blocks(model)
    mp = mp or MixedPrecisionPolicy()
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    return model


def shard_frozen(ref, mesh, mp=None):
    """The frozen reference model of the KL term, sharded like the policy: no gradients, no optimizer state, and
    every unit (the root too) resharded after each forward, so it holds only its shards between calls."""
    ref.requires_grad_(False).eval()
    return shard_model(ref, mesh, mp, reshard=True)


@torch.no_grad()
def materialize(model, device):
    """
    Storage for a model built on the meta device (sharded or not): to_empty, then the buffers GPT.__init__ gives
    (the RoPE tables from the config; every other buffer of ours, MoE's balancing state, starts at zero). The
    parameters stay uninitialised until init_sharded or load_sharded fills them.
    """
    model.to_empty(device=device)
    for b in model.buffers():
        b.zero_()
    cos, sin = model.rope_tables()
    model.rope_cos.copy_(cos)
    model.rope_sin.copy_(sin)
    return model


@torch.no_grad()
def put_full(p, full):
    """Write a full-size tensor into parameter p: this rank's shard of it when p is sharded (a DTensor)."""
    if isinstance(p, DTensor):
        full = distribute_tensor(full.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None).to_local()
        p = p.to_local()
    p.copy_(full)


@torch.no_grad()
def edit_full(p, fn):
    """Gather one (sharded) parameter, let fn edit the full tensor in place, write back the shards: for small edits
    after an init, such as fourier_number_init on the embedding."""
    full = p.full_tensor() if isinstance(p, DTensor) else p.detach().clone()
    fn(full)
    put_full(p, full)


@torch.no_grad()
def init_sharded(model, seed):
    """
    Shard-wise loading of a fresh init: fill a materialised (sharded) GPT with exactly the weights GPT(config) has
    in one process after torch.manual_seed(seed), holding one full-size module's parameters at a time.
    GPT.__init__ draws from the global CPU generator in three passes, replayed here in order into full-size CPU
    scratch copies whose shards are kept: (1) each module's construction, i.e. its reset_parameters (nn.Linear's
    kaiming draws, nn.Embedding's normal, RMSNorm's ones), in construction (pre-)order;
    (2) GPT._init_weights over the modules in apply's (post-)order; (3) GPT._init_residual over named_parameters.
    The generator is sequential, so every rank draws every number (one process's CPU init time on each rank) and
    leaves the generator where GPT(config) leaves it. tests/test_fsdp.py checks the result equals one process.
    """
    torch.manual_seed(seed)
    with torch.device('meta'):
        shape = GPT(model.config)   # the full shapes, and the module order GPT.__init__ walks; allocates nothing

    def scratch(m):   # m's own parameters, full size, on the CPU
        s = copy.deepcopy(m)
        s.to_empty(device='cpu', recurse=False)
        return s
    names = {id(m): n for n, m in shape.named_modules()}

    def put(m, s):   # the scratch copy's parameters into the model's (sharded) parameters of the same name
        for n, t in s.named_parameters(recurse=False):
            put_full(model.get_parameter(f"{names[id(m)]}.{n}".lstrip('.')), t)
    for m in shape.modules():                                             # (1)
        if next(m.parameters(recurse=False), None) is not None:
            if not hasattr(m, 'reset_parameters'):
                raise TypeError(f"{type(m).__name__} holds parameters but has no reset_parameters to replay")
            s = scratch(m)
            s.reset_parameters()
            put(m, s)

    def init(m):                                                          # (2)
        if isinstance(m, (nn.Linear, nn.Embedding)):
            s = scratch(m)
            model._init_weights(s)
            put(m, s)
    shape.apply(init)
    for name, p in shape.named_parameters():                              # (3)
        t = torch.empty(p.shape)
        if model._init_residual(name, t):
            put_full(model.get_parameter(name), t)
    return model


def _state(model, opt=None):
    """{'model': ..., 'optimizer': ...} keyed by parameter names (DTensor shards under FSDP): a layout DCP can
    reshard onto any world size, and load into a model that is not sharded at all."""
    if opt is None:
        return {'model': get_model_state_dict(model)}
    m, o = get_state_dict(model, opt)
    return {'model': m, 'optimizer': o}


def save_sharded(path, model, opt, manifest):
    """
    The --fsdp checkpoint; every rank calls it. Weights and AdamW state go to a torch.distributed.checkpoint
    directory beside `path` (<path>.dcp/step<N>-<tag>/: a file per rank plus .metadata, keyed by parameter name,
    so DCP reshards them onto another world size at load). `path` itself, written by rank 0 with save_checkpoint
    (atomic, verified), is then a small manifest in the one checkpoint format: `manifest` (checkpoint(...)'s dict:
    configs, tokenizer, step, rng, ...) with 'model' emptied and 'sharded' naming the directory. The manifest is
    replaced only once the directory is whole and read back, so a kill at any moment leaves the last pair
    intact; the older directories are removed after. Non-finite weights or moments on any rank refuse the save.
    Across nodes, `path` must be on a filesystem every rank sees.
    """
    state = _state(model, opt)
    local = {k: {n: t.to_local() if isinstance(t, DTensor) else t for n, t in _flat(v)} for k, v in state.items()}
    bad = _nonfinite(local)
    flag = torch.tensor([bad is not None], dtype=torch.int32)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        die(f"refusing to save {path}: {bad or 'a shard on another rank'} is not finite (the run diverged; "
            "the previous checkpoint is kept)")
    root = path + '.dcp'
    name = [f"step{manifest['step']}-{time.time_ns():x}"]   # fresh: never a directory an older manifest names
    if dist.is_initialized():
        dist.broadcast_object_list(name, src=0)
    where = os.path.join(root, name[0])
    dcp.save(state, checkpoint_id=where, no_dist=not dist.is_initialized())
    if int(os.environ.get('RANK', 0)) == 0:
        stored = dcp.FileSystemReader(where).read_metadata().state_dict_metadata
        missing = [k for k in state['model'] if f"model.{k}" not in stored]
        if missing:
            die(f"sharded checkpoint {where} did not read back whole (missing {missing[:3]}); {path} is kept")
        small = {k: v for k, v in manifest.items() if k not in ('model', 'optimizer')}
        save_checkpoint(path, {**small, 'model': {}, 'sharded': os.path.relpath(where, os.path.dirname(path) or '.')})
        for old in os.listdir(root):
            if old != name[0]:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def _flat(d, prefix=''):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        elif torch.is_tensor(v):
            yield f"{prefix}{k}", v


def load_sharded(path, model, opt=None):
    """
    Load a checkpoint written by save_sharded into `model` (and `opt`): sharded at any world size, or a plain
    model in one process (DCP reads the shards it needs). Returns the manifest (configs, step, rng, ...). Every
    rank calls it; the model must be materialised (and the optimizer built on it) first.
    """
    ck = load_checkpoint(path)
    if not ck.get('sharded'):
        die(f"{path} is a single-file checkpoint, not a sharded one (--fsdp resumes only its own format for now)")
    where = os.path.join(os.path.dirname(path) or '.', ck['sharded'])
    if not os.path.isfile(os.path.join(where, '.metadata')):
        die(f"{path} names the sharded checkpoint {where}, which is missing or incomplete")
    state = _state(model, opt)
    dcp.load(state, checkpoint_id=where, no_dist=not dist.is_initialized())
    if opt is None:
        set_model_state_dict(model, state['model'])
    else:
        set_state_dict(model, opt, model_state_dict=state['model'], optim_state_dict=state['optimizer'])
    return ck


# the memory plan (--dry-run): what each rank holds during a GRPO step, counted from the model's shapes

def prompt_bound(task_cfg):
    """Most tokens a countdown prompt can take: its UTF-8 bytes with the widest numbers and target, plus <|bos|>
    (a byte-level BPE never makes more tokens than bytes)."""
    widest = Countdown([task_cfg.hi] * task_cfg.n_numbers, task_cfg.max_target, '', 0.0)
    return len(format_prompt(widest, task_cfg.template).encode()) + 1


def activation_elems(config, layer_id):
    """
    Rough count of the values autograd keeps per token in one block (Korthikanti et al. 2022 count the same way,
    with flash attention: no (T, T) scores): the block input and the residual after attention, each norm's input,
    attention's projections, rotated copies and output, and the SwiGLU's gate, up, silu(gate) and product per
    expert a token visits. RMSNorm's fp32 temporaries and MoE's dispatch copies are left out: +-50%.
    """
    C, H = config.n_embd, config.n_head
    if config.attn == 'mla':
        qk = config.qk_nope_head_dim + config.qk_rope_head_dim
        attn = C + 2 * H * qk + 2 * (config.kv_lora_rank + config.qk_rope_head_dim) + H * (qk + 3 * config.v_head_dim)
    else:
        q, kv = H * config.head_dim, config.n_kv_head * config.head_dim
        attn = C + 3 * q + 4 * kv
    if config.ffn == 'moe' and layer_id >= config.first_k_dense_replace:
        ffn = C + 4 * config.moe_intermediate_size * (config.num_experts_per_tok + config.n_shared_experts) \
            + config.n_routed_experts
    else:
        ffn = C + 4 * config.intermediate_size
    return 2 * C + attn + ffn


def memory_plan(model, tc, world, device_type, prompt_len):
    """
    Bytes each rank holds during a GRPO step of `model` (built on the meta device: only shapes are read) under tc's
    batch, sharding and checkpointing settings: {row: (bytes, how it is counted)}. Weights, gradients and AdamW
    state are fp32 and exact: under --fsdp each parameter is split on dim 0 into S chunks padded to equal size, as
    FSDP2 stores them (tests/test_fsdp.py compares the rows with real tensors). Compute is bf16 on CUDA and fp32
    on the CPU. Rollouts are split over ranks: each rolls out ceil(rl_prompts / world) groups of rl_group.
    """
    cfg, S = model.config, shard_group_size(world, tc.fsdp, tc.hsdp)
    act = 2 if device_type == 'cuda' else 4
    params = list(model.parameters())   # a tied weight once
    n = sum(p.numel() for p in params)
    held = 4 * sum(math.ceil(p.shape[0] / S) * (p.numel() // p.shape[0]) for p in params)
    per = f", 1/{S} per rank" if S > 1 else ''
    rows = {'weights': (held, f"{n:,} fp32 parameters{per}")}
    if tc.fsdp:
        units = [sum(p.numel() for p in u.parameters()) for u in fsdp_units(model)]
        root = n - sum(units)
        rows['gathered weights'] = ((root + 2 * max(units, default=0)) * act,
                                    "all-gathered for compute: the root (embedding, head, norm) and two blocks")
    elif device_type == 'cuda':
        rows['bf16 weight copies'] = (n * act, "autocast's casts, kept from forward to backward")
    rows['gradients'] = (held, 'fp32, like the weights')
    rows['AdamW state'] = (2 * held + 4 * len(params), 'exp_avg + exp_avg_sq fp32, a step scalar per tensor')
    if tc.beta > 0:
        rows['reference model'] = (held, 'frozen fp32 copy for the KL term: no gradients, no AdamW state')
    B, T, V = math.ceil(tc.rl_prompts / world) * tc.rl_group, prompt_len + tc.max_new_tokens, cfg.vocab_size
    if cfg.attn == 'mla':
        kv, what = kv_cache_bytes_per_token(cfg, act)['mla_naive' if cfg.mla_impl == 'naive' else 'mla'], 'MLA latent'
    else:
        kv, what = 2 * cfg.n_kv_head * cfg.head_dim * act, 'GQA K, V'
    rows['KV cache'] = (B * T * cfg.n_layer * kv, f"{B} rollout rows x {T} positions x {cfg.n_layer} layers x "
                                                   f"{kv} B ({what})")
    rows['prefill logits'] = (B * prompt_len * V * act, f"{B} rows x {prompt_len} prompt positions x {V} vocab")
    rows['logits'] = (tc.rl_micro * tc.max_new_tokens * V * 4, f"{tc.rl_micro} (--rl-micro) x {tc.max_new_tokens}"
                                                              f" response positions x {V} vocab, fp32")
    tokens = tc.rl_micro * T
    per_layer = [activation_elems(cfg, i) for i in range(cfg.n_layer)]
    if tc.activation_checkpointing:   # each block's input, and one block's activations while it is recomputed
        rows['activations'] = (tokens * (cfg.n_layer * cfg.n_embd + max(per_layer)) * act,
                               f"rough: {tokens} tokens x (a block input per layer + one block's activations)")
    else:
        rows['activations'] = (tokens * sum(per_layer) * act, f"rough: {tokens} tokens x {cfg.n_layer} blocks")
    return rows


def plan_fixes(model, tc, world, device_type, prompt_len, capacity):
    """[(flags, total bytes)] for single changes that bring the plan under `capacity`; if none does, the combination
    of all of them with the ranks it needs."""
    def total(t, w=world):
        return sum(b for b, _ in memory_plan(model, t, w, device_type, prompt_len).values())
    tries = []
    if not tc.fsdp and world > 1:
        tries.append(('--fsdp', dataclasses.replace(tc, fsdp=True)))
    if not tc.activation_checkpointing:
        tries.append(('--activation-checkpointing', dataclasses.replace(tc, activation_checkpointing=True)))
    tries += [(f"--rl-micro {m}", dataclasses.replace(tc, rl_micro=m))
              for m in (2 ** k for k in range(int(math.log2(tc.rl_micro)) + 1)) if m < tc.rl_micro][::-1]
    tries += [(f"--rl-prompts {p}", dataclasses.replace(tc, rl_prompts=p))
              for p in (2 ** k for k in range(int(math.log2(tc.rl_prompts)) + 1)) if p < tc.rl_prompts][::-1]
    fits = []
    for flags, t in tries:   # the largest --rl-micro / --rl-prompts that fits, not every smaller one too
        if all(f.split()[0] != flags.split()[0] for f, _ in fits) and total(t) <= capacity:
            fits.append((flags, total(t)))
    if fits:
        return fits
    best = dataclasses.replace(tc, fsdp=True, activation_checkpointing=True, rl_micro=1)
    for w in (2 ** k for k in range(13)):
        if w >= world and total(best, w) <= capacity:
            return [(f"--fsdp --activation-checkpointing --rl-micro 1 on {w} ranks", total(best, w))]
    return [('nothing up to 4096 ranks', total(best, 4096))]


def dry_run(tc, task_cfg, mc):
    """--dry-run: print the per-rank memory plan of this config, name what does not fit in the device's memory and
    the flags that would fix it, allocating nothing (the model is built on the meta device)."""
    world = tc.world_size or int(os.environ.get('WORLD_SIZE', 1))
    device_type = (tc.device or ('cuda' if torch.cuda.is_available() else 'cpu')).split(':')[0]
    with torch.device('meta'):
        model = GPT(mc)
    prompt_len = prompt_bound(task_cfg)
    rows = memory_plan(model, tc, world, device_type, prompt_len)
    total = sum(b for b, _ in rows.values())
    gib = lambda b: f"{b / 2 ** 30:8.2f}"  # noqa: E731
    sharding = (f"--fsdp, shard group {shard_group_size(world, tc.fsdp, tc.hsdp)}" + (f" x {tc.hsdp} replicas"
                if tc.hsdp > 1 else '')) if tc.fsdp else 'weights replicated (DDP)'
    print0(f"memory plan per rank: preset {tc.preset}, {model.num_params():,} parameters, world {world}, {sharding}, "
           f"{'bf16' if device_type == 'cuda' else 'fp32'} compute on {device_type}, prompts <= {prompt_len} tokens")
    print0(f"| {'what':<20} | {'GiB':>8} | how |\n|{'-' * 22}|{'-' * 10}|-----|")
    for k, (b, how) in rows.items():
        print0(f"| {k:<20} | {gib(b)} | {how} |")
    print0(f"| {'total':<20} | {gib(total)} | |")
    if tc.plan_gib:
        capacity, where = tc.plan_gib * 2 ** 30, f"--plan-gib {tc.plan_gib:g}"
    elif device_type == 'cuda' and torch.cuda.is_available():
        free, capacity = torch.cuda.mem_get_info()
        where = f"{torch.cuda.get_device_name()}: {gib(capacity).strip()} GiB ({gib(free).strip()} free)"
    else:
        return print0("no GPU: plan only (--plan-gib N plans against N GiB per rank)")
    if total <= capacity:
        return print0(f"fits: {gib(total).strip()} GiB of {where}")
    big = sorted(rows, key=lambda k: -rows[k][0])[:3]
    print0(f"does not fit: {gib(total).strip()} GiB > {where}; largest: " +
           ', '.join(f"{k} {gib(rows[k][0]).strip()} GiB" for k in big))
    for flags, t in plan_fixes(model, tc, world, device_type, prompt_len, capacity):
        print0(f"  fix: {flags} -> {gib(t).strip()} GiB")
