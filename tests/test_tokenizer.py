"""Tokenizer tests: round-trips, special tokens, number tokens, BPE. Run: python -m pytest tests/test_tokenizer.py -q"""
import random

from tokenizer import Tokenizer, byte_tokenizer, train_bpe, SPECIAL_TOKENS

SAMPLES = ["", "hello world", "  two  spaces\tand\ttabs\n\nnew lines", "naïve café 日本語 العربية 🙂👍🏽",
           "x = (3*4)-5 = 7, 1000000 0007", "<think>a</think><answer>b</answer>", "\u0000\u00ff\uffff", "Ω≈ç√∫˜µ≤≥÷"]


def test_roundtrip_unicode():
    tok = Tokenizer(train_bpe(["User: make 7 from 1 2 3. Assistant:"] * 10, 30))
    rng = random.Random(0)
    rand = [''.join(chr(rng.randint(1, 0x10FFFF)) for _ in range(50)).encode('utf-8', 'ignore').decode('utf-8', 'ignore')
            for _ in range(20)]
    for t in SAMPLES + rand:
        for tk in (tok, byte_tokenizer()):
            assert tk.decode(tk.encode(t)) == t
            assert tk.decode(tk.encode(t, special=False)) == t


def test_special_tokens_are_single_ids():
    tok = Tokenizer()
    ids = tok.encode("<|bos|><think>x</think><answer>1</answer><|eos|>")
    assert ids[0] == tok.bos and ids[-1] == tok.eos
    assert tok.think in ids and tok.think_end in ids and tok.answer in ids and tok.answer_end in ids
    # untrusted text never becomes a special token
    assert not set(tok.encode("<think>", special=False)) & tok.special_ids
    assert len(set(SPECIAL_TOKENS)) == len(tok.special_ids)


def test_numbers_up_to_three_digits_are_one_token():
    tok = Tokenizer()
    for n in [0, 7, 10, 99, 100, 729, 999]:
        assert len(tok.encode(str(n))) == 1, n
    assert [tok.decode([i]) for i in tok.encode("1234")] == ["123", "4"]
    assert len(byte_tokenizer().encode("729")) == 3


def test_bpe_learns_frequent_words_and_serialises():
    texts = ["User: make 12 from 3 4 5. Assistant:"] * 50
    merges = train_bpe(texts, 50)
    assert b'User' in merges and b' make' in merges
    tok = Tokenizer(merges)
    assert len(tok.encode(" make")) == 1
    tok2 = Tokenizer.from_dict(tok.to_dict())
    assert tok2.encode(texts[0]) == tok.encode(texts[0]) and tok2.n_vocab == tok.n_vocab
    # deterministic
    assert train_bpe(texts, 50) == merges
