"""
Instruction fine-tuning: a pretrained WiggleGPT learns to answer in the chat template, trained on
the assistant's words only (its replies, their closing <|/assistant|> and the final <|endoftext|>).
    python data/smoltalk/prepare.py
    python finetune_native.py config_finetune_native.py
    python chat.py --out_dir=out-wigglegpt-finetune-native

This is train_bio.py with task='finetune': the same loop, checkpoints (ckpt.pt, ckpt_best.pt),
log.jsonl, exact resume, Ctrl-C and NaN safety, DDP. What fine-tuning changes:
- init_from is the pretrained checkpoint to start from (the original release's files, and OpenAI's
  gpt2 ... gpt2-xl by name, work too);
- batches hold whole conversations from data/<dataset>/ (train.bin, train_mask.bin, train_offsets.npy),
  one per row, padded; the loss is the mean over the tokens whose mask is 1;
- freeze_layers / freeze_embeddings keep the first blocks / the embeddings as they are;
- evaluation covers eval_conversations conversations (0: the whole val split).
Settings are train_bio.py's; config_finetune_native.py holds the original run's values.

In more detail: the original release's checkpoints run with positions off, as checkpoints.py
explains. Each batch row is one conversation's first block_size + 1 tokens, padded; targets are -1
wherever the mask is 0 and in the padding, and the loss is the mean over the trained tokens of all
the iteration's micro-batches. block_size is the training window and may be shorter than the
model's context. Evaluation uses the first eval_conversations conversations of each split, the same
ones every time. freeze_layers=N keeps the first N blocks; freeze_embeddings=True also keeps the
token (and position) embeddings, and since wte is tied to lm_head, the output layer stays too.
config_finetune_native.py: batch 1 x 64 accumulation, 512 tokens, lr 2e-5 down to 2e-6, 10k
iterations, float16, gradient checkpointing.

Without a GPU, config_finetune_synthetic.py runs the same path in minutes: pretrain a small
GPT-2-vocabulary model on tiny Shakespeare, fine-tune it on data/synthetic_chat, and ask it
held-out questions (dev/LOG.md, 2026-11-23, has the results):
    python data/shakespeare/prepare.py
    python train_bio.py config_shakespeare_char_cpu.py --dataset=shakespeare --out_dir=out-shakespeare-bpe-cpu --batch_size=8 --max_iters=300 --lr_decay_iters=300 --eval_interval=100
    python data/synthetic_chat/prepare.py
    python finetune_native.py config_finetune_synthetic.py
    python chat.py --out_dir=out-finetune-synthetic --ckpt=ckpt_best.pt --max_new_tokens=32 < data/synthetic_chat/heldout_prompts.txt
"""
import os
import runpy
import sys

sys.argv.insert(1, '--task=finetune')  # first, so a config file or later --key=value still reads as given
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train_bio.py'), run_name='__main__')
