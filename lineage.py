"""
WiggleGPT's earlier MLPs, as their code computed them, so that each step of the lineage can be run and
measured: GPTConfig.bio_variant = 'v2' or 'v1' (with mlp='bio'; 'v3', model_bio.BioMLP, is the
default, and model_bio.bio_mlp picks among them). With E = n_embd inputs and H = 4E hidden neurons:

v2 (seed 002; the original release's WiggleGPT-V2-OLD): c_fc (E -> H), the oscillating activation,
then the event layer, then c_proj (H -> E). The event layer gates its input x with a full H x H
matrix: voltage = sigmoid(gate(x)), spike = sigmoid(5 (voltage - bio_threshold)), and returns the
oscillating activation (its own omega, phi, baseline) of transform(x * spike), transform being
another H x H matrix. The spike is soft, so nothing is exactly silent; `sparsity` in training's log
lines is the share of voltages at or below the threshold.

v1 (seed 000): dendritic compartments in place of c_fc, then v2's oscillation and event layer. The E
inputs are cut into bio_compartments = K slices of ceil(E/K) (the last zero-padded to that size; a K that
would leave a slice of padding alone is refused); each slice
has its own branch, Linear(E/K -> H) then tanh; a K x K lateral matrix (initialised 0.5 I + 0.1 N(0,1))
mixes the K branch outputs; the soma, Linear(2 K H -> H), takes the branches' outputs and the mixed
ones side by side. The H x H matrices are what made these models large: with 4 layers, 6 heads,
E = 384, vocab 50304 and no biases, v2 has 45,309,312 parameters without the position embedding (seed
002's "45.31M") and v1 with K = 2 has 83,058,064 (seed 000 quotes 89M, which that construction does
not give); at GPT-2's size, about 350M and 803M (tests/test_model.py pins them).

Both compute each token alone, as v3 does: no state runs along the sequence, so the KV cache,
resuming and DDP work for them unchanged. Their layers take explicit widths, so analysis/toy_tasks.py
builds small MLPs of them too.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from oscillation import OscillatingActivation


class EventLayer(nn.Module):
    """v2's event layer on width neurons: the oscillation of transform(x * spike), spike a soft threshold
    of sigmoid(gate(x)). Counts the voltages at or below threshold while training (GPT.read_sparsity)."""

    def __init__(self, width, threshold, bias):
        super().__init__()
        self.threshold = threshold
        self.gate = nn.Linear(width, width, bias=bias)
        self.transform = nn.Linear(width, width, bias=bias)
        self.activation = OscillatingActivation(width)
        self.register_buffer('silent_seen', torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer('outputs_seen', torch.zeros((), dtype=torch.int64), persistent=False)

    def forward(self, x):
        voltage = torch.sigmoid(self.gate(x))
        spike = torch.sigmoid(5.0 * (voltage - self.threshold))
        if self.training:
            self.silent_seen += (voltage <= self.threshold).sum()
            self.outputs_seen += voltage.numel()
        return self.activation(self.transform(x * spike))


class Dendrites(nn.Module):
    """v1's dendritic compartments: n_in inputs in `compartments` slices, a branch (Linear, tanh) each,
    mixed by a lateral matrix; the soma takes branch and mixed outputs together to width neurons."""

    def __init__(self, n_in, width, compartments, bias):
        super().__init__()
        self.slice_size = math.ceil(n_in / compartments)
        self.padding = self.slice_size * compartments - n_in  # zeros after the last input
        self.branches = nn.ModuleList(nn.Linear(self.slice_size, width, bias=bias) for _ in range(compartments))
        self.lateral = nn.Parameter(0.5 * torch.eye(compartments) + 0.1 * torch.randn(compartments, compartments))
        self.soma = nn.Linear(2 * compartments * width, width, bias=bias)

    def forward(self, x):
        slices = F.pad(x, (0, self.padding)).split(self.slice_size, dim=-1)
        branch = torch.stack([torch.tanh(b(s)) for b, s in zip(self.branches, slices)], dim=-2)  # (..., K, width)
        mixed = torch.einsum('kj,...jw->...kw', self.lateral, branch)
        return self.soma(torch.cat((branch.flatten(-2), mixed.flatten(-2)), dim=-1))


class V2MLP(nn.Module):
    """c_fc, the oscillation, the event layer, c_proj (and dropout): v2's MLP, n_in -> hidden -> n_out."""

    def __init__(self, n_in, hidden, n_out, threshold, bias, dropout=0.0):
        super().__init__()
        self.c_fc = nn.Linear(n_in, hidden, bias=bias)
        self.activation = OscillatingActivation(hidden)
        self.event = EventLayer(hidden, threshold, bias)
        self.c_proj = nn.Linear(hidden, n_out, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.event(self.activation(self.c_fc(x)))))


class V1MLP(nn.Module):
    """The dendrites, the oscillation, the event layer, c_proj (and dropout): v1's MLP."""

    def __init__(self, n_in, hidden, n_out, compartments, threshold, bias, dropout=0.0):
        super().__init__()
        self.dendrites = Dendrites(n_in, hidden, compartments, bias)
        self.activation = OscillatingActivation(hidden)
        self.event = EventLayer(hidden, threshold, bias)
        self.c_proj = nn.Linear(hidden, n_out, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.event(self.activation(self.dendrites(x)))))


def make_mlp(config):
    """The MLP of config.bio_variant, 'v2' or 'v1', for a GPT block."""
    hidden = 4 * config.n_embd
    if config.bio_variant == 'v2':
        return V2MLP(config.n_embd, hidden, config.n_embd, config.bio_threshold, config.bias, config.dropout)
    if config.bio_variant == 'v1':
        return V1MLP(config.n_embd, hidden, config.n_embd, config.bio_compartments, config.bio_threshold,
                     config.bias, config.dropout)
    raise ValueError(f"bio_variant={config.bio_variant!r}: lineage.py holds 'v2' and 'v1'")
