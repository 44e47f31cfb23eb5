"""
Seed 003's structural plasticity, soundly: the MLP as a mixture of experts that grows and prunes itself
(GPTConfig.use_moe=True).

The layer. moe_max_experts slots are allocated, each an MLP of the model's kind (make_expert) with
1/moe_top_k of the dense MLP's hidden width, so that at the start a token meets as many MLP parameters
as in the dense model (exactly where top_k divides the width; the router's n_embd x slots weights
come on top); moe_experts of them are active, the rest wait (never routed, never trained) for a split.
Each token is computed alone: the router's scores s_e = w_e . x choose its experts, the gates weigh
them, and no token is dropped (no capacity), so the KV cache, resuming and DDP see an MLP like any other.

    units:  the experts are grouped in units (each its own at the start; a split's halves share one);
            a unit's score is its experts' highest
    chosen: every expert of the top_k units by score
    gates:  softmax of s_e + b_e over the chosen (b: a per-expert gate bias, in the gates only)
    out:    sum over the chosen of gate_e * expert_e(x)

Balance: the Switch Transformer's auxiliary loss, moe_balance * n * sum_e f_e * P_e per layer (n active
experts, f_e the share of the gates that went to e, P_e the mean softmax probability of e), added to the
training loss; it is smallest when the load is even.

Energy and health, per expert and iteration (from the gates of the whole iteration, summed over its
micro-steps and, under DDP, over processes, so that every process decides alike):

    load_e   = n * (gates of e) / (all gates)              1 where the load is even
    energy_e = energy_e + moe_tax * (load_e - 1)           income for being chosen, a fixed tax
    health_e = moe_health_decay * health_e + (1 - moe_health_decay) * load_e

Every moe_change_every iterations each layer may change once: its healthiest expert splits if its
health is at least moe_split_health, its energy at least moe_split_energy and a slot is free (below
moe_max_experts); else its poorest expert is merged away if its energy is below 0 and more than
moe_min_experts are active. The last moe_change_every iterations of the learning-rate schedule (up to
lr_decay_iters) change nothing, so that training has that long to recover from the last change (a merge at
a run's last iteration cost one run 0.10 of val loss); a run stopped and resumed decides alike.

Split (the model's function unchanged at that instant, and moved by training alone after it): the
free slot gets a copy of the parent's weights and router row and joins the parent's unit, so the pair
is chosen wherever the parent was, and stays chosen together as their router rows grow apart (a unit's
score is its best member's: no token loses one half when they part); both gate biases are lowered by
log 2, so that the pair's gates add up to the parent's; the output matrices are perturbed symmetrically
(c_proj + D and c_proj - D), so that the pair's output is the parent's while their gradients differ and
they specialize. A token therefore meets more experts as its units grow: top_k units, not top_k
experts (FLOPs are counted so). The optimizer's state is copied for the child; the parent's and
child's energy are half the parent's.

Merge: the expert is removed (its slot goes inactive, its optimizer state is dropped); the change of
the model's output is measured by the caller and logged.
"""

import math

import torch
import torch.distributed as dist
import torch.nn as nn

START_ENERGY = 1.0  # each expert's at the start; moe_tax sets how fast it moves


def choose(scores, k):
    """A bool mask of the chosen units per row of scores (-inf for units without an active expert): those
    whose score is among the k largest distinct values of the row (all of them where there are fewer)."""
    threshold = scores.max(dim=-1, keepdim=True).values
    for _ in range(k - 1):
        below = scores.masked_fill(scores >= threshold, float('-inf')).max(dim=-1, keepdim=True).values
        threshold = torch.where(below > float('-inf'), below, threshold)  # fewer distinct values than k: all
    return scores >= threshold


class MoE(nn.Module):
    """moe_max_experts experts (make_expert() each) behind a top-k router; see the module's docstring."""

    def __init__(self, config, make_expert):
        super().__init__()
        slots = config.moe_max_experts
        self.top_k, self.balance, self.min_experts = config.moe_top_k, config.moe_balance, config.moe_min_experts
        self.experts = nn.ModuleList(make_expert() for _ in range(slots))
        # one row per expert, each its own parameter, so that an optimizer's state (of any layout) follows it
        self.router = nn.ParameterList(nn.Parameter(torch.randn(config.n_embd) * 0.02) for _ in range(slots))
        self.gate_bias = nn.ParameterList(nn.Parameter(torch.zeros(())) for _ in range(slots))
        self.register_buffer('active', torch.arange(slots) < config.moe_experts)
        self.register_buffer('unit', torch.arange(slots))  # each expert's unit, named by its first expert's slot
        self.register_buffer('energy', torch.full((slots,), START_ENERGY))
        self.register_buffer('health', torch.ones(slots))
        self.register_buffer('routed', torch.zeros(slots), persistent=False)  # gates since the last account
        self.register_buffer('load', torch.zeros(slots), persistent=False)  # of the last iteration accounted
        self.aux_loss = None

    def forward(self, x):
        flat = x.reshape(-1, x.size(-1))
        exact = torch.promote_types(flat.dtype, torch.float32)  # routing in float32 at least, float64 in float64
        with torch.autocast(flat.device.type, enabled=False):  # bf16 scores would tie distinct experts
            scores = flat.to(exact) @ torch.stack(list(self.router)).to(exact).t()
        scores = scores.masked_fill(~self.active, float('-inf'))
        units = torch.full_like(scores, float('-inf')).scatter_reduce(1, self.unit.expand_as(scores), scores, 'amax')
        chosen = choose(units, self.top_k)[:, self.unit] & self.active
        bias = torch.stack(list(self.gate_bias)).to(exact)
        gates = torch.softmax((scores + bias).masked_fill(~chosen, float('-inf')), dim=-1)
        out = torch.zeros_like(flat)
        unused = []
        for e, expert in enumerate(self.experts):
            rows = chosen[:, e].nonzero(as_tuple=True)[0]
            if rows.numel():
                out.index_add_(0, rows, (gates[rows, e, None] * expert(flat[rows]).to(exact)).to(out.dtype))
            else:
                unused.append(expert)
        if unused and torch.is_grad_enabled():
            # a zero that uses every weight: DDP's reduction then finds a gradient (of 0) for each, routed or not
            out = out + 0.0 * sum(p.reshape(-1)[0] for expert in unused for p in expert.parameters())
        if self.training:  # the balance term; the gates count toward the loads only where training steps
            if torch.is_grad_enabled():
                with torch.no_grad():
                    self.routed += gates.sum(0)
            n = self.active.sum()
            share = gates.detach().mean(0)
            probability = torch.softmax(scores, dim=-1).mean(0)
            self.aux_loss = self.balance * n * (share * probability).sum()
        return out.reshape(x.shape)

    @torch.no_grad()
    def settle_accounts(self, tax, health_decay):
        """The iteration's energy and health from the gates summed since the last call (all-reduced by the
        caller under DDP)."""
        n = self.active.sum()
        load = n * self.routed / self.routed.sum().clamp(min=1e-12)
        self.load.copy_(load)
        self.energy += torch.where(self.active, tax * (load - 1), 0.0)
        self.health.copy_(torch.where(self.active, health_decay * self.health + (1 - health_decay) * load, 0.0))
        self.routed.zero_()

    def active_params_per_token(self):
        """The parameters a token meets: top_k units' experts (the mean unit's), the active router rows and gate biases."""
        n = int(self.active.sum())
        units = len(set(self.unit[self.active].tolist()))
        expert = sum(p.numel() for p in self.experts[0].parameters())
        return round(self.top_k * n / units * expert) + n * (self.router[0].numel() + 1)

    @torch.no_grad()
    def drop_inactive_grads(self):
        """No gradient for the slots not in use (their zero gradients exist for DDP's sake): the optimizers then
        leave them alone, with no state and no weight decay."""
        for e in (~self.active).nonzero(as_tuple=True)[0].tolist():
            for p in (*self.experts[e].parameters(), self.router[e], self.gate_bias[e]):
                p.grad = None

    def free_slot(self):
        inactive = (~self.active).nonzero(as_tuple=True)[0]
        return int(inactive[0]) if inactive.numel() else None

    @torch.no_grad()
    def split(self, parent, optimizers, generator, noise=1e-2):
        """Clone expert parent into the first free slot (see the module's docstring); returns the child's slot.
        optimizers: the optimizers holding this layer's parameters (their state is copied for the child);
        generator draws the perturbation, so that every process draws the same."""
        child = self.free_slot()
        pairs = list(zip(self.experts[parent].parameters(), self.experts[child].parameters()))
        pairs += [(self.router[parent], self.router[child]), (self.gate_bias[parent], self.gate_bias[child])]
        for p, c in pairs:
            c.copy_(p)
        self.gate_bias[parent].sub_(math.log(2))
        self.gate_bias[child].copy_(self.gate_bias[parent])
        out_weight = self.experts[parent].c_proj.weight
        d = torch.randn(out_weight.shape, generator=generator, device='cpu').to(out_weight) * noise * out_weight.std()
        self.experts[parent].c_proj.weight.add_(d)
        self.experts[child].c_proj.weight.sub_(d)
        for optimizer in optimizers:
            for p, c in pairs:
                if p in optimizer.state:
                    optimizer.state[c] = copy_state(optimizer.state[p])
        self.active[child] = True
        self.unit[child] = self.unit[parent]
        self.energy[parent] /= 2
        self.energy[child] = self.energy[parent]
        self.health[child] = self.health[parent]
        return child

    @torch.no_grad()
    def merge(self, expert, optimizers):
        """Remove expert (its slot inactive, its optimizer state dropped)."""
        self.active[expert] = False
        params = [*self.experts[expert].parameters(), self.router[expert], self.gate_bias[expert]]
        for optimizer in optimizers:
            for p in params:
                optimizer.state.pop(p, None)


def copy_state(state):
    """An optimizer's per-parameter state, its tensors cloned (whatever the optimizer keeps: moments, steps,
    quantized blocks)."""
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}


def keep_accounts(model, optimizers, iter_num, settings, measure, seed, ddp):
    """After iteration iter_num's step: every MoE layer's energy and health (the gates all-reduced under
    DDP), and every settings['moe_change_every'] iterations each layer's split or merge (not in frozen
    layers). measure() is the model's loss on the iteration's last batch, read before and after a merge.
    Returns the events, a dict each."""
    layers = [(i, block.mlp) for i, block in enumerate(model.transformer.h) if isinstance(block.mlp, MoE)]
    if ddp:
        counts = torch.stack([layer.routed for _, layer in layers])
        dist.all_reduce(counts)
        for (_, layer), count in zip(layers, counts):
            layer.routed.copy_(count)
    for _, layer in layers:
        layer.settle_accounts(settings['moe_tax'], settings['moe_health_decay'])
    if iter_num % settings['moe_change_every'] or iter_num > settings['lr_decay_iters'] - settings['moe_change_every']:
        return []
    events = []
    for i, layer in layers:
        if not layer.router[0].requires_grad:  # freeze_layers: the block keeps its weights and its experts
            continue
        active = layer.active.nonzero(as_tuple=True)[0]
        healthiest = int(active[layer.health[active].argmax()])
        poorest = int(active[layer.energy[active].argmin()])
        if (layer.free_slot() is not None and layer.health[healthiest] >= settings['moe_split_health']
                and layer.energy[healthiest] >= settings['moe_split_energy']):
            record = {'event': 'split', 'layer': i, 'expert': healthiest, 'health': layer.health[healthiest].item(),
                      'energy': layer.energy[healthiest].item()}
            generator = torch.Generator().manual_seed(seed * 100003 + iter_num * 101 + i)  # alike on every process
            record['child'] = layer.split(healthiest, optimizers, generator)
        elif len(active) > layer.min_experts and layer.energy[poorest] < 0:
            record = {'event': 'merge', 'layer': i, 'expert': poorest, 'health': layer.health[poorest].item(),
                      'energy': layer.energy[poorest].item()}
            before = measure()
            layer.merge(poorest, optimizers)
            record['loss_change'] = measure() - before
        else:
            continue
        events.append({'iter': iter_num, **record, 'experts': int(layer.active.sum())})
    if ddp:  # the same counts give the same decisions; checked, as processes that disagree would train apart
        active = torch.cat([layer.active.float() for _, layer in layers])
        total = active.clone()
        dist.all_reduce(total)
        if not torch.equal(total, active * dist.get_world_size()):
            raise RuntimeError(f'the processes disagree on the experts after iteration {iter_num}')
    return events


def state_of(model):
    """Each MoE layer's experts now, for the log: their slots, units, last load, energy and health."""
    layers = []
    for block in model.transformer.h:
        if isinstance(block.mlp, MoE):
            slots = block.mlp.active.nonzero(as_tuple=True)[0]
            layers.append({'slots': slots.tolist(), 'units': block.mlp.unit[slots].tolist(), **{k: [round(v, 4) for v in getattr(block.mlp, k)[slots].tolist()]
                                                      for k in ('load', 'energy', 'health')}})
    return layers
