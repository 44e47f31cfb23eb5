"""
WiggleGPT: a GPT language model whose MLP neurons oscillate.

Each hidden neuron of the MLP computes sin(omega*x + phi) * tanh(x) + baseline with its own
learnable omega, phi and baseline, in place of GELU. Everything else is a GPT-2 style decoder:
pre-norm blocks (LayerNorm or RMSNorm), causal self-attention, learned positions or RoPE,
tied input/output embeddings.

Module and parameter names follow the original WiggleGPT release so its checkpoints load by name.
"""

import inspect
import math
import os
import sys
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


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
    use_rmsnorm: bool = False
    use_rope: bool = False  # rotary position embeddings instead of learned ones
    gradient_checkpointing: bool = False
    use_sparse_gate: bool = False  # only with use_bio_mlp
    bio_threshold: float = 0.25  # firing threshold of the sparse gate


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

    def forward(self, x, rope=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class OscillatingActivation(nn.Module):
    """sin(omega*x + phi) * tanh(x) + baseline, one omega, phi, baseline per hidden neuron."""

    def __init__(self, n):
        super().__init__()
        self.omega = nn.Parameter(1.0 + 0.1 * torch.randn(n))
        self.phi = nn.Parameter(0.1 * torch.randn(n))
        self.baseline = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return torch.sin(self.omega * x + self.phi) * torch.tanh(x) + self.baseline


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
        self.register_buffer('zeros_seen', torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer('outputs_seen', torch.zeros((), dtype=torch.int64), persistent=False)

    def forward(self, x, activation):
        voltage = self.gate_weight * x + self.gate_bias - self.threshold
        fires = (voltage > 0).to(activation.dtype)
        surrogate = torch.sigmoid(5.0 * voltage)
        spike = fires + (surrogate - surrogate.detach())  # value: fires; gradient: the sigmoid's
        out = activation * spike
        if self.training:
            self.zeros_seen += (out == 0).sum()
            self.outputs_seen += out.numel()
        return out


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
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
        a = self.activation(h)
        if self.sparse_gate is not None:
            a = self.sparse_gate(h, a)
        return self.dropout(self.c_proj(a))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = BioMLP(config) if config.use_bio_mlp else MLP(config)

    def forward(self, x, rope=None):
        x = x + self.attn(self.ln_1(x), rope)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        if config.use_sparse_gate and not config.use_bio_mlp:
            raise ValueError('use_sparse_gate=True needs use_bio_mlp=True')
        self.config = config
        modules = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        )
        if not config.use_rope:
            modules['wpe'] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        if config.use_rope:
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
        if non_embedding and not self.config.use_rope:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def forward(self, idx, targets=None):
        B, T = idx.size()
        assert T <= self.config.block_size, f'sequence of {T} tokens, block_size is {self.config.block_size}'
        x = self.transformer.wte(idx)
        rope = None
        if self.config.use_rope:
            rope = (self.rope_cos[:T], self.rope_sin[:T])
        else:
            x = x + self.transformer.wpe(torch.arange(T, device=idx.device))
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            if self.config.gradient_checkpointing and self.training:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # only the last position is needed to sample
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def sparse_gates(self):
        return [m for m in self.modules() if isinstance(m, SparseGate)]

    def read_sparsity(self):
        """Share of exact zeros among gated outputs since the last read (None without gates)."""
        gates = self.sparse_gates()
        if not gates:
            return None
        zeros = sum(g.zeros_seen for g in gates)
        total = sum(g.outputs_seen for g in gates)
        for g in gates:
            g.zeros_seen.zero_()
            g.outputs_seen.zero_()
        total = total.item()
        return zeros.item() / total if total else None

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # matrices (Linear and embedding weights) decay; vectors (norms, biases, omega/phi/baseline, gates) do not
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{'params': decay, 'weight_decay': weight_decay},
                  {'params': no_decay, 'weight_decay': 0.0}]
        fused = device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters
        extra = {'fused': True} if fused else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)

    def flops_per_token(self):
        """Forward + backward FLOPs per token: 6 per parameter plus attention's score/value products."""
        cfg = self.config
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def estimate_mfu(self, tokens_per_second, peak_flops):
        """Model FLOPs utilization: achieved FLOP/s over the device's peak (None if the peak is unknown)."""
        if not peak_flops:
            return None
        return self.flops_per_token() * tokens_per_second / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 is greedy."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]
            logits, _ = self(context)
            logits = logits[:, -1, :]
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float('-inf'))
                next_token = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, next_token), dim=1)
        return idx


# dense bf16/fp16 tensor-core peak FLOP/s (fp32 accumulate), matched against the CUDA device name
GPU_PEAK_FLOPS = {
    'H200': 989e12,
    'H100 PCIe': 756e12,
    'H100': 989e12,
    'A100': 312e12,
    'L4': 121e12,
    'V100': 125e12,
    'T4': 65e12,
    'RTX 4090': 165.2e12,
    'RTX 4080': 97.5e12,
    'RTX 3090': 71e12,
    'RTX 3080': 59.5e12,
    'RTX 3070': 40.6e12,
}


def device_peak_flops(device, override=0.0):
    """The device's peak FLOP/s for MFU: the override if given, else the table; None when unknown (CPU)."""
    if override:
        return override
    if not str(device).startswith('cuda') or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for key, flops in GPU_PEAK_FLOPS.items():  # more specific keys come first
        if key in name:
            return flops
    return None


def save_checkpoint(checkpoint, path):
    """torch.save through a temp file and a rename, so a crash mid-save leaves the old file whole."""
    tmp_path = path + '.tmp'
    with open(tmp_path, 'wb') as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, path)


def load_model(ckpt_path, device):
    """Build the model a checkpoint describes and load its weights; returns (model, checkpoint dict).

    User mistakes (missing or foreign file) exit with a one-line message.
    """
    if not os.path.isfile(ckpt_path):
        sys.exit(f'error: no checkpoint at {ckpt_path} (train one with train_bio.py, or pass its path)')
    try:
        checkpoint = torch.load(ckpt_path, map_location=device, weights_only=True)
    except Exception as e:
        sys.exit(f'error: {ckpt_path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})')
    if not isinstance(checkpoint, dict) or 'model' not in checkpoint or 'model_args' not in checkpoint:
        sys.exit(f'error: {ckpt_path} is not a WiggleGPT checkpoint (it has no model / model_args)')
    known = {f.name for f in fields(GPTConfig)}
    config = GPTConfig(**{k: v for k, v in checkpoint['model_args'].items() if k in known})
    model = GPT(config)
    prefix = '_orig_mod.'  # torch.compile's wrapper adds it to every key
    state_dict = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in checkpoint['model'].items()}
    # a causal-mask buffer some attention modules saved; attention here needs none
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith('.attn.bias')}
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        sys.exit(f'error: {ckpt_path} does not match the model its model_args describe: {str(e).splitlines()[1].strip()}')
    model.to(device)
    return model, checkpoint
