"""
Benchmarks, one function per name, each with its own flags:

    python bench.py list
    python bench.py grpo_loss [--device cuda|cpu] [--n-tokens 16384] [--vocab 151936] [--dtype bf16] ...
    python bench.py mla_decode [--device cuda|cpu] [--batch 128] [--seqlen 4096] [--heads 16] [--layout paged] ...
    python bench.py model [--device cuda|cpu] [--presets tiny,tiny-dense] [--threads 1]
    python bench.py loss_hidden [--n-tokens 2048] [--vocab 32768] [--hidden 512] [--dtype fp32] ...
    python bench.py rollout [--dims tiny-dense,small] [--temps 0.7,0] [--threads 1] ...
    python bench.py grpo_step [--dims tiny-dense] [--threads 1] ...
    python bench.py rl_update [--preset tiny] [--min-len 28] [--max-len 176] [--threads 2] ...
    python bench.py gpu [--preset small] [--pt-steps 200]     # the one-GPU suite: everything below that needs a GPU

The kernels' benchmarks (grpo_loss, loss_hidden, mla_decode) and the measuring tools are in bench_kernels.py;
here, what a training run costs end to end.

model: what a preset's model costs end to end, with random weights: pretraining tokens/s (forward + backward +
AdamW on pt_batch_size x block_size) and rollout tokens/s (sample.generate, 128 rows, a 24-token prompt, 160 new
tokens at temperature 0.7, no early stop), one line per preset: the figures behind the tiny presets' choices.
rl_update: RL's update (forward, the loss from the hidden states, backward, AdamW) on responses whose lengths
spread as the tiny run's do, in micro-batches as wide as the batch against rollouts.training_shard's plan (rows
longest first, each micro-batch cut to its own longest row), interleaved, s/update.

Against the peers, each in one run with ours, timed in interleaved rounds (medians) so a shared machine's load
falls on both, each skipped when the peer is not installed:
rollout: sample.group_rollouts vs transformers' generate on the same weights (a dense model through
hf.save_pretrained and AutoModelForCausalLM), 16 prompts x G = 8, tokens/s, the ratio, and for greedy the share
of rows equal to transformers' tokens; beside them the decode step's roofline floors on this machine (`decode_floor`:
separate kernels in sequence, and one perfectly fused step) and each side's ms per step (prefill included).
grpo_step: one GRPO step as train.py takes it (rollouts, rewards, the loss from the hidden states, AdamW) vs TRL's
GRPOTrainer on the same weights, tokenizer (one word per id), prompts, reward and settings (mu = 1, beta = 0,
loss 'grpo', temperature 0.7, 160 new tokens, micro-batches of train.py's --rl-micro rows), s/step; our step
runs between TRL's steps; `--compile ours` compiles our update's forward as `train.py --compile` does.

gpu: what only a GPU shows, in one command (a few minutes on one H100/H200): pretraining tokens/s and MFU of
--preset small in one process and under FSDP2 (torchrun, one rank), a few GRPO steps' time and CUDA peak memory
next to the --dry-run plan of the same settings, the presets' rollout tokens/s (`model`), the kernels' tables and
the GRPO steps again under --compile; the figures in <out>/gpu.json. `--device cpu` makes it a smoke run of the
same code.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from bench_kernels import device_of, grpo_loss, loss_hidden, mla_decode, time_interleaved, time_ms
from fused_loss import loss_from_hidden
from grpo import group_advantages
from harness import load_policy
from hf import save_pretrained
from model import GPT, ModelConfig
from report import write_json
from rollouts import RolloutBatch, TrainShard, training_shard
from sample import Generation, generate, group_rollouts, sequences_for_training
from shard import memory_plan, prompt_bound
from train import PRESETS, TrainConfig, resolve


# -----------------------------------------------------------------------------

def model(argv):
    """a preset's model, random weights: pretraining tokens/s and rollout (cached sampling) tokens/s"""
    p = argparse.ArgumentParser(prog='bench.py model', description=model.__doc__)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help="cuda or cpu")
    p.add_argument('--presets', default='tiny,tiny-dense', help="comma-separated train.py presets")
    p.add_argument('--vocab', type=int, default=1024, help="vocabulary size (the tiny tokenizer's is ~1,000)")
    p.add_argument('--rows', type=int, default=128, help="rollout rows (16 prompts x G = 8 in the tiny presets)")
    p.add_argument('--new-tokens', type=int, default=160, help="sampled tokens per row")
    p.add_argument('--threads', type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument('--iters', type=int, default=5, help="timed repetitions, median reported")
    args = p.parse_args(argv)
    device, gpu = device_of(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(dict(vars(args), torch_threads=torch.get_num_threads())))
    print(f"{'preset':14s} {'params':>10s} {'train tok/s':>12s} {'rollout tok/s':>14s} {'ms/decode step':>15s}")
    for name in args.presets.split(','):
        if name not in PRESETS:
            sys.exit(f"error: unknown preset {name!r}, expected one of {sorted(PRESETS)}")
        tc, _, mc = resolve({**PRESETS[name], 'preset': name, 'vocab_size': args.vocab})
        torch.manual_seed(0)
        m = GPT(mc).to(device)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        x = torch.randint(0, args.vocab, (tc.pt_batch_size, mc.block_size + 1), device=device)

        def train_step():
            loss = m(x[:, :-1], targets=x[:, 1:])[1]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        t_train = time_ms(train_step, device, 1, args.iters)
        m.eval()
        prompts = torch.randint(1, args.vocab, (args.rows, 24)).tolist()
        gen = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            t_gen = time_ms(lambda: generate(m, prompts, args.new_tokens, set(), 0, temperature=0.7,
                                             generator=gen), device, 1, args.iters)
        print(f"{name:14s} {m.num_params():>10,} {x[:, 1:].numel() / t_train * 1e3:>12,.0f} "
              f"{args.rows * args.new_tokens / t_gen * 1e3:>14,.0f} {t_gen / args.new_tokens:>15.1f}")


# -----------------------------------------------------------------------------
# against the peers: transformers' generate and TRL's GRPOTrainer, on the same weights (a dense model, exported
# with hf.save_pretrained and loaded by AutoModelForCausalLM)

DIMS = {'tiny-dense': dict(n_layer=4, n_head=4, n_kv_head=4, n_embd=128),
        'small': dict(n_layer=8, n_head=8, n_kv_head=4, n_embd=384)}


def _dense_pair(dims, vocab, block_size, device, tmp):
    """Our dense GQA model with random weights and its transformers twin (None when transformers is missing)."""
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=vocab, block_size=block_size, attn='gqa', ffn='dense', **DIMS[dims])).to(device)
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return m.eval(), None
    save_pretrained(m, tmp)
    hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(device)
    with torch.no_grad():   # the same weights: the same logits
        x = torch.randint(0, vocab, (2, 16), device=device)
        assert torch.allclose(m(x)[0], hf(x).logits, atol=1e-4), "the transformers twin disagrees"
    return m.eval(), hf.eval()


def machine_rates(device):
    """What this CPU can do at best, one measurement each: an fp32 matmul's FLOP/s (2,048 cubed, the best of 3)
    and the bytes/s of streaming a 256 MB tensor through a sum (the best of 3): the roofline's two slopes."""
    a, b, x = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device), \
        torch.randn(2 ** 26, device=device)
    mm = min(time_ms(lambda: a @ b, device, 1, 1) for _ in range(3))
    rd = min(time_ms(lambda: x.sum(), device, 1, 1) for _ in range(3))
    return 2 * 2048 ** 3 / mm * 1e3, x.numel() * 4 / rd * 1e3


def decode_cost(m, rows, keys):
    """
    (FLOPs, bytes) of one decode step of our dense model when each of `rows` rows attends to `keys` cached
    positions: the matmuls (every linear layer's weight once per row, lm_head included; each head's scores and
    weighted sum over the keys), and what the step must read: every weight once, and each layer's fp32 keys and
    values of every row (tests/test_bench.py holds both to torch's FLOP counter and to the cache's bytes).
    """
    c = m.config
    weights = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    flops = 2 * rows * (weights + 2 * c.n_layer * c.n_head * keys * c.head_dim)
    kv = 2 * c.n_layer * rows * c.n_kv_head * keys * c.head_dim * 4
    return flops, kv + 4 * weights


def decode_floor(m, rows, prompt_len, new_tokens, flops_per_s, bytes_per_s):
    """
    Lower bounds on one decode step (ms), the roofline way (Williams et al. 2009), at the mean number of cached
    keys over the rollout's decode steps: (serial, fused). serial adds the step's FLOPs at the machine's best matmul
    rate to its bytes at the streaming rate: eager kernels run one after another, each bound by one or the other.
    fused takes the larger of the two: a step whose kernels overlap compute with memory traffic perfectly. No
    kernel beats the second; no sequence of separate kernels beats the first.
    """
    flops, nbytes = decode_cost(m, rows, prompt_len + new_tokens / 2)
    compute, memory = 1e3 * flops / flops_per_s, 1e3 * nbytes / bytes_per_s
    return compute + memory, max(compute, memory)


def rollout(argv):
    """rollouts: sample.group_rollouts vs transformers generate on the same weights: tokens/s and the ratio"""
    p = argparse.ArgumentParser(prog='bench.py rollout', description=rollout.__doc__)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help="cuda or cpu")
    p.add_argument('--dims', default='tiny-dense,small', help=f"comma-separated model dims, of {sorted(DIMS)}")
    p.add_argument('--vocab', type=int, default=1024, help="vocabulary size")
    p.add_argument('--prompts', type=int, default=16, help="distinct prompts")
    p.add_argument('--group', type=int, default=8, help="G samples per prompt (rows = prompts x G)")
    p.add_argument('--prompt-len', type=int, default=24, help="prompt tokens")
    p.add_argument('--new-tokens', type=int, default=160, help="sampled tokens per row (no stop token)")
    p.add_argument('--temps', default='0.7,0', help="comma-separated temperatures (0 = greedy)")
    p.add_argument('--threads', type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument('--iters', type=int, default=3, help="timed rounds (interleaved), median reported")
    args = p.parse_args(argv)
    device, gpu = device_of(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    fps, bps = machine_rates(device)
    print(json.dumps(dict(vars(args), torch_threads=torch.get_num_threads(), matmul_gflops=round(fps / 1e9, 1),
                          stream_gb_per_s=round(bps / 1e9, 2))))
    B, L = args.prompts * args.group, args.prompt_len + args.new_tokens
    print(f"{'dims':11s} {'T':>4s} {'ours tok/s':>11s} {'HF tok/s':>9s} {'ours/HF':>8s}  ms per step: {'serial':>6s} "
          f"{'fused':>6s} {'ours':>6s} {'HF':>6s}  {'HF/serial':>9s}  greedy rows equal to HF's")
    for dims in args.dims.split(','):
        with tempfile.TemporaryDirectory() as tmp:
            m, hf = _dense_pair(dims, args.vocab, L, device, tmp)
        prompts = torch.randint(1, args.vocab, (args.prompts, args.prompt_len)).tolist()
        x = torch.tensor(prompts, device=device).repeat_interleave(args.group, 0)          # (B, P) G rows each
        for temp in map(float, args.temps.split(',')):
            gen = torch.Generator(device=device).manual_seed(0)
            ours = lambda: group_rollouts(m, prompts, args.group, args.new_tokens, set(), 0,  # noqa: E731
                                          temperature=temp, generator=gen)
            fns = {'ours': ours}
            if hf is not None:
                sampling = dict(do_sample=True, temperature=temp, top_k=0, top_p=1.0) if temp else dict(do_sample=False)
                fns['hf'] = lambda: hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens,
                                                min_new_tokens=args.new_tokens, pad_token_id=0, **sampling)
            with torch.no_grad():
                ms = time_interleaved(fns, device, 1, args.iters)
                same = (fns['hf']()[:, args.prompt_len:] == ours().tokens).all(1).float().mean().item() \
                    if hf is not None and not temp else float('nan')
            tps = {k: B * args.new_tokens / v * 1e3 for k, v in ms.items()}
            step = {k: v / args.new_tokens for k, v in ms.items()}                  # ms per decode step
            serial, fused = decode_floor(m, B, args.prompt_len, args.new_tokens, fps, bps)
            print(f"{dims:11s} {temp:4.1f} {tps['ours']:11,.0f} {tps.get('hf', float('nan')):9,.0f} "
                  f"{tps.get('hf') and tps['ours'] / tps['hf'] or float('nan'):8.2f}  {'':13s}{serial:6.2f} "
                  f"{fused:6.2f} {step['ours']:6.2f} {step.get('hf', float('nan')):6.2f}  "
                  f"{step.get('hf', float('nan')) / serial:9.2f}  {'' if same != same else f'{same:.0%}'}")
    if hf is None:
        print("transformers not installed: its generate is skipped (pip install transformers)")


def update(m, opt, tb, temperature, compiled=None):
    """train.py's policy update (mu = 1, beta = 0, loss 'grpo') over a TrainShard's micro-batches, from the hidden
    states: each micro-batch's share of the mean over the shard's rows, summed into one gradient, clip, AdamW."""
    for sl, width, w in tb.micro:
        h = tb.response(m, sl, width, True, compiled)                                      # (micro, width, C)
        loss, _ = loss_from_hidden(h / temperature, m.lm_head.weight, tb.resp[sl, :width], None, None, tb.A[sl],
                                   tb.mask[sl, :width], loss_type='grpo', batch_rows=len(tb.A))
        (loss * w).backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def grpo_step(argv):
    """one GRPO step (rollouts, rewards, loss, AdamW) vs TRL's GRPOTrainer on the same weights, s/step"""
    p = argparse.ArgumentParser(prog='bench.py grpo_step', description=grpo_step.__doc__)
    p.add_argument('--dims', default='tiny-dense', help=f"model dims, one of {sorted(DIMS)}")
    p.add_argument('--vocab', type=int, default=1024, help="vocabulary size")
    p.add_argument('--prompts', type=int, default=16, help="prompts per step")
    p.add_argument('--group', type=int, default=8, help="G samples per prompt")
    p.add_argument('--prompt-len', type=int, default=24, help="prompt tokens")
    p.add_argument('--new-tokens', type=int, default=160, help="sampled tokens per row (no stop token)")
    p.add_argument('--temperature', type=float, default=0.7, help="rollout temperature")
    p.add_argument('--micro', type=int, default=TrainConfig.rl_micro,
                   help="rows per forward/backward micro-batch, both sides (train.py's --rl-micro; TRL's "
                        "per_device_train_batch_size, with gradient accumulation over the step's rows)")
    p.add_argument('--compile', choices=('none', 'ours', 'both'), default='none',
                   help="torch.compile the training forward: ours (train.py --compile), or both (and TRL's "
                        "torch_compile=True, which compiles the model its generate runs too)")
    p.add_argument('--threads', type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument('--iters', type=int, default=3, help="timed steps of each (interleaved), median reported")
    args = p.parse_args(argv)
    if args.prompts * args.group % args.micro:
        raise SystemExit(f"--micro {args.micro} must divide the step's {args.prompts * args.group} rows")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(dict(vars(args), torch_threads=torch.get_num_threads())))
    device, V, G, T = torch.device('cpu'), args.vocab, args.group, args.temperature
    prompts = torch.randint(2, V, (args.prompts, args.prompt_len)).tolist()
    rows = [q for q in prompts for _ in range(G)]

    def reward(text):   # a plain function of the text, the same for both: the share of even token ids
        words = text.split()
        return sum(int(w[1:]) % 2 == 0 for w in words) / max(1, len(words))

    with tempfile.TemporaryDirectory() as tmp:
        m, hf = _dense_pair(args.dims, V, args.prompt_len + args.new_tokens, device, tmp)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-6)
    gen = torch.Generator().manual_seed(0)
    compiled = torch.compile(m, dynamic=True) if args.compile != 'none' else None   # compiled in the warm-up step

    def ours():
        """What train.py's GRPO step does (mu = 1, beta = 0, loss 'grpo'), with the loss from the hidden states."""
        m.eval()
        g = group_rollouts(m, prompts, G, args.new_tokens, set(), 0, temperature=T, generator=gen)
        texts = [' '.join(f't{i}' for i in r[:int(n)]) for r, n in zip(g.tokens.tolist(), g.lengths)]
        A = group_advantages(torch.tensor([reward(t) for t in texts]), G)
        tb = TrainShard(*sequences_for_training(rows, g, 0, device), g.tokens, g.mask, A,
                        [(slice(a, a + args.micro), args.new_tokens, 1.0) for a in range(0, len(rows), args.micro)])
        m.train()
        update(m, opt, tb, T, compiled)

    times = {'ours': [], 'trl': []}
    try:
        from trl import GRPOConfig, GRPOTrainer
        from datasets import Dataset
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast, TrainerCallback
    except ImportError as e:
        print(f"TRL not usable here ({e}): only ours is timed (pip install trl)")
        for _ in range(args.iters + 1):
            times['ours'].append(time_ms(ours, device, 0, 1))
    else:
        # token id i is the word t{i}: prompts and completions are the same ids on both sides
        tk = Tokenizer(models.WordLevel({f't{i}': i for i in range(V)}, unk_token='t0'))
        tk.pre_tokenizer, tk.decoder = pre_tokenizers.WhitespaceSplit(), decoders.WordPiece(prefix='##')
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token='t0', eos_token='t1', unk_token='t0')
        data = Dataset.from_dict({'prompt': [' '.join(f't{i}' for i in q) for q in prompts] * (args.iters + 1)})

        class Interleave(TrainerCallback):   # time TRL's step, then run and time ours, and so on
            def on_step_begin(self, *a, **kw):
                self.t0 = time.perf_counter()

            def on_step_end(self, *a, **kw):
                times['trl'].append(1e3 * (time.perf_counter() - self.t0))
                times['ours'].append(time_ms(ours, device, 0, 1))

        # one optimizer step over the len(rows) rows, generated at once, in micro-batches of args.micro rows
        cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.micro,
                         gradient_accumulation_steps=len(rows) // args.micro, num_generations=G,
                         max_completion_length=args.new_tokens, generation_kwargs={'min_new_tokens': args.new_tokens},
                         temperature=T, top_k=0, top_p=1.0, beta=0.0, loss_type='grpo', learning_rate=1e-6,
                         max_steps=args.iters + 1, shuffle_dataset=False, save_strategy='no', report_to='none',
                         use_cpu=True, bf16=False, disable_tqdm=True, logging_steps=10 ** 6, seed=0,
                         torch_compile=args.compile == 'both')
        GRPOTrainer(model=hf, reward_funcs=lambda completions, **kw: [reward(c) for c in completions], args=cfg,
                    train_dataset=data, processing_class=tok, callbacks=[Interleave()]).train()
    med = {k: statistics.median(v[1:]) / 1e3 for k, v in times.items() if len(v) > 1}   # the first is warm-up
    print(f"{args.dims}: {len(rows)} rows x {args.new_tokens} tokens after {args.prompt_len}; s/step, median of "
          f"{args.iters} after one warm-up: " + ', '.join(f"{k} {v:.2f}" for k, v in med.items()) +
          (f"; TRL / ours = {med['trl'] / med['ours']:.2f}" if 'trl' in med else ''))


def rl_update(argv):
    """RL's update on spread response lengths: micro-batches as wide as the batch vs longest first, each cut"""
    p = argparse.ArgumentParser(prog='bench.py rl_update', description=rl_update.__doc__)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help="cuda or cpu")
    p.add_argument('--preset', default='tiny', help="train.py preset: its model, rl_prompts, rl_group, rl_micro")
    p.add_argument('--vocab', type=int, default=1024, help="vocabulary size")
    p.add_argument('--prompt-len', type=int, default=16, help="prompt tokens (the tiny world's)")
    p.add_argument('--min-len', type=int, default=28, help="shortest response (uniform in [min, max] per row)")
    p.add_argument('--max-len', type=int, default=176, help="longest response (the tiny run's budget)")
    p.add_argument('--threads', type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument('--iters', type=int, default=5, help="timed updates of each (interleaved), median reported")
    args = p.parse_args(argv)
    device, _ = device_of(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.preset not in PRESETS:
        sys.exit(f"error: unknown preset {args.preset!r}, expected one of {sorted(PRESETS)}")
    tc, _, mc = resolve({**PRESETS[args.preset], 'preset': args.preset, 'vocab_size': args.vocab})
    if not 1 <= args.min_len <= args.max_len or args.prompt_len + args.max_len > mc.block_size:
        sys.exit(f"error: need 1 <= --min-len <= --max-len and --prompt-len + --max-len <= {mc.block_size}")
    print(json.dumps(dict(vars(args), torch_threads=torch.get_num_threads(), rl_micro=tc.rl_micro)))
    torch.manual_seed(0)
    m = GPT(mc).to(device).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-6)
    G, N, L = tc.rl_group, tc.rl_prompts * tc.rl_group, args.max_len
    prompts = [q for q in torch.randint(2, args.vocab, (tc.rl_prompts, args.prompt_len)).tolist() for _ in range(G)]
    lengths = torch.randint(args.min_len, L + 1, (N,))
    mask = (torch.arange(L) < lengths[:, None]).float()                                  # (N, L)
    gen = Generation(torch.randint(2, args.vocab, (N, L)) * mask.long(), torch.zeros(N, L), mask, lengths,
                     lengths < L)
    batch = RolloutBatch(list(range(tc.rl_prompts)), prompts, gen, [[]] * N, lengths, torch.zeros(N, dtype=torch.bool),
                         [], 0, 0)
    A = torch.randn(N)
    plans = {'full width': TrainShard(*sequences_for_training(prompts, gen, 0, device), gen.tokens.to(device),
                                      mask.to(device), A.to(device),
                                      [(slice(i, i + tc.rl_micro), L, 1.0) for i in range(0, N, tc.rl_micro)]),
             'longest first, cut': training_shard(batch, mask, A, G, slice(0, tc.rl_prompts), 1, tc.rl_micro, 0,
                                                  device, mc.block_size)}

    ms = time_interleaved({k: (lambda tb=tb: update(m, opt, tb, tc.temperature)) for k, tb in plans.items()},
                          device, 1, args.iters)
    cut = plans['longest first, cut']
    print(f"{args.preset}: {N} rows, responses {args.min_len}-{L} tokens after {args.prompt_len}, micro-batches of "
          f"{tc.rl_micro} (widths {[w for _, w, _ in cut.micro]}); s/update, median of {args.iters}: " +
          ', '.join(f"{k} {v / 1e3:.3f}" for k, v in ms.items()) +
          f"; ratio {ms['full width'] / ms['longest first, cut']:.2f}")


# -----------------------------------------------------------------------------
# the one-GPU suite: what only a GPU can show, in one command that runs in a few minutes

# dense bf16 tensor-core peak FLOP/s from the vendor sheets, matched against torch.cuda.get_device_name() in order
BF16_PEAK = [('H100 PCIe', 756e12), ('H100', 989e12), ('H200', 989e12), ('A100', 312e12)]


def train_flops_per_token(model):
    """Training FLOPs per token of `model` at its block_size (the MFU numerator; Chowdhery et al. 2022, PaLM,
    appendix B): 6 per weight of a matmul the token passes through (forward 2, backward 4), so a routed expert's
    weights count top_k / n_routed_experts times and the embedding gather not at all unless it is the tied head,
    plus attention's scores and weighted sums, 6 * T * n_head * (qk head dim + v head dim) per layer."""
    c = model.config
    n = 0.0
    for name, p in model.named_parameters():   # a tied weight appears once, under its first name
        if p.dim() < 2 or (name == 'embed_tokens.weight' and not c.tie_embeddings):
            continue
        n += p.numel() * (c.num_experts_per_tok / c.n_routed_experts if '.experts.' in name else 1)
    dqk, dv = ((c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim) if c.attn == 'mla'
               else (c.head_dim, c.head_dim))
    return 6 * n + 6 * c.n_layer * c.block_size * c.n_head * (dqk + dv)


def _run(cmd, log):
    """Run a command, its output into `log`; a failure is one line naming the log, not a traceback here."""
    with open(log, 'w') as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed ({p.returncode}); see {log}")


def _metrics(path):
    return [json.loads(line) for line in open(path)]


def gpu(argv):
    """the one-GPU suite: MFU (plain and FSDP2), a GRPO step's time and peak memory vs --dry-run, rollout tok/s, kernels"""
    p = argparse.ArgumentParser(prog='bench.py gpu', description=gpu.__doc__)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help="cuda (cpu: a smoke run)")
    p.add_argument('--preset', default='small', help="train.py preset to pretrain and run GRPO with")
    p.add_argument('--pt-steps', type=int, default=200, help="pretraining steps per run (MFU: the median after 1/4)")
    p.add_argument('--rl-steps', type=int, default=3, help="GRPO steps (time and peak memory)")
    p.add_argument('--n-eval', type=int, default=64, help="held-out problems the GRPO run evaluates")
    p.add_argument('--out', default='out/bench-gpu', help="where the runs write; the figures go to <out>/gpu.json")
    p.add_argument('--kernels', default='grpo_loss,mla_decode,loss_hidden', help="kernel benchmarks to run after")
    args = p.parse_args(argv)
    device, is_gpu = device_of(args.device)
    name = torch.cuda.get_device_name(device) if is_gpu else 'cpu'
    peak = next((f for key, f in BF16_PEAK if key in name), None)
    print(json.dumps(dict(vars(args), device_name=name, bf16_peak_flops=peak)))
    os.makedirs(args.out, exist_ok=True)
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1']
    common = ['train.py', '--preset', args.preset, '--device', device.type, '--overwrite']
    out = {'device': name, 'torch': torch.__version__, 'preset': args.preset}
    # 1. pretraining throughput in one process and under FSDP2 (fully_shard over 1 rank: its overhead alone)
    for mode, extra in (('plain', []), ('fsdp', ['--fsdp'])):
        d = os.path.join(args.out, mode)
        _run(torchrun + common + ['--stage', 'pretrain', '--pt-steps', str(args.pt_steps), '--log-interval', '10',
                                  '--pt-eval-interval', str(10 ** 6), '--out-dir', d] + extra, d + '.log')
        rows = [r for r in _metrics(os.path.join(d, 'pretrain', 'metrics.jsonl')) if r['step'] >= args.pt_steps // 4]
        tps = statistics.median(r['tok_per_s'] for r in rows)
        model_, _, _ = load_policy(os.path.join(d, 'pretrain', 'ckpt.pt'), 'cpu')
        fpt = train_flops_per_token(model_)
        out[f'pretrain_{mode}'] = {'tok_per_s': round(tps), 'flops_per_token': fpt,
                                   'mfu': round(tps * fpt / peak, 4) if peak else None}
        print(f"pretrain {mode:5s}: {tps:,.0f} tok/s, {fpt / 1e6:.1f} MFLOP/token, MFU "
              f"{out[f'pretrain_{mode}']['mfu']}")
    # 2. GRPO steps from that base: step time and CUDA peak memory, against the --dry-run plan of the same settings
    d = os.path.join(args.out, 'grpo')
    grpo_cmd = [sys.executable] + common + ['--stage', 'grpo', '--init-from', os.path.join(args.out, 'plain',
                'pretrain', 'ckpt.pt'), '--rl-steps', str(args.rl_steps), '--n-eval', str(args.n_eval), '--pass-k', '2']
    _run(grpo_cmd + ['--out-dir', d], d + '.log')
    rows = [r for r in _metrics(os.path.join(d, 'grpo', 'metrics.jsonl')) if 'step_seconds' in r]
    tc, task_cfg, mc = resolve({**PRESETS[args.preset], 'preset': args.preset, 'device': device.type,
                                'vocab_size': model_.config.vocab_size})
    with torch.device('meta'):
        planned = sum(b for b, _ in memory_plan(GPT(mc), tc, 1, device.type, prompt_bound(task_cfg)).values())
    measured = max((r.get('cuda_peak_gib') or 0) for r in rows)
    out['grpo'] = {'step_seconds': [r['step_seconds'] for r in rows], 'rollout_rows': tc.rl_prompts * tc.rl_group,
                   'cuda_peak_gib': measured or None, 'dry_run_plan_gib': round(planned / 2 ** 30, 3)}
    print(f"grpo: s/step {out['grpo']['step_seconds']}, CUDA peak {measured:.3f} GiB, --dry-run plan "
          f"{planned / 2 ** 30:.3f} GiB")
    write_json(os.path.join(args.out, 'gpu.json'), out)
    # 3. rollout tokens/s of the presets' models, then the kernels (each prints its own table)
    dev = ['--device', device.type]
    model(dev + ['--presets', f'tiny,tiny-dense,{args.preset}'] + ([] if is_gpu else ['--rows', '4', '--iters', '1']))
    for k in filter(None, args.kernels.split(',')):
        BENCHMARKS[k](dev + ([] if is_gpu else ['--iters', '1']))
    # 4. the GRPO steps again under --compile (last: a compiler failure costs no figure above); step 1 compiles
    d = os.path.join(args.out, 'grpo-compile')
    _run(grpo_cmd + ['--compile', '--out-dir', d], d + '.log')
    out['grpo_compile'] = {'step_seconds': [r['step_seconds'] for r in _metrics(os.path.join(d, 'grpo',
                                            'metrics.jsonl')) if 'step_seconds' in r]}
    print(f"grpo --compile: s/step {out['grpo_compile']['step_seconds']} (the first compiles)")
    write_json(os.path.join(args.out, 'gpu.json'), out)
    print(f"wrote {os.path.join(args.out, 'gpu.json')}")


BENCHMARKS = {'grpo_loss': grpo_loss, 'loss_hidden': loss_hidden, 'mla_decode': mla_decode, 'model': model,
              'rollout': rollout, 'grpo_step': grpo_step, 'rl_update': rl_update, 'gpu': gpu}


def main():
    if len(sys.argv) < 2 or sys.argv[1] in ('-h', '--help'):
        print(__doc__.strip())
        return
    name = sys.argv[1]
    if name == 'list':
        for key, fn in BENCHMARKS.items():
            print(f"{key:16s} {fn.__doc__.strip()}")
        return
    if name not in BENCHMARKS:
        sys.exit(f"error: unknown benchmark {name!r}, expected one of {sorted(BENCHMARKS)} (python bench.py list)")
    BENCHMARKS[name](sys.argv[2:])


if __name__ == '__main__':
    main()
