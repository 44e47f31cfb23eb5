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
    The pool at query t depends on queries before t alone: used[t] = refill * used[t - 1] + attention[t - 1]
    is a recursion down each key's column, which training computes synapse_chunk queries at a time
    (DepressedAttention: within a chunk a matrix product with decayed_past, between chunks the one row of
    used the next chunk inherits); generation carries the next query's used in the cache. drain (0.25,
    seed 003's alpha_ca) and lambda (1.0, its lambda_loge) are learned per head, both kept positive;
    tau_rrp is a setting (40, the seed's), eps 1e-6 (the seed's).
stochastic_release (with use_presynaptic): in training each key's release to each query is drawn, 1 with
    probability pool (the logit term 0) and 0 otherwise (lambda * log(eps): the key is not heard); in
    evaluation and generation it is the expected release, the pool itself. The draw's value goes
    forward, the expected release's gradient backward (straight through). A full pool always releases.
use_fast_weights: a Hebbian scratchpad beside the MLP (FastWeights). Per sequence and head, a rank x rank
    matrix F_t = decay * F_(t-1) + gate_t * v_t k_t^T is written, and token t reads F_(t-1) q_t; queries,
    keys (both L2-normalised), values and the write gate (seed 003's consolidation gate, a sigmoid) are
    learned projections of the MLP's input, the read goes back through c_proj. F starts at zero for every
    sequence, so nothing crosses sequences or batch rows. Training computes the reads synapse_chunk
    tokens at a time: within a chunk the parallel form, sum over s < t of decay^(t-1-s) gate_s (q_t . k_s)
    v_s (attention without softmax, masked by decayed_past), from earlier chunks the F they wrote;
    generation carries F itself. Settings: fast_weight_rank (16, the seed's), fast_weight_decay
    (0.95, the seed's).

Cost: presynaptic depression needs the attention weights themselves (no fused SDPA kernel): about T^2 (chunk
+ 2 hs) / 2 multiply-adds per head forward, and backward recomputes each chunk from q, k, v, the output and one
row of used per chunk, the only things it keeps (O(T hs + T^2 / chunk) per head, about what SDPA keeps;
the dense form, kept in tests/test_synapses.py as the reference, kept five T x T tensors per head). The
fast weights keep a few chunk x chunk products per chunk, O(T chunk) per head. Dropout and the release's
draws come from a generator per chunk, seeded once per call, so backward draws them again. synapse_chunk
(64) trades the chunks' count (Python steps) against the in-chunk product's size; bench_bio.py measures
both mechanisms (--part=attn against SDPA, --synapses for whole training steps).
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


def chunk_decays(n, rate, device, dtype):
    """decayed_past(n + 1, n, rate) and rate ** (0 .. n), in dtype, for chunks of up to n positions: a chunk of
    m takes [:m + 1, :m] and [:m + 1] (their entries do not depend on n), so a call builds them once."""
    return (decayed_past(n + 1, n, rate, device).to(dtype),
            (rate ** torch.arange(n + 1, device=device, dtype=torch.float64)).to(dtype))


def chunk_draws(seed, chunk_index, shape, device, dtype, stochastic, dropout_p):
    """The uniform [0, 1) tensors of shape one chunk draws (the release's, then dropout's; none without a seed),
    from a generator of its own: the forward pass and the backward's recomputation (which visits the chunks in
    reverse) draw the same numbers."""
    if seed is None:
        return []
    generator = torch.Generator(device=device)
    generator.manual_seed(seed + chunk_index)
    count = stochastic + (dropout_p > 0)
    return [torch.rand(shape, generator=generator, device=device, dtype=dtype) for _ in range(count)]


def depressed_chunk(scaled, k, start, carry, drain, lam, decays, dropout_p, stochastic, draws):
    """Presynaptic attention for the queries start .. start + n (scaled: their q / sqrt(hs), (B, nh, n, hs))
    over keys 0 .. start + n of k, given carry (B, nh, >= start): the used sums the chunk's first query
    inherits; decays: chunk_decays' pair for refill. Returns, keyed by name, what forward and backward need;
    works in carry's dtype."""
    n = scaled.size(2)
    end = start + n
    scores = (scaled @ k[:, :, :end].transpose(-1, -2)).to(carry.dtype)
    future = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(1)  # keys before start: all seen
    scores[:, :, :, start:].masked_fill_(future, float('-inf'))
    probs = scores.softmax(-1)  # the attention before depression drains the pools
    # rows 0 .. n - 1: each query's used; row n: the next chunk's carry (decayed_past's extra row)
    weights, powers = decays[0][:n + 1, :n], decays[1][:n + 1]
    used = weights @ probs
    used[:, :, :, :start].addcmul_(powers[:, None], carry[:, :, None, :start])
    # lambda log(max(pool, eps)) with pool = exp(-drain * used): each query releases a share of what is left
    floor = lam * math.log(POOL_EPS)
    bias = (used[:, :, :n] * (-lam * drain)).clamp_(min=floor)
    released = bias
    if stochastic:  # 1 (log 0) with probability pool, else eps: the draw's value, the expectation's gradient
        released = torch.where(draws.pop(0) < (bias / lam).exp(), 0.0, floor)
    att = (scores + released).softmax(-1)
    keep = draws.pop(0) >= dropout_p if dropout_p > 0 else None
    kept = att * keep / (1 - dropout_p) if dropout_p > 0 else att
    return dict(probs=probs, used=used, bias=bias, floor=floor, released=released, att=att, keep=keep, kept=kept,
                weights=weights, powers=powers)


class DepressedAttention(torch.autograd.Function):
    """Presynaptic attention, chunk by chunk along the queries: used[t] = refill * used[t - 1] + probs[t - 1] is
    a recursion down each key's column, so a chunk needs from the ones before it only the row of used sums
    its first query inherits (the carry). Backward keeps q, k, v, the output and one carry per chunk,
    O(T^2 / chunk) per head where the dense form kept several T x T tensors, and recomputes each chunk's
    attention; the gradient of used runs up the columns, a carry the other way."""

    @staticmethod
    def forward(ctx, q, k, v, log_drain, log_lambda, refill, chunk, dropout_p, stochastic, seed):
        B, nh, T, hs = q.shape
        work = torch.promote_types(q.dtype, torch.float32)  # sums in float32 at least, as generation's are
        with torch.autocast(q.device.type, enabled=False):
            drain, lam = log_drain.exp().to(work)[:, None, None], log_lambda.exp().to(work)[:, None, None]
            scaled = q / math.sqrt(hs)  # before the product, as SDPA does, so that float16 logits do not overflow
            carry = q.new_zeros(B, nh, T, dtype=work)
            decays = chunk_decays(min(chunk, T), refill, q.device, work)
            carries, outputs = [], []
            for index, start in enumerate(range(0, T, chunk)):
                n = min(chunk, T - start)
                draws = chunk_draws(seed, index, (B, nh, n, start + n), q.device, work, stochastic, dropout_p)
                carries.append(carry)
                c = depressed_chunk(scaled[:, :, start:start + n], k, start, carry, drain, lam, decays, dropout_p,
                                    stochastic, draws)
                outputs.append(c['kept'].to(v.dtype) @ v[:, :, :start + n])
                carry = F.pad(c['used'][:, :, n], (0, T - start - n))
            y = torch.cat(outputs, dim=2)
        ctx.save_for_backward(q, k, v, y, log_drain, log_lambda, torch.stack(carries))
        ctx.settings = refill, chunk, dropout_p, stochastic, seed
        ctx.mark_non_differentiable(carry)
        return y, carry

    @staticmethod
    @torch.autograd.function.once_differentiable  # the carries are constants to autograd: no second derivative
    def backward(ctx, dy, _):
        q, k, v, y, log_drain, log_lambda, carries = ctx.saved_tensors
        refill, chunk, dropout_p, stochastic, seed = ctx.settings
        B, nh, T, hs = q.shape
        work = carries.dtype
        with torch.autocast(q.device.type, enabled=False):
            drain, lam = log_drain.exp().to(work)[:, None, None], log_lambda.exp().to(work)[:, None, None]
            scaled = q / math.sqrt(hs)
            dy = dy.to(v.dtype)
            # sum over keys of d(att) * att, each query's, is dy . y (with dropout too): flash attention's shortcut
            dy_y = (dy.to(work) * y.to(work)).sum(-1, keepdim=True)
            dq, dk, dv = torch.zeros_like(q, dtype=work), torch.zeros_like(k, dtype=work), torch.zeros_like(v, dtype=work)
            d_log_drain, d_log_lambda = torch.zeros_like(drain), torch.zeros_like(lam)
            d_next = q.new_zeros(B, nh, T, dtype=work)  # the gradient of the carry the next chunk inherits
            decays = chunk_decays(min(chunk, T), refill, q.device, work)
            starts = list(range(0, T, chunk))
            for index in reversed(range(len(starts))):
                start = starts[index]
                n = min(chunk, T - start)
                end = start + n
                draws = chunk_draws(seed, index, (B, nh, n, end), q.device, work, stochastic, dropout_p)
                c = depressed_chunk(scaled[:, :, start:end], k, start, carries[index], drain, lam, decays,
                                    dropout_p, stochastic, draws)
                dy_chunk = dy[:, :, start:end]
                dv[:, :, :end] += (c['kept'].to(v.dtype).transpose(-1, -2) @ dy_chunk).to(work)
                d_scores = (dy_chunk @ v[:, :, :end].transpose(-1, -2)).to(work)
                if c['keep'] is not None:
                    d_scores.mul_(c['keep']).div_(1 - dropout_p)
                d_scores.sub_(dy_y[:, :, start:end]).mul_(c['att'])  # through the second softmax
                # log lambda's gradient: d_scores . lambda log(release); log drain's: d_scores . lambda
                # log(pool) where the pool is above eps, which is also where used's gradient is
                # -drain lambda d_scores (straight through any draw)
                d_log_lambda += (d_scores * c['released']).sum((0, 2, 3))[:, None, None]
                through = torch.where(c['bias'] > c['floor'], d_scores, 0.0)  # clamped to the floor: no gradient
                d_log_drain += (through * c['bias']).sum((0, 2, 3))[:, None, None]
                d_used = torch.cat((through.mul_(-lam * drain), d_next[:, :, None, :end]), dim=2)
                d_probs = c['weights'].transpose(0, 1) @ d_used
                d_next = F.pad(c['powers'] @ d_used[:, :, :, :start], (0, T - start))  # the carry it inherited
                probs = c['probs']
                d_scores += d_probs.sub_((d_probs * probs).sum(-1, keepdim=True)).mul_(probs)  # the first softmax
                dq[:, :, start:end] = (d_scores.to(k.dtype) @ k[:, :, :end]).to(work) / math.sqrt(hs)
                dk[:, :, :end] += (d_scores.transpose(-1, -2).to(q.dtype) @ scaled[:, :, start:end]).to(work)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_log_drain.flatten().to(log_drain.dtype),
                d_log_lambda.flatten().to(log_lambda.dtype), None, None, None, None, None)


class PresynapticDepression(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.log_drain = nn.Parameter(torch.full((config.n_head,), math.log(DRAIN_INIT)))
        self.log_lambda = nn.Parameter(torch.full((config.n_head,), math.log(LAMBDA_INIT)))
        self.refill = math.exp(-1.0 / config.tau_rrp)  # the share of depletion left one position later
        self.stochastic = config.stochastic_release
        self.chunk = config.synapse_chunk

    def forward(self, q, k, v, cache=None, dropout_p=0.0):
        """Causal attention with depression: q, k, v (B, nh, T, hs) -> (B, nh, T, hs). cache (generation): the
        layer's cache dict, holding under 'used' the next query's decayed sum of earlier attention
        (B, nh, S - 1) once k and v hold S keys; T == 1 once it is filled."""
        if cache is not None and 'used' in cache:  # one new query over every key so far; its own arrives full
            scores = ((q / math.sqrt(q.size(-1))) @ k.transpose(-1, -2)).float()
            used = torch.cat((cache['used'], scores.new_zeros(*scores.shape[:2], 1)), dim=-1)[:, :, None, :]
            cache['used'] = self.refill * used[:, :, 0] + scores.softmax(-1)[:, :, 0]
            log_pool = (-self.log_drain.exp()[:, None, None] * used).clamp(min=math.log(POOL_EPS))
            att = (scores + self.log_lambda.exp()[:, None, None] * log_pool).softmax(-1)
            return att.to(v.dtype) @ v
        y, used = self.chunked(q, k, v, dropout_p)
        if cache is not None:
            cache['used'] = used
        return y

    # torch.compile leaves the chunks' loop to eager PyTorch (traced, its slices' shapes made it fail to build)
    @torch.compiler.disable
    def chunked(self, q, k, v, dropout_p):
        stochastic = self.stochastic and self.training
        # the chunks' draws come from generators seeded here, so that backward can draw them again
        seed = int(torch.randint(2 ** 62, ())) if stochastic or dropout_p > 0 else None
        return DepressedAttention.apply(q, k, v, self.log_drain, self.log_lambda, self.refill, self.chunk, dropout_p,
                                        stochastic, seed)


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
        self.chunk = config.synapse_chunk

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
            y, scratch = self.chunked_reads(q, k, v, gate)
            if cache is not None:
                cache['fast'] = scratch
        return self.dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.rank)))

    def chunked_reads(self, q, k, v, gate):
        """Every token's read, chunk by chunk: within a chunk the parallel form (attention without softmax,
        masked by decayed_past), from the chunks before it the scratchpad they wrote, carried between chunks
        in float32 at least (it sums the whole past). Autograd keeps chunk x chunk tensors and one rank x rank
        scratchpad per chunk. Returns the reads (B, nh, T, rank) and the scratchpad after the last token:
        F_(T-1), the cache's."""
        B, nh, T, rank = q.shape
        work = torch.promote_types(q.dtype, torch.float32)
        scratch = q.new_zeros(B, nh, rank, rank, dtype=work)
        decays = chunk_decays(min(self.chunk, T), self.decay, q.device, work)
        reads = []
        for start in range(0, T, self.chunk):
            n = min(self.chunk, T - start)
            qc, kc, vc = (t[:, :, start:start + n] for t in (q, k, v))
            past, powers = decays[0][:n + 1, :n], decays[1][:n + 1]  # past's row n: weights of the next scratchpad
            written = past * gate[:, :, None, start:start + n].to(work)  # [t, s]: decay^(t-1-s) gate_s for s < t
            within = ((qc @ kc.transpose(-1, -2)) * written[:, :, :n].to(q.dtype)) @ vc
            with torch.autocast(q.device.type, enabled=False):
                earlier = powers[:n, None] * (qc.to(work) @ scratch.transpose(-1, -2))
                reads.append(within + earlier.to(within.dtype))
                scratch = powers[n] * scratch + (vc.to(work) * written[:, :, n, :, None]).transpose(-1, -2) @ kc.to(work)
        return torch.cat(reads, dim=2), scratch
