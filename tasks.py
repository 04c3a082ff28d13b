"""
The tiny world: tasks with verifiable answers, their prompts, and the readers of a response's checks (the
synthetic pretraining corpus that writes such responses is corpus.py).

- Countdown (the TinyZero / nano-aha-moment replay task): reach a target from n numbers with + - * and exact /,
  each number used once. Solvable by construction: we chain the numbers in a random order with random valid
  moves (Countdown's rules: subtraction only when positive, division only when exact) and take the value.
  Every expression here is a left-deep chain ((a op b) op c): one form for problems, attempts and answers.
  The known solution is kept for tests; it is never shown to the model.
- Arithmetic: evaluate an expression step by step (same move kinds; `digits` sets the operand size).
- Held-out splits are disjoint from train *by problem*: a problem's canonical key (sorted numbers and target,
  or the expression) is hashed, and the hash decides its split, so no seed or sampling order can leak one.
- Templates: the R1-Zero prompt (DeepSeek-R1, Table 1) and a short variant for tiny models, whose context and
  compute cannot afford 80 tokens of preamble; for real checkpoints TinyZero's two prompts (its
  examples/data_preprocess/countdown.py: 'base' for base models, 'qwen-instruct' for Qwen's chat template), both
  of which end with `<think>` prefilled (`prefills_think`: the format reward must know, rewards.format_reward).
- task='tinyzero': countdown at TinyZero's distribution, as in its Countdown-Tasks-3to4 set (the set nano-aha-moment
  trains on too): 3 or 4 numbers from 1..100, a target in 1..100, any expression over the numbers (any order and
  bracketing, each number once) as the answer, asked in TinyZero's words. We draw the problems ourselves
  (`make_tinyzero`: random numbers, a random expression tree over them under Countdown's rules, its value as the
  target), so they are solvable by construction; the published set was drawn by its own generator, which we do
  not reproduce: small targets are likelier here than a uniform draw would make them. Such problems carry no
  difficulty label (solve_rate is nan: counting the hits among every expression tree of 4 numbers costs more than
  the draw), so Kimi's curriculum sampling refuses them.
- Each countdown problem carries a difficulty label, `solve_rate`, that rollouts.PromptSampler's curriculum
  (Kimi k1.5 sec 2.3.4) sorts by.
"""
import hashlib
import itertools
import math
import random
import re
from dataclasses import dataclass

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt}. Assistant:")
SHORT_TEMPLATE = "User: {prompt}. Assistant:"
# TinyZero's two prompts, word for word (its 'base' and 'qwen-instruct' template_type; the instruct one's system
# line says "thinks" and its user turn starts with a space, as there): the assistant turn starts inside <think>
TINYZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the answer.\n"
    "User: {prompt}\nAssistant: Let me solve this step by step.\n<think>")
CHAT_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant. You first thinks about the reasoning process in the mind and "
    "then provides the user with the answer.<|im_end|>\n<|im_start|>user\n {prompt}<|im_end|>\n"
    "<|im_start|>assistant\nLet me solve this step by step.\n<think>")
TEMPLATES = {'r1zero': R1_ZERO_TEMPLATE, 'short': SHORT_TEMPLATE, 'tinyzero': TINYZERO_TEMPLATE, 'chat': CHAT_TEMPLATE}
TINYZERO_QUESTION = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use basic arithmetic operations "
    "(+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. And return the "
    "final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.")
TASKS = ('tiny', 'tinyzero')
# the tiny world before issue 15: a writer who stops after a random count and walks past hits (the base does not
# know when to stop; RL shortens its CoT), kept for tiny-walk, tiny-r1 and the tests of that walk
WALK_PAST_HITS = dict(stop_at_yes=0.3, give_up=0.0, slip=0.0, recheck=0.0)   # the defaults: the `tiny-walk` world
# `tiny`'s writers (EXPERIMENTS.md e4, k4, cw): most under-think (the first `no` ends 63% of traces) and rarely re-check
# a yes (3 in 100); 30% never give up and redo 4 yes in 10, by rewriting the whole attempt (the one-step redo's copy
# slips made RL drop re-checking: EXPERIMENTS.md k1-k5); one miss in twenty is said to hit. The re-checks are the
# persistent writers' habit, so RL, which selects the persistent walk, carries them with it (cw)
UNDER_THINKER = dict(stop_at_yes=0.9, give_up=0.9, persist=0.3, slip=0.05, slip_kind='verdict', recheck=0.03,
                     persist_recheck=0.4, recheck_kind='attempt')


def prefills_think(template):
    """True when the template's prompt ends inside <think>: the response then starts without the tag."""
    return TEMPLATES[template].endswith('<think>')


def in_test_split(key, test_frac):
    """Deterministic split by a problem's canonical key: the same problem always lands in the same split."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), 'little')
    return (h % 1_000_000) < test_frac * 1_000_000


def apply_move(a, op, b):
    """Countdown's rules: None when the move is not allowed. Commutative moves are written larger-first
    (`random_moves`), so the corpus holds each sum and product in one order only."""
    if op == '+':
        return a + b
    if op == '-':
        return a - b if a > b else None
    if op == '*':
        return a * b
    if op == '/':
        return a // b if b > 1 and a % b == 0 else None
    raise ValueError(f"unknown op {op!r}")


def chain(xs, ops_seq):
    """
    The left-deep chain ((x0 op1 x1) op2 x2) ..., one move per step, or None if a move breaks the rules.
    Returns (value, steps, expr): steps are (a, op, b, result) and the step k's left operand is always the
    previous result, so an expression is copied off its steps in a fixed pattern. The first move of a
    commutative op is written larger-first (half the facts to learn; the other order is another permutation).
    """
    value, expr, steps = xs[0], str(xs[0]), []
    for k, (op, x) in enumerate(zip(ops_seq, xs[1:])):
        if k == 0 and op in '+*' and value < x:
            return None
        r = apply_move(value, op, x)
        if r is None:
            return None
        steps.append((value, op, x, r))
        expr = f"({expr}{op}{x})" if k < len(xs) - 2 else f"{expr}{op}{x}"
        value = r
    return value, steps, expr


def random_moves(rng, numbers, ops):
    """A random valid left-deep chain over all the numbers (random order and ops), or None (rare)."""
    for _ in range(100):
        xs = rng.sample(numbers, len(numbers))
        res = chain(xs, [rng.choice(ops) for _ in xs[1:]])
        if res is not None:
            return res
    return None


def all_attempts(numbers, ops):
    """
    Every distinct valid chain (the search space of one attempt), as (value, steps, expr), in the canonical
    order that search='enumerate' walks: orders of the prompt's numbers as itertools.permutations gives them,
    then operators with the last varying fastest, i.e. depth first: one first move, all its second moves.
    """
    out, seen = [], set()
    for perm in itertools.permutations(numbers):
        for ops_seq in itertools.product(ops, repeat=len(numbers) - 1):
            res = chain(list(perm), ops_seq)
            if res is not None and res[2] not in seen:
                seen.add(res[2])
                out.append(res)
    return out


@dataclass
class Countdown:
    numbers: list       # the given numbers, in prompt order
    target: int         # reachable by construction
    solution: str       # one expression that reaches it (for tests; never shown to the model)
    solve_rate: float   # share of all valid move sequences that reach the target: the difficulty label

    @property
    def key(self):
        return f"cd:{sorted(self.numbers)}:{self.target}"

    def prompt(self):
        return f"make {self.target} from {' '.join(map(str, self.numbers))}"


class TinyZeroCountdown(Countdown):
    """A countdown problem asked in TinyZero's words: the numbers as a Python list, any expression as the answer."""

    def prompt(self):
        return TINYZERO_QUESTION.format(numbers=list(self.numbers), target=self.target)


@dataclass
class Arithmetic:
    expr: str           # e.g. "(3*4)-5"
    result: int
    steps: list         # (a, op, b, result) in evaluation order

    @property
    def key(self):
        return f"ar:{self.expr}"

    def prompt(self):
        return f"compute {self.expr}"


@dataclass
class TaskConfig:
    task: str = 'tiny'          # countdown problems: tiny (left-deep chains of small numbers) | tinyzero (TinyZero's)
    n_numbers: int = 3          # countdown: how many numbers (tinyzero: the most)
    min_numbers: int = 0        # tinyzero: fewest numbers, each count in min..n_numbers equally likely (0: n_numbers)
    lo: int = 1                 # smallest number
    hi: int = 9                 # largest number
    ops: str = '+-*/'           # allowed operations
    max_target: int = 999       # resample targets above this (keeps every value one token)
    test_frac: float = 0.25     # share of the problem space held out
    max_attempts: int = 10      # most attempts a corpus trace writes
    search: str = 'enumerate'   # how corpus traces pick attempts: enumerate | random | sorted (EXPERIMENTS.md)
    stop_at_yes: float = 0.3    # chance that a corpus writer stops at an attempt whose check said yes
    give_up: float = 0.0        # enumerate: chance that a writer answers after a check said no (0: a random count)
    persist: float = 0.0        # enumerate, with give_up: chance that a writer never gives up (walks to a yes)
    slip: float = 0.0           # enumerate: chance that a missing attempt says yes (a slip, of slip_kind)
    slip_kind: str = 'step'     # a slip writes the last step's result as the target (step) | says yes to it (verdict)
    recheck: float = 0.0        # enumerate: chance that a writer redoes an attempt that said yes (recheck_kind)
    persist_recheck: float = 0.0  # enumerate: recheck for a persistent writer (recheck is then the others')
    recheck_kind: str = 'step'  # the redo rewrites the attempt's last step (step) | all its steps (attempt)
    words_frac: float = 0.0     # chance that a corpus trace writes an attempt in number words (a 2nd language)
    template: str = 'short'     # prompt: short | r1zero (DeepSeek-R1) | tinyzero (TinyZero's base) | chat (Qwen chat)

    @property
    def rechecks(self):   # does any writer redo a `yes`? (then report.forced_recheck has something to force)
        return self.recheck > 0 or self.persist_recheck > 0

    def __post_init__(self):
        # the problem generators draw until a problem fits these fields: nonsense here used to spin forever
        if not 2 <= self.n_numbers <= 6:  # >= 2 for one move; all_attempts walks n! * |ops|^(n-1) chains a problem
            raise ValueError(f"n_numbers must be in 2..6, got {self.n_numbers}")
        if not 1 <= self.lo <= self.hi:
            raise ValueError(f"need 1 <= lo <= hi (Countdown's numbers are positive), got lo={self.lo}, hi={self.hi}")
        if not self.ops or set(self.ops) - set('+-*/'):
            raise ValueError(f"ops must be a non-empty string of + - * /, got {self.ops!r}")
        if self.max_target < 1:
            raise ValueError(f"max_target must be >= 1 (targets are positive), got {self.max_target}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {tuple(TEMPLATES)}, got {self.template!r}")
        for f in ('stop_at_yes', 'give_up', 'persist', 'slip', 'recheck', 'persist_recheck', 'words_frac'):
            if not 0 <= getattr(self, f) <= 1:
                raise ValueError(f"{f} must be a chance in [0, 1], got {getattr(self, f)}")
        if self.slip_kind not in ('step', 'verdict'):
            raise ValueError(f"slip_kind must be 'step' or 'verdict', got {self.slip_kind!r}")
        if self.recheck_kind not in ('step', 'attempt'):
            raise ValueError(f"recheck_kind must be 'step' or 'attempt', got {self.recheck_kind!r}")
        if self.min_numbers and not 2 <= self.min_numbers <= self.n_numbers:
            raise ValueError(f"min_numbers must be 0 or in 2..n_numbers={self.n_numbers}, got {self.min_numbers}")


# make_countdown's budget. The tight but possible configs we tried accept >= 1% of draws (ops='-' with 5 numbers:
# 1.1%; ops='/' with hi=20: 1.4%), and at 1% all 2000 draws fail with chance 0.99^2000 ~ 2e-9
COUNTDOWN_DRAWS = 2000


def make_countdown(rng, cfg):
    """A random Countdown problem: random numbers, a random valid chain over them, its value as the target
    (if 1 <= value <= max_target). Fields that admit (almost) no such chain, e.g. ops='-' with lo=hi, raise
    after COUNTDOWN_DRAWS draws instead of drawing forever."""
    for _ in range(COUNTDOWN_DRAWS):
        numbers = [rng.randint(cfg.lo, cfg.hi) for _ in range(cfg.n_numbers)]
        res = random_moves(rng, numbers, cfg.ops)
        if res is None or not (1 <= res[0] <= cfg.max_target):
            continue
        attempts = all_attempts(numbers, cfg.ops)
        rate = sum(a[0] == res[0] for a in attempts) / len(attempts)
        return Countdown(numbers, res[0], res[2], rate)
    raise ValueError(f"no countdown problem in {COUNTDOWN_DRAWS} draws with n_numbers={cfg.n_numbers}, lo={cfg.lo}, "
                     f"hi={cfg.hi}, ops={cfg.ops!r}, max_target={cfg.max_target}: these fields admit (almost) none")


def random_tree(rng, numbers, ops):
    """(value, expression) of a random expression over all the numbers: a random order, then random neighbours
    joined by random ops until one is left (every bracketing of the order can come out), each move under
    Countdown's rules (apply_move), or None when a move breaks them."""
    items = [(x, str(x)) for x in rng.sample(numbers, len(numbers))]
    while len(items) > 1:
        i = rng.randrange(len(items) - 1)
        (a, ea), (b, eb) = items[i], items[i + 1]
        op = rng.choice(ops)
        v = apply_move(a, op, b)
        if v is None:
            return None
        items[i:i + 2] = [(v, f"({ea} {op} {eb})")]
    value, expr = items[0]
    return value, expr[1:-1] if len(numbers) > 1 else expr


def make_tinyzero(rng, cfg):
    """A countdown problem at TinyZero's distribution (module docstring): min_numbers..n_numbers numbers from
    lo..hi, the value of a random expression tree over them (random_tree) as the target if it is in 1..max_target."""
    n = rng.randint(cfg.min_numbers or cfg.n_numbers, cfg.n_numbers)   # before the draws: 4 numbers miss more
    for _ in range(COUNTDOWN_DRAWS):
        numbers = [rng.randint(cfg.lo, cfg.hi) for _ in range(n)]
        res = random_tree(rng, numbers, cfg.ops)
        if res is not None and 1 <= res[0] <= cfg.max_target:
            return TinyZeroCountdown(numbers, res[0], res[1], math.nan)
    raise ValueError(f"no tinyzero countdown problem in {COUNTDOWN_DRAWS} draws with n_numbers={cfg.n_numbers}, "
                     f"lo={cfg.lo}, hi={cfg.hi}, ops={cfg.ops!r}, max_target={cfg.max_target}")


def make_arithmetic(rng, cfg, digits=1):
    """
    A left-deep chain `((x0 op x1) op x2) ...` over n_numbers operands of `digits` digits, evaluated left to
    right, one move per step: the same form as a countdown attempt. Left-deep on purpose: the k-th step's
    operator sits right after the k-th ')', which a 4-layer model reads reliably; with nested forms like
    `8*(6+1)` the tiny base got the outer operator wrong half the time (EXPERIMENTS.md exp3).
    """
    lo, hi = (cfg.lo, cfg.hi) if digits == 1 else (10 ** (digits - 1), 10 ** digits - 1)
    while True:
        xs = [rng.randint(lo, hi) for _ in range(cfg.n_numbers)]
        res = chain(xs, [rng.choice(cfg.ops) for _ in xs[1:]])
        if res is not None and res[0] <= cfg.max_target:
            return Arithmetic(res[2], res[0], res[1])


def problems(kind, split, n, seed, cfg, digits=1):
    """n distinct problems of one split, deterministic in (seed, cfg). kind 'countdown' or 'arithmetic'."""
    if split not in ('train', 'test'):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{kind}:{split}:{seed}")
    seen, out = set(), []
    for _ in range(200 * n + 1000):
        p = ({'tiny': make_countdown, 'tinyzero': make_tinyzero}[cfg.task](rng, cfg) if kind == 'countdown'
             else make_arithmetic(rng, cfg, digits))
        if p.key in seen or in_test_split(p.key, cfg.test_frac) != (split == 'test'):
            continue
        if kind == 'arithmetic' and split == 'train' and _leaks_countdown(p, cfg):
            continue
        seen.add(p.key)
        out.append(p)
        if len(out) == n:
            return out
    raise ValueError(f"could only make {len(out)} distinct {split} {kind} problems of {n}: the space is too small")


def _leaks_countdown(p, cfg):
    """An arithmetic drill whose numbers and value form a held-out countdown problem would leak its answer."""
    nums = [int(t) for t in re.findall(r'\d+', p.expr)]
    return in_test_split(f"cd:{sorted(nums)}:{p.result}", cfg.test_frac)


# -----------------------------------------------------------------------------
# text: prompts, worked steps, responses

def format_prompt(problem, template='short'):
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose from {sorted(TEMPLATES)}")
    return TEMPLATES[template].format(prompt=problem.prompt())


_REDO = re.compile(r'wait ([^.<]*) (yes|no)\.')
_STEP = re.compile(r'(\d+)([-+*/])(\d+)=(\d+)')
_CHECK = re.compile(r'=(\d+) vs (\d+) (yes|no)\.')


def self_checks(text):
    """(re-checks, re-checks that said no, slips, yes verdicts) in a response's CoT: the `wait 5*4=20 vs 24 no.`
    redo of countdown_trace; a slip is a digit step `a op b=r` whose r is not Countdown's value of a op b
    (apply_move) or a check `=r vs t yes|no.` whose verdict is not r == t; the yes verdicts are the attempts'
    (a redo's own verdict is not one): what a re-check follows, so re-checks per yes is the habit's rate."""
    cot = text.split('</think>')[0]
    verdicts = [v for _, v in _REDO.findall(cot)]
    wrong = sum(apply_move(int(a), op, int(b)) != int(r) for a, op, b, r in _STEP.findall(cot))
    wrong += sum((r == t) != (v == 'yes') for r, t, v in _CHECK.findall(cot))
    yes = sum(v == 'yes' for _, _, v in _CHECK.findall(_REDO.sub('', cot)))
    return len(verdicts), verdicts.count('no'), wrong, yes


def first_yes_end(text):
    """The end of the first `yes.` an attempt says in a response's CoT (a redo's does not count), or None: where
    report.forced_recheck cuts a response to force a re-check."""
    cot = text.split('</think>')[0]
    redos = [m.span() for m in _REDO.finditer(cot)]
    for m in _CHECK.finditer(cot):
        if m.group(3) == 'yes' and not any(a <= m.start() < b for a, b in redos):
            return m.end()
    return None


_ATTEMPT = re.compile(r'((?:\d+[-+*/]\d+=\d+ ?)+) vs (\d+) (?:yes|no)\.')


def copy_slips(text, p):
    """(checks whose target is not p's, steps with an operand not among p's numbers) in a response's CoT, redos
    included: the copying slips self_checks does not see (`7*5=35 35+6=41 vs 41 yes.` for `make 210 from 7 6 5`
    is right arithmetic and a consistent verdict). A first step's operands and every later step's right one are
    copied from the prompt (the left one is the previous result); a number used twice is not a copy slip, and
    attempts in number words (words_frac) are not read."""
    targets = operands = 0
    for steps, target in _ATTEMPT.findall(text.split('</think>')[0]):
        targets += int(target) != p.target
        for i, (a, _, b, _) in enumerate(_STEP.findall(steps)):
            operands += int(b) not in p.numbers or (i == 0 and int(a) not in p.numbers)
    return targets, operands
