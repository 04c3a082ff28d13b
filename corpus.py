"""
The tiny world's synthetic pretraining corpus, written by rule for the tasks of tasks.py, and the tokenizer
trained on it.

- The corpus stands in for what R1-Zero's base got from the web. It teaches (1) arithmetic it can compute
  (expressions with worked steps) and (2) the response format, with countdown "attempts" of mixed quality:
  each attempt is a correctly computed sequence of moves followed by a check ("72 vs 24 no": the target
  copied beside the result, then the verdict). The writer walks the search space in a fixed order from a
  random start and answers with its last attempt. With give_up = slip = recheck = 0 (the defaults:
  `tiny-walk`) it stops after a random number of attempts, whatever the checks said (a base that searches,
  computes and verifies, but does not know when to stop). With give_up > 0 (`tiny`: UNDER_THINKER) it is an
  under-thinker: it gives up after a `no` more often than not, it sometimes slips (a wishful `yes`: a last step
  written as the target, or a right one said to hit it), and the writers who never give up often redo a `yes`
  (`wait ...`): a base whose thinking RL has to lengthen, and whose re-checks grow with it (DeepSeek-R1 sec
  2.2.4; EXPERIMENTS.md, "Design of the tiny world", also for why the naive world of character tokens and
  random traces does not learn). Held-out problems never appear in it.
- A second "language" (R1-Zero's CoTs mixed languages, DeepSeek-R1 sec 2.3.2): with words_frac > 0 a corpus
  attempt is written in number words ("six minus one is five vs four no."); answers stay in digits. And the
  readable long CoTs of R1's cold start (cold_start_trace): digits only, stopping at the first verified hit.
"""
import random

from tasks import all_attempts, format_prompt, problems, random_moves
from tokenizer import Tokenizer, train_bpe

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
    A mixed-quality response: checked attempts, answering with the last one (stopping after a random count,
    1..max_attempts, whatever the checks said, unless give_up is on). How the attempts are picked (cfg.search):
    - 'enumerate' (default): a contiguous run of the canonical enumeration `all_attempts` (a depth-first walk:
      first move, then every second move, then the next first move) from a random start. The next attempt is a
      function of the last one, so greedy decoding walks the search space without repeating itself, while the
      random start keeps the G samples of a group apart. A writer who meets a `yes` stops there with chance
      cfg.stop_at_yes, else goes on (EXPERIMENTS.md enum176, enumq). With cfg.give_up > 0 the count is not
      drawn up front: after each `no` the writer answers with chance give_up (at most max_attempts attempts),
      an under-thinking writer whose greedy twin answers after one attempt (give_up > 0.5), so RL has to make
      the search longer (DeepSeek-R1 sec 2.2.4: thinking time grows). A share cfg.persist of the writers never
      give up: the corpus then holds long walks too, so the longer search RL asks for is one the base has seen
      (with give_up 0.9 and persist 0.3 the first `no` still ends 63% of traces: the greedy base under-thinks;
      EXPERIMENTS.md e3 has how it went). With chance cfg.slip an attempt that misses says yes, a wishful slip:
      slip_kind 'step' writes its last result as the target (`5*4=24 vs 24 yes.`), 'verdict' computes it right
      and says yes anyway (`5*4=20 vs 24 yes.`, the arithmetic stays clean).
      With chance cfg.recheck a writer redoes the last step of an attempt that said yes (`wait 5*4=20 vs 24
      no.`), or with recheck_kind 'attempt' all its steps (`wait 3+2=5 5*4=20 vs 24 no.`: the answer, which
      copies the attempt, then copies the redo right before it); a redo that says no is a `no` like any other
      (the under-thinker may give up on it): the base re-checks rarely, and a slip it does not catch ends in a
      wrong answer. A persistent writer re-checks with chance cfg.persist_recheck instead: with it above
      recheck, re-checking is the habit of the writers who search on, so RL, which selects their long walk,
      carries it along (R1's "aha moment", sec 2.2.4), though a forced redo catches less than it costs here
      (EXPERIMENTS.md fw, cw). (A writer who always searched on after a caught slip did no better: e2.)
    - 'random': distinct random attempts. The RL-trained model's greedy search looped over its likeliest
      attempt (`6-1=5 5-2=3 vs 4 no.` three times) and greedy pass@1 stalled at 0.13 (EXPERIMENTS.md full3).
    - 'sorted': random distinct attempts sorted by `search_order`: the next attempt is still random (it skips
      a random number of places), and every sample starts near the front; RL learnt nothing (`ordered`).
    """
    if cfg.search not in SEARCHES:
        raise ValueError(f"unknown search {cfg.search!r}; choose from {SEARCHES}")
    # every draw below is guarded by its field, so the fields at 0 leave the corpus exactly as it was (but with
    # persist and recheck on, persist_recheck 0 now means persistent writers never redo; before a3b919c they did)
    k = cfg.max_attempts if cfg.give_up and cfg.search == 'enumerate' else rng.randint(1, cfg.max_attempts)
    give_up, recheck = cfg.give_up, cfg.recheck
    if give_up and cfg.persist and rng.random() < cfg.persist:   # a persistent writer: it never gives up
        give_up, recheck = 0.0, cfg.persist_recheck
    attempts = []   # (says yes, steps as written, expression, the redo's steps or None)
    if cfg.search == 'enumerate':
        space = all_attempts(p.numbers, cfg.ops)
        start = rng.randrange(len(space))
        for i in range(min(k, len(space))):
            value, steps, expr = space[(start + i) % len(space)]
            says, redo = value == p.target, None
            if cfg.slip and not says and rng.random() < cfg.slip:   # a wishful yes
                says = True
                if cfg.slip_kind == 'step':                         # the last result written as the target
                    steps = steps[:-1] + [steps[-1][:3] + (p.target,)]
            if says and recheck and rng.random() < recheck:   # the steps as computed, the true value
                last = steps[-1][:3] + (value,)
                redo = [last] if cfg.recheck_kind == 'step' else steps[:-1] + [last]
            attempts.append((says, steps, expr, redo))
            if says and (redo is None or value == p.target):   # a yes the writer believes
                if rng.random() < cfg.stop_at_yes:
                    break
            elif give_up and rng.random() < give_up:   # a no, or a slip its redo caught
                break
    else:
        found = {}
        for _ in range(20 * k):
            res = random_moves(rng, p.numbers, cfg.ops)
            if res is not None and res[2] not in found:
                found[res[2]] = res
                if len(found) == k:
                    break
        attempts = [(value == p.target, steps, expr, None) for value, steps, expr in found.values()]
        if cfg.search == 'sorted':
            attempts.sort(key=lambda a: search_order(p, a[1], cfg.ops))
    parts = []
    for says, steps, _, redo in attempts:
        # the rng is drawn only when words are on, so words_frac=0 leaves the corpus exactly as it was
        words = cfg.words_frac > 0 and rng.random() < cfg.words_frac
        parts.append(format_attempt(steps, p.target if says else None, p.target, words))
        if redo:
            parts.append('wait ' + format_attempt(redo, redo[-1][3], p.target, words))
    return f"<think>{''.join(parts)}</think><answer>{attempts[-1][2]}</answer>"


def format_attempt(steps, value, target, words=False):
    """One checked attempt; the check copies the target next to the result, so "is it reached?" compares two
    adjacent tokens, and says yes when value == target (a verdict slip passes the target as value).
    words=True writes it in number words ("six minus one is five vs four no.")"""
    verdict = 'yes' if value == target else 'no'
    if words:
        return f"{format_steps_words(steps)} vs {number_words(target)} {verdict}."
    return f"{format_steps(steps)} vs {target} {verdict}."


# R1-Zero's CoTs mixed languages (DeepSeek-R1 sec 2.3.2); the tiny world's second language is numbers in words
_ONES = ['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine', 'ten', 'eleven', 'twelve',
         'thirteen', 'fourteen', 'fifteen', 'sixteen', 'seventeen', 'eighteen', 'nineteen']
_TENS = ['', '', 'twenty', 'thirty', 'forty', 'fifty', 'sixty', 'seventy', 'eighty', 'ninety']
OP_WORDS = {'+': 'plus', '-': 'minus', '*': 'times', '/': 'over'}
NUMBER_WORDS = frozenset(_ONES + _TENS[2:] + ['hundred'])


def number_words(n):
    """0..999 in English words: 24 -> 'twenty four', 305 -> 'three hundred five'."""
    if not 0 <= n <= 999:
        raise ValueError(f"number_words covers 0..999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ('' if n % 10 == 0 else ' ' + _ONES[n % 10])
    return _ONES[n // 100] + ' hundred' + ('' if n % 100 == 0 else ' ' + number_words(n % 100))


def format_steps_words(steps):
    return ', '.join(f"{number_words(a)} {OP_WORDS[op]} {number_words(b)} is {number_words(r)}"
                     for a, op, b, r in steps)


def has_number_words(text):
    """True if the CoT (the text before </think>) holds a number word: the mixed-language CoTs R1 filters out."""
    cot = text.split('</think>')[0]
    return any(w in NUMBER_WORDS for w in ''.join(c if c.isalpha() else ' ' for c in cot).split())


def cold_start_trace(rng, p, cfg):
    """
    A readable long CoT for R1's cold-start SFT (DeepSeek-R1 sec 2.3.1): a walk of the canonical enumeration
    (as the corpus writer does) of at most cfg.max_attempts distinct checked attempts that ENDS at the first
    attempt reaching the target, checked "yes", and answers with it. Readable = digits only, one language,
    and it stops at its first verified hit, the behaviour the corpus shows only some of the time.
    """
    space = all_attempts(p.numbers, cfg.ops)
    hits = [i for i, a in enumerate(space) if a[0] == p.target]
    if not hits:
        raise ValueError(f"no attempt reaches {p.target} from {p.numbers} with ops {cfg.ops!r}")
    h = rng.choice(hits)
    attempts = [space[h]]
    for j in range(1, min(rng.randint(1, cfg.max_attempts), len(space))):
        prev = space[(h - j) % len(space)]
        if prev[0] == p.target:   # walk back only to the previous hit: the writer stops at its first yes
            break
        attempts.insert(0, prev)
    parts = ''.join(format_attempt(steps, value, p.target) for value, steps, _ in attempts)
    return f"<think>{parts}</think><answer>{attempts[-1][2]}</answer>"


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


# -----------------------------------------------------------------------------
# the world (problems, tokenizer) and the packed pretraining corpus

def build_world(seed, n_train_problems, cfg, bpe_merges, arith_frac, check_frac):
    """(countdown train problems, arithmetic train problems, the tokenizer whose BPE merges are learned on 1000
    corpus documents): the pretraining world, a pure function of its arguments."""
    cd_train = problems('countdown', 'train', n_train_problems, seed, cfg)
    ar_train = problems('arithmetic', 'train', 1500, seed, cfg)
    rng = random.Random(seed)
    docs = [corpus_document(rng, cfg, cd_train, ar_train, arith_frac, check_frac) for _ in range(1000)]
    return cd_train, ar_train, Tokenizer(train_bpe(docs, bpe_merges))


def corpus_tokens(seed, cfg, tok, cd_train, ar_train, n_tokens, arith_frac, check_frac):
    """n_tokens ids of packed documents, <|bos|> doc <|eos|> <|bos|> doc ..., the last one cut where it ends."""
    rng, buf = random.Random(seed), []
    while len(buf) < n_tokens:
        buf.extend([tok.bos] + tok.encode(corpus_document(rng, cfg, cd_train, ar_train, arith_frac, check_frac))
                   + [tok.eos])
    return buf[:n_tokens]
