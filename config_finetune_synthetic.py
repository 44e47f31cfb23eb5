# Fine-tuning on a CPU, end to end in minutes: a small GPT-2-vocabulary model pretrained on tiny
# Shakespeare learns the chat template from data/synthetic_chat (short replies):
# python data/shakespeare/prepare.py && python train_bio.py config_shakespeare_char_cpu.py --dataset=shakespeare --out_dir=out-shakespeare-bpe-cpu --batch_size=8 --max_iters=300 --lr_decay_iters=300 --eval_interval=100
# python data/synthetic_chat/prepare.py && python finetune_native.py config_finetune_synthetic.py
task = 'finetune'
init_from = 'out-shakespeare-bpe-cpu/ckpt.pt'
out_dir = 'out-finetune-synthetic'
dataset = 'synthetic_chat'

batch_size = 8
block_size = 64
gradient_accumulation_steps = 1
learning_rate = 1e-3
min_lr = 1e-4
max_iters = 600
lr_decay_iters = 600
warmup_iters = 10
weight_decay = 0.01
beta2 = 0.99

eval_interval = 100
eval_conversations = 0  # all 155 val conversations
log_interval = 50

device = 'cpu'
dtype = 'float32'
compile = False
