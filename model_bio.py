"""
WiggleGPT: a GPT language model whose MLP neurons oscillate.

Each hidden neuron of the MLP computes sin(omega*x + phi) * tanh(x) + baseline with its own
learnable omega, phi and baseline, in place of GELU. Everything else is a GPT-2 style decoder:
pre-norm blocks (LayerNorm or RMSNorm), causal self-attention, learned positions or RoPE,
tied input/output embeddings.

Module and parameter names follow the original WiggleGPT release so its checkpoints load by name.

GPTConfig (below, each field commented) holds the architecture; its defaults are GPT-2 small's, and
train_bio.py's own defaults are the 124M WiggleGPT's (no biases, the oscillating MLP, RMSNorm, RoPE).
use_positions=False runs with no positional encoding at all, as the original release's checkpoints
were trained (checkpoints.py). The limits a checkpoint's or a user's settings must keep are checked
in checkpoints.config_problem before a model is built.

The MLP is one setting, mlp: 'bio' (the oscillating one), 'gelu' (GPT-2's), 'relu2' (relu(x)**2 in GELU's
shape: modded-nanogpt's, nanochat's), 'swiglu' (silu(gate) * value, LLaMA's) or 'bio_glu' (the oscillating
activation on the gate in SwiGLU's place). The gated ones are round(8/3 n_embd) wide, so that their three
matrices hold GELU's two's weights (mlp_width). use_bio_mlp=True/False, the older switch that
checkpoints from before mlp record, names 'bio'/'gelu'. WiggleGPT's earlier bio MLPs are one setting away:
bio_variant='v2' or 'v1' (lineage.py says what they compute). gelu_params_like='v3'/'v2'/'v1' widens the
hidden layer of mlp gelu, relu2 or swiglu to as many parameters as that bio MLP holds, so that a
comparison can tell more parameters from the mechanism.

Seed 003's synaptic mechanisms are one flag each, off by default, with any MLP (synapses.py says what they
compute): use_presynaptic (short-term depression in attention, which then computes its weights itself in
place of fused SDPA; tau_rrp), stochastic_release (its release drawn in training), use_fast_weights (a
Hebbian scratchpad beside the MLP; fast_weight_rank, fast_weight_decay). Training computes both
synapse_chunk positions at a time, so that their time grows as T^2 and backward keeps no T x T tensor
(synapses.py); their state along a sequence lives in the KV cache in generation,
so cached and recomputed logits agree.

The activation (oscillation.py holds its maths and the implementations that run it, plain, function
and fused, chosen by oscillation.OSCILLATION_IMPL) can be sparse-gated in v3 (use_sparse_gate): a neuron
fires where gate_weight * x + gate_bias > bio_threshold and outputs exactly 0 elsewhere. Training reports
the share of exact zeros among gated outputs as `sparsity` in its log lines.

With config_gpt2_bio_3070.py the model has 123,697,920 parameters; the GELU control has 110,592
fewer (omega, phi, baseline: 3 x 3072 per layer) and the sparse gate adds 73,728 (2 x 3072 per
layer); tests/test_model.py checks these counts. GPT also has flops_per_token and estimate_mfu
(against a peak FLOP/s from devices.py); its optimizers are built in optimizers.py.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import lineage  # the earlier bio MLPs (v1, v2)
import moe  # the mixture of experts that grows and prunes itself
import synapses  # seed 003's synaptic mechanisms: presynaptic depression, fast weights
from oscillation import OscillatingActivation, oscillate  # the activation's maths and its implementations


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms
    mlp: str = ''  # the MLP: 'bio', 'gelu', 'swiglu', 'relu2' or 'bio_glu' (below); '' is use_bio_mlp's
    use_bio_mlp: bool = False  # the older switch, read where mlp is '': True is mlp='bio', False 'gelu'
    gelu_tanh: bool = False  # GELU in its tanh approximation, as OpenAI's GPT-2 computes it ('gelu_new')
    use_rmsnorm: bool = False
    use_rope: bool = False  # rotary position embeddings instead of learned ones
    use_positions: bool = True  # False: no positional encoding at all, as the original release's no-op RoPE
    gradient_checkpointing: bool = False
    use_sparse_gate: bool = False  # only with mlp 'bio', bio_variant v3
    bio_threshold: float = 0.25  # firing threshold of the sparse gate (and of v1/v2's event layer)
    bio_variant: str = 'v3'  # the bio MLP: 'v3' (BioMLP), or the earlier 'v2' and 'v1' (lineage.py)
    bio_compartments: int = 2  # v1: dendritic compartments per MLP
    gelu_params_like: str = ''  # mlp 'gelu', 'relu2' or 'swiglu' widened to the parameters of bio_variant 'v3', 'v2' or 'v1'
    use_presynaptic: bool = False  # attention with short-term synaptic depression (synapses.py)
    tau_rrp: float = 40.0  # presynaptic: positions over which a drained pool refills (time constant)
    stochastic_release: bool = False  # presynaptic: training draws each release (synapses.py)
    use_fast_weights: bool = False  # a Hebbian fast-weight scratchpad beside the MLP (synapses.py)
    fast_weight_rank: int = 16  # fast weights: keys and values per head
    fast_weight_decay: float = 0.95  # fast weights: what a write keeps per position
    synapse_chunk: int = 64  # presynaptic, fast weights: positions per chunk in training (speed, memory; the draws' layout)
    use_moe: bool = False  # the MLP as a mixture of experts that splits and merges (moe.py)
    moe_experts: int = 4  # experts active at the start
    moe_top_k: int = 2  # units of experts per token (one expert each until a split); each expert 1/top_k of the MLP's width
    moe_max_experts: int = 8  # slots: at most this many active
    moe_min_experts: int = 2  # merges stop here
    moe_balance: float = 0.01  # weight of the load-balancing loss

    def __post_init__(self):
        settle_mlp(vars(self))  # checkpoints from before mlp existed have use_bio_mlp alone


MLP_KINDS = ('bio', 'gelu', 'swiglu', 'relu2', 'bio_glu')
GATED_KINDS = ('swiglu', 'bio_glu')
PARAMS_LIKE_KINDS = ('gelu', 'relu2', 'swiglu')  # the MLPs gelu_params_like can widen


def mlp_kind(mlp, use_bio_mlp):
    """The MLP settings describe: mlp where it is set, else the one use_bio_mlp names."""
    return mlp or ('bio' if use_bio_mlp else 'gelu')


def settle_mlp(settings):
    """Make settings (a dict of GPTConfig's fields) one truth: mlp names the MLP, use_bio_mlp says whether it is 'bio'."""
    settings['mlp'] = mlp_kind(settings['mlp'], settings['use_bio_mlp'])
    settings['use_bio_mlp'] = settings['mlp'] == 'bio'


class RMSNorm(nn.Module):
    def __init__(self, ndim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(ndim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(config):
    if config.use_rmsnorm:
        return RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


def rope_tables(head_dim, length, base=10000.0):
    """cos and sin of the rotation angle pos * freq_i, shaped (length, head_dim // 2)."""
    freqs = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x[..., i], x[..., i + d/2]) of x (B, nh, T, d) by each token's angle."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.presynaptic = synapses.PresynapticDepression(config) if config.use_presynaptic else None

    def forward(self, x, rope=None, kv_cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:  # generation: earlier tokens' keys and values are kept, not recomputed
            if kv_cache:
                assert T == 1, 'a filled cache takes one token at a time'
                k, v = torch.cat((kv_cache['k'], k), dim=2), torch.cat((kv_cache['v'], v), dim=2)
            kv_cache.update(k=k, v=v)
        # one new token may see every cached one; a longer input starts from an empty cache, so causal
        if self.presynaptic is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:  # depression changes the attention logits, so synapses.py computes the attention itself
            y = self.presynaptic(q, k, v, kv_cache, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class SparseGate(nn.Module):
    """
    A neuron fires where gate_weight * x + gate_bias > threshold (x its pre-activation); it
    outputs its activation where it fires and exactly 0 elsewhere (backward: oscillation.py).
    """

    def __init__(self, n, threshold):
        super().__init__()
        self.threshold = threshold
        self.gate_weight = nn.Parameter(torch.ones(n))
        self.gate_bias = nn.Parameter(torch.zeros(n))
        # running count of silent outputs, kept on the device so training never waits on the host
        self.register_buffer('silent_seen', torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer('outputs_seen', torch.zeros((), dtype=torch.int64), persistent=False)

    def forward(self, x, activation):
        """The gated activation of pre-activations x; activation is the OscillatingActivation to gate."""
        out = oscillate(x, activation.omega, activation.phi, activation.baseline,
                        self.gate_weight, self.gate_bias, self.threshold)
        if self.training:
            self.silent_seen += (out == 0).sum()
            self.outputs_seen += out.numel()
        return out


def mlp_width(config):
    """The hidden width of a GELU, ReLU² or gated MLP. 4 n_embd for the first two; round(8 n_embd / 3) for the
    gated ones, whose three matrices then hold as many weights as GELU's two (exactly where 3 divides n_embd:
    2048 at GPT-2's 768; the gated kinds have 8/3 n_embd more biases with bias=True). With gelu_params_like,
    the width whose parameters come nearest those of that bio MLP."""
    gated = config.mlp in GATED_KINDS
    if not config.gelu_params_like:
        return round(8 * config.n_embd / 3) if gated else 4 * config.n_embd
    from dataclasses import replace
    with torch.device('meta'):  # counted without allocating (v1 at GPT-2 size is 800M)
        like = bio_mlp(replace(config, mlp='bio', bio_variant=config.gelu_params_like, use_sparse_gate=False))
    target = sum(p.numel() for p in like.parameters())
    # a hidden unit holds a row of c_fc (two for the gated kinds: gate and value) with its bias, and a column of
    # c_proj; c_proj's n_embd biases are there at any width
    per_unit = (3 if gated else 2) * config.n_embd + (2 if gated else 1) * config.bias
    return max(1, round((target - config.n_embd * config.bias) / per_unit))


def relu2(x):
    """ReLU², relu(x)**2: modded-nanogpt's and nanochat's activation."""
    return F.relu(x).square()


class MLP(nn.Module):
    """GPT-2's MLP: c_fc, GELU (mlp='gelu') or ReLU² (mlp='relu2'), c_proj."""

    def __init__(self, config, hidden=None):
        super().__init__()
        hidden = hidden or mlp_width(config)
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.act = relu2 if config.mlp == 'relu2' else nn.GELU(approximate='tanh' if config.gelu_tanh else 'none')
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GatedMLP(nn.Module):
    """A gated MLP: c_proj(act(gate) * value), gate and value side by side in c_fc's output (one matrix of
    2 x hidden rows, gate first). act is SiLU (mlp='swiglu', as LLaMA's) or the oscillating activation with
    its per-neuron omega, phi, baseline (mlp='bio_glu'): does the oscillation help where the MLP gates already?"""

    def __init__(self, config, hidden=None):
        super().__init__()
        hidden = hidden or mlp_width(config)
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden, bias=config.bias)
        self.activation = OscillatingActivation(hidden) if config.mlp == 'bio_glu' else None
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        gate, value = self.c_fc(x).chunk(2, dim=-1)
        gate = F.silu(gate) if self.activation is None else self.activation(gate)
        return self.dropout(self.c_proj(gate * value))


class BioMLP(nn.Module):
    def __init__(self, config, hidden=None):
        super().__init__()
        hidden = hidden or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.activation = OscillatingActivation(hidden)
        self.sparse_gate = SparseGate(hidden, config.bio_threshold) if config.use_sparse_gate else None
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        a = self.activation(h) if self.sparse_gate is None else self.sparse_gate(h, self.activation)
        return self.dropout(self.c_proj(a))


def bio_mlp(config):
    """The bio MLP config.bio_variant names: v3 (BioMLP) or an earlier one from lineage.py."""
    return BioMLP(config) if config.bio_variant == 'v3' else lineage.make_mlp(config)


MLP_OF_KIND = {'bio': bio_mlp, 'gelu': MLP, 'relu2': MLP, 'swiglu': GatedMLP, 'bio_glu': GatedMLP}


def make_mlp(config):
    """The block's MLP: the kind config.mlp names, or (use_moe) experts of that kind, each 1/moe_top_k as wide."""
    if not config.use_moe:
        return MLP_OF_KIND[config.mlp](config)
    kind = BioMLP if config.mlp == 'bio' else MLP_OF_KIND[config.mlp]
    width = max(1, round((4 * config.n_embd if config.mlp == 'bio' else mlp_width(config)) / config.moe_top_k))
    return moe.MoE(config, lambda: kind(config, width))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = make_mlp(config)
        self.fast_weights = synapses.FastWeights(config) if config.use_fast_weights else None

    def forward(self, x, rope=None, kv_cache=None):
        x = x + self.attn(self.ln_1(x), rope, kv_cache)
        h = self.ln_2(x)
        if self.fast_weights is None:
            return x + self.mlp(h)
        return x + self.mlp(h) + self.fast_weights(h, kv_cache)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        if config.mlp not in MLP_KINDS:
            raise ValueError(f"mlp={config.mlp!r} is not one of {', '.join(MLP_KINDS)}")
        if config.use_sparse_gate and not (config.mlp == 'bio' and config.bio_variant == 'v3'):
            raise ValueError("use_sparse_gate=True is the gate of the bio MLP v3 (mlp='bio', bio_variant='v3')")
        if config.gelu_params_like and config.mlp not in PARAMS_LIKE_KINDS:
            raise ValueError(f"gelu_params_like widens mlp {', '.join(PARAMS_LIKE_KINDS)}, not {config.mlp!r}")
        self.config = config
        modules = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        )
        if config.use_positions and not config.use_rope:
            modules['wpe'] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        if config.use_positions and config.use_rope:
            head_dim = config.n_embd // config.n_head
            assert head_dim % 2 == 0, 'RoPE needs an even head size'
            cos, sin = rope_tables(head_dim, config.block_size)
            self.register_buffer('rope_cos', cos, persistent=False)
            self.register_buffer('rope_sin', sin, persistent=False)

        self.apply(self._init_weights)
        # residual projections start smaller, scaled by depth (GPT-2)
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count (the tied embedding once); learned positions excluded by default."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and 'wpe' in self.transformer:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def new_kv_cache(self):
        """An empty cache for forward(kv_cache=...): one dict per layer, filled as it runs with the keys 'k' and
        values 'v' of the tokens so far, and the state synapses.py's mechanisms carry ('used', 'fast')."""
        return [{} for _ in self.transformer.h]

    def forward(self, idx, targets=None, kv_cache=None, all_positions=False):
        """Logits (and the loss with targets; -1 targets are ignored); without targets only the last
        position's, unless all_positions (evaluation scores every token).

        With kv_cache (from new_kv_cache) idx continues the cached tokens: the first call fills the
        cache from a whole context, later calls add one token each.
        """
        B, T = idx.size()
        past = kv_cache[0]['k'].size(2) if kv_cache and kv_cache[0] else 0
        assert past + T <= self.config.block_size, f'sequence of {past + T} tokens, block_size is {self.config.block_size}'
        x = self.transformer.wte(idx)
        rope = None
        if 'wpe' in self.transformer:
            x = x + self.transformer.wpe(torch.arange(past, past + T, device=idx.device))
        elif hasattr(self, 'rope_cos'):
            rope = (self.rope_cos[past:past + T], self.rope_sin[past:past + T])
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            if self.config.gradient_checkpointing and self.training:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, None if kv_cache is None else kv_cache[i])
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x if all_positions else x[:, [-1], :]), None  # sampling needs the last position alone
        logits = self.lm_head(x)
        # the mean over targets that are not -1; 0 (not nan) when a batch has none
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1,
                               reduction='sum') / (targets != -1).sum().clamp(min=1)
        if self.config.use_moe and self.training:  # the experts' load-balancing term, read once
            balance = sum(block.mlp.aux_loss for block in self.transformer.h)
            for block in self.transformer.h:
                block.mlp.aux_loss = None
            self.balance_loss = balance.detach()  # for the training log, which reports the two apart
            loss = loss + balance
        return logits, loss

    def sparse_gates(self):
        """The modules that count silent neurons: v3's sparse gates, v1/v2's event layers."""
        return [m for m in self.modules() if hasattr(m, 'silent_seen')]

    def read_sparsity(self):
        """Share of silent outputs since the last read (None without gates): exact zeros of v3's gate, voltages
        at or below the threshold in v1/v2's event layer."""
        gates = self.sparse_gates()
        if not gates:
            return None
        silent = sum(g.silent_seen for g in gates)
        total = sum(g.outputs_seen for g in gates)
        for g in gates:
            g.silent_seen.zero_()
            g.outputs_seen.zero_()
        total = total.item()
        return silent.item() / total if total else None

    def flops_per_token(self):
        """Forward + backward FLOPs per token: 6 per parameter a token meets plus attention's score/value products."""
        cfg = self.config
        params = self.get_num_params()
        for block in self.transformer.h:  # experts: the parameters a token meets, not every slot's
            if cfg.use_moe:
                params += block.mlp.active_params_per_token() - sum(p.numel() for p in block.mlp.parameters())
        return 6 * params + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def estimate_mfu(self, tokens_per_second, peak_flops):
        """Model FLOPs utilization: achieved FLOP/s over the device's peak (None if the peak is unknown)."""
        if not peak_flops:
            return None
        return self.flops_per_token() * tokens_per_second / peak_flops
