"""
Checkpoints: saving them so that no crash, kill or Windows file lock loses the last good one, and
loading them into a model: this repository's ckpt.pt files, the original WiggleGPT release's, and
exported model folders (model.safetensors + config.json, see export_hub.py), each from a local
path or from the HuggingFace hub by name:

    hf:OWNER/REPO/FILE.pt[@REVISION]    a checkpoint file in a hub repository (.pt or .pth)
    hf:OWNER/REPO[/FOLDER][@REVISION]   an exported model in a hub repository (or one of its folders)
    gpt2, gpt2-medium, gpt2-large, gpt2-xl
                                        OpenAI's GPT-2 (openai-community/<name> on the hub)

load_model(ckpt_path, device) is the one loader every script uses, wherever it takes a checkpoint:
--ckpt of sample_bio.py, chat.py and export_hub.py, init_from of training and fine-tuning, the
analysis scripts' arguments. REVISION is a branch, tag or commit. A hub name downloads through
huggingface_hub into its cache (with its progress bar) and then loads as a local file;
HF_HUB_OFFLINE=1 uses the cache alone, and `hf auth login` opens private repositories. A missing
repository, revision or file, or a name not cached while offline, is one line. The checkpoint is
read onto the CPU and the model then moved to the device (so one saved on cuda:1 loads anywhere);
the _orig_mod. prefixes that torch.compile leaves are stripped.

Files from outside are read as data, never run as code: a ckpt.pt through
torch.load(weights_only=True) (once its zip is known to unpack to no more than its size), an exported
folder's config.json as JSON and its weights as safetensors. Every architecture setting is checked
(type, range, n_embd a multiple of n_head, ...), and the file must hold at least the weights those
settings make before the model is built. A character-level model's characters come from its
dataset's meta.pkl (codec.read_meta): unpickled as plain data only, only from data/<name>/ where the
checkpoint names a plain dataset name, and never for a hub checkpoint (an exported folder carries its
characters in config.json). A missing, unreadable, foreign or malformed file raises ValueError with a
one-line message, which the scripts print as their error.

OpenAI's GPT-2 loads from the layout its hub repository holds, read through huggingface_hub alone
(no transformers): config.json, then model.safetensors, whose names carry no `transformer.` prefix,
whose attention and MLP matrices are stored (in, out) (GPT-2's Conv1D) and are transposed here, whose
lm_head is wte, and whose h.N.attn.bias / masked_bias mask buffers are dropped. It becomes the GELU
model with biases, LayerNorm (eps 1e-5), learned positions, vocab_size 50257 and gelu_tanh=True (GELU
in its tanh approximation, GPT-2's 'gelu_new'), so it computes what GPT-2 computes. A folder of that
layout (transformers' save_pretrained of a GPT-2, or hf:OWNER/REPO of one) loads the same way; a
GPT-2 variant this model does not compute (another activation, epsilon, MLP width, attention scaling)
is refused in one line. The names are reserved: a local folder called gpt2 is ./gpt2.

The original release's checkpoints (compile prefixes, a tensor best_val_loss, no format_version)
load too. Its RoPE rotated nothing (the angle came from the head index, and q and k were turned
alike), so its published 124M weights were trained with no positional encoding. Such a checkpoint
with use_rope=True therefore runs with use_positions=False and a one-line note, and its outputs
match the original code's; fine-tuning or resuming it keeps use_positions=False. Checkpoints written
by this repository carry a format_version and keep their real RoPE.

save_checkpoint writes a temp file and renames it over the old one, so a crash mid-save leaves the
previous checkpoint whole. On Windows, where the rename fails while another program (sample_bio.py,
a virus scan, OneDrive) holds the old file open, it retries for about 8 seconds, then says so in one
line and leaves the new checkpoint complete beside it as ckpt.pt.tmp; the next save tries again.
"""

import json
import math
import os
import pickle
import posixpath
import shutil
import sys
import zipfile
from dataclasses import asdict, fields

import torch

from codec import GPT2_TOKENIZER, GPT2_VOCAB_SIZE, MAX_VOCAB_SIZE, check_tokenizer
from files import WriteError, remove_entry, replace_file, write_error, write_file, write_temp
from model_bio import GATED_KINDS, GPT, MLP_KINDS, PARAMS_LIKE_KINDS, GPTConfig, mlp_kind, mlp_width


FORMAT_VERSION = 1  # of the checkpoints train_bio.py writes (the original release's have none)


def save_checkpoint(checkpoint, path, copy_to=None):
    """torch.save through a new temp file and a rename (files.py), so a crash mid-save leaves the old file
    whole and no link at the path is written through.

    copy_to, if given, is a second path that gets the same checkpoint (a hard link, where the
    file system has them). Returns False when a rename stayed refused (see files.replace_file).
    """
    tmp_path = write_temp(path, lambda f: torch.save(checkpoint, f))
    copied = True
    if copy_to:
        copy_tmp = copy_to + '.tmp'

        def copy(f):
            with open(tmp_path, 'rb') as saved:
                shutil.copyfileobj(saved, f)
        try:
            remove_entry(copy_tmp)
            try:
                os.link(tmp_path, copy_tmp)  # costs nothing; the next save renames a new file over path, not into it
            except OSError:
                copy_tmp = write_temp(copy_to, copy)
            copied = replace_file(copy_tmp, copy_to)
        except (OSError, WriteError) as e:  # a full disk, a folder at copy_to: no temporary is left either
            os.remove(tmp_path)
            raise e if isinstance(e, WriteError) else write_error(copy_to, e) from None
    return replace_file(tmp_path, path) and copied


HUB_PREFIX = 'hf:'
EXPORT_CONFIG, EXPORT_WEIGHTS = 'config.json', 'model.safetensors'  # an exported model's files (export_hub.py)
EXPORT_MODEL_TYPE = 'wigglegpt'
GPT2_NAMES = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')  # OpenAI's, by the names nanoGPT takes them
GPT2_OWNER = 'openai-community'  # the hub account that holds them
GPT2_MODEL_TYPE = 'gpt2'  # a transformers GPT-2's config.json says so
# GPT-2's Conv1D stores these (in, out), nn.Linear (out, in)
GPT2_CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
CHECKPOINT_SUFFIXES = ('.pt', '.pth')  # a hub path ending so is a checkpoint file; any other, an exported model's folder
TIED_COPY = 'lm_head.weight'  # the same tensor as transformer.wte.weight: an export stores it once, under that name


def is_hub_name(name):
    """Whether name is downloaded from the hub: hf:... or one of OpenAI's GPT-2 names."""
    return name.startswith(HUB_PREFIX) or name in GPT2_NAMES


def checkpoint_location(out_dir, ckpt):
    """Where a script's --out_dir/--ckpt pair points: out_dir/ckpt, or ckpt itself where it is a hub name, or
    a path or exported folder of its own that out_dir does not hold (a bare file name stays in out_dir)."""
    in_out_dir = os.path.join(out_dir, ckpt)
    note_local_gpt2(ckpt, 'ckpt', (in_out_dir, ckpt))
    own_path = os.path.isdir(ckpt) or os.path.dirname(ckpt) != ''
    if is_hub_name(ckpt) or (own_path and os.path.exists(ckpt) and not os.path.exists(in_out_dir)):
        return ckpt
    return in_out_dir


def note_local_gpt2(name, setting, places):
    """Say so where a GPT-2 name is also a local file or folder (the first of places that exists): the name
    means OpenAI's model, and the local one needs a path."""
    for place in places:
        if name in GPT2_NAMES and os.path.exists(place):
            path = place if os.path.dirname(place) else os.path.join('.', place)
            print(f"note: {name} names OpenAI's GPT-2 (from the hub); for the local {path}, pass --{setting}={path}",
                  file=sys.stderr)
            return


def is_checkpoint_location(location):
    """Whether location can name a checkpoint: a hub name, or an existing file or folder."""
    return is_hub_name(location) or os.path.exists(location)


def parse_hub_name(name):
    """'hf:OWNER/REPO[/PATH][@REVISION]' -> (repo_id, path inside the repository ('' for its root), revision or None)."""
    spec, at, revision = name[len(HUB_PREFIX):].partition('@')
    parts = spec.removesuffix('/').split('/')
    if len(parts) < 2 or not all(parts) or (at and not revision) or '@' in revision:
        raise ValueError(f'{name!r} is not a hub name: write hf:OWNER/REPO/FILE.pt for a checkpoint file, or '
                         'hf:OWNER/REPO for an exported model, optionally followed by @REVISION')
    return '/'.join(parts[:2]), '/'.join(parts[2:]), revision or None


def error_line(error):
    """'TypeName: the first line of its message', or the type name alone where the message is empty
    (a zero-byte file gives such errors)."""
    lines = str(error).strip().splitlines()
    return f'{type(error).__name__}: {lines[0]}' if lines else type(error).__name__


def fetch_from_hub(name):
    """The local path of a hub checkpoint (a file) or exported model (a folder; GPT-2's for its names),
    downloaded through huggingface_hub into its cache (with its progress bar; HF_HUB_OFFLINE=1 takes the
    cache alone)."""
    repo_id, path, revision = parse_hub_name(name if name not in GPT2_NAMES else f'{HUB_PREFIX}{GPT2_OWNER}/{name}')
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise ValueError(f'{name} needs the huggingface_hub package: pip install huggingface_hub') from None
    is_file = path.lower().endswith(CHECKPOINT_SUFFIXES)
    if posixpath.basename(path) in (EXPORT_CONFIG, EXPORT_WEIGHTS):  # a file of an exported model: its folder
        path = posixpath.dirname(path)
    at = f' at revision {revision}' if revision else ''

    def download(filename):
        try:
            return huggingface_hub.hf_hub_download(repo_id, filename, revision=revision)
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
            raise ValueError(f'the hub repository {repo_id} has no exported model ({EXPORT_CONFIG} + {EXPORT_WEIGHTS}) '
                             f'in {path or "its top folder"}{at}; name a checkpoint file as hf:{repo_id}/FILE.pt') from None
        except (errors.HfHubHTTPError, errors.HFValidationError, OSError) as e:
            raise ValueError(f'could not download {name} ({error_line(e)})') from None

    if is_file:
        return download(path)
    config_path = download(posixpath.join(path, EXPORT_CONFIG))
    read_export_config(config_path, f'the {EXPORT_CONFIG} of {name}')  # before the weights: gigabytes, maybe of something else
    download(posixpath.join(path, EXPORT_WEIGHTS))
    return os.path.dirname(config_path)


def load_model(ckpt_path, device, **overrides):
    """Build the model a checkpoint describes and load its weights; returns (model, checkpoint dict).

    ckpt_path is a ckpt.pt file, an exported model's folder, a hub name (hf:...) of either, or a GPT-2 name.
    overrides replace settings that do not change the weights (dropout, gradient_checkpointing).

    A missing, unreadable, foreign or malformed file raises ValueError with a one-line message; its
    settings are checked, and its model known to be no bigger than its weights, before anything is built.
    """
    from_hub = is_hub_name(ckpt_path)
    if from_hub:
        ckpt_path = fetch_from_hub(ckpt_path)
    if os.path.isdir(ckpt_path):
        model, checkpoint = load_export(ckpt_path, device, **overrides)
    elif os.path.isfile(ckpt_path):
        model, checkpoint = load_checkpoint_file(ckpt_path, device, overrides)
    else:
        raise ValueError(f'no checkpoint at {ckpt_path} (train one with train_bio.py, or pass its path)')
    # the dataset its settings name is its uploader's, no folder here: codec.py reads no meta.pkl for it
    checkpoint['from_hub'] = from_hub
    return model, checkpoint


def check_zip_sizes(ckpt_path):
    """Refuse a zip checkpoint that would grow in memory beyond its file's size (a zip bomb) before torch.load
    unpacks it: torch.save stores every entry uncompressed, so a compressed entry, or entries bigger in all
    than the file, were made by something else. A file that is no zip (the older pickle format) passes."""
    try:
        if not zipfile.is_zipfile(ckpt_path):
            return
        with zipfile.ZipFile(ckpt_path) as archive:
            entries = archive.infolist()
    except Exception as e:  # torch reads the zip on its own: one that Python cannot size is refused, not trusted
        raise ValueError(f'{ckpt_path} is not a readable checkpoint ({error_line(e)})') from None
    compressed = [entry.filename for entry in entries if entry.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise ValueError(f'{ckpt_path} is not a checkpoint as torch.save writes it: its entry {compressed[0]!r:.80} '
                         'is compressed (torch.save stores them as they are), so it is not read')
    unpacked = sum(entry.file_size for entry in entries)
    if unpacked > os.path.getsize(ckpt_path):
        raise ValueError(f'{ckpt_path} is not a checkpoint as torch.save writes it: its entries claim {unpacked:,} '
                         f'bytes, more than the file\'s {os.path.getsize(ckpt_path):,}, so it is not read')


def plain_number(value):
    """value's number where it is a 0-d tensor of real numbers (the original release saved best_val_loss so), else value."""
    if is_plain_tensor(value) and value.dim() == 0 and not value.dtype.is_complex and value.dtype != torch.bool:
        return value.item()  # an int for an integer tensor, a float for a floating one
    return value


def shown(value):
    """value for a one-line message: short plain values as written, anything else by its type (a tensor's repr
    runs over lines; an int of over 4,300 digits has none)."""
    if value is None or isinstance(value, (str, float)) or (isinstance(value, int) and abs(value) < 10 ** 40):
        return f'{value!r:.40}'
    return f'a {type(value).__name__}'


def check_progress(ckpt_path, checkpoint):
    """Turn a checkpoint's iter_num, tokens and best_val_loss into plain numbers, and check that its config
    holds plain settings: the scripts format and export them as such. ValueError naming the field otherwise."""
    for name in ('iter_num', 'tokens'):
        if name in checkpoint:
            value = checkpoint[name] = plain_number(checkpoint[name])
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 63:  # int64, as torch counts
                raise ValueError(f'{ckpt_path} is malformed: its {name} is not a whole number from 0 to 2**63 '
                                 f'({shown(value)})')
    if checkpoint.get('flops') is not None:  # None: unknown; past int64 in a long run (6 x 124M x 300B tokens)
        value = checkpoint['flops'] = plain_number(checkpoint['flops'])
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f'{ckpt_path} is malformed: its flops is not a whole number from 0 ({shown(value)})')
    if 'best_val_loss' in checkpoint:
        value = plain_number(checkpoint['best_val_loss'])
        # an int past float's range would fail float() below
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or (isinstance(value, int) and abs(value) > sys.float_info.max)):
            raise ValueError(f'{ckpt_path} is malformed: its best_val_loss is not a number ({shown(value)})')
        checkpoint['best_val_loss'] = float(value)
    for key, value in checkpoint.get('config', {}).items():
        if not isinstance(key, str):
            raise ValueError(f'{ckpt_path} is malformed: its config has a key that is not a setting name ({shown(key)})')
        if not (value is None or isinstance(value, (str, int, float, bool))):
            raise ValueError(f'{ckpt_path} is malformed: its config setting {key!r:.40} is {shown(value)}, '
                             'not text, a number, true/false or None')


def load_checkpoint_file(ckpt_path, device, overrides):
    """load_model for a ckpt.pt file."""
    check_zip_sizes(ckpt_path)  # before torch.load, which would unpack a zip bomb
    try:
        # to the CPU first: the model is moved once, and a GPU never holds two copies
        checkpoint = torch.load(ckpt_path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's first line advises weights_only=False, which runs whatever code the file holds: its reason follows
        reasons = [line.strip() for line in str(e).splitlines()[1:] if line.strip() and not line.startswith('Please file')]
        raise ValueError(f'{ckpt_path} is not a readable checkpoint: it is garbled, or holds more than tensors and '
                         f'plain data ({reasons[0].split(". ")[0].rstrip(".") if reasons else type(e).__name__})') from None
    except Exception as e:
        raise ValueError(f'{ckpt_path} is not a readable checkpoint ({error_line(e)})') from None
    if not isinstance(checkpoint, dict) or 'model' not in checkpoint or 'model_args' not in checkpoint:
        raise ValueError(f'{ckpt_path} is not a WiggleGPT checkpoint (it has no model / model_args)')
    weights = checkpoint['model']
    if not isinstance(weights, dict) or not all(isinstance(k, str) and is_plain_tensor(v) for k, v in weights.items()):
        raise ValueError(f'{ckpt_path} is malformed: its "model" is not a dict of named tensors')
    if not isinstance(checkpoint['model_args'], dict) or not isinstance(checkpoint.get('config', {}), dict):
        raise ValueError(f'{ckpt_path} is malformed: its "model_args" (and "config", if any) must be dicts')
    check_progress(ckpt_path, checkpoint)
    model_args = dict(checkpoint['model_args'])
    if 'format_version' not in checkpoint:  # written by the original WiggleGPT code
        checkpoint.setdefault('best_val_loss', float('inf'))
        if model_args.get('use_rope') and model_args.get('use_positions', True):
            # its RoPE rotated nothing, so these weights were trained without any positional encoding
            model_args['use_positions'] = False
            print(f'note: {ckpt_path} comes from the original WiggleGPT, whose RoPE was a no-op; '
                  'running it with positional encoding off (use_positions=False), as it was trained', file=sys.stderr)
    prefix = '_orig_mod.'  # torch.compile's wrapper adds it to every key
    state_dict = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in weights.items()}
    # a causal-mask buffer some attention modules saved; attention here needs none
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith('.attn.bias')}
    # numbers really stored: views of one storage (a tied weight; a crafted stride of 0) count once
    held = sum({v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() // v.element_size()
                for v in state_dict.values()}.values())
    config = checked_config(ckpt_path, {**model_args, **overrides}, held)
    if checkpoint.get('tokenizer') is not None:
        check_tokenizer(checkpoint['tokenizer'], config.vocab_size, ckpt_path)
    model = build_model(ckpt_path, config, state_dict, device)
    checkpoint['model_args'] = asdict(model.config)  # what the model really is, for whoever saves it again
    return model, checkpoint


# the most each size may be: far above any model trained here (block_size 1024), far below what exhausts
# memory or time (RoPE's tables, which no file holds, grow with block_size; each layer takes time to build)
SIZE_LIMITS = {'vocab_size': MAX_VOCAB_SIZE, 'block_size': 2 ** 16, 'n_layer': 1024, 'n_head': 1024, 'n_embd': 2 ** 16,
               'bio_compartments': 1024, 'fast_weight_rank': 1024, 'synapse_chunk': 2 ** 16, 'moe_experts': 256, 'moe_top_k': 256,
               'moe_max_experts': 256, 'moe_min_experts': 256}
MAX_EXPERTS = 4096  # in a whole model: a hostile file's model is built (about 20 kB and 0.3 ms each) before its weights are read
# settings naming one of a few
CHOICES = {'mlp': ('', *MLP_KINDS), 'bio_variant': ('v3', 'v2', 'v1'), 'gelu_params_like': ('', 'v3', 'v2', 'v1')}


# GPTConfig's fields that a checkpoint decides, so that a run started from one takes them from it: all
# but vocab_size (from the data), those no weight depends on (a resume may change them), and block_size
# (also the training window, which may be shorter than the model's context)
TRAINING_ONLY = ('dropout', 'gradient_checkpointing', 'synapse_chunk', 'moe_balance', 'moe_min_experts')
ARCHITECTURE = tuple(f.name for f in fields(GPTConfig) if f.name not in ('vocab_size', 'block_size', *TRAINING_ONLY))


def setting_problem(name, value, default):
    """What is wrong with value for the GPTConfig field name (whose default gives its type), or None."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else 'is not true or false'
    if isinstance(default, str):
        return None if isinstance(value, str) and value in CHOICES[name] else f"is not one of {', '.join(map(repr, CHOICES[name]))}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f'is a {type(value).__name__}, not a number'
    if isinstance(value, int) and not isinstance(default, int) and abs(value) > sys.float_info.max:
        return 'is not a finite number'  # a file's int past float range, which float maths cannot take
    if isinstance(default, int):
        limit = SIZE_LIMITS[name]
        return None if isinstance(value, int) and 1 <= value <= limit else f'is not a whole number from 1 to {limit:,}'
    if name in ('dropout', 'fast_weight_decay'):
        return None if 0 <= value < 1 else 'is not from 0 up to (not including) 1'
    if name == 'tau_rrp':
        return None if 0 < value < math.inf else 'is not a number of positions above 0'
    if name == 'moe_balance':
        return None if 0 <= value < math.inf else 'is not a finite number from 0'
    return None if math.isfinite(value) else 'is not a finite number'


def config_problem(settings, relations=True):
    """The first thing wrong with settings (a value for each GPTConfig field), or None; relations=False
    holds each setting to its own range alone (a run that takes its architecture from a checkpoint)."""
    for f in fields(GPTConfig):
        problem = setting_problem(f.name, settings[f.name], f.default)
        if problem:
            return f'{f.name}={settings[f.name]!r:.40} {problem}'
    if not relations:
        return None
    head_size, rest = divmod(settings['n_embd'], settings['n_head'])
    if rest:
        return f"n_embd={settings['n_embd']} is not a multiple of n_head={settings['n_head']}"
    if settings['use_rope'] and settings['use_positions'] and head_size % 2:
        return f'RoPE needs an even head size (n_embd / n_head is {head_size})'
    kind = mlp_kind(settings['mlp'], settings['use_bio_mlp'])
    if settings['use_sparse_gate'] and kind != 'bio':
        return f'use_sparse_gate=True gates the bio MLP: it needs mlp=bio (this is mlp={kind})'
    if settings['use_sparse_gate'] and settings['bio_variant'] != 'v3':
        return f"use_sparse_gate=True is v3's gate; bio_variant={settings['bio_variant']} has its event layer instead"
    if settings['bio_variant'] != 'v3' and kind != 'bio':
        return f"bio_variant={settings['bio_variant']} is a bio MLP: it needs mlp=bio (this is mlp={kind})"
    if settings['gelu_params_like'] and kind not in PARAMS_LIKE_KINDS:
        return (f"gelu_params_like={settings['gelu_params_like']} widens mlp {', '.join(PARAMS_LIKE_KINDS)}: "
                f'it has no meaning with mlp={kind}')
    compartments, inputs = settings['bio_compartments'], settings['n_embd']
    # v1's inputs are cut in slices of ceil(n_embd / K): past n_embd / K or so, a last slice holds padding alone
    if 'v1' in (settings['bio_variant'], settings['gelu_params_like']) and (compartments - 1) * -(-inputs // compartments) >= inputs:
        return (f'bio_compartments={compartments} leaves a compartment without input: n_embd={inputs} is cut in '
                f'slices of {-(-inputs // compartments)}; take fewer')
    if settings['gelu_tanh'] and kind != 'gelu':
        return f'gelu_tanh=True is a setting of the GELU MLP (mlp=gelu; this is mlp={kind})'
    if settings['stochastic_release'] and not settings['use_presynaptic']:
        return 'stochastic_release=True draws the presynaptic release: it needs use_presynaptic=True'
    if settings['use_moe']:
        order = [settings[k] for k in ('moe_top_k', 'moe_min_experts', 'moe_experts', 'moe_max_experts')]
        if order != sorted(order):
            return ('use_moe=True needs moe_top_k <= moe_min_experts <= moe_experts <= moe_max_experts (here {}, {}, {}, {})'
                    .format(*order))
        if settings['n_layer'] * settings['moe_max_experts'] > MAX_EXPERTS:  # each a module built before any check
            return (f"use_moe=True builds n_layer x moe_max_experts = {settings['n_layer'] * settings['moe_max_experts']} "
                    f'experts, more than the {MAX_EXPERTS} this repository takes')
        if settings['bio_variant'] != 'v3' or settings['use_sparse_gate'] or settings['gelu_params_like']:
            return ('use_moe=True makes experts of an MLP kind as it is: not with bio_variant v1/v2, the sparse gate '
                    'or gelu_params_like')
    return None


def is_plain_tensor(value):
    """Whether value is a tensor of numbers in the CPU's memory (not sparse, not on the meta device)."""
    return isinstance(value, torch.Tensor) and value.layout == torch.strided and value.device.type == 'cpu'


def mlp_matrix_weights(config):
    """The weights of one layer's MLP matrices, a bound that needs no model: v1's and v2's H x H matrices
    are most of theirs (lineage.py); an MLP widened by gelu_params_like holds about those of the bio MLP it
    matches (rounding its width costs less than that MLP's oscillation parameters)."""
    n, hidden = config.n_embd, 4 * config.n_embd
    if config.use_moe:  # every slot's expert, each 1/top_k as wide (model_bio.make_mlp), and the router
        width = hidden if config.mlp in ('bio', 'gelu', 'relu2') else mlp_width(config)
        per_unit = 3 * n if config.mlp in GATED_KINDS else 2 * n
        return config.moe_max_experts * (per_unit * max(1, round(width / config.moe_top_k)) + n)
    if config.mlp in GATED_KINDS and not config.gelu_params_like:
        return 3 * n * mlp_width(config)
    kind = config.bio_variant if config.mlp == 'bio' else (config.gelu_params_like or 'v3')
    if kind == 'v1':
        k = config.bio_compartments
        return k * -(-n // k) * hidden + 2 * k * hidden ** 2 + 2 * hidden ** 2 + hidden * n
    return 2 * n * hidden + (2 * hidden ** 2 if kind == 'v2' else 0)


def fast_weight_matrices(config):
    """The weights of one layer's fast-weight matrices (synapses.FastWeights: queries, keys, values, read-out)."""
    return 4 * config.n_embd * config.n_head * config.fast_weight_rank if config.use_fast_weights else 0


def checked_config(source, model_args, held):
    """The GPTConfig that model_args describe, once each setting is checked and the model is known to need
    no more weights than the held numbers source stores, so that building it allocates no more.

    (A model built on the meta device would allocate nothing, but there its first ops import torch's
    compiler: a second or more at every start. The bound below needs no model.)
    """
    settings = {f.name: model_args.get(f.name, f.default) for f in fields(GPTConfig)}
    problem = config_problem(settings)
    if problem:
        raise ValueError(f'{source} describes no buildable model: {problem}')
    config = GPTConfig(**settings)
    # the fewest weights such a model has: its embedding, each layer's attention (4 n_embd^2), MLP and fast-weight
    # matrices, learned positions
    fewest = config.vocab_size * config.n_embd + config.n_layer * (4 * config.n_embd ** 2 + mlp_matrix_weights(config)
                                                                  + fast_weight_matrices(config))
    if config.use_positions and not config.use_rope:
        fewest += config.block_size * config.n_embd
    if fewest > held:
        raise ValueError(f'{source} does not match the model its settings describe: they make at least {fewest:,} '
                         f'weights (vocab_size, n_embd, n_layer, the MLP, fast weights, block_size), it holds {held:,}')
    return config


def build_model(source, config, state_dict, device):
    """The GPT of config (from checked_config), holding state_dict's weights, on device; ValueError naming
    the first weight that the model has no place for, lacks, or holds in another shape."""
    model = GPT(config)
    wanted = model.state_dict()
    mismatch = f'{source} does not match the model its settings describe:'
    for name, tensor in wanted.items():
        if name not in state_dict:
            raise ValueError(f'{mismatch} it has no {name}')
        if state_dict[name].shape != tensor.shape:
            raise ValueError(f'{mismatch} its {name} is {list(state_dict[name].shape)}, the settings make it '
                             f'{list(tensor.shape)}')
    extra = [name for name in state_dict if name not in wanted]
    if extra:
        raise ValueError(f'{mismatch} it has {extra[0]!r:.80}, which that model has no place for')
    try:
        model.load_state_dict(state_dict)
    except Exception as e:  # the shapes fit: a weight of a type no parameter takes
        raise ValueError(f'{source} holds weights the model cannot take ({error_line(e)})') from None
    for name, tensor in model.state_dict().items():  # training never saves such weights: a damaged or foreign file
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f'{source} holds weights that are not finite (NaN or infinity, in {name}): nothing can be '
                             'sampled, evaluated or trained from it; use an earlier checkpoint')
    model.to(device)
    return model


def export_model(model, checkpoint, tokenizer, folder):
    """Write model as an exported folder: model.safetensors (the tied embedding once) and config.json
    (the architecture, the tokenizer facts, and the run's settings and progress from checkpoint)."""
    from safetensors.torch import save
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != TIED_COPY}
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
    config_text = json.dumps(config, indent=2)  # before any file is written: a failure here leaves no half-made folder
    os.makedirs(folder, exist_ok=True)
    write_file(os.path.join(folder, EXPORT_WEIGHTS), save(state_dict, metadata={'format': 'pt'}))
    write_file(os.path.join(folder, EXPORT_CONFIG), config_text)


def read_export_config(config_path, shown_as=None):
    """An exported model's config.json as a dict, once it says it describes a WiggleGPT model (or a GPT-2);
    errors name it shown_as (a hub name's, say), else by its path."""
    shown_as = shown_as or config_path
    try:
        with open(config_path, encoding='utf-8') as f:
            config = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested past Python's stack
        raise ValueError(f'{shown_as} is unreadable ({error_line(e)}); export the model again') from None
    if not isinstance(config, dict) or config.get('model_type') not in (EXPORT_MODEL_TYPE, GPT2_MODEL_TYPE):
        raise ValueError(f'{shown_as} does not describe a WiggleGPT model or a GPT-2 (its model_type is not '
                         f'{EXPORT_MODEL_TYPE!r} or {GPT2_MODEL_TYPE!r})')
    return config


def load_export(folder, device, **overrides):
    """load_model for an exported folder; the checkpoint dict it returns has model_args, config (the
    run's settings), tokenizer, iter_num and best_val_loss, and no optimizer state."""
    from safetensors.torch import load_file
    config_path, weights_path = os.path.join(folder, EXPORT_CONFIG), os.path.join(folder, EXPORT_WEIGHTS)
    if not (os.path.isfile(config_path) and os.path.isfile(weights_path)):
        raise ValueError(f'{folder} is a folder without an exported model ({EXPORT_CONFIG} and {EXPORT_WEIGHTS}); '
                         'pass a checkpoint file such as its ckpt.pt')
    config = read_export_config(config_path)
    if config['model_type'] == GPT2_MODEL_TYPE:
        return load_gpt2(config_path, weights_path, config, device, overrides)
    training = config.get('training') or {}
    if (not isinstance(config.get('architecture'), dict) or not isinstance(training, dict)
            or not isinstance(training.get('settings', {}), dict)):
        raise ValueError(f'{config_path} is malformed: it needs an "architecture" object (and "training", if any, an '
                         'object whose "settings" are an object)')
    # the run's progress, checked as a checkpoint file's is (None: not recorded)
    progress = {'config': training.get('settings', {}), 'iter_num': training.get('iter_num') or 0,
                'tokens': training.get('tokens') or 0, 'best_val_loss': training.get('best_val_loss')}
    if progress['best_val_loss'] is None:
        progress['best_val_loss'] = float('inf')
    check_progress(config_path, progress)
    held = sum(math.prod(shape) for shape in safetensors_shapes(weights_path).values())
    model_config = checked_config(config_path, {**config['architecture'], **overrides}, held)
    if config.get('tokenizer') is not None:
        check_tokenizer(config['tokenizer'], model_config.vocab_size, config_path)
    try:
        state_dict = load_file(weights_path)
    except Exception as e:
        raise ValueError(f'{weights_path} is not a readable safetensors file ({error_line(e)}); export the model again') from None
    if 'transformer.wte.weight' in state_dict:
        state_dict[TIED_COPY] = state_dict['transformer.wte.weight']
    model = build_model(weights_path, model_config, state_dict, device)
    checkpoint = {'model_args': asdict(model.config), 'tokenizer': config.get('tokenizer'),
                  'format_version': config.get('format_version'), **progress}
    return model, checkpoint


def safetensors_shapes(weights_path):
    """{name: shape} of a safetensors file's tensors, from its header alone (no tensor is read); the
    tensors of such a file never overlap, so their sizes add up to what it holds."""
    from safetensors import safe_open
    try:
        with safe_open(weights_path, 'pt') as f:
            return {name: f.get_slice(name).get_shape() for name in f.keys()}
    except Exception as e:
        raise ValueError(f'{weights_path} is not a readable safetensors file ({error_line(e)}); export the model again') from None


# what a transformers GPT-2 config.json may say (its defaults first) for this model to compute the same
GPT2_AS_COMPUTED = {'activation_function': ('gelu_new', 'gelu_pytorch_tanh'), 'layer_norm_epsilon': (1e-5,),
                    'scale_attn_weights': (True,), 'scale_attn_by_inverse_layer_idx': (False,),
                    'add_cross_attention': (False,), 'tie_word_embeddings': (True,)}


def load_gpt2(config_path, weights_path, config, device, overrides):
    """load_export for a folder laid out as OpenAI's GPT-2 on the hub (the module docstring says how)."""
    from safetensors import safe_open
    shapes = safetensors_shapes(weights_path)
    stored_as = {}  # our name -> the file's, for every weight kept
    for name in shapes:
        ours = 'transformer.' + name.removeprefix('transformer.')
        if ours.endswith(('.attn.bias', '.attn.masked_bias')) or name == TIED_COPY:  # masks; the tied lm_head
            continue
        if ours in stored_as:
            raise ValueError(f'{weights_path} holds {stored_as[ours]} twice (also as {name}); which one is meant is unknown')
        stored_as[ours] = name
    held = sum(math.prod(shapes[name]) for name in stored_as.values())
    # transformers' defaults where config.json leaves a field out
    architecture = {'vocab_size': config.get('vocab_size', GPT2_VOCAB_SIZE), 'block_size': config.get('n_positions', 1024),
                    'n_layer': config.get('n_layer', 12), 'n_head': config.get('n_head', 12),
                    'n_embd': config.get('n_embd', 768), 'bias': True, 'use_bio_mlp': False, 'gelu_tanh': True,
                    'use_rmsnorm': False, 'use_rope': False, 'use_positions': True}
    model_config = checked_config(config_path, {**architecture, **overrides}, held)
    allowed = {**GPT2_AS_COMPUTED, 'n_inner': (None, 4 * model_config.n_embd)}
    for key, values in allowed.items():
        value = config.get(key, values[0])
        # by type too: true is not 1, and a list is no value at all
        if not any(type(value) is type(v) and value == v for v in values):
            raise ValueError(f'{config_path} describes a GPT-2 this model does not compute: its {key} is {shown(value)}, '
                             f'not {" or ".join(repr(v) for v in values)}')
    check_tokenizer(GPT2_TOKENIZER, model_config.vocab_size, config_path)
    try:
        with safe_open(weights_path, 'pt') as f:
            state_dict = {ours: f.get_tensor(name) for ours, name in stored_as.items()}
    except Exception as e:
        raise ValueError(f'{weights_path} is not a readable safetensors file ({error_line(e)})') from None
    for name, tensor in state_dict.items():
        if name.endswith(GPT2_CONV1D) and tensor.dim() == 2:
            state_dict[name] = tensor.t()
    if 'transformer.wte.weight' in state_dict:
        state_dict[TIED_COPY] = state_dict['transformer.wte.weight']
    model = build_model(weights_path, model_config, state_dict, device)
    checkpoint = {'model_args': asdict(model.config), 'tokenizer': GPT2_TOKENIZER, 'config': {}, 'iter_num': 0,
                  'tokens': 0, 'best_val_loss': float('inf')}
    return model, checkpoint
