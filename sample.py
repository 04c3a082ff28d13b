"""
Batched generation with a KV cache, and the group rollouts of GRPO (DeepSeekMath sec. 4.1: G outputs per
question, sampled from the old policy).

- Prompts of different lengths share one batch by left-padding: row b's real tokens sit at the right end, its
  RoPE positions start at 0 at its first real token, and a key-padding mask hides its pad slots. Every row then
  decodes in lockstep, one cache write per step.
- Sampling: temperature, top-k, top-p (Holtzman et al. 2019), stop tokens, per-row finish. Randomness comes
  from a torch.Generator per row when `seeds` is given (its uniforms drawn up front; a row's sample does not
  depend on its batch-mates), else from one generator for the batch. RL and evaluation always seed per row,
  from `row_seed` of the row's place in the global batch: a row is the same whichever rank, batch or world size
  generates it.
- Returned logprobs are those of the distribution the token was actually drawn from (after temperature and
  top-k/top-p), i.e. the behaviour policy that GRPO's ratio divides by; greedy returns the model's plain
  log-softmax. RL samples at temperature 1 with no filtering, where the two coincide.
- Rollout speed (`generate`): one prefill per distinct prompt, copied to its G rows (GRPO repeats each prompt
  G times); finished rows leave the batch, with a batch generator still drawing for every row so that no token
  changes; on CUDA a static-shape decode step replayed as a CUDA graph (`StaticDecode`). Shared-prefix
  attention (Hydragen, Juravsky et al. 2024: read the prompt's cache once per group) is not done: each row
  still reads its own copy of the prompt's keys.
- `generate_naive` is the slow twin: no cache, the whole prefix recomputed every step, every row to the end.
  Tests hold the two equal, token for token, for every fast path.
- What RL does with the rollouts (partial rollouts, dynamic sampling, the trainer's micro-batches) is in
  rollouts.py.
"""
import hashlib
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule


@dataclass
class Generation:
    tokens: torch.Tensor     # (B, L) generated ids, pad after the stop token
    logprobs: torch.Tensor   # (B, L) logprob of each generated token, 0 on pad
    mask: torch.Tensor       # (B, L) 1.0 on generated tokens (the stop token included)
    lengths: torch.Tensor    # (B,) generated tokens per row
    finished: torch.Tensor   # (B,) True when the row emitted a stop token (False: hit max_new_tokens)


def left_pad(prompts, pad_id, device):
    """list of id lists -> idx (B, P), pos (B, P), valid (B, P) bool."""
    P = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), P), dtype=torch.bool)
    for b, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {b} is empty: every prompt needs at least one token (e.g. <|bos|>)")
        idx[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[b, P - len(p):] = True
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)                 # (B, P) 0 at the first real token
    return idx.to(device), pos.to(device), valid.to(device)


def attention_mask(valid_q, valid_k, q_offset):
    """
    (B, 1, Tq, Tk) bool: query i (absolute index q_offset + i) sees key j iff j <= its index and j is a real
    token. A query always sees itself, so pad rows never get an all-False row (softmax of nothing is NaN).
    """
    Tq, Tk = valid_q.shape[1], valid_k.shape[1]
    qi = torch.arange(Tq, device=valid_k.device)[:, None] + q_offset  # (Tq, 1)
    kj = torch.arange(Tk, device=valid_k.device)[None, :]             # (1, Tk)
    causal = kj <= qi                                                 # (Tq, Tk)
    m = causal[None] & valid_k[:, None, :]                            # (B, Tq, Tk)
    m = m | (kj == qi)[None]                                          # self always visible
    return m[:, None]                                                 # (B, 1, Tq, Tk)


def filter_logits(logits, top_k=0, top_p=1.0):
    """Set to -inf everything outside the top-k and outside the smallest set with mass >= top_p."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]      # (B, 1)
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p               # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float('-inf'))
        logits = torch.full_like(logits, float('-inf')).scatter(-1, order, sorted_logits)
    return logits


def pick(logits, temperature, top_k, top_p, rng, rows=None):
    """logits (b, V) fp32 -> (token (b,), logprob (b,)). rng: a torch.Generator, or this step's uniforms (B,) (a
    row's own stream, sample._uniforms). rows (B,) bool, when rows have left the batch, marks the B rows' b still
    in it: the uniforms are drawn (or read) for all B rows and the kept rows take theirs, so the random stream,
    hence every token, is the one the whole batch draws."""
    if temperature == 0:
        logp = F.log_softmax(logits, -1)
        tok = logits.argmax(-1)
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    logp = F.log_softmax(logits, -1)                                  # (b, V)
    # inverse-CDF sampling: one uniform per row picks the first token whose cumulative mass exceeds u * total.
    # (An exponential race, argmax p_i / E_i, is as exact but draws V exponentials per row: on a tiny model
    # that RNG cost a fifth of a CPU decode step.)
    b, V = logp.shape
    probs = logp.exp()                                                # (b, V)
    cdf = probs.cumsum(-1)                                            # (b, V) non-decreasing
    n = b if rows is None else rows.numel()
    u = rng if torch.is_tensor(rng) else torch.rand(n, device=logits.device, generator=rng)  # (B,)
    u = u if rows is None else u[rows]                                # (b,)
    tok = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)  # (b,)
    # a token chosen this way has cdf_j > cdf_{j-1}, i.e. p_j > 0, except when u * total rounds up to the total
    # (j = V): then take the first token where the cdf reaches the total (p > 0 there too; always computed:
    # testing for the rare case first would sync the device at every decode step)
    last = torch.searchsorted(cdf, cdf[:, -1:].contiguous()).squeeze(-1)  # (b,)
    tok = torch.minimum(tok, last)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def row_seed(*key):
    """A 63-bit seed from a key of ints, e.g. (run seed, step, round, global row): stable across processes
    (unlike hash()), so every rank derives the same seed for the same row."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), 'little') >> 1


def _uniforms(B, T, seeds, device):
    """(B, T): row b's T uniforms from its own generator, drawn up front (one call per row, not per row and
    token: per-token calls cost a fifth of a small model's CPU decode step). None without seeds."""
    if seeds is None:
        return None
    if len(seeds) != B:
        raise ValueError(f"got {len(seeds)} seeds for {B} prompts")
    return torch.stack([torch.rand(T, device=device, generator=torch.Generator(device=device).manual_seed(int(s)))
                        for s in seeds]) if B else torch.zeros(0, T, device=device)


# a finished row leaves the batch once the finished rows make up this share of it: the leaving copies the
# cache, so it waits for several; the static path also captures a new CUDA graph each time, so it waits longer
COMPACT_SHARE = {'eager': 0.25, 'static': 0.5}


def use_static(model, device):
    """static=None's choice: the static-shape step with CUDA graphs on CUDA, for models a graph can hold. MoE
    routing reads its expert counts on the host (moe.py's sorted dispatch), which a graph cannot capture; an FSDP
    model's forward hooks (their stream waits) run even when its weights are gathered (shard.gathered), and are
    kept out of a capture too."""
    return device.type == 'cuda' and model.config.ffn != 'moe' and not isinstance(model, FSDPModule)


class StaticDecode:
    """
    One decode step whose shapes never change, so a CUDA graph can capture it once and replay it every step
    (a small model's decode step is kernel-launch bound on a GPU). What changes per step lives in fixed buffers
    updated in place: the token, its RoPE position, the cache slot (a 0-dim tensor: KVCache.write then writes
    with index_copy_ and returns the whole buffer) and the attention mask over all L slots, which hides the
    pad and the slots not written yet. The eager step (sliced cache, no mask for equal prompts) is its twin;
    graph=False runs the same step without capture (how the CPU tests run it). Sampling stays outside.
    Not yet run on a GPU (none has been lent to this project): a capture that fails warns and runs eagerly.
    """

    def __init__(self, model, cache, mask, graph):
        b = mask.shape[0]
        self.model, self.cache, self.mask = model, cache, mask.clone()              # (b, 1, 1, L) bool
        self.tok = torch.zeros(b, 1, dtype=torch.long, device=mask.device)           # (b, 1)
        self.pos = torch.zeros(b, 1, dtype=torch.long, device=mask.device)           # (b, 1)
        self.start = torch.zeros((), dtype=torch.long, device=mask.device)           # the slot written
        self.graph, self.use_graph, self.out = None, graph, None

    def _run(self):
        logits, _ = self.model(self.tok, pos=self.pos, mask=self.mask, cache=self.cache, start=self.start)
        return logits[:, -1].float()                                                 # (b, V)

    def __call__(self, tok, pos, slot):
        self.tok.copy_(tok[:, None])
        self.pos.copy_(pos[:, None])
        self.start.fill_(slot)
        self.mask[:, 0, 0, slot] = True                                              # the new token's own slot
        if not self.use_graph:
            return self._run()
        if self.graph is None:
            try:
                self._capture()
            except RuntimeError as e:   # an op that cannot be captured: the same step, eagerly
                warnings.warn(f"CUDA graph capture of the decode step failed, running it eagerly: {e}")
                self.graph, self.use_graph = None, False
                return self._run()
        self.graph.replay()   # rewrites this step's cache slot with the same values when just captured
        return self.out

    def _capture(self):
        # warm up on a side stream (cuBLAS handles, allocator), as torch.cuda.graphs' docs ask, then capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.out = self._run()                                                   # (b, V) the graph's output
        self.graph = graph


@torch.no_grad()
def generate(model, prompts, max_new_tokens, stop_ids, pad_id, temperature=1.0, top_k=0, top_p=1.0,
             seeds=None, generator=None, static=None):
    """
    Cached batched generation. prompts: list of id lists. Returns a Generation. Beyond caching:
    - One prefill per distinct prompt: GRPO passes each prompt G times; its cache rows are computed once and
      copied to its G rows (KVCache.select), for the dense and the MLA latent cache alike.
    - Finished rows leave the batch (COMPACT_SHARE): the cache, positions and mask keep only the live rows.
    - static (None: `use_static`): the StaticDecode step, replayed as a CUDA graph on CUDA; True forces it (on
      the CPU without a graph, for the tests), False keeps the eager step.
    Tokens and logprobs do not depend on any of these: generate_naive is the twin the tests hold it to.
    """
    device = next(model.parameters()).device
    B = len(prompts)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt is empty: every prompt needs at least one token (e.g. <|bos|>)")
    static = use_static(model, device) if static is None else static
    U = _uniforms(B, max_new_tokens, seeds, device)                  # (B, T) or None: one generator
    stop = torch.tensor(sorted(stop_ids), device=device)
    # 1. prefill the distinct prompts only (they pad to the same P as the whole batch), then copy their rows
    uniq = list(dict.fromkeys(tuple(p) for p in prompts))
    row_of = {p: i for i, p in enumerate(uniq)}
    src = torch.tensor([row_of[tuple(p)] for p in prompts], device=device)       # (B,) prefill row of each row
    idx, pos, valid = left_pad(uniq, pad_id, device)                              # (U, P)
    P = idx.shape[1]
    cache = model.new_cache(len(uniq), P + max_new_tokens)
    ragged = not bool(valid.all())  # equal-length prompts need no mask: the fast causal kernel applies
    logits, _ = model(idx, pos=pos, mask=attention_mask(valid, valid, 0) if ragged else None, cache=cache, start=0,
                      logits_slice=slice(P - 1, P))                              # (U, 1, V)
    if len(uniq) < B:
        cache.select(src)                                                         # (B, ...) every buffer
    logits, pos, valid = logits[src, -1].float(), pos[src], valid[src]            # (B, V), (B, P), (B, P)

    # 2. decode: `ids` are the B rows still in the batch, `kept` marks them for the sampler's random stream
    out_tok = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_logp = torch.zeros((B, max_new_tokens), device=device)
    ids = torch.arange(B, device=device)                                          # (b,)
    kept = torch.ones(B, dtype=torch.bool, device=device)                         # (B,)
    done = torch.zeros(B, dtype=torch.bool, device=device)                        # (b,)
    next_pos = pos[:, -1] + 1                                                     # (b,)
    step = None
    if static:
        mask = torch.zeros(B, 1, 1, P + max_new_tokens, dtype=torch.bool, device=device)  # (B, 1, 1, L)
        mask[:, 0, 0, :P] = valid
        step = StaticDecode(model, cache, mask, graph=device.type == 'cuda')
    for t in range(max_new_tokens):
        tok, lp = pick(logits, temperature, top_k, top_p, generator if U is None else U[:, t],
                       None if len(ids) == B else kept)                          # (b,)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        out_tok[ids, t] = tok
        out_logp[ids, t] = torch.where(done, torch.zeros_like(lp), lp)
        done = done | torch.isin(tok, stop)
        n_done = int(done.sum())
        if t == max_new_tokens - 1 or n_done == len(ids):
            break
        if n_done >= COMPACT_SHARE['static' if static else 'eager'] * len(ids):
            live = (~done).nonzero().squeeze(1)                                   # (b',) positions in the batch
            ids, tok, next_pos, done, valid = ids[live], tok[live], next_pos[live], done[live], valid[live]
            kept = torch.zeros(B, dtype=torch.bool, device=device).index_fill_(0, ids, True)
            cache.select(live)
            if static:
                step = StaticDecode(model, cache, step.mask[live], step.use_graph)
        if static:
            logits = step(tok, next_pos, P + t)                                   # (b, V)
        else:
            mask = None
            if ragged:
                valid = torch.cat([valid, torch.ones_like(valid[:, :1])], 1)      # (b, P+t+1)
                mask = attention_mask(valid[:, -1:], valid, P + t)                # (b, 1, 1, P+t+1)
            logits, _ = model(tok[:, None], pos=next_pos[:, None], mask=mask, cache=cache, start=P + t)
            logits = logits[:, -1].float()                                        # (b, V)
        next_pos = next_pos + 1
    return _finish(out_tok, out_logp, stop, pad_id)


@torch.no_grad()
def generate_naive(model, prompts, max_new_tokens, stop_ids, pad_id, temperature=1.0, top_k=0, top_p=1.0,
                   seeds=None, generator=None):
    """The slow twin of `generate`: no cache, every step re-runs the model over the whole padded prefix of
    every row, finished or not; one prompt per row, however often it repeats."""
    device = next(model.parameters()).device
    B = len(prompts)
    idx, pos, valid = left_pad(prompts, pad_id, device)
    U = _uniforms(B, max_new_tokens, seeds, device)                  # (B, T) or None: one generator
    stop = torch.tensor(sorted(stop_ids), device=device)
    out_tok = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_logp = torch.zeros((B, max_new_tokens), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        logits, _ = model(idx, pos=pos, mask=attention_mask(valid, valid, 0))
        tok, lp = pick(logits[:, -1].float(), temperature, top_k, top_p, generator if U is None else U[:, t])
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        out_tok[:, t] = tok
        out_logp[:, t] = torch.where(done, torch.zeros_like(lp), lp)
        done = done | torch.isin(tok, stop)
        if bool(done.all()):
            break
        idx = torch.cat([idx, tok[:, None]], 1)
        pos = torch.cat([pos, pos[:, -1:] + 1], 1)
        valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=device)], 1)
    return _finish(out_tok, out_logp, stop, pad_id)


def _finish(out_tok, out_logp, stop, pad_id):
    """Trim to the longest row; mask = tokens up to and including the first stop token."""
    is_stop = torch.isin(out_tok, stop)
    after_stop = (is_stop.long().cumsum(1) - is_stop.long()) > 0    # strictly after the first stop
    mask = (~after_stop).float()
    # rows that never stopped keep every slot they generated
    lengths = mask.sum(1).long()
    L = max(int(lengths.max()), 1)
    tokens = out_tok[:, :L].masked_fill(after_stop[:, :L], pad_id)
    return Generation(tokens, out_logp[:, :L] * mask[:, :L], mask[:, :L], lengths, is_stop.any(1))


def group_rollouts(model, prompts, group_size, max_new_tokens, stop_ids, pad_id, temperature=1.0,
                   top_k=0, top_p=1.0, generator=None, seeds=None, static=None):
    """
    G samples per prompt in one batched, cached call (GRPO's group). Rows are ordered prompt by prompt:
    rows [i*G, (i+1)*G) belong to prompt i, the layout grpo.group_advantages expects. seeds: one per row.
    generate prefills each prompt once for its G rows.
    """
    rows = [p for p in prompts for _ in range(group_size)]
    return generate(model, rows, max_new_tokens, stop_ids, pad_id, temperature, top_k, top_p,
                    seeds=seeds, generator=generator, static=static)


# -----------------------------------------------------------------------------
# prompt + response as one training sequence

def sequences_for_training(prompts, gen, pad_id, device, block_size=None):
    """
    Prompt (left-padded) + response as one (B, P + L) batch with positions and the attention mask, and P:
    logits[:, P - 1 + t] predicts response token t. pos and mask are None when every prompt has the same length
    (every countdown prompt does), so the fast causal kernel applies; pads after a stop token sit at the end,
    where no trained token can see them.
    """
    idx, pos, valid = left_pad(prompts, pad_id, device)                        # (B, P)
    P = idx.shape[1]
    resp = gen.tokens.to(device)                                               # (B, L)
    idx = torch.cat([idx, resp], 1)                                            # (B, P+L)
    if bool(valid.all()):
        return idx, None, None, P
    pos = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(resp.shape[1], device=device)], 1)  # (B, P+L)
    if block_size is not None:  # pads after a short row's response may pass the RoPE table; they are never read
        pos = pos.clamp(max=block_size - 1)
    valid = torch.cat([valid, torch.ones_like(resp, dtype=torch.bool)], 1)    # (B, P+L)
    return idx, pos, attention_mask(valid, valid, 0), P
