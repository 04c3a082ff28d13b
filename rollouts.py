"""
The rollouts GRPO trains on, from the draw of prompts to this rank's micro-batches.

- `PromptSampler`: which train problems an iteration draws, Kimi k1.5's sampling strategies (sec 2.3.4):
  uniform, curriculum, prioritized.
- Groups (DeepSeekMath sec 4.1): G samples per prompt from sample.group_rollouts, rows ordered group by group.
- `PartialRollouts`: Kimi k1.5's partial rollouts (sec 2.6.2): a token budget per iteration, unfinished
  trajectories carried over in a bounded buffer, segments of earlier policies kept out of the loss, and its
  repeat detection. Under torchrun every rank holds the whole buffer and generates its share of each pass.
  Greedy continuation from the buffer equals one uninterrupted generation (tests/test_sampling.py).
- `dynamic_batch`: DAPO's dynamic sampling (Yu et al. 2025, sec 3.2): groups whose rewards are all equal carry
  no signal; they are dropped and the batch refilled.
- `training_shard`: this rank's whole groups of the kept batch as prompt + response sequences, and a micro-batch
  plan in which every rank runs the same number of forward/backward passes. Rows go longest first, and each
  micro-batch is only as wide as its own longest row (the loss is a sum of per-row terms with the batch's
  normalisers, so row order and the pad columns change nothing but the work: length-grouped batching).
"""
import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harness import gather_list, shard
from rewards import is_repeating
from sample import Generation, generate, group_rollouts, row_seed, sequences_for_training


# -----------------------------------------------------------------------------
# which prompts (Kimi k1.5 sec 2.3.4)

SAMPLINGS = ('uniform', 'curriculum', 'prioritized')


class PromptSampler:
    """
    Draws the train problems of each RL iteration (Kimi k1.5 sec 2.3.4). Problems are named by their index in
    the pool; `draw(n, step)` returns n indices, `update(ids, accuracies)` feeds back each group's accuracy.
    - uniform: n distinct problems, `random.Random(seed).sample(range(N), n)`: R1-Zero's plain draw, and the
      same draws grpo_stage made before this class existed.
    - curriculum: easy to hard by the difficulty label `solve_rate` (the share of valid move sequences that
      hit the target; higher = easier). The pool is sorted easiest first and n distinct problems are drawn
      uniformly from its first w: w is `start_frac` of the pool at step 0 and grows linearly to the whole pool
      at `frac` of the run's `total_steps`. Kimi only says "from easy to hard"; the linear window is ours.
    - prioritized: problem i is drawn with probability proportional to max(1 - s_i, floor), s_i its running
      success rate (Kimi: "proportional to 1 - s_i"). s_i is the accuracy of its first group, then an EMA with
      weight `ema` on each new group (the policy moves, so old groups should fade); an unseen problem counts
      as s = prior. The floor (ours) keeps solved problems drawable: they can be forgotten. Draws are with
      replacement, so the probabilities are exactly the normalised weights (a problem drawn twice is two
      groups of the batch).
    All state (the rng, the success rates) is in `state_dict`: a resumed run draws what the uninterrupted one
    would.
    """

    def __init__(self, pool, mode='uniform', seed=0, total_steps=1, frac=0.5, start_frac=0.1, prior=0.5,
                 floor=0.05, ema=0.5):
        if mode not in SAMPLINGS:
            raise ValueError(f"unknown prompt sampling {mode!r}; choose from {SAMPLINGS}")
        if not (0 <= frac <= 1 and 0 < start_frac <= 1 and 0 <= prior <= 1 and 0 < floor <= 1 and 0 < ema <= 1):
            raise ValueError("need 0 <= curriculum_frac <= 1, 0 < curriculum_start <= 1, 0 <= prio_prior <= 1, "
                             f"0 < prio_floor <= 1, got {frac}, {start_frac}, {prior}, {floor}")
        self.mode, self.N, self.total_steps = mode, len(pool), total_steps
        self.frac, self.start_frac, self.prior, self.floor, self.ema = frac, start_frac, prior, floor, ema
        self.rng = random.Random(seed)
        self.solve_rate = [getattr(p, 'solve_rate', 0.0) for p in pool]
        if mode == 'curriculum' and any(math.isnan(r) for r in self.solve_rate):
            raise ValueError("curriculum sampling needs difficulty labels, and these problems have none "
                             "(task tinyzero); use uniform or prioritized")
        # easiest first; ties keep pool order, so the order is a pure function of the pool
        self.order = sorted(range(self.N), key=lambda i: -self.solve_rate[i])
        self.success = [None] * self.N   # s_i, None until the problem's first group is scored

    def window(self, step):
        """How many of the easiest problems the curriculum draws from at `step`."""
        ramp = self.frac * self.total_steps
        t = 1.0 if ramp <= 0 else min(1.0, step / ramp)
        return min(self.N, math.ceil(self.N * (self.start_frac + (1 - self.start_frac) * t)))

    def weights(self):
        return [max(1.0 - (self.prior if s is None else s), self.floor) for s in self.success]

    def draw(self, n, step=0):
        if n > self.N and self.mode != 'prioritized':   # prioritized draws with replacement
            raise ValueError(f"cannot draw {n} distinct prompts from a pool of {self.N}")
        if self.mode == 'uniform':
            return self.rng.sample(range(self.N), n)
        if self.mode == 'curriculum':
            return self.rng.sample(self.order[:max(n, self.window(step))], n)
        return self.rng.choices(range(self.N), weights=self.weights(), k=n)

    def update(self, ids, accuracies):
        """Fold each scored group's accuracy (share of its G samples that were right) into s_i."""
        for i, a in zip(ids, accuracies):
            s = self.success[i]
            self.success[i] = float(a) if s is None else (1 - self.ema) * s + self.ema * float(a)

    def state_dict(self):
        st = self.rng.getstate()
        return {'rng': list(st[1]), 'rng_gauss': st[2], 'success': list(self.success)}

    def load_state_dict(self, d):
        self.rng.setstate((3, tuple(d['rng']), d['rng_gauss']))
        self.success = list(d['success'])


# -----------------------------------------------------------------------------
# partial rollouts (Kimi k1.5 sec 2.6.2) and repeat detection

@dataclass
class RolloutBatch:
    """The groups an iteration trains on: every one of their G trajectories has ended."""
    ids: list                 # problem id of each completed group, n of them
    contexts: list            # n*G id lists: prompt + the segments of earlier iterations (context, never trained)
    gen: Generation           # (n*G, L) the newest segment of each trajectory: the only tokens the loss sees
    responses: list           # n*G id lists: the whole response (all segments), what the reward reads
    lengths: torch.Tensor     # (n*G,) whole response lengths
    continued: torch.Tensor   # (n*G,) bool: the trajectory has segments from earlier iterations
    drawn: list               # problem ids drawn this iteration (the new groups)
    buffered: int             # groups still in flight after this iteration (the buffer)
    repeat_stops: int         # rollouts that repeat detection stopped this iteration


class PartialRollouts:
    """
    Kimi k1.5 sec 2.6.2, partial rollouts: each iteration generates at most `budget` new tokens per trajectory.
    A trajectory that has not ended by then waits in a buffer and continues in the next iteration, from its
    tokens so far, under the then-current policy, next to the new prompts, so a few long responses never stall
    a whole batch. In detail:
    - An iteration generates `batch_groups * G` rows: every unfinished buffered trajectory, then G rows for
      each new prompt that fits (`draw(n)` names them), but never more than `max_groups` groups in flight.
    - A group is scored and trained once all G trajectories have ended (stop token, max_new_tokens, or repeat
      detection); its rows that ended early wait for the rest.
    - Only segments generated by the current policy are trained: the segments of earlier iterations are part
      of the context (`contexts`), as the prompt is, and a trajectory that ended under an earlier policy and
      waited for its group has its mask zeroed (Kimi: "segments from previous iterations are excluded from
      the loss"; the trainer's ratio would treat them as on-policy). It still counts in its group's rewards.
      `step(..., version=)` names the policy: the trainer passes its optimizer step.
    - The buffer is bounded: at most `max_groups` groups of G trajectories of at most max_new_tokens each.
      If no group has ended after a pass (the pipeline is still filling), the iteration generates again: the
      policy has not moved, so this is an iteration without an update, merged into the next one.
    With budget >= max_new_tokens every group ends in its iteration and the batch equals `group_rollouts`'
    (tests/test_sampling.py trains both to the same weights).
    Repeat detection (Kimi, same section): a rollout stops once `rewards.is_repeating(tokens, 4, repeat_stop)`
    fires on its tokens so far, checked every `check_every` tokens; the check runs after the segment is
    generated and cuts it where it would have stopped (a row's tokens never depend on later ones), so it saves
    the continuation, not the rest of the current pass. The cut rollout is scored as it stands.
    budget=0 and repeat_stop=0 is plain `group_rollouts`.
    """

    def __init__(self, group_size, max_new_tokens, batch_groups, budget=0, max_groups=0, repeat_stop=0.0,
                 check_every=8):
        max_groups = max_groups or 2 * batch_groups
        if budget < 0 or max_groups < batch_groups or not 0 <= repeat_stop <= 1:
            raise ValueError(f"need rollout_budget >= 0, rollout_buffer >= rl_prompts ({batch_groups}) and "
                             f"0 <= repeat_stop <= 1, got {budget}, {max_groups}, {repeat_stop}")
        self.G, self.max_new, self.batch_groups, self.max_groups = group_size, max_new_tokens, batch_groups, max_groups
        self.direct = budget == 0 and repeat_stop == 0
        self.budget = min(budget or max_new_tokens, max_new_tokens)
        self.repeat_stop, self.check_every = repeat_stop, check_every
        # the buffer: groups in flight, oldest first; a row is {'tokens', 'logp' (of its newest segment),
        # 'seg' (where its newest segment starts), 'done', 'finished'}
        self.groups = []

    def step(self, model, draw, encode, stop_ids, pad_id, temperature=1.0, seed=0, version=0, n_groups=None):
        """draw(n) -> n problem ids, encode(id) -> prompt ids. Returns the RolloutBatch of the ended groups.
        seed: this call's key (the trainer's row_seed(run seed, step, round)); row j of the call's i-th new group
        samples from row_seed(seed, i * G + j, its tokens so far), whatever else shares its batch.
        version: the policy's optimizer step; a segment generated under an older version is not trained.
        n_groups: most new prompts to draw (default batch_groups): dynamic sampling's refills draw fewer.
        Under torchrun every rank calls this alike (the same draw, the same buffer): each generates its contiguous
        share of the rows (harness.shard) and every rank gets the whole result (harness.gather_list), so the
        returned batch, and the buffer, are one process's on every rank."""
        n_groups = self.batch_groups if n_groups is None else n_groups
        if self.direct:
            ids = draw(n_groups)
            mine = range(len(ids))[shard(len(ids))]   # the seeds name each row's place in the whole draw
            ids = [ids[i] for i in mine]
            prompts = [encode(i) for i in ids]
            if prompts:
                gen = group_rollouts(model, prompts, self.G, self.max_new, stop_ids, pad_id, temperature=temperature,
                                     seeds=[row_seed(seed, i * self.G + j, 0) for i in mine for j in range(self.G)])
                gen = Generation(*(t.cpu() for t in vars(gen).values()))   # a RolloutBatch is CPU data, as _batch's
            else:   # a rank's share of a small draw (a refill) can be empty
                gen = Generation(torch.full((0, 1), pad_id), torch.zeros(0, 1), torch.zeros(0, 1),
                                 torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool))
            contexts = [p for p in prompts for _ in range(self.G)]
            responses = [gen.tokens[r, :int(gen.lengths[r])].tolist() for r in range(len(contexts))]
            return cat_batches(gather_list([RolloutBatch(ids, contexts, gen, responses, gen.lengths,
                                                         torch.zeros(len(contexts), dtype=torch.bool), ids, 0, 0)]),
                               pad_id)
        drawn, repeats = [], 0
        while not any(self._ended(g) for g in self.groups):
            n_open = sum(not r['done'] for g in self.groups for r in g['rows'])
            n_new = min((self.batch_groups * self.G - n_open) // self.G, self.max_groups - len(self.groups), n_groups)
            ids = draw(n_new) if n_new > 0 else []
            for i in ids:
                self.groups.append({'id': i, 'prompt': encode(i), 'seed': seed, 'index': len(drawn), 'rows': [
                    {'tokens': [], 'logp': [], 'seg': 0, 'done': False, 'finished': False, 'version': version}
                    for _ in range(self.G)]})
                drawn.append(i)
            repeats += self._generate(model, stop_ids, pad_id, temperature, version)
        ended = [g for g in self.groups if self._ended(g)]
        self.groups = [g for g in self.groups if not self._ended(g)]
        return self._batch(ended, drawn, repeats, pad_id, version)

    @staticmethod
    def _ended(g):
        return all(r['done'] for r in g['rows'])

    def _generate(self, model, stop_ids, pad_id, temperature, version):
        """One pass: up to `budget` new tokens for every open row. Returns how many rows repeat detection stopped."""
        todo = [(g, r) for g in self.groups for r in g['rows'] if not r['done']]
        # a segment's seed names its row and where it starts: a continuation never replays an earlier segment
        seeds = [row_seed(g['seed'], g['index'] * self.G + j, len(r['tokens']))
                 for g in self.groups for j, r in enumerate(g['rows']) if not r['done']]
        inputs = [g['prompt'] + r['tokens'] for g, r in todo]
        # left padding puts every row at the longest context: a pass that mixes long continued rows with fresh
        # prompts can have fewer cache slots than the budget, and is then shortened to fit (at least the room
        # of the longest row, so every pass makes progress); whoever has not ended waits for the next pass
        limit = min(self.budget, max(self.max_new - len(r['tokens']) for _, r in todo),
                    model.config.block_size - max(map(len, inputs)))
        # under torchrun each rank generates its share of the open rows (the pass's limit is the whole pass's),
        # then every rank takes every row's segment and updates the whole buffer alike
        mine = shard(len(todo))
        out = []
        if inputs[mine]:
            gen = generate(model, inputs[mine], limit, stop_ids, pad_id, temperature=temperature, seeds=seeds[mine])
            tokens, logp = gen.tokens.cpu(), gen.logprobs.cpu()   # one copy off the device, not one per row
            out = [(tokens[k, :n].tolist(), logp[k, :n].tolist(), f)
                   for k, (n, f) in enumerate(zip(gen.lengths.tolist(), gen.finished.tolist()))]
        out = gather_list(out)   # [(tokens, logprobs, finished)] for every row of todo, in order
        repeats = 0
        for (_, r), (seg, logp, finished) in zip(todo, out):
            room = self.max_new - len(r['tokens'])   # the call's limit is for the longest room: cut each row's own
            stopped = finished and len(seg) <= room
            seg, logp = seg[:room], logp[:room]
            full = r['tokens'] + seg
            if self.repeat_stop:
                first = (len(r['tokens']) // self.check_every + 1) * self.check_every
                last = len(full) - 1 if stopped else len(full)   # a row that stopped by itself is not cut
                for t in range(first, last + 1, self.check_every):
                    if is_repeating(full[:t], 4, self.repeat_stop):
                        keep = t - len(r['tokens'])
                        seg, logp, full, stopped = seg[:keep], logp[:keep], full[:t], False
                        r['done'] = True
                        repeats += 1
                        break
            r['seg'], r['tokens'], r['logp'], r['finished'] = len(r['tokens']), full, logp, stopped
            r['version'] = version   # the policy that generated the newest segment
            r['done'] = r['done'] or stopped or len(full) >= self.max_new
        return repeats

    def _batch(self, ended, drawn, repeats, pad_id, version):
        rows = [(g, r) for g in ended for r in g['rows']]
        L = max(1, max(len(r['tokens']) - r['seg'] for _, r in rows))
        tokens = torch.full((len(rows), L), pad_id, dtype=torch.long)                # (B, L) newest segments
        logp, mask = torch.zeros(len(rows), L), torch.zeros(len(rows), L)             # (B, L)
        for b, (_, r) in enumerate(rows):
            seg = r['tokens'][r['seg']:]
            tokens[b, :len(seg)] = torch.tensor(seg, dtype=torch.long)
            logp[b, :len(seg)] = torch.tensor(r['logp'], dtype=torch.float32)
            # Kimi k1.5 sec 2.6.2: a segment generated by an earlier policy is excluded from the loss (its
            # ratio to the current policy is not 1 and the behaviour policy is gone); it still scores the group
            mask[b, :len(seg)] = float(r['version'] == version)
        gen = Generation(tokens, logp, mask, torch.tensor([len(r['tokens']) - r['seg'] for _, r in rows]),
                         torch.tensor([r['finished'] for _, r in rows]))
        return RolloutBatch([g['id'] for g in ended], [g['prompt'] + r['tokens'][:r['seg']] for g, r in rows], gen,
                            [r['tokens'] for _, r in rows], torch.tensor([len(r['tokens']) for _, r in rows]),
                            torch.tensor([r['seg'] > 0 for _, r in rows]), drawn, len(self.groups), repeats)

    def state_dict(self):
        return {'groups': [{**g, 'rows': [dict(r) for r in g['rows']]} for g in self.groups]}

    def load_state_dict(self, d):
        self.groups = [{'seed': 0, 'index': k, **g, 'rows': [{'version': 0, **r} for r in g['rows']]}
                       for k, g in enumerate(d['groups'])]


# -----------------------------------------------------------------------------
# batch assembly: dynamic sampling's refills, and this rank's share for the trainer

def pad_cat(tensors, value):
    """Concatenate (B_i, L_i) tensors along B, right-padding each to the longest L with `value`."""
    L = max(t.shape[1] for t in tensors)
    return torch.cat([F.pad(t, (0, L - t.shape[1]), value=value) for t in tensors])


def cat_batches(batches, pad_id):
    """One RolloutBatch from several (dynamic sampling's refills), groups in order."""
    if len(batches) == 1:
        return batches[0]
    gens = [b.gen for b in batches]
    gen = Generation(pad_cat([g.tokens for g in gens], pad_id), pad_cat([g.logprobs for g in gens], 0.0),
                     pad_cat([g.mask for g in gens], 0.0), torch.cat([g.lengths for g in gens]),
                     torch.cat([g.finished for g in gens]))
    cat = lambda name: [x for b in batches for x in getattr(b, name)]   # noqa: E731
    return RolloutBatch(cat('ids'), cat('contexts'), gen, cat('responses'), torch.cat([b.lengths for b in batches]),
                        torch.cat([b.continued for b in batches]), cat('drawn'), batches[-1].buffered,
                        sum(b.repeat_stops for b in batches))


def select_groups(batch, groups, G):
    """The RolloutBatch of the listed groups (indices into batch.ids), each with its G rows."""
    rows = [g * G + j for g in groups for j in range(G)]
    gen = batch.gen
    L = max(1, int(gen.lengths[rows].max())) if rows else 1
    sel = Generation(gen.tokens[rows, :L], gen.logprobs[rows, :L], gen.mask[rows, :L], gen.lengths[rows],
                     gen.finished[rows])
    return RolloutBatch([batch.ids[g] for g in groups], [batch.contexts[r] for r in rows], sel,
                        [batch.responses[r] for r in rows], batch.lengths[rows], batch.continued[rows],
                        batch.drawn, batch.buffered, batch.repeat_stops)


def dynamic_batch(roll, score, G, n_groups, pad_id, rounds=1):
    """
    DAPO's dynamic sampling (Yu et al. 2025, sec 3.2): a group whose G rewards are all equal has advantage 0 and
    no learning signal, so it is dropped and more prompts are sampled until the batch holds `n_groups` groups
    with signal, at most `rounds` rollout rounds (DAPO caps its extra generation batches the same way).
    roll(n) -> RolloutBatch of n new groups; score(batch) -> (rewards (N,), terms {name: (N,)}, texts [N]).
    A refill draws the missing groups scaled up by the share kept so far. rounds=1 keeps every group (no
    filter). Returns the kept batch with its rewards, terms and texts (groups beyond n_groups are cut), and
    every round's (rewards, terms, texts) for metrics. With nothing kept after the last round, the last round is
    returned whole (A = 0 everywhere: only a KL term acts).
    """
    kept, seen, n_kept, n_drawn = [], [], 0, 0
    for _ in range(rounds):
        n = n_groups if not seen else min(n_groups, -(-(n_groups - n_kept) * n_drawn // max(1, n_kept)))
        b = roll(n)
        reward, terms, texts = score(b)
        seen.append((reward, terms, texts))
        n_drawn += len(b.ids)
        groups = list(range(len(b.ids)))
        if rounds > 1:
            r = reward.view(-1, G)                                            # (groups, G)
            groups = (r != r[:, :1]).any(1).nonzero().squeeze(1).tolist()[:n_groups - n_kept]
        rows = [g * G + j for g in groups for j in range(G)]
        kept.append((select_groups(b, groups, G), reward[rows], {k: v[rows] for k, v in terms.items()},
                     [texts[i] for i in rows]))
        n_kept += len(groups)
        if n_kept >= n_groups:
            break
    if n_kept == 0:
        kept = [(b, reward, terms, texts)]
    return (cat_batches([k[0] for k in kept], pad_id), torch.cat([k[1] for k in kept]),
            {t: torch.cat([k[2][t] for k in kept]) for t in kept[0][2]}, [x for k in kept for x in k[3]], seen)


@dataclass
class TrainShard:
    """This rank's rows of the kept batch, ready for the model: logits[:, P - 1 + t] predict resp[:, t]."""
    idx: torch.Tensor         # (n, P + L) prompt (+ earlier segments), left-padded, then the newest segment
    pos: torch.Tensor         # (n, P + L) RoPE positions, or None when no row is padded
    amask: torch.Tensor       # (n, 1, P + L, P + L) attention mask, or None (plain causal)
    P: int                    # context width
    resp: torch.Tensor        # (n, L) the trained tokens
    mask: torch.Tensor        # (n, L) 1 = in the loss
    A: torch.Tensor           # (n,) advantages
    micro: list               # [(row slice, width, weight)]: resp[sl, :width] holds every trained token of the
    #                           rows; weight 0 marks a pass that only keeps the ranks in step

    def response(self, model, sl, width, hidden, compiled=None):
        """Rows sl through model, at their first `width` response positions (the columns after them hold pads only,
        which no earlier position sees: causal attention): the final hidden states (b, width, C) if hidden (for
        fused_loss's chunked loss), else the logits (b, width, V). compiled, torch.compile(model, dynamic=True):
        the whole sequences' hidden states through it, cut to the response outside the graph (and the logits by
        the head, as the model's forward makes them). Cut inside, the slice's ints would be constants of the
        graph: one compilation per response length, i.e. nearly every step. The head outside the forward reads
        whole weights: not under FSDP, which gathers them only inside it."""
        T, cut = self.P + width, slice(self.P - 1, self.P - 1 + width)
        kw = dict(pos=None if self.pos is None else self.pos[sl, :T],
                  mask=None if self.amask is None else self.amask[sl, :, :T, :T])
        if compiled is None:
            return model(self.idx[sl, :T], logits_slice=cut, return_hidden=hidden, **kw)[0]   # (b, width, C or V)
        h = compiled(self.idx[sl, :T], return_hidden=True, **kw)[0][:, cut]                   # (b, width, C)
        return h if hidden else model.lm_head(h)                                              # (b, width, C or V)


def training_shard(batch, trained, A, G, part, world, micro_rows, pad_id, device, block_size):
    """
    batch: the kept RolloutBatch (every rank holds it whole); trained (N, L) and A (N,) over its rows; part: the
    slice of its groups this rank trains (harness.shard: contiguous, whole groups). Every rank runs as many
    micro-batches as the fullest one: a rank short of rows runs the rest on its first row at weight 0, and one
    without groups runs group 0 at weight 0, so that a collective inside any forward or backward (FSDP, DDP)
    finds every rank there. The rows are sorted longest first (by their last trained token) and each
    micro-batch is cut to its longest row: responses of 30 to 176 tokens in one batch otherwise all cost 176.
    """
    groups = list(range(len(batch.ids)))[part]
    mine = select_groups(batch, groups or [0], G)
    idx, pos, amask, P = sequences_for_training(mine.contexts, mine.gen, pad_id, device, block_size)  # (n, P + L)
    resp = mine.gen.tokens.to(device)                                                             # (n, L)
    local = [g * G + j for g in groups or [0] for j in range(G)]                                 # rows of the batch
    L = resp.shape[1]
    mask, A = trained[local, :L].cpu(), A[local].cpu()                                           # (n, L), (n,)
    # the sort on the host, where the widths are needed as ints (no device sync)
    width = torch.where(mask.any(1), L - (mask.flip(1) != 0).int().argmax(1), 1)                # (n,) >= 1
    order = width.argsort(descending=True, stable=True)                                          # (n,)
    mask, A, width = mask[order].to(device), A[order].to(device), width[order].tolist()
    order = order.to(device)
    idx, resp = idx[order], resp[order]                                                          # (n, P + L), (n, L)
    pos, amask = (None if t is None else t[order] for t in (pos, amask))
    n_micro = math.ceil(G * math.ceil(len(batch.ids) / world) / micro_rows)
    micro = [(slice(i, i + micro_rows), width[i], 1.0) for i in range(0, len(local) if groups else 0, micro_rows)]
    micro += [(slice(0, 1), 1, 0.0)] * (n_micro - len(micro))
    return TrainShard(idx, pos, amask, P, resp, mask, A, micro)
