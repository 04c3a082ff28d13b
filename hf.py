"""
Hugging Face checkpoint I/O for model.GPT: config.json + *.safetensors in the layout transformers writes, with
no transformers import (tests/test_hf.py checks against transformers itself).

Reads LlamaForCausalLM, Qwen2ForCausalLM (the DeepSeek-R1-Distill bases), DeepseekV3ForCausalLM and
DeepseekV2ForCausalLM; writes Llama (Qwen2 when attn_bias) for gqa + dense, DeepseekV3 for MLA/MoE
(DeepseekV2 under softmax routing, since transformers' V3 router is sigmoid-only).

- Names map one path component at a time (_HF_PARTS): our DeepSeek-reference names (wq_a, wkv_b, ...) are the
  checkpoint's q_a_proj, kv_b_proj, ...; routed experts stay one SwiGLU per expert (mlp.experts.{i}.*_proj),
  which is how DeepSeek's checkpoints store them and what transformers 4.x and 5.x both read and write.
- MLA rope rows: checkpoints rotate interleaved pairs; we permute those rows to the rotate-half layout on load
  and back on save (mla.py's docstring explains why the logits do not change).
- MTP (DeepSeek-V3 layout): module k is stored as model.layers.{n_layer + k} with enorm, hnorm, eh_proj,
  shared_head.norm, its block, and copies of the shared embed_tokens and shared_head.head; transformers skips
  those layers, from_pretrained loads as many as the folder holds.
- Unsupported things fail loudly: other architectures, non-silu MLPs, rope scaling other than YaRN on MLA,
  Llama's attention_bias/mlp_bias, Qwen2 sliding windows.
- Loading is strict, with one-line ValueError / FileNotFoundError (a library raises; train.py prints): every
  weight must be stored with exactly its shape; every stored tensor is loaded or is one of the kinds `_skipped`
  lists by name; shards must lie inside the folder; RoPE keys spelled twice (rope_parameters, rope_scaling,
  rope_theta) must agree. transformers is laxer here: it only logs unexpected tensors, and rope_scaling silently
  overrides rope_parameters.
"""
import json
import os
import re
import warnings

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mla import rope_deinterleave
from model import GPT, ModelConfig
from tokenizer_hf import from_pretrained as tokenizer_from_pretrained


def load_pretrained(path, **overrides):
    """A local HF folder (config.json + safetensors) of LlamaForCausalLM, Qwen2ForCausalLM, DeepseekV3ForCausalLM
    or DeepseekV2ForCausalLM as a GPT; `overrides` replace ModelConfig fields (e.g. block_size=4096,
    mla_impl='absorb'); weights are fp32. A single model.safetensors or shards listed in model.safetensors.index.json.
    The RoPE table covers block_size tokens, max_position_embeddings unless overridden. Strict: every tensor
    the model needs must be stored with exactly its shape, and every stored tensor is loaded or is one of the
    known, deliberately skipped kinds (_skipped); anything else is a ValueError naming the tensor and file."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such checkpoint folder: {path}")
    cfg_path = os.path.join(path, 'config.json')
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path} has no config.json")
    with open(cfg_path) as f:
        hf = json.load(f)
    d = config_from_hf(hf)
    files = _weight_files(path)
    # the tensors' names first: the MTP depth is however many MTP layers the checkpoint really stores
    names = {}
    for fn in files:
        with safe_open(os.path.join(path, fn), framework='pt') as f:
            for k in f.keys():
                if k in names:  # two copies: which one wins would depend on the file order
                    raise ValueError(f"{path}: tensor {k} is stored twice, in {names[k]} and {fn}")
                names[k] = fn
    n_mtp = hf.get('num_nextn_predict_layers', 0) or 0
    d['mtp_depth'] = sum(f"model.layers.{d['n_layer'] + k}.eh_proj.weight" in names for k in range(n_mtp))
    d.update(overrides)
    config = ModelConfig(**d)
    model = GPT(config)
    # DeepSeek checkpoints store rope rows interleaved (V2 always; V3 unless rope_interleave is false)
    interleaved = config.attn == 'mla' and (hf['architectures'][0] == 'DeepseekV2ForCausalLM'
                                             or hf.get('rope_interleave', True))
    want = {_hf_name(n, config): n for n in model.state_dict()}
    if config.tie_embeddings:
        want.pop('lm_head.weight', None)
    # DeepseekV2 files store no balancing bias (their router has none): ours stays zero, which is that routing
    missing = sorted(k for k in want if k not in names and not k.endswith('e_score_correction_bias'))
    if missing:
        raise ValueError(f"{path}: {len(missing)} tensors the config needs are missing: {_some(missing)}")
    unexpected = sorted(k for k in names if k not in want and not _skipped(k, config, n_mtp))
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} stored tensors fit no weight of this {hf['architectures'][0]} "
                         f"config: {_some(unexpected)}")
    state = model.state_dict()
    with torch.no_grad():
        for fn in files:
            with safe_open(os.path.join(path, fn), framework='pt') as f:
                for key in f.keys():
                    if key not in want:
                        continue
                    dst = state[want[key]]
                    shape = tuple(f.get_slice(key).get_shape())
                    # exact shapes: copy_ would broadcast a [1] norm weight to every channel without a word
                    if shape != tuple(dst.shape):
                        raise ValueError(f"{os.path.join(path, fn)}: tensor {key} has shape {list(shape)}, "
                                         f"the config expects {list(dst.shape)}")
                    t = f.get_tensor(key)
                    perm = _rope_rows(config, want[key]) if interleaved else None
                    dst.copy_(t if perm is None else t[perm])
    return model


def _weight_files(path):
    """The safetensors files of a checkpoint folder, relative to it. Shards named by the index must lie inside
    the folder: a weight_map entry '../x' or '/x' would read a file the folder does not hold."""
    index = os.path.join(path, 'model.safetensors.index.json')
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get('weight_map')
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        for key, fn in weight_map.items():
            # lexical check, not realpath: hub cache snapshots are symlinks into ../../blobs, which is fine
            parts = fn.replace('\\', '/').split('/') if isinstance(fn, str) else ['..']
            if parts[0] == '' or '..' in parts or ':' in parts[0]:  # '/x', '../x', 'a/../../x', 'C:x'
                raise ValueError(f"{index}: weight_map entry {key}: {fn!r} is not a file inside {path}")
        files = sorted(set(weight_map.values()))
        for fn in files:
            if not os.path.isfile(os.path.join(path, fn)):
                raise FileNotFoundError(f"{index} names {fn}, which {path} does not hold")
        return files
    if os.path.isfile(os.path.join(path, 'model.safetensors')):
        return ['model.safetensors']
    raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json")


def _skipped(key, config, n_mtp):
    """Stored tensors we skip on purpose, by name pattern; any other unknown tensor is an error.
    - *.rotary_emb.inv_freq: the RoPE frequencies older transformers saved as buffers; we compute them.
    - lm_head.weight under tie_word_embeddings: transformers ties it to embed_tokens and ignores the copy.
    - model.layers.{n_layer + k}.embed_tokens / .shared_head.head: DeepSeek-V3's MTP modules share the main
      embedding and output head (DeepSeek-V3 sec 2.2); the checkpoint stores copies, we use the originals.
    - model.layers.{n_layer + k}.* for k >= mtp_depth (< num_nextn_predict_layers): MTP modules the config
      declares but this model does not build (mtp_depth=0 overridden, as transformers always does)."""
    if key.endswith('rotary_emb.inv_freq') or (key == 'lm_head.weight' and config.tie_embeddings):
        return True
    m = re.fullmatch(r'model\.layers\.(\d+)\.(.*)', key)
    if m is None:
        return False
    k = int(m.group(1)) - config.n_layer
    if not 0 <= k < max(n_mtp, config.mtp_depth):
        return False
    return k >= config.mtp_depth or m.group(2) in ('embed_tokens.weight', 'shared_head.head.weight')


def _some(keys, n=8):
    return ', '.join(keys[:n]) + (f', ... ({len(keys) - n} more)' if len(keys) > n else '')


def save_pretrained(model, path, dtype=None):
    """config.json + one model.safetensors that transformers and we load back:
    gqa + dense -> LlamaForCausalLM (Qwen2ForCausalLM when attn_bias), mla/moe -> DeepseekV3ForCausalLM
    (DeepseekV2ForCausalLM under softmax routing). MLA rope rows are written in DeepSeek's interleaved
    layout; MTP modules as layers n_layer.. in DeepSeek-V3's layout."""
    c = model.config
    hf = config_to_hf(c)
    if hf['architectures'][0] == 'DeepseekV2ForCausalLM':
        biased = any(b.any() for n, b in model.named_buffers() if n.endswith('e_score_correction_bias'))
        if c.norm_topk_prob or biased:
            warnings.warn("transformers' DeepseekV2 router ignores norm_topk_prob and has no correction bias: "
                          "it will not reproduce this model's routing (hf.load_pretrained will)")
    dtype = dtype or model.lm_head.weight.dtype
    hf['torch_dtype'] = str(dtype).replace('torch.', '')
    tensors = {}
    for name, t in model.state_dict().items():
        if c.tie_embeddings and name == 'lm_head.weight':
            continue
        key = _hf_name(name, c)
        perm = _rope_rows(c, name) if c.attn == 'mla' else None
        t = t if perm is None else t[torch.argsort(perm)]
        keep = name.endswith('e_score_correction_bias')  # HF keeps the balancing bias in fp32
        tensors[key] = t.detach().to('cpu', t.dtype if keep else dtype).contiguous()
    for k in range(c.mtp_depth):  # V3's MTP layers carry their own copies of the shared embedding and head
        tensors[f'model.layers.{c.n_layer + k}.embed_tokens.weight'] = tensors['model.embed_tokens.weight']
        tensors[f'model.layers.{c.n_layer + k}.shared_head.head.weight'] = \
            tensors.get('lm_head.weight', tensors['model.embed_tokens.weight'])
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, 'config.json'), 'w') as f:
        json.dump(hf, f, indent=2)
    # safetensors refuses shared storage: give each name its own copy
    seen, out = set(), {}
    for k, t in tensors.items():
        out[k] = t.clone() if t.data_ptr() in seen else t
        seen.add(t.data_ptr())
    save_file(out, os.path.join(path, 'model.safetensors'), metadata={'format': 'pt'})


# our module names -> Hugging Face's, one path component at a time
_HF_PARTS = {'attn': 'self_attn', 'wq': 'q_proj', 'wq_a': 'q_a_proj', 'q_norm': 'q_a_layernorm',
             'wq_b': 'q_b_proj', 'wkv_a': 'kv_a_proj_with_mqa', 'kv_norm': 'kv_a_layernorm', 'wkv_b': 'kv_b_proj',
             'wo': 'o_proj', 'e_score_correction_bias': 'gate.e_score_correction_bias'}


def _hf_name(name, config):
    """'layers.3.attn.wkv_a.weight' -> 'model.layers.3.self_attn.kv_a_proj_with_mqa.weight'; MTP module k
    becomes 'model.layers.{n_layer + k}' with its block flattened in and its norm as shared_head.norm."""
    parts = name.split('.')
    if parts[0] == 'lm_head':
        return name
    if parts[0] == 'mtp':
        rest = parts[2:]
        rest = rest[1:] if rest[0] == 'block' else ['shared_head'] + rest if rest[0] == 'norm' else rest
        parts = ['layers', str(config.n_layer + int(parts[1]))] + rest
    return 'model.' + '.'.join(_HF_PARTS.get(p, p) for p in parts)


def _rope_rows(config, name):
    """Row permutation that takes an MLA weight from DeepSeek's interleaved rope layout to ours (mla.py), or
    None for weights without rope rows; its argsort goes back."""
    dn, dr, dc, H = config.qk_nope_head_dim, config.qk_rope_head_dim, config.kv_lora_rank, config.n_head
    if name.endswith(('attn.wq.weight', 'attn.wq_b.weight')):
        rows = torch.arange(H * (dn + dr)).view(H, dn + dr)                    # (H, dn+dr)
        rows[:, dn:] = rows[:, dn:][:, rope_deinterleave(dr)]
        return rows.flatten()
    if name.endswith('attn.wkv_a.weight'):
        rows = torch.arange(dc + dr)
        rows[dc:] = rows[dc:][rope_deinterleave(dr)]
        return rows
    return None


_ARCHS = ('LlamaForCausalLM', 'Qwen2ForCausalLM', 'DeepseekV3ForCausalLM', 'DeepseekV2ForCausalLM')


def config_from_hf(hf):
    """config.json (transformers 4.x or 5.x spelling) -> ModelConfig kwargs; refuses what we cannot run."""
    arch = (hf.get('architectures') or ['?'])[0]
    if arch not in _ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; load_pretrained reads {', '.join(_ARCHS)}")
    quant = hf.get('quantization_config')
    if quant:  # e.g. DeepSeek-V3's fp8 blocks: a plain copy would ignore their weight_scale_inv
        method = quant.get('quant_method', '?') if isinstance(quant, dict) else '?'
        raise ValueError(f"quantized checkpoint ({method}) unsupported: dequantize it to bf16/fp32 first")
    if hf.get('hidden_act', 'silu') != 'silu':
        raise ValueError(f"hidden_act {hf['hidden_act']!r} unsupported (SwiGLU with silu only)")
    rope = rope_from_hf(hf)
    rope_type = rope.get('rope_type', 'default')
    n_head = hf['num_attention_heads']
    d = dict(vocab_size=hf['vocab_size'], block_size=hf['max_position_embeddings'], n_layer=hf['num_hidden_layers'],
             n_head=n_head, n_kv_head=hf.get('num_key_value_heads') or n_head, n_embd=hf['hidden_size'],
             intermediate_size=hf['intermediate_size'], rope_theta=rope.get('rope_theta', 1e4),
             norm_eps=hf.get('rms_norm_eps', 1e-6), tie_embeddings=hf.get('tie_word_embeddings', False))
    if arch in ('LlamaForCausalLM', 'Qwen2ForCausalLM'):
        if rope_type != 'default':
            raise NotImplementedError(f"rope type {rope_type!r} is not implemented for {arch} (plain RoPE only)")
        if hf.get('attention_bias') or hf.get('mlp_bias'):
            raise NotImplementedError("Llama attention_bias/mlp_bias (bias on o_proj or the MLP) is not supported")
        if hf.get('use_sliding_window'):
            raise NotImplementedError("Qwen2 sliding-window attention is not supported")
        d.update(attn='gqa', ffn='dense', head_dim=hf.get('head_dim') or hf['hidden_size'] // n_head,
                 attn_bias=arch == 'Qwen2ForCausalLM')
        return d
    if hf.get('attention_bias'):
        raise NotImplementedError("DeepSeek attention_bias is not supported")
    # every field is set: ModelConfig's defaults are the tiny world's MLA + MoE, not this checkpoint's
    d.update(attn='mla', ffn='dense', n_kv_head=n_head, q_lora_rank=hf.get('q_lora_rank') or 0, kv_lora_rank=hf['kv_lora_rank'],
             qk_nope_head_dim=hf['qk_nope_head_dim'], qk_rope_head_dim=hf['qk_rope_head_dim'],
             v_head_dim=hf['v_head_dim'])
    if rope_type == 'yarn':
        orig = rope.get('original_max_position_embeddings', hf['max_position_embeddings'])
        if rope.get('attention_factor') is not None or rope.get('truncate', True) is False:
            raise NotImplementedError("YaRN attention_factor / truncate=False are not supported")
        d.update(rope_factor=rope.get('factor') or hf['max_position_embeddings'] / orig, rope_original_max_pos=orig,
                 rope_beta_fast=rope.get('beta_fast') or 32.0, rope_beta_slow=rope.get('beta_slow') or 1.0,
                 rope_mscale=rope.get('mscale') or 0.0, rope_mscale_all_dim=rope.get('mscale_all_dim') or 0.0)
    elif rope_type != 'default':
        raise NotImplementedError(f"rope type {rope_type!r} is not implemented for {arch} (default or yarn)")
    E = hf.get('n_routed_experts') or 0
    if E:
        v2 = arch == 'DeepseekV2ForCausalLM'
        grouped = hf.get('topk_method', 'noaux_tc') != 'greedy' and (hf.get('n_group') or 1) > 1
        d.update(ffn='moe', n_routed_experts=E, n_shared_experts=hf.get('n_shared_experts') or 0,
                 moe_intermediate_size=hf['moe_intermediate_size'], num_experts_per_tok=hf['num_experts_per_tok'],
                 n_group=hf['n_group'] if grouped else 1, topk_group=hf['topk_group'] if grouped else 1,
                 scoring_func='softmax' if v2 else hf.get('scoring_func', 'sigmoid'),
                 norm_topk_prob=bool(hf.get('norm_topk_prob', False)),
                 routed_scaling_factor=hf.get('routed_scaling_factor', 1.0),
                 first_k_dense_replace=hf.get('first_k_dense_replace', 0))
    return d


def rope_from_hf(hf):
    """The RoPE settings of config.json as one dict (rope_type, rope_theta, factor, ...). transformers 5.x writes
    `rope_parameters` with rope_theta and rope_type inside; 4.x wrote `rope_scaling` (`type` or `rope_type`,
    factor, ...) beside a top-level `rope_theta`. A file may hold both (a 4.x recipe's rope_scaling added to a
    5.x config), and transformers 5 then takes rope_scaling whole (modeling_rope_utils.
    convert_rope_params_to_dict). We merge all three and refuse a key two of them set differently, so a
    scaling is never dropped and a contradiction is never settled by a silent precedence rule."""
    merged, where = {}, {}
    for name in ('rope_parameters', 'rope_scaling', 'rope_theta'):
        d = hf.get(name)
        if d is None:
            continue
        if name == 'rope_theta':
            d = {'rope_theta': d}
        elif not isinstance(d, dict):
            raise ValueError(f"config.json {name} is {d!r}, not an object")
        for key, value in d.items():
            key = 'rope_type' if key == 'type' else key  # 4.x's spelling
            if value is None:
                continue
            if key in merged and merged[key] != value:
                raise ValueError(f"config.json sets RoPE {key} twice and differently: {merged[key]!r} in "
                                 f"{where[key]}, {value!r} in {name}; keep one")
            merged[key], where[key] = value, name
    return merged


def config_to_hf(c):
    """ModelConfig -> config.json in the form transformers writes (rope in the 4.x spelling 5.x also reads)."""
    hf = dict(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
              num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, max_position_embeddings=c.block_size,
              rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings,
              hidden_act='silu', attention_bias=False)
    if c.attn == 'gqa':
        if c.ffn != 'dense' or c.mtp_depth:
            raise ValueError("no Hugging Face architecture holds GQA with MoE or MTP; use attn='mla'")
        arch = 'Qwen2ForCausalLM' if c.attn_bias else 'LlamaForCausalLM'
        hf.update(architectures=[arch], model_type='qwen2' if c.attn_bias else 'llama',
                  num_key_value_heads=c.n_kv_head, head_dim=c.head_dim)
        if c.attn_bias:
            del hf['attention_bias']  # Qwen2 always has q/k/v biases and never an o_proj one
            hf['use_sliding_window'] = False
        return hf
    v2 = c.ffn == 'moe' and c.scoring_func == 'softmax'
    E = c.n_routed_experts if c.ffn == 'moe' else 1
    hf.update(architectures=['DeepseekV2ForCausalLM' if v2 else 'DeepseekV3ForCausalLM'],
              model_type='deepseek_v2' if v2 else 'deepseek_v3', num_key_value_heads=c.n_head,
              q_lora_rank=c.q_lora_rank or None, kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim,
              qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim,
              n_routed_experts=E, n_shared_experts=c.n_shared_experts, moe_intermediate_size=c.moe_intermediate_size,
              num_experts_per_tok=min(c.num_experts_per_tok, E), n_group=c.n_group, topk_group=c.topk_group,
              norm_topk_prob=c.norm_topk_prob, routed_scaling_factor=c.routed_scaling_factor,
              first_k_dense_replace=c.first_k_dense_replace if c.ffn == 'moe' else c.n_layer,
              scoring_func=c.scoring_func, num_nextn_predict_layers=c.mtp_depth)
    if v2:
        hf['topk_method'] = 'group_limited_greedy' if c.n_group > 1 else 'greedy'
    else:
        hf.update(topk_method='noaux_tc', rope_interleave=True)
    if c.rope_factor > 1:
        hf['rope_scaling'] = dict(type='yarn', rope_type='yarn', factor=c.rope_factor,
                                  original_max_position_embeddings=c.rope_original_max_pos,
                                  beta_fast=c.rope_beta_fast, beta_slow=c.rope_beta_slow,
                                  mscale=c.rope_mscale, mscale_all_dim=c.rope_mscale_all_dim)
    return hf


# -----------------------------------------------------------------------------
# whole folders: config.json + *.safetensors + tokenizer.json in (the policy, the reference, a teacher,
# long2short's source), and any checkpoint of ours back out (train.py --save-hf). Errors are one-line ValueErrors.

RUN_FILE = 'nanor1_run.json'   # what save_hf adds to a folder: the run's configs, so a round trip keeps its world
# config.json fields that describe the network; the rest of ModelConfig is how we run it (block_size: how far the
# RoPE table reaches, mla_impl, dropout, MoE balancing speed, ...)
ARCH_FIELDS = ('vocab_size', 'n_layer', 'n_head', 'n_kv_head', 'n_embd', 'head_dim', 'intermediate_size', 'rope_theta',
               'norm_eps', 'tie_embeddings', 'attn_bias', 'attn', 'ffn', 'q_lora_rank', 'kv_lora_rank',
               'qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim', 'n_routed_experts', 'n_shared_experts',
               'moe_intermediate_size', 'num_experts_per_tok', 'n_group', 'topk_group', 'scoring_func',
               'norm_topk_prob', 'routed_scaling_factor', 'first_k_dense_replace')


def is_hf_folder(path):
    return bool(path) and os.path.isdir(path) and os.path.isfile(os.path.join(path, 'config.json'))


def hf_config(path):
    """The ModelConfig fields of a folder's config.json (nothing else is read), or one line saying why not."""
    try:
        with open(os.path.join(path, 'config.json')) as f:
            return config_from_hf(json.load(f))
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as e:
        raise ValueError(f"{path}/config.json: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


def check_hf_config(path, given):
    """The model fields a preset or a flag set must describe the folder's model: `--preset qwen2.5-3b-countdown
    --init-from Qwen2.5-0.5B` stops here, before any weight is read, naming the fields that differ."""
    hf = hf_config(path)
    diff = {k: (v, hf[k]) for k, v in given.items() if k in ARCH_FIELDS and k in hf and hf[k] != v}
    if diff:
        raise ValueError(f"--init-from {path} holds another model than these settings describe (field: set vs "
                         f"config.json): {diff}; pick the preset of that model or drop the model flags")


def load_hf(path):
    """(model, tokenizer, checkpoint-like dict) from a Hugging Face folder: GPT.from_pretrained (strict) and
    tokenizer_hf.from_pretrained. The dict has what load_policy's callers read from a checkpoint of ours, with the
    run's configs when the folder came from save_hf."""
    try:
        model = load_pretrained(path)
        tok = tokenizer_from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as e:
        raise ValueError(f"{path}: cannot load it as a Hugging Face model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    if tok.n_vocab > model.config.vocab_size:
        raise ValueError(f"{path}: tokenizer.json has {tok.n_vocab} tokens but the model only "
                         f"{model.config.vocab_size} rows")
    if tok.eos is None:
        raise ValueError(f"{path}: the tokenizer names no eos and has no stop token a rollout could end with")
    run = {}
    if os.path.isfile(os.path.join(path, RUN_FILE)):
        with open(os.path.join(path, RUN_FILE)) as f:
            run = json.load(f)
    ck = {'model': model.state_dict(), 'model_config': model.config.to_dict(), 'tokenizer': tok.to_dict(),
          'train_config': run.get('train_config', {}), 'task_config': run.get('task_config', {}),
          'step': run.get('step', 0)}
    return model, tok, ck


def save_hf(model, tok, path, ck=None):
    """A folder transformers loads with the same logits: config.json + model.safetensors (save_pretrained, in
    the model's own dtype), the tokenizer files, bos/eos ids in config.json, and RUN_FILE with the configs of
    the checkpoint `ck` it came from."""
    save_pretrained(model, path)
    tok.save_pretrained(path)
    cfg_path = os.path.join(path, 'config.json')
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(bos_token_id=tok.bos, eos_token_id=tok.eos, pad_token_id=tok.pad)
    ck = ck or {}
    for name, obj in ((cfg_path, cfg), (os.path.join(path, RUN_FILE),
                                        {k: ck.get(k) for k in ('train_config', 'task_config', 'step')})):
        with open(name, 'w') as f:
            json.dump(obj, f, indent=2)
