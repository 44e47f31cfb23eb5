# A small character-level WiggleGPT on tiny Shakespeare, for one GPU (minutes):
# python data/shakespeare_char/prepare.py && python train_bio.py config_shakespeare_char_bio.py
out_dir = 'out-shakespeare-char-bio'
dataset = 'shakespeare_char'
eval_interval = 250  # it overfits: watch val
eval_iters = 200
log_interval = 10

gradient_accumulation_steps = 1
batch_size = 64
block_size = 256

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
bias = False
use_bio_mlp = True
use_rmsnorm = False
use_rope = False

learning_rate = 1e-3  # a tiny model can take a high rate
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99  # many tokens per step are few here; a shorter memory helps
warmup_iters = 100
