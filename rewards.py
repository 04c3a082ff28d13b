"""
Rule-based rewards: plain functions of the assistant's whole response text, returning Python floats, and
`rl_rewards`, which sums them into the (N,) reward of a batch of RL rollouts.

- DeepSeek-R1 (arXiv 2501.12948) sec 2.2.2, R1-Zero's rule rewards: accuracy (a deterministic check of the final
  answer: `countdown_reward`, `arithmetic_reward`) and format (`format_reward`); sec 2.3.2, the language
  consistency reward, the share of target-language words in the CoT (`language_consistency_reward`).
- Kimi k1.5 (arXiv 2501.12599) sec 2.3.3, the length penalty over the samples of one problem
  (`kimi_length_reward`), and its repeat detection of looping generations (`repeat_ngram_fraction`,
  `is_repeating`, `repeated_attempts`; the paper gives no formula, the criteria are ours).
- DAPO (arXiv 2503.14476) sec 3.4, soft overlong punishment (`overlong_reward`).

Text handling: any mix of whitespace, `<|pad|>` and stop tokens (tokenizer.STOP_TEXTS: `<|eos|>`, and those of
the real tokenizers and chat templates, `<|endoftext|>`, `<|im_end|>`, `<|eot_id|>`, `</s>`, ...) at the very end
is stripped first: a rollout ends with the stop token that ended it, and the decoded text keeps it, so without
this a correct answer from Qwen scored 0. Tags match exactly (`<answer>`: no inner spaces, case-sensitive);
whitespace around tags is optional. A stop token before the end is just text (sampling stops at the first one,
so nothing real ever follows one).

Deviations and choices:
- Any text after the last `</answer>` gives accuracy 0: an early prototype of this project whose checker ignored
  it was reward-hacked into `</answer></answer>...` degeneration.
- Accuracy ignores the format: the last complete <answer>...</answer> counts wherever it is, even inside
  <think>. Format is rewarded separately, as in R1-Zero.
- Countdown answers go through our own recursive-descent parser (no eval) with exact rationals and hard caps,
  so "7/2*2" is 7, not 6, and "9999999*9999999*..." is rejected instead of computed.
- A prompt that prefills `<think>` makes the response start without it: `format_reward(prefilled_think=True)`
  puts it back (peers' "format reward stuck at 0").
- Language: R1 measures the proportion of target-language words in the CoT. A word is a maximal run of letters
  and digits (str.isalnum) of one script, each CJK character a word on its own; scripts come from our table of
  Unicode blocks (not the full Script property), and combining marks split words (no normalisation). The tiny
  world's two "languages" are ways of writing numbers, 'digits' ("8+7=15") and 'words' ("eight plus seven is
  fifteen"), inside a fixed trace template ("... vs 280 no."). For these two targets the template's own words
  (TEMPLATE_WORDS: vs, yes, no, the re-check's wait and the word form's is, plus, minus, times, over) are not
  counted where they stand alone, as the symbols + - * / = of the digit form are not: what is measured is the
  language of the CoT's content, its numbers (and any free text), so a CoT written purely in digits scores 1.0 (counting
  `vs`/`no`/`yes` as latin words capped such a trace near 7/9). For the script targets every word counts, as in R1.
- Text rewards never raise (non-str input or an internal error gives 0.0: one odd sample must not kill a run)
  and run in linear time; bench.py, not the tests, is the place for their speed.
"""
import functools
import re
from fractions import Fraction

import numpy as np
import torch

from tokenizer import STOP_TEXTS

# caps of the countdown expression parser: an answer past any of them is rejected (reward 0), which bounds the
# work per answer and removes any incentive to search huge expressions
MAX_EXPR_CHARS = 200        # length of the expression text
MAX_TOKENS = 64             # integer literals + operators + parentheses
MAX_DEPTH = 16              # parenthesis nesting
MAX_LITERAL = 10 ** 6       # largest integer literal
MAX_MAGNITUDE = 10 ** 12    # largest |numerator| or denominator of any intermediate value

TAGS = ('<think>', '</think>', '<answer>', '</answer>')
SPECIAL_TOKENS = ('<|bos|>', '<|eos|>', '<|pad|>') + TAGS

# the tail to ignore, matched on the *reversed* text: a backwards scan is linear, while a forward regex search
# anchored at the end (`(...)*\Z`) backtracks quadratically on a long run of pads followed by one other char
_TAIL_TOKENS = sorted(STOP_TEXTS + ('<|pad|>',), key=len, reverse=True)
_REVERSED_TAIL = re.compile('(?:\\s|%s)*' % '|'.join(re.escape(t[::-1]) for t in _TAIL_TOKENS))


def _strip_tail(text):
    """The text without its trailing run of whitespace, `<|pad|>` and stop tokens (STOP_TEXTS)."""
    return text[:len(text) - _REVERSED_TAIL.match(text[::-1]).end()]


def _never_raises(fn):
    """A reward is 0.0 for non-str input or on any internal error: RL must not crash on one odd sample."""
    @functools.wraps(fn)  # fn.__wrapped__ stays reachable, so tests can check the raw function never raises
    def wrapper(response, *args, **kwargs):
        if not isinstance(response, str):
            return 0.0
        try:
            return fn(response, *args, **kwargs)
        except Exception:
            return 0.0
    return wrapper


# -----------------------------------------------------------------------------
# the countdown expression parser

class _Reject(Exception):
    pass


_TOKEN = re.compile(r'[0-9]+|\S')  # [0-9], not \d: '٣' or '３' must not count as digits


def _tokenize(s):
    """Integer literals (as ints) and one-char operators, or None for any other character or a cap exceeded."""
    tokens = []
    for tok in _TOKEN.findall(s):
        if tok[0] in '0123456789':
            if int(tok) > MAX_LITERAL:  # at most MAX_EXPR_CHARS digits, so int() is cheap
                return None
            tokens.append(int(tok))
        elif tok in '+-*/()':
            tokens.append(tok)
        else:
            return None  # '^', '.', '×', '=', letters, ...
    return tokens if len(tokens) <= MAX_TOKENS else None


def _checked(v):
    if abs(v.numerator) > MAX_MAGNITUDE or v.denominator > MAX_MAGNITUDE:
        raise _Reject
    return v


class _Parser:
    """
    Recursive descent over the grammar
        expr    := term (('+' | '-') term)*
        term    := factor (('*' | '/') factor)*
        factor  := '-'? primary                 (one unary minus, on a literal or a group; '--3' is rejected)
        primary := INT | '(' expr ')'
    Each level is left-associative, so 8-3-2 is 3 and 8/2/2 is 2. '**' fails: '*' cannot start a factor.
    """

    def __init__(self, tokens):
        self.tokens, self.pos, self.literals = tokens + [None], 0, []  # None marks the end

    def peek(self):
        return self.tokens[self.pos]

    def take(self):
        self.pos += 1
        return self.tokens[self.pos - 1]

    def expr(self, depth):
        value = self.term(depth)
        while self.peek() in ('+', '-'):
            op = self.take()
            rhs = self.term(depth)
            value = _checked(value + rhs if op == '+' else value - rhs)
        return value

    def term(self, depth):
        value = self.factor(depth)
        while self.peek() in ('*', '/'):
            op = self.take()
            rhs = self.factor(depth)
            if op == '/' and rhs == 0:
                raise _Reject
            value = _checked(value * rhs if op == '*' else value / rhs)
        return value

    def factor(self, depth):
        if self.peek() == '-':
            self.take()
            return -self.primary(depth)
        return self.primary(depth)

    def primary(self, depth):
        tok = self.take()
        if isinstance(tok, int):
            self.literals.append(tok)
            return Fraction(tok)
        if tok == '(' and depth < MAX_DEPTH:
            value = self.expr(depth + 1)
            if self.take() != ')':
                raise _Reject
            return value
        raise _Reject  # ')' or an operator where a number belongs, the end of input, or too deep


def parse_expression(s: str) -> tuple[Fraction, list[int]] | None:
    """
    (exact value, integer literals in order of appearance) of an arithmetic expression over non-negative ASCII
    integers with + - * / and parentheses, or None on a syntax error, a division by zero or a cap exceeded.
    Leading zeros are allowed ('07' is the literal 7).
    """
    if not isinstance(s, str) or len(s) > MAX_EXPR_CHARS:
        return None
    tokens = _tokenize(s)
    if not tokens:
        return None
    p = _Parser(tokens)
    try:
        value = p.expr(0)
    except _Reject:
        return None
    if p.peek() is not None:  # left-over tokens such as the ')' of '3)' or the '4' of '3 4'
        return None
    return value, p.literals


# -----------------------------------------------------------------------------
# accuracy rewards (R1-Zero)

def extract_answer(response: str) -> str | None:
    """Content of the last complete <answer>...</answer> pair, stripped, or None. Linear: two rfinds."""
    if not isinstance(response, str):
        return None
    end = response.rfind('</answer>')
    if end < 0:
        return None
    start = response.rfind('<answer>', 0, end)
    if start < 0:
        return None
    return response[start + len('<answer>'):end].strip()


def _final_answer(response):
    """The last answer, but only if nothing except whitespace/eos/pads follows its `</answer>`."""
    text = _strip_tail(response)
    return extract_answer(text) if text.endswith('</answer>') else None


def _is_int_equal(s, n):
    """True iff s is exactly an integer ('-'? ASCII digits, whitespace around) equal to n. No int() of a huge s."""
    s = s.strip()
    negative = s.startswith('-')
    digits = s[1:] if negative else s
    if not digits or not (digits.isascii() and digits.isdigit()):
        return False
    digits = digits.lstrip('0') or '0'
    if digits == '0':
        return n == 0  # '-0' is 0 too
    return negative == (n < 0) and digits == str(abs(n))


@_never_raises
def countdown_reward(response: str, numbers: list[int], target: int) -> float:
    """
    1.0 iff the final answer is an expression that uses each given number exactly once (the literals are the
    same multiset as `numbers`) and whose exact value is `target`; an `= N` suffix is allowed only with
    N == target. 0.0 otherwise, including for any text after the last </answer>.
    """
    answer = _final_answer(response)
    if answer is None:
        return 0.0
    if '=' in answer:
        expr, _, claimed = answer.partition('=')
        if not _is_int_equal(claimed, int(target)):  # also rejects a second '=' ('... = 7 = 7', '==')
            return 0.0
        answer = expr
    parsed = parse_expression(answer)
    if parsed is None:
        return 0.0
    value, literals = parsed
    ok = sorted(literals) == sorted(int(x) for x in numbers) and value == int(target)
    return 1.0 if ok else 0.0


@_never_raises
def arithmetic_reward(response: str, result: int) -> float:
    """1.0 iff the final answer is exactly the integer `result` (e.g. ' -12 '), nothing after </answer>."""
    answer = _final_answer(response)
    return 1.0 if answer is not None and _is_int_equal(answer, int(result)) else 0.0


# -----------------------------------------------------------------------------
# format reward (R1-Zero)

def _strict_format(t):
    if not (t.startswith('<think>') and t.endswith('</answer>')):
        return False
    if any(t.count(tag) != 1 for tag in TAGS):  # no tag is a substring of another, so counts are exact
        return False
    think_end, answer_start = t.find('</think>'), t.find('<answer>')
    if think_end > answer_start:
        return False
    think = t[len('<think>'):think_end]
    between = t[think_end + len('</think>'):answer_start]
    answer = t[answer_start + len('<answer>'):len(t) - len('</answer>')]
    return bool(think.strip()) and not between.strip() and bool(answer.strip())


def _lenient_format(t):
    i = t.find('<think>')
    j = t.find('</think>', i + len('<think>')) if i >= 0 else -1
    k = t.find('<answer>', j + len('</think>')) if j >= 0 else -1
    return k >= 0 and t.find('</answer>', k + len('<answer>')) >= 0


@_never_raises
def format_reward(response: str, strict: bool = True, prefilled_think: bool = False) -> float:
    """
    Rewards the R1 template. strict: the response is exactly `<think> ... </think> <answer> ... </answer>`
    (whitespace around tags optional, each tag once, non-empty think and answer, nothing after but whitespace/
    eos/pads). Lenient: a <think>...</think> is followed somewhere by an <answer>...</answer>.
    prefilled_think=True: the prompt ended with <think>, so the response starts inside it.
    """
    text = _strip_tail('<think>' + response if prefilled_think else response).lstrip()
    ok = _strict_format(text) if strict else _lenient_format(text)
    return 1.0 if ok else 0.0


# -----------------------------------------------------------------------------
# language consistency reward (R1 sec 2.3.2)

# Unicode blocks per script, sorted and disjoint (our approximation of the Script property): 'digits' are ASCII 0-9
# only (Arabic-Indic digits count as arabic). A letter or digit outside all of them is 'other'.
SCRIPT_BLOCKS = [
    (0x0030, 0x0039, 'digits'), (0x0041, 0x005A, 'latin'), (0x0061, 0x007A, 'latin'), (0x00AA, 0x00AA, 'latin'),
    (0x00BA, 0x00BA, 'latin'), (0x00C0, 0x02AF, 'latin'), (0x0370, 0x03FF, 'greek'), (0x0400, 0x052F, 'cyrillic'),
    (0x0600, 0x06FF, 'arabic'), (0x0750, 0x077F, 'arabic'), (0x0870, 0x08FF, 'arabic'), (0x1100, 0x11FF, 'cjk'),
    (0x1C80, 0x1C8F, 'cyrillic'), (0x1E00, 0x1EFF, 'latin'), (0x1F00, 0x1FFF, 'greek'), (0x2C60, 0x2C7F, 'latin'),
    (0x2DE0, 0x2DFF, 'cyrillic'), (0x2E80, 0x2FDF, 'cjk'), (0x3005, 0x3007, 'cjk'), (0x3021, 0x3029, 'cjk'),
    (0x3040, 0x30FF, 'cjk'), (0x3130, 0x318F, 'cjk'), (0x31F0, 0x31FF, 'cjk'), (0x3400, 0x4DBF, 'cjk'),
    (0x4E00, 0x9FFF, 'cjk'), (0xA640, 0xA69F, 'cyrillic'), (0xA720, 0xA7FF, 'latin'), (0xA960, 0xA97F, 'cjk'),
    (0xAB30, 0xAB6F, 'latin'), (0xAC00, 0xD7FF, 'cjk'), (0xF900, 0xFAFF, 'cjk'), (0xFB50, 0xFDFF, 'arabic'),
    (0xFE70, 0xFEFF, 'arabic'), (0xFF21, 0xFF3A, 'latin'), (0xFF41, 0xFF5A, 'latin'), (0xFF66, 0xFFDC, 'cjk'),
    (0x1B000, 0x1B16F, 'cjk'), (0x20000, 0x3134F, 'cjk'),
]
SCRIPTS = ('digits', 'latin', 'cyrillic', 'greek', 'cjk', 'arabic', 'other')
TARGETS = SCRIPTS + ('words',)  # 'words': the tiny world's numbers-as-words "language" (alphabetic latin)
_CJK, _OTHER, _NONE = SCRIPTS.index('cjk'), SCRIPTS.index('other'), len(SCRIPTS)  # _NONE: not a word character
_NON_ASCII_NON_WORD = re.compile(r'[^\w\x00-\x7f]+')  # neither ASCII nor str.isalnum(): symbols, marks, ...


def _script_table():
    """(0x110000,) int8 script id of every code point (1.1 MB, built in ~1 ms): no word in ASCII's punctuation."""
    table = np.full(0x110000, _OTHER, dtype=np.int8)
    table[:128] = _NONE  # ASCII letters and digits are all in blocks: the rest is spaces and punctuation
    for lo, hi, s in SCRIPT_BLOCKS:
        table[lo:hi + 1] = SCRIPTS.index(s)
    return table


_SCRIPT_OF = _script_table()

# the words corpus.countdown_trace writes around the numbers, in either form: "8+7=15 vs 280 no." and "eight plus
# seven is fifteen vs two hundred eighty no.", and the re-check's "wait"; one counts only where no letter or digit touches it. The check on
# its left is a lookbehind over the word itself, so the pattern starts with the words' letters and the regex
# engine skips to them (twice as fast as a leading lookbehind)
TEMPLATE_WORDS = ('vs', 'yes', 'no', 'wait', 'is', 'plus', 'minus', 'times', 'over')
_TEMPLATE_WORD = re.compile('(?:%s)(?![^\\W_])' % '|'.join(rf'{w}(?<![^\W_]{w})' for w in TEMPLATE_WORDS))


def count_words(text):
    """
    Words per script: maximal runs of letters/digits of one script, every CJK character a word of its own
    ('abc123' is two words, '我们' two). Linear, every per-character step in C: a regex pass (non-ASCII text
    only), a table lookup and a few numpy passes over the code points.
    """
    if not text.isascii():  # letters and digits are a matter of Unicode categories: the regex engine knows them
        text = _NON_ASCII_NON_WORD.sub(' ', text)
    script = _SCRIPT_OF[np.frombuffer(text.encode('utf-32-le'), dtype=np.uint32)]  # (n,) a script per character
    prev = np.insert(script[:-1], 0, _NONE)                                     # (n,) the script of the one before
    starts = (script != _NONE) & ((script != prev) | (script == _CJK))        # (n,) a word starts here
    return dict(zip(SCRIPTS, np.bincount(script[starts], minlength=_NONE).tolist()))


def _chain_of_thought(response):
    """Text inside <think>...</think> (to the end if unclosed), or before </think> if <think> was prefilled."""
    text = _strip_tail(response)
    i = text.find('<think>')
    if i >= 0:
        j = text.find('</think>', i)
        cot = text[i + len('<think>'):j if j >= 0 else len(text)]
    else:
        j = text.find('</think>')
        if j < 0:
            return ''  # no CoT at all
        cot = text[:j]
    for tok in SPECIAL_TOKENS:  # a stray '<answer>' in the CoT is not the word "answer"
        cot = cot.replace(tok, ' ')
    return cot


@_never_raises
def _language_share(response, target):
    cot = _chain_of_thought(response)
    if target in ('digits', 'words'):  # the tiny world: the template's scaffolding is in neither language
        cot = _TEMPLATE_WORD.sub(' ', cot)
    counts = count_words(cot)
    total = sum(counts.values())
    return counts['latin' if target == 'words' else target] / total if total else 0.0


def language_consistency_reward(response: str, target: str) -> float:
    """
    Rewards a CoT written in one language: the share, in [0, 1], of the CoT's words in `target` (0.0 if the CoT
    has no words). target is one of SCRIPTS or 'words'. For 'digits' and 'words' the template's TEMPLATE_WORDS
    are not counted: "<think>8+7=15 vs 280 no.</think>" is 1.0 for 'digits' (its words: 8, 7, 15, 280) and
    "<think>eight plus seven is fifteen vs two hundred eighty no.</think>" 1.0 for 'words' (eight, seven, ...).
    """
    if target not in TARGETS:  # a config typo must fail loudly, not train on a reward stuck at 0
        raise ValueError(f"unknown target {target!r}; choose from {TARGETS}")
    return _language_share(response, target)


# -----------------------------------------------------------------------------
# length rewards (Kimi k1.5, DAPO)

def kimi_length_reward(lengths: list[int], correct: list[bool]) -> list[float]:
    """
    Kimi k1.5 sec 2.3.3, for the k samples of one problem: lambda_i = 0.5 - (len_i - min_len) / (max_len - min_len)
    rewards short correct answers (+0.5 for the shortest) and never rewards a wrong answer for being short
    (min(0, lambda_i)), while long ones of either kind are penalised down to -0.5. All 0 if the lengths are equal.
    """
    if len(lengths) != len(correct):
        raise ValueError(f"{len(lengths)} lengths but {len(correct)} correctness flags")
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    if hi == lo:
        return [0.0] * len(lengths)
    lam = [0.5 - (n - lo) / (hi - lo) for n in lengths]
    return [float(x) if ok else float(min(0.0, x)) for x, ok in zip(lam, correct)]


def overlong_reward(length: int, max_len: int, cache_len: int) -> float:
    """
    DAPO's soft overlong punishment, added to the task reward: 0 up to max_len - cache_len tokens, then a
    linear ramp down to -1 at max_len, and -1 beyond (a truncated answer), so the model learns to stop early.
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    soft = max_len - cache_len
    if length <= soft:
        return 0.0
    if length <= max_len:
        return (soft - length) / cache_len
    return -1.0


# -----------------------------------------------------------------------------
# repeat detection (Kimi k1.5: stop a generation that loops, penalise repeated attempts)

def repeat_ngram_fraction(tokens: list, n: int = 4) -> float:
    """
    Share of the n-grams of `tokens` (ids, or the characters of a str) that repeat an earlier n-gram: 0 for text
    with no repeated n-gram, close to 1 for a loop. Linear: every n-gram is hashed once (C-level zip and set).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seq = tokens.tolist() if hasattr(tokens, 'tolist') else tokens  # a tensor's elements would hash by identity
    total = len(seq) - n + 1
    if total <= 0:
        return 0.0
    distinct = len(set(zip(*(seq[i:] for i in range(n)))))  # n shifted copies zipped into n-gram tuples
    return (total - distinct) / total


def is_repeating(tokens, n: int = 4, threshold: float = 0.5, window: int | None = 1024) -> bool:
    """
    True if at least `threshold` of the n-grams in the last `window` tokens (None: all) are repeats: the
    generation loops, so stop or penalise it. The tail is what "it loops now" means, and it bounds the cost
    (a set of 100k distinct n-grams takes tens of ms in Python).
    """
    return repeat_ngram_fraction(tokens if window is None else tokens[-window:], n) >= threshold


@_never_raises
def repeated_attempts(response: str) -> float:
    """
    Share of the CoT's attempts (its '.'-separated pieces, blank ones skipped) that repeat an earlier one word for
    word: Kimi's repeat penalty at the granularity of a search step ("6-1=5 5-2=3 vs 4 no." written twice).
    """
    attempts = [a.strip() for a in _chain_of_thought(response).split('.')]
    return repeat_ngram_fraction([a for a in attempts if a], 1)


# -----------------------------------------------------------------------------
# the RL reward of a batch of rollouts

def rl_rewards(texts, problems, lengths, group_size, max_new_tokens, format_weight=0.0, repeat_weight=0.0,
               length_weight=0.0, lang_weight=0.0, overlong_buffer=0, lang_target='digits', prefilled_think=False):
    """
    (N,) rewards of N countdown rollouts (texts as decoded, a final <|eos|> allowed; G = group_size consecutive
    ones per problem; `lengths` in tokens) and a dict of their (N,) parts:
        accuracy + format_weight * format - repeat_weight * repeat + length_weight * length
                 + lang_weight * lang + overlong
    'accuracy' (countdown_reward) and 'format' (strict format_reward; prefilled_think=True when the prompt ended
    with <think>, tasks.prefills_think) are always in parts, each other term only
    when it is on: 'repeat' (repeated_attempts), 'length' (Kimi k1.5 sec 2.3.3 within each group, correct =
    accuracy > 0), 'lang' (R1 sec 2.3.2, language_consistency_reward with lang_target) and, for
    overlong_buffer > 0, 'overlong' (DAPO sec 3.4: 0 up to max_new_tokens - overlong_buffer tokens, then down to
    -1 at max_new_tokens; unweighted, as in DAPO).
    """
    N, G = len(texts), group_size
    lengths = [int(n) for n in lengths]
    if len(problems) != N or len(lengths) != N:
        raise ValueError(f"{N} texts need as many problems and lengths, got {len(problems)} and {len(lengths)}")
    if G < 1 or N % G:
        raise ValueError(f"{N} samples are not whole groups of group_size={G}")
    if overlong_buffer and not 0 < overlong_buffer <= max_new_tokens:
        raise ValueError(f"need 0 < overlong_buffer <= max_new_tokens, got overlong_buffer={overlong_buffer}, "
                         f"max_new_tokens={max_new_tokens}")
    acc = torch.tensor([countdown_reward(t, p.numbers, p.target) for t, p in zip(texts, problems)])   # (N,)
    fmt = torch.tensor([format_reward(t, prefilled_think=prefilled_think) for t in texts])              # (N,)
    parts = {'accuracy': acc, 'format': fmt}
    reward = acc + format_weight * parts['format']
    if repeat_weight:
        parts['repeat'] = torch.tensor([repeated_attempts(t) for t in texts])
        reward = reward - repeat_weight * parts['repeat']
    if length_weight:  # each group of G samples of one problem is ranked by length on its own
        correct = (acc > 0).tolist()
        parts['length'] = torch.tensor([r for s in range(0, N, G)
                                        for r in kimi_length_reward(lengths[s:s + G], correct[s:s + G])])
        reward = reward + length_weight * parts['length']
    if lang_weight:
        parts['lang'] = torch.tensor([language_consistency_reward(t, lang_target) for t in texts])
        reward = reward + lang_weight * parts['lang']
    if overlong_buffer:
        parts['overlong'] = torch.tensor([overlong_reward(n, max_new_tokens, overlong_buffer) for n in lengths])
        reward = reward + parts['overlong']
    return reward, parts
