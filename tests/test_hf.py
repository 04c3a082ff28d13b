"""
hf.load_pretrained / save_pretrained against Hugging Face transformers as the reference implementation.

Tiny random Llama, Qwen2, DeepseekV3 and DeepseekV2 models are built offline from transformers' config classes,
saved with their own save_pretrained, loaded with ours: logits must agree within 1e-4 (fp32), 32 greedy tokens
(ours through the KV cache, theirs by full recomputation) must be identical, and our save_pretrained folder
must load back into the transformers class with the same logits. Loading is strict: edited folders (a wrong
shape, an unknown or missing tensor, a shard outside the folder, RoPE keys that disagree) must be refused with
a ValueError naming the culprit, and the RoPE spellings of transformers 4.x and 5.x must give transformers'
logits.

Run: python -m pytest tests/test_hf.py -q      (skips itself when transformers is not installed)
"""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
transformers = pytest.importorskip('transformers')
from hf import load_pretrained, save_pretrained  # noqa: E402
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
        ours = load_pretrained(str(tmp_path / 'ref'), **kw).eval()
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
    ours = load_pretrained(str(tmp_path / 'ref')).eval()
    save_pretrained(ours, str(tmp_path / 'ours'))
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / 'ours'), attn_implementation='eager', output_loading_info=True)
    assert type(back).__name__ == type(ref).__name__
    assert not info['missing_keys'], info['missing_keys']
    x = ids(seed=1)
    torch.testing.assert_close(back.eval()(x).logits, ours(x)[0], atol=1e-4, rtol=0)
    # and our own loader reads our own folder back bit for bit
    again = load_pretrained(str(tmp_path / 'ours')).eval()
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
    save_pretrained(ours, str(tmp_path))
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
    save_pretrained(ours, str(tmp_path))
    assert json.load(open(tmp_path / 'config.json'))['num_nextn_predict_layers'] == 1
    again = load_pretrained(str(tmp_path))
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
    torch.testing.assert_close(load_pretrained(str(tmp_path)).eval()(x)[0], ref(x).logits, atol=1e-4, rtol=0)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='no such checkpoint folder'):
        load_pretrained(str(tmp_path / 'nope'))
    (tmp_path / 'config.json').write_text(json.dumps({'architectures': ['GPTNeoXForCausalLM']}))
    (tmp_path / 'model.safetensors').write_bytes(b'')
    with pytest.raises(ValueError, match='unknown architecture'):
        load_pretrained(str(tmp_path))
    ref = build_reference('llama_tied')
    ref.save_pretrained(tmp_path / 'ref')
    from safetensors.torch import load_file, save_file
    sd = load_file(tmp_path / 'ref' / 'model.safetensors')
    del sd['model.layers.1.mlp.down_proj.weight']
    save_file(sd, tmp_path / 'ref' / 'model.safetensors')
    with pytest.raises(ValueError, match=r'1 tensors the config needs are missing: model\.layers\.1\.mlp\.down_proj'):
        load_pretrained(str(tmp_path / 'ref'))
    # DeepSeek-V3's released fp8 weights: copying them without their weight_scale_inv would be silent garbage
    edit_config(tmp_path / 'ref', lambda hf: hf.update(quantization_config={'quant_method': 'fp8'}))
    with pytest.raises(ValueError, match=r'quantized checkpoint \(fp8\) unsupported'):
        load_pretrained(str(tmp_path / 'ref'))


# ---------------------------------------------------------------------------------------------------------------
# strict loading: every needed tensor with its exact shape, every stored tensor used or skipped by name

def edit_tensors(folder, fn, edit):
    """Rewrite one safetensors file of a folder through `edit(dict of tensors)`."""
    from safetensors.torch import load_file, save_file
    sd = load_file(os.path.join(folder, fn))
    edit(sd)
    save_file(sd, os.path.join(folder, fn), metadata={'format': 'pt'})


def edit_config(folder, edit):
    with open(os.path.join(folder, 'config.json')) as f:
        hf = json.load(f)
    edit(hf)
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(hf, f)


def test_wrong_shape_is_refused(tmp_path):
    """A [1] norm weight used to broadcast into 32 copies of itself; now the error names tensor, file, shapes."""
    build_reference('llama_tied').save_pretrained(tmp_path)
    edit_tensors(tmp_path, 'model.safetensors',
                 lambda sd: sd.update({'model.layers.0.input_layernorm.weight': torch.ones(1)}))
    with pytest.raises(ValueError, match=r'model\.safetensors: tensor model\.layers\.0\.input_layernorm\.weight '
                                         r'has shape \[1\], the config expects \[32\]'):
        load_pretrained(str(tmp_path))


def test_unexpected_tensor_is_refused(tmp_path):
    """A tensor the config has no place for (here a Qwen3-style q_norm in a Qwen2 folder) was dropped silently."""
    build_reference('qwen2_tied').save_pretrained(tmp_path)
    edit_tensors(tmp_path, 'model.safetensors', lambda sd: sd.update({
        'model.layers.0.self_attn.q_norm.weight': torch.ones(8), 'model.layers.2.mlp.up_proj.weight': torch.ones(1)}))
    with pytest.raises(ValueError, match=r'2 stored tensors fit no weight of this Qwen2ForCausalLM config: '
                                         r'model\.layers\.0\.self_attn\.q_norm\.weight, model\.layers\.2\.mlp'):
        load_pretrained(str(tmp_path))


@torch.no_grad()
def test_known_extra_tensors_are_skipped(tmp_path):
    """The listed kinds load as transformers loads them: old rotary inv_freq buffers, a tied lm_head copy."""
    ref = build_reference('llama_tied')
    ref.save_pretrained(tmp_path)
    edit_tensors(tmp_path, 'model.safetensors', lambda sd: sd.update({
        'model.layers.0.self_attn.rotary_emb.inv_freq': torch.ones(4), 'lm_head.weight': torch.zeros(VOCAB, 32)}))
    x = ids()
    torch.testing.assert_close(load_pretrained(str(tmp_path)).eval()(x)[0], ref(x).logits, atol=1e-4, rtol=0)


def test_mtp_layers_skipped_only_when_declared(tmp_path):
    """MTP layers the model does not build (mtp_depth=0) are skipped; a layer past the declared ones is not."""
    from model import ModelConfig
    c = ModelConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, n_embd=32, attn='mla', ffn='moe',
                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                    mtp_depth=1, tie_embeddings=False)
    torch.manual_seed(0)
    save_pretrained(GPT(c), str(tmp_path))
    assert load_pretrained(str(tmp_path), mtp_depth=0).config.mtp_depth == 0
    edit_tensors(tmp_path, 'model.safetensors',
                 lambda sd: sd.update({'model.layers.3.eh_proj.weight': sd['model.layers.2.eh_proj.weight'].clone()}))
    with pytest.raises(ValueError, match=r'1 stored tensors fit no weight.*model\.layers\.3\.eh_proj\.weight'):
        load_pretrained(str(tmp_path))


def sharded(tmp_path):
    ref = build_reference('llama_untied_gqa')
    folder = tmp_path / 'ckpt'
    ref.save_pretrained(folder, max_shard_size='20KB')
    with open(folder / 'model.safetensors.index.json') as f:
        index = json.load(f)
    assert len(set(index['weight_map'].values())) > 2
    return ref, folder, index


def write_index(folder, index):
    with open(folder / 'model.safetensors.index.json', 'w') as f:
        json.dump(index, f)


@pytest.mark.parametrize('where', ['parent', 'absolute', 'nested_up'])
def test_shard_outside_folder_is_refused(tmp_path, where):
    """A weight_map entry may only name a file inside the folder; the old loader read '../x' and '/abs/x'."""
    ref, folder, index = sharded(tmp_path)
    key, fn = next(iter(index['weight_map'].items()))
    os.replace(folder / fn, tmp_path / 'outside.safetensors')  # the shard really exists, outside
    entry = {'parent': '../outside.safetensors', 'absolute': str(tmp_path / 'outside.safetensors'),
             'nested_up': 'sub/../../outside.safetensors'}[where]
    index['weight_map'] = {k: (entry if v == fn else v) for k, v in index['weight_map'].items()}
    write_index(folder, index)
    with pytest.raises(ValueError, match=f"weight_map entry {key}: '{entry}' is not a file inside"):
        load_pretrained(str(folder))


def test_shard_problems(tmp_path):
    ref, folder, index = sharded(tmp_path)
    files = sorted(set(index['weight_map'].values()))
    # a tensor stored in two shards: which copy won depended on file order
    edit_tensors(folder, files[1], lambda sd: sd.update({'model.norm.weight': torch.zeros(32)}))
    with pytest.raises(ValueError, match=r'tensor model\.norm\.weight is stored twice'):
        load_pretrained(str(folder))
    # a shard the index names but the folder lacks
    os.remove(folder / files[1])
    with pytest.raises(FileNotFoundError, match=files[1]):
        load_pretrained(str(folder))


# ---------------------------------------------------------------------------------------------------------------
# RoPE settings: transformers 5.x writes rope_parameters, 4.x rope_scaling + rope_theta; a file may hold both

YARN = dict(factor=4.0, original_max_position_embeddings=16, beta_fast=32, beta_slow=1, mscale=1.0,
            mscale_all_dim=1.0)
ROPE_SPELLINGS = {  # name: the config.json keys that describe dsv3_yarn_tied's RoPE
    '4x': dict(rope_theta=10000.0, rope_scaling=dict(YARN, type='yarn')),
    # theta in rope_parameters, the scaling beside it: the old loader took rope_parameters and dropped YaRN
    'both_split': dict(rope_parameters=dict(rope_theta=10000.0), rope_scaling=dict(YARN, type='yarn')),
    'both_same': dict(rope_theta=10000.0, rope_parameters=dict(YARN, rope_type='yarn', rope_theta=10000.0),
                      rope_scaling=dict(YARN, type='yarn', rope_type='yarn')),
}


@pytest.mark.parametrize('spelling', list(ROPE_SPELLINGS))
@torch.no_grad()
def test_rope_spellings_match_transformers(tmp_path, spelling):
    ref = build_reference('dsv3_yarn_tied')
    ref.save_pretrained(tmp_path)

    def respell(hf):
        for k in ('rope_parameters', 'rope_scaling', 'rope_theta'):
            hf.pop(k, None)
        hf.update(ROPE_SPELLINGS[spelling])
    edit_config(tmp_path, respell)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation='eager').eval()
    x = ids()
    want = ref(x).logits
    torch.testing.assert_close(theirs(x).logits, want, atol=1e-5, rtol=0)  # transformers reads it as saved
    torch.testing.assert_close(load_pretrained(str(tmp_path)).eval()(x)[0], want, atol=1e-4, rtol=0)


ROPE_CONFLICTS = {  # name: (config.json keys, words the error must contain)
    'factor': (dict(rope_parameters=dict(YARN, rope_type='yarn', rope_theta=1e4),
                    rope_scaling=dict(YARN, type='yarn', factor=2.0)),
               "RoPE factor twice and differently: 4.0 in rope_parameters, 2.0 in rope_scaling"),
    'type': (dict(rope_parameters=dict(rope_type='default', rope_theta=1e4), rope_scaling=dict(YARN, type='yarn')),
             "RoPE rope_type twice and differently: 'default' in rope_parameters, 'yarn' in rope_scaling"),
    'theta': (dict(rope_parameters=dict(YARN, rope_type='yarn', rope_theta=1e4), rope_theta=5e5),
              "RoPE rope_theta twice and differently: 10000.0 in rope_parameters, 500000.0 in rope_theta"),
    'type_spellings': (dict(rope_scaling=dict(YARN, type='yarn', rope_type='linear')), "rope_type twice"),
}


@pytest.mark.parametrize('case', list(ROPE_CONFLICTS))
def test_rope_conflicts_are_refused(tmp_path, case):
    build_reference('dsv3_yarn_tied').save_pretrained(tmp_path)
    keys, words = ROPE_CONFLICTS[case]

    def respell(hf):
        for k in ('rope_parameters', 'rope_scaling', 'rope_theta'):
            hf.pop(k, None)
        hf.update(keys)
    edit_config(tmp_path, respell)
    with pytest.raises(ValueError, match=words.replace('(', r'\(').replace(')', r'\)')):
        load_pretrained(str(tmp_path))
