"""
The kernels' benchmarks (run through bench.py: `python bench.py grpo_loss ...`), and the measuring tools
every benchmark shares: median wall times (CUDA events on a GPU), interleaved rounds, peak memory (a
dispatch-mode tracker on the CPU, which has no max_memory_allocated), the HBM roofline.

grpo_loss: the GRPO loss from logits, forward + backward, and the log-probs alone (what the old and the reference
policy cost). On CUDA: ours (fused_loss.loss_from_logits, Triton) against the eager PyTorch reference
(policy_loss(token_logprobs(...))) and, when installed, Liger-Kernel's Triton GRPO loss; time, effective
bandwidth over the roofline bytes (the logits read twice and their gradient written once: 3 N V elements, 6 N V
bytes in bf16, the least a kernel that leaves the gradient to the backward can move), that as a share of the
HBM peak, and peak memory above the inputs (torch.cuda.max_memory_allocated). On CPU (the kernel needs a GPU;
its interpreter is for tests): the reference path token_logprobs (logsumexp) against a naive full log_softmax,
at a small shape, same columns, peak memory counted by a dispatch-mode tracker.

mla_decode: one decode step of absorbed MLA attention over the latent cache (mla.mla_decode), by default the
shape of FlashMLA's decode benchmark (github.com/deepseek-ai/FlashMLA: b=128, s_k=4096, h_q=16, d_c=512, d_R=64,
bf16, every row full). On CUDA: ours (Triton, split-K) on the contiguous and the paged (64-token pages, shuffled
table) cache, the PyTorch reference, and FlashMLA and FlashInfer's MLA decode when installed; bandwidth over the
bytes that must move: the cache read once (B s_k (d_c + d_R) elements) plus the queries, outputs and lse. On CPU: the reference alone, small shape.

loss_hidden: fused_loss.loss_from_hidden (no logits) vs the trainer's old path (logits = h W^T, loss_from_logits and
masked_entropy from them) vs Liger-Kernel's LigerFusedLinearGRPOLoss: fwd+bwd ms and peak memory, same loss and
gradients checked first.
"""
import argparse
import json
import statistics
import sys
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fused_loss import logprobs_from_logits, loss_from_hidden, loss_from_logits
from grpo import LOSS_TYPES, masked_entropy, policy_loss, token_logprobs
from mla import mla_decode_ref, mla_decode_triton

HBM_PEAK = [('H100 PCIe', 2.0e12), ('H100', 3.35e12), ('H200', 4.8e12), ('A100', 2.0e12), ('L40S', 0.864e12),
            ('4090', 1.008e12)]
DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}

# -----------------------------------------------------------------------------
# measuring


def time_ms(fn, device, warmup, iters):
    """Median wall time of fn() in ms, after warmup calls (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == 'cuda':
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def time_interleaved(fns, device, warmup, iters):
    """Median ms of each fn, timed round-robin (a, b, c, a, b, c, ...) so that the load of a shared machine falls
    on every contender alike. fns: {name: fn}; returns {name: ms}."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            times[name].append(time_ms(fn, device, 0, 1))
    return {name: statistics.median(t) for name, t in times.items()}


class CPUPeakMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages created while active (inputs made before do not count): every op's
    outputs are added when they appear and removed when their storage is freed. CPU has no max_memory_allocated."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = set(), 0, 0

    def _free(self, key, nbytes):
        self.live.discard(key)
        self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self.live:  # a view shares its base's storage: count it once
                    self.live.add(key)
                    self.now += nbytes
                    weakref.finalize(storage, self._free, key, nbytes)
        self.peak = max(self.peak, self.now)
        return out


def peak_bytes(fn, device):
    """Peak memory of one fn() call above what was allocated before it."""
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with CPUPeakMemory() as tracker:
        fn()
    return tracker.peak


def hbm_peak(device, override_tbs):
    if override_tbs:
        return override_tbs * 1e12
    if device.type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in HBM_PEAK if key in name), None)


def print_table(rows, peak_bw):
    """rows: (name, ms, roofline bytes, peak memory bytes)."""
    print(f"{'':44s} {'ms':>9s} {'GB/s':>8s} {'% HBM':>6s} {'peak mem GB':>12s}")
    for name, ms, nbytes, mem in rows:
        gbs = nbytes / (ms * 1e-3) / 1e9
        share = f"{100 * gbs * 1e9 / peak_bw:5.1f}%" if peak_bw else '   n/a'
        print(f"{name:44s} {ms:9.3f} {gbs:8.1f} {share:>6s} {mem / 1e9:12.3f}")


# -----------------------------------------------------------------------------
# benchmarks


def naive_token_logprobs(logits, tokens):
    """The textbook form: a full (B, T, V) fp32 log-softmax, then one entry per row."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)


def grpo_loss(argv):
    """fused GRPO loss from logits (Triton) vs eager PyTorch vs Liger-Kernel: fwd+bwd ms, GB/s, memory"""
    p = argparse.ArgumentParser(prog='bench.py grpo_loss', description=grpo_loss.__doc__)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help="cuda or cpu")
    p.add_argument('--n-tokens', type=int, default=None, help="N = B*T token rows (default 16384, CPU 512)")
    p.add_argument('--vocab', type=int, default=None, help="V (default 151936, Qwen2.5's; CPU 32768)")
    p.add_argument('--batch', type=int, default=16, help="B sequences; T = n_tokens // B")
    p.add_argument('--dtype', default='bf16', choices=DTYPES, help="logits dtype")
    p.add_argument('--loss-type', default='grpo', choices=LOSS_TYPES, help="aggregation")
    p.add_argument('--beta', type=float, default=0.04, help="KL weight (0: no reference model)")
    p.add_argument('--warmup', type=int, default=None, help="untimed calls first (default 3, CPU 1)")
    p.add_argument('--iters', type=int, default=None, help="timed calls, median reported (default 10, CPU 3)")
    p.add_argument('--hbm-tbs', type=float, default=None, help="HBM peak in TB/s, if the device is not known")
    p.add_argument('--seed', type=int, default=0, help="seed of the random inputs")
    args = p.parse_args(argv)
    device, gpu = device_of(args.device)
    N = args.n_tokens or (16384 if gpu else 512)
    V = args.vocab or (151936 if gpu else 32768)
    B = args.batch
    T = N // B
    if T < 1:
        sys.exit(f"error: --n-tokens {N} is smaller than --batch {B}")
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    iters = args.iters or (10 if gpu else 3)
    print(json.dumps(dict(vars(args), n_tokens=B * T, vocab=V, T=T, warmup=warmup, iters=iters)))

    # inputs: logits as the usual strided view logits[:, :-1] of the model's (B, T+1, V) output; an all-ones mask
    # so every row is read (masked rows would let a kernel skip work and blur the roofline)
    g = torch.Generator(device=device).manual_seed(args.seed)
    full = torch.randn(B, T + 1, V, generator=g, device=device, dtype=DTYPES[args.dtype])  # (B, T+1, V)
    logits = full[:, :-1]                                                                    # (B, T, V)
    tokens = torch.randint(0, V, (B, T), generator=g, device=device)                         # (B, T)
    with torch.no_grad():
        logp = logprobs_from_logits(logits, tokens)                                          # (B, T)
    old = logp + 0.1 * torch.randn(B, T, generator=g, device=device)
    ref = (logp + 0.1 * torch.randn(B, T, generator=g, device=device)) if args.beta else None
    adv = torch.randn(B, generator=g, device=device)
    mask = torch.ones(B, T, device=device)
    kw = dict(loss_type=args.loss_type, beta=args.beta, max_len=T, global_tokens=B * T)
    elem = full.element_size()

    def train_step(loss_fn):
        def step():
            x = logits.detach().requires_grad_()
            loss, _ = loss_fn(x)
            loss.backward()
        return step

    def logp_step(logp_fn):
        def step():
            with torch.no_grad():
                logp_fn(logits)
        return step

    # (name, fn, roofline bytes): fwd+bwd reads the logits twice and writes dlogits once; fwd-only reads once
    cases = []
    if gpu:
        cases += [
            ('loss fwd+bwd  ours (Triton)', train_step(
                lambda x: loss_from_logits(x, tokens, old, ref, adv, mask, impl='triton', **kw)), 3),
            ('loss fwd+bwd  torch eager (reference)', train_step(
                lambda x: loss_from_logits(x, tokens, old, ref, adv, mask, impl='torch', **kw)), 3),
            ('logprobs fwd  ours (Triton)', logp_step(lambda x: logprobs_from_logits(x, tokens, impl='triton')), 1),
            ('logprobs fwd  torch eager (reference)', logp_step(lambda x: token_logprobs(x, tokens)), 1),
        ]
    else:
        cases += [
            ('loss fwd+bwd  torch logsumexp (reference)', train_step(
                lambda x: policy_loss(token_logprobs(x, tokens), old, ref, adv, mask, **kw)), 3),
            ('loss fwd+bwd  torch naive log_softmax', train_step(
                lambda x: policy_loss(naive_token_logprobs(x, tokens), old, ref, adv, mask, **kw)), 3),
            ('logprobs fwd  torch logsumexp (reference)', logp_step(lambda x: token_logprobs(x, tokens)), 1),
            ('logprobs fwd  torch naive log_softmax', logp_step(lambda x: naive_token_logprobs(x, tokens)), 1),
        ]
    rows = [(name, time_ms(fn, device, warmup, iters), k * N * V * elem, peak_bytes(fn, device))
            for name, fn, k in cases]

    # the same loss by both paths, as a check that the timed code computes the same thing
    loss_ref, _ = loss_from_logits(logits, tokens, old, ref, adv, mask, impl='torch', **kw)
    print(f"loss: reference {loss_ref.item():.6f}", end='')
    if gpu:
        loss_ours, _ = loss_from_logits(logits, tokens, old, ref, adv, mask, impl='triton', **kw)
        print(f", ours {loss_ours.item():.6f}", end='')
        rows += liger_rows(full, tokens, old, ref, adv, mask, args, device, warmup, iters, N, V, elem)
    print()
    print(f"N = {N} tokens (B={B}, T={T}), V = {V}, {args.dtype} logits ({full.numel() * elem / 1e9:.2f} GB), "
          f"loss_type={args.loss_type}, beta={args.beta}, device: "
          f"{torch.cuda.get_device_name(device) if gpu else 'cpu'}; median of {iters}")
    print_table(rows, hbm_peak(device, args.hbm_tbs))
    if not gpu:
        print("ours (Triton) needs a GPU: run `python bench.py grpo_loss` on one")


def liger_rows(full, tokens, old, ref, adv, mask, args, device, warmup, iters, N, V, elem):
    """Liger-Kernel's Triton GRPO loss on the same inputs, if installed. It takes the model's (B, T+1, V) logits
    and by default writes the gradient into them (inplace=True); it returns per-token losses, reduced here with
    bnpo (its per-token term is ours: clipped surrogate + beta * k3). Runs last since it overwrites `full`."""
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except ImportError:
        print("\nliger_kernel not installed: its GRPO loss is skipped (pip install liger-kernel to compare)", end='')
        return []
    if args.loss_type != 'bnpo':
        print(f"\n(liger row reduced with bnpo, not {args.loss_type}: same bytes)", end='')

    def step():
        x = full.detach().requires_grad_()
        per_token = triton_grpo_loss(x, old, ref, tokens, adv, mask, temperature=1.0, beta=args.beta,
                                     eps_low=0.2, eps_high=0.2, inplace=True)[0]   # (B, T)
        ((per_token * mask).sum() / mask.sum()).backward()
    try:
        rows = [('loss fwd+bwd  liger_kernel triton_grpo_loss', time_ms(step, device, warmup, iters),
                 3 * N * V * elem, peak_bytes(step, device))]
    except Exception as e:  # an API change in the peer should not hide our own numbers
        print(f"\nliger_kernel's GRPO loss failed, skipped: {type(e).__name__}: {e}", end='')
        return []
    return rows


def loss_hidden(argv):
    """GRPO loss from hidden states (chunked, no logits) vs logits + loss_from_logits vs Liger's fused linear GRPO"""
    p = argparse.ArgumentParser(prog='bench.py loss_hidden', description=loss_hidden.__doc__)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help="cuda or cpu")
    p.add_argument('--n-tokens', type=int, default=2048, help="N = B*T token rows")
    p.add_argument('--vocab', type=int, default=32768, help="V")
    p.add_argument('--hidden', type=int, default=512, help="C, the hidden width")
    p.add_argument('--batch', type=int, default=16, help="B sequences; T = n_tokens // B")
    p.add_argument('--dtype', default='fp32', choices=DTYPES, help="hidden and weight dtype")
    p.add_argument('--beta', type=float, default=0.04, help="KL weight (0: no reference model)")
    p.add_argument('--chunk-rows', type=int, default=1024, help="ours: rows of the logits block")
    p.add_argument('--chunk-vocab', type=int, default=4096, help="ours: vocabulary columns of the logits block")
    p.add_argument('--warmup', type=int, default=1, help="untimed calls of each first")
    p.add_argument('--iters', type=int, default=5, help="timed rounds (interleaved), median reported")
    p.add_argument('--seed', type=int, default=0, help="seed of the random inputs")
    args = p.parse_args(argv)
    device, gpu = device_of(args.device)
    N, V, C, B = args.n_tokens, args.vocab, args.hidden, args.batch
    T = N // B
    print(json.dumps(dict(vars(args), T=T, torch_threads=torch.get_num_threads())))
    g = torch.Generator(device=device).manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    hidden = torch.randn(B, T, C, generator=g, device=device).to(dtype)                        # (B, T, C)
    W = (0.05 * torch.randn(V, C, generator=g, device=device)).to(dtype)                       # (V, C)
    tokens = torch.randint(0, V, (B, T), generator=g, device=device)                           # (B, T)
    with torch.no_grad():
        logp = token_logprobs(hidden @ W.T, tokens)                                            # (B, T)
    old = logp + 0.1 * torch.randn(B, T, generator=g, device=device)
    ref = (logp + 0.1 * torch.randn(B, T, generator=g, device=device)) if args.beta else None
    adv = torch.randn(B, generator=g, device=device)
    mask = torch.ones(B, T, device=device)   # every token trained: no path may skip masked rows here
    kw = dict(loss_type='grpo', beta=args.beta)

    def ours(h, w):
        return loss_from_hidden(h, w, tokens, old, ref, adv, mask, chunk_rows=args.chunk_rows,
                                chunk_vocab=args.chunk_vocab, **kw)[0]

    def today(h, w):   # what the trainer did: the logits, the loss from them, the entropy metric from them
        logits = h @ w.T                                                                       # (B, T, V)
        loss = loss_from_logits(logits, tokens, old, ref, adv, mask, **kw)[0]
        masked_entropy(logits.detach(), mask)
        return loss

    paths = {'ours loss_from_hidden (chunked)': ours, 'today: logits + loss_from_logits + entropy': today}
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        # its torch path on CPU; compiled=False: torch.compile would only touch its small per-token math
        liger = LigerFusedLinearGRPOLoss(beta=args.beta, compiled=False, use_ref_model=args.beta > 0,
                                         loss_type='grpo', epsilon_low=0.2, epsilon_high=0.2)
        paths['liger LigerFusedLinearGRPOLoss'] = lambda h, w: liger(
            h, w, tokens, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)[0]
    except ImportError:
        print("liger_kernel not installed: its fused linear GRPO loss is skipped (pip install liger-kernel)")

    def step(fn):
        def run():
            h, w = hidden.detach().requires_grad_(), W.detach().requires_grad_()
            fn(h, w).backward()
            return h.grad, w.grad
        return run

    # the same loss and gradients by every path, so a fast wrong number shows
    ref_loss = today(hidden, W).item()
    ref_grads = step(today)()
    for name, fn in paths.items():
        grads = step(fn)()
        d = max((a.float() - b.float()).abs().max().item() for a, b in zip(grads, ref_grads))
        print(f"{name:44s} loss {fn(hidden, W).item():.6f} (today {ref_loss:.6f}), max |d grad| {d:.1e}")
    fns = {name: step(fn) for name, fn in paths.items()}
    ms = time_interleaved(fns, device, args.warmup, args.iters)
    print(f"N = {N} (B={B}, T={T}), V = {V}, C = {C}, {args.dtype}, grpo, beta={args.beta}; fwd+bwd, median of "
          f"{args.iters} interleaved rounds; peak memory above the inputs; device: "
          f"{torch.cuda.get_device_name(device) if gpu else 'cpu'}")
    print(f"{'':44s} {'ms':>9s} {'peak mem MB':>12s}")
    for name, fn in fns.items():
        print(f"{name:44s} {ms[name]:9.1f} {peak_bytes(fn, device) / 2**20:12.1f}")


def mla_decode(argv):
    """MLA decode over the latent cache (Triton split-K) vs the torch reference vs FlashMLA / FlashInfer: ms, GB/s"""
    p = argparse.ArgumentParser(prog='bench.py mla_decode', description=mla_decode.__doc__)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help="cuda or cpu")
    p.add_argument('--batch', type=int, default=None, help="B rows decoding one token each (default 128, CPU 4)")
    p.add_argument('--seqlen', type=int, default=None, help="s_k cached tokens per row (default 4096, CPU 1024)")
    p.add_argument('--heads', type=int, default=16, help="h_q query heads sharing the one latent head")
    p.add_argument('--kv-lora-rank', type=int, default=512, help="d_c, the latent width (value width too)")
    p.add_argument('--rope-dim', type=int, default=64, help="d_R, qk_rope_head_dim")
    p.add_argument('--dtype', default='bf16', choices=DTYPES, help="queries and cache dtype")
    p.add_argument('--num-splits', type=int, default=None, help="splits per row for ours (default: heuristic)")
    p.add_argument('--warmup', type=int, default=None, help="untimed calls first (default 5, CPU 1)")
    p.add_argument('--iters', type=int, default=None, help="timed calls, median reported (default 20, CPU 3)")
    p.add_argument('--hbm-tbs', type=float, default=None, help="HBM peak in TB/s, if the device is not known")
    p.add_argument('--seed', type=int, default=0, help="seed of the random inputs")
    args = p.parse_args(argv)
    device, gpu = device_of(args.device)
    B = args.batch or (128 if gpu else 4)
    S = args.seqlen or (4096 if gpu else 1024)
    H, dc, dr, page = args.heads, args.kv_lora_rank, args.rope_dim, 64
    if S % page:
        sys.exit(f"error: --seqlen {S} must be a multiple of the page size {page}")
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    iters = args.iters or (20 if gpu else 3)
    scale = (128 + 64) ** -0.5  # DeepSeek-V3's 1/sqrt(qk_nope_head_dim + qk_rope_head_dim); any value will do
    print(json.dumps(dict(vars(args), batch=B, seqlen=S, warmup=warmup, iters=iters)))

    g = torch.Generator(device=device).manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    rand = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)  # noqa: E731
    q_nope, q_pe = rand(B, H, dc), rand(B, H, dr)                                 # (B, H, d_c), (B, H, d_R)
    kv, pe = rand(B, S, dc), rand(B, S, dr)                                       # (B, S, d_c), (B, S, d_R)
    lens = torch.full((B,), S, dtype=torch.int32, device=device)                  # (B,) every row full
    # the paged view of the same memory: pages in a shuffled order, so the table really redirects every read
    nb = S // page
    kv_pool, pe_pool = kv.view(B * nb, page, dc), pe.view(B * nb, page, dr)       # (B*nb, 64, d)
    perm = torch.randperm(B * nb, generator=g, device=device)
    table = perm.view(B, nb).to(torch.int32)                                      # (B, nb)
    elem = kv.element_size()
    nbytes = B * S * (dc + dr) * elem + B * H * (dc + dr) * elem + B * H * (dc * elem + 4)

    cases = [('torch reference (contiguous)', lambda: mla_decode_ref(q_nope, q_pe, kv, pe, lens, scale)),
             ('torch reference (paged)', lambda: mla_decode_ref(q_nope, q_pe, kv_pool, pe_pool, lens, scale, table))]
    if gpu:
        cases = [
            ('ours (Triton) contiguous', lambda: mla_decode_triton(q_nope, q_pe, kv, pe, lens, scale,
                                                                   num_splits=args.num_splits)),
            ('ours (Triton) paged', lambda: mla_decode_triton(q_nope, q_pe, kv_pool, pe_pool, lens, scale,
                                                              table, num_splits=args.num_splits)),
        ] + cases
        cases += mla_peer_cases(q_nope, q_pe, kv_pool, pe_pool, table, lens, scale, page)
    rows = [(name, time_ms(fn, device, warmup, iters), nbytes, peak_bytes(fn, device)) for name, fn in cases]
    if gpu:  # every fast path against the reference on the same layout, so a fast wrong number shows
        ref = {'contiguous': mla_decode_ref(q_nope, q_pe, kv, pe, lens, scale),
               'paged': mla_decode_ref(q_nope, q_pe, kv_pool, pe_pool, lens, scale, table)}
        for name, fn in cases:
            if name.startswith('torch'):
                continue
            out, lse = fn()
            ref_out, ref_lse = ref['contiguous' if 'contiguous' in name else 'paged']
            d_out = (out.reshape(B, H, dc).float() - ref_out.float()).abs().max().item()
            d_lse = (lse.reshape(B, H).float() - ref_lse).abs().max().item() if lse is not None else float('nan')
            print(f"vs reference: {name:44s} max |d out| {d_out:.2e}  max |d lse| {d_lse:.2e}")
    print(f"B = {B}, s_k = {S}, h_q = {H}, d_c = {dc}, d_R = {dr}, {args.dtype}; cache "
          f"{B * S * (dc + dr) * elem / 1e9:.3f} GB, bytes moved {nbytes / 1e9:.3f} GB; device: "
          f"{torch.cuda.get_device_name(device) if gpu else 'cpu'}; median of {iters}")
    print_table(rows, hbm_peak(device, args.hbm_tbs))
    if not gpu:
        print("ours (Triton) needs a GPU: run `python bench.py mla_decode` on one")


def mla_peer_cases(q_nope, q_pe, kv_pool, pe_pool, table, lens, scale, page):
    """(name, fn) for FlashMLA and FlashInfer's MLA decode on the same paged cache, those that are installed
    and accept the shape. FlashMLA wants q and the cache as [latent; rope] concatenations (copies made here,
    outside the timing); FlashInfer takes our separate pools with a CSR page list. fn returns (out, lse)."""
    B, H, dc = q_nope.shape
    dr = q_pe.shape[2]
    cases = []
    try:
        from flash_mla import flash_mla_with_kvcache, get_mla_metadata
        q = torch.cat([q_nope, q_pe], dim=-1).unsqueeze(1)                        # (B, 1, H, d_c+d_R)
        kcache = torch.cat([kv_pool, pe_pool], dim=-1).unsqueeze(2)               # (blocks, 64, 1, d_c+d_R)
        # the old API takes (seqlens, s_q * h_q // h_k, h_k); the new one ignores its arguments
        meta, splits = get_mla_metadata(lens, H, 1)
        fn = lambda: flash_mla_with_kvcache(q, kcache, table, lens, dc, meta, splits,  # noqa: E731
                                            softmax_scale=scale, causal=False)
        fn()
        cases.append(('FlashMLA flash_mla_with_kvcache', fn))
    except ImportError:
        print("flash_mla not installed: FlashMLA is skipped (Hopper+; build it from deepseek-ai/FlashMLA)")
    except Exception as e:  # an API change or an unsupported shape in the peer should not hide our numbers
        print(f"FlashMLA failed, skipped: {type(e).__name__}: {e}")
    try:
        import flashinfer
        wrapper = flashinfer.mla.BatchMLAPagedAttentionWrapper(
            torch.empty(128 * 1024 * 1024, dtype=torch.int8, device=q_nope.device))
        ar = torch.arange(B + 1, dtype=torch.int32, device=q_nope.device)
        wrapper.plan(ar, ar * table.shape[1], table.flatten(), lens, H, dc, dr, page, False, scale,
                     q_nope.dtype, kv_pool.dtype)
        fn = lambda: wrapper.run(q_nope, q_pe, kv_pool, pe_pool, return_lse=True)  # noqa: E731
        fn()
        cases.append(('FlashInfer BatchMLAPagedAttentionWrapper', fn))
    except ImportError:
        print("flashinfer not installed: its MLA decode is skipped (pip install flashinfer-python to compare)")
    except Exception as e:
        print(f"FlashInfer MLA failed, skipped: {type(e).__name__}: {e}")
    return cases


def device_of(name):
    """torch.device and whether it is a GPU, with a one-line error when CUDA is asked for and missing."""
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        sys.exit("error: --device cuda but CUDA is not available (try --device cpu)")
    return device, device.type == 'cuda'
