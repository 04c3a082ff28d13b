"""
tokenizer_hf.from_pretrained against the Hugging Face `tokenizers` library as the reference implementation.

We train small byte-level BPEs (vocab 800) with `tokenizers` itself, in the shapes of released tokenizers:
a cl100k/Llama-3 Split regex, Qwen2's regex with its NFC normalizer, DeepSeek-V3's three Splits, GPT-2's
ByteLevel-only regex, plus two edits of the saved JSON (ids shuffled out of merge order; ignore_merges as in
Llama 3). Each is saved as a hub-style folder and loaded back by both libraries; our ids must equal theirs on the
training lines, held-out strings, random code points and random mixes of awkward pieces (whitespace runs,
contractions, combining marks, added tokens), with and without added-token splitting, and decode must agree.
Edited files must be refused with a ValueError that names the culprit (test_clear_errors): unknown Split regexes
(one that backtracks exponentially, one that matches ""), empty/duplicate/colliding added tokens, shared or
missing ids, malformed merges. A tokenizer travels in our checkpoints (to_dict / from_dict round trip, no folder
needed), names its bos/eos/pad and stop tokens as HF would use them (Qwen: no bos), and our own tiktoken
tokenizer exports to a tokenizer.json that `tokenizers` reads with the same ids.

Run: python -m pytest tests/test_tokenizer_hf.py -q      (skips itself when tokenizers is not installed)
"""
import io
import json
import os
import random
import sys
import unicodedata

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
tokenizers = pytest.importorskip('tokenizers')
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

from tokenizer_hf import from_pretrained  # noqa: E402

SPECIALS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<think>', '</think>']
CL100K = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
          r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
LLAMA3 = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
          r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2 = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
         r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
DEEPSEEK_V3 = [r'\p{N}{1,3}', r'[一-龥぀-ゟ゠-ヿ]+',
               r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
               r"""| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""]

WORDS = ["the", "The", "reasoning", "model", "I'm", "don't", "they'll", "IT'S", "we've", "naïve", "café", "résumé",
         "Ångström", "Straße", "e\u0301t\u0065\u0301", "日本語のテキスト", "中文分词测试", "한국어", "العربية", "עברית",
         "नमस्ते", "🙂", "👍🏽", "👨‍👩‍👧", "🇯🇵", "1234567890", "3.14159", "2024-06-01", "0007", "x_1", "->", "://",
         "¿Qué?", "!!!", "...", "\u00a0", "\u200b", "Ａｂｃ"]
CODE = ["def f(x):\n    return x**2 + 1\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
        "if a != b:  # trailing   \n        pass", "print(f'{x!r:>10}')", "<div class=\"a\">&amp;</div>"]
CHAT = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>"
HELD_OUT = ["", " ", "\n", "\r\n\r\n", "\t\t\t", "   leading and trailing   ", "Ça va? Très bien!!! 😀😀",
            "    indented\n\t\tcode  \n", "99999999999999", "x<think>y</think>z", "<think><think></think>",
            "<|endoftext", CHAT,
            "a\u0301e\u0301", "'S 'LL 'Re 'd", "\u3000ideographic space\u00a0nbsp", "\x00\x01\x7f\x1b[0m",
            "ｆｕｌｌｗｉｄｔｈ", "an unreachable", "unreachable unreachables", "ไทย ภาษา", "Ελληνικά", "кириллица",
            "ab12345cd", "日本123語", "<|endoftext|>" * 3]
MIX_POOL = [" ", "  ", "\t", "\n", "\r\n", "a", "The", "'s", "'LL", "1", "12345", "é", "e\u0301", "\u0301", "日本", "カ",
            "🙂", "👍🏽", "ال", ".", "!!", "(", ")", "#", "_", "\u00a0", "\x0b"] + SPECIALS


def corpus(n=300, seed=0):
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        parts = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        line = ''.join(p + rng.choice([' ', ' ', ' ', '  ', '\t', '\n', ', ', '. ']) for p in parts)
        if rng.random() < 0.3:
            line += rng.choice(CODE)
        if rng.random() < 0.3:
            line = (f"<|im_start|>user\n{line}<|im_end|>\n<|im_start|>assistant\n"
                    f"<think>{line}</think>{line}<|endoftext|>")
        lines.append(line + rng.choice(['', '   ', '\n', '  \n\n']))
    return lines


def sample_texts(seed=1):
    rng = random.Random(seed)
    texts = corpus() + HELD_OUT + WORDS + CODE
    planes = [(0x0, 0x7f), (0xa0, 0x36f), (0x370, 0x52f), (0x590, 0x6ff), (0x900, 0x97f), (0xe00, 0xe7f),
              (0x2000, 0x206f), (0x3000, 0x30ff), (0x4e00, 0x9fff), (0xac00, 0xd7a3), (0xff00, 0xffef),
              (0x1f300, 0x1faff)]
    for _ in range(150):  # random code points from many scripts
        texts.append(''.join(chr(rng.randint(*rng.choice(planes))) for _ in range(rng.randint(1, 40))))
    for _ in range(50):  # anything outside the surrogates
        texts.append(''.join(chr(rng.choice([rng.randint(1, 0xd7ff), rng.randint(0xe000, 0x10ffff)]))
                             for _ in range(rng.randint(1, 20))))
    for _ in range(300):  # awkward pieces glued together
        texts.append(''.join(rng.choice(MIX_POOL) for _ in range(rng.randint(1, 25))))
    return texts


def train(splits, normalizer=None):
    """A byte-level BPE trained by `tokenizers`; splits=None means GPT-2's ByteLevel(use_regex=True) alone."""
    tok = tokenizers.Tokenizer(models.BPE())
    if splits is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(p), behavior='isolated') for p in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    if normalizer:
        tok.normalizer = normalizer
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    return json.loads(tok.to_str())


def save(folder, tj, tokenizer_config=None, config=None):
    os.makedirs(folder, exist_ok=True)
    for name, d in (('tokenizer.json', tj), ('tokenizer_config.json', tokenizer_config), ('config.json', config)):
        if d is not None:
            with open(os.path.join(folder, name), 'w', encoding='utf-8') as f:
                json.dump(d, f, ensure_ascii=False)
    return str(folder)


def shuffle_ids(tj, seed=0):
    """Give the non-added tokens a random permutation of their ids: HF still merges by `merges` order."""
    tj = json.loads(json.dumps(tj))
    added = {t['id'] for t in tj['added_tokens']}
    ids = sorted(i for i in tj['model']['vocab'].values() if i not in added)
    perm = dict(zip(ids, random.Random(seed).sample(ids, len(ids))))
    tj['model']['vocab'] = {s: perm.get(i, i) for s, i in tj['model']['vocab'].items()}
    return tj


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp('hf_tok')
    cl100k = train([CL100K])
    # a vocab token no merge makes: HF emits it for a whole piece only under ignore_merges, never otherwise
    unreachable = json.loads(json.dumps(cl100k))
    unreachable['model']['vocab']['Ġunreachable'] = len(cl100k['model']['vocab'])
    ignore = json.loads(json.dumps(unreachable))
    ignore['model']['ignore_merges'] = True
    chat = {'bos_token': {'content': '<|im_start|>', 'lstrip': False, '__type': 'AddedToken'},
            'eos_token': '<|endoftext|>', 'pad_token': None}
    return {
        'root': root,
        'cl100k': save(root / 'cl100k', cl100k, tokenizer_config=chat),
        'llama3': save(root / 'llama3', train([LLAMA3])),
        'qwen2': save(root / 'qwen2', train([QWEN2], normalizers.NFC()), tokenizer_config=chat),
        'deepseek_v3': save(root / 'deepseek_v3', train(DEEPSEEK_V3)),
        'gpt2': save(root / 'gpt2', train(None), config={'bos_token_id': 0, 'eos_token_id': [0, 3]}),
        'shuffled_ids': save(root / 'shuffled_ids', shuffle_ids(unreachable)),
        'ignore_merges': save(root / 'ignore_merges', ignore),
    }


@pytest.mark.parametrize('name', ['cl100k', 'llama3', 'qwen2', 'deepseek_v3', 'gpt2', 'shuffled_ids',
                                  'ignore_merges'])
def test_same_ids_as_tokenizers(folders, name):
    path = folders[name]
    ref = tokenizers.Tokenizer.from_file(os.path.join(path, 'tokenizer.json'))
    tok = from_pretrained(path)
    assert tok.exact == (name not in ('qwen2', 'deepseek_v3'))  # NFC / leading Splits need the Python steps
    assert (tok.rank_to_id is not None) == (name == 'shuffled_ids')
    assert tok.n_vocab == ref.get_vocab_size(with_added_tokens=True)
    n_merged = 0
    for text in sample_texts():
        ids = ref.encode(text, add_special_tokens=False).ids
        assert tok.encode(text) == ids, text
        n_merged += len(ids) < len(text.encode())
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False), text
        if name != 'qwen2':  # NFC changes the text on purpose
            assert tok.decode(ids) == text
        ref.encode_special_tokens = True  # added tokens are plain text now
        plain = ref.encode(text, add_special_tokens=False).ids
        ref.encode_special_tokens = False
        assert tok.encode(text, special=False) == plain, text
        assert not set(plain) & tok.special_ids
    assert n_merged > 400  # the merges are exercised, not just single bytes


def test_fast_path_agrees_with_slow_twin(folders):
    """The exact case hands everything to tiktoken; the step-by-step pipeline must give the same ids."""
    for name in ('cl100k', 'gpt2', 'shuffled_ids'):
        tok = from_pretrained(folders[name])
        for text in sample_texts(seed=2):
            assert tok.encode_slow(text) == tok.encode(text), (name, text)
            assert tok.encode_slow(text, special=False) == tok.encode(text, special=False), (name, text)
    tok = from_pretrained(folders['cl100k'])
    ids = tok.encode(CHAT)
    assert tok.enc.encode(CHAT, allowed_special='all') == ids  # .enc speaks HF ids
    assert ids[0] == tok.bos and ids[-1] == tok.think


def test_named_token_ids(folders):
    """bos/eos/pad as the folder names them (`named`); what a rollout uses: pad falls back to eos, eos to the first
    stop token the tokenizer has, and every stop token (eos, <|im_end|>, ...) is in stop_ids."""
    ref = tokenizers.Tokenizer.from_file(os.path.join(folders['cl100k'], 'tokenizer.json'))
    eot, im_end = ref.token_to_id('<|endoftext|>'), ref.token_to_id('<|im_end|>')
    tok = from_pretrained(folders['cl100k'])  # tokenizer_config.json: AddedToken dict and plain string
    assert tok.named[:3] == (ref.token_to_id('<|im_start|>'), eot, None)
    assert (tok.bos, tok.eos, tok.pad, tok.stop_ids) == (ref.token_to_id('<|im_start|>'), eot, eot, {eot, im_end})
    assert (tok.think, tok.think_end) == (ref.token_to_id('<think>'), ref.token_to_id('</think>'))
    tok = from_pretrained(folders['gpt2'])  # config.json ids, a list of eos ids gives the first (and stops at each)
    assert tok.named[:3] == (0, 0, None) and (tok.bos, tok.eos, tok.pad) == (0, 0, 0)
    assert tok.stop_ids == {0, 3, im_end}
    tok = from_pretrained(folders['deepseek_v3'])  # neither file: no bos, the first stop token it has as eos
    assert tok.named[:3] == (None, None, None) and (tok.bos, tok.eos, tok.pad) == (None, eot, eot)
    tok = from_pretrained(folders['qwen2'])  # NFC: 'e' + combining acute comes back as one 'é'
    assert tok.decode(tok.encode('e\u0301')) == unicodedata.normalize('NFC', 'e\u0301') == '\u00e9'


def test_qwen_has_no_bos(tmp_path, folders):
    """Qwen2.5 says `"bos_token": null` in tokenizer_config.json and bos_token_id <|endoftext|> in config.json:
    HF prepends nothing, so neither may we. `"add_bos_token": false` means the same."""
    tj = json.load(open(os.path.join(folders['qwen2'], 'tokenizer.json')))
    eot = next(t['id'] for t in tj['added_tokens'] if t['content'] == '<|endoftext|>')
    path = save(tmp_path / 'q', tj, tokenizer_config={'bos_token': None, 'eos_token': '<|endoftext|>'},
                config={'bos_token_id': eot, 'eos_token_id': eot})
    assert (from_pretrained(path).bos, from_pretrained(path).eos) == (None, eot)
    path = save(tmp_path / 'l', tj, tokenizer_config={'bos_token': '<|im_start|>', 'add_bos_token': False})
    assert from_pretrained(path).bos is None


@pytest.mark.parametrize('name', ['qwen2', 'deepseek_v3', 'shuffled_ids'])
def test_to_dict_round_trip(folders, name):
    """A checkpoint carries the tokenizer whole: from_dict(to_dict()) encodes and stops as the folder's does, with
    no folder, through torch.save(weights_only) as a checkpoint stores it; save_pretrained writes the files back."""
    import torch
    from tokenizer_hf import from_dict
    tok = from_pretrained(folders[name])
    buf = io.BytesIO()
    torch.save({'tokenizer': tok.to_dict()}, buf)
    buf.seek(0)
    back = from_dict(torch.load(buf, weights_only=True)['tokenizer'])
    assert (back.bos, back.eos, back.pad, back.stop_ids) == (tok.bos, tok.eos, tok.pad, tok.stop_ids)
    for t in sample_texts()[:300]:
        assert back.encode(t) == tok.encode(t)
    out = folders['root'] / f'{name}_saved'
    back.save_pretrained(str(out))
    assert open(out / 'tokenizer.json').read() == open(os.path.join(folders[name], 'tokenizer.json')).read()
    assert from_pretrained(str(out)).to_dict()['hf_files']['tokenizer.json'] == tok.to_dict()['hf_files']['tokenizer.json']


def test_our_tokenizer_exports_to_tokenizers(tmp_path):
    """Tokenizer.save_pretrained (a tiny-world model's --save-hf): the `tokenizers` library and from_pretrained give
    the ids our tiktoken encoding gives, specials included."""
    from tokenizer import Tokenizer, train_bpe
    texts = corpus()
    tok = Tokenizer(train_bpe(texts + ["User: make 280 from 8 7 5. Assistant:<think>8*7=56 56*5=280 vs 280 yes."
                                       "</think><answer>(8*7)*5</answer>"] * 5, 60))
    tok.save_pretrained(str(tmp_path))
    ref = tokenizers.Tokenizer.from_file(str(tmp_path / 'tokenizer.json'))
    back = from_pretrained(str(tmp_path))
    assert (back.bos, back.eos, back.pad) == (tok.bos, tok.eos, tok.pad)
    for t in sample_texts()[:400] + ["<|bos|>make 0007 from 123456<|eos|><|pad|>", "<think>a</think><answer>1</answer>"]:
        assert tok.encode(t) == ref.encode(t, add_special_tokens=False).ids == back.encode(t), repr(t)


def test_added_token_prefix_of_another(folders, tmp_path):
    """HF cuts out the longest added token; tiktoken's special alternation has no order, so we go slow."""
    with open(os.path.join(folders['cl100k'], 'tokenizer.json'), encoding='utf-8') as f:
        tj = json.load(f)
    n = len(tj['model']['vocab'])
    tj['added_tokens'] += [dict(tj['added_tokens'][1], id=n, content='<|im_start|>user'),
                           dict(tj['added_tokens'][1], id=n + 1, content='<|im')]
    path = save(tmp_path / 'prefix', tj)
    ref, tok = tokenizers.Tokenizer.from_file(os.path.join(path, 'tokenizer.json')), from_pretrained(path)
    assert not tok.exact
    for text in [CHAT, '<|im_start|>use', '<|im_start|>user<|im_start|>', '<|im<|im_start|>userx'] + corpus(20):
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids, text
    assert n in tok.encode(CHAT) and n + 1 in tok.encode('<|im_sta')


ERRORS = {  # name: (edit of a good tokenizer.json, words the error must contain)
    'unigram': (lambda tj: tj['model'].update(type='Unigram'), 'Unigram'),
    'byte_fallback': (lambda tj: tj['model'].update(byte_fallback=True), 'byte_fallback'),
    'metaspace': (lambda tj: tj.update(pre_tokenizer={'type': 'Metaspace', 'replacement': '▁'}), 'Metaspace'),
    'whitespace_step': (lambda tj: tj['pre_tokenizer']['pretokenizers'].insert(0, {'type': 'Whitespace'}),
                        'Whitespace'),
    'split_removed': (lambda tj: tj['pre_tokenizer']['pretokenizers'][0].update(behavior='Removed'), 'Removed'),
    'prefix_space': (lambda tj: tj['pre_tokenizer']['pretokenizers'][-1].update(add_prefix_space=True),
                     'add_prefix_space'),
    'no_bytelevel': (lambda tj: tj['pre_tokenizer']['pretokenizers'].pop(), 'ByteLevel'),
    'bad_regex': (lambda tj: tj['pre_tokenizer']['pretokenizers'][0].update(pattern={'Regex': r'\X+'}), r'\\X+'),
    'lowercase': (lambda tj: tj.update(normalizer={'type': 'Lowercase'}), 'Lowercase'),
    'decoder': (lambda tj: tj.update(decoder={'type': 'Metaspace'}), 'decoder'),
    'lstrip': (lambda tj: tj['added_tokens'][3].update(lstrip=True), '<think>'),
    'missing_byte': (lambda tj: tj['model']['vocab'].pop('Ā'), 'single-byte'),
    # regexes we cannot bound: exponential backtracking in Python's `regex` (a leading Split) hung encode;
    # in tiktoken (the last Split) it hit fancy-regex's backtrack limit, and an empty match broke its BPE: both
    # a Rust panic at encode time. Now refused at load, by name.
    'redos_leading': (lambda tj: tj['pre_tokenizer']['pretokenizers'].insert(0, split(r'(a|aa)+b')),
                      r"Split 0 has the regex '\(a\|aa\)\+b', which is not one of the known"),
    'redos_last': (lambda tj: tj['pre_tokenizer']['pretokenizers'][0].update(split(r'(?:a|a(?!x))*b')), 'known'),
    'empty_match': (lambda tj: tj['pre_tokenizer']['pretokenizers'][0].update(split(r'\s*|\p{L}+')), 'known'),
    'empty_string': (lambda tj: tj['pre_tokenizer']['pretokenizers'][0].update(pattern={'String': ''}),
                     'empty string'),
    # ids: tiktoken panicked on a shared id; an empty added token or an id gap mis-tokenized silently
    'empty_added': (lambda tj: tj['added_tokens'].append(dict(tj['added_tokens'][0], id=753, content='')),
                    r"added token '' \(id 753\) is empty"),
    'added_same_id': (lambda tj: tj['added_tokens'].append(dict(tj['added_tokens'][0], content='<new>')),
                      "added tokens '<|endoftext|>' and '<new>' share the id 0"),
    'added_twice': (lambda tj: tj['added_tokens'].append(dict(tj['added_tokens'][3], id=753)),
                    "added token '<think>' is listed twice, with ids 3 and 753"),
    'added_vocab_clash': (lambda tj: tj['added_tokens'].append(dict(tj['added_tokens'][0], content='<new>',
                                                                    id=tj['model']['vocab']['h'])),
                          "tokens '<new>' and 'h' share the id"),
    'vocab_same_id': (lambda tj: tj['model']['vocab'].update(h=tj['model']['vocab']['e']), "'h' share the id"),
    'vocab_negative_id': (lambda tj: tj['model']['vocab'].update(h=-1), "'h' has id -1, not an integer >= 0"),
    'vocab_str_id': (lambda tj: tj['model']['vocab'].update(h='5'), "'h' has id '5', not an integer"),
    'vocab_id_gap': (lambda tj: tj['model']['vocab'].update(h=10 ** 6),
                     r"'h' has id 1000000, but the 753 tokens must be numbered 0\.\.752"),
    # merges: not two parts, or parts / product missing from the vocab
    'merge_three': (lambda tj: tj['model']['merges'].insert(0, ['Ġ', 't', 'h']), "merge 0 is \\['Ġ', 't', 'h'\\]"),
    'merge_string_three': (lambda tj: tj['model']['merges'].insert(5, 'Ġ t h'), "merge 5 is 'Ġ t h', not two"),
    'merge_one': (lambda tj: tj['model']['merges'].insert(0, 'Ġt'), "merge 0 is 'Ġt', not two tokens"),
    'merge_unknown_part': (lambda tj: tj['model']['merges'].insert(0, ['Ġ', 'zzqq']), "'zzqq' is not in the vocab"),
    'merge_unknown_product': (lambda tj: tj['model']['merges'].insert(0, ['Ā', 'Ā']),
                              r"merge 0 \('Ā' \+ 'Ā'\): 'ĀĀ' is not in the vocab"),
}


def split(pattern):
    return {'type': 'Split', 'pattern': {'Regex': pattern}, 'behavior': 'Isolated', 'invert': False}


@pytest.mark.parametrize('case', list(ERRORS))
def test_clear_errors(folders, tmp_path, case):
    with open(os.path.join(folders['cl100k'], 'tokenizer.json'), encoding='utf-8') as f:
        tj = json.load(f)
    fn, words = ERRORS[case]
    fn(tj)
    with pytest.raises(ValueError, match=words):
        from_pretrained(save(tmp_path / case, tj))


def test_named_id_outside_vocab(folders, tmp_path):
    """config.json's eos_token_id past the vocab used to be taken as is: a stop token no sample can produce."""
    with open(os.path.join(folders['gpt2'], 'tokenizer.json'), encoding='utf-8') as f:
        tj = json.load(f)
    n = len(tj['model']['vocab'])  # the added tokens are in the vocab too
    with pytest.raises(ValueError, match=rf"config.json names eos_token_id={n}, outside the ids 0\.\.{n - 1} "):
        from_pretrained(save(tmp_path, tj, config={'eos_token_id': [n, 0]}))


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match='no such'):
        from_pretrained(str(tmp_path / 'nope'))
    with pytest.raises(FileNotFoundError, match='tokenizer.json'):
        from_pretrained(str(tmp_path))


def test_deepseek_v3_literal_newlines(folders, tmp_path):
    """DeepSeek-V3's tokenizer.json writes the CR and LF of `[^\\r\\n...]` as the characters themselves: the same
    regex as the escaped spelling, so it is known and encodes as tokenizers does."""
    with open(os.path.join(folders['deepseek_v3'], 'tokenizer.json'), encoding='utf-8') as f:
        tj = json.load(f)
    last = tj['pre_tokenizer']['pretokenizers'][2]['pattern']
    last['Regex'] = last['Regex'].replace(r'\r', '\r').replace(r'\n', '\n')
    assert '\r\n' in last['Regex']
    path = save(tmp_path / 'literal', tj)
    ref, tok = tokenizers.Tokenizer.from_file(os.path.join(path, 'tokenizer.json')), from_pretrained(path)
    for text in sample_texts(seed=3)[:300]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids, text


def test_rust_panic_becomes_value_error(folders, monkeypatch):
    """The last line of defence: a pattern that matches "" (let through here on purpose) panics tiktoken's BPE;
    the PanicException, a BaseException that `except Exception` misses, comes out as a ValueError."""
    import tokenizer_hf
    monkeypatch.setitem(tokenizer_hf._KNOWN_SPLIT_NAMES, r'\s*|\p{L}+', 'empty_match')
    with open(os.path.join(folders['cl100k'], 'tokenizer.json'), encoding='utf-8') as f:
        tj = json.load(f)
    tj['pre_tokenizer']['pretokenizers'][0].update(split(r'\s*|\p{L}+'))
    tok = from_pretrained(save(folders['root'] / 'panics', tj))
    with pytest.raises(ValueError, match='encode: tiktoken panicked'):
        tok.encode('hello world')
    with pytest.raises(KeyboardInterrupt):  # only PanicException is converted
        with tokenizer_hf._no_panic('x'):
            raise KeyboardInterrupt
