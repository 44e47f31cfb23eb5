# Instruction fine-tuning of the 124M WiggleGPT on SmolTalk2, as the original run (one 8 GB GPU):
# python data/smoltalk/prepare.py && python finetune_native.py config_finetune_native.py
task = 'finetune'
init_from = 'out-wigglegpt-pure-124m/ckpt.pt'
out_dir = 'out-wigglegpt-finetune-native'
dataset = 'smoltalk'

batch_size = 1
block_size = 512
gradient_accumulation_steps = 64
gradient_checkpointing = True
dropout = 0.0

learning_rate = 2e-5
min_lr = 2e-6
max_iters = 10000
lr_decay_iters = 10000
warmup_iters = 200
weight_decay = 0.01
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0

eval_interval = 500
eval_conversations = 500
log_interval = 10

dtype = 'float16'
compile = False
