# The original WiggleGPT 124M run: GPT-2 small with oscillating neurons on OpenWebText, sized for
# one 8 GB RTX 3070 (2 x 16 x 1024 = 32,768 tokens per iteration).
# python data/openwebtext/prepare.py && python train_bio.py config_gpt2_bio_3070.py
# Rehearse first (a minute, writes nothing): ... config_gpt2_bio_3070.py --rehearsal_iters=20
out_dir = 'out-wigglegpt-pure-124m'
dataset = 'openwebtext'

n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
bias = False
dropout = 0.0
use_bio_mlp = True
use_rmsnorm = True
use_rope = True

batch_size = 2
gradient_accumulation_steps = 16
max_iters = 600000
lr_decay_iters = 600000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 2000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

eval_interval = 1000
eval_iters = 100
log_interval = 10

dtype = 'float16'  # as the original ran; Ampere cards (RTX 30xx) also do bfloat16 natively: --dtype=bfloat16
compile = False  # Windows has no Triton
