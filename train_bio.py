"""
Pretrain WiggleGPT (and, with task='finetune', fine-tune it on conversations: finetune_native.py). One process:
    python train_bio.py config_shakespeare_char_cpu.py
Several GPUs (or CPU processes with --backend=gloo) through DDP:
    torchrun --standalone --nproc_per_node=4 train_bio.py config_gpt2_bio_3070.py
Before a long run, a rehearsal times a few iterations and projects the whole run (writes nothing):
    python train_bio.py config_gpt2_bio_3070.py --rehearsal_iters=20
Any setting below can be overridden with --key=value after the config file; --help lists them.

Settings: the module-level variables below. A config file (plain Python) and --key=value overrides
replace them in the order given (configurator.py), e.g.
    python train_bio.py config_shakespeare_char_cpu.py --max_iters=500 --use_bio_mlp=False
Without a config the defaults train the 124M WiggleGPT on OpenWebText. What each setting allows is
declared beside its default (batch_size: '>= 1' = 12); a mistake, or settings that cannot work
together, is one 'error: ' line and exit status 2, before anything is written.

Data: data/<dataset>/train.bin and val.bin (uint16 token ids) as the prepare script left them,
checked against its manifest.json (prepared_data.py); meta.pkl, when present, gives the vocabulary
size.

Device and precision (devices.py): the first line says what was chosen, e.g. "device cuda:0 (NVIDIA
GeForce RTX 3070), float16 with a GradScaler". compile=True uses torch.compile (which needs Triton
on GPUs, so not on Windows).

Optimizer: adamw (the default), muon, adafactor, lion or adamw8bit; optimizers.py says what each
does and which settings it reads (muon_learning_rate: 0 means learning_rate; adafactor's
learning_rate is a relative step, about 1e-2; lion wants a rate 3-10x below AdamW's). Matrices get
weight_decay, vectors none; frozen weights are in no group. The startup line names the optimizers,
what each holds and the state size, e.g. "optimizer muon: Muon on 16 tensors (0.79M weights) +
AdamW on 23 tensors (0.02M weights), state 3.3 MB". A missing package (lion-pytorch,
bitsandbytes) is one line with its pip install; a run keeps its optimizer across resumes.

Schedule (lr_schedule): cosine (linear warmup over warmup_iters, cosine down to min_lr at
lr_decay_iters), wsd (warmup, constant, then linear decay to min_lr over the last decay_frac of
lr_decay_iters, so set lr_decay_iters to the run's length) or constant (warmup, then learning_rate;
the old decay_lr=False is lr_schedule=constant warmup_iters=0); muon's two rates follow it in
proportion. An iteration accumulates gradient_accumulation_steps micro-batches; gradients are
clipped to grad_clip after unscaling. A step whose gradients are not finite is skipped, in any
dtype, and counted (", N skipped" in the log line, skipped_steps in log.jsonl); max_skipped_steps
in a row, or weights that stop being finite, end the run with a message.

Output, in the original's formats: "step N: train loss X, val loss Y" at each evaluation (the same
eval_iters windows every time), "iter N: loss X, time Yms, mfu Z%" every log_interval iterations;
out_dir/log.jsonl holds the same as JSON. ckpt.pt is saved at every evaluation and at the end,
ckpt_best.pt whenever val loss improves, with the original's keys plus the GradScaler and every
random state; both load with torch.load(weights_only=True).

A run never overwrites another: a new run (any init_from but resume; a rehearsal writes nothing)
refuses an out_dir that holds a checkpoint (any *.pt or *.pth, such as ckpt.pt and ckpt_best.pt, or
a *.pt.tmp that a refused rename left) or a log.jsonl, before touching anything; for a ckpt.pt it
names the iteration held and the two ways on (--init_from=resume, or another --out_dir). A run
folder has one writer: the run holds a lock on it (files.py) while it lives, taken by a resume
before it reads the checkpoint and by a new run once every check has passed (wandb importable, the
data, the settings), when the folder is made and claimed by an empty log.jsonl. A second writer is
refused in one line naming the process that holds it, and a refused run leaves nothing behind; a
run that fails before it saves anything (a compile that cannot build, say) takes its claim away
again. Every file is written through a new temporary renamed over it, never through a link.
A checkpoint records its data's vocabulary (the characters, or GPT-2 BPE): resuming or starting
from it on data prepared with another one is refused, naming the difference.

--init_from=resume continues exactly: N iterations equal N/2 plus a resumed N/2, bit for bit on a
CPU (in float32 with every optimizer and schedule, in float16 with AdamW). Settings that leave the
weights' shapes alone (gradient_checkpointing, dropout, batch size, schedule, eval settings, dtype,
compile, ...) come from the command line, listed on one line; the architecture comes from the
checkpoint. So a run that ran out of memory resumes with --gradient_checkpointing=True.
init_from=path/to/ckpt.pt (or an exported folder, a hub name hf:..., or OpenAI's gpt2, gpt2-medium,
gpt2-large, gpt2-xl) starts a new run from a checkpoint's weights, in any of those formats
(checkpoints.py). A new run that asks for another MLP than the checkpoint's (mlp=bio from GPT-2) is
refused: they hold different weights.

Ctrl-C or SIGTERM finishes the iteration, saves it and exits with status 130 (143 for SIGTERM), so
`train && export` stops there; a second Ctrl-C quits without saving, and one before training starts
quits quietly. Running out of GPU memory, a full disk or a compile that fails is one line.

Several processes (torchrun): on CPUs add --device=cpu --backend=gloo. gradient_accumulation_steps
is the total over all processes, so the data a run sees does not depend on their number. The
processes agree on stopping every iteration (a signal saves within seconds, well inside torchrun's
30 s), and if one dies the others stop with one line instead of hanging.

--use_moe=True makes each MLP a mixture of experts that splits and merges itself (moe.py: the routing,
energy, health and the rules, with moe_* settings below): every moe_change_every iterations a layer may
split its healthiest expert or merge away a bankrupt one; each event is a line and a log.jsonl record
(a merge with the loss it cost on the iteration's batch), the experts' loads and energies are logged
every log_interval (the iteration's loss is the language model's, as in a dense run; the balance term it
trained with is printed beside it), and the checkpoint holds the structure, so resuming is exact across events.
python analysis/plot_moe.py OUT_DIR draws them.

--rehearsal_iters=N writes nothing and prints ms/iter, tokens/s, MFU, peak GPU memory and the
projected time of the whole run, so an 8 GB user learns in a minute whether the 3070 config fits
and how long it takes. wandb_log=True logs to Weights & Biases.
"""

import atexit
import inspect
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields


# what a Ctrl-C before training raises, so that finally blocks and atexit run: KeyboardInterrupt in a hub download
# (huggingface_hub deletes its partial file, hf_xet aborts its session), SystemExit once the run claims its folder
# (atexit gives it back); None: nothing to clean up
interrupt_raises = None


def write_from_handler(fd, line):
    """line to fd (1: stdout, 2: stderr) from a signal handler, after what was printed before it but past Python's
    buffers: a print that the signal came inside holds its stream's, and a second print there raises RuntimeError."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, RuntimeError):  # a pipe closed, or that print's stream
            pass
    try:
        os.write(fd, f'\n{line}\n'.encode())  # maybe mid-line: a line of its own
    except OSError:
        pass


def interrupted_at_start(signum, frame):
    write_from_handler(2, 'interrupted before training started: nothing was saved')
    if interrupt_raises:
        raise interrupt_raises(130)
    # nothing to clean up: at once, as an exception raised inside an import that C code made (numpy's of datetime,
    # say) comes out as an ImportError with its traceback
    os._exit(130)


signal.signal(signal.SIGINT, interrupted_at_start)  # the loop's own handler, which saves, is set once there is a run
# -----------------------------------------------------------------------------
# defaults: the 124M WiggleGPT on OpenWebText
out_dir = 'out'
init_from = 'scratch'  # 'scratch', 'resume' (from out_dir/ckpt.pt), or a checkpoint (path, hf: name, gpt2...) to start a new run from its weights
task: 'one of pretrain, finetune' = 'pretrain'  # 'pretrain': token streams; 'finetune': whole conversations, loss on the assistant's tokens only
eval_interval: '>= 1' = 2000
eval_iters: '>= 1' = 200
log_interval: '>= 1' = 10
eval_only = False
rehearsal_iters: '>= 0' = 0  # > 0: time this many iterations, project the whole run's time and memory, write nothing
wandb_log = False
wandb_project = 'wigglegpt'
wandb_run_name = 'run'
# data
dataset = 'openwebtext'
gradient_accumulation_steps: '>= 1' = 40  # total over all processes
batch_size: '>= 1' = 12
block_size = 1024
# model
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False
mlp = ''  # 'bio' (oscillating), 'gelu', 'swiglu', 'relu2' or 'bio_glu' (model_bio.py); '' takes use_bio_mlp's
use_bio_mlp = True  # the older switch, read where mlp is '': True is mlp='bio', False 'gelu'
gelu_tanh = False  # mlp='gelu' in GPT-2's tanh approximation; OpenAI's weights (init_from='gpt2') carry it
use_rmsnorm = True
use_rope = True
use_positions = True  # False trains with no positional encoding (NoPE)
use_sparse_gate = False
bio_threshold = 0.25
bio_variant = 'v3'  # the bio MLP: 'v3' (today's), or WiggleGPT's earlier 'v2' and 'v1' (lineage.py)
bio_compartments = 2  # v1's dendritic compartments
gelu_params_like = ''  # 'v3', 'v2' or 'v1': mlp gelu, relu2 or swiglu as wide as that bio MLP's parameters make it
use_presynaptic = False  # seed 003's presynaptic depression in attention (synapses.py)
tau_rrp = 40.0  # its pools refill over this many positions
stochastic_release = False  # with use_presynaptic: training draws each release, evaluation uses its expectation
use_fast_weights = False  # seed 003's Hebbian fast-weight scratchpad beside the MLP (synapses.py)
fast_weight_rank = 16  # its keys and values per head
fast_weight_decay = 0.95  # what a write keeps per position
synapse_chunk = 64  # presynaptic and fast weights train chunk by chunk, this many positions each: speed and memory,
# and the layout of dropout's and the release's draws (a resume with another chunk is exact but for those)
use_moe = False  # seed 003's structural plasticity: the MLP as experts that split and merge (moe.py says how)
moe_experts = 4  # active at the start
moe_top_k = 2  # units per token (an expert each, until splits pair them), each expert 1/moe_top_k of the MLP's width
moe_max_experts = 8  # slots
moe_min_experts = 2
moe_balance = 0.01  # weight of the load-balancing loss
moe_tax: '>= 0' = 0.01  # energy an expert pays per iteration (and earns, times its load)
moe_health_decay: 'in [0, 1)' = 0.9  # health: a moving average of the load with this decay per iteration
moe_split_health: '> 0' = 1.5  # a split needs this health (1: an even share of the load) ...
moe_split_energy: '>= 0' = 1.5  # ... and this energy (each expert starts with 1)
moe_change_every: '>= 1' = 100  # iterations between a layer's chances to split or merge
gradient_checkpointing = False
freeze_layers: '>= 0' = 0  # fine-tuning: the first N blocks keep their weights
freeze_embeddings = False  # also keep the token (and position) embeddings; wte is tied to lm_head, so it stays too
eval_conversations: '>= 0' = 0  # fine-tuning: evaluate on the first N conversations of each split (0: the whole val split)
# optimizer: 'adamw', 'muon', 'adafactor', 'lion' or 'adamw8bit' (optimizers.py says what each does and takes)
optimizer = 'adamw'
learning_rate: '> 0' = 6e-4  # with muon: the rate of what AdamW optimizes (embeddings, lm_head, vectors)
muon_learning_rate: '>= 0' = 0.0  # muon: the rate of the block matrices, on AdamW's scale; 0 means learning_rate
muon_momentum: 'in [0, 1)' = 0.95
max_iters: '>= 0' = 600000
weight_decay: '>= 0' = 1e-1  # on matrices only
beta1: 'in [0, 1)' = 0.9
beta2: 'in [0, 1)' = 0.95
grad_clip: '>= 0' = 1.0  # 0 disables
max_skipped_steps: '>= 1' = 20  # a step whose gradients are not finite is skipped; this many in a row end the run
# learning rate schedule, every group's rate in proportion: 'cosine' (linear warmup, cosine down to min_lr at
# lr_decay_iters), 'wsd' (warmup, constant, linear decay to min_lr over the last decay_frac of lr_decay_iters)
# or 'constant' (warmup, then learning_rate)
lr_schedule = 'cosine'
warmup_iters: '>= 0' = 2000
lr_decay_iters: '>= 1' = 600000
min_lr: '>= 0' = 6e-5
decay_frac: 'in (0, 1]' = 0.2
# system
backend: 'one of nccl, gloo, mpi' = 'nccl'  # DDP backend: 'nccl' for GPUs, 'gloo' for CPU
device = 'auto'  # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto' (bfloat16 on GPUs that have it natively, else float16; float32 off CUDA), 'float32', 'bfloat16', 'float16'
compile = False  # torch.compile needs Triton on GPUs, which Windows lacks
peak_flops: '>= 0' = 0.0  # the device's peak FLOP/s for MFU; 0 looks it up by GPU name
seed: '>= 0' = 1337
# -----------------------------------------------------------------------------
from configurator import check_folder, configure, declared_rules, fail, settings_in  # noqa: E402

asked = set()  # the settings the config files and the command line set
config = configure(settings_in(globals()), sys.argv[1:], declared_rules(__file__), asked)
globals().update(config)
# imported once the settings are read: a mistake in them is reported at once, not after torch's two seconds
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import devices  # noqa: E402
import prepared_data  # noqa: E402
from checkpoints import (ARCHITECTURE, CHECKPOINT_SUFFIXES, FORMAT_VERSION, TRAINING_ONLY, config_problem,  # noqa: E402
                         error_line, fetch_from_hub, is_checkpoint_location, is_hub_name, load_model, note_local_gpt2,
                         save_checkpoint)
from codec import (GPT2_VOCAB_SIZE, dataset_tokenizer, is_dataset_name, read_meta, tokenizer_difference,  # noqa: E402
                   tokenizer_facts)
from files import append_line, claim_folder, create_new, write_file  # noqa: E402
import moe  # noqa: E402
from model_bio import GPT, GPTConfig, settle_mlp  # noqa: E402
from optimizers import (OPTIMIZERS, SCHEDULES, build_optimizers, describe, load_optimizer_state,  # noqa: E402
                        optimizer_state, scheduled_lr, state_bytes, state_megabytes)
# -----------------------------------------------------------------------------
# GPTConfig's fields are settings of the same names (vocab_size comes from the data)
model_keys = [f.name for f in fields(GPTConfig) if f.name != 'vocab_size']


# each setting's own range is declared beside its default (checked by configure); here, what relates them
if optimizer not in OPTIMIZERS:
    fail(f"optimizer={optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
if lr_schedule not in SCHEDULES:
    fail(f"lr_schedule={lr_schedule!r} is not one of {', '.join(SCHEDULES)}")
# the model's settings (GPTConfig's fields) have their limits where a checkpoint's are checked: checkpoints.py
# (from a checkpoint its architecture is taken, so how the asked settings relate does not matter)
model_problem = config_problem({**asdict(GPTConfig()), **{k: config[k] for k in model_keys}},
                               relations=init_from == 'scratch')
if model_problem:
    fail(model_problem)
settle_mlp(config)  # mlp names the MLP, use_bio_mlp agrees, in the settings a checkpoint records
mlp, use_bio_mlp = config['mlp'], config['use_bio_mlp']
if rehearsal_iters == 1:
    fail('rehearsal_iters=1 leaves nothing to time after the first iteration, which compiles and allocates; '
         'rehearse at least 2 (20 gives a steadier figure)')
if not is_dataset_name(dataset):
    fail(f'dataset={dataset!r} must be the name of a folder in data/, such as shakespeare_char')
if rehearsal_iters == 0:  # a rehearsal writes nothing
    check_folder('out_dir', out_dir)
# the data first: a missing dataset is the likeliest mistake, and the cheapest to report
data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset)
data_files = ['.bin'] if task == 'pretrain' else ['.bin', '_mask.bin', '_offsets.npy']
for split in ('train', 'val'):
    for suffix in data_files:
        if not os.path.isfile(os.path.join(data_dir, split + suffix)):
            if suffix != '.bin' and os.path.isfile(os.path.join(data_dir, split + '.bin')):
                fail(f'data/{dataset} holds token streams, not conversations ({data_dir}/{split}{suffix} not found): '
                     'fine-tuning reads a chat dataset, e.g. python data/smoltalk/prepare.py and --dataset=smoltalk')
            fail(f'{data_dir}/{split}{suffix} not found; prepare the data first: python data/{dataset}/prepare.py')
try:
    note = prepared_data.check(data_dir, [s + f for s in ('train', 'val') for f in data_files],
                               f'python data/{dataset}/prepare.py')
except ValueError as e:
    fail(str(e))
if note and int(os.environ.get('RANK', 0)) == 0:
    print(note, file=sys.stderr)
if wandb_log and rehearsal_iters == 0 and int(os.environ.get('RANK', 0)) == 0:
    try:
        import wandb
    except ImportError:
        fail('wandb_log=True but wandb is not installed (pip install wandb, or --wandb_log=False)')

# DDP: torchrun sets RANK; each process gets one device and a share of the gradient accumulation
ddp = int(os.environ.get('RANK', -1)) != -1
rank, local_rank, world_size = 0, 0, 1
if ddp:
    rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    if gradient_accumulation_steps % world_size:
        fail(f'gradient_accumulation_steps={gradient_accumulation_steps} must divide among {world_size} processes')
    gradient_accumulation_steps //= world_size
master = rank == 0
try:
    device = devices.pick_device(device, local_rank if ddp else None)
    dtype = devices.pick_dtype(device, dtype)
except ValueError as e:
    fail(str(e))
if ddp:
    if backend == 'nccl' and device.type != 'cuda':
        fail(f"backend=nccl needs CUDA devices; with device={device} use --backend=gloo")
    dist.init_process_group(backend=backend)
autocast = devices.autocast(device, dtype)
if master:
    print(f"device {devices.describe(device)}, {dtype}{' with a GradScaler' if dtype == 'float16' else ''}"
          f"{f', {world_size} processes' if ddp else ''}")

# a run's folder is never overwritten: a new run needs a folder without one, a run goes on with resume
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
best_path = os.path.join(out_dir, 'ckpt_best.pt')
log_path = os.path.join(out_dir, 'log.jsonl')
writes = rehearsal_iters == 0
# any checkpoint (ckpt.pt, ckpt_best.pt, model.pth, one a refused rename left as .pt.tmp) or log is a run's work
RUN_FILES = CHECKPOINT_SUFFIXES + tuple(suffix + '.tmp' for suffix in CHECKPOINT_SUFFIXES)


def held_files():
    """The run's files out_dir holds (an empty log.jsonl is a claim that its run left unused: killed, say, before
    its first evaluation; a run holding it still holds the folder's lock)."""
    def is_run_file(name):
        path = os.path.join(out_dir, name)
        return name.lower().endswith(RUN_FILES) or (
            name == 'log.jsonl' and (os.path.islink(path) or not os.path.isfile(path) or os.path.getsize(path) > 0))
    return sorted(filter(is_run_file, os.listdir(out_dir) if os.path.isdir(out_dir) else []))


def kept_state():
    """What a run that stops on an error leaves, for its message."""
    return f'{ckpt_path} keeps the last good state' if os.path.isfile(ckpt_path) else 'no checkpoint was saved'


if writes and init_from != 'resume':
    held = held_files()
    if 'ckpt.pt' in held:
        try:  # mmap: the iteration number without reading the whole file
            at_iter = f" at iter {torch.load(ckpt_path, map_location='cpu', weights_only=True, mmap=True)['iter_num']}"
        except Exception:
            at_iter = ''
        fail(f'{out_dir} already holds a run ({ckpt_path}{at_iter}); continue it with --init_from=resume, '
             'or start a new one with another --out_dir')
    if held:
        fail(f"{out_dir} already holds a run's files ({', '.join(os.path.join(out_dir, n) for n in held)}); "
             'start the new run with another --out_dir')
if writes and init_from == 'resume' and not os.path.isfile(ckpt_path):
    fail(f'init_from=resume but {ckpt_path} does not exist (train from scratch first, or fix out_dir)')
if writes and master and init_from == 'resume':
    interrupt_raises = SystemExit
    try:  # before the checkpoint is read: a run being written by another process is not resumed under it
        claim_folder(out_dir)
    except ValueError as e:
        fail(str(e))
# a checkpoint to start from is found (downloaded, for a hub name: gigabytes, so once the folder is known to be
# free) before the run's folder is made
source = None
if init_from not in ('scratch', 'resume'):
    note_local_gpt2(init_from, 'init_from', (init_from,))
    if not is_checkpoint_location(init_from):
        fail(f"init_from={init_from!r} is not 'scratch', 'resume', a checkpoint (file or exported folder), a hub name "
             "hf:OWNER/REPO/FILE.pt or one of OpenAI's gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    interrupt_raises = KeyboardInterrupt if is_hub_name(init_from) else None
    try:
        source = fetch_from_hub(init_from) if is_hub_name(init_from) else init_from
    except ValueError as e:
        fail(str(e))
    except KeyboardInterrupt:  # the handler's, its line written
        sys.exit(130)
    interrupt_raises = None

# -----------------------------------------------------------------------------
# data: token memmaps written by data/<dataset>/prepare.py
if task == 'pretrain':
    split_tokens = {split: os.path.getsize(os.path.join(data_dir, f'{split}.bin')) // 2 for split in ('train', 'val')}
    for split in ('train', 'val'):
        if split_tokens[split] <= block_size:
            fail(f'data/{dataset}/{split}.bin holds no more than block_size={block_size} tokens; prepare more data or lower block_size')
else:
    conversation_starts = {split: np.load(os.path.join(data_dir, f'{split}_offsets.npy')) for split in ('train', 'val')}
    for split, starts in conversation_starts.items():
        if len(starts) == 0:
            fail(f'data/{dataset}/{split} holds no conversations; prepare more data')


def draw_batch(split, generator):
    """Where a random batch of split lies: token windows' starts, or conversations' indices."""
    if task == 'finetune':
        return torch.randint(len(conversation_starts[split]), (batch_size,), generator=generator).tolist()
    return torch.randint(split_tokens[split] - block_size, (batch_size,), generator=generator).tolist()


def read_batch(split, where):
    """Inputs x and next-token targets y, (rows, block_size) each, for what draw_batch drew."""
    if task == 'finetune':
        return conversation_batch(split, where)
    # a fresh memmap per batch: numpy's otherwise keeps growing resident memory
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')
    x = torch.from_numpy(np.stack([data[i:i + block_size].astype(np.int64) for i in where]))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size].astype(np.int64) for i in where]))
    return x.to(device), y.to(device)


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
    return x.to(device), y.to(device)


def iteration_batches(generator):
    """This process's micro-batches of one iteration. Every process draws the whole iteration's
    batches from the same random stream and reads its share, so the data a run sees does not
    depend on how many processes share the work."""
    draws = [draw_batch('train', generator) for _ in range(gradient_accumulation_steps * world_size)]
    return [read_batch('train', where) for where in draws[rank::world_size]]


# the token ids the data may hold: its meta.pkl's characters, else GPT-2 BPE's (every prepare script without one)
meta_vocab_size = None
meta_path = os.path.join(data_dir, 'meta.pkl')
if os.path.isfile(meta_path):
    try:
        meta_vocab_size = read_meta(meta_path)['vocab_size']
    except ValueError as e:
        fail(str(e))
    if master:
        print(f'vocab_size = {meta_vocab_size} (from {meta_path})')
data_vocab_size = meta_vocab_size or GPT2_VOCAB_SIZE
data_tokenizer = dataset_tokenizer(data_dir)  # checked against a checkpoint's, and saved in this run's
# the ids a split holds, checked whole where that takes a fraction of a second (up to 2**27 tokens); a larger
# one (OpenWebText's train, 9 GB) is trusted to the tokenizer that made it, whose range is checked against the model
for split in ('train', 'val'):
    tokens = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')
    if 0 < len(tokens) <= 2 ** 27 and int(tokens.max()) >= data_vocab_size:
        fail(f'data/{dataset}/{split}.bin holds token id {int(tokens.max())}, outside its {data_vocab_size}-token '
             f'vocabulary; prepare the data again: python data/{dataset}/prepare.py')

# -----------------------------------------------------------------------------
# model, optimizer and the state an exact resume needs
torch.manual_seed(seed)  # the initial weights depend on the seed alone, not on the process
checkpoint = None
iter_num, tokens_seen, best_val_loss, skipped_steps = 0, 0, float('inf'), 0
# the wall clock of the training steps so far, evaluations and saves left out (None: a run resumed from a checkpoint
# written before train_bio.py counted it, whose time so far is unknown)
train_seconds = 0.0
training_flops = 0  # the FLOPs trained so far, each iteration's at the structure it trained (experts come and go)
if init_from == 'scratch':
    model_args = {k: config[k] for k in model_keys}
    model_args['vocab_size'] = meta_vocab_size or 50304
    model = GPT(GPTConfig(**model_args))
    model.to(device)
else:
    source = source or ckpt_path
    try:
        model, checkpoint = load_model(source, device, **{k: config[k] for k in TRAINING_ONLY})
    except ValueError as e:
        fail(str(e))
    model_args = asdict(model.config)
    try:  # a checkpoint written before checkpoints recorded it: its dataset's characters, as sampling reads them
        trained_tokenizer = tokenizer_facts(checkpoint)
    except ValueError:
        trained_tokenizer = None  # cannot be told (its dataset is not here): taken as the data's
    difference = trained_tokenizer and tokenizer_difference(data_tokenizer, trained_tokenizer)
    if difference:
        fail(f'data/{dataset} was prepared with another vocabulary than {source} was trained on ({difference}); '
             f'train it on the data it was made for, or prepare data/{dataset} as it was')
    if init_from != 'resume' and {'mlp', 'use_bio_mlp'} & asked and mlp != model_args['mlp']:
        # the MLPs hold different weights: a new run asking for another one is not what it would get
        fail(f"{init_from} has the MLP mlp={model_args['mlp']}, so mlp={mlp} cannot start from its weights; "
             f'leave mlp and use_bio_mlp out (the checkpoint keeps its MLP) or train mlp={mlp} from scratch')
    asked_otherwise = [f'{k} {model_args[k]} (asked {config[k]})' for k in ARCHITECTURE
                       if k in asked and config[k] != model_args[k]]
    for k in ARCHITECTURE:
        config[k] = globals()[k] = model_args[k]
    if asked_otherwise and master:
        print(f"note: the checkpoint's architecture is kept: {', '.join(asked_otherwise)}", file=sys.stderr)
    if init_from == 'resume':
        if not checkpoint.get('optimizer'):  # none, or the original release's empty {}
            fail(f'{ckpt_path} has no optimizer state, so it cannot be resumed (start a new run from its weights '
                 f'with --init_from={ckpt_path} --out_dir=...)')
        saved_optimizer = checkpoint.get('config', {}).get('optimizer', 'adamw')
        if saved_optimizer != optimizer:
            fail(f'{ckpt_path} was trained with optimizer={saved_optimizer}, asked {optimizer}: a run keeps its '
                 f'optimizer (start a new run from its weights with --init_from={ckpt_path} --out_dir=...)')
        iter_num = checkpoint['iter_num']
        tokens_seen = checkpoint.get('tokens', 0)
        best_val_loss = float(checkpoint['best_val_loss'])
        skipped_steps = checkpoint.get('skipped_steps', 0)
        train_seconds = checkpoint.get('train_seconds', 0.0 if iter_num == 0 else None)
        training_flops = checkpoint.get('flops')  # None: unknown, or from before train_bio.py counted them (below)
        saved = checkpoint.get('config', {})
        changed = [f'{k} {saved[k]!r} -> {v!r}' for k, v in config.items()
                   if k in saved and saved[k] != v and k != 'init_from' and k not in ARCHITECTURE]
        if master:
            print(f'resuming from {ckpt_path} at iter {iter_num}')
            if changed:
                print(f"resume: changed since the checkpoint: {', '.join(changed)}")
    else:
        checkpoint = None  # only its weights are wanted: free the rest
        if master:
            print(f'starting from the weights of {init_from}')
if block_size > model.config.block_size:
    fail(f'block_size={block_size} is longer than the model context of {model.config.block_size} tokens')
if meta_vocab_size and meta_vocab_size != model.config.vocab_size:
    fail(f'data/{dataset} has a {meta_vocab_size}-token vocabulary but the model has {model.config.vocab_size}')
if model.config.vocab_size < data_vocab_size:
    fail(f'data/{dataset} holds GPT-2 BPE tokens (ids up to {data_vocab_size - 1}) but the model has a '
         f'{model.config.vocab_size}-token vocabulary; train it on the dataset it was made for')
if freeze_layers > model.config.n_layer:
    fail(f'freeze_layers={freeze_layers} but the model has {model.config.n_layer} layers')
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

try:
    optimizers = build_optimizers(model, optimizer, learning_rate, weight_decay, beta1, beta2, muon_learning_rate,
                                  muon_momentum, device.type)
except ImportError as e:
    fail(str(e))
# each group follows the schedule in proportion to its own rate (muon's two may differ)
lr_ratios = [[group['lr'] / learning_rate for group in opt.param_groups] for opt in optimizers]
scaler = devices.grad_scaler(device, dtype)
data_rng = torch.Generator().manual_seed(seed)  # training batches: one stream, the same on every process
torch.manual_seed(seed + rank)  # dropout: each process its own
if checkpoint is not None:
    try:
        load_optimizer_state(optimizers, checkpoint['optimizer'])
    except ValueError as e:  # e.g. freeze_layers changed, so other weights train
        fail(f'{ckpt_path} holds optimizer state for other parameters than this run trains ({e}); resume with the '
             'freeze settings it was trained with')
    if scaler.is_enabled() and checkpoint.get('scaler'):  # empty when the saved run did not use float16
        scaler.load_state_dict(checkpoint['scaler'])
    rng = checkpoint.get('rng') or {}
    data_state = rng.get('data')
    if isinstance(data_state, list):  # one per process, as written before processes shared one data stream
        data_state = data_state[0] if len(data_state) == 1 else None
    if data_state is not None:
        data_rng.set_state(data_state)
    if len(rng.get('torch', [])) == world_size:  # dropout states, if the saved run had as many processes
        torch.set_rng_state(rng['torch'][rank])
        devices.set_rng_state(rng['cuda'][rank], device)
    if master and (data_state is None or len(rng.get('torch', [])) != world_size):
        print('note: the checkpoint has no random state for this number of processes; batches or dropout '
              'will differ from an unbroken run')
    checkpoint = None  # free the memory
if master:
    print(f'optimizer {optimizer}: {describe(optimizers)}, state {state_megabytes(optimizers):.1f} MB')

raw_model = model
if compile:
    if master:
        print('compiling the model...')
    model = torch.compile(model)
if ddp:
    # no buffer needs syncing at each forward: RoPE tables are fixed and gate counts are per process
    # (newer PyTorch renamed broadcast_buffers to forward_sync_buffers); device_ids stays None, which
    # suits a model on one device, GPU or CPU
    no_sync = 'forward_sync_buffers' if 'forward_sync_buffers' in inspect.signature(DDP).parameters else 'broadcast_buffers'
    train_model = DDP(model, **{no_sync: False})
else:
    train_model = model


def eval_batches():
    """The batches of one evaluation per split: the same every time, so successive evaluations compare."""
    if task == 'finetune':
        count = eval_conversations or len(conversation_starts['val'])
        return {split: [range(first, min(first + batch_size, count, len(conversation_starts[split])))
                        for first in range(0, min(count, len(conversation_starts[split])), batch_size)]
                for split in ('train', 'val')}
    batches = {}
    for split in ('train', 'val'):
        eval_rng = torch.Generator().manual_seed(seed + 1)  # per split: each split's batches are the same in every run
        batches[split] = [draw_batch(split, eval_rng) for _ in range(eval_iters)]
    return batches


@torch.no_grad()
def estimate_loss():
    """Mean loss per split over eval_batches: per trained token (fine-tuning, whole conversations
    from the first eval_conversations, 0: all of val) or per batch (eval_iters random windows)."""
    losses = {}
    model.eval()
    for split, batches in eval_batches().items():
        total, weight = torch.zeros((), device=device), 0
        for where in batches:
            x, y = read_batch(split, where)
            with autocast:
                _, loss = model(x, y)
            n = int((y != -1).sum()) if task == 'finetune' else 1
            total += loss.float() * n
            weight += n
        losses[split] = total.item() / max(weight, 1)
    model.train()
    return losses


def random_states():
    """The data stream's random state and every process's own (dropout), gathered on all
    (a collective under DDP: every process must call it)."""
    mine = {'torch': torch.get_rng_state(), 'cuda': devices.rng_state(device)}
    gathered = [mine]
    if ddp:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, mine)
    return {'data': data_rng.get_state(), 'torch': [g['torch'] for g in gathered], 'cuda': [g['cuda'] for g in gathered]}


@torch.no_grad()
def fixed_loss(x, y):
    """The model's loss on the batch x, y as evaluation computes it (dropout off): what a structural change moved."""
    raw_model.eval()
    with autocast:
        _, loss = raw_model(x, y)
    raw_model.train()
    return loss.item()


def weights_are_finite():
    return all(torch.isfinite(p).all() for p in raw_model.parameters())


def write_checkpoint(rng_states, also_best):
    """Save the run on the master process; weights that are not finite are never saved."""
    # every process holds the same weights, so all of them reach the same verdict
    if not weights_are_finite():
        fail(f'weights are not finite at iter {iter_num}; not saving, {kept_state()}')
    if not master:
        return
    checkpoint = {
        'model': raw_model.state_dict(),
        'optimizer': optimizer_state(optimizers),
        'model_args': model_args,
        'iter_num': iter_num,
        'best_val_loss': best_val_loss,
        'config': config,
        'format_version': FORMAT_VERSION,
        'tokens': tokens_seen,
        'skipped_steps': skipped_steps,
        'train_seconds': train_seconds,
        'flops': training_flops,
        'scaler': scaler.state_dict(),
        'rng': rng_states,
        'tokenizer': data_tokenizer,  # what the ids mean: resuming, fine-tuning and evaluating check the data's
    }
    try:
        saved = save_checkpoint(checkpoint, ckpt_path, copy_to=best_path if also_best else None)
    except ValueError as e:
        fail(str(e))
    if saved:
        print(f'saved checkpoint at iter {iter_num} to {out_dir}')


def log_json(record):
    if master and writes:
        try:
            append_line(log_path, json.dumps(record))
        except ValueError as e:
            fail(str(e))


def unclaim_if_unused():
    """At exit, a new run that saved nothing (a failure after its folder was claimed) leaves no log to refuse the next."""
    if not os.path.islink(log_path) and os.path.isfile(log_path) and os.path.getsize(log_path) == 0 and not any(
            name.endswith(RUN_FILES) for name in os.listdir(out_dir)):
        os.remove(log_path)


if master and writes and init_from != 'resume':
    interrupt_raises = SystemExit
    try:  # only now: a run refused by any check above leaves no folder behind
        claim_folder(out_dir)
        if not held_files() and os.path.isfile(log_path) and not os.path.islink(log_path):
            os.remove(log_path)  # an unused claim (see held_files): the lock is this run's now
        create_new(log_path).close()  # the folder's first run: one that started it first and ended holds a log
    except FileExistsError:
        fail(f'{out_dir} was taken by another run started at the same time; start this one with another --out_dir')
    except (ValueError, OSError) as e:
        fail(str(e) if isinstance(e, ValueError) else f'cannot start the run in {out_dir} ({error_line(e)})')
    atexit.register(unclaim_if_unused)  # runs before the claim is released (atexit goes last to first)
if master and writes and init_from == 'resume':
    # drop what a crashed run logged after the checkpoint it is resumed from, so the log has no repeats (a link
    # planted at log.jsonl is not read, and replaced by the run's own file)
    kept = []
    if os.path.isfile(log_path) and not os.path.islink(log_path):
        with open(log_path, errors='replace') as f:
            for line in f:
                try:
                    if json.loads(line)['iter'] <= iter_num:
                        kept.append(line)
                except (ValueError, KeyError, TypeError, RecursionError):  # a line cut short by a crash, or garbled
                    pass
    try:
        write_file(log_path, ''.join(kept))
    except ValueError as e:
        fail(str(e))

if wandb_log and master and writes:
    try:
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)
    except Exception as e:  # not logged in, offline: one line, and the run's claim goes with it
        fail(f'wandb could not start ({error_line(e)}); log in with `wandb login`, or --wandb_log=False')

# Ctrl-C (or torchrun's SIGTERM) asks the loop to stop after the current iteration and save;
# a second Ctrl-C quits at once without saving
signal_seen = None


def request_stop(signum, frame):
    global signal_seen
    if signal_seen == signal.SIGINT and signum == signal.SIGINT:
        write_from_handler(2, 'interrupted again: exiting without saving')
        os._exit(130)
    if signal_seen is None and master:
        write_from_handler(1, 'interrupted: saving a checkpoint after this iteration (Ctrl-C again to quit without saving)')
    signal_seen = signal_seen or signum


signal.signal(signal.SIGINT, request_stop)
signal.signal(signal.SIGTERM, request_stop)


def rehearsal_report(timed_iters, seconds):
    """What a rehearsal prints: the speed and memory of the iterations timed, and the whole run projected."""
    per_iter = seconds / timed_iters
    mfu = raw_model.estimate_mfu(tokens_per_iter / world_size / per_iter, peak)
    memory = devices.peak_memory(device)
    print(f"rehearsal: {timed_iters} iterations timed (after {rehearsal_iters - timed_iters} to warm up): "
          f"{per_iter * 1000:.1f} ms/iter, {tokens_per_iter / per_iter:,.0f} tokens/s, "
          f"mfu {'n/a' if mfu is None else f'{mfu * 100:.1f}%'}, peak memory "
          + (f'{memory[0] / 2**30:.2f} of {memory[1] / 2**30:.2f} GiB on {device}' if memory else 'n/a (measured on CUDA only)'))
    memory_report(*kept_per_sequence)
    # an evaluation's cost, from a few of its batches
    batches = eval_batches()['val']
    t0 = time.time()
    with torch.no_grad():
        for where in batches[:5]:
            x, y = read_batch('val', where)
            with autocast:
                model(x, y)
    devices.synchronize(device)
    per_eval = (time.time() - t0) / max(len(batches[:5]), 1) * 2 * len(batches)
    remaining = max(max_iters - start_iter, 0)
    n_evals = remaining // eval_interval + 1
    total = remaining * per_iter + n_evals * per_eval

    def duration(s):
        return f'{s / 86400:.1f} days' if s >= 2 * 86400 else f'{s / 3600:.1f} hours' if s >= 3600 else f'{s / 60:.1f} minutes'
    print(f"rehearsal: the {'rest of the run' if start_iter else 'whole run'}, {remaining:,} iterations and "
          f'{n_evals:,} evaluations of 2 x {len(batches)} batches, would take about {duration(total)} (training {duration(remaining * per_iter)}, '
          f'evaluation {duration(n_evals * per_eval)})')


def kept_for_backward_per_sequence(x, y):
    """What the eager model keeps for backward per sequence, and per micro-batch whatever its size (autocast's
    copies of the weights), from forwards of one and two sequences; bytes."""
    kept = []
    for n in (1, 2):
        with autocast, devices.kept_for_backward([*raw_model.parameters(), *raw_model.buffers()]) as count:
            raw_model(x[:1].repeat(n, 1), y[:1].repeat(n, 1))
        kept.append(count['bytes'])
    return kept[1] - kept[0], max(2 * kept[0] - kept[1], 0)


def memory_report(per_sequence, per_micro_batch):
    """A rehearsal's memory, projected for GPUs of 8, 12 and 16 GiB: weights, float32 gradients (twice under
    DDP: its buckets) and optimizer state; per micro-batch autocast's copies of the weights; per sequence what
    it keeps for backward and the loss's gradient (two float32 block_size x vocab tensors at the start of
    backward). For each size the largest batch_size that fits with a tenth left for what this does not count
    (the CUDA context, the allocator's slack, other transients), and of those dividing the run's sequences
    per iteration the largest, with the accumulation that keeps them. Counted, not measured: a CPU rehearses a
    GPU run's memory (--dtype=bfloat16 has float16's sizes); no GPU has checked it."""
    if gradient_checkpointing:
        print('rehearsal: no memory projection with gradient_checkpointing=True (its recomputation keeps what '
              'the count cannot see); rehearse without it')
        return
    weights = list(raw_model.parameters())
    fixed = (sum(p.numel() * p.element_size() for p in weights) + state_bytes(optimizers)
             + (1 + ddp) * sum(p.numel() * 4 for p in weights if p.requires_grad) + per_micro_batch)
    per_sequence += 2 * block_size * raw_model.config.vocab_size * 4
    print(f'rehearsal: memory: weights, gradients, optimizer state and weight copies {fixed / 2**20:,.2f} MiB; per '
          f'sequence of {block_size} tokens {per_sequence / 2**20:,.2f} MiB (kept for backward and the loss\'s '
          f'gradient, {dtype}); at batch_size={batch_size}: about {(fixed + batch_size * per_sequence) / 2**20:,.2f} MiB'
          + ('; dropout > 0 off CUDA: attention keeps T x T weights here that a GPU\'s fused kernel does not, '
             'so the projection is high (rehearse with --dropout=0.0)' if dropout > 0 and device.type != 'cuda' else ''))
    largest = {gib: int((0.9 * gib * 2**30 - fixed) // per_sequence) for gib in (8, 12, 16)}
    print('rehearsal: the largest batch_size that fits, a tenth left: '
          + ', '.join(f'{gib} GiB {b}' if b >= 1 else f'{gib} GiB none (try --gradient_checkpointing=True)'
                      for gib, b in largest.items()))
    sequences = batch_size * gradient_accumulation_steps  # per process and iteration
    keep = []
    for gib, b in largest.items():
        if b >= 1:
            batch = max(d for d in range(1, min(b, sequences) + 1) if sequences % d == 0)
            # the command line's gradient_accumulation_steps counts every process's micro-steps
            keep.append(f'{gib} GiB --batch_size={batch} --gradient_accumulation_steps={sequences // batch * world_size}')
    if keep:
        print(f"rehearsal: this run's {sequences * world_size} sequences per iteration at those: {'; '.join(keep)}")


def count_training_time():
    """Add the steps' wall clock since segment_start to train_seconds (an unknown total stays unknown)."""
    global train_seconds
    devices.synchronize(device)
    if train_seconds is not None:
        train_seconds += time.time() - segment_start


peak, peak_note = devices.peak_flops(device, peak_flops)
if master and peak_note:
    print(peak_note, file=sys.stderr)
start_iter = iter_num
skipped_in_a_row = 0
stop_requested = False
warmup_iters_rehearsed = max(1, rehearsal_iters // 5)  # the first iterations compile, allocate and tune: never timed
devices.reset_peak_memory(device)
interval_start, interval_iters = time.time(), 0
segment_start = time.time()  # of the training steps since the last evaluation
flops_per_token = raw_model.flops_per_token()  # counted again after a split or merge
if training_flops is None and (not use_moe or tokens_seen == 0):  # else experts may have split or merged: unknown
    training_flops = flops_per_token * tokens_seen
try:
    while True:
        # evaluate and save (not at the iteration a resumed run starts from: its checkpoint has that)
        if writes and (iter_num % eval_interval == 0 or iter_num == max_iters or eval_only) and (
                iter_num != start_iter or init_from != 'resume' or eval_only):
            count_training_time()
            losses = estimate_loss()
            if not all(math.isfinite(loss) for loss in losses.values()):  # checked first: never logged, never saved
                fail(f"loss is not finite (train {losses['train']}, val {losses['val']}) at iter {iter_num}; stopping, "
                     f'{kept_state()}')
            if master:
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                # train_s and flops (6 per parameter and attention's products, per token trained) let a comparison
                # read each run at the same time or compute (analysis/compare_runs.py)
                record = {'iter': iter_num, 'train_loss': losses['train'], 'val_loss': losses['val'], 'tokens': tokens_seen,
                          'train_s': train_seconds, 'flops': training_flops}
                log_json({k: v for k, v in record.items() if v is not None})
                if wandb_log:
                    wandb.log({'iter': iter_num, 'train/loss': losses['train'], 'val/loss': losses['val'], 'tokens': tokens_seen})
            if eval_only:
                break
            improved = losses['val'] < best_val_loss
            best_val_loss = min(best_val_loss, losses['val'])
            write_checkpoint(random_states(), also_best=improved)
            interval_start, interval_iters = time.time(), 0  # the step time excludes evaluation
            segment_start = time.time()
        # a rehearsal times all its iterations, past max_iters if need be (it writes nothing)
        if (writes and iter_num >= max_iters) or (not writes and iter_num - start_iter == rehearsal_iters):
            break
        if stop_requested:
            if not writes:  # an interrupted rehearsal has nothing to save or report
                sys.exit(130)
            count_training_time()
            write_checkpoint(random_states(), also_best=False)
            break
        if not writes and iter_num - start_iter == warmup_iters_rehearsed:
            devices.synchronize(device)
            rehearsal_start = time.time()

        lr = scheduled_lr(iter_num, lr_schedule, learning_rate, min_lr, warmup_iters, lr_decay_iters, decay_frac)
        for opt, ratios in zip(optimizers, lr_ratios):
            for group, ratio in zip(opt.param_groups, ratios):
                group['lr'] = lr * ratio
        batches = iteration_batches(data_rng)
        # the iteration's loss is the mean over the trained tokens of all its micro-batches, on all
        # processes (conversations hold different numbers); the same collective has the processes
        # agree every iteration on stopping, as torchrun kills them 30 s after passing on a signal
        counts = [(y != -1).sum() for _, y in batches]
        shared = torch.stack([sum(counts), torch.tensor(int(signal_seen is not None), device=device)])
        if ddp:
            dist.all_reduce(shared)
        trained_tokens = shared[0].clamp(min=1)
        loss_sum = torch.zeros((), device=device)
        balance_sum = torch.zeros((), device=device)  # the experts' balance term, within loss_sum
        for micro_step, (x, y) in enumerate(batches):
            # in DDP, gradients are averaged across processes only on the last micro-step
            sync = train_model.no_sync() if ddp and micro_step < gradient_accumulation_steps - 1 else nullcontext()
            if not writes and iter_num == start_iter and micro_step == 0:  # a rehearsal's memory, counted once
                kept_per_sequence = kept_for_backward_per_sequence(x, y)
            with sync, autocast:
                _, loss = train_model(x, y)
            # DDP averages the processes' gradients, so each process's share is scaled up by their number
            share = counts[micro_step] * world_size / trained_tokens
            loss = loss * share
            loss_sum += loss.detach().float()
            if use_moe:
                balance_sum += raw_model.balance_loss.float() * share
            scaler.scale(loss).backward()
        if use_moe:
            for block in raw_model.transformer.h:
                block.mlp.drop_inactive_grads()
        # a step whose gradients are not finite is skipped (with float16 the GradScaler also lowers its scale)
        for opt in optimizers:
            scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float('inf'))
        step_is_finite = bool(torch.isfinite(grad_norm))  # waits for the device: once per iteration
        if step_is_finite:
            for opt in optimizers:
                scaler.step(opt)
        scaler.update()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        skipped_in_a_row = 0 if step_is_finite else skipped_in_a_row + 1
        skipped_steps += not step_is_finite
        iter_num += 1
        tokens_seen += tokens_per_iter
        if training_flops is not None:
            training_flops += flops_per_token * tokens_per_iter
        if use_moe:
            for event in moe.keep_accounts(raw_model, optimizers, iter_num, config, lambda: fixed_loss(x, y), seed, ddp):
                flops_per_token = raw_model.flops_per_token()
                if master:
                    change = f", loss {event['loss_change']:+.4f}" if 'loss_change' in event else ''
                    print(f"iter {iter_num}: layer {event['layer']} {event['event']} of expert {event['expert']} "
                          f"(health {event['health']:.2f}, energy {event['energy']:.2f}{change}): {event['experts']} experts")
                log_json(event)
        interval_iters += 1
        stop_requested = bool(shared[1] > 0) if ddp else signal_seen is not None
        if skipped_in_a_row >= max_skipped_steps:
            if not weights_are_finite():
                fail(f'weights are not finite at iter {iter_num}; stopping, {kept_state()}')
            fail(f'the last {skipped_in_a_row} steps all had gradients that are not finite (loss '
                 f'{loss_sum.item() / world_size:.4g}); stopping at iter {iter_num}, {kept_state()} '
                 '(a lower learning_rate, or dtype=bfloat16, may help)')

        if iter_num % log_interval == 0:
            # the language model's loss, as a dense run logs it, and the balance term beside it
            losses = torch.stack([loss_sum - balance_sum, balance_sum])
            if ddp:
                dist.all_reduce(losses)
            lossf, balancef = (losses / world_size).tolist()
            dt = (time.time() - interval_start) / interval_iters
            interval_start, interval_iters = time.time(), 0
            if master:
                mfu = raw_model.estimate_mfu(tokens_per_iter / world_size / dt, peak)  # per device, against one device's peak
                sparsity = raw_model.read_sparsity()
                line = (f'iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, '
                        f"mfu {'n/a' if mfu is None else f'{mfu * 100:.2f}%'}")
                if use_moe:
                    line += f', balance {balancef:.4f}'
                if sparsity is not None:
                    line += f', sparsity {sparsity * 100:.2f}%'
                if skipped_steps:
                    line += f', {skipped_steps} skipped'
                print(line)
                log_json({'iter': iter_num, 'loss': lossf, 'lr': lr, 'time_ms': dt * 1000, 'mfu': mfu,
                          'sparsity': sparsity, 'skipped_steps': skipped_steps, 'tokens': tokens_seen,
                          **({'balance': balancef, 'moe': moe.state_of(raw_model)} if use_moe else {})})
                if wandb_log and writes:
                    wandb.log({'iter': iter_num, 'train/loss_step': lossf, 'lr': lr, 'mfu': mfu, 'sparsity': sparsity,
                               **({'train/balance_step': balancef} if use_moe else {})})
except torch.cuda.OutOfMemoryError:  # said by each process that ran out, which need not be the first
    fail(f'out of memory on {devices.describe(device)} with batch_size={batch_size}, block_size={block_size}: lower '
         'batch_size (raising gradient_accumulation_steps keeps the tokens per iteration), or use '
         f'--gradient_checkpointing=True; {kept_state()}')
except Exception as e:
    if compile and type(e).__module__.startswith(('torch._dynamo', 'torch._inductor')):
        fail(f'torch.compile failed ({error_line(e)}); train without it: --compile=False')
    # a process that failed (or was killed) breaks the others' collectives: they stop at once, not wait
    if not ddp or not isinstance(e, RuntimeError) or not (isinstance(e, dist.DistError) or 'by peer' in str(e)):
        raise
    print(f'error: process {rank}: another process of this run stopped ({str(e).strip().splitlines()[0]}); '
          f'stopping too, {ckpt_path} keeps the last saved state', file=sys.stderr)
    sys.exit(2)

if not writes and master:
    devices.synchronize(device)
    rehearsal_report(rehearsal_iters - warmup_iters_rehearsed, time.time() - rehearsal_start)
if ddp:
    dist.barrier()  # rank 0 may still be writing; leaving together avoids a gloo teardown race
    dist.destroy_process_group()
if signal_seen is not None:  # saved; the status says the run did not finish, so `train && export` stops here
    sys.exit(128 + signal_seen)
