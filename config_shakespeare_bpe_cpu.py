# Tiny Shakespeare in GPT-2 BPE (a token is a word piece, as in OpenWebText), the character config's model
# otherwise, so that a comparison on a CPU has a second dataset that is not characters:
# python data/shakespeare/prepare.py && python train_bio.py config_shakespeare_bpe_cpu.py
# About 16 minutes on 2 CPU cores (--rehearsal_iters=30 projects it; the 50,304-token output layer is most of it).
# Add --mlp=gelu (or swiglu, relu2, bio_glu) for another MLP; --use_bio_mlp=False still means gelu.
out_dir = 'out-shakespeare-bpe-cpu'
dataset = 'shakespeare'
eval_interval = 250
eval_iters = 20
log_interval = 50

gradient_accumulation_steps = 1
batch_size = 12
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
bias = False
use_bio_mlp = True
use_rmsnorm = False
use_rope = False

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

device = 'cpu'
compile = False
