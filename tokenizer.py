"""
Tokenizers built here, with no download: tiktoken `Encoding`s whose ranks we make ourselves.

- `byte_tokenizer()`: the 256 bytes plus the special tokens of the R1 template. Round-trips any Unicode.
- `build_tokenizer(merges)`: the bytes, every 2- and 3-digit string as one token (so "729" is one token and
  a tiny model computes 9*81=729 as one lookup instead of three carries), then BPE merges learned on the
  synthetic corpus by `train_bpe` (so "Assistant" or " make" cost one token, not nine). On the tiny corpus
  this cuts a countdown document from ~110 byte tokens to ~45 (measured by tests/test_tokenizer.py's
  neighbour, EXPERIMENTS.md), which is what makes RL rollouts cheap enough for a CPU.
- Hugging Face tokenizer folders (`from_pretrained`) and `from_dict`, which rebuilds either kind from the plain
  dict a checkpoint stores, are in tokenizer_hf.py.
- Stop tokens (`stop_ids`): eos, and for a pretrained tokenizer every added token of STOP_TEXTS it has (chat
  templates end a turn with <|im_end|> or <|eot_id|> while eos is <|endoftext|> or <|end_of_text|>), plus any
  further eos ids config.json / generation_config.json list. A rollout ends at the first of them.

The pre-tokenisation regex follows cl100k's shape (numbers split into runs of at most 3 digits, letters keep
one leading non-letter) with one change: every punctuation character is its own piece. With cl100k's
punctuation runs, BPE merged ")+" and "*(" into single tokens, which hid the operator of `8*(6+1)` inside a
bracket token; the base then got the outer operation wrong in half of all expressions (EXPERIMENTS.md exp2).
"""
import base64
import collections
import json
import os

import regex
import tiktoken

SPECIAL_TOKENS = ['<|bos|>', '<|eos|>', '<|pad|>', '<think>', '</think>', '<answer>', '</answer>']
PAT_STR = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}"""
           r"""| ?[^\s\p{L}\p{N}]|\s*[\r\n]|\s+(?!\S)|\s+""")


class Tokenizer:
    """A tiktoken Encoding plus the ids of our special tokens and the merges it was built from."""

    def __init__(self, merges=(), numbers=True):
        self.merges = [bytes(m) for m in merges]
        self.numbers = numbers
        ranks = {bytes([i]): i for i in range(256)}
        if numbers:
            for width in (2, 3):  # every 2-digit string first, so each 3-digit one has a merge path
                for n in range(10 ** width):
                    ranks[str(n).zfill(width).encode()] = len(ranks)
        for m in self.merges:
            if m not in ranks:
                ranks[m] = len(ranks)
        special = {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
        self.ranks = ranks  # {bytes: rank}: what save_pretrained turns back into BPE merges
        self.enc = tiktoken.Encoding(name='nanor1', pat_str=PAT_STR, mergeable_ranks=ranks,
                                     special_tokens=special)
        self.n_vocab = self.enc.n_vocab
        self.bos, self.eos, self.pad = special['<|bos|>'], special['<|eos|>'], special['<|pad|>']
        self.think, self.think_end = special['<think>'], special['</think>']
        self.answer, self.answer_end = special['<answer>'], special['</answer>']
        self.specials = special   # {text: id} of SPECIAL_TOKENS
        self.special_ids = set(special.values())
        self.stop_ids = {self.eos}   # what ends a rollout

    def encode(self, text, special=True):
        """Text to ids. special=True turns '<think>' etc. into their single tokens (our own templates);
        special=False encodes them as plain bytes (untrusted text)."""
        if special:
            return self.enc.encode(text, allowed_special='all')
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        # errors='replace': a sampled id sequence may cut a multi-byte character in half
        return self.enc.decode([int(i) for i in ids], errors='replace')

    def number_ids(self):
        """{integer value: token id} for every number that is a single token ("0".."999", no leading zeros)."""
        out = {}
        for n in range(1000 if self.numbers else 10):
            ids = self.enc.encode_ordinary(str(n))
            if len(ids) == 1:
                out[n] = ids[0]
        return out

    def to_dict(self):
        """Plain, weights_only-safe description stored in checkpoints."""
        return {'merges': [base64.b64encode(m).decode() for m in self.merges], 'numbers': self.numbers}

    @classmethod
    def from_dict(cls, d):
        return cls([base64.b64decode(m) for m in d['merges']], d.get('numbers', True))

    def save_pretrained(self, path):
        """tokenizer.json (+ tokenizer_config.json) with the same ids, for transformers and `from_pretrained`.
        A tiktoken rank table is a BPE whose merges are the ranks in order: token t of rank r is the merge of
        the two pieces BPE leaves when only ranks below r may merge (transformers' TikTokenConverter does the
        same). Our regex and ByteLevel(use_regex=False) make the pre-tokenizer; the special tokens are added
        tokens."""
        b2u = bytes_to_unicode()
        text = lambda b: ''.join(b2u[x] for x in b)   # noqa: E731  the byte-level alphabet
        merges = []
        for tok, rank in sorted(self.ranks.items(), key=lambda kv: kv[1]):
            if len(tok) > 1:
                parts = _bpe_pieces(self.ranks, tok, rank)
                if len(parts) != 2:
                    raise ValueError(f"token {tok!r} is not the merge of two lower-ranked tokens")
                merges.append([text(parts[0]), text(parts[1])])
        added = [{'id': i, 'content': s, 'single_word': False, 'lstrip': False, 'rstrip': False,
                  'normalized': False, 'special': True} for s, i in self.specials.items()]
        tj = {'version': '1.0', 'truncation': None, 'padding': None, 'normalizer': None,
              'added_tokens': sorted(added, key=lambda t: t['id']),
              'pre_tokenizer': {'type': 'Sequence', 'pretokenizers': [
                  {'type': 'Split', 'pattern': {'Regex': PAT_STR}, 'behavior': 'Isolated', 'invert': False},
                  {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': True, 'use_regex': False}]},
              'post_processor': None,
              'decoder': {'type': 'ByteLevel', 'add_prefix_space': True, 'trim_offsets': True, 'use_regex': True},
              'model': {'type': 'BPE', 'dropout': None, 'unk_token': None, 'continuing_subword_prefix': None,
                        'end_of_word_suffix': None, 'fuse_unk': False, 'byte_fallback': False, 'ignore_merges': False,
                        'vocab': {text(t): r for t, r in self.ranks.items()}, 'merges': merges}}
        cfg = {'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': '<|bos|>', 'eos_token': '<|eos|>',
               'pad_token': '<|pad|>'}   # no post-processor: HF adds no bos, encode_prompt does
        os.makedirs(path, exist_ok=True)
        for name, d in (('tokenizer.json', tj), ('tokenizer_config.json', cfg)):
            with open(os.path.join(path, name), 'w', encoding='utf-8') as f:
                json.dump(d, f, ensure_ascii=False)


def _bpe_pieces(ranks, token, max_rank):
    """tiktoken's BPE of `token` allowed only merges of rank < max_rank: lowest-ranked adjacent pair first."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        r, i = min((ranks.get(a + b, max_rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
        if r >= max_rank:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def bytes_to_unicode():
    """GPT-2's byte-level alphabet {byte: character}: printable Latin-1 bytes stand for themselves, the other
    68 (controls, space, 0x7f-0xa0, 0xad) take U+0100.. in byte order, so the space byte is 'Ġ'."""
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    out, n = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def byte_tokenizer():
    return Tokenizer(merges=(), numbers=False)


def train_bpe(texts, n_merges):
    """
    Classic BPE (Sennrich et al. 2016) over pre-tokenised words, on bytes. Digits are left to the fixed
    number tokens, special tokens are cut out first. Deterministic: ties break on the pair's bytes.
    Returns the list of merged byte strings, in merge order.
    """
    split_special = regex.compile('|'.join(regex.escape(s) for s in SPECIAL_TOKENS))
    pat = regex.compile(PAT_STR)
    words = collections.Counter()
    for t in texts:
        for piece in split_special.split(t):
            for w in pat.findall(piece):
                if not any(ch.isdigit() for ch in w):
                    words[w.encode()] += 1
    seqs = {w: [bytes([b]) for b in w] for w in words}
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        if pairs[best] < 2:
            break
        merged = best[0] + best[1]
        merges.append(merged)
        for w, seq in seqs.items():
            i, out = 0, []
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == best[0] and seq[i + 1] == best[1]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return merges


# the end-of-text and end-of-turn tokens of the tokenizers and chat templates we load: any a tokenizer has as an
# added token ends a rollout, and rewards.py strips them from a response's tail before it is scored
STOP_TEXTS = ('<|endoftext|>', '<|im_end|>', '<|eot_id|>', '<|eom_id|>', '<|end_of_text|>', '</s>',
              '<｜end▁of▁sentence｜>', '<|eos|>')
