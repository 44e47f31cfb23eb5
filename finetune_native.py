"""
Instruction fine-tuning: a pretrained WiggleGPT learns to answer in the chat template, trained on
the assistant's words only (its replies, their closing <|/assistant|> and the final <|endoftext|>).
    python data/smoltalk/prepare.py
    python finetune_native.py config_finetune_native.py
    python chat.py --out_dir=out-wigglegpt-finetune-native

This is train_bio.py with task='finetune': the same loop, checkpoints (ckpt.pt, ckpt_best.pt),
log.jsonl, exact resume, Ctrl-C and NaN safety, DDP. What fine-tuning changes:
- init_from is the pretrained checkpoint to start from (the original release's files work too);
- batches hold whole conversations from data/<dataset>/ (train.bin, train_mask.bin, train_offsets.npy),
  one per row, padded; the loss is the mean over the tokens whose mask is 1;
- freeze_layers / freeze_embeddings keep the first blocks / the embeddings as they are;
- evaluation covers eval_conversations conversations (0: the whole val split).
Settings are train_bio.py's; config_finetune_native.py holds the original run's values.
"""
import os
import runpy
import sys

sys.argv.insert(1, '--task=finetune')  # first, so a config file or later --key=value still reads as given
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train_bio.py'), run_name='__main__')
