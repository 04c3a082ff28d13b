"""
nanoR1's one entry point: presets, stages, checkpoints, distributed setup.

    python train.py --preset tiny                      # the whole tiny pipeline: pretrain -> grpo -> eval
    python train.py --preset tiny --stage pretrain     # one stage
    torchrun --nproc_per_node=2 train.py --preset tiny --stage pretrain

Stages
- pretrain: next-token prediction on the synthetic corpus (tasks.py), standing in for the web-scale base model
  that R1-Zero starts from (DeepSeek-R1 sec. 2.2: "RL directly on the base model").
- grpo: R1-Zero's RL on the pretrained base with rule rewards (grpo_stage below; the loss is grpo.py's).
- sft: R1's cold start (sec 2.3.1): SFT on a few readable long CoTs written by the task generator (distill.py).
- rs: R1's rejection sampling (sec 2.3.3): correct samples of the previous stage's model + general (arithmetic)
  samples, then SFT of the base (the pretrain checkpoint) on them.
- distill: R1's distillation (sec 2.4): SFT (or SFT + logit KL) of a student pretrained here on a teacher's
  correct samples (--teacher-from).
- a comma-separated pipeline, e.g. --stage pretrain,sft,grpo,rs,grpo (the R1 pipeline, preset tiny-r1): each
  stage writes <out_dir>/<stage> (a repeated one grpo2, ...) and starts from the previous stage's checkpoint.
- all: pretrain,grpo.

Everything a run learns goes under --out-dir (default out/<preset>): <stage>/ckpt.pt (atomic), metrics.jsonl,
summary.json, plots. --resume continues a killed run from its last checkpoint, bit-for-bit on CPU (pretrain and
grpo; the short SFT stages sft, rs and distill run again).
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from model import GPT, ModelConfig, lr_at
from tasks import TaskConfig, problems, corpus_document, format_prompt, arithmetic_response
from tokenizer import Tokenizer, train_bpe


@dataclass
class TrainConfig:
    preset: str = 'tiny'              # a key of PRESETS; flags override its values
    stage: str = 'all'                # pretrain | sft | grpo | rs | distill, or a comma list of them | all (= pretrain,grpo)
    out_dir: str = ''                 # default out/<preset>
    device: str = ''                  # cuda | cpu (default: cuda when available)
    seed: int = 1337                  # every random choice derives from it
    resume: bool = False              # continue the stage from <out_dir>/<stage>/ckpt.pt
    compile: bool = False             # torch.compile the model
    threads: int = 0                  # torch CPU threads (0: leave torch's default)
    # tokenizer and corpus
    bpe_merges: int = 100             # BPE merges learned on the corpus (beyond bytes and number tokens)
    corpus_arith_frac: float = 0.4    # share of corpus documents that are worked arithmetic
    corpus_check_frac: float = 0.15   # share of corpus documents that are drills of 'a vs b yes/no' checks
    n_train_problems: int = 1500      # countdown problems in the train split the corpus and RL draw from
    n_eval: int = 500                 # held-out problems per evaluation
    number_init: bool = True          # seed number-token embeddings with Fourier features of their value
    # pretraining
    pt_steps: int = 1000              # optimizer steps
    pt_batch_size: int = 32           # sequences per micro-batch per rank
    pt_grad_accum: int = 1            # micro-batches per step per rank
    pt_lr: float = 3e-3               # peak learning rate
    pt_min_lr_frac: float = 0.1       # cosine floor as a fraction of the peak
    pt_warmup: int = 50               # linear warmup steps
    pt_weight_decay: float = 0.1      # AdamW decay on matrices
    pt_grad_clip: float = 1.0         # global grad-norm clip (0: off)
    pt_eval_interval: int = 250       # steps between val-loss evaluations
    ckpt_interval: int = 250          # steps between checkpoints
    log_interval: int = 10            # steps between metrics lines (each costs one device sync)
    exit_after: int = 0               # testing aid: hard-exit (as a kill would) after this many steps; 0 = off
    # grpo (R1-Zero RL)
    init_from: str = ''               # checkpoint the first stage after pretrain starts from (default <out_dir>/pretrain/ckpt.pt)
    rl_steps: int = 200               # RL iterations (one batch of rollouts each)
    rl_prompts: int = 16              # prompts per iteration
    rl_group: int = 8                 # samples per prompt (G)
    rl_lr: float = 3e-4               # AdamW learning rate (constant after warmup)
    rl_warmup: int = 10               # linear warmup iterations
    rl_mu: int = 1                    # optimisation epochs over each batch (1: on-policy, loss ~ 0)
    rl_micro: int = 64                # rows per forward/backward micro-batch
    loss_type: str = 'grpo'           # grpo | bnpo | dapo | dr_grpo | kimi
    adv_scale: str = 'group'          # group | batch | none (dr_grpo and kimi want none)
    beta: float = 0.0                 # k3 KL weight to the frozen base (0: no reference model loaded)
    eps_low: float = 0.2              # clip range below 1
    eps_high: float = 0.28            # clip range above 1 (DAPO clip-higher)
    tau: float = 1.0                  # Kimi's KL temperature (loss_type kimi)
    temperature: float = 1.0          # rollout temperature (the trained policy is the model at this temperature)
    max_new_tokens: int = 150         # response budget per rollout
    format_weight: float = 0.1        # weight of the strict format reward added to the accuracy reward
    repeat_weight: float = 0.0        # penalty per share of CoT attempts that repeat an earlier one
    length_weight: float = 0.0        # Kimi k1.5 length reward weight (sec 2.3.3), within each group of G (long2short RL)
    dynamic_sampling: bool = False    # DAPO: drop zero-variance groups and refill the batch
    rl_grad_clip: float = 1.0         # grad-norm clip
    rl_eval_interval: int = 50        # iterations between held-out greedy evaluations
    pass_k: int = 8                   # k of the final sampled pass@k
    # Kimi k1.5 sampling strategies (sec 2.3.4), partial rollouts (2.6.2): tasks.PromptSampler, sample.PartialRollouts
    prompt_sampling: str = 'uniform'  # uniform | curriculum (easy to hard by solve_rate) | prioritized (~ 1 - success)
    curriculum_frac: float = 0.5      # curriculum: share of rl_steps over which the draw window grows to the whole pool
    curriculum_start: float = 0.1     # curriculum: share of the pool (the easiest) drawn from at step 0
    prio_prior: float = 0.5           # prioritized: success rate assumed for a problem not yet tried
    prio_floor: float = 0.05          # prioritized: least weight of a problem, so none has probability 0
    rollout_budget: int = 0           # partial rollouts: new tokens per trajectory per iteration (0: off)
    rollout_buffer: int = 0           # partial rollouts: most groups in flight (0: 2 * rl_prompts)
    repeat_stop: float = 0.0          # stop a rollout once this share of its 4-grams repeat (is_repeating; 0: off)
    # the R1 pipeline's other stages (distill.py): sft (cold start), rs (rejection sampling), distill
    lang_weight: float = 0.0          # grpo: weight of R1's language consistency reward (share of digit words in the CoT)
    sft_examples: int = 400           # sft: readable cold-start traces (tasks.cold_start_trace), one per train problem
    sft_steps: int = 100              # optimizer steps of each SFT stage (sft, rs, distill)
    sft_batch_size: int = 16          # examples per SFT step
    sft_lr: float = 5e-4              # peak SFT learning rate (warmup over 10% of the steps, then cosine)
    rs_problems: int = 500            # rs, distill: train problems to sample from
    rs_samples: int = 4               # rs, distill: samples per problem; only correct ones are kept
    rs_temperature: float = 1.0       # rs, distill: sampling temperature
    rs_general: int = 100             # rs: general (non-reasoning) samples added: worked arithmetic
    rs_filter_mixed: bool = True      # rs, distill: drop correct samples whose CoT mixes in number words (R1 sec 2.3.3)
    rs_base: str = ''                 # rs: the model to SFT (default <out_dir>/pretrain/ckpt.pt: R1 SFTs the base)
    teacher_from: str = ''            # distill: the teacher's checkpoint
    distill_mode: str = 'sft'         # distill: sft (R1 sec 2.4) | logits (SFT + kd_weight * KL to the teacher)
    kd_weight: float = 1.0            # distill logits: weight of the KL term
    kd_temperature: float = 1.0       # distill logits: softmax temperature of both models (the KL is scaled by its square)


PRESETS = {
    # DeepSeek-V3's architecture at ~1M active params: MLA (latent cache in rollouts) + DeepSeekMoE (8 fine-grained
    # routed experts, top-2, one shared, first layer dense, aux-loss-free balancing); learns countdown by RL on a
    # 2-core CPU in under 15 minutes (README, EXPERIMENTS.md "which half of tiny-moe costs the base")
    'tiny': dict(n_layer=4, n_head=4, n_embd=128, block_size=192,
                 attn='mla', mla_impl='auto', kv_lora_rank=96, qk_nope_head_dim=32, qk_rope_head_dim=32,
                 v_head_dim=32, ffn='moe', n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                 moe_intermediate_size=96, first_k_dense_replace=1,
                 pt_steps=720, pt_batch_size=32, pt_lr=3e-3, corpus_arith_frac=0.5, corpus_check_frac=0.1,
                 rl_steps=50, rl_prompts=16, rl_group=8, rl_lr=2e-4, beta=0.05, temperature=0.7,
                 max_new_tokens=176, format_weight=0.0, dynamic_sampling=True, rl_eval_interval=25),
    # the same world on a dense GQA/SwiGLU model (0.98M): the comparison, and the model of tiny-r1/tiny-distill
    'tiny-dense': dict(n_layer=4, n_head=4, n_kv_head=4, n_embd=128, block_size=192,
                       pt_steps=720, pt_batch_size=32, pt_lr=3e-3, corpus_arith_frac=0.5, corpus_check_frac=0.1,
                       rl_steps=75, rl_prompts=16, rl_group=8, rl_lr=2e-4, beta=0.05, temperature=0.7,
                       max_new_tokens=176, format_weight=0.0, dynamic_sampling=True, rl_eval_interval=25),
    # the CPU test suite's preset: seconds, learns nothing
    'test': dict(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, block_size=192, bpe_merges=20,
                 pt_steps=6, pt_batch_size=4, pt_eval_interval=3, ckpt_interval=3, n_eval=8,
                 n_train_problems=200, rl_steps=4, rl_prompts=2, rl_group=4, rl_eval_interval=2,
                 max_new_tokens=24, pass_k=2, beta=0.05),
    # one GPU: a wider, deeper model, same world
    'small': dict(n_layer=8, n_head=8, n_kv_head=4, n_embd=384, block_size=192,
                  pt_steps=3000, pt_batch_size=64, pt_lr=1e-3),
    # the R1 pipeline in the tiny world on tiny-dense's model: a base whose CoTs mix digits and number words,
    # cold-start SFT, RL with the language consistency reward, rejection sampling + SFT of the base, RL again
    'tiny-r1': dict(stage='pretrain,sft,grpo,rs,grpo', words_frac=0.2,
                    n_layer=4, n_head=4, n_kv_head=4, n_embd=128, block_size=192,
                    pt_steps=720, pt_batch_size=32, pt_lr=3e-3, corpus_arith_frac=0.5, corpus_check_frac=0.1,
                    sft_examples=400, sft_steps=120, sft_batch_size=16, sft_lr=5e-4,
                    rl_steps=40, rl_prompts=16, rl_group=8, rl_lr=2e-4, beta=0.05, temperature=0.7,
                    max_new_tokens=176, format_weight=0.0, dynamic_sampling=True, rl_eval_interval=20,
                    lang_weight=0.2, rs_problems=400, rs_samples=4, rs_temperature=0.7, rs_general=100),
    # R1 sec 2.4 in the tiny world: a smaller dense student (2 layers, d=96), pretrained with tiny's corpus
    # settings (so the same tokenizer), trained on the correct samples of the tiny (MLA + MoE) grpo model
    'tiny-distill': dict(stage='pretrain,distill', teacher_from='out/tiny/grpo/ckpt.pt', distill_mode='sft',
                         n_layer=2, n_head=4, n_kv_head=4, n_embd=96, block_size=192,
                         pt_steps=720, pt_batch_size=32, pt_lr=3e-3, corpus_arith_frac=0.5, corpus_check_frac=0.1,
                         max_new_tokens=176, rs_problems=800, rs_samples=4, rs_temperature=0.7,
                         sft_steps=200, sft_batch_size=16, sft_lr=5e-4),
}


# -----------------------------------------------------------------------------
# config plumbing: dataclass fields -> argparse flags -> resolved config

class Parser(argparse.ArgumentParser):
    def error(self, message):
        # one clear line instead of argparse's usage dump
        sys.exit(f"train.py: error: {message}")


def _flag_type(f):
    t = f.type if not isinstance(f.type, str) else {'int': int, 'float': float, 'str': str, 'bool': bool}[f.type]
    if t is bool:
        return lambda s: {'1': True, 'true': True, 'yes': True, '0': False, 'false': False, 'no': False}[s.lower()]
    return t


CONFIG_CLASSES = (TrainConfig, TaskConfig, ModelConfig)


def parse_args(argv=None):
    p = Parser(description="nanoR1: R1-Zero / Kimi k1.5 reasoning RL on a tiny DeepSeek-style model")
    seen = set()
    for cls in CONFIG_CLASSES:
        for f in dataclasses.fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            flag = '--' + f.name.replace('_', '-')
            if f.type in (bool, 'bool'):
                p.add_argument(flag, nargs='?', const=True, default=None, type=_flag_type(f),
                               help=f"{cls.__name__}.{f.name} (bool)")
            else:
                p.add_argument(flag, default=None, type=_flag_type(f), help=f"{cls.__name__}.{f.name}")
    args = p.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    preset = given.get('preset', TrainConfig.preset)
    if preset not in PRESETS:
        sys.exit(f"train.py: error: unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    values = {**PRESETS[preset], **given}
    return resolve(values)


def resolve(values):
    """dict of overrides -> (TrainConfig, TaskConfig, ModelConfig); each class takes its own fields."""
    out = []
    for cls in CONFIG_CLASSES:
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            out.append(cls(**{k: v for k, v in values.items() if k in names}))
        except (ValueError, TypeError) as e:
            sys.exit(f"train.py: error: bad {cls.__name__}: {e}")
    tc = out[0]
    parse_stages(tc.stage)   # one-line error on an unknown stage name
    tc.out_dir = tc.out_dir or os.path.join('out', tc.preset)
    if os.path.exists(tc.out_dir) and not os.path.isdir(tc.out_dir):
        sys.exit(f"train.py: error: --out-dir {tc.out_dir} exists and is a file, not a directory")
    return tuple(out)


# -----------------------------------------------------------------------------
# distributed, devices, checkpoints

def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single process."""
    if 'RANK' not in os.environ:
        return 0, 1, 0
    rank, world, local = int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ['LOCAL_RANK'])
    backend = 'nccl' if torch.cuda.is_available() else 'gloo'
    dist.init_process_group(backend)
    if backend == 'nccl':
        torch.cuda.set_device(local)
    return rank, world, local


def print0(*a, **kw):
    if int(os.environ.get('RANK', 0)) == 0:
        print(*a, **kw, flush=True)


def pick_device(tc, local_rank=0):
    if tc.device:
        if tc.device.startswith('cuda') and not torch.cuda.is_available():
            sys.exit("train.py: error: --device cuda but CUDA is not available here")
        return tc.device
    return f'cuda:{local_rank}' if torch.cuda.is_available() else 'cpu'


def save_checkpoint(path, obj):
    """Write to a temp file, then rename: a kill mid-write never leaves a torn checkpoint."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + '.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, mc=None):
    if not os.path.isfile(path):
        sys.exit(f"train.py: error: no checkpoint at {path}")
    ck = torch.load(path, map_location='cpu', weights_only=True)
    if mc is not None:
        stored = ck['model_config']
        diff = {k: (stored.get(k), v) for k, v in mc.to_dict().items() if stored.get(k) != v}
        if diff:
            sys.exit(f"train.py: error: checkpoint {path} has an incompatible model config "
                     f"(field: stored vs requested): {diff}")
    return ck


def rng_state():
    return {'python': list(random.getstate()[1]), 'python_pos': random.getstate()[2],
            'numpy': np.random.get_state()[1].tolist(), 'torch': torch.get_rng_state()}


def set_rng_state(s):
    random.setstate((3, tuple(s['python']), s['python_pos']))
    st = np.random.get_state()
    np.random.set_state((st[0], np.array(s['numpy'], dtype=np.uint32), *st[2:]))
    torch.set_rng_state(s['torch'])


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed at once so a killed run keeps what it logged."""

    def __init__(self, path, resume):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.f = open(path, 'a' if resume else 'w')

    def log(self, **kv):
        self.f.write(json.dumps(kv) + '\n')
        self.f.flush()


def plot_curves(path, rows, keys, title):
    """One PNG, one panel per key, against step. Quietly skipped when matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return
    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r['step'], r[k]) for r in rows if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='.' if len(pts) < 30 else None)
        ax.set_title(k)
        ax.set_xlabel('step')
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -----------------------------------------------------------------------------
# data

def build_world(tc, task_cfg):
    """Problems, tokenizer and corpus generator, all a pure function of (seed, configs)."""
    cd_train = problems('countdown', 'train', tc.n_train_problems, tc.seed, task_cfg)
    ar_train = problems('arithmetic', 'train', 1500, tc.seed, task_cfg)
    rng = random.Random(tc.seed)
    sample_docs = [corpus_document(rng, task_cfg, cd_train, ar_train, tc.corpus_arith_frac, tc.corpus_check_frac) for _ in range(1000)]
    tok = Tokenizer(train_bpe(sample_docs, tc.bpe_merges))
    return cd_train, ar_train, tok


def fourier_number_init(emb, number_ids, periods=(2, 5, 10, 20, 50, 100, 200, 500, 1000), scale=0.05):
    """
    Seed the embedding of each number token n with cos/sin(2 pi n / P) for a few periods P (the Fourier
    number features of FoNE, Zhou et al. 2025), on top of the random init. Transformers trained on
    arithmetic end up with such features anyway (Nanda et al. 2023); starting from them is what lets a
    1M-parameter model learn sums like 56+7=63 exactly within minutes (EXPERIMENTS.md exp2, together with
    larger-first sums: sums with a 2-digit operand went from 56% wrong to 2%).
    With tied embeddings the same features decode the result.
    """
    with torch.no_grad():
        ids = torch.tensor(list(number_ids.values()))
        n = torch.tensor(list(number_ids.keys()), dtype=torch.float32)
        ang = 2 * math.pi * n[:, None] / torch.tensor(periods, dtype=torch.float32)[None]  # (N, F)
        feats = torch.cat([ang.cos(), ang.sin()], 1) * scale                              # (N, 2F)
        emb.weight[ids, :feats.shape[1]] += feats.to(emb.weight.dtype)


def pretrain_batches(tc, task_cfg, tok, cd_train, ar_train, n_seqs, T, seed):
    """(n_seqs, T + 1) packed token rows: <|bos|> doc <|eos|> <|bos|> doc ..., documents cut at row ends."""
    rng = random.Random(seed)
    need = n_seqs * (T + 1)
    buf = []
    while len(buf) < need:
        doc = corpus_document(rng, task_cfg, cd_train, ar_train, tc.corpus_arith_frac, tc.corpus_check_frac)
        buf.extend([tok.bos] + tok.encode(doc) + [tok.eos])
    return torch.tensor(buf[:need], dtype=torch.long).view(n_seqs, T + 1)


# -----------------------------------------------------------------------------
# evaluation: greedy and sampled pass@k on held-out problems

def score(kind, text, p):
    from rewards import countdown_reward, arithmetic_reward
    if kind == 'countdown':
        return countdown_reward(text, p.numbers, p.target)
    return arithmetic_reward(text, p.result)


@torch.no_grad()
def evaluate(model, tok, probs, kind, template, max_new_tokens, batch_size=512, k=1, temperature=0.0, seed=0,
             detail=False):
    """
    Mean pass@k over problems (k samples each; k=1 with temperature 0 is greedy pass@1) and the mean
    response length in tokens. pass@k uses the unbiased estimator of Chen et al. 2021 with n = k samples.
    detail=True returns a dict that adds the sampled pass@1 of the same samples (their mean accuracy).
    """
    from sample import generate
    model.eval()
    prompts = [[tok.bos] + tok.encode(format_prompt(p, template)) for p in probs]
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
            text = tok.decode(gen.tokens[r, :n].tolist())
            correct.append(score(kind, text, probs[i]))
            lengths.append(n)
    c = np.array(correct).reshape(len(probs), k)
    model.train()
    if detail:
        return {'pass@k': float((c.max(1) > 0).mean()), 'pass@1': float((c > 0).mean()),
                'mean_tokens': float(np.mean(lengths))}
    return float((c.max(1) > 0).mean()), float(np.mean(lengths))


# -----------------------------------------------------------------------------
# stage: pretrain

def pretrain(tc, task_cfg, mc, rank, world, device):
    from tqdm import tqdm
    t0 = time.time()
    stage_dir = os.path.join(tc.out_dir, 'pretrain')
    ckpt_path = os.path.join(stage_dir, 'ckpt.pt')
    cd_train, ar_train, tok = build_world(tc, task_cfg)
    mc = dataclasses.replace(mc, vocab_size=tok.n_vocab)
    torch.manual_seed(tc.seed)
    model = GPT(mc)
    if tc.number_init:
        fourier_number_init(model.embed_tokens, tok.number_ids())
    model = model.to(device)
    opt = torch.optim.AdamW(model.optim_groups(tc.pt_weight_decay), lr=tc.pt_lr, betas=(0.9, 0.95),
                            fused=device.startswith('cuda'))
    start_step = 0
    if tc.resume and os.path.isfile(ckpt_path):
        ck = load_checkpoint(ckpt_path, mc)
        model.load_state_dict(ck['model'])
        opt.load_state_dict(ck['optimizer'])
        start_step = ck['step']
        set_rng_state(ck['rng'])
        print0(f"resumed from {ckpt_path} at step {start_step}")
    elif tc.resume:
        print0(f"--resume: no checkpoint at {ckpt_path} yet, starting fresh")
    raw = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    fwd = torch.compile(model) if tc.compile else model
    amp = torch.autocast('cuda', dtype=torch.bfloat16) if device.startswith('cuda') else contextlib.nullcontext()

    T = mc.block_size
    micro = tc.pt_batch_size
    per_step = micro * tc.pt_grad_accum * world   # sequences in one global batch
    # the whole run's data is a pure function of the seed, so a resumed run sees exactly the same batches
    data = pretrain_batches(tc, task_cfg, tok, cd_train, ar_train, per_step * tc.pt_steps, T, tc.seed + 1)
    val = pretrain_batches(tc, task_cfg, tok, cd_train, ar_train, 64, T, tc.seed + 2)
    log = MetricsLog(os.path.join(stage_dir, 'metrics.jsonl'), tc.resume and start_step > 0) if rank == 0 else None
    print0(f"pretrain: {raw.num_params():,} params, vocab {tok.n_vocab}, {tc.pt_steps} steps x "
           f"{per_step} x {T} tokens, device {device}, world {world}")
    rows, loss_f = [], float('nan')
    bar = tqdm(range(start_step, tc.pt_steps), initial=start_step, total=tc.pt_steps, desc='pretrain',
               disable=rank != 0, mininterval=2)
    tstep = time.time()
    for step in bar:
        lr = lr_at(step, tc.pt_steps, tc.pt_warmup, tc.pt_lr, tc.pt_min_lr_frac)
        for g in opt.param_groups:
            g['lr'] = lr
        batch = data[step * per_step:(step + 1) * per_step]
        loss_acc = torch.zeros((), device=device)
        for m in range(tc.pt_grad_accum):
            # rank r takes micro-batches [r*A, (r+1)*A) of the global batch: the union over ranks is the
            # same global batch a single process with A*world micro-batches would see
            j = rank * tc.pt_grad_accum + m
            xy = batch[j * micro:(j + 1) * micro].to(device)
            sync = m == tc.pt_grad_accum - 1
            ctx = model.no_sync() if world > 1 and not sync else contextlib.nullcontext()
            with ctx, amp:
                _, loss = fwd(xy[:, :-1], xy[:, 1:], mask=document_mask(xy[:, :-1], tok.bos))
                (loss / tc.pt_grad_accum).backward()
            loss_acc += loss.detach() / tc.pt_grad_accum
        if tc.pt_grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.pt_grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if mc.ffn == 'moe':
            from moe import update_moe_biases
            update_moe_biases(raw)   # DeepSeek-V3's aux-loss-free balancing: after every optimizer step
        if world > 1:
            dist.all_reduce(loss_acc, op=dist.ReduceOp.AVG)
        if step % tc.log_interval == 0 or step == tc.pt_steps - 1:
            loss_f = loss_acc.item()   # one sync per log line, not per step
            dt = (time.time() - tstep) / (tc.log_interval if step else 1)
            tstep = time.time()
            row = {'step': step, 'loss': loss_f, 'lr': lr, 'tok_per_s': per_step * T / max(dt, 1e-9)}
            if tc.pt_grad_clip > 0:
                row['grad_norm'] = float(gnorm)
            if mc.ffn == 'moe':
                from moe import moe_load_stats
                row['moe_max_over_mean'] = moe_load_stats(raw)['moe/max_over_mean']
            if mc.mtp_depth > 0 and raw.mtp_loss is not None:
                row['mtp_loss'] = float(raw.mtp_loss)
            if (step % tc.pt_eval_interval == 0 or step == tc.pt_steps - 1):
                row['val_loss'] = val_loss(raw, val, device, tok.bos)
            rows.append(row)
            if log:
                log.log(**row)
            bar.set_postfix(loss=f"{loss_f:.3f}")
        if rank == 0 and ((step + 1) % tc.ckpt_interval == 0 or step == tc.pt_steps - 1):
            save_checkpoint(ckpt_path, {'model': raw.state_dict(), 'optimizer': opt.state_dict(),
                                        'step': step + 1, 'rng': rng_state(), 'model_config': mc.to_dict(),
                                        'train_config': dataclasses.asdict(tc),
                                        'task_config': dataclasses.asdict(task_cfg), 'tokenizer': tok.to_dict()})
        if tc.exit_after and step + 1 == tc.exit_after:
            os._exit(3)
    bar.close()
    final_val = val_loss(raw, val, device, tok.bos)
    summary = {'params': raw.num_params(), 'final_train_loss': loss_f, 'final_val_loss': final_val}
    if rank == 0:
        summary.update(base_evals(raw, tok, tc, task_cfg, mc))
        summary['wall_seconds'] = round(time.time() - t0, 1)
        all_rows = [json.loads(l) for l in open(os.path.join(stage_dir, 'metrics.jsonl'))]
        plot_curves(os.path.join(stage_dir, 'loss.png'), all_rows, ['loss', 'val_loss'], 'pretrain')
        with open(os.path.join(stage_dir, 'summary.json'), 'w') as f:
            json.dump(summary, f, indent=2)
        print0(json.dumps(summary, indent=2))
    return raw, tok, summary


def base_evals(model, tok, tc, task_cfg, mc):
    """Greedy held-out accuracy of a model on worked arithmetic and on countdown (R1-Zero template)."""
    ar_test = problems('arithmetic', 'test', tc.n_eval, tc.seed, task_cfg)
    cd_test = problems('countdown', 'test', tc.n_eval, tc.seed, task_cfg)
    arith, _ = evaluate(model, tok, ar_test, 'arithmetic', task_cfg.template, 40)
    # the RL stage's budget, so that this is the base figure the grpo stage's step 0 reports too
    cd, cd_len = evaluate(model, tok, cd_test, 'countdown', task_cfg.template, tc.max_new_tokens)
    return {'base_arith_acc': arith, 'base_countdown_pass@1': cd, 'base_countdown_mean_tokens': cd_len}


def document_mask(x, bos):
    """
    (B, 1, T, T) causal mask that keeps each packed document to itself (a new document starts at each <|bos|>).
    Without it the base learnt to copy numbers from the *previous* problem in the row, and at inference, with
    no previous problem, hallucinated them (EXPERIMENTS.md full2). On CPU it costs nothing measurable.
    """
    T = x.shape[1]
    seg = (x == bos).long().cumsum(1)                                          # (B, T) document index
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]           # (B, 1, T, T)


@torch.no_grad()
def val_loss(model, val, device, bos):
    model.eval()
    losses = []
    for i in range(0, len(val), 16):
        x, y = val[i:i + 16, :-1].to(device), val[i:i + 16, 1:].to(device)
        losses.append(model(x, y, mask=document_mask(x, bos))[1])
    model.train()
    return float(torch.stack(losses).mean())


# -----------------------------------------------------------------------------
# stage: grpo (R1-Zero: RL straight on the base with rule rewards)

def load_policy(path, device, mc=None):
    ck = load_checkpoint(path, mc)
    mcfg = ModelConfig.from_dict(ck['model_config'])
    model = GPT(mcfg).to(device)
    model.load_state_dict(ck['model'])
    return model, Tokenizer.from_dict(ck['tokenizer']), ck


def rl_rewards(texts, probs, tc, G=1, lengths=None, parts=None):
    """
    Accuracy (countdown rule check) + format_weight * strict format - repeat_weight * the share of attempts in
    the CoT that repeat an earlier one (Kimi k1.5's repeat penalty at the granularity of a search step)
    + length_weight * Kimi's length reward within each group of G consecutive samples (`lengths` in tokens)
    + lang_weight * R1's language consistency reward (the share of the CoT's words written in digits).
    `parts`, a dict if given, receives the (N,) length and language terms that were computed (for metrics).
    """
    from rewards import countdown_reward, format_reward, repeat_ngram_fraction
    acc = torch.tensor([countdown_reward(t, p.numbers, p.target) for t, p in zip(texts, probs)])
    fmt = torch.tensor([format_reward(t) for t in texts])
    reward = acc + tc.format_weight * fmt
    if tc.repeat_weight:
        attempts = [t.split('</think>')[0].split('.') for t in texts]
        reward = reward - tc.repeat_weight * torch.tensor([repeat_ngram_fraction(a, 1) for a in attempts])
    parts = {} if parts is None else parts
    if tc.length_weight:
        parts['length'] = length_rewards(lengths, acc, G)
        reward = reward + tc.length_weight * parts['length']
    if tc.lang_weight:  # R1 sec 2.3.2: + the share of the CoT's words in the target language (here: digits)
        parts['lang'] = lang_rewards(texts)
        reward = reward + tc.lang_weight * parts['lang']
    return reward, acc, fmt


def lang_rewards(texts):
    """(N,) R1's language consistency reward: the share of each CoT's words written in digits."""
    from rewards import language_consistency_reward
    return torch.tensor([language_consistency_reward(t, 'digits') for t in texts])


def length_rewards(lengths, acc, G):
    """(N,) Kimi k1.5's length reward (sec 2.3.3), each group of G consecutive samples ranked on its own."""
    from rewards import kimi_length_reward
    if lengths is None or len(lengths) != len(acc) or len(acc) % G:
        raise ValueError(f"length reward needs one token length per sample in whole groups of G={G}")
    out = []
    for s in range(0, len(acc), G):
        out += kimi_length_reward(list(lengths[s:s + G]), (acc[s:s + G] > 0).tolist())
    return torch.tensor(out)


def sequences_for_training(prompts, gen, pad_id, device):
    """
    Prompt (left-padded) + response as one (B, P + L) batch with positions and the attention mask, and the
    index of the logit that predicts each response token: logits[:, P - 1 + t] predicts response token t.
    """
    from sample import left_pad, attention_mask
    idx, pos, valid = left_pad(prompts, pad_id, device)                        # (B, P)
    P = idx.shape[1]
    resp = gen.tokens.to(device)                                               # (B, L)
    idx = torch.cat([idx, resp], 1)                                            # (B, P+L)
    pos = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(resp.shape[1], device=device)], 1)
    if bool(valid.all()):
        # equal-length prompts (every countdown prompt is: numbers are single tokens): plain causal attention,
        # the fast kernel; pads after a stop token sit at the end where no trained token can see them
        return idx, None, None, P
    valid = torch.cat([valid, torch.ones_like(resp, dtype=torch.bool)], 1)    # pads after a stop are never read
    return idx, pos, attention_mask(valid, valid, 0), P


def grpo_stage(tc, task_cfg, mc, rank, world, device, t_start, name='grpo', init=''):
    from tqdm import tqdm
    import grpo
    from sample import PartialRollouts
    from tasks import PromptSampler
    if world > 1:
        sys.exit("train.py: error: --stage grpo runs in one process for now (rollouts are not sharded)")
    t0 = time.time()
    stage_dir = os.path.join(tc.out_dir, name)   # grpo, or grpo2, ... in a pipeline
    ckpt_path = os.path.join(stage_dir, 'ckpt.pt')
    init = init or tc.init_from or os.path.join(tc.out_dir, 'pretrain', 'ckpt.pt')   # the pipeline's previous stage
    model, tok, ck0 = load_policy(init, device)
    cd_train = problems('countdown', 'train', tc.n_train_problems, tc.seed, task_cfg)
    cd_test = problems('countdown', 'test', tc.n_eval, tc.seed, task_cfg)
    ref = None
    if tc.beta > 0:
        ref, _, _ = load_policy(init, device)
        ref.requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.optim_groups(0.0), lr=tc.rl_lr, betas=(0.9, 0.99))
    start, rows = 0, []
    gen_rng = torch.Generator(device=device)   # the rollouts' randomness, saved with the checkpoint
    gen_rng.manual_seed(tc.seed + 7)
    try:  # Kimi k1.5's prompt sampling and partial rollouts; their state is checkpointed too
        sampler = PromptSampler(cd_train, tc.prompt_sampling, tc.seed + 11, tc.rl_steps, tc.curriculum_frac,
                                tc.curriculum_start, tc.prio_prior, tc.prio_floor)
        rollouts = PartialRollouts(tc.rl_group, tc.max_new_tokens, tc.rl_prompts, tc.rollout_budget,
                                   tc.rollout_buffer, tc.repeat_stop)
    except ValueError as e:
        sys.exit(f"train.py: error: {e}")
    if tc.resume and os.path.isfile(ckpt_path):
        ck = load_checkpoint(ckpt_path, model.config)
        model.load_state_dict(ck['model'])
        opt.load_state_dict(ck['optimizer'])
        start, rows = ck['step'], ck['rows']
        set_rng_state(ck['rng'])
        gen_rng.set_state(ck['gen_rng'])
        if 'sampler' in ck:
            sampler.load_state_dict(ck['sampler'])
            rollouts.load_state_dict(ck['rollouts'])
        else:  # a checkpoint from before the sampler: replay its uniform draws
            for _ in range(start):
                sampler.draw(tc.rl_prompts)
        print0(f"resumed grpo from {ckpt_path} at step {start}")
    log = MetricsLog(os.path.join(stage_dir, 'metrics.jsonl'), tc.resume and start > 0)

    tmpl, G = task_cfg.template, tc.rl_group
    print0(f"grpo: {tc.rl_steps} steps x {tc.rl_prompts} prompts x G={G}, loss {tc.loss_type}, beta {tc.beta}")
    print0(grpo.LOSS_NEAR_ZERO_NOTE)

    base_cd = None
    if start == 0:
        base_cd, base_len = evaluate(model, tok, cd_test, 'countdown', tmpl, tc.max_new_tokens)
        row = {'step': 0, 'eval_pass@1': base_cd, 'eval_mean_tokens': base_len}
        rows.append(row)
        log.log(**row)
        print0(f"step 0: held-out greedy pass@1 {base_cd:.3f}, mean tokens {base_len:.1f}")
    bar = tqdm(range(start, tc.rl_steps), initial=start, total=tc.rl_steps, desc='grpo', mininterval=2)
    for step in bar:
        ts = time.time()
        lr = tc.rl_lr * min(1.0, (step + 1) / max(1, tc.rl_warmup))
        for g in opt.param_groups:
            g['lr'] = lr
        # 1. rollouts: G samples per prompt from the current (= old) policy, on the prompts the sampler draws;
        #    with partial rollouts, the groups whose G trajectories have all ended, trained on their newest segment
        pb = rollouts.step(model, lambda n: sampler.draw(n, step),
                           lambda i: [tok.bos] + tok.encode(format_prompt(cd_train[i], tmpl)), {tok.eos}, tok.pad,
                           temperature=tc.temperature, generator=gen_rng)
        gen, rprompts = pb.gen, pb.contexts   # rprompts: prompt + earlier segments, context only
        rprobs = [cd_train[i] for i in pb.ids for _ in range(G)]
        texts = [tok.decode(r) for r in pb.responses]
        parts = {}
        reward, acc, fmt = rl_rewards(texts, rprobs, tc, G, pb.lengths.tolist(), parts)
        sampler.update(pb.ids, acc.view(-1, G).mean(1).tolist())
        # 2. advantages: the group is the baseline (no critic)
        adv = grpo.group_advantages(reward, G, tc.adv_scale)
        zero_var = grpo.zero_variance_groups(reward, G)
        keep = torch.ones(len(rprobs), dtype=torch.bool)
        if tc.dynamic_sampling and not bool(zero_var.all()):
            # DAPO: groups whose rewards are all equal have A = 0 and only cost compute; drop them
            keep = (~zero_var).repeat_interleave(G)
        rows_idx = keep.nonzero().squeeze(1).tolist()
        # 3. policy update: mu epochs over the batch, old logprobs stored before the first one
        idx, pos, mask, P = sequences_for_training([rprompts[i] for i in rows_idx],
                                                   _select(gen, rows_idx), tok.pad, device)
        if pos is not None:  # partial rollouts: pads after a short row's segment may pass the RoPE table; never read
            pos = pos.clamp(max=model.config.block_size - 1)
        resp_mask = gen.mask[rows_idx].to(device)
        resp_tok = gen.tokens[rows_idx].to(device)
        L = resp_tok.shape[1]
        A = adv[rows_idx].to(device)
        n_tok = resp_mask.sum()

        def logps(m, sl):
            logits, _ = m(idx[sl], pos=None if pos is None else pos[sl], mask=None if mask is None else mask[sl])
            # the policy being optimised is the one that sampled: the model at the rollout temperature
            logits = logits[:, P - 1:P - 1 + L] / tc.temperature                   # (b, L, V)
            return grpo.token_logprobs(logits, resp_tok[sl]), logits

        slices = [slice(i, i + tc.rl_micro) for i in range(0, len(rows_idx), tc.rl_micro)]
        with torch.no_grad():
            old = torch.cat([logps(model, sl)[0] for sl in slices]) if tc.rl_mu > 1 else None
            refl = torch.cat([logps(ref, sl)[0] for sl in slices]) if ref is not None else None
        stats = {}
        for epoch in range(tc.rl_mu):
            for sl in slices:
                lp, logits = logps(model, sl)
                old_sl = old[sl] if old is not None else lp.detach()
                loss, met = grpo.policy_loss(
                    lp, old_sl, refl[sl] if refl is not None else None, A[sl], resp_mask[sl],
                    loss_type=tc.loss_type, beta=tc.beta, eps_low=tc.eps_low, eps_high=tc.eps_high, tau=tc.tau,
                    max_len=tc.max_new_tokens, global_tokens=n_tok)
                # grpo/bnpo/dr_grpo return a micro-batch mean: weight by the micro-batch's share of rows;
                # dapo is already normalised by the whole batch's token count
                w = 1.0 if tc.loss_type == 'dapo' else (sl.stop - sl.start if sl.stop <= len(rows_idx)
                                                         else len(rows_idx) - sl.start) / len(rows_idx)
                (loss * w).backward()
                if epoch == tc.rl_mu - 1:
                    met['entropy'] = grpo.masked_entropy(logits.detach(), resp_mask[sl])
                    met['loss'] = loss.detach()
                    for k, v in met.items():
                        stats[k] = stats.get(k, 0.0) + v.detach() * w
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.rl_grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if model.config.ffn == 'moe':
                from moe import update_moe_biases
                update_moe_biases(model)
        # 4. metrics (one sync for all of them)
        lens = pb.lengths.float()   # whole responses (all segments)
        correct = acc > 0
        row = {'step': step + 1, 'reward': float(reward.mean()), 'reward_std': float(reward.std()),
               'acc_reward': float(acc.mean()), 'format_reward': float(fmt.mean()), 'accuracy': float(correct.float().mean()),
               'response_len': float(lens.mean()),
               'response_len_correct': float(lens[correct].mean()) if correct.any() else None,
               'response_len_wrong': float(lens[~correct].mean()) if (~correct).any() else None,
               'zero_var_frac': float(zero_var.float().mean()), 'truncated_frac': float((~gen.finished).float().mean()),
               'grad_norm': float(gnorm), 'lr': lr, 'step_seconds': round(time.time() - ts, 3)}
        row.update({k: float(v) for k, v in stats.items()})
        if tc.length_weight:
            row['length_reward'] = float(parts['length'].mean())
        if tc.lang_weight or task_cfg.words_frac:  # measured whenever the corpus has a second language
            row['lang_reward'] = float(parts['lang'].mean() if 'lang' in parts else lang_rewards(texts).mean())
        trained = gen.mask[rows_idx].sum(1)   # (rows,) tokens each trained row contributes
        drawn_rate = [cd_train[i].solve_rate for i in pb.drawn]   # the difficulty label of the new prompts
        row.update(prompt_solve_rate=sum(drawn_rate) / len(drawn_rate) if drawn_rate else None,
                   buffer_groups=pb.buffered, repeat_stops=pb.repeat_stops,
                   continued_token_frac=float(trained[pb.continued[rows_idx]].sum() / trained.sum().clamp(min=1)))
        if (step + 1) % tc.rl_eval_interval == 0 or step + 1 == tc.rl_steps:
            row['eval_pass@1'], row['eval_mean_tokens'] = evaluate(model, tok, cd_test, 'countdown', tmpl,
                                                                   tc.max_new_tokens)
        rows.append(row)
        log.log(**row)
        if step % 10 == 0:  # a few raw rollouts: what the numbers above actually look like
            with open(os.path.join(stage_dir, 'samples.jsonl'), 'a') as f:
                for r in range(0, len(texts), max(1, len(texts) // 4)):
                    f.write(json.dumps({'step': step + 1, 'prompt': format_prompt(rprobs[r], tmpl),
                                        'reward': float(reward[r]), 'response': texts[r]}) + '\n')
        bar.set_postfix(acc=f"{row['accuracy']:.2f}", len=f"{row['response_len']:.0f}",
                        eval=row.get('eval_pass@1', ''))
        if (step + 1) % tc.ckpt_interval == 0 or step + 1 == tc.rl_steps:
            save_checkpoint(ckpt_path, {'model': model.state_dict(), 'optimizer': opt.state_dict(), 'step': step + 1,
                                        'rng': rng_state(), 'gen_rng': gen_rng.get_state(), 'rows': rows,
                                        'sampler': sampler.state_dict(), 'rollouts': rollouts.state_dict(),
                                        'model_config': model.config.to_dict(),
                                        'train_config': dataclasses.asdict(tc), 'tokenizer': tok.to_dict(),
                                        'task_config': dataclasses.asdict(task_cfg)})
        if tc.exit_after and step + 1 == tc.exit_after:
            os._exit(3)
    bar.close()
    finish_grpo(tc, task_cfg, model, tok, rows, cd_test, stage_dir, t0, t_start, base_cd)


def _select(gen, rows_idx):
    from sample import Generation
    return Generation(gen.tokens[rows_idx], gen.logprobs[rows_idx], gen.mask[rows_idx], gen.lengths[rows_idx],
                      gen.finished[rows_idx])


def finish_grpo(tc, task_cfg, model, tok, rows, cd_test, stage_dir, t0, t_start, base_cd):
    """Final evaluation, summary.json (stage and run level), plots and report.md."""
    tmpl = task_cfg.template
    base_cd = rows[0]['eval_pass@1'] if base_cd is None else base_cd
    last = rows[-1] if rows else {}
    if last.get('step') == tc.rl_steps and 'eval_pass@1' in last:  # the loop just evaluated the final model
        rl_cd, rl_len = last['eval_pass@1'], last['eval_mean_tokens']
    else:
        rl_cd, rl_len = evaluate(model, tok, cd_test, 'countdown', tmpl, tc.max_new_tokens)
    # one batch of k samples per problem at T=1 gives both the sampled pass@1 (their mean) and pass@k
    d = evaluate(model, tok, cd_test, 'countdown', tmpl, tc.max_new_tokens, k=tc.pass_k, temperature=1.0, seed=2,
                 detail=True)
    sampled, pass_k = d['pass@1'], d['pass@k']
    summary = {'base_countdown_pass@1': base_cd, 'rl_countdown_pass@1': rl_cd,
               'rl_countdown_pass@1_sampled': sampled, f'rl_countdown_pass@{tc.pass_k}': pass_k,
               'rl_mean_response_tokens': rl_len, 'base_mean_response_tokens': rows[0].get('eval_mean_tokens'),
               'n_eval': len(cd_test), 'rl_steps': tc.rl_steps, 'grpo_wall_seconds': round(time.time() - t0, 1)}
    pre = os.path.join(tc.out_dir, 'pretrain', 'summary.json')
    if os.path.isfile(pre):
        summary['base_arith_acc'] = json.load(open(pre)).get('base_arith_acc')
    summary['wall_seconds'] = round(time.time() - t_start, 1)
    with open(os.path.join(stage_dir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(tc.out_dir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    plots = {'reward': ['reward', 'accuracy', 'eval_pass@1'], 'length': ['response_len', 'response_len_correct',
             'response_len_wrong'], 'stability': ['kl', 'entropy', 'clip_frac_low', 'clip_frac_high', 'grad_norm']}
    for name, keys in plots.items():
        plot_curves(os.path.join(stage_dir, f'{name}.png'), rows, keys, f'grpo: {name}')
    write_report(tc, task_cfg, model, summary, rows, stage_dir)
    print0(json.dumps(summary, indent=2))


def write_report(tc, task_cfg, model, summary, rows, stage_dir):
    first = next((r for r in rows if 'accuracy' in r), {})
    last = rows[-1] if rows else {}
    lines = ['# nanoR1 grpo report', '', f"preset `{tc.preset}`, {model.num_params():,} parameters, "
             f"{tc.rl_steps} RL steps, wall {summary['wall_seconds']} s", '', '## Before / after (held-out, greedy)', '',
             '| metric | base | after RL |', '|---|---|---|',
             f"| countdown pass@1 | {summary['base_countdown_pass@1']:.3f} | {summary['rl_countdown_pass@1']:.3f} |",
             f"| mean response tokens | {summary['base_mean_response_tokens']:.1f} | {summary['rl_mean_response_tokens']:.1f} |",
             f"| train accuracy (first / last step) | {first.get('accuracy', float('nan')):.3f} | {last.get('accuracy', float('nan')):.3f} |",
             '', f"sampled pass@1 {summary['rl_countdown_pass@1_sampled']:.3f}, pass@{tc.pass_k} "
             f"{summary[f'rl_countdown_pass@{tc.pass_k}']:.3f}", '', '## Plots', '',
             '![reward](reward.png)', '', '![length](length.png)', '', '![stability](stability.png)', '',
             '## Config', '', '```json', json.dumps({**dataclasses.asdict(tc), **dataclasses.asdict(task_cfg),
                                                    **model.config.to_dict()}, indent=1), '```', '']
    with open(os.path.join(stage_dir, 'report.md'), 'w') as f:
        f.write('\n'.join(lines))


# -----------------------------------------------------------------------------
# stages: sft (R1's cold start), rs (rejection sampling + SFT of the base), distill (R1 sec 2.4); distill.py

def sft_stage(tc, task_cfg, device, name='sft', init=''):
    """R1 sec 2.3.1: SFT the base on a few readable long CoTs that stop at their first verified hit."""
    from tasks import cold_start_trace
    t0 = time.time()
    model, tok, _ = load_policy(init or os.path.join(tc.out_dir, 'pretrain', 'ckpt.pt'), device)
    cd_train = problems('countdown', 'train', tc.n_train_problems, tc.seed, task_cfg)
    rng = random.Random(tc.seed + 31)
    picks = rng.sample(cd_train, min(tc.sft_examples, len(cd_train)))
    examples = [{'prompt_ids': [tok.bos] + tok.encode(format_prompt(p, task_cfg.template)),
                 'response_ids': tok.encode(cold_start_trace(rng, p, task_cfg)) + [tok.eos]} for p in picks]
    # a trace longer than the response budget teaches a length that rollouts and evaluation never reach
    examples = [e for e in examples if len(e['response_ids']) <= tc.max_new_tokens]
    if not examples:
        sys.exit(f"train.py: error: {name}: no cold-start trace fits in --max-new-tokens {tc.max_new_tokens}")
    print0(f"{name}: cold start on {len(examples)} readable traces of {len(picks)} within {tc.max_new_tokens} "
           f"tokens, {tc.sft_steps} steps x {tc.sft_batch_size}")
    sft_and_finish(tc, task_cfg, device, name, model, tok, examples, t0,
                   [f"Cold start (R1 sec 2.3.1) from `{init or 'pretrain'}` on {len(examples)} traces of "
                    "tasks.cold_start_trace: digits only, ending at the first attempt checked `yes`."])


def correct_samples(tc, task_cfg, model, tok, seed):
    """rs and distill's data: rs_samples samples of rs_problems train problems, the distinct correct ones, minus
    those whose CoT mixes in number words when rs_filter_mixed (R1 filters mixed languages out of its SFT data).
    Returns (pool, kept samples, correct samples before the filter)."""
    import distill
    from tasks import has_number_words
    cd_train = problems('countdown', 'train', tc.n_train_problems, tc.seed, task_cfg)
    pool = random.Random(seed).sample(cd_train, min(tc.rs_problems, len(cd_train)))
    samples = distill.rejection_sample(model, tok, pool, tc.rs_samples, tc.rs_temperature, tc.max_new_tokens,
                                       task_cfg.template, 'correct', seed=seed + 1)
    n_correct = len(samples)
    if tc.rs_filter_mixed:
        samples = [e for e in samples if not has_number_words(e['text'])]
    return pool, samples, n_correct


def rs_stage(tc, task_cfg, device, name='rs', init=''):
    """R1 sec 2.3.3: the RL model's correct samples + general samples; SFT of the base on them."""
    t0 = time.time()
    policy, ptok, _ = load_policy(init or os.path.join(tc.out_dir, 'grpo', 'ckpt.pt'), device)
    pool, samples, n_correct = correct_samples(tc, task_cfg, policy, ptok, tc.seed + 41)
    base = tc.rs_base or os.path.join(tc.out_dir, 'pretrain', 'ckpt.pt')
    model, tok, _ = load_policy(base, device)
    if tok.to_dict() != ptok.to_dict():
        sys.exit(f"train.py: error: rs: {base} and the sampled model use different tokenizers")
    general = [{'prompt_ids': [tok.bos] + tok.encode(format_prompt(p, task_cfg.template)),
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
        sys.exit(f"train.py: error: unknown distill_mode {tc.distill_mode!r}; choose 'sft' or 'logits'")
    if not tc.teacher_from or not os.path.isfile(tc.teacher_from):
        sys.exit(f"train.py: error: no teacher checkpoint at {tc.teacher_from!r}: train one first "
                 "(python train.py --preset tiny) or pass --teacher-from")
    teacher, ttok, _ = load_policy(tc.teacher_from, device)
    model, tok, _ = load_policy(init or os.path.join(tc.out_dir, 'pretrain', 'ckpt.pt'), device)
    same_tok = ttok.to_dict() == tok.to_dict()
    if tc.distill_mode == 'logits' and not same_tok:
        sys.exit("train.py: error: distill_mode logits needs the teacher's vocabulary: pretrain the student with "
                 "the teacher's seed, corpus and task settings (the tokenizer is built from them)")
    cd_test = problems('countdown', 'test', tc.n_eval, tc.seed, task_cfg)
    pool, samples, n_correct = correct_samples(tc, task_cfg, teacher, ttok, tc.seed + 51)
    # text, not ids, crosses over: in sft mode a student with its own tokenizer re-encodes the teacher's samples
    examples = [{'prompt_ids': [tok.bos] + tok.encode(format_prompt(e['problem'], task_cfg.template)),
                 'response_ids': tok.encode(e['text'].removesuffix('<|eos|>')) + [tok.eos]} for e in samples]
    t_acc, t_len = evaluate(teacher, ttok, cd_test, 'countdown', task_cfg.template, tc.max_new_tokens)
    kd = tc.distill_mode == 'logits'
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
    import distill
    stage_dir = os.path.join(tc.out_dir, name)
    cd_test = problems('countdown', 'test', tc.n_eval, tc.seed, task_cfg)
    acc0, len0 = evaluate(model, tok, cd_test, 'countdown', task_cfg.template, tc.max_new_tokens)
    rows = []
    if examples:
        log = MetricsLog(os.path.join(stage_dir, 'metrics.jsonl'), False)
        try:
            rows = distill.sft(model, examples, tc.sft_steps, tc.sft_batch_size, tc.sft_lr, device, desc=name,
                               teacher=teacher, kd_weight=tc.kd_weight if teacher is not None else 0.0,
                               kd_temperature=tc.kd_temperature, seed=tc.seed + 61, log=log)
        except ValueError as e:
            sys.exit(f"train.py: error: {name}: {e}")
        plot_curves(os.path.join(stage_dir, 'loss.png'), rows, ['loss', 'sft_loss', 'kd_loss'], name)
    else:
        print0(f"{name}: no examples, nothing to train on; the checkpoint is the initial model")
    acc, n_tok = evaluate(model, tok, cd_test, 'countdown', task_cfg.template, tc.max_new_tokens)
    save_checkpoint(os.path.join(stage_dir, 'ckpt.pt'), {
        'model': model.state_dict(), 'step': len(rows), 'model_config': model.config.to_dict(),
        'train_config': dataclasses.asdict(tc), 'task_config': dataclasses.asdict(task_cfg),
        'tokenizer': tok.to_dict()})
    summary = {'countdown_pass@1': acc, 'mean_response_tokens': n_tok, 'init_countdown_pass@1': acc0,
               'init_mean_response_tokens': len0, 'n_examples': len(examples),
               'example_mean_response_tokens': sum(len(e['response_ids']) for e in examples) / max(1, len(examples)),
               'sft_steps': len(rows), 'final_sft_loss': rows[-1]['sft_loss'] if rows else None,
               **(extra or {}), 'n_eval': len(cd_test), 'wall_seconds': round(time.time() - t0, 1)}
    with open(os.path.join(stage_dir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    write_stage_report(stage_dir, name, summary, notes + ['', '![loss](loss.png)'] if rows else notes,
                       {**dataclasses.asdict(tc), **dataclasses.asdict(task_cfg), **model.config.to_dict()})
    print0(json.dumps(summary, indent=2))


def write_stage_report(stage_dir, name, summary, notes, cfg):
    lines = [f'# nanoR1 {name} report', '', *notes, '', '| metric | value |', '|---|---|',
             *[f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()],
             '', '## Config', '', '```json', json.dumps(cfg, indent=1), '```', '']
    with open(os.path.join(stage_dir, 'report.md'), 'w') as f:
        f.write('\n'.join(lines))


# -----------------------------------------------------------------------------
# the pipeline

STAGES = ('pretrain', 'sft', 'grpo', 'rs', 'distill')   # --stage all = pretrain,grpo


def parse_stages(stage):
    """'pretrain,sft,grpo,rs,grpo' -> [(stage, its directory)]: a repeated stage writes grpo2, grpo3, ..."""
    names = ['pretrain', 'grpo'] if stage == 'all' else [s.strip() for s in stage.split(',')]
    for s in names:
        if s not in STAGES:
            sys.exit(f"train.py: error: unknown stage {s!r}; choose from {list(STAGES)}, 'all', or a comma-separated "
                     "list such as pretrain,sft,grpo,rs,grpo")
    if names.count('pretrain') > 1:
        sys.exit("train.py: error: pretrain can appear once in a pipeline (it always writes <out_dir>/pretrain)")
    dirs = [s if names[:i].count(s) == 0 else f"{s}{names[:i].count(s) + 1}" for i, s in enumerate(names)]
    return list(zip(names, dirs))


def stage_summary(tc, task_cfg, mc, d, wall):
    """A stage's summary.json with the keys every stage shares (held-out greedy pass@1, mean response tokens,
    stage wall seconds) filled in; pretrain gets its report.md here."""
    path = os.path.join(tc.out_dir, d, 'summary.json')
    s = json.load(open(path))
    for key, names in (('countdown_pass@1', ('rl_countdown_pass@1', 'base_countdown_pass@1')),
                       ('mean_response_tokens', ('rl_mean_response_tokens', 'base_countdown_mean_tokens'))):
        s.setdefault(key, next((s[n] for n in names if n in s), None))
    s['stage_wall_seconds'] = round(wall, 1)
    with open(path, 'w') as f:
        json.dump(s, f, indent=2)
    if not os.path.isfile(os.path.join(tc.out_dir, d, 'report.md')):
        write_stage_report(os.path.join(tc.out_dir, d), d, s, ['![loss](loss.png)'],
                           {**dataclasses.asdict(tc), **dataclasses.asdict(task_cfg), **mc.to_dict()})
    return s


def main(argv=None):
    tc, task_cfg, mc = parse_args(argv)
    rank, world, local = setup_distributed()
    device = pick_device(tc, local)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    cfg = {**dataclasses.asdict(tc), **dataclasses.asdict(task_cfg), **mc.to_dict()}
    print0(json.dumps(cfg))
    t0 = time.time()
    pipeline = parse_stages(tc.stage)
    if world > 1 and [s for s, _ in pipeline] != ['pretrain']:
        sys.exit("train.py: error: under torchrun only --stage pretrain runs (the other stages are one process)")
    prev, stages = tc.init_from, {}   # --init-from: where the first stage that loads a model starts
    for s, d in pipeline:
        ts = time.time()
        print0(f"=== stage {d} ({s})" + (f", from {prev}" if prev and s != 'pretrain' else ''))
        if s == 'pretrain':
            pretrain(tc, task_cfg, mc, rank, world, device)
        elif s == 'grpo':
            grpo_stage(tc, task_cfg, mc, rank, world, device, t0, name=d, init=prev)
        else:
            {'sft': sft_stage, 'rs': rs_stage, 'distill': distill_stage}[s](tc, task_cfg, device, d, prev)
        prev = os.path.join(tc.out_dir, d, 'ckpt.pt')
        if rank == 0:
            stages[d] = stage_summary(tc, task_cfg, mc, d, time.time() - ts)
    if rank == 0:
        # the run level: the last stage's keys at the top (what `--stage all` always wrote), every stage's below
        top = {**stages[pipeline[-1][1]], 'pipeline': [d for _, d in pipeline],
               'stages': {d: {k: v[k] for k in ('countdown_pass@1', 'mean_response_tokens', 'stage_wall_seconds')}
                          for d, v in stages.items()}, 'wall_seconds': round(time.time() - t0, 1)}
        top.pop('stage_wall_seconds')
        with open(os.path.join(tc.out_dir, 'summary.json'), 'w') as f:
            json.dump(top, f, indent=2)
        if len(pipeline) > 1:
            print0(json.dumps(top['stages'], indent=2))
    if world > 1:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
