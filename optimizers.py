"""
The optimizers a run can train with and its learning-rate schedule (train_bio.py's `optimizer` and
`lr_schedule` settings; bench_bio.py --part=optim compares the optimizers' speed and memory).

    adamw      AdamW (the default). Matrices decay, vectors do not; one fused kernel on CUDA.
    muon       torch.optim.Muon for the 2-D weight matrices inside the blocks (attention and MLP), AdamW for
               the rest (embeddings/lm_head and every vector: norms, biases, omega/phi/baseline, gates).
               Muon's step is scaled to AdamW's update size (adjust_lr_fn='match_rms_adamw'), so
               muon_learning_rate lives on AdamW's scale (0: the same as learning_rate); muon_momentum
               is its momentum.
    adafactor  torch.optim.Adafactor: factored second moments, no first moment. Its learning_rate is a step
               relative to each weight's size (PyTorch suggests 1e-2); beta1/beta2 are not used.
    lion       Lion (pip install lion-pytorch): the sign of a momentum, one state tensor. Its authors suggest
               a learning_rate 3-10x lower and a weight_decay 3-10x higher than AdamW's; betas are beta1/beta2.
    adamw8bit  bitsandbytes' 8-bit AdamW (pip install bitsandbytes): AdamW's two moments in 8 bits, blockwise
               quantized; runs without torch.compile or Triton, on Windows too (torchao's needs both).

Schedules (the learning rate at iteration it; every group follows it in proportion to its own rate):
    cosine     linear warmup over warmup_iters, then a cosine down to min_lr at lr_decay_iters
    wsd        linear warmup, constant, then linear decay to min_lr over the last decay_frac of
               lr_decay_iters (warmup-stable-decay)
    constant   linear warmup, then learning_rate
"""

import importlib
import logging
import math

import torch

OPTIMIZERS = ('adamw', 'muon', 'adafactor', 'lion', 'adamw8bit')
SCHEDULES = ('cosine', 'wsd', 'constant')
# the optional packages: optimizer -> (module, what to install)
OPTIONAL = {'lion': ('lion_pytorch', 'lion-pytorch'), 'adamw8bit': ('bitsandbytes', 'bitsandbytes')}


def block_matrices(model):
    """The trainable 2-D weights inside the blocks (attention and MLP projections): what Muon optimizes."""
    return [p for name, p in model.named_parameters() if p.requires_grad and p.dim() == 2
            and name.startswith('transformer.h.')]


def import_optional(optimizer):
    """The optional package an optimizer needs, or ImportError with the line that says how to install it."""
    module, package = OPTIONAL[optimizer]
    # bitsandbytes warns at import, on some CPUs, about a 4-bit matmul kernel its optimizers do not use
    logging.getLogger('bitsandbytes.backends.cpu.ops').setLevel(logging.ERROR)
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f'optimizer={optimizer} needs the {package} package: pip install {package} '
                          '(or choose another optimizer)') from None


def build_optimizers(model, optimizer, learning_rate, weight_decay, beta1, beta2, muon_learning_rate,
                     muon_momentum, device_type):
    """The optimizers (a list: muon is two; empty if nothing trains) over the model's trainable
    parameters, one of OPTIMIZERS. Matrices get weight_decay, vectors none; muon_learning_rate=0 means
    learning_rate. Raises ImportError, with what to install, for a missing optional package."""
    trainable = [p for p in model.parameters() if p.requires_grad]  # in the model's order, as checkpoints hold it
    if not trainable:
        return []
    built = []
    if optimizer == 'muon':
        if not hasattr(torch.optim, 'Muon'):
            raise ImportError(f'optimizer=muon needs PyTorch 2.9 or later (this is {torch.__version__}): '
                              'pip install -U torch, or choose another optimizer')
        muon_params = block_matrices(model)
        if muon_params:
            built.append(torch.optim.Muon(muon_params, lr=muon_learning_rate or learning_rate, weight_decay=weight_decay,
                                          momentum=muon_momentum, adjust_lr_fn='match_rms_adamw'))
        muon_ids = {id(p) for p in muon_params}
        trainable = [p for p in trainable if id(p) not in muon_ids]
    groups = [{'params': [p for p in trainable if p.dim() >= 2], 'weight_decay': weight_decay},
              {'params': [p for p in trainable if p.dim() < 2], 'weight_decay': 0.0}]
    if optimizer in ('adamw', 'muon'):
        fused = {'fused': True} if device_type == 'cuda' else {}  # one kernel for all parameters on CUDA
        built.append(torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2), **fused))
    elif optimizer == 'adafactor':
        built.append(torch.optim.Adafactor(groups, lr=learning_rate))
    elif optimizer == 'lion':
        built.append(import_optional('lion').Lion(groups, lr=learning_rate, betas=(beta1, beta2)))
    else:
        built.append(import_optional('adamw8bit').optim.AdamW8bit(groups, lr=learning_rate, betas=(beta1, beta2)))
    return built


def optimizer_state(optimizers):
    """What a checkpoint holds: one optimizer's state dict as ever, a list of them for several (muon)."""
    states = [opt.state_dict() for opt in optimizers]
    return states[0] if len(states) == 1 else states


def load_optimizer_state(optimizers, saved):
    """Load a checkpoint's optimizer state with the hyperparameters the optimizers were built with (a
    resumed run takes its new settings, and a run moved to CUDA its fused kernel, which wants its step
    counts on the GPU: PyTorch places them by the loaded groups). Raises ValueError if the state is
    for other parameters."""
    saved = saved if isinstance(saved, list) else [saved]
    if len(saved) != len(optimizers) or any(len(s['param_groups']) != len(o.param_groups) for s, o in zip(saved, optimizers)):
        raise ValueError('the checkpoint holds the state of other optimizers or parameter groups than this run has')
    for opt, state in zip(optimizers, saved):
        groups = [{**saved_group, **{k: v for k, v in group.items() if k != 'params'}}
                  for saved_group, group in zip(state['param_groups'], opt.param_groups)]
        opt.load_state_dict({**state, 'param_groups': groups})


def state_megabytes(optimizers):
    """The size of the optimizers' state, MB. Optimizers create their state at the first step, so an
    empty one is measured by a step of zero learning rate on zero gradients (which changes no weight),
    and then emptied again."""
    if any(opt.state for opt in optimizers):
        return state_bytes(optimizers) / 1e6
    params = [p for opt in optimizers for group in opt.param_groups for p in group['params']]
    rates = [[group['lr'] for group in opt.param_groups] for opt in optimizers]
    for p in params:
        p.grad = torch.zeros_like(p)
    for opt in optimizers:
        for group in opt.param_groups:
            group['lr'] = 0.0
        opt.step()
    size = state_bytes(optimizers)
    for opt, lrs in zip(optimizers, rates):
        opt.state.clear()
        for group, lr in zip(opt.param_groups, lrs):
            group['lr'] = lr
    for p in params:
        p.grad = None
    return size / 1e6


def describe(optimizers):
    """e.g. 'Muon on 8 tensors (0.26M weights) + AdamW on 27 tensors (0.01M weights)'."""
    parts = []
    for opt in optimizers:
        params = [p for group in opt.param_groups for p in group['params']]
        parts.append(f'{type(opt).__name__} on {len(params)} tensors ({sum(p.numel() for p in params) / 1e6:.2f}M weights)')
    return ' + '.join(parts)


def state_bytes(optimizers):
    """Bytes of the tensors in the optimizers' state, each storage once (bitsandbytes shares its
    quantization maps), nested dicts included."""
    storages = {}

    def visit(value):
        if isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif torch.is_tensor(value):
            storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    for opt in optimizers:
        for state in opt.state.values():
            visit(state)
    return sum(storages.values())


def scheduled_lr(it, schedule, learning_rate, min_lr, warmup_iters, lr_decay_iters, decay_frac):
    """The learning rate at iteration it (see the module's docstring for each schedule)."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if schedule == 'constant':
        return learning_rate
    if it >= lr_decay_iters:
        return min_lr
    if schedule == 'cosine':
        progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)
    decay_start = max(warmup_iters, lr_decay_iters - decay_frac * lr_decay_iters)
    if it < decay_start:
        return learning_rate
    return learning_rate + (min_lr - learning_rate) * (it - decay_start) / (lr_decay_iters - decay_start)
