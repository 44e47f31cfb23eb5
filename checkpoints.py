"""
Checkpoints: saving them so that no crash, kill or Windows file lock loses the last good one, and
loading them (this repository's and the original WiggleGPT release's) into a model.
"""

import os
import shutil
import sys
import time
from dataclasses import asdict, fields

import torch

from model_bio import GPT, GPTConfig


# seconds to wait between tries of a rename: Windows refuses to replace a file that another program
# holds open (sample_bio.py reading it, a virus scan, a sync client such as OneDrive)
RENAME_WAITS = (0.1, 0.2, 0.5, 1.0, 2.0, 4.0)


def replace_file(src, dst):
    """os.replace(src, dst), retried while dst is held open; False, with a one-line warning, if it stays held."""
    for wait in RENAME_WAITS + (None,):
        try:
            os.replace(src, dst)
            return True
        except PermissionError:
            if wait is None:
                break
            time.sleep(wait)
    print(f'warning: could not replace {dst} (another program holds it open); the new file is complete '
          f'at {src}, and the next save tries again', file=sys.stderr)
    return False


def save_checkpoint(checkpoint, path, copy_to=None):
    """torch.save through a temp file and a rename, so a crash mid-save leaves the old file whole.

    copy_to, if given, is a second path that gets the same checkpoint (a hard link, where the
    file system has them). Returns False when a rename stayed refused (see replace_file).
    """
    tmp_path = path + '.tmp'
    if os.path.exists(tmp_path):
        # left by a refused rename, and maybe hard-linked to the best checkpoint: writing into it would change that too
        os.remove(tmp_path)
    with open(tmp_path, 'wb') as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    copied = True
    if copy_to:
        copy_tmp = copy_to + '.tmp'
        if os.path.exists(copy_tmp):
            os.remove(copy_tmp)
        try:
            os.link(tmp_path, copy_tmp)  # costs nothing; the next save renames a new file over path, not into it
        except OSError:
            shutil.copyfile(tmp_path, copy_tmp)
        copied = replace_file(copy_tmp, copy_to)
    return replace_file(tmp_path, path) and copied


def load_model(ckpt_path, device, **overrides):
    """Build the model a checkpoint describes and load its weights; returns (model, checkpoint dict).

    overrides replace settings that do not change the weights (dropout, gradient_checkpointing).

    A missing, unreadable or foreign file raises ValueError with a one-line message.
    """
    if not os.path.isfile(ckpt_path):
        raise ValueError(f'no checkpoint at {ckpt_path} (train one with train_bio.py, or pass its path)')
    try:
        # to the CPU first: the model is moved once, and a GPU never holds two copies
        checkpoint = torch.load(ckpt_path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(f'{ckpt_path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})') from None
    if not isinstance(checkpoint, dict) or 'model' not in checkpoint or 'model_args' not in checkpoint:
        raise ValueError(f'{ckpt_path} is not a WiggleGPT checkpoint (it has no model / model_args)')
    model_args = dict(checkpoint['model_args'])
    if 'format_version' not in checkpoint:  # written by the original WiggleGPT code
        checkpoint['best_val_loss'] = float(checkpoint.get('best_val_loss', float('inf')))
        if model_args.get('use_rope') and model_args.get('use_positions', True):
            # its RoPE rotated nothing, so these weights were trained without any positional encoding
            model_args['use_positions'] = False
            print(f'note: {ckpt_path} comes from the original WiggleGPT, whose RoPE was a no-op; '
                  'running it with positional encoding off (use_positions=False), as it was trained', file=sys.stderr)
    model_args.update(overrides)
    known = {f.name for f in fields(GPTConfig)}
    config = GPTConfig(**{k: v for k, v in model_args.items() if k in known})
    checkpoint['model_args'] = asdict(config)  # what the model really is, for whoever saves it again
    model = GPT(config)
    prefix = '_orig_mod.'  # torch.compile's wrapper adds it to every key
    state_dict = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in checkpoint['model'].items()}
    # a causal-mask buffer some attention modules saved; attention here needs none
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith('.attn.bias')}
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise ValueError(f'{ckpt_path} does not match the model its model_args describe: '
                         f'{str(e).splitlines()[1].strip()}') from None
    model.to(device)
    return model, checkpoint
