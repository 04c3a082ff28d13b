"""
rewards.language_consistency_reward (DeepSeek-R1 sec 2.3.2) against worked examples and a slow twin that
counts words by hand: the share of the CoT's content in the target language, the template's own words excluded.

Run: python -m pytest tests/test_rewards_language.py -q
"""
import os
import random
import sys

import pytest
from hypothesis import given, settings, strategies as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rewards as R  # noqa: E402
import corpus
import tasks  # noqa: E402
from rewards import language_consistency_reward  # noqa: E402


# -----------------------------------------------------------------------------
# language_consistency_reward

@pytest.mark.parametrize('text, target, share', [
    # digits: 3, 4, 12, 12, 5, 7 -> 6 digit words of 6
    ('<think>3*4=12,12-5=7.</think><answer>7</answer>', 'digits', 1.0),
    ('<think>3*4=12,12-5=7.</think><answer>7</answer>', 'words', 0.0),
    # 5 latin words of 5
    ('<think>three times four is twelve</think><answer>12</answer>', 'words', 1.0),
    ('<think>three times four is twelve</think><answer>12</answer>', 'latin', 1.0),
    ('<think>three times four is twelve</think><answer>12</answer>', 'digits', 0.0),
    # for digits/words the template words times, is, yes do not count: 3 and 12 in digits, four in words
    ('<think>3 times four is 12 yes</think>', 'words', 1 / 3),
    ('<think>3 times four is 12 yes</think>', 'digits', 2 / 3),
    # for a script every word counts: times, four, is, yes latin, 3 and 12 digits
    ('<think>3 times four is 12 yes</think>', 'latin', 4 / 6),
    # 'abc123' is two words (the script changes), 'x' a third: 2 latin of 3
    ('<think>abc123 x</think>', 'words', 2 / 3),
    # accented latin stays one latin word: café, naïve
    ('<think>café naïve</think>', 'latin', 1.0),
    # each CJK character is a word: 我 们 计 算 (4) plus 3 and 4 (2 digit words): 4 of 6
    ('<think>我们计算 3*4</think>', 'cjk', 4 / 6),
    ('<think>我们计算 3*4</think>', 'digits', 2 / 6),
    ('<think>ひらがなカタカナ한국</think>', 'cjk', 1.0),          # 8 kana + 2 hangul, all cjk
    # привет (cyrillic), world (latin): 1 of 2 each; 'приветworld' is two words as well
    ('<think>привет world</think>', 'cyrillic', 0.5),
    ('<think>приветworld</think>', 'latin', 0.5),
    ('<think>αβγ abc δ</think>', 'greek', 2 / 3),
    # Arabic-Indic digit ٣ is arabic script, not 'digits': مرحبا, ٣ (arabic) and 5 (digits): 2 of 3
    ('<think>مرحبا ٣ 5</think>', 'arabic', 2 / 3),
    ('<think>मेरा 5</think>', 'other', 2 / 3),                # Devanagari vowel signs split the word: म, र + 5
    # fullwidth ３ is not an ASCII digit: 'other'
    ('<think>３ 3</think>', 'digits', 0.5),
])
def test_language_share(text, target, share):
    assert language_consistency_reward(text, target) == pytest.approx(share)


def test_language_cot_extraction():
    # prefilled think: the CoT is the text before </think>; the answer is not part of it
    assert language_consistency_reward('three four</think><answer>7 8 9</answer>', 'words') == 1.0
    # unclosed think: the CoT runs to the end; special tokens are not the words "answer" or "eos"
    assert language_consistency_reward('<think>three 3 <answer>4</answer><|eos|>', 'words') == pytest.approx(1 / 3)
    # only the think counts, not text before it or the answer
    assert language_consistency_reward('hello world <think>3 4</think><answer>five</answer>', 'digits') == 1.0
    # no CoT, an empty one, or one without words
    for text in ('no tags', '<think></think><answer>7</answer>', '<think> *+= </think>', '', '<answer>x</answer>'):
        assert language_consistency_reward(text, 'words') == 0.0, text
    assert language_consistency_reward(None, 'words') == 0.0


def test_language_unknown_target():
    with pytest.raises(ValueError, match='unknown target'):
        language_consistency_reward('<think>a</think>', 'english')


def test_language_template_words_do_not_count():
    # (a) a CoT purely in digits: 8, 7, 15, 15, 5, 10, 280, 8, 7, 56, 56, 5, 280, 280 are 14 digit words; its
    # vs, no, vs, yes are the template's, not latin words (counting them capped this trace at 14/18 = 7/9)
    digits = '<think>8+7=15 15-5=10 vs 280 no.8*7=56 56*5=280 vs 280 yes.</think><answer>(8*7)*5</answer><|eos|>'
    assert language_consistency_reward(digits, 'digits') == 1.0
    assert language_consistency_reward(digits, 'words') == 0.0
    # (b) purely in words: eight, seven, fifteen, fifteen, five, ten, two, hundred, eighty; plus, is, minus, vs, no
    # are the template's
    words = '<think>eight plus seven is fifteen, fifteen minus five is ten vs two hundred eighty no.</think>'
    assert language_consistency_reward(words, 'words') == 1.0
    assert language_consistency_reward(words, 'digits') == 0.0
    # (c) mixed: 8, 7, 15, 280 in digits; eight, seven, fifteen, two, hundred, eighty in words: 4 and 6 of 10
    mixed = '<think>8+7=15 vs 280 no.eight plus seven is fifteen vs two hundred eighty no.</think>'
    assert language_consistency_reward(mixed, 'digits') == pytest.approx(0.4)
    assert language_consistency_reward(mixed, 'words') == pytest.approx(0.6)
    # a template word counts where a letter or digit touches it ('vs' of '15vs'); 'nothing' is no 'no'
    assert language_consistency_reward('<think>15vs 15 yes.</think>', 'digits') == pytest.approx(2 / 3)
    assert language_consistency_reward('<think>nothing 3</think>', 'digits') == 0.5
    # (d) natural text, script targets: every word counts, 'is' and 'no' included
    assert language_consistency_reward('<think>this is no joke</think>', 'latin') == 1.0
    assert language_consistency_reward('<think>我们 is no 3</think>', 'cjk') == pytest.approx(2 / 5)   # 我, 们 of 5
    assert language_consistency_reward('<think>我们 is no 3</think>', 'digits') == pytest.approx(1 / 3)  # 我, 们, 3


def test_language_of_the_tiny_worlds_traces():
    # the task's own writers: cold-start traces are digits only; a corpus trace with words_frac=1 is words only
    rng, cfg = random.Random(0), tasks.TaskConfig()
    for p in tasks.problems('countdown', 'train', 20, 0, cfg):
        assert language_consistency_reward(corpus.cold_start_trace(rng, p, cfg), 'digits') == 1.0
        words = corpus.countdown_trace(rng, p, tasks.TaskConfig(words_frac=1.0))
        assert language_consistency_reward(words, 'words') == 1.0, words


def count_words_slow(text):
    """Words per script, one character at a time: the obvious twin of rewards.count_words."""
    counts, prev = dict.fromkeys(R.SCRIPTS, 0), None
    for ch in text:
        script = None
        if ch.isalnum():
            script = next((s for lo, hi, s in R.SCRIPT_BLOCKS if lo <= ord(ch) <= hi), 'other')
        if script is not None and (script != prev or script == 'cjk'):  # a word starts; each CJK char is one
            counts[script] += 1
        prev = script
    return counts


def language_share_slow(cot, target):
    """The share of target words in a CoT, the template words dropped for digits/words: a twin of the reward."""
    if target in ('digits', 'words'):
        runs = ''.join(ch if ch.isalnum() else ' ' for ch in cot).split()   # letters/digits between the rest
        cot = ' '.join(w for w in runs if w not in R.TEMPLATE_WORDS)
    counts = count_words_slow(cot)
    total = sum(counts.values())
    return counts['latin' if target == 'words' else target] / total if total else 0.0


UNICODE_PIECES = ['a', 'é', 'Z', '1', '09', '٣', '３', '我', 'ひ', '한', 'ж', 'λ', 'م', 'म', 'े', '_', ' ', '-',
                  '\u0301', '²', 'Ⅻ', '\U00020000', '\ud800', 'ß', 'Ａ', '×', '。']


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=60)
       | st.lists(st.sampled_from(UNICODE_PIECES), max_size=40).map(''.join))
def test_count_words_fast_matches_slow_twin(text):
    assert R.count_words(text) == count_words_slow(text)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(['vs', 'no', 'yes', 'is', 'plus', 'nothing', 'vsé', 'four', '8', '12', ' ', '.',
                                 '+', '=', ',', '_', 'é', '我', 'ж']), max_size=30).map(''.join),
       st.sampled_from(['digits', 'words', 'latin', 'cjk']))
def test_language_share_matches_slow_twin(cot, target):
    assert language_consistency_reward(f'<think>{cot}</think>', target) == pytest.approx(
        language_share_slow(cot, target))
