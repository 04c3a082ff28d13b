"""
R1-Zero from a real checkpoint, end to end on CPU with no download: a tiny random Qwen2 folder (transformers'
Qwen2Config, save_pretrained) with a byte-level BPE trained by the `tokenizers` library in Qwen2.5's shape (its
one-digit-per-piece regex and NFC, <|endoftext|> <|im_start|> <|im_end|> added, no bos), then
`train.py --init-from <folder> --stage grpo` on TinyZero's countdown and prompt, killed and resumed to the same
metrics, exported with --save-hf, and the export loaded by transformers with our logits (1e-5) and by `tokenizers`
with our ids. Also: the two Qwen2.5 presets resolve with --dry-run on CPU without weights, and their meta-device
parameter counts equal the released models' and transformers' own count; a file or folder that is not a model
of ours gives one line; distill's --teacher-from and long2short's --from take the exported folder; a tiny-world
model exports too (our tiktoken tokenizer as a tokenizer.json, the model as Llama).

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_realckpt.py -q      (skips itself without transformers)
"""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
transformers = pytest.importorskip('transformers')
tokenizers = pytest.importorskip('tokenizers')
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

import long2short  # noqa: E402
import train  # noqa: E402
from harness import load_policy  # noqa: E402
from tasks import TaskConfig, format_prompt, problems  # noqa: E402
from test_train import dies, main, run  # noqa: E402

torch.set_num_threads(1)
QWEN2 = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
         r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIALS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
TZ = ['--task', 'tinyzero', '--template', 'tinyzero', '--n-numbers', '4', '--min-numbers', '3', '--lo', '1',
      '--hi', '100', '--max-target', '100']
TZ_CFG = TaskConfig(task='tinyzero', template='tinyzero', n_numbers=4, min_numbers=3, lo=1, hi=100, max_target=100)


def qwen_tokenizer_json():
    """A byte-level BPE in Qwen2.5's shape, trained on the task's own prompts and a few answers."""
    texts = [format_prompt(p, t) + f" {p.solution} </think>\n<answer> {p.solution} </answer><|endoftext|>"
             for p in problems('countdown', 'train', 60, 0, TZ_CFG) for t in ('tinyzero', 'chat')]
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2), behavior='isolated'),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.fixture(scope='module')
def qwen_folder(tmp_path_factory):
    """config.json + model.safetensors + tokenizer.json + tokenizer_config.json, as a Qwen2.5 base folder holds
    them (tied embeddings, vocab padded past the tokenizer, bos_token null, bos_token_id naming <|endoftext|>).
    The shapes are the `test` preset's (2 layers, d=32, 2 heads, 1 KV head): it sets them, so they must agree."""
    path = tmp_path_factory.mktemp('qwen')
    tok = qwen_tokenizer_json()
    tok.save(str(path / 'tokenizer.json'))
    eot = tok.token_to_id('<|endoftext|>')
    json.dump({'bos_token': None, 'eos_token': '<|endoftext|>', 'pad_token': '<|endoftext|>',
               'tokenizer_class': 'Qwen2TokenizerFast'}, open(path / 'tokenizer_config.json', 'w'))
    cfg = transformers.Qwen2Config(vocab_size=448, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                   rope_theta=1e6, tie_word_embeddings=True, initializer_range=0.1,
                                   bos_token_id=eot, eos_token_id=eot)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(str(path))
    return str(path)


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, 'grpo', 'metrics.jsonl'))]


def test_grpo_from_a_qwen_folder_resumes_and_exports(qwen_folder, tmp_path):
    a, b, hf = str(tmp_path / 'a'), str(tmp_path / 'b'), str(tmp_path / 'hf')
    common = ['--preset', 'test', '--stage', 'grpo', '--init-from', qwen_folder, '--ckpt-interval', '2',
              '--rl-steps', '3'] + TZ
    main(common + ['--out-dir', a])
    p = run(common + ['--out-dir', b, '--exit-after', '2'], check=False)   # a hard exit: a process of its own
    assert p.returncode == 3, p.stderr[-3000:]
    main(common + ['--out-dir', b, '--resume', '--save-hf', hf])
    ra, rb = metrics(a), metrics(b)
    assert [r['step'] for r in ra] == [r['step'] for r in rb] == [0, 1, 2, 3]
    for x, y in zip(ra, rb):
        for k in ('reward', 'response_len', 'eval_pass@1', 'loss', 'kl'):
            if k in x:
                assert abs(x[k] - y[k]) < 1e-6, (k, x, y)

    # our checkpoint holds the tokenizer whole: Qwen's, no bos, the stop tokens
    model, tok, ck = load_policy(os.path.join(b, 'grpo', 'ckpt.pt'), 'cpu')
    ref_tok = tokenizers.Tokenizer.from_file(os.path.join(qwen_folder, 'tokenizer.json'))
    assert 'hf_files' in ck['tokenizer'] and tok.bos is None
    assert tok.stop_ids == {ref_tok.token_to_id('<|endoftext|>'), ref_tok.token_to_id('<|im_end|>')}
    p = problems('countdown', 'test', 1, 0, TZ_CFG)[0]
    prompt = format_prompt(p, 'tinyzero')
    assert tok.encode(prompt) == ref_tok.encode(prompt).ids and tok.decode(tok.encode(prompt)) == prompt
    assert len(tok.encode(' 100')) >= 3                                   # numbers are several tokens here
    sample = json.loads(open(os.path.join(b, 'grpo', 'samples.jsonl')).readline())
    assert sample['prompt'].startswith('A conversation') and sample['prompt'].endswith('<think>')   # no bos

    # the export: transformers' logits and tokenizer agree with ours; the folder comes back in as a policy
    assert sorted(os.listdir(hf)) == ['config.json', 'model.safetensors', 'nanor1_run.json', 'tokenizer.json',
                                      'tokenizer_config.json']
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf, attn_implementation='eager').eval()
    x = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x)[0], theirs(x).logits, atol=1e-5, rtol=0)
    trained = json.load(open(os.path.join(hf, 'config.json')))
    assert trained['architectures'] == ['Qwen2ForCausalLM'] and trained['eos_token_id'] == tok.eos
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf)
    assert hf_tok(prompt, add_special_tokens=True)['input_ids'] == tok.encode(prompt)
    again, tok2, ck2 = load_policy(hf, 'cpu')
    assert ck2['task_config']['task'] == 'tinyzero' and tok2.to_dict() == tok.to_dict()
    torch.testing.assert_close(again(x)[0], model(x)[0], atol=0, rtol=0)

    # the exported folder is a teacher for distill and a source for long2short
    main(['--preset', 'test', '--stage', 'distill', '--teacher-from', hf, '--init-from', qwen_folder, '--out-dir',
         str(tmp_path / 'd'), '--rs-problems', '4', '--rs-samples', '2', '--sft-steps', '2'] + TZ)
    assert os.path.isfile(tmp_path / 'd' / 'distill' / 'ckpt.pt')
    long2short.main(['merge', '--from', hf, '--out-dir', str(tmp_path / 'l2s')])
    s = json.load(open(tmp_path / 'l2s' / 'merge' / 'summary.json'))
    assert s['method'] == 'merge' and s['n_eval'] == 8                   # the export's run: test preset's n_eval


def test_tiny_world_model_exports_too(tmp_path, capsys):
    """--save-hf after any stage, here the tiny world's pretrain: our tiktoken tokenizer becomes a tokenizer.json
    and the dense test model a LlamaForCausalLM; transformers gives our logits and our ids."""
    out, hf = str(tmp_path / 'run'), str(tmp_path / 'hf')
    main(['--preset', 'test', '--stage', 'pretrain', '--pt-steps', '2', '--out-dir', out, '--save-hf', hf])
    model, tok, _ = load_policy(os.path.join(out, 'pretrain', 'ckpt.pt'), 'cpu')
    p = problems('countdown', 'test', 1, 1337, TaskConfig())[0]
    text = format_prompt(p, 'short') + '<think>8+7=15 vs 280 no.</think><answer>(8*7)*5</answer><|eos|>'
    ids = [tok.bos] + tok.encode(text)
    assert transformers.AutoTokenizer.from_pretrained(hf)(text, add_special_tokens=False)['input_ids'] == ids[1:]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf, attn_implementation='eager').eval()
    assert type(theirs).__name__ == 'LlamaForCausalLM'
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x)[0], theirs(x).logits, atol=1e-5, rtol=0)
    dies(capsys, ['--preset', 'test', '--stage', 'pretrain', '--pt-steps', '2', '--out-dir', out, '--resume',
                  '--save-hf', hf], f"--save-hf {hf} already holds a model")


def test_grpo_from_a_qwen_folder_two_ranks_match_one(qwen_folder, tmp_path):
    """The same run from the Qwen folder under torchrun (2 gloo ranks): the metrics and the weights of one process."""
    one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
    # torchrun's own parser reads '--lo' as an abbreviation of its --log-dir: TZ without it (lo=1 is the default)
    tz = [a for i, a in enumerate(TZ) if a != '--lo' and (i == 0 or TZ[i - 1] != '--lo')]
    common = ['--preset', 'test', '--stage', 'grpo', '--init-from', qwen_folder, '--rl-steps', '2'] + tz
    main(common + ['--out-dir', one])
    run(common + ['--out-dir', two], torchrun=True)
    a, b = metrics(one), metrics(two)
    assert [r['step'] for r in a] == [r['step'] for r in b] == [0, 1, 2]
    for x, y in zip(a, b):
        assert abs(x.get('reward', 0) - y.get('reward', 0)) < 1e-6
    wa = torch.load(os.path.join(one, 'grpo', 'ckpt.pt'), weights_only=True)['model']
    wb = torch.load(os.path.join(two, 'grpo', 'ckpt.pt'), weights_only=True)['model']
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)


def test_not_a_model_gives_one_line(qwen_folder, tmp_path, capsys):
    g = ['--preset', 'test', '--stage', 'grpo', '--out-dir', str(tmp_path / 'g')] + TZ
    st = os.path.join(qwen_folder, 'model.safetensors')
    dies(capsys, g + ['--init-from', st], st, 'not a nanoR1 checkpoint: pass the folder')
    dies(capsys, g + ['--init-from', str(tmp_path)], 'is a folder', 'needs config.json')
    # the flags describe another model than the folder holds: refused before any weight is read
    dies(capsys, g + ['--init-from', qwen_folder, '--n-layer', '3'], "holds another model", "'n_layer': (3, 2)")
    dies(capsys, ['--preset', 'qwen2.5-0.5b-countdown', '--init-from', qwen_folder, '--dry-run'],
         "holds another model", "'n_embd': (896, 32)")


# the released models' sizes (Hugging Face model cards: Qwen/Qwen2.5-0.5B, Qwen/Qwen2.5-3B)
REAL = {'qwen2.5-0.5b-countdown': 494_032_768, 'qwen2.5-3b-countdown': 3_085_938_688}


@pytest.mark.parametrize('preset', sorted(REAL))
def test_qwen_presets_dry_run_without_weights(preset, capsys):
    train.main(['--preset', preset, '--dry-run'])
    lines = capsys.readouterr().out.strip().splitlines()
    config, plan = json.loads(lines[0]), json.loads(lines[-1])
    assert plan['dry_run'] and plan['params'] == REAL[preset] and plan['stages'] == ['grpo']
    assert config['task'] == 'tinyzero' and config['template'] == 'tinyzero' and config['max_new_tokens'] == 1024
    assert config['rl_lr'] == 1e-6 and config['beta'] == 0.001 and config['block_size'] == 1280
    # transformers' own Qwen2 at the preset's shapes, on the meta device: the same count
    c = config
    hf = transformers.Qwen2Config(vocab_size=c['vocab_size'], hidden_size=c['n_embd'], num_hidden_layers=c['n_layer'],
                                  num_attention_heads=c['n_head'], num_key_value_heads=c['n_kv_head'],
                                  intermediate_size=c['intermediate_size'], tie_word_embeddings=c['tie_embeddings'])
    with torch.device('meta'):
        assert sum(p.numel() for p in transformers.Qwen2ForCausalLM(hf).parameters()) == REAL[preset]


def test_a_preset_too_big_for_the_machine_stops_before_loading(tmp_path, capsys):
    """Without --dry-run, the 3B preset on this machine stops with one line from the memory plan before it reads a
    weight or builds a model (its fp32 weights alone, 11.5 GiB, are what the plan counts, never allocated)."""
    dies(capsys, ['--preset', 'qwen2.5-3b-countdown', '--out-dir', str(tmp_path / 'q3')], 'GiB per rank, more than',
         '--dry-run prints the plan')
    assert not os.path.exists(tmp_path / 'q3')
