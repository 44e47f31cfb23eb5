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

WiggleGPT's earlier MLPs are one setting away: bio_variant='v2' or 'v1' (lineage.py says what they
compute). gelu_params_like='v3'/'v2'/'v1' widens the GELU control's hidden layer to as many parameters
as that bio MLP holds, so that a comparison can tell more parameters from the mechanism.

Seed 003's synaptic mechanisms are one flag each, off by default, with any MLP (synapses.py says what they
compute): use_presynaptic (short-term depression in attention, which then computes its weights itself in
place of fused SDPA; tau_rrp), stochastic_release (its release drawn in training), use_fast_weights (a
Hebbian scratchpad beside the MLP; fast_weight_rank, fast_weight_decay). Their state along a sequence
lives in the KV cache in generation, so cached and recomputed logits agree.

The sparse gate (from WiggleGPT v2, made exact): each hidden neuron has a gate_weight (init 1) and a
gate_bias (init 0); it fires where gate_weight * x + gate_bias > bio_threshold, x being its
pre-activation, and outputs exactly 0 elsewhere. The step has no gradient, so backward uses the
gradient of sigmoid(5 * (voltage - threshold)) in its place. Training reports the share of exact
zeros among gated outputs as `sparsity` in its log lines.

The activation's maths is written once: its forward, and its backward derived by hand. It runs three
ways that compute the same numbers (tested against each other, in float64 with gradcheck, and in
bfloat16/float16 as autocast hands them over):
    plain     the formula as PyTorch ops: the reference, and what torch.compile fuses when the whole
              model is compiled; it keeps five tensors the size of its input for backward
    function  a custom autograd function that keeps only its input for backward and runs the
              hand-derived backward, reducing the per-neuron gradients in float32
    fused     the same function with that maths compiled into one kernel each way (Triton on CUDA,
              C++ on a CPU), compiled once per process on first use (about 4 s on this project's CPU)
OSCILLATION_IMPL = 'auto' uses plain inside a compiled model; fused for training where it compiles
and a call holds at least FUSE_MIN_ELEMENTS (2**17) activations (below that, the time saved takes
thousands of steps to repay the compile); function otherwise: inference, tiny models, or a machine
where torch.compile cannot build a kernel, such as CUDA on Windows without Triton (a one-line note
says so and training carries on). tanh is computed as 2 * sigmoid(2x) - 1, the same function,
because PyTorch's CPU tanh kernel is several times slower than its sigmoid.

With config_gpt2_bio_3070.py the model has 123,697,920 parameters; the GELU control has 110,592
fewer (omega, phi, baseline: 3 x 3072 per layer) and the sparse gate adds 73,728 (2 x 3072 per
layer); tests/test_model.py checks these counts. GPT also has flops_per_token and estimate_mfu
(against a peak FLOP/s from devices.py); its optimizers are built in optimizers.py.
"""

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import lineage  # the earlier bio MLPs (v1, v2); it uses this module's activation in turn
import synapses  # seed 003's synaptic mechanisms: presynaptic depression, fast weights


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms
    use_bio_mlp: bool = False  # oscillating activation instead of GELU
    gelu_tanh: bool = False  # GELU in its tanh approximation, as OpenAI's GPT-2 computes it ('gelu_new')
    use_rmsnorm: bool = False
    use_rope: bool = False  # rotary position embeddings instead of learned ones
    use_positions: bool = True  # False: no positional encoding at all, as the original release's no-op RoPE
    gradient_checkpointing: bool = False
    use_sparse_gate: bool = False  # only with use_bio_mlp, bio_variant v3
    bio_threshold: float = 0.25  # firing threshold of the sparse gate (and of v1/v2's event layer)
    bio_variant: str = 'v3'  # the bio MLP: 'v3' (BioMLP), or the earlier 'v2' and 'v1' (lineage.py)
    bio_compartments: int = 2  # v1: dendritic compartments per MLP
    gelu_params_like: str = ''  # the GELU MLP widened to as many parameters as bio_variant 'v3', 'v2' or 'v1' has
    use_presynaptic: bool = False  # attention with short-term synaptic depression (synapses.py)
    tau_rrp: float = 40.0  # presynaptic: positions over which a drained pool refills (time constant)
    stochastic_release: bool = False  # presynaptic: training draws each release (synapses.py)
    use_fast_weights: bool = False  # a Hebbian fast-weight scratchpad beside the MLP (synapses.py)
    fast_weight_rank: int = 16  # fast weights: keys and values per head
    fast_weight_decay: float = 0.95  # fast weights: what a write keeps per position


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
        else:  # depression changes the attention logits, so they are computed here
            # scaled before the product, as SDPA does, so that float16 logits do not overflow
            scores = ((q / math.sqrt(q.size(-1))) @ k.transpose(-1, -2)).float()
            if T > 1:
                scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float('-inf'))
            att = F.dropout(self.presynaptic(scores, kv_cache).softmax(-1), self.dropout, self.training)
            y = att.to(v.dtype) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


# -----------------------------------------------------------------------------
# the oscillating activation, sin(omega*x + phi) * tanh(x) + baseline, optionally sparse-gated.
# Written as plain ops it keeps several full-size intermediates for backward. Its maths is written
# once, forward (oscillate_forward_math) and backward (oscillate_backward_math, the derivative by
# hand), and run three ways that compute the same numbers:
#   'plain'    the formula as differentiable ops: the reference, and what torch.compile fuses
#              inside a compiled model
#   'function' a custom autograd function that keeps only x and recomputes the rest in backward,
#              running that maths eagerly
#   'fused'    the same function with the maths compiled into one kernel each way (Triton on CUDA,
#              C++ on a CPU); needs a working torch.compile, and falls back to 'function' without one
# 'auto' takes 'plain' inside torch.compile, 'fused' for training where it compiles and the activation
# is large enough to repay compiling, else 'function'.
# Measured on a 2-core CPU (dev/LOG.md, 2026-11-27): for the quick-start model, fused trains 3-4 ms
# per iteration faster than 'function' at the same memory but costs ~4 s to compile at each start;
# whole runs of 400 and 2000 iterations came out level (fusing pays only in longer runs, as real
# ones are). 'plain' was a little faster in those runs but keeps five times the memory. Fusing a
# call (forward + backward) of 2**13 activations saves 0.02 ms, of 2**17 0.44 ms (bench_bio.py
# --part=act, same log), against ~3.5 s of compiling at each start: below FUSE_MIN_ELEMENTS it
# would take more than 8,000 layer-steps to repay, so such small models run unfused.
OSCILLATION_IMPL = 'auto'
FUSE_MIN_ELEMENTS = 2 ** 17


def tanh(x):
    """tanh(x) as 2 sigmoid(2x) - 1: the same function, but PyTorch's CPU tanh kernel (eager and
    compiled) is several times slower than its sigmoid; float32 error stays below 2e-7."""
    return torch.sigmoid(2.0 * x) * 2.0 - 1.0


def oscillate_reference(x, omega, phi, baseline, gate_weight=None, gate_bias=None, threshold=0.0):
    """The activation (and, with gate_weight, the sparse gate) as plain differentiable ops."""
    out = torch.sin(omega * x + phi) * tanh(x) + baseline
    if gate_weight is None:
        return out
    voltage = gate_weight * x + gate_bias - threshold
    fires = (voltage > 0).to(out.dtype)
    surrogate = torch.sigmoid(5.0 * voltage)
    return out * (fires + (surrogate - surrogate.detach()))  # value: fires; gradient: the sigmoid's


def oscillate_forward_math(x, omega, phi, baseline, gate_weight, gate_bias, threshold):
    """The forward values, computed in float32 (float64 for float64 input) and returned in x's dtype;
    under autocast that is the dtype the next Linear casts to anyway. (The reference's
    straight-through term is 0 in value.)"""
    return oscillate_reference(x.to(torch.promote_types(x.dtype, torch.float32)), omega, phi, baseline,
                               gate_weight, gate_bias, threshold).to(x.dtype)


def oscillate_backward_math(x, grad_out, omega, phi, baseline, gate_weight, gate_bias, threshold):
    """The gradients of oscillate_reference from x alone: (x, omega, phi, baseline, gate_weight,
    gate_bias); the per-neuron ones are reduced in float32. Intermediates are updated in place
    (never x or grad_out): run eagerly that saves allocations and passes over memory, and
    torch.compile fuses it all the same. Products keep the grouping of the plain formula, so eager
    and compiled runs round alike."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    g = grad_out.to(xf.dtype)
    n = x.size(-1)
    u = (xf * omega).add_(phi)
    sin_u, tanh_x = torch.sin(u), tanh(xf)
    grad_gate_weight = grad_gate_bias = grad_voltage = None
    if gate_weight is not None:
        voltage = (xf * gate_weight).add_(gate_bias - threshold)
        fires = voltage > 0
        surrogate = voltage.mul_(5.0).sigmoid_()
        # d out / d voltage = activation * 5 s (1 - s), s the surrogate sigmoid
        slope = (surrogate * 5.0).mul_(surrogate.neg_().add_(1.0))
        grad_voltage = (sin_u * tanh_x).add_(baseline).mul_(g).mul_(slope)
        grad_gate_weight = (grad_voltage * xf).reshape(-1, n).sum(0)
        grad_gate_bias = grad_voltage.reshape(-1, n).sum(0)
        g = g * fires  # the gradient reaching the activation: the step's value
    g_cos_tanh = u.cos_().mul_(g).mul_(tanh_x)
    grad_omega = (g_cos_tanh * xf).reshape(-1, n).sum(0)
    grad_phi = g_cos_tanh.reshape(-1, n).sum(0)
    # d out / dx = omega cos(u) tanh(x) + sin(u) (1 - tanh(x)^2)
    grad_x = g_cos_tanh.mul_(omega).add_(sin_u.mul_(g).mul_(tanh_x.mul_(tanh_x).neg_().add_(1.0)))
    if grad_voltage is not None:
        grad_x = grad_x.add_(grad_voltage.mul_(gate_weight))
    return (grad_x.to(x.dtype), grad_omega, grad_phi, g.reshape(-1, n).sum(0), grad_gate_weight, grad_gate_bias)


OSCILLATE_MATH = {'forward': oscillate_forward_math, 'backward': oscillate_backward_math}
fused_kernels = {}  # 'forward'/'backward' -> compiled function, once it has run here; False once fusing failed


def run_math(name, fuse, *args):
    """OSCILLATE_MATH[name](*args), through its compiled kernel if fuse and fusing works here."""
    formula = OSCILLATE_MATH[name]
    if not fuse or fused_kernels.get(name) is False:
        return formula(*args)
    if name in fused_kernels:
        # It has run here: an error now (out of memory, a device fault) is the run's own and surfaces,
        # unless it is torch.compile's. Dynamo recompiles the kernel when its guards fail (a new dtype
        # under autocast, requires_grad differing between frozen and trained blocks), and that can
        # fail as the first compile can (inductor's BackendCompilerFailed is a TorchDynamoException).
        try:
            return fused_kernels[name](*args)
        except Exception as e:
            from torch._dynamo.exc import TorchDynamoException
            from torch._inductor.exc import CppCompileError, InvalidCxxCompiler
            if not isinstance(e, (TorchDynamoException, CppCompileError, InvalidCxxCompiler)):
                raise
            give_up_fusing(e)
            return formula(*args)
    # Whatever fails in making the kernel or in its first call (which compiles it) says that fusing
    # does not work here: torch.compile raises a plain RuntimeError on a Python it does not support,
    # inductor its own errors without a C++ compiler or Triton. Forward and backward are each made
    # at their first call, so each is tried here on its own.
    try:
        kernel = torch.compile(formula, dynamic=True)
        out = kernel(*args)
    except Exception as e:
        give_up_fusing(e)
        return formula(*args)
    fused_kernels[name] = kernel
    return out


def give_up_fusing(error):
    """Fall back to the unfused function for the rest of the run, unless the fused kernel was asked
    for by name; then re-raise the error."""
    if OSCILLATION_IMPL == 'fused':
        raise error
    fused_kernels.update(forward=False, backward=False)
    print(f"note: the fused oscillation kernel does not compile here ({type(error).__name__}: "
          f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}); using the unfused one", file=sys.stderr)


class Oscillate(torch.autograd.Function):
    """oscillate_reference's values and gradients, saving only x (and the per-neuron vectors);
    fuse: run the maths through its compiled kernels."""

    @staticmethod
    def forward(ctx, x, omega, phi, baseline, gate_weight, gate_bias, threshold, fuse):
        ctx.save_for_backward(x, omega, phi, baseline, gate_weight, gate_bias)
        ctx.threshold, ctx.fuse = threshold, fuse
        return run_math('forward', fuse, x, omega, phi, baseline, gate_weight, gate_bias, threshold)

    @staticmethod
    def backward(ctx, grad_out):
        x, *vectors = ctx.saved_tensors  # read once: gradient checkpointing allows no second unpacking
        return *run_math('backward', ctx.fuse, x, grad_out, *vectors, ctx.threshold), None, None


def oscillate(x, omega, phi, baseline, gate_weight=None, gate_bias=None, threshold=0.0):
    """The activation through the implementation OSCILLATION_IMPL selects."""
    impl = OSCILLATION_IMPL
    if impl == 'auto':
        if torch.compiler.is_compiling():
            impl = 'plain'
        elif (torch.is_grad_enabled() and x.requires_grad and x.numel() >= FUSE_MIN_ELEMENTS
              and fused_kernels.get('forward') is not False):
            impl = 'fused'
        else:  # inference (the forward alone gains little from fusing), or too small to repay compiling
            impl = 'function'
    if impl not in ('plain', 'function', 'fused'):
        raise ValueError(f'OSCILLATION_IMPL={impl!r} is not one of auto, plain, function, fused')
    if impl == 'plain':
        return oscillate_reference(x, omega, phi, baseline, gate_weight, gate_bias, threshold)
    return Oscillate.apply(x, omega, phi, baseline, gate_weight, gate_bias, threshold, impl == 'fused')


class OscillatingActivation(nn.Module):
    """sin(omega*x + phi) * tanh(x) + baseline, one omega, phi, baseline per hidden neuron."""

    def __init__(self, n):
        super().__init__()
        self.omega = nn.Parameter(1.0 + 0.1 * torch.randn(n))
        self.phi = nn.Parameter(0.1 * torch.randn(n))
        self.baseline = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return oscillate(x, self.omega, self.phi, self.baseline)


class SparseGate(nn.Module):
    """
    A neuron fires where gate_weight * x + gate_bias > threshold (x its pre-activation); it
    outputs its activation where it fires and exactly 0 elsewhere. The step has no gradient, so
    backward uses that of sigmoid(5 * (voltage - threshold)) in its place (straight-through).
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


def matched_width(config):
    """The GELU MLP's hidden width whose parameters come nearest those of the bio MLP config.gelu_params_like
    names (its c_fc and c_proj hold width * (2 n_embd + bias) + n_embd * bias)."""
    from dataclasses import replace
    with torch.device('meta'):  # counted without allocating (v1 at GPT-2 size is 800M)
        like = lineage.make_mlp(replace(config, use_bio_mlp=True, bio_variant=config.gelu_params_like,
                                        use_sparse_gate=False))
    target = sum(p.numel() for p in like.parameters())
    return max(1, round((target - config.n_embd * config.bias) / (2 * config.n_embd + config.bias)))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = matched_width(config) if config.gelu_params_like else 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.gelu = nn.GELU(approximate='tanh' if config.gelu_tanh else 'none')
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class BioMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.activation = OscillatingActivation(hidden)
        self.sparse_gate = SparseGate(hidden, config.bio_threshold) if config.use_sparse_gate else None
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        a = self.activation(h) if self.sparse_gate is None else self.sparse_gate(h, self.activation)
        return self.dropout(self.c_proj(a))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = lineage.make_mlp(config) if config.use_bio_mlp else MLP(config)
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
        if config.use_sparse_gate and not config.use_bio_mlp:
            raise ValueError('use_sparse_gate=True needs use_bio_mlp=True')
        if config.use_sparse_gate and config.bio_variant != 'v3':
            raise ValueError("use_sparse_gate=True is v3's gate; v1 and v2 have their event layer instead")
        if config.gelu_params_like and config.use_bio_mlp:
            raise ValueError('gelu_params_like widens the GELU MLP: it needs use_bio_mlp=False')
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
        """Forward + backward FLOPs per token: 6 per parameter plus attention's score/value products."""
        cfg = self.config
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def estimate_mfu(self, tokens_per_second, peak_flops):
        """Model FLOPs utilization: achieved FLOP/s over the device's peak (None if the peak is unknown)."""
        if not peak_flops:
            return None
        return self.flops_per_token() * tokens_per_second / peak_flops
