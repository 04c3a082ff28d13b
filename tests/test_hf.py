"""
GPT.from_pretrained / save_pretrained against Hugging Face transformers as the reference implementation.

Tiny random Llama, Qwen2, DeepseekV3 and DeepseekV2 models are built offline from transformers' config classes,
saved with their own save_pretrained, loaded with ours: logits must agree within 1e-4 (fp32), 32 greedy tokens
(ours through the KV cache, theirs by full recomputation) must be identical, and our save_pretrained folder
must load back into the transformers class with the same logits.

Run: python -m pytest tests/test_hf.py -q      (skips itself when transformers is not installed)
"""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
transformers = pytest.importorskip('transformers')
from model import GPT  # noqa: E402

torch.set_num_threads(1)  # tiny shapes: extra threads only spin on a shared 2-core box
VOCAB, PROMPT, NEW = 96, 8, 32

COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, initializer_range=0.1, rms_norm_eps=1e-6)
DS = dict(COMMON, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
          n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=16, num_experts_per_tok=2)

CASES = {
    'llama_untied_gqa': ('LlamaConfig', 'LlamaForCausalLM',
                         dict(COMMON, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)),
    'llama_tied': ('LlamaConfig', 'LlamaForCausalLM', dict(COMMON, num_key_value_heads=4, tie_word_embeddings=True)),
    'qwen2_untied': ('Qwen2Config', 'Qwen2ForCausalLM',
                     dict(COMMON, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1e6)),
    'qwen2_tied': ('Qwen2Config', 'Qwen2ForCausalLM', dict(COMMON, num_key_value_heads=1, tie_word_embeddings=True)),
    # q compression, 2 groups keep 1, first layer dense, renormalised weights, V3's 2.5 scaling
    'dsv3_qlora_groups': ('DeepseekV3Config', 'DeepseekV3ForCausalLM',
                          dict(DS, q_lora_rank=24, n_group=2, topk_group=1, first_k_dense_replace=1,
                               norm_topk_prob=True, routed_scaling_factor=2.5)),
    # no q compression (V2-Lite style), 4 groups keep 2, every layer MoE, raw sigmoid weights
    'dsv3_noqlora': ('DeepseekV3Config', 'DeepseekV3ForCausalLM',
                     dict(DS, q_lora_rank=None, n_group=4, topk_group=2, first_k_dense_replace=0,
                          norm_topk_prob=False, routed_scaling_factor=1.5, num_experts_per_tok=3)),
    # YaRN context extension (mscale on the softmax scale), no groups, tied embeddings
    'dsv3_yarn_tied': ('DeepseekV3Config', 'DeepseekV3ForCausalLM',
                       dict(DS, q_lora_rank=24, n_group=1, topk_group=1, first_k_dense_replace=1,
                            routed_scaling_factor=1.0, tie_word_embeddings=True,
                            rope_parameters=dict(rope_type='yarn', rope_theta=10000.0, factor=4.0,
                                                 original_max_position_embeddings=16, beta_fast=32, beta_slow=1,
                                                 mscale=1.0, mscale_all_dim=1.0))),
    # V2: softmax scores, groups ranked by their max
    'dsv2_softmax_groups': ('DeepseekV2Config', 'DeepseekV2ForCausalLM',
                            dict(DS, q_lora_rank=None, n_group=4, topk_group=2, topk_method='group_limited_greedy',
                                 first_k_dense_replace=1, norm_topk_prob=False, routed_scaling_factor=2.0)),
}


def build_reference(name):
    cfg_cls, model_cls, kw = CASES[name]
    cfg = getattr(transformers, cfg_cls)(**kw)
    cfg._attn_implementation = 'eager'
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # a non-zero balancing bias, so selection and weighting really differ
        for n, buf in model.named_buffers():
            if n.endswith('e_score_correction_bias'):
                buf.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1))
    return model


def ids(batch=2, T=PROMPT + 4, seed=0):
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


def greedy_ours(model, prompt, n):
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + n)
    logits, _ = model(prompt, cache=cache)
    out = [logits[:, -1].argmax(-1, keepdim=True)]                       # (B, 1)
    for i in range(n - 1):
        logits, _ = model(out[-1], cache=cache, start=prompt.shape[1] + i)
        out.append(logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(out, dim=1)                                           # (B, n)


def greedy_reference(model, prompt, n):
    seq = prompt
    for _ in range(n):  # no cache: the plainest possible loop
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompt.shape[1]:]


@pytest.mark.parametrize('name', list(CASES))
@torch.no_grad()
def test_load_matches_reference(name, tmp_path):
    ref = build_reference(name)
    ref.save_pretrained(tmp_path / 'ref')
    x = ids()
    want = ref(x).logits
    impls = ['naive', 'absorb'] if name.startswith('ds') else [None]
    for impl in impls:
        kw = {'mla_impl': impl} if impl else {}
        ours = GPT.from_pretrained(str(tmp_path / 'ref'), **kw).eval()
        assert ours.config.tie_embeddings == ref.config.tie_word_embeddings
        got, _ = ours(x)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # greedy decoding through our cache (the last impl: absorbed for MLA) equals the reference's tokens
    prompt = x[:, :PROMPT]
    assert torch.equal(greedy_ours(ours, prompt, NEW), greedy_reference(ref, prompt, NEW))


@pytest.mark.parametrize('name', ['llama_untied_gqa', 'qwen2_tied', 'dsv3_qlora_groups', 'dsv3_noqlora',
                                  'dsv3_yarn_tied', 'dsv2_softmax_groups'])
@torch.no_grad()
def test_save_loads_into_reference(name, tmp_path):
    ref = build_reference(name)
    ref.save_pretrained(tmp_path / 'ref')
    ours = GPT.from_pretrained(str(tmp_path / 'ref')).eval()
    ours.save_pretrained(str(tmp_path / 'ours'))
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / 'ours'), attn_implementation='eager', output_loading_info=True)
    assert type(back).__name__ == type(ref).__name__
    assert not info['missing_keys'], info['missing_keys']
    x = ids(seed=1)
    torch.testing.assert_close(back.eval()(x).logits, ours(x)[0], atol=1e-4, rtol=0)
    # and our own loader reads our own folder back bit for bit
    again = GPT.from_pretrained(str(tmp_path / 'ours')).eval()
    assert torch.equal(again(x)[0], ours(x)[0])


@pytest.mark.parametrize('kw', [dict(attn='mla', ffn='dense'),
                                dict(attn='mla', ffn='moe', q_lora_rank=8, n_group=2, topk_group=1, mtp_depth=1,
                                     routed_scaling_factor=2.5, first_k_dense_replace=1),
                                dict(attn='gqa', ffn='dense', n_kv_head=2, tie_embeddings=False)])
@torch.no_grad()
def test_native_model_exports(kw, tmp_path):
    """A model we built (not one transformers built) exports to a folder transformers reproduces."""
    from model import ModelConfig
    c = ModelConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, n_embd=32, kv_lora_rank=16,
                    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                    moe_intermediate_size=16, **kw)
    torch.manual_seed(0)
    ours = GPT(c).eval()
    for p in ours.parameters():
        p.normal_(0.0, 0.1)
    for n, b in ours.named_buffers():
        if n.endswith('e_score_correction_bias'):
            b.normal_(0.0, 0.05)
    ours.save_pretrained(str(tmp_path))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation='eager').eval()
    x = ids(seed=2)
    torch.testing.assert_close(ref(x).logits, ours(x)[0], atol=1e-4, rtol=0)


def test_mtp_roundtrip(tmp_path):
    """MTP modules travel as DeepSeek-V3's extra layers n_layer.. and come back; transformers ignores them."""
    from model import ModelConfig
    c = ModelConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, n_embd=32, attn='mla', ffn='moe',
                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                    first_k_dense_replace=0, mtp_depth=1, tie_embeddings=False)
    torch.manual_seed(0)
    ours = GPT(c)
    ours.save_pretrained(str(tmp_path))
    assert json.load(open(tmp_path / 'config.json'))['num_nextn_predict_layers'] == 1
    again = GPT.from_pretrained(str(tmp_path))
    assert again.config.mtp_depth == 1
    for (n, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    x = ids(T=16)
    ours.train(), again.train()
    torch.testing.assert_close(ours(x, x)[1], again(x, x)[1])


@torch.no_grad()
def test_sharded_checkpoint(tmp_path):
    ref = build_reference('dsv3_qlora_groups')
    ref.save_pretrained(tmp_path, max_shard_size='40KB')
    assert (tmp_path / 'model.safetensors.index.json').exists() and len(list(tmp_path.glob('*.safetensors'))) > 1
    x = ids()
    torch.testing.assert_close(GPT.from_pretrained(str(tmp_path)).eval()(x)[0], ref(x).logits, atol=1e-4, rtol=0)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='no such checkpoint folder'):
        GPT.from_pretrained(str(tmp_path / 'nope'))
    (tmp_path / 'config.json').write_text(json.dumps({'architectures': ['GPTNeoXForCausalLM']}))
    (tmp_path / 'model.safetensors').write_bytes(b'')
    with pytest.raises(ValueError, match='unknown architecture'):
        GPT.from_pretrained(str(tmp_path))
    ref = build_reference('llama_tied')
    ref.save_pretrained(tmp_path / 'ref')
    from safetensors.torch import load_file, save_file
    sd = load_file(tmp_path / 'ref' / 'model.safetensors')
    del sd['model.layers.1.mlp.down_proj.weight']
    save_file(sd, tmp_path / 'ref' / 'model.safetensors')
    with pytest.raises(KeyError, match='missing'):
        GPT.from_pretrained(str(tmp_path / 'ref'))
