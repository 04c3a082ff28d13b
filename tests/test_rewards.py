"""
Tests of rewards.py against worked examples (values derived by hand in the comments) and slow twins. The
language reward is in test_rewards_language.py; properties (never raises, stays in range) and adversarial
100 kB inputs in test_rewards_properties.py.

Run: python -m pytest tests/test_rewards.py -q
"""
import os
import sys
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings, strategies as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tasks  # noqa: E402
from rewards import (arithmetic_reward, countdown_reward, extract_answer, format_reward, is_repeating,  # noqa: E402
                     kimi_length_reward, overlong_reward, parse_expression, repeat_ngram_fraction, repeated_attempts,
                     rl_rewards)


def cd(answer, numbers=(3, 4, 5), target=7, think='3*4=12,12-5=7.'):
    """A countdown response in the tokenizer's tight form, scored."""
    return countdown_reward(f"<think>{think}</think><answer>{answer}</answer>", list(numbers), target)


# -----------------------------------------------------------------------------
# parse_expression

@pytest.mark.parametrize('s, value, literals', [
    ('(3*4)-5', 7, [3, 4, 5]),
    (' 12 +\t3 ', 15, [12, 3]),
    ('8-3-2', 3, [8, 3, 2]),                      # left-associative: (8-3)-2, not 8-(3-2)=7
    ('8/2/2', 2, [8, 2, 2]),                      # (8/2)/2
    ('2+3*4', 14, [2, 3, 4]),                     # precedence: 2+12
    ('6/(1+3)', Fraction(3, 2), [6, 1, 3]),       # 6/4 stays exact
    ('7/2*2', 7, [7, 2, 2]),                      # 3.5*2; floor division would give 6
    ('(1/3)*6', 2, [1, 3, 6]),
    ('-3+5', 2, [3, 5]),                          # unary minus on a literal
    ('-(2*3)+10', 4, [2, 3, 10]),                 # ... and on a group
    ('3*-2', -6, [3, 2]),
    ('007', 7, [7]),                              # leading zeros: the literal 7
    ('1000000*1000000', 10 ** 12, [10 ** 6, 10 ** 6]),   # exactly at both caps
    ('1/999999/999999', Fraction(1, 999998000001), [1, 999999, 999999]),  # denominator 999998000001 <= 1e12
    ('(' * 16 + '1' + ')' * 16, 1, [1]),          # depth 16 is allowed
    ('1' + ' ' * 199, 1, [1]),                    # 200 chars is allowed
    ('1+' * 31 + '1', 32, [1] * 32),              # 63 tokens
])
def test_parse_valid(s, value, literals):
    assert parse_expression(s) == (value, literals)


@pytest.mark.parametrize('s', [
    '', '   ', '()', '(3', '3)', '3 4', '3+', '*3', '--3', '3--', '1.5', '3x4', '3×4', '3÷4', '3 = 3',
    '1/0', '5/(3-3)', '0/0',                               # division by zero
    '2**100', '2^10', '2**3',                              # no powers
    '9999999*9999999*9999999', '1000001',                  # a literal above 1e6
    '999999*999999*999999',                                # 999998000001 is fine, then ~1e18 > 1e12
    '1000000*1000000+1',                                   # 1e12 + 1
    '1/999999/999999/2',                                   # denominator 1999996000002 > 1e12
    '(' * 17 + '1' + ')' * 17,                             # depth 17
    '(' * 1000 + '1' + ')' * 1000,                         # deep and long
    ' ' * 200 + '1',                                       # 201 chars
    '1+' * 32 + '1',                                       # 65 tokens
    '٣+4', '３*4', '3+٤', '²+1', '𝟑+1',                     # Unicode digits are not digits
    None, 7, b'1+1',
])
def test_parse_invalid(s):
    assert parse_expression(s) is None


# -----------------------------------------------------------------------------
# extract_answer

@pytest.mark.parametrize('text, answer', [
    ('<answer> 7 </answer>', '7'),
    ('<answer>1</answer> x <answer>2</answer>', '2'),          # the last pair wins
    ('<answer>1</answer><answer>2', '1'),                      # '<answer>2' is not a complete pair
    ('<answer>a<answer>b</answer>', 'b'),                      # innermost opening before the last closing
    ('<answer></answer>', ''),
    ('<think><answer>9</answer></think>', '9'),
    ('no tags', None), ('<answer>7', None), ('7</answer>', None), ('</answer><answer>', None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


# -----------------------------------------------------------------------------
# countdown_reward: numbers [3, 4, 5], target 7 unless said otherwise

def test_countdown_correct_and_equivalent_forms():
    assert cd('(3*4)-5') == 1.0
    assert cd('3*4-5') == 1.0                      # 12-5
    assert cd(' 5 - ( 4 + 3 ) + 3 * 4 - 5 + 5 - 5 ', numbers=[5, 4, 3, 3, 4, 5, 5, 5], target=5) == 1.0  # -2+12-5+5-5
    assert cd('(3*4)-5', numbers=[5, 3, 4]) == 1.0  # order of the given numbers does not matter
    assert cd('4*3-5') == 1.0
    # the tokenizer may put spaces or newlines around tags, or none
    text = " <think> 3*4=12 </think>\n<answer> (3*4)-5 </answer>\n"
    assert countdown_reward(text, [3, 4, 5], 7) == 1.0


def test_countdown_wrong_value_or_numbers():
    assert cd('(3+4)-5') == 0.0          # 2
    assert cd('(3*4)-3', target=9) == 0.0  # value 9 but 3 reused and 5 missing
    assert cd('3*4', target=12) == 0.0   # 5 missing
    assert cd('(3*4)-5+0') == 0.0        # an extra number (0 is not given)
    assert cd('(3*4)-5*1') == 0.0        # an extra number (1)
    assert cd('12-5') == 0.0             # 12 is not a given number
    assert cd('7') == 0.0
    assert cd('7', numbers=[7], target=7) == 1.0
    assert cd('(3*4)-5', numbers=[3, 4, 5, 5]) == 0.0  # a given number left unused


def test_countdown_exact_fractions():
    # numbers [1, 3, 6], target 2: (6/3)*1 = 2*1 = 2; 6/(3*1) = 6/3 = 2; (1/3)*6 = 6/3 = 2 via the fraction 1/3
    for ans in ('(6/3)*1', '6/(3*1)', '(1/3)*6', '6*1/3'):
        assert cd(ans, numbers=[1, 3, 6], target=2) == 1.0, ans
    # numbers [1, 3, 6, 9], target 11: (1/3)*6 + 9 = 2 + 9
    assert cd('(1/3)*6+9', numbers=[1, 3, 6, 9], target=11) == 1.0
    # 7/2*2 = 7 exactly (integer division would give 3*2 = 6)
    assert cd('7/2*2', numbers=[7, 2, 2], target=7) == 1.0
    assert cd('7/2*2', numbers=[7, 2, 2], target=6) == 0.0
    # 6/(1+3) = 3/2, which is no integer target
    assert cd('6/(1+3)', numbers=[6, 1, 3], target=1) == 0.0
    assert cd('6/(1+3)', numbers=[6, 1, 3], target=2) == 0.0


def test_countdown_division_by_zero_and_huge():
    assert cd('5/(3-3)', numbers=[5, 3, 3], target=0) == 0.0
    assert cd('5*(3-3)', numbers=[5, 3, 3], target=0) == 1.0   # 5*0 = 0 is fine
    assert cd('9999999*9999999*9999999', numbers=[9999999] * 3, target=9999999 ** 3) == 0.0
    assert cd('2**100', numbers=[2, 100], target=2 ** 100) == 0.0
    assert cd('2^10', numbers=[2, 10], target=1024) == 0.0
    assert cd('(' * 1000 + '3*4-5' + ')' * 1000) == 0.0


def test_countdown_equals_suffix():
    assert cd('(3*4)-5 = 7') == 1.0
    assert cd('(3*4)-5=7') == 1.0
    assert cd('(3*4)-5 = 8') == 0.0      # a wrong claim
    assert cd('(3*4)-5 = 7 = 7') == 0.0
    assert cd('(3*4)-5 == 7') == 0.0
    assert cd('(3*4)-5 =') == 0.0
    assert cd('= 7') == 0.0
    assert cd('7 = (3*4)-5') == 0.0      # only a trailing '= N' is accepted
    assert cd('(3*4)-5 = 7.0') == 0.0


def test_countdown_negative_target():
    # numbers [2, 5], target -3: 2-5 = -3
    assert cd('2-5', numbers=[2, 5], target=-3) == 1.0
    assert cd('2-5 = -3', numbers=[2, 5], target=-3) == 1.0
    assert cd('2-5 = 3', numbers=[2, 5], target=-3) == 0.0
    assert cd('5-2', numbers=[2, 5], target=-3) == 0.0


def test_countdown_answer_tags():
    ok = '(3*4)-5'
    # several answers: the last one counts
    assert countdown_reward(f'<think>x</think><answer>9</answer><answer>{ok}</answer>', [3, 4, 5], 7) == 1.0
    assert countdown_reward(f'<think>x</think><answer>{ok}</answer><answer>9</answer>', [3, 4, 5], 7) == 0.0
    # an <answer> inside the think is just an earlier answer
    assert countdown_reward(f'<think>maybe <answer>9</answer></think><answer>{ok}</answer>', [3, 4, 5], 7) == 1.0
    # the accuracy reward does not check the format
    assert countdown_reward(f'<answer>{ok}</answer>', [3, 4, 5], 7) == 1.0
    # empty and unclosed tags
    assert countdown_reward('<think>x</think><answer></answer>', [3, 4, 5], 7) == 0.0
    assert countdown_reward('<think>x</think><answer>   </answer>', [3, 4, 5], 7) == 0.0
    assert countdown_reward(f'<think>x</think><answer>{ok}', [3, 4, 5], 7) == 0.0
    assert countdown_reward(f'<think>x</think><answer>{ok}</answer', [3, 4, 5], 7) == 0.0
    assert countdown_reward(f'<think>x</think>{ok}</answer>', [3, 4, 5], 7) == 0.0
    assert countdown_reward(f'<think>x</think>{ok}', [3, 4, 5], 7) == 0.0


def test_countdown_trailing_text():
    base = '<think>3*4=12</think><answer>(3*4)-5</answer>'
    for tail in ('', ' ', '\n\n', '<|eos|>', ' <|eos|> ', '<|eos|><|pad|><|pad|>', '<|pad|>', '<|eos|><|eos|>'):
        assert countdown_reward(base + tail, [3, 4, 5], 7) == 1.0, repr(tail)
    # the degenerate tails a lenient checker was hacked with, and any other text
    for tail in ('</answer>', '</answer></answer>', ' done', '<answer>', '</think>', '<|eos|>x', '.', '<|bos|>'):
        assert countdown_reward(base + tail, [3, 4, 5], 7) == 0.0, repr(tail)


def test_countdown_unicode_digits_and_bad_input():
    assert cd('(٣*4)-5') == 0.0
    assert cd('(３*４)-５') == 0.0
    assert countdown_reward(None, [3, 4, 5], 7) == 0.0
    assert countdown_reward(b'<answer>(3*4)-5</answer>', [3, 4, 5], 7) == 0.0
    assert countdown_reward('', [3, 4, 5], 7) == 0.0


# -----------------------------------------------------------------------------
# arithmetic_reward

@pytest.mark.parametrize('answer, result, reward', [
    ('7', 7, 1.0), (' 7 ', 7, 1.0), ('\n7\n', 7, 1.0), ('-3', -3, 1.0), ('007', 7, 1.0), ('-0', 0, 1.0),
    ('0', 0, 1.0), ('123456789012345678901234567890', 123456789012345678901234567890, 1.0),
    ('8', 7, 0.0), ('-7', 7, 0.0), ('7', -7, 0.0), ('+7', 7, 0.0), ('7.0', 7, 0.0), ('3+4', 7, 0.0),
    ('7 = 7', 7, 0.0), ('- 7', -7, 0.0), ('٧', 7, 0.0), ('７', 7, 0.0), ('', 0, 0.0), ('-', 0, 0.0),
    ('seven', 7, 0.0), ('7 7', 7, 0.0), ('9' * 50000, 7, 0.0),
])
def test_arithmetic(answer, result, reward):
    assert arithmetic_reward(f'<think>3+4=7</think><answer>{answer}</answer>', result) == reward


def test_arithmetic_tags():
    assert arithmetic_reward('<think>x</think><answer>7</answer><|eos|><|pad|>', 7) == 1.0
    assert arithmetic_reward('<think>x</think><answer>7</answer> junk', 7) == 0.0
    assert arithmetic_reward('<think>x</think><answer>7</answer></answer>', 7) == 0.0
    assert arithmetic_reward('<answer>8</answer><answer>7</answer>', 7) == 1.0
    assert arithmetic_reward('<answer>7</answer><answer>8</answer>', 7) == 0.0
    assert arithmetic_reward('<answer>7', 7) == 0.0
    assert arithmetic_reward(None, 7) == 0.0


# -----------------------------------------------------------------------------
# format_reward

@pytest.mark.parametrize('text, strict, lenient', [
    ('<think>3*4=12</think><answer>(3*4)-5</answer>', 1, 1),
    ('<think> 3*4=12 </think> <answer> 7 </answer>', 1, 1),
    ('\n<think>\na\n</think>\n\n<answer>\n7\n</answer>\n', 1, 1),
    ('<think>a</think><answer>7</answer><|eos|><|pad|><|pad|>', 1, 1),
    ('<think> </think><answer>7</answer>', 0, 1),             # empty think
    ('<think>a</think><answer> </answer>', 0, 1),              # empty answer
    ('<think>a</think><answer>7</answer><answer>8</answer>', 0, 1),   # two answers
    ('<think>a <answer>9</answer></think><answer>7</answer>', 0, 1),  # an answer inside the think
    ('<think>a</think> so <answer>7</answer>', 0, 1),          # text between
    ('Sure. <think>a</think><answer>7</answer>', 0, 1),        # text before
    ('<think>a</think><answer>7</answer> ok', 0, 1),           # text after
    ('<think>a</think><answer>7</answer></answer>', 0, 1),
    ('<think><think>a</think><answer>7</answer>', 0, 1),
    ('<answer>7</answer><think>a</think>', 0, 0),              # wrong order
    ('<think>a<answer>7</answer>', 0, 0),                      # unclosed think
    ('<think>a</think><answer>7', 0, 0),                       # unclosed answer
    ('<think>a</think>', 0, 0), ('<answer>7</answer>', 0, 0), ('', 0, 0), ('plain text', 0, 0),
    ('a</think><answer>7</answer>', 0, 0),                     # prefilled <think>, not declared
])
def test_format(text, strict, lenient):
    assert format_reward(text) == strict
    assert format_reward(text, strict=True) == strict
    assert format_reward(text, strict=False) == lenient


def test_format_prefilled_think():
    # the prompt ended with '<think>', so the model's text starts inside it
    resp = '3*4=12,12-5=7.</think><answer>(3*4)-5</answer><|eos|>'
    assert format_reward(resp) == 0.0                              # the reported "stuck at 0"
    assert format_reward(resp, prefilled_think=True) == 1.0
    assert format_reward(resp, strict=False, prefilled_think=True) == 1.0
    assert format_reward(' a </think>\n<answer>7</answer>', prefilled_think=True) == 1.0
    # the model opening a second think after the prefilled one breaks the strict format
    assert format_reward('<think>a</think><answer>7</answer>', prefilled_think=True) == 0.0
    assert format_reward('</think><answer>7</answer>', prefilled_think=True) == 0.0  # empty think


# -----------------------------------------------------------------------------
# real tokenizers: the stop token that ended a rollout stays in the decoded text; chat templates; TinyZero answers

STOPS = ['<|endoftext|>', '<|im_end|>', '</s>', '<|eot_id|>', '<|end_of_text|>', '<\uff5cend\u2581of\u2581sentence\uff5c>',
         '<|eos|>']
# what Qwen2.5 writes after TinyZero's prompt (which prefilled '<think>'): the answer is any expression of the numbers
TINYZERO = (" 44 + 19 = 63, 63 - 35 = 28. Let me check: 28 is the target.\n</think>\n"
            "<answer> (44 + 19) - 35 </answer>")


@pytest.mark.parametrize('stop', STOPS)
def test_rewards_ignore_the_stop_token_that_ended_the_rollout(stop):
    """A right answer followed by its stop token scored 0.0 before (only <|eos|> was stripped)."""
    for tail in (stop, stop + '\n', '\n' + stop, stop + '<|endoftext|>', stop + '<|pad|><|pad|>'):
        assert countdown_reward(TINYZERO + tail, [44, 19, 35], 28) == 1.0, tail
        assert format_reward(TINYZERO + tail, prefilled_think=True) == 1.0, tail
        assert format_reward(TINYZERO + tail) == 0.0                   # the think tag is in the prompt
        assert format_reward('<think>' + TINYZERO + tail) == 1.0
        assert arithmetic_reward('<think>a</think><answer>28</answer>' + tail, 28) == 1.0
    # a stop token is stripped only at the very end: text after one is still text after the answer
    assert countdown_reward(TINYZERO + stop + 'x', [44, 19, 35], 28) == 0.0
    assert countdown_reward(TINYZERO + stop + '<answer>1</answer>', [44, 19, 35], 28) == 0.0


def test_rewards_in_a_chat_template():
    """The response to the Qwen chat prompt (tasks.CHAT_TEMPLATE, <think> prefilled) ends with <|im_end|>; a
    model that wraps its whole turn again, or starts a new turn, is not rewarded for the format."""
    p = tasks.TinyZeroCountdown([44, 19, 35], 28, '(44 + 19) - 35', float('nan'))
    prompt = tasks.format_prompt(p, 'chat')
    assert prompt.startswith('<|im_start|>system\n') and prompt.endswith('<|im_start|>assistant\n'
                                                                           'Let me solve this step by step.\n<think>')
    assert tasks.prefills_think('chat') and tasks.prefills_think('tinyzero')
    assert not tasks.prefills_think('short') and not tasks.prefills_think('r1zero')
    resp = TINYZERO + '<|im_end|>'
    assert countdown_reward(resp, p.numbers, p.target) == 1.0
    assert format_reward(resp, prefilled_think=True) == 1.0
    new_turn = TINYZERO + '<|im_end|>\n<|im_start|>user\nthanks<|im_end|>'
    assert countdown_reward(new_turn, p.numbers, p.target) == 0.0
    assert format_reward(new_turn, prefilled_think=True) == 0.0
    r, parts = rl_rewards([resp, TINYZERO.replace('- 35', '+ 35') + '<|im_end|>'], [p, p], [30, 30], 2, 64,
                          format_weight=0.1, prefilled_think=True)
    assert parts['accuracy'].tolist() == [1.0, 0.0] and parts['format'].tolist() == [1.0, 1.0]
    torch.testing.assert_close(r, torch.tensor([1.1, 0.1]))           # TinyZero's 0.1 for the formatted wrong one
    _, parts = rl_rewards([resp, resp], [p, p], [30, 30], 2, 64)        # not told: the format looks broken
    assert parts['format'].tolist() == [0.0, 0.0]


@pytest.mark.parametrize('answer', ['(44 + 19) - 35', '44 + 19 - 35', '19 + 44 - 35', '-35 + 44 + 19',
                                    '(19 - 35) + 44', '44 - (35 - 19)', '((44)) + (19 - 35)', '19 - (35 - 44)'])
def test_tinyzero_answers_in_any_order_and_bracketing(answer):
    assert countdown_reward(f"</think>\n<answer> {answer} </answer><|endoftext|>", [44, 19, 35], 28) == 1.0


def test_numbers_past_999_as_several_tokens():
    """Real tokenizers split numbers (Qwen2: one digit per token; Llama 3: runs of three): the reward reads the
    decoded text, so 1234 is one literal however it was tokenised; a literal split by a space is two."""
    assert countdown_reward('</think><answer>(1234 - 1000) * 2 + 12</answer><|im_end|>', [1000, 1234, 2, 12],
                            480) == 1.0
    assert countdown_reward('</think><answer>123456 / 4</answer><|im_end|>', [4, 123456], 30864) == 1.0
    assert countdown_reward('</think><answer>12 34 / 2</answer>', [1234, 2], 617) == 0.0


def test_format_bad_input():
    assert format_reward(None) == 0.0
    assert format_reward(42, strict=False) == 0.0


# -----------------------------------------------------------------------------
# Kimi length reward, DAPO overlong reward

def test_kimi_length_reward_by_hand():
    # lengths 10, 20, 30, 40: min 10, max 40, range 30
    # lambda = 0.5 - (0, 10, 20, 30)/30 = 0.5, 0.1667, -0.1667, -0.5
    # correct keeps lambda, wrong gets min(0, lambda): 0.5, 0, -0.1667, -0.5
    out = kimi_length_reward([10, 20, 30, 40], [True, False, True, False])
    assert out == pytest.approx([0.5, 0.0, -1 / 6, -0.5])
    assert all(isinstance(x, float) for x in out)
    # all correct: lambda as is
    assert kimi_length_reward([10, 20, 30, 40], [True] * 4) == pytest.approx([0.5, 1 / 6, -1 / 6, -0.5])
    # lengths 5, 5, 15: lambda 0.5, 0.5, -0.5
    assert kimi_length_reward([5, 15, 5], [False, True, True]) == pytest.approx([0.0, -0.5, 0.5])


def test_kimi_length_reward_edge_cases():
    assert kimi_length_reward([7, 7, 7], [True, False, True]) == [0.0, 0.0, 0.0]
    assert kimi_length_reward([12], [True]) == [0.0]
    assert kimi_length_reward([], []) == []
    with pytest.raises(ValueError):
        kimi_length_reward([1, 2], [True])


@pytest.mark.parametrize('length, reward', [
    # max_len 100, cache_len 20: no penalty up to 80, then (80 - length)/20, then -1
    (0, 0.0), (50, 0.0), (80, 0.0), (81, -0.05), (90, -0.5), (99, -0.95), (100, -1.0), (101, -1.0), (10 ** 6, -1.0),
])
def test_overlong_boundaries(length, reward):
    assert overlong_reward(length, 100, 20) == pytest.approx(reward)


def test_overlong_args():
    assert overlong_reward(0, 10, 10) == 0.0           # cache_len == max_len: the ramp starts at 0
    assert overlong_reward(5, 10, 10) == -0.5
    assert overlong_reward(11, 10, 10) == -1.0
    for max_len, cache_len in ((100, 0), (100, -5), (100, 101), (0, 0)):
        with pytest.raises(ValueError, match='cache_len'):
            overlong_reward(50, max_len, cache_len)


# -----------------------------------------------------------------------------
# rl_rewards: the terms summed for a batch

P280 = SimpleNamespace(numbers=[8, 7, 5], target=280)
RL_TEXTS = [
    # right (8*7)*5 = 280, strict format, attempts distinct, all digits
    '<think>8+7=15 vs 280 no.8*7=56 56*5=280 vs 280 yes.</think><answer>(8*7)*5</answer><|eos|>',
    # wrong (8+7)*5 = 75, strict format, its 2 attempts the same, all digits
    '<think>8+7=15 vs 280 no.8+7=15 vs 280 no.</think><answer>(8+7)*5</answer>',
    # right, no think: format 0, no attempts, no CoT words (language 0)
    '<answer>(8*7)*5</answer>',
    # wrong 8+7+5 = 20, strict format, one attempt, in words
    '<think>eight plus seven is fifteen vs two hundred eighty no.</think><answer>8+7+5</answer>',
]


def test_rl_rewards_by_hand():
    # G = 2, max_new_tokens 20, overlong buffer 5: the ramp runs from 15 tokens (0) to 20 (-1)
    lengths = [10, 20, 4, 16]
    r, parts = rl_rewards(RL_TEXTS, [P280] * 4, lengths, 2, 20, format_weight=0.1, repeat_weight=0.5,
                          length_weight=0.2, lang_weight=0.3, overlong_buffer=5)
    want = {'accuracy': [1, 0, 1, 0], 'format': [1, 1, 0, 1], 'repeat': [0, 0.5, 0, 0],
            # group 1: lengths 10, 20: lambda 0.5, -0.5; group 2: 4, 16: lambda 0.5, -0.5 (both wrong ones < 0)
            'length': [0.5, -0.5, 0.5, -0.5], 'lang': [1, 1, 0, 0],
            # 10 and 4 tokens: 0; 20: (15 - 20) / 5 = -1; 16: (15 - 16) / 5 = -0.2
            'overlong': [0, -1, 0, -0.2]}
    assert set(parts) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(parts[k], torch.tensor(v, dtype=torch.float32), msg=k)
    # 1 + 0.1 + 0.2 * 0.5 + 0.3 = 1.5; 0.1 - 0.5 * 0.5 - 0.2 * 0.5 + 0.3 - 1 = -0.95; 1 + 0.2 * 0.5 = 1.1;
    # 0.1 - 0.2 * 0.5 - 0.2 = -0.2
    torch.testing.assert_close(r, torch.tensor([1.5, -0.95, 1.1, -0.2]))
    assert r.shape == (4,) and r.dtype == torch.float32


def test_rl_rewards_defaults_and_errors():
    r, parts = rl_rewards(RL_TEXTS, [P280] * 4, [10, 20, 4, 16], 2, 20)
    assert set(parts) == {'accuracy', 'format'}                          # the optional terms are off
    torch.testing.assert_close(r, torch.tensor([1.0, 0.0, 1.0, 0.0]))   # accuracy alone
    r, _ = rl_rewards(RL_TEXTS, [P280] * 4, [10, 20, 4, 16], 4, 20, format_weight=0.5)
    torch.testing.assert_close(r, torch.tensor([1.5, 0.5, 1.0, 0.5]))
    with pytest.raises(ValueError, match='whole groups'):
        rl_rewards(RL_TEXTS, [P280] * 4, [10, 20, 4, 16], 3, 20)
    with pytest.raises(ValueError, match='lengths'):
        rl_rewards(RL_TEXTS, [P280] * 4, [10, 20, 4], 2, 20, length_weight=0.2)
    for buffer in (21, -1):
        with pytest.raises(ValueError, match='overlong_buffer'):
            rl_rewards(RL_TEXTS, [P280] * 4, [10, 20, 4, 16], 2, 20, overlong_buffer=buffer)
    with pytest.raises(ValueError, match='unknown target'):
        rl_rewards(RL_TEXTS, [P280] * 4, [10, 20, 4, 16], 2, 20, lang_weight=0.1, lang_target='english')
    r, parts = rl_rewards([], [], [], 2, 20, length_weight=0.2, overlong_buffer=5)
    assert r.shape == (0,) and parts['length'].shape == (0,)


# -----------------------------------------------------------------------------
# repeat detection

def repeat_fraction_slow(seq, n):
    """The obvious loop: count n-grams already seen."""
    seen, repeats = set(), 0
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams) if grams else 0.0


def test_repeat_by_hand():
    # 'abcd' * 25: 97 4-grams, only 4 distinct (abcd, bcda, cdab, dabc): 93 repeats
    loop = 'abcd' * 25
    assert repeat_ngram_fraction(loop) == pytest.approx(93 / 97)
    assert is_repeating(loop)
    # [1, 2, 3] * 10 with n = 3: 28 3-grams, 3 distinct
    assert repeat_ngram_fraction([1, 2, 3] * 10, n=3) == pytest.approx(25 / 28)
    # no repeated 4-gram
    assert repeat_ngram_fraction('abcdefghij') == 0.0
    assert not is_repeating('abcdefghij')
    # shorter than n
    assert repeat_ngram_fraction('abc') == 0.0
    assert repeat_ngram_fraction([]) == 0.0
    # 'aaaaa' with n = 2: 4 bigrams, 1 distinct
    assert repeat_ngram_fraction('aaaaa', n=2) == pytest.approx(3 / 4)
    with pytest.raises(ValueError):
        repeat_ngram_fraction('abc', n=0)


def test_repeated_attempts_by_hand():
    # the same attempt three times: 3 attempts, the last 2 repeat the first (the first one counts too: the
    # <think> before it is not part of it)
    loop = '<think>6-1=5 5-2=3 vs 4 no.6-1=5 5-2=3 vs 4 no.6-1=5 5-2=3 vs 4 no.</think><answer>(6-1)-2</answer>'
    assert repeated_attempts(loop) == pytest.approx(2 / 3)
    assert repeated_attempts('<think>a. b. a.</think><answer>1</answer><|eos|>') == pytest.approx(1 / 3)
    assert repeated_attempts('<think>a...a</think>') == 0.5       # blank pieces are no attempts: a, a
    assert repeated_attempts('<think>a. b.</think>') == 0.0
    assert repeated_attempts('a. a.</think><answer>1</answer>') == 0.5   # a prefilled <think>
    for text in ('<answer>1</answer>', '', None):                         # no CoT, no attempts
        assert repeated_attempts(text) == 0.0


def test_repeat_looping_generation():
    # a generation that starts well and then loops: the tail decides
    start = ''.join(chr(0x4e00 + i) for i in range(3000))  # 3000 distinct chars
    looping = start + '</answer>' * 200
    assert repeat_ngram_fraction(start) == 0.0
    assert is_repeating(looping)                      # the last 1024 chars are the loop
    assert not is_repeating(looping, window=None)     # over the whole text: 1800 loop chars of 4800 are not half
    assert not is_repeating(looping[:3100])


def test_repeat_torch_tensor():
    torch = pytest.importorskip('torch')
    t = torch.tensor([5, 6] * 50)
    assert repeat_ngram_fraction(t, n=2) == pytest.approx(repeat_fraction_slow([5, 6] * 50, 2))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 4), max_size=50) | st.text(alphabet='ab ', max_size=50), st.integers(1, 5))
def test_repeat_fast_matches_slow_twin(seq, n):
    assert repeat_ngram_fraction(seq, n) == pytest.approx(repeat_fraction_slow(seq, n))
