"""
Sharding for models beyond one GPU: FSDP2 (`fully_shard` over a DeviceMesh, HSDP across nodes), meta-device
builds filled shard by shard, activation checkpointing, and the per-rank memory plan of `train.py --dry-run`.

Under --fsdp each rank keeps 1/S of every weight, gradient and AdamW moment (S = the shard group: all ranks,
or one node's under HSDP) and all-gathers a block's weights just before the block runs (ZeRO-3, Rajbhandari
et al. 2020, as torch's FSDP2 `fully_shard` over DTensors). A model it shards is built on the meta device,
sharded, then filled shard by shard (init_sharded or harness.load_sharded): no rank holds the whole model.
Pretraining builds its model with build_model; the GRPO loop and the SFT stages load theirs with load_model:

    mesh = fsdp_mesh(device_type, tc.hsdp)
    with torch.device('meta'):
        model = GPT(config)
    shard_model(model, mesh, mixed_precision(device_type), activation_checkpointing=tc.activation_checkpointing)
    materialize(model, device)
    init_sharded(model, seed)     # a fresh init, equal to GPT(config) after torch.manual_seed(seed)
    ck = load_sharded(path, model, opt)   # or: resume (after building the optimizer on the sharded model)
    ... forward / backward / clip_grad_norm_ / opt.step() on every rank, as without sharding ...
    with gathered(model):         # rollouts and evaluation: every rank, whatever number of forwards each runs
        generate(model, ...)
    save_sharded(path, model, opt, checkpoint(model, tok, tc, task_cfg, step, rng=...))   # every rank

and a frozen reference model: meta, shard_frozen(ref, mesh, mp), materialize, load_sharded(path, ref).
Checkpoints (harness.save_sharded / load_sharded) are torch.distributed.checkpoint directories that reshard
onto any world size.

Where the RL stages deviate from pretraining's use: their losses are each rank's share of the global batch's
loss, so the ranks' gradients are summed, not averaged (sum_reduce); generation runs on the whole gathered model
(gathered), since under FSDP every forward is a collective and ranks stop decoding at different steps; and the
loss reads the logits of the model's forward, never the output head's weight outside it (which is sharded
there: fused_loss.trainer_impl).
"""
import contextlib
import copy
import dataclasses
import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.checkpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from harness import die, load_checkpoint, load_policy, load_sharded, print0
from hf import is_hf_folder
from mla import kv_cache_bytes_per_token
from model import GPT, Block, ModelConfig
from tasks import Countdown, format_prompt
from tokenizer_hf import from_dict as tokenizer_from_dict


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


def shard_model(model, mesh, mp=None, activation_checkpointing=False):
    """
    fully_shard each block and MTP module, then the root, in place; returns the model, now an FSDPModule that
    is called as before. Its parameters are DTensors holding this rank's shard: build the optimizer after this
    call (AdamW over model.parameters() then keeps sharded moments). Call it on a model built on the meta device,
    then materialize + init_sharded / load_sharded; on a real model it shards what is there. Every unit, the root
    too, reshards after its forward, so between calls a rank holds only its shards. (Keeping the weights gathered
    from forward to backward saves an all-gather per unit, but a no-grad forward then leaves them gathered until
    a backward frees them, and a forward after opt.step() ran on the weights from before the step: seen on 2 CPU
    ranks. `gathered` keeps them gathered on purpose, around generation only.)
    """
    if activation_checkpointing:
        checkpoint_blocks(model)
    mp = mp or MixedPrecisionPolicy()
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    return model


def shard_frozen(ref, mesh, mp=None):
    """The frozen reference model of the KL term, sharded like the policy: no gradients, no optimizer state, and
    every unit (the root too) resharded after each forward, so it holds only its shards between calls."""
    ref.requires_grad_(False).eval()
    return shard_model(ref, mesh, mp)


def sum_reduce(model):
    """
    Make FSDP sum the ranks' gradients instead of averaging them. The RL and SFT losses return each rank's exact
    share of the global batch's loss (harness.sum_gradients), so the global gradient is the plain sum; FSDP's
    default mean would divide it by the world size. (Pretraining keeps the mean: its loss is a per-rank mean.)
    A divide factor of 1 with sum-only collectives is a plain SUM reduce-scatter (and all-reduce across HSDP
    replicas): no PREMUL_SUM, which gloo lacks.
    """
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    return model


@contextlib.contextmanager
def gathered(model):
    """
    Every weight of a sharded model all-gathered for the length of the block (a plain model: nothing happens).
    For rollouts and evaluation: under FSDP each unit's forward all-gathers its weights, a collective, so every
    rank would have to run the same number of forwards, while generate stops when its own rows stop (or never
    starts on a rank with no rows). Gathered, a forward runs no collective and each rank decodes as far as it
    needs. Every rank must enter (the gather itself is a collective) and no backward may run inside.
    Cost: each rank holds the whole model in the compute dtype (2P bytes in bf16 on CUDA) for the duration,
    instead of the root and two blocks; in exchange the weights cross the network once per generation, not once
    per decode step (the alternative of equal decode steps on every rank all-gathers the whole model per token).
    """
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)   # else each forward's end would free what we gathered
        m.unshard()
    try:
        yield model
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)   # shard_model's setting


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


def sharded_empty(config, device, hsdp=0, activation_checkpointing=False, frozen=False):
    """GPT(config) built on the meta device, sharded (shard_model, or shard_frozen for a frozen model) over
    fsdp_mesh with the device's mixed precision, then given storage on `device`: its weights still to be filled."""
    with torch.device('meta'):
        model = GPT(config)
    kind = device.split(':')[0]
    mesh, mp = fsdp_mesh(kind, hsdp), mixed_precision(kind)
    if frozen:
        shard_frozen(model, mesh, mp)
    else:
        shard_model(model, mesh, mp, activation_checkpointing=activation_checkpointing)
    return materialize(model, device)


def build_model(mc, device, seed, fsdp=False, hsdp=0, activation_checkpointing=False, fresh=True, embed_init=None):
    """
    GPT(mc) initialised after torch.manual_seed(seed), then embed_init(model.embed_tokens) if given, on `device`;
    with fsdp the same model sharded (sharded_empty, and when `fresh` the one-process init replayed shard by
    shard; a resumed run loads its shards instead).
    """
    torch.manual_seed(seed)
    if not fsdp:
        model = GPT(mc)
        if embed_init is not None:
            embed_init(model.embed_tokens)
        if activation_checkpointing:
            checkpoint_blocks(model)
        return model.to(device)
    model = sharded_empty(mc, device, hsdp, activation_checkpointing)
    if fresh:
        init_sharded(model, seed)   # equal to GPT(mc) after the seed, as in one process
        if embed_init is not None:
            edit_full(model.embed_tokens.weight, lambda w: embed_init(nn.Embedding.from_pretrained(w)))
    return model


def load_model(path, device, tc=None, frozen=False):
    """
    (model, tokenizer, checkpoint dict) of harness.load_policy, for the stages after pretraining: the policy to
    train, or with frozen=True a model that only samples or scores (reference, teacher). With tc.fsdp the model is
    sharded_empty (tc.hsdp, tc.activation_checkpointing), then filled: from a sharded checkpoint through DCP, each
    rank reading only its shards; from a one-file checkpoint or a Hugging Face folder by loading it whole on the
    CPU (not the GPU) and keeping each rank's shards of it (set_model_state_dict with full_state_dict). A
    trainable sharded model sums its gradients over ranks (sum_reduce).
    """
    checkpointing = tc is not None and tc.activation_checkpointing and not frozen
    if tc is None or not tc.fsdp:
        model, tok, ck = load_policy(path, device)
        if frozen:
            model.requires_grad_(False).eval()
        return (checkpoint_blocks(model) if checkpointing else model), tok, ck
    ck = None if is_hf_folder(path) else load_checkpoint(path)
    if ck is not None and ck.get('sharded'):
        full, config, tok = None, ModelConfig.from_dict(ck['model_config']), tokenizer_from_dict(ck['tokenizer'])
    else:
        full, tok, ck = load_policy(path, 'cpu')
        config = full.config
    model = sharded_empty(config, device, tc.hsdp, checkpointing, frozen)
    if full is None:
        load_sharded(path, model)
    else:
        set_model_state_dict(model, full.state_dict(), options=StateDictOptions(full_state_dict=True))
    return (model if frozen else sum_reduce(model)), tok, ck


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
        # training gathers the root (embedding, head, norm) and two blocks at a time; rollouts the whole model
        rows['gathered weights'] = (n * act, "the whole model, all-gathered for rollouts and evaluation (gathered)")
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
    n_prompts = math.ceil(tc.rl_prompts / world)   # sample.generate prefills each distinct prompt once, last position
    rows['prefill logits'] = (n_prompts * V * act, f"{n_prompts} prompts x 1 (the last) position x {V} vocab")
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


def _plan(tc, task_cfg, mc, world):
    """(meta model, device type, prompt bound, the plan's rows, their total bytes) of these settings."""
    device_type = (tc.device or ('cuda' if torch.cuda.is_available() else 'cpu')).split(':')[0]
    with torch.device('meta'):
        model = GPT(mc)
    prompt_len = prompt_bound(task_cfg)
    rows = memory_plan(model, tc, world, device_type, prompt_len)
    return model, device_type, prompt_len, rows, sum(b for b, _ in rows.values())


def dry_run(tc, task_cfg, mc):
    """--dry-run: print the per-rank memory plan of this config, name what does not fit in the device's memory and
    the flags that would fix it, allocating nothing (the model is built on the meta device)."""
    world = tc.world_size or int(os.environ.get('WORLD_SIZE', 1))
    model, device_type, prompt_len, rows, total = _plan(tc, task_cfg, mc, world)
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


def check_fits(tc, task_cfg, mc):
    """Before any weight is loaded: stop with one line when this rank's plan exceeds the GPU's memory (or, on a
    CPU, the machine's RAM), naming the largest items and the first fix that makes it fit. A preset too big for
    the machine then stops here instead of thrashing; --dry-run prints the whole plan."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    model, device_type, prompt_len, rows, total = _plan(tc, task_cfg, mc, world)
    if device_type == 'cuda' and torch.cuda.is_available():
        capacity, where = torch.cuda.mem_get_info()[1], torch.cuda.get_device_name()
    else:
        capacity, where = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'), 'this machine\'s RAM'
    if total <= capacity:
        return
    big = ', '.join(f"{k} {rows[k][0] / 2 ** 30:.1f}" for k in sorted(rows, key=lambda k: -rows[k][0])[:3])
    fix = next(iter(plan_fixes(model, tc, world, device_type, prompt_len, capacity)), None)
    die(f"this run needs {total / 2 ** 30:.1f} GiB per rank, more than {where} ({capacity / 2 ** 30:.1f} GiB); "
        f"largest: {big} GiB" + (f"; {fix[0]} would need {fix[1] / 2 ** 30:.1f}" if fix else '') +
        " (python train.py ... --dry-run prints the plan)")
