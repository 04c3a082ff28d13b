"""
A decoder-only transformer in the DeepSeek / Llama family, small enough to read in one sitting.

What it implements
- Pre-norm residual blocks of RMSNorm, RoPE and SwiGLU (layers.py: Zhang & Sennrich 2019, RoFormer, Shazeer 2020),
  in the "rotate half" RoPE layout Hugging Face Llama/Qwen2 checkpoints use, so real weights load unpermuted.
- Grouped-query attention (Ainslie et al. 2023) through F.scaled_dot_product_attention.
- The DeepSeek-V2/V3 pieces: `attn='mla'` plugs in Multi-head Latent Attention (mla.py), `ffn='moe'` plugs in
  DeepSeekMoE (moe.py), `mtp_depth > 0` adds multi-token prediction (DeepSeek-V3 section 2.2, `MTP` below).
  The block never needs to know which attention or FFN it holds. The defaults are the tiny MLA + MoE model.

The KV cache is explicit: `KVCache` is a list of per-layer dicts of preallocated buffers; an attention
module writes its keys/values (or, for MLA, its latents) at [start, start + T) and reads [0, start + T).
Ragged batches are left-padded by the sampler, which passes per-row positions `pos` (B, T) and a boolean
attention mask (B, 1, T, Tk); training passes neither and gets the fast causal kernel.
"""
import math
from dataclasses import dataclass, asdict, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import MLP, RMSNorm, apply_rope, cos_sin, decode_attention, resolve_mask, rope_table
from mla import MLA, yarn_rope_table
from moe import MoE


def lr_at(step, total, warmup, peak, min_frac):
    """Linear warmup over `warmup` steps, then cosine from `peak` down to min_frac * peak at step `total`
    (pretraining, every SFT stage and the RL stages use it; RL's min_frac defaults to 1: constant after warmup)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@dataclass
class ModelConfig:
    """The model's shape. The defaults are the tiny preset's DeepSeek-V3-style model (MLA + DeepSeekMoE), so a
    preset lists only what differs; each field's one-line comment is written to serve as its --help text."""
    vocab_size: int = 2048          # vocabulary size (tokenizer.n_vocab, rounded up by the caller if it likes)
    block_size: int = 192           # longest sequence (prompt + response) in tokens; the RoPE table covers it
    n_layer: int = 4                # number of transformer blocks
    n_head: int = 4                 # number of query heads
    n_kv_head: int = 4              # key/value heads of GQA, a divisor of n_head (= n_head: MHA, 1: MQA)
    n_embd: int = 128               # residual stream width
    head_dim: int = 0               # per-head width of GQA; 0 = n_embd // n_head
    intermediate_size: int = 0      # hidden width of the dense SwiGLU; 0 = 8/3 n_embd rounded up to a multiple of 32
    rope_theta: float = 10000.0     # RoPE base theta
    norm_eps: float = 1e-6          # RMSNorm epsilon
    tie_embeddings: bool = True     # share the token embedding matrix with the output head
    attn_bias: bool = False         # biases on the GQA q/k/v projections (Qwen2 has them)
    dropout: float = 0.0            # attention/residual dropout probability (keep 0 for RL: logprobs must be exact)
    attn: str = 'mla'               # attention: 'mla' (Multi-head Latent Attention, mla.py) or 'gqa' (also MHA/MQA)
    ffn: str = 'moe'                # feed-forward: 'moe' (DeepSeekMoE, moe.py) or 'dense' (one SwiGLU)
    # Multi-head Latent Attention (mla.py), used when attn == 'mla'
    q_lora_rank: int = 0            # MLA query compression rank d_c'; 0 = one direct wq projection (V2-Lite)
    kv_lora_rank: int = 96          # MLA d_c: width of the compressed KV latent c_KV (what the absorbed path caches)
    # d_nope + d_R == d_v: training's SDPA takes its fused CPU kernel without padding v (a fifth off a tiny
    # pretraining step against 32 + 32; V3's are 128 + 64 vs 128; EXPERIMENTS.md q1)
    qk_nope_head_dim: int = 16      # MLA per-head query/key width without RoPE
    qk_rope_head_dim: int = 16      # MLA d_R: decoupled RoPE width (even); one rope key per token for all heads
    v_head_dim: int = 32            # MLA per-head value width
    mla_impl: str = 'auto'          # MLA path: naive (caches K/V) | absorb (caches c_KV, k_R) | auto (absorb in decode)
    rope_factor: float = 1.0        # YaRN context-extension factor for MLA; 1 = plain RoPE
    rope_original_max_pos: int = 4096  # YaRN: context length of pretraining
    rope_beta_fast: float = 32.0    # YaRN: dims rotating more often than this over that context keep their freq
    rope_beta_slow: float = 1.0     # YaRN: dims rotating less often than this are fully interpolated
    rope_mscale: float = 1.0        # YaRN: mscale of the cos/sin attention factor (DeepSeek-V3: 1.0)
    rope_mscale_all_dim: float = 1.0  # YaRN: softmax scale times (0.1 * this * ln factor + 1)^2; 0 = off
    # DeepSeekMoE (moe.py), used when ffn == 'moe'
    n_routed_experts: int = 8       # MoE: fine-grained routed experts per layer
    n_shared_experts: int = 1       # MoE: always-on experts (0 = none), stored as one wider SwiGLU
    moe_intermediate_size: int = 96  # MoE: hidden width of one expert; 0 = intermediate_size // num_experts_per_tok
    num_experts_per_tok: int = 2    # MoE: K, routed experts per token
    n_group: int = 1                # MoE: expert groups for group-limited routing; 1 = off
    topk_group: int = 1             # MoE: groups a token may route into (1 .. n_group)
    scoring_func: str = 'sigmoid'   # MoE gate: 'sigmoid' (V3, with the balancing bias) or 'softmax' (V2)
    norm_topk_prob: bool = True     # MoE: renormalise the K chosen gate weights to sum to 1
    routed_scaling_factor: float = 1.0  # MoE: multiplies the routed experts' output (V3: 2.5)
    first_k_dense_replace: int = 1  # MoE: the first k layers keep a dense SwiGLU
    bias_update_speed: float = 0.001  # MoE: gamma of aux-loss-free balancing (bias step after each optimizer step)
    aux_loss_alpha: float = 0.0     # MoE: alpha of the sequence-wise balance loss (V3: 1e-4); 0 = off
    # Multi-token prediction (DeepSeek-V3 section 2.2)
    mtp_depth: int = 0              # MTP: D extra modules predicting tokens i+2 .. i+1+D; 0 = none
    mtp_loss_weight: float = 0.3    # MTP: lambda, loss += lambda * mean over depths of the MTP cross-entropy

    def __post_init__(self):
        for name in ('vocab_size', 'block_size', 'n_layer', 'n_head', 'n_kv_head', 'n_embd'):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim == 0:
            self.head_dim = self.n_embd // self.n_head
        if self.intermediate_size == 0:
            self.intermediate_size = 32 * math.ceil(8 * self.n_embd / 3 / 32)
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.attn not in ('gqa', 'mla'):
            raise ValueError(f"attn must be 'gqa' or 'mla', got {self.attn!r}")
        if self.ffn not in ('dense', 'moe'):
            raise ValueError(f"ffn must be 'dense' or 'moe', got {self.ffn!r}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.moe_intermediate_size == 0:
            self.moe_intermediate_size = max(1, self.intermediate_size // self.num_experts_per_tok)
        if self.attn == 'mla':
            if self.mla_impl not in ('naive', 'absorb', 'auto'):
                raise ValueError(f"mla_impl must be 'naive', 'absorb' or 'auto', got {self.mla_impl!r}")
            if self.kv_lora_rank <= 0 or self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
                raise ValueError("MLA needs kv_lora_rank > 0 and an even qk_rope_head_dim > 0")
            if self.rope_factor > 1 and self.rope_original_max_pos <= 0:
                raise ValueError("YaRN (rope_factor > 1) needs rope_original_max_pos > 0")
        if self.ffn == 'moe':
            E, G = self.n_routed_experts, self.n_group
            if self.scoring_func not in ('sigmoid', 'softmax'):
                raise ValueError(f"scoring_func must be 'sigmoid' or 'softmax', got {self.scoring_func!r}")
            if G < 1 or E % G or not 1 <= self.topk_group <= G:
                raise ValueError(f"need n_routed_experts={E} divisible by n_group={G} >= topk_group="
                                 f"{self.topk_group} >= 1")
            if not 1 <= self.num_experts_per_tok <= self.topk_group * (E // G):
                raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                                 f"[1, topk_group * experts per group = {self.topk_group * (E // G)}]")
            if self.scoring_func == 'sigmoid' and G > 1 and E // G < 2:
                raise ValueError("sigmoid routing ranks groups by their top-2 scores: need >= 2 experts per group")
        if self.mtp_depth < 0:
            raise ValueError(f"mtp_depth must be >= 0, got {self.mtp_depth}")

    @classmethod
    def from_dict(cls, d):
        """Build from a (possibly stored) dict, naming any field we do not know."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        return cls(**d)

    def to_dict(self):
        return asdict(self)


# -----------------------------------------------------------------------------
# building blocks

class KVCache:
    """Per-layer buffers for cached generation. `layers[i]` is a dict the i-th attention fills; every buffer has
    the batch on dim 0 (dense GQA's k/v (B, Hkv, L, D), MLA's latent kvpe (B, L, dc+dr) or naive k/v)."""

    def __init__(self, n_layer, batch_size, max_len):
        self.batch_size, self.max_len = batch_size, max_len
        self.layers = [dict() for _ in range(n_layer)]

    def write(self, i, name, x, start, dim=1):
        """Store x (T along `dim`) at [start, start + T) of buffer `name` of layer i; return [0, start + T).
        A tensor `start` (0-dim long) is the static-shape write of a CUDA-graph decode step: no host sync, no
        shape that depends on it, so the whole buffer is returned and the caller's mask hides unwritten slots."""
        layer = self.layers[i]
        T = x.shape[dim]
        if not torch.is_tensor(start) and start + T > self.max_len:
            raise ValueError(f"KV cache overflow: writing up to {start + T} > max_len {self.max_len}")
        if name not in layer:
            shape = list(x.shape)
            shape[dim] = self.max_len
            layer[name] = torch.zeros(shape, dtype=x.dtype, device=x.device)
        buf = layer[name]
        if torch.is_tensor(start):
            return buf.index_copy_(dim, start + torch.arange(T, device=x.device), x)
        buf.narrow(dim, start, T).copy_(x)
        return buf.narrow(dim, 0, start + T)

    def select(self, rows):
        """Keep, reorder or repeat batch rows: every buffer becomes buffer[rows]. rows (B',) long. The sampler
        uses it to copy one prefill per distinct prompt to its G samples, and to drop rows that have finished."""
        for layer in self.layers:
            for name, buf in layer.items():
                layer[name] = buf.index_select(0, rows)                      # (B', ...)
        self.batch_size = rows.numel()

    def nbytes(self):
        """Bytes held by all buffers (the tests read the cache footprint off this)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())


class Attention(nn.Module):
    """Grouped-query attention: n_head query heads share n_kv_head key/value heads."""

    def __init__(self, config, layer_id):
        super().__init__()
        self.layer_id = layer_id
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=config.attn_bias)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.attn_bias)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.attn_bias)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, mask=None, cache=None, start=0):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)       # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)    # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)    # (B, T, Hkv, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D) x 2
        if cache is not None:
            # the cache stores the rotated keys, so past tokens never need re-rotating; head-major (B, Hkv, L, D)
            # so that each head's keys are contiguous when a decode step reads them all
            k = cache.write(self.layer_id, 'k', k, start, dim=2)         # (B, Hkv, start+T, D)
            v = cache.write(self.layer_id, 'v', v, start, dim=2)         # (B, Hkv, start+T, D)
        mask, is_causal = resolve_mask(mask, T, start, x.device)
        p_drop = self.dropout if self.training else 0.0
        if T == 1 and p_drop == 0 and not x.is_cuda:
            # one query per row (a decode step) on the CPU: two small batched matmuls, with the G = H / Hkv
            # query heads of a group folded into rows, take about half the time of SDPA's CPU kernel there
            q = q.reshape(B, self.n_kv_head, self.n_head // self.n_kv_head, self.head_dim)  # (B, Hkv, G, D)
            y = decode_attention(q, k, v, self.head_dim ** -0.5, mask)   # mask (B or 1, 1, 1, Tk) bool
            y = y.view(B, self.n_head, 1, self.head_dim)                  # (B, H, 1, D)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=p_drop,
                enable_gqa=self.n_kv_head != self.n_head)                  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)   # (B, T, H*D)
        return self.o_proj(y)


class Block(nn.Module):
    def __init__(self, config, layer_id):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = MLA(config, layer_id) if config.attn == 'mla' else Attention(config, layer_id)
        if config.ffn == 'moe' and layer_id >= config.first_k_dense_replace:
            self.mlp = MoE(config)
        else:
            self.mlp = MLP(config.n_embd, config.intermediate_size)

    def forward(self, x, cos, sin, mask=None, cache=None, start=0):
        x = x + self.attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class MTP(nn.Module):
    """One DeepSeek-V3 multi-token-prediction module (V3 section 2.2, eqs. 21-25).

    h'_k = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h_{k-1})], then one transformer block; the embedding and the
    output head are the main model's, `norm` is this depth's final norm before that head. h_0 is the main
    model's output after its final norm and h_k the block output of depth k. Deviation: the paper
    writes [h; Emb] (eq. 21); we concatenate [Emb; h] because that is how DeepSeek-V3's released eh_proj
    weights are laid out, so save_pretrained writes a checkpoint other MTP implementations read. Depth k's
    cross-entropy is the mean over the positions it scores (T - k, less the -1 targets), where eq. 24 writes
    1/T: the same choice the main loss makes, and what ignore_index gives. tests/test_mtp.py checks eqs. 21-25
    written out position by position.
    """

    def __init__(self, config, layer_id):
        super().__init__()
        self.enorm = RMSNorm(config.n_embd, config.norm_eps)
        self.hnorm = RMSNorm(config.n_embd, config.norm_eps)
        self.eh_proj = nn.Linear(2 * config.n_embd, config.n_embd, bias=False)  # M_k
        self.block = Block(config, layer_id)
        self.norm = RMSNorm(config.n_embd, config.norm_eps)

    def forward(self, h, emb, cos, sin, mask=None):
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))  # (B, T, C)
        return self.block(x, cos, sin, mask)                                  # (B, T, C)


# -----------------------------------------------------------------------------
# pretraining helpers: the number-token init and the packed-document mask

def fourier_number_init(emb, number_ids, periods=(2, 5, 10, 20, 50, 100, 200, 500, 1000), scale=0.05):
    """
    Seed the embedding of each number token n with cos/sin(2 pi n / P) for a few periods P (the Fourier number
    features of FoNE, Zhou et al. 2025), on top of the random init. Transformers trained on arithmetic end up with
    such features anyway (Nanda et al. 2023); starting from them is what lets a 1M-parameter model learn sums like
    56+7=63 exactly within minutes (EXPERIMENTS.md exp2). With tied embeddings the same features decode the result.
    """
    with torch.no_grad():
        ids = torch.tensor(list(number_ids.values()))
        n = torch.tensor(list(number_ids.keys()), dtype=torch.float32)
        ang = 2 * math.pi * n[:, None] / torch.tensor(periods, dtype=torch.float32)[None]  # (N, F)
        feats = torch.cat(cos_sin(ang), 1) * scale                                        # (N, 2F)
        emb.weight[ids, :feats.shape[1]] += feats.to(emb.weight.dtype)


def document_mask(x, bos):
    """
    (B, 1, T, T) causal mask that keeps each packed document to itself (a new document starts at each <|bos|>).
    Without it the base learnt to copy numbers from the *previous* problem in the row (EXPERIMENTS.md full2).
    """
    T = x.shape[1]
    seg = (x == bos).long().cumsum(1)                                          # (B, T) document index
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]           # (B, 1, T, T)


# -----------------------------------------------------------------------------
# the model

class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # depth 0 allocates nothing: the module list is absent, not empty
        self.mtp = nn.ModuleList([MTP(config, config.n_layer + k) for k in range(config.mtp_depth)]) \
            if config.mtp_depth > 0 else None
        self.aux_loss = self.mtp_loss = None  # the extra loss terms of the last forward (see forward)
        # non-persistent: derived from the config, so checkpoints stay small and loadable elsewhere
        cos, sin = self.rope_tables()
        self.register_buffer('rope_cos', cos, persistent=False)
        self.register_buffer('rope_sin', sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            self._init_residual(name, p)

    def rope_tables(self):
        """The (cos, sin) buffers, (block_size, rope dim) each; also what a model built on the meta device gets
        after to_empty (harness.materialize)."""
        config = self.config
        # MLA rotates only its decoupled d_R dims (V2 section 2.1.3); YaRN rescales them for long contexts
        if config.attn == 'mla' and config.rope_factor > 1:
            return yarn_rope_table(config)
        rope_dim = config.qk_rope_head_dim if config.attn == 'mla' else config.head_dim
        return rope_table(rope_dim, config.block_size, config.rope_theta)

    def _init_residual(self, name, p):
        """
        GPT-2 style: scale the residual-stream writes by 1/sqrt(2 n_layer) so the stream's variance does not
        grow with depth at init. The writes are GQA's o_proj, MLA's wo and every SwiGLU's down_proj (the dense
        MLP, each routed expert and the shared experts of MoE, which are all layers.MLP). Returns whether p
        is one (harness.init_sharded replays it one full-size parameter at a time).
        """
        if not name.endswith(('o_proj.weight', 'wo.weight', 'down_proj.weight')):
            return False
        nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
        return True

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, exclude_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.embed_tokens.weight.numel()
        return n

    def new_cache(self, batch_size, max_len):
        if max_len > self.config.block_size:
            raise ValueError(f"max_len {max_len} exceeds block_size {self.config.block_size}")
        return KVCache(self.config.n_layer, batch_size, max_len)

    def forward(self, idx, targets=None, pos=None, mask=None, cache=None, start=0, logits_slice=None,
                return_hidden=False):
        """
        idx (B, T) token ids; targets (B, T) with -1 where no loss is taken.
        pos (B, T) positions for RoPE (default start + arange(T)); mask (B, 1, T, Tk) bool, True = attend
        (default causal); cache a KVCache written at [start, start + T).
        logits_slice, a slice over the time axis (e.g. slice(P - 1, P - 1 + L) for a response of L tokens after
        a prompt of P), computes logits only there (HF's logits_to_keep); it excludes targets.
        Returns (logits (B, T, V) fp32-castable, or (B, T', V) for the T' sliced positions; loss or None).
        return_hidden=True returns (the final-norm hidden states (B, T or T', C) that lm_head would read, None)
        instead: fused_loss.loss_from_hidden takes them with lm_head.weight and never builds the (B, T, V) logits.
        In training mode with targets, loss also holds mtp_loss_weight * the MTP loss and the MoE balance loss;
        after every call `self.mtp_loss` and `self.aux_loss` hold those terms (tensors with grad, or None) so
        the trainer can log them, or add `aux_loss` to an RL loss computed from the logits.
        """
        B, T = idx.shape
        if (logits_slice is not None or return_hidden) and targets is not None:
            raise ValueError("logits_slice and return_hidden compute no loss: pass targets=None")
        if pos is None:
            if start + T > self.config.block_size:
                raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
            cos = self.rope_cos[start:start + T].unsqueeze(0).expand(B, -1, -1)  # (B, T, D)
            sin = self.rope_sin[start:start + T].unsqueeze(0).expand(B, -1, -1)  # (B, T, D)
        else:
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]                    # (B, T, D)
        emb = self.embed_tokens(idx)                                             # (B, T, C)
        x = emb
        for block in self.layers:
            x = block(x, cos, sin, mask, cache, start)
        x = self.norm(x)
        aux = [b.mlp.aux_loss for b in self.layers if getattr(b.mlp, 'aux_loss', None) is not None]
        self.aux_loss = sum(aux) if aux else None
        self.mtp_loss = None
        # the RL trainer scores only response tokens: slicing before lm_head skips the (T, V) matmul and
        # the logits memory of the prompt positions, the largest activation of a small model with a big vocab
        h = x if logits_slice is None else x[:, logits_slice]                    # (B, T or T', C)
        if return_hidden:
            return h, None
        logits = self.lm_head(h)                                                 # (B, T or T', V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
            if self.training and self.mtp is not None and cache is None:
                self.mtp_loss = self._mtp_loss(x, emb, targets, cos, sin, mask)
                if self.mtp_loss is not None:
                    loss = loss + self.config.mtp_loss_weight * self.mtp_loss
            if self.training and self.aux_loss is not None:
                loss = loss + self.aux_loss
        return logits, loss

    def _mtp_loss(self, h, emb, targets, cos, sin, mask):
        """Mean over depths k of CE(predict t_{i+1+k} at position i) (V3 eqs. 24-25).

        Depth k sees positions i < T - k: it combines h_{k-1} at i with the embedding of token t_{i+k}
        (= idx[i + k]) and is scored against targets[i + k] (= t_{i+1+k}), so -1 targets stay ignored.
        """
        T, losses = h.shape[1], []
        for k, module in enumerate(self.mtp, start=1):
            S = T - k
            if S <= 0:
                break
            m = mask[:, :, :S, :S] if mask is not None else None
            h = module(h[:, :S], emb[:, k:], cos[:, :S], sin[:, :S], m)         # (B, S, C)
            logits = self.lm_head(module.norm(h))                              # (B, S, V)
            losses.append(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                          targets[:, k:].reshape(-1), ignore_index=-1))
            aux = getattr(module.block.mlp, 'aux_loss', None)
            if aux is not None:
                self.aux_loss = aux if self.aux_loss is None else self.aux_loss + aux
        return torch.stack(losses).mean() if losses else None

    def optim_groups(self, weight_decay):
        """Decay matrices (weights, embeddings); never norms or biases."""
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        decay = [p for n, p in params.items() if p.dim() >= 2]
        no_decay = [p for n, p in params.items() if p.dim() < 2]
        return [{'params': decay, 'weight_decay': weight_decay},
                {'params': no_decay, 'weight_decay': 0.0}]
