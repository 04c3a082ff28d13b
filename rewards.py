"""
Rule-based rewards: plain functions of the assistant's whole response text, returning Python floats.

- DeepSeek-R1 (arXiv 2501.12948) sec 2.2.2, R1-Zero's rule rewards: accuracy (a deterministic check of the final
  answer: `countdown_reward`, `arithmetic_reward`) and format (`format_reward`); sec 2.3.2, the language
  consistency reward, the share of target-language words in the CoT (`language_consistency_reward`).
- Kimi k1.5 (arXiv 2501.12599) sec 2.3.3, the length penalty over the samples of one problem
  (`kimi_length_reward`), and its repeat detection of looping generations (`repeat_ngram_fraction`,
  `is_repeating`, `repeat_penalty`; the paper gives no formula, the n-gram criterion is ours).
- DAPO (arXiv 2503.14476) sec 3.4, soft overlong punishment (`overlong_reward`).

Text handling: any mix of whitespace, `<|eos|>` and `<|pad|>` at the very end is stripped first. Tags match
exactly (`<answer>`: no inner spaces, case-sensitive); whitespace around tags is optional. A `<|eos|>` before
the end is just text (sampling stops at the first eos, so nothing real ever follows one).

Deviations and choices:
- Any text after the last `</answer>` gives accuracy 0: a prototype checker that ignored it was reward-hacked
  into `</answer></answer>...` degeneration (REFERENCE.md sec 5).
- Accuracy ignores the format: the last complete <answer>...</answer> counts wherever it is, even inside
  <think>. Format is rewarded separately, as in R1-Zero.
- Countdown answers go through our own recursive-descent parser (no eval) with exact rationals and hard caps,
  so "7/2*2" is 7, not 6, and "9999999*9999999*..." is rejected instead of computed.
- A prompt that prefills `<think>` makes the response start without it: `format_reward(prefilled_think=True)`
  puts it back (peers' "format reward stuck at 0").
- Language: scripts come from our table of Unicode blocks (not the full Script property); each CJK character
  is one word; combining marks split words (no normalisation). The tiny world's second "language" is numbers
  written as words: target 'words' vs 'digits'.
- Text rewards never raise (non-str input or an internal error gives 0.0: one odd sample must not kill a run)
  and are linear: each takes under 10 ms on 100 kB (a few ms at worst), timed by tests/test_rewards.py.
"""
import bisect
import functools
import re
import unicodedata
from fractions import Fraction

import numpy as np

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
_REVERSED_TAIL = re.compile(r'(?:\s|>\|soe\|<|>\|dap\|<)*')


def _strip_tail(text):
    """The text without its trailing whitespace, `<|eos|>` and `<|pad|>` runs."""
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

# Unicode blocks per script, sorted and disjoint (our approximation of the Script property). An alphanumeric
# character outside all of them is 'other'; 'digits' are ASCII 0-9 only (Arabic-Indic digits count as arabic).
SCRIPT_BLOCKS = [
    (0x0041, 0x005A, 'latin'), (0x0061, 0x007A, 'latin'), (0x00AA, 0x00AA, 'latin'), (0x00BA, 0x00BA, 'latin'),
    (0x00C0, 0x02AF, 'latin'), (0x0370, 0x03FF, 'greek'), (0x0400, 0x052F, 'cyrillic'),
    (0x0600, 0x06FF, 'arabic'), (0x0750, 0x077F, 'arabic'), (0x0870, 0x08FF, 'arabic'), (0x1100, 0x11FF, 'cjk'),
    (0x1C80, 0x1C8F, 'cyrillic'), (0x1E00, 0x1EFF, 'latin'), (0x1F00, 0x1FFF, 'greek'), (0x2C60, 0x2C7F, 'latin'),
    (0x2DE0, 0x2DFF, 'cyrillic'), (0x2E80, 0x2FDF, 'cjk'), (0x3005, 0x3007, 'cjk'), (0x3021, 0x3029, 'cjk'),
    (0x3040, 0x30FF, 'cjk'), (0x3130, 0x318F, 'cjk'), (0x31F0, 0x31FF, 'cjk'), (0x3400, 0x4DBF, 'cjk'),
    (0x4E00, 0x9FFF, 'cjk'), (0xA640, 0xA69F, 'cyrillic'), (0xA720, 0xA7FF, 'latin'), (0xA960, 0xA97F, 'cjk'),
    (0xAB30, 0xAB6F, 'latin'), (0xAC00, 0xD7FF, 'cjk'), (0xF900, 0xFAFF, 'cjk'), (0xFB50, 0xFDFF, 'arabic'),
    (0xFE70, 0xFEFF, 'arabic'), (0xFF21, 0xFF3A, 'latin'), (0xFF41, 0xFF5A, 'latin'), (0xFF66, 0xFFDC, 'cjk'),
    (0x1B000, 0x1B16F, 'cjk'), (0x20000, 0x3134F, 'cjk'),
]
_BLOCK_STARTS = [lo for lo, _, _ in SCRIPT_BLOCKS]
SCRIPTS = ('latin', 'cyrillic', 'greek', 'cjk', 'arabic', 'digits', 'other')
_CODE = dict(zip(SCRIPTS, 'LCGKADO'))  # one ASCII letter per script; ' ' for a non-word character
TARGETS = SCRIPTS + ('words',)  # 'words': the tiny world's numbers-as-words "language" (alphabetic latin)


def script_of(ch):
    """Script of one character, or None if it is not a letter or digit (Unicode category L* or N*)."""
    if unicodedata.category(ch)[0] not in 'LN':
        return None
    o = ord(ch)
    if 0x30 <= o <= 0x39:
        return 'digits'
    i = bisect.bisect_right(_BLOCK_STARTS, o) - 1
    return SCRIPT_BLOCKS[i][2] if i >= 0 and o <= SCRIPT_BLOCKS[i][1] else 'other'


def count_words_slow(cot):
    """Words per script, one character at a time: the obvious twin of `count_words`."""
    counts, prev = dict.fromkeys(SCRIPTS, 0), None
    for ch in cot:
        s = script_of(ch)
        if s is not None and (s != prev or s == 'cjk'):  # a word starts; every CJK character is a word
            counts[s] += 1
        prev = s
    return counts


@functools.cache  # built once on first use (~0.3 s), a pure function of the constants above
def _code_table():
    """A 0x110000-char string whose i-th char is the script code of chr(i): a table for str.translate."""
    return ''.join(' ' if s is None else _CODE[s] for s in map(script_of, map(chr, range(0x110000))))




def count_words(cot):
    """Words per script, as `count_words_slow` does, but every per-character step runs in C (one translate,
    then numpy over the codes: ~1 ms for 100 kB, where a translate + split per script took 6-10 ms)."""
    a = np.frombuffer(cot.translate(_code_table()).encode('ascii'), dtype=np.uint8)  # (n,) a script code per char
    prev = np.concatenate((np.array([32], dtype=np.uint8), a[:-1]))                  # (n,) the code before it
    starts = (a != 32) & ((a != prev) | (a == ord('K')))  # a word starts here; every CJK character is a word
    n = np.bincount(a[starts], minlength=128)
    return {s: int(n[ord(_CODE[s])]) for s in SCRIPTS}


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
def _language_share(response, script):
    counts = count_words(_chain_of_thought(response))
    total = sum(counts.values())
    return counts[script] / total if total else 0.0


def language_consistency_reward(response: str, target: str) -> float:
    """
    Rewards a CoT written in one language: the share, in [0, 1], of the CoT's words whose script is `target`
    (0.0 if the CoT has no words). A word is a maximal run of letters/digits of one script; each CJK character
    is a word on its own, so 'abc123' is two words. target is one of SCRIPTS or 'words': in the tiny world
    "three times four is twelve" is all 'words' and "3*4=12" is all 'digits' (3 words: 3, 4, 12).
    """
    if target not in TARGETS:  # a config typo must fail loudly, not train on a reward stuck at 0
        raise ValueError(f"unknown target {target!r}; choose from {TARGETS}")
    return _language_share(response, 'latin' if target == 'words' else target)


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
# repeat detection (Kimi k1.5: stop a generation that loops, optionally penalise it)

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


def repeat_penalty(tokens, n: int = 4, threshold: float = 0.5, penalty: float = 1.0,
                   window: int | None = 1024) -> float:
    """-penalty for a looping generation (see `is_repeating`), else 0.0; added to the task reward."""
    return -float(penalty) if is_repeating(tokens, n, threshold, window) else 0.0
