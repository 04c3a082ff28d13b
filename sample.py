"""
Batched generation with a KV cache, and the group rollouts of GRPO (DeepSeekMath sec. 4.1: G outputs per
question, sampled from the old policy).

- Prompts of different lengths share one batch by left-padding: row b's real tokens sit at the right end, its
  RoPE positions start at 0 at its first real token, and a key-padding mask hides its pad slots. Every row then
  decodes in lockstep, one cache write per step.
- Sampling: temperature, top-k, top-p (Holtzman et al. 2019), stop tokens, per-row finish. Randomness comes
  from a torch.Generator per row when `seeds` is given (a row's sample does not depend on its batch-mates),
  else from one generator for the batch.
- Returned logprobs are those of the distribution the token was actually drawn from (after temperature and
  top-k/top-p), i.e. the behaviour policy that GRPO's ratio divides by; greedy returns the model's plain
  log-softmax. RL samples at temperature 1 with no filtering, where the two coincide.
- `generate_naive` is the slow twin: no cache, the whole prefix recomputed every step. Tests hold the two equal.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


def pick(logits, temperature, top_k, top_p, generators):
    """logits (B, V) fp32 -> (token (B,), logprob (B,))."""
    if temperature == 0:
        logp = F.log_softmax(logits, -1)
        tok = logits.argmax(-1)
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    logp = F.log_softmax(logits, -1)                                  # (B, V)
    # exponential race: argmax p_i / E_i with E_i ~ Exp(1) samples from p (the Gumbel-max trick in disguise)
    if isinstance(generators, list):
        noise = torch.stack([torch.empty(logits.size(-1), device=logits.device).exponential_(generator=g)
                             for g in generators])
    else:
        noise = torch.empty_like(logits).exponential_(generator=generators)
    tok = (logp.exp() / noise).argmax(-1)                             # (B,)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def _generators(B, seeds, generator, device):
    if seeds is None:
        return generator
    if len(seeds) != B:
        raise ValueError(f"got {len(seeds)} seeds for {B} prompts")
    gens = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(s))
        gens.append(g)
    return gens


@torch.no_grad()
def generate(model, prompts, max_new_tokens, stop_ids, pad_id, temperature=1.0, top_k=0, top_p=1.0,
             seeds=None, generator=None):
    """Cached batched generation. prompts: list of id lists. Returns a Generation."""
    device = next(model.parameters()).device
    B = len(prompts)
    idx, pos, valid = left_pad(prompts, pad_id, device)
    P = idx.shape[1]
    cache = model.new_cache(B, P + max_new_tokens)
    gens = _generators(B, seeds, generator, device)
    stop = torch.tensor(sorted(stop_ids), device=device)
    ragged = not bool(valid.all())  # equal-length prompts need no mask: the fast causal kernel applies
    logits, _ = model(idx, pos=pos, mask=attention_mask(valid, valid, 0) if ragged else None, cache=cache, start=0)
    logits = logits[:, -1].float()                                   # (B, V)
    out_tok = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_logp = torch.zeros((B, max_new_tokens), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    next_pos = pos[:, -1] + 1                                        # (B,)
    for t in range(max_new_tokens):
        tok, lp = pick(logits, temperature, top_k, top_p, gens)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        out_tok[:, t] = tok
        out_logp[:, t] = torch.where(done, torch.zeros_like(lp), lp)
        done = done | torch.isin(tok, stop)
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        mask = None
        if ragged:
            valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=device)], 1)  # (B, P+t+1)
            mask = attention_mask(valid[:, -1:], valid, P + t)        # (B, 1, 1, P+t+1)
        logits, _ = model(tok[:, None], pos=next_pos[:, None], mask=mask, cache=cache, start=P + t)
        logits = logits[:, -1].float()
        next_pos = next_pos + 1
    return _finish(out_tok, out_logp, stop, pad_id)


@torch.no_grad()
def generate_naive(model, prompts, max_new_tokens, stop_ids, pad_id, temperature=1.0, top_k=0, top_p=1.0,
                   seeds=None, generator=None):
    """The slow twin of `generate`: no cache, every step re-runs the model over the whole padded prefix."""
    device = next(model.parameters()).device
    B = len(prompts)
    idx, pos, valid = left_pad(prompts, pad_id, device)
    gens = _generators(B, seeds, generator, device)
    stop = torch.tensor(sorted(stop_ids), device=device)
    out_tok = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_logp = torch.zeros((B, max_new_tokens), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        logits, _ = model(idx, pos=pos, mask=attention_mask(valid, valid, 0))
        tok, lp = pick(logits[:, -1].float(), temperature, top_k, top_p, gens)
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
                   top_k=0, top_p=1.0, generator=None):
    """
    G samples per prompt in one batched, cached call (GRPO's group). Rows are ordered prompt by prompt:
    rows [i*G, (i+1)*G) belong to prompt i, the layout grpo.group_advantages expects.
    """
    rows = [p for p in prompts for _ in range(group_size)]
    return generate(model, rows, max_new_tokens, stop_ids, pad_id, temperature, top_k, top_p,
                    generator=generator)
