"""
nanoR1's one entry point: flags and presets, the stage pipeline, pretraining, and the GRPO loop.

    python train.py --preset tiny                      # the whole tiny pipeline: pretrain -> grpo -> eval
    python train.py --preset tiny --stage pretrain     # one stage
    torchrun --nproc_per_node=2 train.py --preset tiny   # every stage: one process's weights on the same global batch
    torchrun --nproc_per_node=8 train.py --preset small --fsdp   # the same, weights, grads, AdamW sharded (FSDP2)
    python train.py --preset qwen2.5-0.5b-countdown --init-from /path/to/Qwen2.5-0.5B --save-hf out/q05/hf

Stages
- pretrain: next-token prediction on the synthetic corpus (tasks.py), standing in for the web-scale base model
  that R1-Zero starts from (DeepSeek-R1 sec 2.2: "RL directly on the base model").
- grpo: R1-Zero's RL on the pretrained base with rule rewards (`grpo_stage`; the loss is grpo.py's, the rewards
  rewards.py's, the rollouts sample.py's and rollouts.py's).
- sft, rs, distill: R1's cold start (sec 2.3.1), rejection sampling (sec 2.3.3) and distillation (sec 2.4), in
  distill.py.
- a comma-separated pipeline, e.g. --stage pretrain,sft,grpo,rs,grpo (the R1 pipeline, preset tiny-r1): each
  stage writes <out_dir>/<stage> (a repeated one grpo2, ...) and starts from the previous stage's checkpoint.
- all: pretrain,grpo.

Everything a run learns goes under --out-dir (default out/<preset>): <stage>/ckpt.pt, metrics.jsonl,
summary.json, plots, report.md. --resume continues a killed run from its last checkpoint, bit-for-bit on CPU
(pretrain and grpo; the short SFT stages run again); a finished stage is reported, not re-run.

Real checkpoints: --init-from (and --teacher-from) take a Hugging Face folder (Llama, Qwen2, DeepSeek-V2/V3:
config.json + safetensors + tokenizer.json) as well as our checkpoints; the tokenizer then travels inside our
checkpoints, and --save-hf writes the last stage's model back out as such a folder. The qwen2.5-*-countdown
presets replay TinyZero's countdown run with the architecture in the preset, so --dry-run plans without weights.
"""
import contextlib
import dataclasses
import itertools
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import distill
import fused_loss
import grpo
from harness import (add_flags, all_reduce_sum, autocast, barrier, check_fields, check_finite, checkpoint, die,
                     encode_prompt, flags_named, load_checkpoint, load_policy, load_stage, meta_model,
                     open_stage, Parser, pick_device, print0, rank_world, rng_state, save_stage, set_rng_state,
                     setup_distributed, shard, sum_gradients)
from report import (MetricsLog, finish_grpo, finish_pretrain, rl_eval, rl_metrics, run_summary, sampled_eval,
                    stage_summary, val_loss)
from hf import ARCH_FIELDS, check_hf_config, is_hf_folder, save_hf
from model import ModelConfig, document_mask, fourier_number_init, lr_at
from moe import moe_load_stats, update_moe_biases
from rewards import rl_rewards
from rollouts import PartialRollouts, PromptSampler, dynamic_batch, training_shard
from sample import row_seed
from shard import build_model, check_fits, dry_run, gathered, load_model
from corpus import build_world, corpus_tokens
from tasks import UNDER_THINKER, TaskConfig, prefills_think, problems


@dataclass
class TrainConfig:
    preset: str = 'tiny'              # a key of PRESETS; flags override its values
    stage: str = 'all'                # pretrain | sft | grpo | rs | distill, a comma list of them, or all (= pretrain,grpo)
    out_dir: str = ''                 # where the run writes (default out/<preset>)
    device: str = ''                  # cuda | cpu (default: cuda when available)
    seed: int = 1337                  # every random choice derives from it
    resume: bool = False              # continue each stage from <out_dir>/<stage>/ckpt.pt
    overwrite: bool = False           # start a stage afresh even if its directory holds a checkpoint
    compile: bool = False             # torch.compile the model: pretraining, and RL's update (not under --fsdp)
    threads: int = 0                  # torch CPU threads (0: torch's default)
    save_hf: str = ''                 # after the last stage, write its model + tokenizer here as a Hugging Face folder
    # tokenizer and corpus
    bpe_merges: int = 100             # BPE merges learned on the corpus (beyond bytes and number tokens)
    corpus_arith_frac: float = 0.5    # share of corpus documents that are worked arithmetic
    corpus_check_frac: float = 0.1    # share of corpus documents that are drills of 'a vs b yes/no' checks
    n_train_problems: int = 1500      # countdown problems in the train split the corpus and RL draw from
    n_eval: int = 500                 # held-out problems per evaluation
    number_init: bool = True          # seed number-token embeddings with Fourier features of their value
    # pretraining
    pt_steps: int = 720               # optimizer steps
    pt_batch_size: int = 32           # sequences per micro-batch per rank
    pt_grad_accum: int = 1            # micro-batches per step per rank
    pt_lr: float = 3e-3               # peak learning rate (linear warmup, cosine decay)
    pt_min_lr_frac: float = 0.1       # cosine floor as a fraction of the peak
    pt_warmup: int = 50               # linear warmup steps
    pt_weight_decay: float = 0.1      # AdamW decay on matrices
    pt_grad_clip: float = 1.0         # global grad-norm clip (0: off)
    pt_eval_interval: int = 250       # steps between val-loss evaluations
    ckpt_interval: int = 250          # steps between checkpoints
    log_interval: int = 10            # pretraining steps between metrics lines (each costs one device sync)
    exit_after: int = 0               # testing aid: hard-exit (as a kill would) after this many steps; 0 = off
    # grpo (R1-Zero RL)
    init_from: str = ''               # checkpoint or HF folder the first stage after pretrain starts from (default <out_dir>/pretrain/ckpt.pt)
    rl_steps: int = 50                # RL iterations (one batch of rollouts and one optimizer step each, with mu=1)
    rl_prompts: int = 16              # prompts (groups) per iteration
    rl_group: int = 8                 # samples per prompt (G)
    rl_lr: float = 2e-4               # AdamW peak learning rate (after warmup: constant, or cosine to rl_min_lr_frac)
    rl_warmup: int = 10               # linear warmup iterations
    rl_min_lr_frac: float = 1.0       # cosine floor of the RL rate as a fraction of the peak (1: constant, as R1)
    rl_mu: int = 1                    # optimisation epochs over each batch (1: on-policy, rho == 1)
    rl_micro: int = 64                # rows per forward/backward micro-batch (longest rows first, each cut to fit)
    loss_type: str = 'grpo'           # grpo | bnpo | dapo | dr_grpo | kimi (grpo.py)
    loss_impl: str = 'auto'           # auto (Triton over the response logits on CUDA, chunked elsewhere) | chunked | triton | torch
    adv_scale: str = 'auto'           # auto | group | batch | none; auto: none for kimi and dr_grpo, group otherwise
    beta: float = 0.05                # k3 KL weight to the frozen initial policy (0: no reference model)
    eps_low: float = 0.2              # clip range below 1
    eps_high: float = 0.28            # clip range above 1 (DAPO clip-higher)
    tau: float = 1.0                  # Kimi's KL temperature (loss_type kimi)
    temperature: float = 0.7          # rollout temperature (the trained policy is the model at this temperature)
    max_new_tokens: int = 176         # response budget per rollout
    format_weight: float = 0.0        # weight of the strict format reward added to the accuracy reward
    repeat_weight: float = 0.0        # penalty per share of CoT attempts that repeat an earlier one
    length_weight: float = 0.0        # Kimi k1.5 length reward weight (sec 2.3.3), within each group of G
    lang_weight: float = 0.0          # R1's language consistency reward weight (sec 2.3.2): share of the CoT in digits
    overlong_buffer: int = 0          # DAPO soft overlong punishment over the last N tokens of the budget (0: off)
    mask_truncated: bool = False      # DAPO overlong filtering: truncated responses get no loss
    dynamic_sampling: bool = False    # DAPO: drop groups whose rewards are all equal, refill (tiny: ~2.3x rollouts)
    dynamic_rounds: int = 3           # dynamic sampling: most rollout rounds per iteration (DAPO's generation cap)
    rl_grad_clip: float = 1.0         # grad-norm clip
    rl_eval_interval: int = 25        # iterations between held-out greedy evaluations (report.rl_eval)
    n_eval_subset: int = 0            # held-out problems of those evaluations (0: all; the whole split at 0 and the end)
    pass_k: int = 8                   # k of the final sampled pass@k
    # Kimi k1.5 sampling strategies (sec 2.3.4), partial rollouts (2.6.2): rollouts.PromptSampler, PartialRollouts
    prompt_sampling: str = 'uniform'  # uniform | curriculum (easy to hard by solve_rate) | prioritized (~ 1 - success)
    curriculum_frac: float = 0.5      # curriculum: share of rl_steps over which the draw window grows to the whole pool
    curriculum_start: float = 0.1     # curriculum: share of the pool (the easiest) drawn from at step 0
    prio_prior: float = 0.5           # prioritized: success rate assumed for a problem not yet tried
    prio_floor: float = 0.05          # prioritized: least weight of a problem, so none has probability 0
    rollout_budget: int = 0           # partial rollouts: new tokens per trajectory per iteration (0: off)
    rollout_buffer: int = 0           # partial rollouts: most groups in flight (0: 2 * rl_prompts)
    repeat_stop: float = 0.0          # stop a rollout once this share of its 4-grams repeat (0: off)
    # the R1 pipeline's other stages (distill.py): sft (cold start), rs (rejection sampling), distill
    sft_examples: int = 400           # sft: readable cold-start traces (corpus.cold_start_trace), one per train problem
    sft_steps: int = 100              # optimizer steps of each SFT stage (sft, rs, distill)
    sft_batch_size: int = 16          # examples per SFT step
    sft_lr: float = 5e-4              # peak SFT learning rate (warmup over 10% of the steps, then cosine)
    rs_problems: int = 500            # rs, distill: train problems to sample from
    rs_samples: int = 4               # rs, distill: samples per problem; only correct ones are kept
    rs_temperature: float = 1.0       # rs, distill: sampling temperature
    rs_general: int = 100             # rs: general (non-reasoning) samples added: worked arithmetic
    rs_filter_mixed: bool = True      # rs, distill: drop correct samples whose CoT mixes in number words (R1 sec 2.3.3)
    rs_base: str = ''                 # rs: the model to SFT (default <out_dir>/pretrain/ckpt.pt: R1 SFTs the base)
    teacher_from: str = ''            # distill: the teacher's checkpoint or Hugging Face folder
    distill_mode: str = 'sft'         # distill: sft (R1 sec 2.4) | logits (SFT + kd_weight * KL to the teacher)
    kd_weight: float = 1.0            # distill logits: weight of the KL term
    kd_temperature: float = 1.0       # distill logits: softmax temperature of both models (the KL is scaled by its square)
    # sharding under torchrun (shard.py: FSDP2, the memory plan; harness.py: distributed checkpoints)
    fsdp: bool = False                # shard weights, grads, AdamW, frozen reference over ranks (FSDP2 per block), any stage
    hsdp: int = 0                     # --fsdp on a 2-D mesh: this many replicas (nodes), each sharding over world/hsdp
    activation_checkpointing: bool = False  # recompute each block's activations in backward instead of keeping them
    dry_run: bool = False             # print the per-rank memory plan of these settings and exit; allocates nothing
    world_size: int = 0               # --dry-run: ranks to plan for (0: $WORLD_SIZE, else 1)
    plan_gib: float = 0.0             # --dry-run: GiB per rank to plan against (0: the GPU's own; none on a CPU)

    def __post_init__(self):
        """Every field's range and the choices, checked before any work starts: one line naming the flag."""
        check_fields(self, POSITIVE, FRACTIONS, CHOICES)
        grpo.advantage_scale(self.loss_type, self.adv_scale)   # kimi and dr_grpo take no std scaling
        if self.rl_group < 2:
            raise ValueError(f"--rl-group must be >= 2: a group of one has no baseline, got {self.rl_group}")
        if self.corpus_arith_frac + self.corpus_check_frac > 1:
            raise ValueError("--corpus-arith-frac + --corpus-check-frac must be <= 1")
        if self.overlong_buffer > self.max_new_tokens:
            raise ValueError(f"--overlong-buffer {self.overlong_buffer} > --max-new-tokens {self.max_new_tokens}")
        if self.n_eval_subset < 0:
            raise ValueError(f"--n-eval-subset must be >= 0 (0: the whole split), got {self.n_eval_subset}")
        if self.rl_prompts > self.n_train_problems:
            raise ValueError(f"--rl-prompts {self.rl_prompts} > --n-train-problems {self.n_train_problems}")


POSITIVE = {'pt_steps', 'pt_batch_size', 'pt_grad_accum', 'pt_lr', 'pt_eval_interval', 'ckpt_interval', 'log_interval',
            'n_train_problems', 'n_eval', 'rl_steps', 'rl_prompts', 'rl_group', 'rl_lr', 'rl_mu', 'rl_micro', 'tau',
            'temperature', 'max_new_tokens', 'dynamic_rounds', 'rl_grad_clip', 'rl_eval_interval',
            'pass_k', 'sft_examples', 'sft_steps', 'sft_batch_size', 'sft_lr', 'rs_problems', 'rs_samples', 'rs_temperature', 'kd_temperature'}
FRACTIONS = {'corpus_arith_frac', 'corpus_check_frac', 'pt_min_lr_frac', 'rl_min_lr_frac', 'eps_low', 'curriculum_frac',
             'curriculum_start', 'prio_prior', 'prio_floor', 'repeat_stop'}
CHOICES = {'loss_type': grpo.LOSS_TYPES, 'adv_scale': grpo.ADVANTAGE_SCALE_CHOICES,
           'loss_impl': fused_loss.IMPLS + ('chunked',), 'prompt_sampling': ('uniform', 'curriculum', 'prioritized'),
           'distill_mode': ('sft', 'logits')}


DENSE = dict(attn='gqa', ffn='dense')
# the tiny world (issue 15): under-thinking writers who re-check (RL lengthens the search, as in R1-Zero), DAPO's refill
# (most groups of a 9% base say nothing), 25 steps with the rate falling to a tenth, all 500 problems every 5 steps;
# 1,080 pretraining steps: after 720 the MLA bases still miscopied the prompt's numbers (EXPERIMENTS.md cp, pt1080)
TINY_WORLD = dict(**UNDER_THINKER, dynamic_sampling=True, pt_steps=1080, rl_steps=25, rl_warmup=5, rl_min_lr_frac=0.1,
                  rl_eval_interval=5, pass_k=4)
PRESETS = {
    # every model default: DeepSeek-V3's architecture at ~0.9M active params, MLA (latent cache in rollouts) +
    # DeepSeekMoE (8 routed top-2, one shared, first layer dense), in the tiny world (README; EXPERIMENTS.md t4)
    'tiny': dict(TINY_WORLD),
    'tiny-dense': dict(**DENSE, **TINY_WORLD),   # the same world on a dense MHA/SwiGLU model (0.98M): the comparison
    'tiny-walk': dict(),   # TaskConfig's defaults: writers who walk past their hits; RL shortens the CoT (final8)
    # the CPU test suite's preset: seconds, learns nothing
    'test': dict(**DENSE, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, bpe_merges=20, pt_steps=6, pt_batch_size=4,
                 pt_eval_interval=3, ckpt_interval=3, n_eval=8, n_train_problems=200, rl_steps=4, rl_prompts=2,
                 rl_group=4, rl_eval_interval=2, n_eval_subset=4, max_new_tokens=24, pass_k=2, temperature=1.0),
    # one GPU: a wider, deeper model, the walk-past world
    'small': dict(**DENSE, n_layer=8, n_head=8, n_kv_head=4, n_embd=384, pt_steps=3000, pt_batch_size=64, pt_lr=1e-3),
    # the R1 pipeline (tiny-dense's model, walk-past world, CoTs mixing digits and number words): cold-start SFT,
    # RL with the language consistency reward, rejection sampling + SFT of the base, RL again
    'tiny-r1': dict(**DENSE, stage='pretrain,sft,grpo,rs,grpo', words_frac=0.2, sft_steps=120,
                    rl_steps=40, rl_eval_interval=20, lang_weight=0.2, rs_problems=400, rs_temperature=0.7),
    # R1 sec 2.4: a dense student (2 layers, d=96) on tiny's corpus (the same tokenizer), SFT on tiny's correct samples
    'tiny-distill': dict(**DENSE, **UNDER_THINKER, stage='pretrain,distill', teacher_from='out/tiny/grpo/ckpt.pt',
                         n_layer=2, n_embd=96, rs_problems=800, rs_temperature=0.7, sft_steps=200),
}
# R1-Zero from a real checkpoint: TinyZero's countdown replay, RL straight on a Qwen2.5 base with its task
# distribution and base-model prompt (<think> prefilled; --template chat for an -Instruct model). The architecture
# is Qwen2.5's config.json, so --dry-run sizes a run without the weights; --init-from must hold that model.
# Sources: TinyZero (github.com/Jiayi-Pan/TinyZero, scripts/train_tiny_zero*.sh on verl): lr 1e-6, k3 KL 0.001,
# 256 prompt + 1024 response tokens (block_size), temperature 1.0, clip 0.2, GRPO 128 prompts x 5 (the 3B
# preset), 0.1 for a formatted wrong answer (format_weight); its README: the 0.5B base "fails to learn
# reasoning". nano-aha-moment (github.com/McGill-NLP/nano-aha-moment, nano_r1_script.py): 1000 iterations of 16
# prompts x 4 (the 0.5B preset), KL 0.001, grad clip 1.0, no weight decay, tokens summed / all response tokens
# ('dapo'), format reward 1.0, a 500-problem test split. Ours: no warmup and no dynamic sampling (neither has
# them), eval and checkpoint every 50 steps, 20,000 train problems, rl_micro sized for one H100/H200. Known
# differences: AdamW betas (0.9, 0.99) (nano-aha-moment 0.999); one update per batch (verl makes several).
QWEN25 = dict(attn='gqa', ffn='dense', attn_bias=True, tie_embeddings=True, vocab_size=151936, rope_theta=1e6,
              norm_eps=1e-6, block_size=1280)
TINYZERO_COUNTDOWN = dict(stage='grpo', task='tinyzero', template='tinyzero', n_numbers=4, min_numbers=3, lo=1,
                          hi=100, max_target=100, n_train_problems=20000, n_eval=500, rl_steps=1000, rl_lr=1e-6,
                          rl_warmup=0, beta=0.001, temperature=1.0, max_new_tokens=1024, loss_type='dapo',
                          eps_low=0.2, eps_high=0.2, rl_eval_interval=50, ckpt_interval=50)
PRESETS.update({
    # one GPU: nano-aha-moment's batch (16 prompts x 4) and reward
    'qwen2.5-0.5b-countdown': dict(**QWEN25, **TINYZERO_COUNTDOWN, n_layer=24, n_embd=896, n_head=14, n_kv_head=2,
                                   intermediate_size=4864, rl_prompts=16, rl_group=4, rl_micro=8, format_weight=1.0),
    # 8 GPUs (torchrun --nproc_per_node 8): TinyZero's GRPO batch (128 prompts x 5) and reward
    'qwen2.5-3b-countdown': dict(**QWEN25, **TINYZERO_COUNTDOWN, n_layer=36, n_embd=2048, n_head=16, n_kv_head=2,
                                 intermediate_size=11008, rl_prompts=128, rl_group=5, rl_micro=4, format_weight=0.1),
})
CONFIG_CLASSES = (TrainConfig, TaskConfig, ModelConfig)


# -----------------------------------------------------------------------------
# config plumbing: dataclass fields -> argparse flags (harness.add_flags) -> resolved, checked configs

def parse_args(argv=None):
    p = Parser(description="nanoR1: R1-Zero / Kimi k1.5 reasoning RL on a tiny DeepSeek-style model")
    add_flags(p, CONFIG_CLASSES)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    preset = given.get('preset', TrainConfig.preset)
    if preset not in PRESETS:
        die(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return resolve({**PRESETS[preset], **given})


def resolve(values):
    """dict of overrides -> (TrainConfig, TaskConfig, ModelConfig), each checked before any work starts."""
    out = []
    for cls in CONFIG_CLASSES:
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            out.append(cls(**{k: v for k, v in values.items() if k in names}))
        except (ValueError, TypeError, ZeroDivisionError) as e:   # name the flags, not the fields
            die(flags_named(str(e), names))
    tc, _, mc = out
    parse_stages(tc.stage)   # one-line error on an unknown stage name
    if tc.max_new_tokens >= mc.block_size:
        die(f"--max-new-tokens {tc.max_new_tokens} leaves no room for the prompt in --block-size {mc.block_size}")
    tc.out_dir = tc.out_dir or os.path.join('out', tc.preset)
    if os.path.exists(tc.out_dir) and not os.path.isdir(tc.out_dir):
        die(f"--out-dir {tc.out_dir} exists and is a file, not a directory")
    if is_hf_folder(tc.init_from):   # the model the preset or flags describe must be the folder's (reads config.json)
        try:
            check_hf_config(tc.init_from, {k: v for k, v in values.items() if k in ARCH_FIELDS})
        except ValueError as e:
            die(str(e))
    if tc.save_hf and os.path.isfile(os.path.join(tc.save_hf, 'config.json')) and not tc.overwrite:
        die(f"--save-hf {tc.save_hf} already holds a model: pass --overwrite to replace it")
    return tuple(out)


# -----------------------------------------------------------------------------
# stage: pretrain

def pretrain(tc, task_cfg, mc, rank, world, device):
    t0 = time.time()
    stage_dir = os.path.join(tc.out_dir, 'pretrain')
    ck = open_stage(tc, task_cfg, stage_dir, tc.pt_steps, mc)
    if ck == 'done':
        return print0(f"pretrain: finished already ({stage_dir}/summary.json)")
    if ck is not None and ck.get('global_batch', None) not in (None, tc.pt_batch_size * tc.pt_grad_accum * world):
        die(f"--resume {stage_dir}/ckpt.pt: its global batch is {ck['global_batch']} sequences, these settings give "
            f"{tc.pt_batch_size * tc.pt_grad_accum * world} (--pt-batch-size x --pt-grad-accum x ranks); keep it")
    cd_train, ar_train, tok = build_world(tc.seed, tc.n_train_problems, task_cfg, tc.bpe_merges,
                                          tc.corpus_arith_frac, tc.corpus_check_frac)
    mc = dataclasses.replace(mc, vocab_size=tok.n_vocab)
    # one process: GPT(mc) after the seed; --fsdp: the same init, built sharded so no rank holds the whole model
    model = build_model(mc, device, tc.seed, tc.fsdp, tc.hsdp, tc.activation_checkpointing, fresh=ck is None,
                        embed_init=(lambda emb: fourier_number_init(emb, tok.number_ids())) if tc.number_init else None)
    opt = torch.optim.AdamW(model.optim_groups(tc.pt_weight_decay), lr=tc.pt_lr, betas=(0.9, 0.95),
                            fused=device.startswith('cuda'))
    start = 0
    if ck is not None:
        if ck['tokenizer'] != tok.to_dict():
            die(f"--resume {stage_dir}/ckpt.pt: its tokenizer differs from the one these settings build")
        load_stage(os.path.join(stage_dir, 'ckpt.pt'), ck, model, opt)   # DCP reshards from any world size
        start = ck['step']
        set_rng_state(ck['rng'])
        print0(f"resumed from {stage_dir}/ckpt.pt at step {start}")
    raw = model
    if world > 1 and not tc.fsdp:
        model = torch.nn.parallel.DistributedDataParallel(model)
    fwd = torch.compile(model) if tc.compile else model

    T, micro = mc.block_size, tc.pt_batch_size
    per_step = micro * tc.pt_grad_accum * world   # sequences in one global batch
    # the whole run's data is a pure function of the seed, so a resumed run sees exactly the same batches
    data, val = [torch.tensor(corpus_tokens(seed, task_cfg, tok, cd_train, ar_train, n * (T + 1), tc.corpus_arith_frac,
                                            tc.corpus_check_frac)).view(n, T + 1)            # (n, T + 1) packed rows
                 for n, seed in ((per_step * tc.pt_steps, tc.seed + 1), (64, tc.seed + 2))]
    log = MetricsLog(os.path.join(stage_dir, 'metrics.jsonl'), start - 1 if start else None) if rank == 0 else None
    print0(f"pretrain: {raw.num_params():,} params, vocab {tok.n_vocab}, {tc.pt_steps} steps x "
           f"{per_step} x {T} tokens, device {device}, world {world}")
    loss_f = float('nan')
    bar = tqdm(range(start, tc.pt_steps), initial=start, total=tc.pt_steps, desc='pretrain', disable=rank != 0,
               mininterval=2)
    tstep = time.time()
    for step in bar:
        lr = lr_at(step, tc.pt_steps, tc.pt_warmup, tc.pt_lr, tc.pt_min_lr_frac)
        for g in opt.param_groups:
            g['lr'] = lr
        batch = data[step * per_step:(step + 1) * per_step]
        loss_acc = torch.zeros((), device=device)
        for m in range(tc.pt_grad_accum):
            # rank r takes micro-batches [r*A, (r+1)*A) of the global batch: the union over ranks is the same
            # global batch a single process with A*world micro-batches would see
            j = rank * tc.pt_grad_accum + m
            xy = batch[j * micro:(j + 1) * micro].to(device)
            last = m == tc.pt_grad_accum - 1   # FSDP reduce-scatters every micro-batch: its grads stay sharded
            ctx = model.no_sync() if world > 1 and not tc.fsdp and not last else contextlib.nullcontext()
            with ctx, autocast(device):
                _, loss = fwd(xy[:, :-1], xy[:, 1:], mask=document_mask(xy[:, :-1], tok.bos))
                (loss / tc.pt_grad_accum).backward()
            loss_acc += loss.detach() / tc.pt_grad_accum
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.pt_grad_clip or float('inf'))
        if step % tc.log_interval == 0 or (step + 1) % tc.ckpt_interval == 0 or step == tc.pt_steps - 1:
            check_finite(step, loss=loss_acc, grad_norm=gnorm)   # a sync: only where we log or save anyway
        opt.step()
        opt.zero_grad(set_to_none=True)
        if mc.ffn == 'moe':
            update_moe_biases(raw)   # DeepSeek-V3's aux-loss-free balancing: after every optimizer step
        if world > 1:
            dist.all_reduce(loss_acc, op=dist.ReduceOp.AVG)
        if step % tc.log_interval == 0 or step == tc.pt_steps - 1:
            loss_f = loss_acc.item()
            dt = (time.time() - tstep) / (tc.log_interval if step else 1)
            tstep = time.time()
            row = {'step': step, 'loss': loss_f, 'lr': lr, 'tok_per_s': per_step * T / max(dt, 1e-9),
                   'grad_norm': float(gnorm)}
            if mc.ffn == 'moe':
                row['moe_max_over_mean'] = moe_load_stats(raw)['moe/max_over_mean']
            if mc.mtp_depth > 0 and raw.mtp_loss is not None:
                row['mtp_loss'] = raw.mtp_loss.item()
            if step % tc.pt_eval_interval == 0 or step == tc.pt_steps - 1:
                row['val_loss'] = val_loss(raw, val, device, tok.bos)
            if log:
                log.log(**row)
            bar.set_postfix(loss=f"{loss_f:.3f}")
        if (step + 1) % tc.ckpt_interval == 0 or step == tc.pt_steps - 1:   # rank 0's file, or every rank's shards
            save_stage(os.path.join(stage_dir, 'ckpt.pt'), raw, opt, checkpoint(raw, tok, tc, task_cfg, step + 1,
                                                                                rng=rng_state(), global_batch=per_step))
        if tc.exit_after and step + 1 == tc.exit_after:
            barrier()   # rank 0's checkpoint is on disk before any rank dies
            os._exit(3)
    bar.close()
    finish_pretrain(tc, task_cfg, raw, tok, val, device, loss_f, stage_dir, t0)


# -----------------------------------------------------------------------------
# stage: grpo (R1-Zero: RL straight on the base with rule rewards)

def grpo_stage(tc, task_cfg, device, name='grpo', init=''):
    """R1-Zero's RL (DeepSeek-R1 sec 2.2): GRPO on the base with rule rewards, no critic, no reward model.
    Under torchrun every rank runs these lines on the same global batch: it generates and trains its shard of
    the groups (`shard`), and the collectives (harness) make the result that of one process."""
    t0 = time.time()
    rank, world = rank_world()
    stage_dir = os.path.join(tc.out_dir, name)   # grpo, or grpo2, ... in a pipeline
    ck = open_stage(tc, task_cfg, stage_dir, tc.rl_steps)
    if ck == 'done':
        return print0(f"{name}: finished already ({stage_dir}/summary.json)")
    init = init or tc.init_from or os.path.join(tc.out_dir, 'pretrain', 'ckpt.pt')
    model, tok, _ = load_model(init, device, tc)   # --fsdp: sharded, as is the frozen reference
    ref = load_model(init, device, tc, frozen=True)[0] if tc.beta > 0 else None
    cd_train = problems('countdown', 'train', tc.n_train_problems, tc.seed, task_cfg)
    cd_test = problems('countdown', 'test', tc.n_eval, tc.seed, task_cfg)
    opt = torch.optim.AdamW(model.optim_groups(0.0), lr=tc.rl_lr, betas=(0.9, 0.99), fused=device.startswith('cuda'))
    try:  # Kimi k1.5's prompt sampling and partial rollouts; their state is checkpointed too
        sampler = PromptSampler(cd_train, tc.prompt_sampling, tc.seed + 11, tc.rl_steps, tc.curriculum_frac,
                                tc.curriculum_start, tc.prio_prior, tc.prio_floor)
        rollouts = PartialRollouts(tc.rl_group, tc.max_new_tokens, tc.rl_prompts, tc.rollout_budget,
                                   tc.rollout_buffer, tc.repeat_stop)
    except ValueError as e:
        die(str(e))
    start, rows = 0, []
    if ck is not None:
        load_checkpoint(os.path.join(stage_dir, 'ckpt.pt'), model.config)
        load_stage(os.path.join(stage_dir, 'ckpt.pt'), ck, model, opt)
        start, rows = ck['step'], ck['rows']
        set_rng_state(ck['rng'])
        sampler.load_state_dict(ck['sampler'])
        rollouts.load_state_dict(ck['rollouts'])
        print0(f"resumed {name} from {stage_dir}/ckpt.pt at step {start}")
    log, samples = [MetricsLog(os.path.join(stage_dir, f), start or None) if rank == 0 else None   # one writer
                    for f in ('metrics.jsonl', 'samples.jsonl')]
    G, tmpl = tc.rl_group, task_cfg.template
    encode = lambda i: encode_prompt(tok, cd_train[i], tmpl)   # noqa: E731
    adv_scale = grpo.advantage_scale(tc.loss_type, tc.adv_scale)
    print0(f"{name}: {tc.rl_steps} steps x {tc.rl_prompts} prompts x G={G}, loss {tc.loss_type}, advantages "
           f"{adv_scale}, beta {tc.beta}")
    print0(grpo.LOSS_NEAR_ZERO_NOTE)
    if start == 0:   # the base, on the whole held-out split: greedy, and sampled as finish_grpo samples the final
        rows.append({'step': 0, **rl_eval(model, tok, cd_test, tc, tmpl, 0),
                     **sampled_eval(model, tok, cd_test, tc, tmpl, forced=task_cfg.rechecks)[0]})
        if log:
            log.log(**rows[-1])
        print0(f"step 0: held-out greedy pass@1 {rows[0]['eval_pass@1']:.3f}, mean tokens {rows[0]['eval_mean_tokens']:.1f}")
    impl = fused_loss.trainer_impl(tc.loss_impl, device, tc.fsdp)   # 'chunked' off CUDA: no logits exist
    compiled = {m: torch.compile(m, dynamic=True) for m in (model, ref) if m is not None and tc.compile and not tc.fsdp}
    if tc.compile and tc.fsdp:   # TrainShard.response: a compiled forward's head runs outside it, unsharded
        print0(f"--compile: {name}'s update stays eager with --fsdp (compiled, its head runs outside the forward)")
    bar = tqdm(range(start, tc.rl_steps), initial=start, total=tc.rl_steps, desc=name, mininterval=2,
               disable=rank != 0)
    for step in bar:
        ts = time.time()
        lr = lr_at(step, tc.rl_steps, max(1, tc.rl_warmup), tc.rl_lr, tc.rl_min_lr_frac)
        for g in opt.param_groups:
            g['lr'] = lr
        # 1. rollouts from the current policy (the "old" policy of the ratio), scored by rule checks of the text
        #    (R1 sec 2.2.2: no reward model); dynamic sampling refills dropped zero-variance groups. Every rank
        #    draws the same prompts, generates its share of the groups (a seed per row) and all-gathers them
        rounds = itertools.count()

        def roll(n):   # gathered: under --fsdp every rank may decode a different number of tokens
            with autocast(device), gathered(model):
                return rollouts.step(model, lambda k: sampler.draw(k, step), encode, tok.stop_ids, tok.pad,
                                     temperature=tc.temperature, seed=row_seed(tc.seed + 7, step, next(rounds)),
                                     version=step, n_groups=n)

        def score(b):
            texts = [tok.decode(r) for r in b.responses]
            reward, terms = rl_rewards(texts, [cd_train[i] for i in b.ids for _ in range(G)], b.lengths.tolist(),
                                       G, tc.max_new_tokens, tc.format_weight, tc.repeat_weight, tc.length_weight,
                                       tc.lang_weight, tc.overlong_buffer, prefilled_think=prefills_think(tmpl))
            sampler.update(b.ids, terms['accuracy'].view(-1, G).mean(1).tolist())
            return reward, terms, texts
        batch, reward, terms, texts, seen = dynamic_batch(roll, score, G, tc.rl_prompts, tok.pad,
                                                          tc.dynamic_rounds if tc.dynamic_sampling else 1)
        # 2. advantages: the group's mean is the baseline, no critic (DeepSeekMath sec 4.1.2), over the kept batch
        A = grpo.group_advantages(reward, G, adv_scale)                                      # (N,)
        trained = batch.gen.mask                                                              # (N, L) 1 = trained
        if tc.mask_truncated:   # DAPO's overlong filtering: a cut-off answer says nothing about its reasoning
            trained = trained * batch.gen.finished[:, None]
        N = len(reward)
        n_tok = trained.sum().clamp(min=1).to(device)   # tokens in the loss (1 when DAPO's filter left none: a zero loss)
        # 3. this rank's rows: a contiguous shard of whole groups, prompt + response as one sequence, in
        #    micro-batches (every rank runs as many as the fullest one: rollouts.training_shard)
        tb = training_shard(batch, trained, A, G, shard(len(batch.ids)), world, tc.rl_micro, tok.pad, device,
                            model.config.block_size)                                          # (n, P + L) rows
        # every loss returns its micro-batch's share of the global batch's loss, normalised by global counts, and
        # the ranks' gradients are summed (harness.sum_gradients). Dr.GRPO's normaliser is the requested batch (a
        # constant: dropped groups must not reweight the rest). bnpo is by definition a token mean over each
        # rank's own batch (TRL's), so its sum over ranks takes 1/world: the mean of the ranks' means
        norm = dict(batch_rows=max(N, tc.rl_prompts * G) if tc.loss_type == 'dr_grpo' else N,
                    batch_tokens=tb.mask.sum().clamp(min=1) * world, global_tokens=n_tok, max_len=tc.max_new_tokens)

        def response_out(m, sl, L):   # at the rollout temperature (the policy that sampled): the final hidden
            with autocast(device):     # states (b, L, C) for the chunked loss, else the response logits (b, L, V)
                return tb.response(m, sl, L, impl == 'chunked', compiled.get(m)) / tc.temperature

        # 4. old (mu > 1 only: with mu = 1 the policy is its own old policy, rho == 1) and reference logprobs
        with torch.no_grad():
            old, ref_lp = [[fused_loss.response_logprobs(response_out(m, sl, L), m.lm_head.weight, tb.resp[sl, :L],
                                                         impl) for sl, L, _ in tb.micro] if m is not None else None
                           for m in (model if tc.rl_mu > 1 else None, ref)]   # [(b, L)] a micro-batch
        # 5. the policy update: mu epochs over the batch, micro-batch losses summed into one gradient
        for epoch in range(tc.rl_mu):
            stats = {}
            for i, (sl, L, w) in enumerate(tb.micro):
                loss, met = fused_loss.response_loss(
                    response_out(model, sl, L), model.lm_head.weight, tb.resp[sl, :L], None if old is None else old[i],
                    None if ref_lp is None else ref_lp[i], tb.A[sl], tb.mask[sl, :L], impl, loss_type=tc.loss_type,
                    beta=tc.beta, eps_low=tc.eps_low, eps_high=tc.eps_high, tau=tc.tau, **norm)
                (loss * w).backward()
                share = w * tb.mask[sl].sum() / n_tok   # token means weigh by the micro-batch's tokens
                for k, v in {**met, 'loss': loss.detach()}.items():   # summed as tensors: one sync per step
                    stats[k] = stats.get(k, 0.0) + v * (w if k.endswith('loss') else share)
            sum_gradients(model)   # the global batch's gradient: the sum of the ranks' shares
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.rl_grad_clip)
            check_finite(step + 1, loss=stats['loss'], grad_norm=gnorm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if model.config.ffn == 'moe':
                update_moe_biases(model)
        stats = dict(zip(stats, all_reduce_sum(torch.stack([torch.as_tensor(v, device=device).float()
                                                            for v in stats.values()]))))   # the ranks' shares
        # 6. metrics: rewards over every rollout generated, lengths and losses over the trained batch; a held-out
        #    greedy evaluation every rl_eval_interval steps (a fixed subset; the whole split at the end)
        row = {'step': step + 1, **rl_metrics(seen, terms, batch, trained, G, cd_train),
               **{k: float(v) for k, v in stats.items()}, 'grad_norm': float(gnorm),
               'lr': lr, 'step_seconds': round(time.time() - ts, 3), **rl_eval(model, tok, cd_test, tc, tmpl, step + 1)}
        rows.append(row)
        bar.set_postfix(acc=f"{row['accuracy']:.2f}", len=f"{row['response_len']:.0f}",
                        eval=row.get('eval_sub_pass@1', ''))
        if rank == 0:   # one writer: the metrics line, a few raw rollouts
            log.log(**row)
            if step % 10 == 0:   # what the numbers above actually look like
                for r in range(0, len(texts), max(1, len(texts) // 4)):
                    samples.log(step=step + 1, prompt=tok.decode(batch.contexts[r]), reward=float(reward[r]),
                                response=texts[r])
        if (step + 1) % tc.ckpt_interval == 0 or step + 1 == tc.rl_steps:   # rank 0's file, or every rank's shards
            save_stage(os.path.join(stage_dir, 'ckpt.pt'), model, opt, checkpoint(
                model, tok, tc, task_cfg, step + 1, rng=rng_state(), rows=rows, sampler=sampler.state_dict(),
                rollouts=rollouts.state_dict()))
        if tc.exit_after and step + 1 == tc.exit_after:
            barrier()   # rank 0's checkpoint is on disk before any rank dies
            os._exit(3)
    bar.close()
    finish_grpo(tc, task_cfg, model, tok, rows, cd_test, stage_dir, t0)


# -----------------------------------------------------------------------------
# the pipeline

STAGES = ('pretrain', 'sft', 'grpo', 'rs', 'distill')   # --stage all = pretrain,grpo


def parse_stages(stage):
    """'pretrain,sft,grpo,rs,grpo' -> [(stage, its directory)]: a repeated stage writes grpo2, grpo3, ..."""
    names = ['pretrain', 'grpo'] if stage == 'all' else [s.strip() for s in stage.split(',')]
    for s in names:
        if s not in STAGES:
            die(f"unknown stage {s!r}; choose from {list(STAGES)}, 'all', or a comma-separated list such as "
                "pretrain,sft,grpo,rs,grpo")
    if names.count('pretrain') > 1:
        die("pretrain can appear once in a pipeline (it always writes <out_dir>/pretrain)")
    dirs = [s if names[:i].count(s) == 0 else f"{s}{names[:i].count(s) + 1}" for i, s in enumerate(names)]
    return list(zip(names, dirs))


def main(argv=None):
    tc, task_cfg, mc = parse_args(argv)
    print0(json.dumps({**dataclasses.asdict(tc), **dataclasses.asdict(task_cfg), **mc.to_dict()}))
    if tc.dry_run:   # sized without loading: resolve reads at most --init-from's config.json, never a weight
        dry_run(tc, task_cfg, mc)
        return print0(json.dumps({'dry_run': True, 'params': meta_model(mc).num_params(), 'init_from': tc.init_from
                                  or None, 'stages': [d for _, d in parse_stages(tc.stage)]}))
    owns_group = not dist.is_initialized()   # long2short rl calls main inside its own process group
    rank, world, local = setup_distributed()
    device = pick_device(tc.device, local)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if device.startswith('cuda'):
        torch.set_float32_matmul_precision('high')   # TF32 for what runs outside bf16 autocast
    t0 = time.time()
    pipeline = parse_stages(tc.stage)
    if tc.fsdp and not dist.is_initialized():
        die("--fsdp shards over the ranks of torchrun: torchrun --nproc_per_node=N train.py --fsdp ...")
    if tc.fsdp and tc.loss_impl == 'chunked':
        die("--loss-impl chunked reads the output head outside the forward, where --fsdp holds 1/N of it: drop one")
    check_fits(tc, task_cfg, mc)   # before any weight is read: a run too big for the machine stops here
    for s, d in pipeline:   # before any work: no stage may silently replace a checkpoint
        if not tc.resume and not tc.overwrite and os.path.isfile(os.path.join(tc.out_dir, d, 'ckpt.pt')):
            die(f"{os.path.join(tc.out_dir, d, 'ckpt.pt')} exists: pass --resume to continue the run or --overwrite "
                "to start it over")
    prev, stages = tc.init_from, {}   # --init-from: where the first stage that loads a model starts
    for s, d in pipeline:
        ts = time.time()
        print0(f"=== stage {d} ({s})" + (f", from {prev}" if prev and s != 'pretrain' else ''))
        if s == 'pretrain':
            pretrain(tc, task_cfg, mc, rank, world, device)
        elif s == 'grpo':
            grpo_stage(tc, task_cfg, device, name=d, init=prev)
        else:
            {'sft': distill.sft_stage, 'rs': distill.rs_stage, 'distill': distill.distill_stage}[s](
                tc, task_cfg, device, d, prev)
        prev = os.path.join(tc.out_dir, d, 'ckpt.pt')
        if rank == 0:
            stages[d] = stage_summary(tc, d, time.time() - ts)
        barrier()   # rank 0 has written the stage's checkpoint before any rank loads it for the next one
    if tc.save_hf and rank == 0:   # the last stage's model, for transformers, vLLM or an evaluation elsewhere
        model, tok, ck = load_policy(prev, 'cpu')
        save_hf(model, tok, tc.save_hf, ck)
        print0(f"wrote {tc.save_hf}: {prev} as a Hugging Face folder")
    if rank == 0:
        run_summary(tc.out_dir, stages, time.time() - t0)
    if world > 1 and owns_group:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
