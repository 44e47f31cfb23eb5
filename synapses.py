"""
Synaptic mechanisms after seed 003 (bio-inspired nanochat), built so that each is causal, per sequence, and
computes the same numbers in training (all positions at once) as in generation (one token at a time, with
its state carried in the KV cache). Each is one GPTConfig flag, off by default, and composes with every MLP.

use_presynaptic: short-term synaptic depression in attention (PresynapticDepression). Each key of each head
    has a release pool in (0, 1], full when its token appears. Every query that attends to it releases a
    share of what is left, drain * (the attention that query paid it before depression), and in log space
    the depletion decays by exp(-1 / tau_rrp) per position (the pool refills toward full with time
    constant tau_rrp): pool[t, s] = exp(-drain * used[t, s]), used[t, s] = the sum over queries t' < t of
    exp(-(t - 1 - t') / tau_rrp) * attention[t', s]. Query t's logit to key s gets
    lambda * log(max(pool[t, s], eps)) added, so a key heard much lately is heard less. (A pool drained
    linearly, 1 - drain * used, would go below 0 and stay silenced long after tau_rrp; this one cannot.)
    The pool at query t depends on queries before t alone: training computes used for all queries at
    once, a decayed sum over earlier query rows (decayed_past, a matrix product); generation carries the
    next query's used in the cache. drain (0.25, seed 003's alpha_ca) and lambda (1.0, its lambda_loge)
    are learned per head, both kept positive; tau_rrp is a setting (40, the seed's), eps 1e-6 (the seed's).
stochastic_release (with use_presynaptic): in training each key's release to each query is drawn, 1 with
    probability pool (the logit term 0) and 0 otherwise (lambda * log(eps): the key is not heard); in
    evaluation and generation it is the expected release, the pool itself. The draw's value goes
    forward, the expected release's gradient backward (straight through). A full pool always releases.
use_fast_weights: a Hebbian scratchpad beside the MLP (FastWeights). Per sequence and head, a rank x rank
    matrix F_t = decay * F_(t-1) + gate_t * v_t k_t^T is written, and token t reads F_(t-1) q_t; queries,
    keys (both L2-normalised), values and the write gate (seed 003's consolidation gate, a sigmoid) are
    learned projections of the MLP's input, the read goes back through c_proj. F starts at zero for every
    sequence, so nothing crosses sequences or batch rows. Training computes the reads in the parallel
    form, sum over s < t of decay^(t-1-s) gate_s (q_t . k_s) v_s: attention without softmax, masked by
    decayed_past; generation carries F itself. Settings: fast_weight_rank (16, the seed's), fast_weight_decay
    (0.95, the seed's).

Cost: presynaptic depression needs the attention weights themselves (no fused SDPA kernel) and a T x T by
T x T product per head (T^3 time), and keeps several T x T tensors per head for backward; the fast weights'
parallel form keeps T x T tensors per head too, where their state is rank x rank. bench_bio.py measures
both (--part=attn against SDPA, --synapses for whole training steps).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

DRAIN_INIT = 0.25  # seed 003's alpha_ca: the share of a pool one query's full attention drains
LAMBDA_INIT = 1.0  # seed 003's lambda_loge: how much a depleted key's logit drops
POOL_EPS = 1e-6  # seed 003's epsilon: an empty pool's logit bias is lambda * log(1e-6), not -inf


def decayed_past(queries, keys, rate, device):
    """(queries, keys) float64 matrix W with W[t, s] = rate ** (t - 1 - s) for s < t and 0 elsewhere:
    W @ X sums each row's earlier rows of X, each decayed once per position since. Row `keys`, when asked
    for, is what the position after the last one sees: the state generation carries on."""
    age = (torch.arange(queries, device=device)[:, None] - 1 - torch.arange(keys, device=device)[None, :]).double()
    return torch.where(age >= 0, rate ** age.clamp(min=0), 0.0)  # float64: callers take what precision they need


class PresynapticDepression(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.log_drain = nn.Parameter(torch.full((config.n_head,), math.log(DRAIN_INIT)))
        self.log_lambda = nn.Parameter(torch.full((config.n_head,), math.log(LAMBDA_INIT)))
        self.refill = math.exp(-1.0 / config.tau_rrp)  # the share of depletion left one position later
        self.stochastic = config.stochastic_release

    def forward(self, scores, cache=None):
        """scores: (B, nh, T, S) float32 attention logits, -inf where a key is in a query's future; returns
        them with each key's depression added. cache (generation): the layer's cache dict, holding under
        'used' the next query's decayed sum of earlier attention (B, nh, S - 1); T == 1 once it is filled."""
        B, nh, T, S = scores.shape
        probs = scores.softmax(-1)  # the attention before depression drains the pools
        if cache is not None and 'used' in cache:  # one new query; its own key arrives full
            used = torch.cat((cache['used'], probs.new_zeros(B, nh, 1)), dim=-1)[:, :, None, :]
            cache['used'] = self.refill * used[:, :, 0] + probs[:, :, 0]
        else:
            past = decayed_past(T + 1, T, self.refill, scores.device)
            with torch.autocast(scores.device.type, enabled=False):  # float32 sums, as the cache's updates are
                used_all = past.to(probs.dtype) @ probs  # (B, nh, T + 1, T): row t sums queries before t
            used = used_all[:, :, :T]
            if cache is not None:
                cache['used'] = used_all[:, :, T]
        # log(max(pool, eps)) with pool = exp(-drain * used): each query releases a share of what is left
        log_pool = (-self.log_drain.exp()[:, None, None] * used).clamp(min=math.log(POOL_EPS))
        if self.stochastic and self.training:
            released = torch.bernoulli(log_pool.detach().exp())  # 1: the key's vesicle released; 0: it failed
            log_release = torch.where(released > 0, 0.0, math.log(POOL_EPS))
            log_pool = log_pool + (log_release - log_pool).detach()  # the draw's value, the expectation's gradient
        return scores + self.log_lambda.exp()[:, None, None] * log_pool


class FastWeights(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.rank = config.n_head, config.fast_weight_rank
        width = self.n_head * self.rank
        self.c_qkv = nn.Linear(config.n_embd, 3 * width, bias=config.bias)
        self.c_gate = nn.Linear(config.n_embd, self.n_head)  # the consolidation gate: how much each token writes
        self.c_proj = nn.Linear(width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.decay = config.fast_weight_decay

    def forward(self, x, cache=None):
        """x: (B, T, n_embd); cache (generation): the layer's cache dict, holding under 'fast' the
        scratchpads F (B, nh, rank values, rank keys) written so far; T == 1 once it is filled."""
        B, T, _ = x.shape
        q, k, v = (part.view(B, T, self.n_head, self.rank).transpose(1, 2)
                   for part in self.c_qkv(x).split(self.n_head * self.rank, dim=2))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        gate = torch.sigmoid(self.c_gate(x)).transpose(1, 2)  # (B, nh, T)
        if cache is not None and 'fast' in cache:  # read F_(t-1) q_t, then write token t
            scratch = cache['fast']
            y = (scratch @ q.transpose(-1, -2)).transpose(-1, -2)
            cache['fast'] = self.decay * scratch + gate[..., None] * v.transpose(-1, -2) @ k
        else:
            past = decayed_past(T + 1, T, self.decay, x.device).to(gate.dtype)
            mask = past[:T] * gate[:, :, None, :]  # [t, s]: decay^(t-1-s) gate_s for s < t
            y = ((q @ k.transpose(-1, -2)) * mask.to(q.dtype)) @ v
            if cache is not None:  # F_(T-1) = sum over s of decay^(T-1-s) gate_s v_s k_s^T
                written = (past[T] * gate).to(v.dtype)
                cache['fast'] = (v * written[..., None]).transpose(-1, -2) @ k
        return self.dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.rank)))
