"""
A local Hugging Face tokenizer folder (a byte-level BPE tokenizer.json: GPT-2, Qwen2, Llama 3, DeepSeek-V3) as a
tiktoken Encoding with the same ids, no download and no transformers import (`from_pretrained`); and
`from_dict`, which rebuilds either tokenizer (ours, tokenizer.py, or this) from the dict a checkpoint stores.

The section below says how HF's pipeline maps onto tiktoken's; tests/test_tokenizer_hf.py checks it against the
`tokenizers` library. It refuses, with a ValueError naming the culprit, what it cannot run safely or exactly:
Split regexes outside KNOWN_SPLITS (the section says why an allowlist), empty or colliding added tokens, shared
ids or gaps, malformed merges. `PretrainedTokenizer.to_dict` is the folder's own tokenizer.json and
tokenizer_config.json text plus the ids they resolved to, so our checkpoints carry the tokenizer whole
(`save_pretrained` writes the files back).
"""
import contextlib
import json
import os
import unicodedata

import regex
import tiktoken

from tokenizer import PAT_STR, STOP_TEXTS, Tokenizer, bytes_to_unicode

# ---------------------------------------------------------------------------------------------------------------
# Hugging Face byte-level BPE folders (GPT-2, Qwen2, Llama 3, DeepSeek-V3) as tiktoken Encodings.
#
# A Hugging Face tokenizer.json runs: cut out added tokens -> normalizer -> pre-tokenizer (regex Splits, then
# ByteLevel, which maps each byte to a printable character) -> BPE on each piece. tiktoken runs: cut out special
# tokens -> one regex -> BPE on bytes. So:
# - vocab strings go back to bytes through the inverse of GPT-2's bytes_to_unicode alphabet;
# - tiktoken merges the adjacent pair whose concatenation has the lowest rank, HF the pair earliest in `merges`.
#   These agree when the ranks of merge products follow merge order. HF's trainer and tiktoken-born vocabs
#   (Llama 3, Qwen2) number tokens in merge order, so the rank is the token id and `.enc` speaks HF ids. If the
#   ids are not in merge order we rank by merge order instead and map ranks to ids in encode (`rank_to_id`).
# - each Split pattern is used verbatim: Oniguruma (tokenizers) and fancy-regex (tiktoken) share the Perl syntax
#   these patterns use (\p{L}, (?i:...), possessive ?+ and ++, (?!\S)). HF keeps the text between matches as
#   pieces where tiktoken drops it, so the last pattern P becomes `(?:P)|(?:(?!(?:P))[\s\S])+`: a run of
#   characters where P does not match is one piece, as in HF.
# - only the Split patterns of KNOWN_SPLITS are accepted. A regex is a program, and both engines that run ours
#   backtrack. Python's `regex` (the leading Splits) has no limit: `(a|aa)+b` on 'aaa...X' takes 3 s at 30
#   characters and 5 s at 32, exponential in the length. tiktoken's fancy-regex (the last Split; our gap clause
#   makes every pattern "fancy") stops after 10^6 steps with a Rust panic, and a pattern that matches "" panics
#   tiktoken's BPE outright. No cheap static test separates safe patterns from slow ones (nested quantifiers
#   are only the best-known blow-up; `\s*\s*\s*...x` is polynomial of any degree), and a trial run at load time
#   only tries the inputs we thought of. So we accept the patterns of the tokenizers this file supports,
#   compared verbatim, which tiktoken and tokenizers run on all text in production, and name any other in the
#   error; a new one goes into KNOWN_SPLITS after someone has checked it.
# - every id, added token and merge is checked before tiktoken sees it: tiktoken panics on an id two tokens
#   share, an empty added token is matched between every two characters, and an id past a gap would widen
#   n_vocab with ids that decode to nothing. A Rust panic
#   (pyo3_runtime.PanicException) derives from BaseException and passes `except Exception`, so any that still
#   escapes tiktoken becomes a ValueError (_no_panic).
# - tiktoken takes one regex. Every Split before the last, and a Unicode normalizer (Qwen2's NFC), run in
#   Python in `encode`; `.enc` alone is exact only when `exact` is True.
# ---------------------------------------------------------------------------------------------------------------
GPT2_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
UNICODE_NORMALIZERS = ('NFC', 'NFD', 'NFKC', 'NFKD')
KNOWN_SPLITS = {  # name: a pre-tokenizer Split regex as tokenizer.json holds it (CR/LF/TAB spelt as escapes)
    'gpt2': GPT2_PAT_STR,
    'cl100k': r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
              r"""|\s*[\r\n]|\s+(?!\S)|\s+""",  # tiktoken's cl100k_base (GPT-4)
    'llama3': r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
              r"""|\s*[\r\n]+|\s+(?!\S)|\s+""",  # Llama 3's tokenizer.json (and R1-Distill-Llama's)
    'qwen2': r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
             r"""|\s*[\r\n]+|\s+(?!\S)|\s+""",  # Qwen2 / Qwen2.5 (R1-Distill-Qwen): one digit per piece
    # DeepSeek-V3 (and R1): three Splits, digits in runs of three, CJK runs, then the words
    'deepseek_v3_digits': r'\p{N}{1,3}',
    'deepseek_v3_cjk': '[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+',
    'nanor1': PAT_STR,  # ours (Tokenizer.save_pretrained writes it)
    'deepseek_v3': r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
                   r"""| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
}
_KNOWN_SPLIT_NAMES = {p: name for name, p in KNOWN_SPLITS.items()}


def _pre_tokenizer_patterns(pt):
    """The pre-tokenizer as a list of regexes, each an Isolated split of the pieces the one before made."""
    if pt is None:
        raise ValueError("tokenizer.json has no pre_tokenizer; a byte-level BPE needs ByteLevel")
    steps = pt['pretokenizers'] if pt['type'] == 'Sequence' else [pt]
    pats = []
    for k, step in enumerate(steps):
        kind = step['type']
        if kind == 'Split':
            if step.get('behavior') != 'Isolated' or step.get('invert'):
                raise ValueError(f"unsupported pre-tokenizer Split(behavior={step.get('behavior')}, invert="
                                 f"{step.get('invert')}): only Isolated, non-inverted splits are a tiktoken regex")
            pats.append(_split_regex(step['pattern'], k))
        elif kind == 'ByteLevel' and k == len(steps) - 1:
            if step.get('add_prefix_space'):
                raise ValueError("unsupported pre-tokenizer ByteLevel(add_prefix_space=True): "
                                 "tiktoken cannot prepend a space")
            if step.get('use_regex', True):
                pats.append(GPT2_PAT_STR)  # ByteLevel's own split, the same as GPT-2's encoder.py
        else:
            raise ValueError(f"unsupported pre-tokenizer {kind} (step {k} of {pt['type']}); supported: Split(Isolated) "
                             f"regexes followed by ByteLevel, or ByteLevel alone")
    if steps[-1]['type'] != 'ByteLevel':
        raise ValueError(f"pre-tokenizer {pt['type']} does not end with ByteLevel; not a byte-level BPE")
    return pats or [r'[\s\S]+']  # ByteLevel(use_regex=False) alone: each text segment is one piece


def _split_regex(pattern, k):
    """A Split's pattern as a regex we may run: a non-empty literal, or a regex of KNOWN_SPLITS (see above)."""
    if 'String' in pattern:
        if not isinstance(pattern['String'], str) or not pattern['String']:
            raise ValueError(f"pre-tokenizer Split {k} splits on the empty string {pattern['String']!r}")
        return regex.escape(pattern['String'])
    p = pattern.get('Regex')
    # JSON files spell CR/LF/TAB either as regex escapes or as the characters themselves; both mean the same
    canon = p.replace('\r', r'\r').replace('\n', r'\n').replace('\t', r'\t') if isinstance(p, str) else p
    if canon not in _KNOWN_SPLIT_NAMES:
        raise ValueError(f"pre-tokenizer Split {k} has the regex {p!r}, which is not one of the known patterns "
                         f"({', '.join(KNOWN_SPLITS)}): an unknown regex may backtrack for minutes or panic tiktoken "
                         f"on some input; add it to tokenizer_hf.KNOWN_SPLITS once checked")
    return canon


@contextlib.contextmanager
def _no_panic(what):
    """Turn a Rust panic from tiktoken (pyo3_runtime.PanicException, a BaseException) into a ValueError. The
    class is only reachable from inside pyo3, so it is matched by name; KeyboardInterrupt etc. pass through."""
    try:
        yield
    except BaseException as e:
        if type(e).__name__ != 'PanicException':
            raise
        raise ValueError(f"{what}: tiktoken panicked ({e})") from None


def _split_isolated(pat, text):
    """HF Split(behavior='Isolated'): the matches and the non-empty gaps between them, in order."""
    out, i = [], 0
    for m in pat.finditer(text):
        if m.start() > i:
            out.append(text[i:m.start()])
        if m.end() > m.start():
            out.append(m.group())
        i = m.end()
    if i < len(text):
        out.append(text[i:])
    return out


class PretrainedTokenizer:
    """A Hugging Face byte-level BPE folder as a tiktoken Encoding; made by `from_pretrained` or `from_dict`."""

    def __init__(self, enc, id_bytes, added, pre_splits, normalizers, rank_to_id, bos, eos, pad, files,
                 extra_stop=()):
        self.enc = enc  # tiktoken.Encoding; its ids are HF ids unless rank_to_id is set
        self.id_bytes = id_bytes  # {HF id: bytes} for every token, added tokens included: the decode table
        self.added = added  # {added token text: HF id}, all of them tiktoken special tokens
        self.special_ids = set(added.values())
        self.pre_splits = [regex.compile(p) for p in pre_splits]  # Splits before the one tiktoken runs
        self.normalizers = normalizers  # unicodedata forms applied to text between added tokens
        self.rank_to_id = rank_to_id  # None when ranks are ids, else a list from tiktoken rank to HF id
        self.files = files  # {'tokenizer.json': text, 'tokenizer_config.json': text or None}: what to_dict stores
        self.n_vocab = max(id_bytes) + 1
        self.named = (bos, eos, pad, sorted(extra_stop))  # the ids as resolved from the folder, for to_dict
        # what ends a rollout: eos, the added stop tokens, any other eos id the folder's configs list
        stops = [*extra_stop, *(added[t] for t in STOP_TEXTS if t in added)]
        self.stop_ids = {i for i in (eos, *stops) if i is not None}
        if eos is None:  # none named: the first of the configs' eos ids, else of the stop tokens it has
            eos = stops[0] if stops else None
        # bos may be None (Qwen has none: nothing is prepended); pad only fills slots after a stop, so eos will do
        self.bos, self.eos, self.pad = bos, eos, eos if pad is None else pad
        self.think, self.think_end = added.get('<think>'), added.get('</think>')
        # tiktoken cuts special tokens with an alternation in hash order; HF takes the longest match. They differ
        # only if one added token is a prefix of another, and a prefix sorts right before its extensions.
        texts = sorted(added)
        prefix = any(b.startswith(a) for a, b in zip(texts, texts[1:]))
        self.exact = not pre_splits and not normalizers and not prefix  # .enc alone reproduces HF's split
        longest_first = sorted(added, key=len, reverse=True)
        self._added_re = regex.compile('(' + '|'.join(regex.escape(s) for s in longest_first) + ')') if added else None

    def encode(self, text, special=True):
        """Text to HF ids, as tokenizers' encode(text, add_special_tokens=False): no BOS is added. special=True
        turns every added token into its id; special=False encodes their text as plain bytes (untrusted text)."""
        if not self.exact:
            return self.encode_slow(text, special)
        # fast path: tiktoken does all of it in Rust
        with _no_panic('encode'):
            ranks = self.enc.encode(text, allowed_special='all') if special else self.enc.encode_ordinary(text)
        return self._ids(ranks)

    def encode_slow(self, text, special=True):
        """HF's pipeline step by step: cut out added tokens, normalise the text between them, run the leading
        Splits in Python, and leave the last Split and BPE of each piece to tiktoken."""
        segments = self._added_re.split(text) if special and self._added_re else [text]
        ranks = []
        for k, seg in enumerate(segments):
            if k % 2:  # re.split puts the captured separators (the added tokens) at odd positions
                ranks.append(self.enc.encode_single_token(seg))
                continue
            for form in self.normalizers:
                seg = unicodedata.normalize(form, seg)
            pieces = [seg]
            for pat in self.pre_splits:
                pieces = [q for p in pieces for q in _split_isolated(pat, p)]
            with _no_panic('encode'):
                for p in pieces:
                    ranks += self.enc.encode_ordinary(p)
        return self._ids(ranks)

    def _ids(self, ranks):
        return ranks if self.rank_to_id is None else [self.rank_to_id[r] for r in ranks]

    def decode(self, ids):
        # errors='replace': a sampled id sequence may cut a multi-byte character in half. Ids past the
        # tokenizer's (a model's vocab is often padded: Qwen2.5's 151936 rows hold 151665 tokens) decode to nothing
        return b''.join(self.id_bytes.get(int(i), b'') for i in ids).decode('utf-8', errors='replace')

    def to_dict(self):
        """Plain, weights_only-safe: the folder's tokenizer files as text and the ids they resolved to, so a
        checkpoint holds the tokenizer whole and needs no folder to come back (`from_dict`)."""
        bos, eos, pad, extra = self.named
        return {'hf_files': dict(self.files), 'bos': bos, 'eos': eos, 'pad': pad, 'extra_stop': extra}

    def save_pretrained(self, path):
        """tokenizer.json and tokenizer_config.json as the folder held them (a minimal config if it had none)."""
        os.makedirs(path, exist_ok=True)
        cfg = self.files.get('tokenizer_config.json')
        if cfg is None:
            text = {i: s for s, i in self.added.items()}
            cfg = json.dumps({'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': text.get(self.bos),
                              'eos_token': text.get(self.eos), 'pad_token': text.get(self.pad)}, indent=2)
        for name, body in (('tokenizer.json', self.files['tokenizer.json']), ('tokenizer_config.json', cfg)):
            with open(os.path.join(path, name), 'w', encoding='utf-8') as f:
                f.write(body)


def _named_token_id(path, name, added, vocab, b2u, n_vocab):
    """The id of `name` ('bos', 'eos', 'pad'): tokenizer_config.json's <name>_token (text or AddedToken dict),
    else config.json's <name>_token_id (first entry if a list), else None. An id must be one of the n_vocab.
    tokenizer_config.json's word is final: `"bos_token": null` (Qwen2.5) or `"add_bos_token": false` means no bos
    is prepended, whatever config.json's bos_token_id says (Qwen2.5's names <|endoftext|>, which HF never adds)."""
    for fname, key in (('tokenizer_config.json', f'{name}_token'), ('config.json', f'{name}_token_id')):
        fpath = os.path.join(path, fname)
        if not os.path.isfile(fpath):
            continue
        with open(fpath, encoding='utf-8') as f:
            d = json.load(f)
        if fname == 'tokenizer_config.json' and (key in d and d[key] is None
                                                 or name == 'bos' and d.get('add_bos_token') is False):
            return None
        value = d.get(key)
        if isinstance(value, dict):
            value = value.get('content')
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < n_vocab:  # a stop id no sample can produce, or one that decodes to nothing
                raise ValueError(f"{fname} names {key}={value}, outside the ids 0..{n_vocab - 1} of tokenizer.json")
            return value
        if isinstance(value, str):
            if value in added:
                return added[value]
            as_vocab = ''.join(b2u[b] for b in value.encode('utf-8'))
            if as_vocab in vocab:
                return vocab[as_vocab]
            raise ValueError(f"{fname} names {key}={value!r}, which is not a token of tokenizer.json")
    return None


def _is_id(i):
    return isinstance(i, int) and not isinstance(i, bool) and i >= 0


def _added_tokens(entries):
    """tokenizer.json's added_tokens as {text: id}: each a non-empty text with its own id. tiktoken would match
    an empty special token between every two characters, and a text or id listed twice leaves one of them
    unreachable, so those are refused, as are the whitespace options tiktoken cannot express."""
    added, texts = {}, {}
    for t in entries:
        text, i = t.get('content'), t.get('id')
        if not isinstance(text, str) or not text:
            raise ValueError(f"added token {text!r} (id {i!r}) is empty; it would match between every two characters")
        if not _is_id(i):
            raise ValueError(f"added token {text!r} has id {i!r}, not an integer >= 0")
        if t.get('lstrip') or t.get('rstrip') or t.get('single_word'):
            raise ValueError(f"added token {text!r} strips whitespace or must be a single word; "
                             f"tiktoken special tokens cannot express that")
        if text in added:
            raise ValueError(f"added token {text!r} is listed twice, with ids {added[text]} and {i}")
        if i in texts:
            raise ValueError(f"added tokens {texts[i]!r} and {text!r} share the id {i}")
        added[text], texts[i] = i, text
    return added


def _token_bytes(vocab, added, b2u):
    """{id: bytes} for every token: vocab strings go back to bytes through the byte-level alphabet, added tokens
    are their UTF-8 text. An added token may also stand in the vocab under its own id (as plain text or in the
    alphabet); any other id two tokens share, and any gap in the ids 0..N-1, is refused by name: tiktoken
    panics on the first and the second leaves ids that decode to nothing."""
    u2b = {c: b for b, c in b2u.items()}
    id_bytes = {i: s.encode('utf-8') for s, i in added.items()}
    owner = {i: s for s, i in added.items()}  # whose id it is, for the messages
    for s, i in vocab.items():
        if not _is_id(i):
            raise ValueError(f"vocab token {s!r} has id {i!r}, not an integer >= 0")
        if s in added and added[s] == i:
            continue  # the added token's own vocab entry, as plain text
        if any(c not in u2b for c in s):
            raise ValueError(f"vocab token {s!r} is outside the byte-level alphabet; not a byte-level BPE")
        b = bytes(u2b[c] for c in s)
        if i in id_bytes:
            if added.get(owner[i]) == i and id_bytes[i] == b:
                continue  # the added token's own vocab entry, spelt in the alphabet
            raise ValueError(f"tokens {owner[i]!r} and {s!r} share the id {i}")
        id_bytes[i], owner[i] = b, s
    n = len(id_bytes)
    over = [i for i in id_bytes if i >= n]
    if over:
        i = min(over)
        raise ValueError(f"token {owner[i]!r} has id {i}, but the {n} tokens must be numbered 0..{n - 1} without "
                         f"gaps (an id in a gap would decode to nothing)")
    return id_bytes


def _merge_products(merges, vocab):
    """The ids of the merge products in merge order (a token made by two merges counts at its first). A merge is
    "a b" (older files) or [a, b] (tokenizers >= 0.20); both parts and their concatenation must be vocab tokens."""
    products, seen = [], set()
    for k, m in enumerate(merges):
        parts = m.split(' ') if isinstance(m, str) else m
        if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
            raise ValueError(f"merge {k} is {m!r}, not two tokens")
        a, b = parts
        for x in (a, b, a + b):
            if x not in vocab:
                raise ValueError(f"merge {k} ({a!r} + {b!r}): {x!r} is not in the vocab")
        if a + b not in seen:
            seen.add(a + b)
            products.append(vocab[a + b])
    return products


def _build(text, where, name):
    """tokenizer.json text -> (tiktoken Encoding, {id: bytes}, added tokens, vocab, byte alphabet, leading Split
    patterns, normalizer forms, rank_to_id). `where` names the file in errors."""
    tj = json.loads(text)
    model = tj['model']
    kind = model.get('type', 'BPE' if 'merges' in model else None)  # old files omit the type
    if kind != 'BPE':
        raise ValueError(f"tokenizer.json model type is {kind}, not a byte-level BPE")
    for key in ('dropout', 'continuing_subword_prefix', 'end_of_word_suffix', 'byte_fallback'):
        if model.get(key):
            raise ValueError(f"unsupported BPE option {key}={model[key]!r} (not a byte-level BPE as tiktoken runs it)")
    decoder = (tj.get('decoder') or {}).get('type')
    if decoder != 'ByteLevel':
        raise ValueError(f"tokenizer.json decoder is {decoder}, not ByteLevel; not a byte-level BPE")
    norm = tj.get('normalizer')
    norms = [] if norm is None else norm['normalizers'] if norm['type'] == 'Sequence' else [norm]
    for n in norms:
        if n['type'] not in UNICODE_NORMALIZERS:
            raise ValueError(f"unsupported normalizer {n['type']}; supported: none or {', '.join(UNICODE_NORMALIZERS)}")
    pats = _pre_tokenizer_patterns(tj.get('pre_tokenizer'))

    added = _added_tokens(tj.get('added_tokens', []))
    b2u = bytes_to_unicode()
    vocab = model['vocab']
    missing = [b for b in range(256) if b2u[b] not in vocab]
    if missing:
        raise ValueError(f"vocab lacks {len(missing)} of the 256 single-byte tokens (e.g. {bytes([missing[0]])!r}); "
                         f"tiktoken needs all of them")
    id_bytes = _token_bytes(vocab, added, b2u)
    products = _merge_products(model['merges'], vocab)
    ranked = [vocab[b2u[b]] for b in range(256)] + products
    if model.get('ignore_merges'):
        # HF looks a whole piece up in the vocab before merging (Llama 3), as tiktoken always does: tokens no
        # merge makes are reachable that way. Without ignore_merges HF never emits them, so tiktoken must not know them.
        known = set(ranked) | set(added.values())
        ranked += sorted(i for i in vocab.values() if i not in known)

    if all(x < y for x, y in zip(products, products[1:])):  # ids follow merge order: rank = id
        ranks = {id_bytes[i]: i for i in ranked}
        special, rank_to_id = dict(added), None
    else:  # rank by merge order, specials after, and map back
        ranks = {id_bytes[i]: r for r, i in enumerate(ranked)}
        special = {s: len(ranked) + k for k, s in enumerate(added)}
        rank_to_id = ranked + list(added.values())

    last = pats[-1]
    pat_str = f'(?:{last})|(?:(?!(?:{last}))[\\s\\S])+'  # + HF's gaps between matches, as pieces
    with _no_panic(where):
        enc = tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special)
    return enc, id_bytes, added, vocab, b2u, pats[:-1], [n['type'] for n in norms], rank_to_id


def _eos_ids(path, n_vocab):
    """Every eos id config.json and generation_config.json list (Llama 3 Instruct: [<|end_of_text|>, <|eom_id|>,
    <|eot_id|>]): each one ends a rollout."""
    out = set()
    for fname in ('config.json', 'generation_config.json'):
        fpath = os.path.join(path, fname)
        if os.path.isfile(fpath):
            with open(fpath, encoding='utf-8') as f:
                v = json.load(f).get('eos_token_id')
            out.update(i for i in (v if isinstance(v, list) else [v]) if _is_id(i) and i < n_vocab)
    return sorted(out)


def from_pretrained(path):
    """A local Hugging Face tokenizer folder (tokenizer.json with a byte-level BPE model; tokenizer_config.json
    or config.json for bos/eos/pad) as a PretrainedTokenizer. No download, no transformers import."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such tokenizer folder: {path}")
    tj_path = os.path.join(path, 'tokenizer.json')
    if not os.path.isfile(tj_path):
        raise FileNotFoundError(f"{path} has no tokenizer.json (only the fast-tokenizer JSON format is read)")
    files = {}
    for name in ('tokenizer.json', 'tokenizer_config.json'):
        fpath = os.path.join(path, name)
        files[name] = open(fpath, encoding='utf-8').read() if os.path.isfile(fpath) else None
    parts = _build(files['tokenizer.json'], tj_path, os.path.basename(os.path.normpath(path)))
    _, id_bytes, added, vocab, b2u = parts[:5]
    bos, eos, pad = (_named_token_id(path, name, added, vocab, b2u, len(id_bytes)) for name in ('bos', 'eos', 'pad'))
    return PretrainedTokenizer(parts[0], id_bytes, added, *parts[5:], bos, eos, pad, files,
                               _eos_ids(path, len(id_bytes)))


def from_dict(d):
    """Either tokenizer back from the dict a checkpoint stores (`to_dict`)."""
    if 'hf_files' not in d:
        return Tokenizer.from_dict(d)
    parts = _build(d['hf_files']['tokenizer.json'], 'the stored tokenizer.json', 'hf')
    n = len(parts[1])
    for key in ('bos', 'eos', 'pad'):
        if d[key] is not None and not (_is_id(d[key]) and d[key] < n):
            raise ValueError(f"stored tokenizer: {key} id {d[key]!r} is not one of its {n} ids")
    return PretrainedTokenizer(parts[0], parts[1], parts[2], *parts[5:], d['bos'], d['eos'], d['pad'],
                               d['hf_files'], d.get('extra_stop', ()))
