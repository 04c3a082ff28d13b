"""
Properties of every reward in rewards.py (hypothesis: never raises, stays in its range, also undecorated)
and adversarial 100 kB inputs that must score right (speed is bench.py's; a generous bound guards only against
hangs).

Run: python -m pytest tests/test_rewards_properties.py -q
"""
import os
import random
import sys

import pytest
from hypothesis import given, settings, strategies as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rewards as R  # noqa: E402
from rewards import (arithmetic_reward, countdown_reward, extract_answer, format_reward,  # noqa: E402
                     language_consistency_reward, parse_expression, repeated_attempts)
from test_rewards_language import count_words_slow, language_share_slow  # noqa: E402


# -----------------------------------------------------------------------------
# properties: never raises, in range, right on adversarial inputs

def all_rewards(text):
    """(name, fn, allowed values or (lo, hi)) of every text reward, bound to one input."""
    return [
        ('countdown', lambda: countdown_reward(text, [3, 4, 5], 7), {0.0, 1.0}),
        ('countdown_neg', lambda: countdown_reward(text, [1, 12], -11), {0.0, 1.0}),
        ('arithmetic', lambda: arithmetic_reward(text, 7), {0.0, 1.0}),
        ('format', lambda: format_reward(text), {0.0, 1.0}),
        ('format_lenient', lambda: format_reward(text, strict=False, prefilled_think=True), {0.0, 1.0}),
        ('language_words', lambda: language_consistency_reward(text, 'words'), (0.0, 1.0)),
        ('language_cjk', lambda: language_consistency_reward(text, 'cjk'), (0.0, 1.0)),
        ('repeated_attempts', lambda: repeated_attempts(text), (0.0, 1.0)),
    ]


def raw_rewards(text):
    """The undecorated functions must not raise either: the wrapper is a net, not the design."""
    return [lambda: R.countdown_reward.__wrapped__(text, [3, 4, 5], 7),
            lambda: R.arithmetic_reward.__wrapped__(text, 7),
            lambda: R.format_reward.__wrapped__(text),
            lambda: R.format_reward.__wrapped__(text, strict=False),
            lambda: R._language_share.__wrapped__(text, 'latin'),
            lambda: R._language_share.__wrapped__(text, 'digits'),
            lambda: R.repeated_attempts.__wrapped__(text),
            lambda: extract_answer(text),
            lambda: parse_expression(text)]


def check_rewards(text):
    """Every reward returns a float in its range, and no raw function raises; returns {name: value}."""
    values = {}
    for name, fn, allowed in all_rewards(text):
        out = values[name] = fn()
        assert type(out) is float, (name, text)
        if isinstance(allowed, set):
            assert out in allowed, (name, out, text)
        else:
            assert allowed[0] <= out <= allowed[1], (name, out, text)
    for fn in raw_rewards(text):
        fn()
    return values


PIECES = ['<think>', '</think>', '<answer>', '</answer>', '<|eos|>', '<|pad|>', '<answer', 'answer>', '(', ')', '+',
          '-', '*', '/', '=', ' ', '\n', '0', '1', '3', '4', '5', '7', '12', '999999', '9999999', '**', '^', '.',
          '٣', '３', 'three', 'abc', '我', 'ж', '\u0301', 'vs', 'no']
grammar_text = st.lists(st.sampled_from(PIECES), max_size=60).map(''.join)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_property_random_text(text):
    check_rewards(text)


@settings(max_examples=300, deadline=None)
@given(grammar_text)
def test_property_grammar_text(text):
    check_rewards(text)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(['3', '4', '5', '+', '-', '*', '/', '(', ')', ' ']), min_size=1, max_size=25)
       .map(''.join))
def test_property_countdown_agrees_with_parser(expr):
    # the reward is 1 exactly when the parser's value and literals match: check on random expressions
    parsed = parse_expression(expr)
    r = countdown_reward(f'<think>t</think><answer>{expr}</answer>', [3, 4, 5], 7)
    expected = parsed is not None and parsed[0] == 7 and sorted(parsed[1]) == [3, 4, 5]
    assert r == (1.0 if expected else 0.0)


def adversarial_inputs():
    rng = random.Random(0)
    n = 100_000
    return {
        'answer_open': '<answer>' * (n // 8),
        'answer_close': '</answer>' * (n // 9),
        'paren_open': '(' * n,
        'deep_answer': '<answer>' + '(' * n + '</answer>',
        'nines_answer': '<answer>' + '9' * n + '</answer>',
        'sum_answer': '<answer>' + '1+' * (n // 2) + '1</answer>',
        'pads': '<|pad|>' * (n // 7),
        'pads_then_char': '<answer>1</answer>' + '<|pad|>' * (n // 7) + 'x',
        'spaces': ' ' * n,
        'think_alternating': '<think>' + 'a1' * (n // 2),
        'think_tags': '<think></think>' * (n // 15),
        'template_words': '<think>' + 'vs no yes.' * (n // 10),
        'random_ascii': ''.join(rng.choice('<>/|answerthinkeospad 0123456789+-*/()=') for _ in range(n)),
        'random_unicode': '<think>' + ''.join(chr(rng.randrange(0x20, 0x110000)) for _ in range(n)),
        'mixed_scripts': '<think>' + ''.join(rng.choice(['ab ', 'жж ', '我', '12 ', 'αβ ', 'مر ']) for _ in range(n // 2)),
    }


@pytest.mark.parametrize('name', list(adversarial_inputs()))
def test_100kb_adversarial_inputs(name):
    """
    Right values on 100 kB inputs made to trip backtracking regexes, deep recursion and huge integers. No timing
    here (bench.py measures speed): every path is linear and these take milliseconds, while a quadratic one would
    take minutes on 100 kB and show as a hang.
    """
    text = adversarial_inputs()[name]
    assert len(text) >= 90_000
    values = check_rewards(text)
    # none of them answers [3, 4, 5] -> 7, [1, 12] -> -11 or 7, nor has the strict format
    assert values['countdown'] == values['countdown_neg'] == values['arithmetic'] == values['format'] == 0.0
    # the language shares against the slow twin, on the CoT as the reward extracts it
    cot = R._chain_of_thought(text)
    assert R.count_words(cot) == count_words_slow(cot)
    for target in ('words', 'digits', 'cjk'):
        assert language_consistency_reward(text, target) == pytest.approx(language_share_slow(cot, target))
