"""
Checkpoints: saving them so that no crash, kill or Windows file lock loses the last good one, and
loading them into a model: this repository's ckpt.pt files, the original WiggleGPT release's, and
exported model folders (model.safetensors + config.json, see export_hub.py), each from a local
path or from the HuggingFace hub by name:

    hf:OWNER/REPO/FILE.pt[@REVISION]    a checkpoint file in a hub repository (.pt or .pth)
    hf:OWNER/REPO[/FOLDER][@REVISION]   an exported model in a hub repository (or one of its folders)
"""

import json
import os
import posixpath
import shutil
import sys
import time
from dataclasses import asdict, fields

import torch

from model_bio import GPT, GPTConfig


# seconds to wait between tries of a rename: Windows refuses to replace a file that another program
# holds open (sample_bio.py reading it, a virus scan, a sync client such as OneDrive)
RENAME_WAITS = (0.1, 0.2, 0.5, 1.0, 2.0, 4.0)
FORMAT_VERSION = 1  # of the checkpoints train_bio.py writes (the original release's have none)


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


HUB_PREFIX = 'hf:'
EXPORT_CONFIG, EXPORT_WEIGHTS = 'config.json', 'model.safetensors'  # an exported model's files (export_hub.py)
EXPORT_MODEL_TYPE = 'wigglegpt'
CHECKPOINT_SUFFIXES = ('.pt', '.pth')  # a hub path ending so is a checkpoint file; any other, an exported model's folder
TIED_COPY = 'lm_head.weight'  # the same tensor as transformer.wte.weight: an export stores it once, under that name


def checkpoint_location(out_dir, ckpt):
    """Where a script's --out_dir/--ckpt pair points: out_dir/ckpt, or ckpt itself where it is a hub name, or
    a path or exported folder of its own that out_dir does not hold (a bare file name stays in out_dir)."""
    in_out_dir = os.path.join(out_dir, ckpt)
    own_path = os.path.isdir(ckpt) or os.path.dirname(ckpt) != ''
    if ckpt.startswith(HUB_PREFIX) or (own_path and os.path.exists(ckpt) and not os.path.exists(in_out_dir)):
        return ckpt
    return in_out_dir


def is_checkpoint_location(location):
    """Whether location can name a checkpoint: a hub name, or an existing file or folder."""
    return location.startswith(HUB_PREFIX) or os.path.exists(location)


def parse_hub_name(name):
    """'hf:OWNER/REPO[/PATH][@REVISION]' -> (repo_id, path inside the repository ('' for its root), revision or None)."""
    spec, at, revision = name[len(HUB_PREFIX):].partition('@')
    parts = spec.removesuffix('/').split('/')
    if len(parts) < 2 or not all(parts) or (at and not revision) or '@' in revision:
        raise ValueError(f'{name!r} is not a hub name: write hf:OWNER/REPO/FILE.pt for a checkpoint file, or '
                         'hf:OWNER/REPO for an exported model, optionally followed by @REVISION')
    return '/'.join(parts[:2]), '/'.join(parts[2:]), revision or None


def fetch_from_hub(name):
    """The local path of a hub checkpoint (a file) or exported model (a folder), downloaded through
    huggingface_hub into its cache (with its progress bar; HF_HUB_OFFLINE=1 takes the cache alone)."""
    repo_id, path, revision = parse_hub_name(name)
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise ValueError(f'{name} needs the huggingface_hub package: pip install huggingface_hub') from None
    is_file = path.lower().endswith(CHECKPOINT_SUFFIXES)
    if posixpath.basename(path) in (EXPORT_CONFIG, EXPORT_WEIGHTS):  # a file of an exported model: its folder
        path = posixpath.dirname(path)
    wanted = [path] if is_file else [posixpath.join(path, f) for f in (EXPORT_CONFIG, EXPORT_WEIGHTS)]
    at = f' at revision {revision}' if revision else ''
    try:
        local = [huggingface_hub.hf_hub_download(repo_id, f, revision=revision) for f in wanted]
    except errors.LocalEntryNotFoundError:  # before EntryNotFoundError: it is one
        raise ValueError(f'{name} is not in the local hub cache and the hub cannot be reached (or HF_HUB_OFFLINE '
                         'is set); download it once while online') from None
    except errors.RepositoryNotFoundError:  # also a private or gated one without access
        raise ValueError(f'no hub repository {repo_id} (or it is private: log in with `hf auth login`)') from None
    except errors.RevisionNotFoundError:
        raise ValueError(f'the hub repository {repo_id} has no revision {revision}') from None
    except errors.EntryNotFoundError:
        if is_file:
            raise ValueError(f'the hub repository {repo_id} has no file {path}{at}') from None
        raise ValueError(f'the hub repository {repo_id} has no exported model ({EXPORT_CONFIG} + {EXPORT_WEIGHTS}) in '
                         f'{path or "its top folder"}{at}; name a checkpoint file as hf:{repo_id}/FILE.pt') from None
    except (errors.HfHubHTTPError, errors.HFValidationError, OSError) as e:
        raise ValueError(f'could not download {name} ({type(e).__name__}: {str(e).strip().splitlines()[0]})') from None
    return local[0] if is_file else os.path.dirname(local[0])


def load_model(ckpt_path, device, **overrides):
    """Build the model a checkpoint describes and load its weights; returns (model, checkpoint dict).

    ckpt_path is a ckpt.pt file, an exported model's folder, or a hub name (hf:...) of either.
    overrides replace settings that do not change the weights (dropout, gradient_checkpointing).

    A missing, unreadable or foreign file raises ValueError with a one-line message.
    """
    if ckpt_path.startswith(HUB_PREFIX):
        ckpt_path = fetch_from_hub(ckpt_path)
    if os.path.isdir(ckpt_path):
        return load_export(ckpt_path, device, **overrides)
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
    prefix = '_orig_mod.'  # torch.compile's wrapper adds it to every key
    state_dict = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in checkpoint['model'].items()}
    # a causal-mask buffer some attention modules saved; attention here needs none
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith('.attn.bias')}
    model = build_model(ckpt_path, model_args, state_dict, device, overrides)
    checkpoint['model_args'] = asdict(model.config)  # what the model really is, for whoever saves it again
    return model, checkpoint


def build_model(source, model_args, state_dict, device, overrides):
    """The GPT that model_args (with overrides) describe, holding state_dict's weights, on device."""
    model_args = dict(model_args, **overrides)
    known = {f.name for f in fields(GPTConfig)}
    model = GPT(GPTConfig(**{k: v for k, v in model_args.items() if k in known}))
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise ValueError(f'{source} does not match the model its settings describe: '
                         f'{str(e).splitlines()[1].strip()}') from None
    model.to(device)
    return model


def export_model(model, checkpoint, tokenizer, folder):
    """Write model as an exported folder: model.safetensors (the tied embedding once) and config.json
    (the architecture, the tokenizer facts, and the run's settings and progress from checkpoint)."""
    from safetensors.torch import save_file
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != TIED_COPY}
    os.makedirs(folder, exist_ok=True)
    save_file(state_dict, os.path.join(folder, EXPORT_WEIGHTS), metadata={'format': 'pt'})
    best_val_loss = float(checkpoint.get('best_val_loss', float('inf')))
    config = {
        'model_type': EXPORT_MODEL_TYPE,
        'format_version': FORMAT_VERSION,
        'architecture': asdict(model.config),
        'tokenizer': tokenizer,
        'training': {'iter_num': checkpoint.get('iter_num'), 'tokens': checkpoint.get('tokens'),
                     'best_val_loss': best_val_loss if best_val_loss != float('inf') else None,
                     'settings': checkpoint.get('config', {})},
    }
    with open(os.path.join(folder, EXPORT_CONFIG), 'w', encoding='utf-8') as f:
        json.dump(config, f, indent=2)


def load_export(folder, device, **overrides):
    """load_model for an exported folder; the checkpoint dict it returns has model_args, config (the
    run's settings), tokenizer, iter_num and best_val_loss, and no optimizer state."""
    config_path, weights_path = os.path.join(folder, EXPORT_CONFIG), os.path.join(folder, EXPORT_WEIGHTS)
    if not (os.path.isfile(config_path) and os.path.isfile(weights_path)):
        raise ValueError(f'{folder} is a folder without an exported model ({EXPORT_CONFIG} and {EXPORT_WEIGHTS}); '
                         'pass a checkpoint file such as its ckpt.pt')
    try:
        with open(config_path, encoding='utf-8') as f:
            config = json.load(f)
        from safetensors.torch import load_file
        state_dict = load_file(weights_path)
    except Exception as e:
        raise ValueError(f'{folder} holds an unreadable exported model ({type(e).__name__}: {str(e).splitlines()[0]})') from None
    if not isinstance(config, dict) or config.get('model_type') != EXPORT_MODEL_TYPE:
        raise ValueError(f'{config_path} does not describe a WiggleGPT model (its model_type is not {EXPORT_MODEL_TYPE!r})')
    training = config.get('training') or {}
    if not isinstance(config.get('architecture'), dict) or not isinstance(training, dict):
        raise ValueError(f'{config_path} is malformed: it needs an "architecture" object (and "training", if any, an object)')
    if 'transformer.wte.weight' in state_dict:
        state_dict[TIED_COPY] = state_dict['transformer.wte.weight']
    try:
        model = build_model(folder, config['architecture'], state_dict, device, overrides)
    except (TypeError, AssertionError) as e:  # a setting of the wrong type or an impossible shape
        raise ValueError(f'{config_path} describes no buildable model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})') from None
    best_val_loss = training.get('best_val_loss')
    checkpoint = {'model_args': asdict(model.config), 'config': training.get('settings', {}),
                  'tokenizer': config.get('tokenizer'), 'iter_num': training.get('iter_num') or 0,
                  'tokens': training.get('tokens') or 0, 'format_version': config.get('format_version'),
                  'best_val_loss': float('inf') if best_val_loss is None else best_val_loss}
    return model, checkpoint
