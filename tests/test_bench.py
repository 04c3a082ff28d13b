"""
bench.py's arithmetic against independent references: the training FLOPs per token behind the GPU suite's MFU
(`bench.train_flops_per_token`, PaLM's 6N + 12 L C T convention) against torch's own FLOP counter on a real forward
and backward pass; and the decode step's FLOPs and bytes behind the rollout benchmark's roofline floor
(`bench.decode_cost`) against the FLOP counter and the KV cache's own size.

Run: python -m pytest tests/test_bench.py -q
"""
import os
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import decode_cost, train_flops_per_token  # noqa: E402
from model import GPT, ModelConfig  # noqa: E402


@pytest.mark.parametrize('arch', ['gqa_dense_tied', 'gqa_dense_untied', 'mla_moe'])
def test_train_flops_per_token_matches_torch_flop_counter(arch):
    """FlopCounterMode counts every matmul of a real forward + backward (2 FLOPs per multiply-add; the MATH
    attention backend runs attention as batched matmuls it can count, and the routed experts' matmuls on the
    tokens each expert actually received). What the formula leaves out (norms, softmax, SwiGLU's product, the
    embedding gather) is no matmul, and the counter leaves it out too."""
    kw = dict(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=128)
    if arch == 'mla_moe':
        kw.update(attn='mla', ffn='moe', kv_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                  n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1)
    else:
        kw.update(attn='gqa', ffn='dense', tie_embeddings=arch.endswith('_tied'))
    c = ModelConfig(**kw)
    torch.manual_seed(0)
    m = GPT(c)
    x = torch.randint(0, c.vocab_size, (4, c.block_size + 1))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        m(x[:, :-1], targets=x[:, 1:])[1].backward()
    measured = counter.get_total_flops() / x[:, 1:].numel()
    # exact: every token reaches top_k routed experts, so the experts' matmuls total top_k / E of their weights
    assert train_flops_per_token(m) == measured


@pytest.mark.parametrize('n_kv_head', [4, 2])
def test_decode_cost_matches_flop_counter_and_cache_bytes(n_kv_head):
    """bench.decode_cost, the roofline floor's numerator, against a real decode step: torch's FLOP counter over
    the step's forward (its linear layers and the CPU decode path's two batched matmuls per layer), and the bytes
    of a KV cache that holds exactly the keys the step reads, plus the weights'."""
    c = ModelConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64,
                    intermediate_size=96, attn='gqa', ffn='dense')
    torch.manual_seed(0)
    m = GPT(c).eval()
    rows, prompt = 3, 9
    cache = m.new_cache(rows, prompt + 1)
    with torch.no_grad():
        m(torch.randint(0, 256, (rows, prompt)), cache=cache)
        with FlopCounterMode(display=False) as counter:
            m(torch.randint(0, 256, (rows, 1)), cache=cache, start=prompt)    # reads prompt + 1 keys
    flops, nbytes = decode_cost(m, rows, prompt + 1)
    assert flops == counter.get_total_flops()
    weights = sum(p.numel() for n, p in m.named_parameters() if p.dim() == 2 and n != 'embed_tokens.weight')
    weights += 0 if 'lm_head.weight' in dict(m.named_parameters()) else m.lm_head.weight.numel()   # tied
    assert nbytes == cache.nbytes() + 4 * weights
