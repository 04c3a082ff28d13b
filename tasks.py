"""
The tiny world: tasks with verifiable answers, their prompts, and the synthetic pretraining corpus.

- Countdown (the TinyZero / nano-aha-moment replay task): reach a target from n numbers with + - * and exact /,
  each number used once. Solvable by construction: we chain the numbers in a random order with random valid
  moves (Countdown's rules: subtraction only when positive, division only when exact) and take the value.
  Every expression here is a left-deep chain ((a op b) op c): one form for problems, attempts and answers.
  The known solution is kept for tests; it is never shown to the model.
- Arithmetic: evaluate an expression step by step (same move kinds; `digits` sets the operand size).
- Held-out splits are disjoint from train *by problem*: a problem's canonical key (sorted numbers and target,
  or the expression) is hashed, and the hash decides its split, so no seed or sampling order can leak one.
- Templates: the R1-Zero prompt (DeepSeek-R1, Table 1) and a short variant for tiny models, whose context and
  compute cannot afford 80 tokens of preamble.
- The corpus stands in for what R1-Zero's base got from the web. It teaches (1) arithmetic it can compute
  (expressions with worked steps) and (2) the response format, with countdown "attempts" of mixed quality:
  each attempt is a correctly computed sequence of moves followed by a check ("72 vs 24 no": the target
  copied beside the result, then the verdict). The writer walks the search space in a fixed order from a
  random start, stops after a random number of attempts, whatever the checks said, and answers with its last
  attempt. The base therefore knows how to search, compute and verify, but not when to stop:
  that is what RL has to learn (DESIGN note in EXPERIMENTS.md, and REFERENCE.md sec. 5 for why the naive
  world does not learn). Held-out problems never appear in it.
"""
import hashlib
import itertools
import random
from dataclasses import dataclass

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt}. Assistant:")
SHORT_TEMPLATE = "User: {prompt}. Assistant:"
TEMPLATES = {'r1zero': R1_ZERO_TEMPLATE, 'short': SHORT_TEMPLATE}


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
    n_numbers: int = 3          # countdown: how many numbers
    lo: int = 1                 # smallest number
    hi: int = 9                 # largest number
    ops: str = '+-*/'           # allowed operations
    max_target: int = 999       # resample targets above this (keeps every value one token)
    test_frac: float = 0.25     # share of the problem space held out
    max_attempts: int = 10      # most attempts a corpus trace writes
    search: str = 'enumerate'   # how corpus traces pick attempts: enumerate | random | sorted (EXPERIMENTS.md)
    template: str = 'short'     # 'short' or 'r1zero'


def make_countdown(rng, cfg):
    while True:
        numbers = [rng.randint(cfg.lo, cfg.hi) for _ in range(cfg.n_numbers)]
        res = random_moves(rng, numbers, cfg.ops)
        if res is None or not (1 <= res[0] <= cfg.max_target):
            continue
        attempts = all_attempts(numbers, cfg.ops)
        rate = sum(a[0] == res[0] for a in attempts) / len(attempts)
        return Countdown(numbers, res[0], res[2], rate)


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
        p = make_countdown(rng, cfg) if kind == 'countdown' else make_arithmetic(rng, cfg, digits)
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
    nums = [int(t) for t in _numbers_in(p.expr)]
    return in_test_split(f"cd:{sorted(nums)}:{p.result}", cfg.test_frac)


def _numbers_in(expr):
    out, cur = [], ''
    for ch in expr:
        if ch.isdigit():
            cur += ch
        elif cur:
            out.append(cur)
            cur = ''
    return out + ([cur] if cur else [])


# -----------------------------------------------------------------------------
# text: prompts, worked steps, responses

def format_prompt(problem, template='short'):
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose from {sorted(TEMPLATES)}")
    return TEMPLATES[template].format(prompt=problem.prompt())


def format_steps(steps):
    return ' '.join(f"{a}{op}{b}={r}" for a, op, b, r in steps)


def search_order(p, steps, ops):
    """
    Canonical rank of an attempt: the prompt positions of its operands, then its operators (search='sorted').
    """
    free = list(range(len(p.numbers)))
    operands = [steps[0][0]] + [s[2] for s in steps]
    pos = []
    for v in operands:
        i = next(i for i in free if p.numbers[i] == v)
        free.remove(i)
        pos.append(i)
    return tuple(pos), tuple(ops.index(s[1]) for s in steps)


SEARCHES = ('enumerate', 'random', 'sorted')


def countdown_trace(rng, p, cfg):
    """
    A mixed-quality response: checked attempts, stopping after a random count (1..max_attempts) whatever the
    checks said, answering with the last attempt. How the attempts are picked (cfg.search):
    - 'enumerate' (default): a contiguous run of the canonical enumeration `all_attempts` (a depth-first walk:
      first move, then every second move, then the next first move) from a random start. The next attempt is a
      function of the last one, so greedy decoding walks the search space without repeating itself, while the
      random start keeps the G samples of a group apart. RL then only has to learn to stop at a `yes`.
    - 'random': distinct random attempts. The RL-trained model's greedy search looped over its likeliest
      attempt (`6-1=5 5-2=3 vs 4 no.` three times) and greedy pass@1 stalled at 0.13 (EXPERIMENTS.md full3).
    - 'sorted': random distinct attempts sorted by `search_order`: the next attempt is still random (it skips
      a random number of places), and every sample starts near the front; RL learnt nothing (`ordered`).
    """
    if cfg.search not in SEARCHES:
        raise ValueError(f"unknown search {cfg.search!r}; choose from {SEARCHES}")
    k = rng.randint(1, cfg.max_attempts)
    if cfg.search == 'enumerate':
        space = all_attempts(p.numbers, cfg.ops)
        start = rng.randrange(len(space))
        attempts = [space[(start + i) % len(space)] for i in range(min(k, len(space)))]
    else:
        found = {}
        for _ in range(20 * k):
            res = random_moves(rng, p.numbers, cfg.ops)
            if res is not None and res[2] not in found:
                found[res[2]] = res
                if len(found) == k:
                    break
        attempts = list(found.values())
        if cfg.search == 'sorted':
            attempts.sort(key=lambda a: search_order(p, a[1], cfg.ops))
    parts = []
    for value, steps, expr in attempts:
        # the check copies the target next to the result, so "is it reached?" compares two adjacent tokens
        parts.append(f"{format_steps(steps)} vs {p.target} {'yes' if value == p.target else 'no'}.")
    return f"<think>{''.join(parts)}</think><answer>{attempts[-1][2]}</answer>"


def arithmetic_response(p):
    return f"<think>{format_steps(p.steps)}</think><answer>{p.result}</answer>"


def check_drill(rng, cfg, cd_train, n=8):
    """
    n checks like those of the traces ("84 vs 19 no." / "24 vs 24 yes."), half of them equal. In the traces
    only ~8% of checks say yes, too rare a signal for a tiny model to learn token equality from in minutes;
    without these drills it said "486 vs 144 yes" (EXPERIMENTS.md exp5).
    """
    out = []
    for _ in range(n):
        p = rng.choice(cd_train)
        res = random_moves(rng, p.numbers, cfg.ops)
        v = res[0] if res else p.target
        t = v if rng.random() < 0.5 else p.target
        out.append(f"{v} vs {t} {'yes' if v == t else 'no'}.")
    return ''.join(out)


def corpus_document(rng, cfg, cd_train, ar_train, arith_frac=0.4, check_frac=0.15):
    """One pretraining document (text, without bos/eos): a countdown trace, a worked arithmetic problem, or a
    drill of checks."""
    u = rng.random()
    if u < arith_frac:
        p = rng.choice(ar_train)
        return format_prompt(p, cfg.template) + arithmetic_response(p)
    if u < arith_frac + check_frac:
        return check_drill(rng, cfg, cd_train)
    p = rng.choice(cd_train)
    return format_prompt(p, cfg.template) + countdown_trace(rng, p, cfg)
