"""
DeepSeekMoE: Dai et al. 2024 (arXiv 2401.06066) as used in DeepSeek-V2 (arXiv 2405.04434, section 2.2) and
DeepSeek-V3 (arXiv 2412.19437, section 2.1.2).

    h' = u + sum_{i <= N_s} FFN_s_i(u) + sum_{i <= N_r} g_i FFN_r_i(u)          V3 eq. 12
    V2 gate:  s_i = softmax_i(u . e_i)                                          V2 section 2.2.1
    V3 gate:  s_i = sigmoid(u . e_i); pick top-K of s_i + b_i; g_i = s_i / sum_{picked} s_j   V3 eqs. 13-16
    output:   routed part times routed_scaling_factor (DeepSeek's code; V3 uses 2.5)

- Shared experts: the N_s shared experts are summed as one SwiGLU of width N_s * moe_intermediate_size, which
  is what a sum of N_s SwiGLUs is (and how V3's checkpoints store them).
- Fine-grained routed experts: n_routed_experts SwiGLUs of width moe_intermediate_size, K = num_experts_per_tok.
- Group-limited routing (V2 section 2.2.2 "device-limited", V3 node-limited): the experts are split into
  n_group groups, the topk_group best groups are kept and the top-K is taken inside them. Groups are ranked by
  their max score under 'softmax' (V2) and by the sum of their two best biased scores under 'sigmoid' (V3), as
  in the Hugging Face DeepseekV2/V3 routers, so loaded checkpoints route identically.
- Auxiliary-loss-free balancing (V3 section 2.1.2, Wang et al. 2024): the buffer e_score_correction_bias b is
  added to the scores only to choose experts, never to weight them. `update_bias` applies
  b_i += gamma * sign(mean_load - load_i) with no gradient; the trainer calls it after each optimizer step.
- Sequence-wise balance loss (V3 eqs. 17-20): alpha * sum_i f_i P_i with
  f_i = N_r / (K T) * #{t : expert i chosen for t} and P_i = 1/T sum_t s_it / sum_j s_jt, per sequence, then
  averaged over the batch. Deviation: the paper's indicator is "s_it in the top-K of s_t"; we count the experts
  actually chosen (after bias and group limits), which is what the balance is about. Stored as `aux_loss`
  after each forward (None when aux_loss_alpha = 0); GPT.forward adds it to the loss.
- Dispatch never loops over tokens: the (token, slot) pairs are sorted by expert, each expert runs one matmul
  on its contiguous slice, and index_add scatters the weighted results back. `forward(x, dense=True)` is the
  slow twin: every expert on every token, weighted by the masked gate.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import MLP


class MoE(nn.Module):

    def __init__(self, config):
        super().__init__()
        C, E = config.n_embd, config.n_routed_experts
        self.n_routed_experts, self.top_k = E, config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.scoring_func = config.scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.bias_update_speed = config.bias_update_speed
        self.aux_loss_alpha = config.aux_loss_alpha
        self.gate = nn.Linear(C, E, bias=False)  # rows are the expert centroids e_i
        self.experts = nn.ModuleList([MLP(C, config.moe_intermediate_size) for _ in range(E)])
        self.shared_experts = (MLP(C, config.n_shared_experts * config.moe_intermediate_size)
                               if config.n_shared_experts > 0 else None)
        # persistent: it is part of a trained model (HF checkpoints store it as mlp.gate.e_score_correction_bias)
        self.register_buffer('e_score_correction_bias', torch.zeros(E))
        # tokens routed to each expert: in the last forward (metrics), and summed over training forwards since
        # the last update_bias (so gradient accumulation balances the whole step, not its last micro-batch)
        self.register_buffer('load', torch.zeros(E), persistent=False)
        self.register_buffer('load_since_update', torch.zeros(E), persistent=False)
        self.aux_loss = None

    def route(self, x):
        """x (N, C) -> top-K weights (N, K) in x's dtype, expert ids (N, K), all scores s (N, E) in fp32."""
        N, E, G = x.shape[0], self.n_routed_experts, self.n_group
        logits = F.linear(x.float(), self.gate.weight.float())             # (N, E) fp32: ranks must be exact
        scores = logits.sigmoid() if self.scoring_func == 'sigmoid' else logits.softmax(dim=-1)  # (N, E)
        choice = scores + self.e_score_correction_bias                      # (N, E) the bias only selects
        if G > 1:
            grouped = choice.view(N, G, E // G)                             # (N, G, E/G)
            if self.scoring_func == 'sigmoid':
                group_score = grouped.topk(2, dim=-1).values.sum(-1)        # (N, G) V3: sum of the best two
            else:
                group_score = grouped.amax(dim=-1)                          # (N, G) V2: the best one
            keep = group_score.topk(self.topk_group, dim=-1).indices        # (N, topk_group)
            group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)  # (N, G)
            expert_mask = group_mask.repeat_interleave(E // G, dim=1)       # (N, E)
            choice = choice.masked_fill(~expert_mask, float('-inf'))
        idx = choice.topk(self.top_k, dim=-1).indices                       # (N, K)
        weights = scores.gather(1, idx)                                     # (N, K) unbiased scores weight
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        return weights.type_as(x), idx, scores

    def experts_sorted(self, x, weights, idx, counts):
        """Sorted dispatch: group the N*K (token, slot) pairs by expert, one matmul chain per expert."""
        N, K = idx.shape
        order = idx.flatten().argsort(stable=True)                          # (N*K,) pair ids, grouped by expert
        token = order // K                                                  # (N*K,) the token of each pair
        # index_select, not x[token]: the same values, but its backward is an index_add, a fifth of the time of
        # advanced indexing's accumulating index_put on the CPU, with the same sums (EXPERIMENTS.md t3)
        xs = x.index_select(0, token)                                       # (N*K, C) gathered, expert-major
        # every expert runs, even on zero rows, so all parameters get a (zero) gradient and DDP stays in step
        ys = torch.cat([expert(xe) for expert, xe in zip(self.experts, xs.split(counts))])  # (N*K, C)
        ys = ys * weights.flatten()[order].unsqueeze(1)                     # (N*K, C)
        return torch.zeros_like(x).index_add_(0, token, ys)                 # (N, C) sum over the K slots

    def experts_dense(self, x, weights, idx):
        """Slow twin: every expert on every token, weighted by the gate masked to the chosen experts."""
        gate = torch.zeros(x.shape[0], self.n_routed_experts, dtype=x.dtype, device=x.device)  # (N, E)
        gate = gate.scatter(1, idx, weights)                                # (N, E) zero off the top-K
        return sum(gate[:, e:e + 1] * expert(x) for e, expert in enumerate(self.experts))  # (N, C)

    def forward(self, x, dense=False):
        B, T, C = x.shape
        xf = x.reshape(B * T, C)                                            # (N, C)
        weights, idx, scores = self.route(xf)                               # (N, K), (N, K), (N, E)
        counts = torch.bincount(idx.flatten(), minlength=self.n_routed_experts)  # (E,)
        if dense:
            y = self.experts_dense(xf, weights, idx)                        # (N, C)
        else:
            y = self.experts_sorted(xf, weights, idx, counts.tolist())      # (N, C)
        if self.shared_experts is not None:
            y = y + self.shared_experts(xf)                                 # (N, C)
        self.load.copy_(counts)
        if self.training:
            self.load_since_update += counts
        self.aux_loss = self.balance_loss(scores.view(B, T, -1), idx.view(B, T, -1)) \
            if self.aux_loss_alpha > 0 else None
        return y.view(B, T, C)

    def balance_loss(self, scores, idx):
        """Sequence-wise balance loss alpha * sum_i f_i P_i (V3 eqs. 17-20); scores (B, T, E), idx (B, T, K)."""
        B, T, E = scores.shape
        chosen = torch.zeros_like(scores).scatter_(2, idx, 1.0)             # (B, T, E) 1 where expert chosen
        f = chosen.sum(dim=1) * E / (self.top_k * T)                        # (B, E)
        P = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)         # (B, E) normalised affinities
        return self.aux_loss_alpha * (f * P).sum(dim=-1).mean()

    @torch.no_grad()
    def update_bias(self, gamma=None):
        """Aux-loss-free balancing step: b_i += gamma * sign(mean_load - load_i) (V3 section 2.1.2)."""
        gamma = self.bias_update_speed if gamma is None else gamma
        load = self.load_since_update.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)  # balance the global batch: every rank must call this
        self.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
        self.load_since_update.zero_()


def update_moe_biases(model, gamma=None):
    """Call update_bias on every MoE layer of `model` (the trainer's one-liner after optimizer.step())."""
    for m in model.modules():
        if isinstance(m, MoE):
            m.update_bias(gamma)


def moe_load_stats(model):
    """Per-layer load of the last forward, for logging: {'moe/max_over_mean': worst layer, 'moe/load': [...]}."""
    loads = [m.load.tolist() for m in model.modules() if isinstance(m, MoE)]
    ratios = [max(l) / max(sum(l) / len(l), 1e-9) for l in loads]
    return {'moe/max_over_mean': max(ratios, default=0.0), 'moe/load': loads}
