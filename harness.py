"""
The run harness: what every stage shares and no paper defines. The process group and the device, the one
checkpoint format (atomic, verified, never non-finite), RNG state, the metrics log, plots, the one report
writer, held-out evaluation (greedy pass@1, sampled pass@k), and models from Hugging Face folders (a policy from
config.json + safetensors + tokenizer.json; any of our checkpoints back out as such a folder).

A stage (train.py's pretrain and grpo, distill.py's sft / rs / distill, long2short.py's methods) builds on
these; none of them builds on another stage's file.
"""
import argparse
import contextlib
import dataclasses
import inspect
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
import torch.utils.checkpoint
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from hf import is_hf_folder, load_hf
from model import GPT, ModelConfig
from tasks import format_prompt
from tokenizer_hf import from_dict as tokenizer_from_dict


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


def check_fields(cfg, positive=(), fractions=(), choices=None):
    """A config's ranges, one ValueError naming the flag: the listed fields > 0, fractions in [0, 1], choices
    among theirs, every other number >= 0 and finite."""
    for f in dataclasses.fields(cfg):
        v, flag = getattr(cfg, f.name), '--' + f.name.replace('_', '-')
        if f.name in (choices or {}) and v not in choices[f.name]:
            raise ValueError(f"{flag} must be one of {choices[f.name]}, got {v!r}")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if f.name in positive and not v > 0:
            raise ValueError(f"{flag} must be > 0, got {v}")
        if f.name in fractions and not 0 <= v <= 1:
            raise ValueError(f"{flag} must be in [0, 1], got {v}")
        if not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"{flag} must be >= 0 and finite, got {v}")


def flags_named(message, fields):
    """A config error with its field names written as the flags a user typed."""
    return re.sub(r'(?<![\w-])(' + '|'.join(fields) + r')\b', lambda m: '--' + m[1].replace('_', '-'), message)


# -----------------------------------------------------------------------------
# processes and devices (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)

def setup_distributed():
    """(rank, world, local_rank); without torchrun's variables a single process (0, 1, 0). A second call (a stage
    that calls train.main again, as long2short rl does) finds the process group up and leaves it."""
    if 'RANK' not in os.environ:
        return 0, 1, 0
    rank, world, local = int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ['LOCAL_RANK'])
    if dist.is_initialized():
        return rank, world, local
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
    """A problem's prompt ids, as every stage and the evaluation build them: bos + the template, or the template
    alone for a tokenizer without bos (Qwen: HF prepends nothing, and neither do we)."""
    return ([] if tok.bos is None else [tok.bos]) + tok.encode(format_prompt(problem, template))


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
    if os.path.isdir(path):
        die(f"{path} is a folder, not a checkpoint file; a Hugging Face model folder needs config.json")
    if not os.path.isfile(path):
        die(f"no checkpoint at {path}")
    if path.endswith('.safetensors') or os.path.basename(path) in ('config.json', 'model.safetensors.index.json'):
        die(f"{path} is part of a Hugging Face model, not a nanoR1 checkpoint: pass the folder that holds it "
            f"(config.json, *.safetensors, tokenizer.json): {os.path.dirname(os.path.abspath(path))}")
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
    """(model, tokenizer, checkpoint dict) from one of our checkpoints or a Hugging Face folder (load_hf)."""
    if is_hf_folder(path):
        try:
            model, tok, ck = load_hf(path)
        except ValueError as e:
            die(str(e))
        return model.to(device), tok, ck
    ck = load_checkpoint(path)
    try:
        model = GPT(ModelConfig.from_dict(ck['model_config']))
        if ck.get('sharded'):   # an --fsdp run's checkpoint: DCP gathers its shards into this one process
            load_sharded(path, model)
        else:
            model.load_state_dict(ck['model'])
        tok = tokenizer_from_dict(ck['tokenizer'])
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        die(f"{path}: cannot rebuild the model ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    return model.to(device), tok, ck


# what --resume may change: where and how fast a run goes, and the RL step budget (its lr is constant after
# warmup); anything else defines the data, the tokenizer or the schedule, and a mismatch is refused
RESUME_MAY_CHANGE = {'resume', 'overwrite', 'exit_after', 'threads', 'device', 'compile', 'log_interval',
                     'ckpt_interval', 'pt_eval_interval', 'rl_eval_interval', 'stage', 'out_dir', 'init_from',
                     'rl_steps', 'pass_k', 'preset', 'fsdp', 'hsdp', 'activation_checkpointing', 'dry_run',
                     'world_size', 'plan_gib', 'pt_grad_accum', 'save_hf'}   # pretrain checks the global batch


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
# sharded checkpoints (--fsdp): torch.distributed.checkpoint beside the one-file manifest

def is_sharded(model):
    """Whether FSDP shards the model (fully_shard made it an FSDPModule): its checkpoints are then save_sharded's."""
    return isinstance(model, FSDPModule)


def save_stage(path, model, opt, manifest):
    """A stage's checkpoint, every rank calling: a sharded model's shards by every rank (save_sharded), else rank
    0's one file with `opt`'s state (None: weights only). manifest: checkpoint(...)'s dict."""
    if is_sharded(model):
        save_sharded(path, model, opt, manifest)
    elif rank_world()[0] == 0:
        save_checkpoint(path, {**manifest, **({} if opt is None else {'optimizer': opt.state_dict()})})


def load_stage(path, ck, model, opt):
    """Resume `model` and `opt` from the checkpoint `ck` read from `path`: DCP reshards a sharded checkpoint from
    any world size onto this one, sharded or not; a one-file checkpoint loads into a model that is not sharded."""
    if is_sharded(model) or ck.get('sharded'):
        load_sharded(path, model, opt)
    else:
        model.load_state_dict(ck['model'])
        opt.load_state_dict(ck['optimizer'])


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
    # a model that is not sharded reads every tensor itself, with no collective: rank 0 alone may load one
    dcp.load(state, checkpoint_id=where, no_dist=not (dist.is_initialized() and is_sharded(model)))
    if opt is None:
        set_model_state_dict(model, state['model'])
    else:
        set_state_dict(model, opt, model_state_dict=state['model'], optim_state_dict=state['optimizer'])
    return ck


# -----------------------------------------------------------------------------
# the model of a config, for sizes and plans

def meta_model(mc):
    """The model of a config on the meta device: shapes and parameter counts, no memory, no weights read."""
    with torch.device('meta'):
        return GPT(mc)


# -----------------------------------------------------------------------------
# collectives: what N ranks exchange so that together they compute what one process computes on the same global
# batch. Each is the identity without a process group, so a stage runs the same lines with and without torchrun.

def rank_world():
    """(rank, world size): (0, 1) in a plain process."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def shard(n):
    """This rank's contiguous share of n items (problems, groups, examples): the ranks in order cover range(n) once,
    their shares differ by at most one item."""
    rank, world = rank_world()
    return slice(n * rank // world, n * (rank + 1) // world)


def gather_list(items):
    """Every rank's list, concatenated in rank order, on every rank (pickled: for small Python data and CPU
    tensors; a CUDA tensor would unpickle onto the sender's device)."""
    if not dist.is_initialized():
        return list(items)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def all_reduce_sum(t):
    """t summed over ranks, in place (the ranks' shares of a global sum or mean)."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def sum_gradients(model):
    """
    Sum every gradient over ranks, as one flat all-reduce. Every loss here returns its micro-batch's exact share of
    the global batch loss (normalised by global counts: rows, tokens, pairs), so the global batch's gradient is
    the plain sum of the ranks' gradients and the step equals one process's on the same global batch. (DDP and
    FSDP average instead; with them one multiplies the loss by world size, or, as shard.sum_reduce does, makes
    FSDP's reduce-scatter a sum: a sharded model's gradients are left as they are here.) A parameter that got no
    gradient on this rank (an expert no token chose) adds zeros, so every rank sends the same layout.
    """
    if not dist.is_initialized() or is_sharded(model):   # FSDP has reduce-scattered them (shard.sum_reduce: a sum)
        return
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)


def barrier():
    """Wait for every rank: rank 0's checkpoint is on disk before any rank reads it or exits."""
    if dist.is_initialized():
        dist.barrier()


def autocast(device):
    """bf16 autocast on CUDA (the logprobs and losses cast their logits to fp32 themselves); nothing on CPU."""
    if str(device).startswith('cuda'):
        return torch.autocast('cuda', dtype=torch.bfloat16)
    return contextlib.nullcontext()
