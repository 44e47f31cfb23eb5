"""
Pretrain WiggleGPT (and, with task='finetune', fine-tune it on conversations: finetune_native.py). One process:
    python train_bio.py config_shakespeare_char_cpu.py
Several GPUs (or CPU processes with --backend=gloo) through DDP:
    torchrun --standalone --nproc_per_node=4 train_bio.py config_gpt2_bio_3070.py
Any setting below can be overridden with --key=value after the config file.
"""

import inspect
import json
import math
import os
import pickle
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model_bio import GPT, GPTConfig, autocast_for, device_peak_flops, load_model, pick_device, save_checkpoint

# -----------------------------------------------------------------------------
# defaults: the 124M WiggleGPT on OpenWebText
out_dir = 'out'
init_from = 'scratch'  # 'scratch', 'resume' (from out_dir/ckpt.pt), or a checkpoint path to start a new run from its weights
task = 'pretrain'  # 'pretrain': token streams; 'finetune': whole conversations, loss on the assistant's tokens only
eval_interval = 2000
eval_iters = 200
log_interval = 10
eval_only = False
wandb_log = False
wandb_project = 'wigglegpt'
wandb_run_name = 'run'
# data
dataset = 'openwebtext'
gradient_accumulation_steps = 40  # total over all processes
batch_size = 12
block_size = 1024
# model
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False
use_bio_mlp = True
use_rmsnorm = True
use_rope = True
use_positions = True  # False trains with no positional encoding (NoPE)
use_sparse_gate = False
bio_threshold = 0.25
gradient_checkpointing = False
freeze_layers = 0  # fine-tuning: the first N blocks keep their weights
freeze_embeddings = False  # also keep the token (and position) embeddings; wte is tied to lm_head, so it stays too
eval_conversations = 0  # fine-tuning: evaluate on the first N conversations of each split (0: the whole val split)
# AdamW
learning_rate = 6e-4
max_iters = 600000
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 disables
# learning rate schedule: linear warmup, then cosine down to min_lr at lr_decay_iters
decay_lr = True
warmup_iters = 2000
lr_decay_iters = 600000
min_lr = 6e-5
# system
backend = 'nccl'  # DDP backend: 'nccl' for GPUs, 'gloo' for CPU
device = 'auto'  # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto' (bfloat16 where supported, else float16 on CUDA, float32 elsewhere), 'float32', 'bfloat16', 'float16'
compile = False  # torch.compile needs Triton, which Windows lacks
peak_flops = 0.0  # the device's peak FLOP/s for MFU; 0 looks it up by GPU name
seed = 1337
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
from configurator import configure  # noqa: E402

config = configure({k: globals()[k] for k in config_keys}, sys.argv[1:])
globals().update(config)
# -----------------------------------------------------------------------------


def fail(message):
    if int(os.environ.get('RANK', 0)) == 0:  # under DDP every process stops, one says why
        print(f'error: {message}', file=sys.stderr)
    sys.exit(1)


# the data first: a missing dataset is the likeliest mistake, and the cheapest to report
data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset)
if task not in ('pretrain', 'finetune'):
    fail(f"task={task!r} is not 'pretrain' or 'finetune'")
data_files = ['.bin'] if task == 'pretrain' else ['.bin', '_mask.bin', '_offsets.npy']
for split in ('train', 'val'):
    for suffix in data_files:
        if not os.path.isfile(os.path.join(data_dir, split + suffix)):
            fail(f'{data_dir}/{split}{suffix} not found; prepare the data first: python data/{dataset}/prepare.py')

# DDP: torchrun sets RANK; each process gets one device and a share of the gradient accumulation
ddp = int(os.environ.get('RANK', -1)) != -1
rank, local_rank, world_size = 0, 0, 1
if ddp:
    rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    if gradient_accumulation_steps % world_size:
        fail(f'gradient_accumulation_steps={gradient_accumulation_steps} must divide among {world_size} processes')
    gradient_accumulation_steps //= world_size
master = rank == 0

device = pick_device(device)
if ddp and device == 'cuda':
    device = f'cuda:{local_rank}'
device_type = device.split(':')[0]
if device_type == 'cuda':
    if not torch.cuda.is_available():
        fail(f'device={device} but CUDA is not available (use --device=cpu)')
    torch.cuda.set_device(device)
if ddp:
    if backend == 'nccl' and device_type != 'cuda':
        fail(f"backend=nccl needs CUDA devices; with device={device} use --backend=gloo")
    dist.init_process_group(backend=backend)
try:
    dtype, autocast = autocast_for(device_type, dtype)
except ValueError as e:
    fail(str(e))
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

if master:
    os.makedirs(out_dir, exist_ok=True)

# -----------------------------------------------------------------------------
# data: token memmaps written by data/<dataset>/prepare.py
if task == 'pretrain':
    for split in ('train', 'val'):
        if len(np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')) <= block_size:
            fail(f'data/{dataset}/{split}.bin holds no more than block_size={block_size} tokens; prepare more data or lower block_size')
else:
    conversation_starts = {split: np.load(os.path.join(data_dir, f'{split}_offsets.npy')) for split in ('train', 'val')}
    for split, starts in conversation_starts.items():
        if len(starts) == 0:
            fail(f'data/{dataset}/{split} holds no conversations; prepare more data')


def to_device(x, y):
    if device_type == 'cuda':
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def get_batch(split, generator):
    """A random training batch: inputs x and next-token targets y, (batch_size, block_size) each."""
    if task == 'finetune':
        indices = torch.randint(len(conversation_starts[split]), (batch_size,), generator=generator).tolist()
        return conversation_batch(split, indices)
    # windows of the token stream; a fresh memmap per batch: numpy's otherwise keeps growing resident memory
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
    x = torch.from_numpy(np.stack([data[i:i + block_size].astype(np.int64) for i in ix]))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size].astype(np.int64) for i in ix]))
    return to_device(x, y)


def conversation_batch(split, indices):
    """Whole conversations (their first block_size + 1 tokens), one per row: targets are -1 where the
    mask is 0 and in the padding, so no loss falls on user text, markers or another conversation."""
    tokens = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')
    mask = np.memmap(os.path.join(data_dir, f'{split}_mask.bin'), dtype=np.uint8, mode='r')
    starts = conversation_starts[split]
    x = torch.zeros((len(indices), block_size), dtype=torch.int64)
    y = torch.full((len(indices), block_size), -1, dtype=torch.int64)
    for row, i in enumerate(indices):
        end = starts[i + 1] if i + 1 < len(starts) else len(tokens)
        end = min(end, starts[i] + block_size + 1)
        ids = torch.from_numpy(tokens[starts[i]:end].astype(np.int64))
        trained = torch.from_numpy(mask[starts[i] + 1:end].astype(np.bool_))
        x[row, :len(ids) - 1] = ids[:-1]
        y[row, :len(ids) - 1] = torch.where(trained, ids[1:], -1)
    return to_device(x, y)


meta_vocab_size = None
meta_path = os.path.join(data_dir, 'meta.pkl')
if os.path.isfile(meta_path):
    with open(meta_path, 'rb') as f:
        meta_vocab_size = pickle.load(f)['vocab_size']
    if master:
        print(f'vocab_size = {meta_vocab_size} (from {meta_path})')

# -----------------------------------------------------------------------------
# model, optimizer and the state an exact resume needs
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
best_path = os.path.join(out_dir, 'ckpt_best.pt')
log_path = os.path.join(out_dir, 'log.jsonl')
model_keys = ['n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'dropout', 'use_bio_mlp', 'use_rmsnorm',
              'use_rope', 'use_positions', 'use_sparse_gate', 'bio_threshold', 'gradient_checkpointing']
torch.manual_seed(seed)  # the initial weights depend on the seed alone, not on the process
if init_from == 'scratch':
    model_args = {k: globals()[k] for k in model_keys}
    model_args['vocab_size'] = meta_vocab_size or 50304
    model = GPT(GPTConfig(**model_args))
    model.to(device)
    checkpoint = None
    iter_num, tokens_seen, best_val_loss = 0, 0, float('inf')
elif init_from == 'resume':
    if not os.path.isfile(ckpt_path):
        fail(f'init_from=resume but {ckpt_path} does not exist (train from scratch first, or fix out_dir)')
    model, checkpoint = load_model(ckpt_path, device)
    if 'optimizer' not in checkpoint:
        fail(f'{ckpt_path} has no optimizer state, so it cannot be resumed (start a new run from its weights instead)')
    iter_num = checkpoint['iter_num']
    tokens_seen = checkpoint.get('tokens', 0)
    best_val_loss = float(checkpoint['best_val_loss'])
    if master:
        print(f'resuming from {ckpt_path} at iter {iter_num}')
else:  # a path: a new run from that checkpoint's weights (either format), e.g. fine-tuning a pretrained model
    if not os.path.isfile(init_from):
        fail(f"init_from={init_from!r} is not 'scratch', 'resume' or an existing checkpoint file")
    model, checkpoint = load_model(init_from, device, dropout=dropout, gradient_checkpointing=gradient_checkpointing)
    checkpoint = None
    iter_num, tokens_seen, best_val_loss = 0, 0, float('inf')
    if master:
        print(f'starting from the weights of {init_from}')
if init_from != 'scratch':
    model_args = asdict(model.config)  # the checkpoint's architecture wins over the config...
    for k in model_keys:
        if k != 'block_size':  # ...but block_size is the training window, which may be shorter
            config[k] = globals()[k] = model_args[k]
if block_size > model.config.block_size:
    fail(f'block_size={block_size} is longer than the model context of {model.config.block_size} tokens')
if meta_vocab_size and meta_vocab_size != model.config.vocab_size:
    fail(f'data/{dataset} has a {meta_vocab_size}-token vocabulary but the model has {model.config.vocab_size}')
for block in model.transformer.h[:freeze_layers]:
    block.requires_grad_(False)
if freeze_embeddings:
    model.transformer.wte.requires_grad_(False)  # tied: lm_head.weight stays as it is too
    if 'wpe' in model.transformer:
        model.transformer.wpe.requires_grad_(False)
tokens_per_iter = gradient_accumulation_steps * world_size * batch_size * block_size
if master:
    print(f'number of parameters: {model.get_num_params() / 1e6:.2f}M')
    print(f'tokens per iteration: {tokens_per_iter:,}')

optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
data_rng = torch.Generator().manual_seed(seed + rank)  # training batches; each process its own
torch.manual_seed(seed + rank)  # dropout
if checkpoint is not None:
    optimizer.load_state_dict(checkpoint['optimizer'])
    if scaler.is_enabled() and checkpoint.get('scaler'):  # empty when the saved run did not use fp16
        scaler.load_state_dict(checkpoint['scaler'])
    rng = checkpoint.get('rng')
    if rng and len(rng['data']) == world_size:  # the same number of processes as the run that saved it
        # load_model moved every tensor to the device; RNG states must be CPU byte tensors
        data_rng.set_state(rng['data'][rank].cpu())
        torch.set_rng_state(rng['torch'][rank].cpu())
        if device_type == 'cuda' and rng['cuda'][rank] is not None:
            torch.cuda.set_rng_state(rng['cuda'][rank].cpu(), device)
    elif master:
        print('note: the checkpoint has no random state for this number of processes; batches will differ from an unbroken run')
    checkpoint = None  # free the memory

raw_model = model
if compile:
    if master:
        print('compiling the model...')
    model = torch.compile(model)
if ddp:
    # no buffer needs syncing at each forward: RoPE tables are fixed and gate counts are per process
    # (newer PyTorch renamed broadcast_buffers to forward_sync_buffers)
    no_sync = 'forward_sync_buffers' if 'forward_sync_buffers' in inspect.signature(DDP).parameters else 'broadcast_buffers'
    train_model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None, **{no_sync: False})
else:
    train_model = model


@torch.no_grad()
def estimate_loss():
    """Mean loss per split on the same batches every time, so evals compare: eval_iters random batches,
    or when fine-tuning, per trained token over the first eval_conversations conversations (0: all of val)."""
    losses = {}
    model.eval()
    if task == 'finetune':
        count = eval_conversations or len(conversation_starts['val'])
        for split in ('train', 'val'):
            total, tokens = torch.zeros((), device=device), 0
            last = min(count, len(conversation_starts[split]))
            for first in range(0, last, batch_size):
                x, y = conversation_batch(split, range(first, min(first + batch_size, last)))
                with autocast:
                    _, loss = model(x, y)
                n = int((y != -1).sum())
                total += loss.float() * n
                tokens += n
            losses[split] = total.item() / max(tokens, 1)
        model.train()
        return losses
    for split in ('train', 'val'):
        eval_rng = torch.Generator().manual_seed(seed + 1)
        total = torch.zeros((), device=device)
        for _ in range(eval_iters):
            x, y = get_batch(split, eval_rng)
            with autocast:
                _, loss = model(x, y)
            total += loss.float()
        losses[split] = total.item() / eval_iters
    model.train()
    return losses


def get_lr(it):
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def random_states():
    """Every process's RNG states, gathered on all (a collective: every process must call it)."""
    mine = {'data': data_rng.get_state(), 'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state(device) if device_type == 'cuda' else None}
    if not ddp:
        return {k: [v] for k, v in mine.items()}
    gathered = [None] * world_size
    dist.all_gather_object(gathered, {k: (v.cpu() if v is not None else None) for k, v in mine.items()})
    return {k: [g[k] for g in gathered] for k in mine}


def write_checkpoint(rng_states, also_best):
    """Save the run on the master process; weights that are not finite are never saved."""
    # every process holds the same weights, so all of them reach the same verdict
    if not all(torch.isfinite(p).all() for p in raw_model.parameters()):
        fail(f'weights are not finite at iter {iter_num}; not saving, {ckpt_path} keeps the last good state')
    if not master:
        return
    checkpoint = {
        'model': raw_model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'model_args': model_args,
        'iter_num': iter_num,
        'best_val_loss': best_val_loss,
        'config': config,
        'format_version': 1,
        'tokens': tokens_seen,
        'scaler': scaler.state_dict(),
        'rng': rng_states,
    }
    save_checkpoint(checkpoint, ckpt_path)
    if also_best:
        # a hard link costs nothing; the next save replaces ckpt.pt by rename and leaves this one alone
        tmp = best_path + '.tmp'
        if os.path.exists(tmp):
            os.remove(tmp)
        try:
            os.link(ckpt_path, tmp)
            os.replace(tmp, best_path)
        except OSError:
            save_checkpoint(checkpoint, best_path)
    print(f'saved checkpoint at iter {iter_num} to {out_dir}')


def log_json(record):
    if master:
        with open(log_path, 'a') as f:
            f.write(json.dumps(record) + '\n')


if master and init_from == 'resume' and os.path.isfile(log_path):
    # drop what a crashed run logged after the checkpoint it is resumed from, so the log has no repeats
    kept = []
    with open(log_path) as f:
        for line in f:
            try:
                if json.loads(line)['iter'] <= iter_num:
                    kept.append(line)
            except (ValueError, KeyError):  # a line cut short by a crash
                pass
    with open(log_path + '.tmp', 'w') as f:
        f.writelines(kept)
    os.replace(log_path + '.tmp', log_path)

if wandb_log and master:
    try:
        import wandb
    except ImportError:
        fail('wandb_log=True but wandb is not installed (pip install wandb, or --wandb_log=False)')
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)

# Ctrl-C (or torchrun's SIGTERM) asks the loop to stop after the current iteration and save;
# a second Ctrl-C quits at once without saving
signal_seen = None


def request_stop(signum, frame):
    global signal_seen
    if signal_seen == signal.SIGINT and signum == signal.SIGINT:
        print('\ninterrupted again: exiting without saving', file=sys.stderr)
        os._exit(130)
    if signal_seen is None and master:
        print('\ninterrupted: saving a checkpoint after this iteration (Ctrl-C again to quit without saving)')
    signal_seen = signal_seen or signum


signal.signal(signal.SIGINT, request_stop)
signal.signal(signal.SIGTERM, request_stop)

peak = device_peak_flops(device, peak_flops)
start_iter = iter_num
stop_requested = False
interval_start, interval_iters = time.time(), 0
while True:
    # evaluate and save (not at the iteration a resumed run starts from: its checkpoint has that)
    if (iter_num % eval_interval == 0 or iter_num == max_iters or eval_only) and (iter_num != start_iter or init_from != 'resume' or eval_only):
        losses = estimate_loss()
        if master:
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            log_json({'iter': iter_num, 'train_loss': losses['train'], 'val_loss': losses['val'], 'tokens': tokens_seen})
            if wandb_log:
                wandb.log({'iter': iter_num, 'train/loss': losses['train'], 'val/loss': losses['val'], 'tokens': tokens_seen})
        if eval_only:
            break
        if not math.isfinite(losses['val']):
            fail(f'val loss is {losses["val"]} at iter {iter_num}; stopping, {ckpt_path} keeps the last good state')
        improved = losses['val'] < best_val_loss
        best_val_loss = min(best_val_loss, losses['val'])
        rng_states = random_states()
        write_checkpoint(rng_states, also_best=improved)
        interval_start, interval_iters = time.time(), 0  # the step time excludes evaluation
    if iter_num >= max_iters:
        break
    if stop_requested:
        write_checkpoint(random_states(), also_best=False)
        break

    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr
    loss_sum = torch.zeros((), device=device)
    batches = [get_batch('train', data_rng) for _ in range(gradient_accumulation_steps)]
    # each micro-batch's mean loss weighs by its share of trained tokens, so the step's loss is the mean over
    # all of them (micro-batches of conversations hold different numbers of assistant tokens)
    counts = [(y != -1).sum() for _, y in batches]
    trained_tokens = sum(counts).clamp(min=1)
    for micro_step, (x, y) in enumerate(batches):
        # in DDP, gradients are averaged across processes only on the last micro-step
        sync = train_model.no_sync() if ddp and micro_step < gradient_accumulation_steps - 1 else nullcontext()
        with sync, autocast:
            _, loss = train_model(x, y)
        loss = loss * (counts[micro_step] / trained_tokens)
        loss_sum += loss.detach().float()
        scaler.scale(loss).backward()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1
    tokens_seen += tokens_per_iter
    interval_iters += 1

    if ddp:
        if iter_num % log_interval == 0:  # processes agree on a stop or a bad loss, so they stop together
            flags = torch.tensor([float(signal_seen is not None), float(not torch.isfinite(loss_sum))], device=device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stop_requested, loss_is_bad = bool(flags[0]), bool(flags[1])
            if loss_is_bad:
                fail(f'the loss stopped being finite by iter {iter_num}; {ckpt_path} keeps the last good state')
    else:
        stop_requested = signal_seen is not None
    if iter_num % log_interval == 0 and master:
        lossf = loss_sum.item()  # waits for the device: once per log line
        if not math.isfinite(lossf):
            fail(f'loss is {lossf} at iter {iter_num}; stopping, {ckpt_path} keeps the last good state')
        dt = (time.time() - interval_start) / interval_iters
        interval_start, interval_iters = time.time(), 0
        mfu = raw_model.estimate_mfu(tokens_per_iter / world_size / dt, peak)  # per device, against one device's peak
        sparsity = raw_model.read_sparsity()
        line = f'iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, mfu {mfu * 100:.2f}%' if mfu is not None \
            else f'iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, mfu n/a'
        if sparsity is not None:
            line += f', sparsity {sparsity * 100:.2f}%'
        print(line)
        log_json({'iter': iter_num, 'loss': lossf, 'lr': lr, 'time_ms': dt * 1000, 'mfu': mfu,
                  'sparsity': sparsity, 'tokens': tokens_seen})
        if wandb_log:
            wandb.log({'iter': iter_num, 'train/loss_step': lossf, 'lr': lr, 'mfu': mfu, 'sparsity': sparsity})

if ddp:
    dist.barrier()  # rank 0 may still be writing; leaving together avoids a gloo teardown race
    dist.destroy_process_group()
