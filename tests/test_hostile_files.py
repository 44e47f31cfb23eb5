"""
Files from outside are data, never code: checkpoints, exported folders and meta.pkl files that are cut
short, garbled, of the wrong types or crafted either load or stop with a one-line ValueError, quickly
(nothing large is made before the sizes are checked), and nothing in them runs.

    python -m pytest tests/test_hostile_files.py              (-m "not slow": the quick ones only)
"""

import io
import json
import os
import pickle
import resource
import time
import zipfile

import pytest
import torch

from checkpoints import export_model, load_model
from codec import load_codec, read_meta
from conftest import hub_cache, message_lines, run_script
from run_log import read_log
from model_bio import GPT, GPTConfig

SMALL = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=40, bias=False, use_bio_mlp=True,
             use_rmsnorm=True, use_rope=True)
CHARS = [chr(ord('A') + i) for i in range(40)]
# a value of every wrong kind for a setting: types, signs, sizes no machine holds, lists where values belong
BAD_VALUES = [None, 'x', '2', 2.5, -5, 0, 10 ** 12, 1e13, float('nan'), float('inf'), [1], {'a': 1}, True, False]
SECONDS_PER_FILE = 2.0  # a tiny model loads in milliseconds; a huge allocation or a loop over a huge size takes longer
MAX_GROWTH_KB = 512 * 1024  # the test's peak memory may grow this much at most


def small_checkpoint(**changes):
    """A ckpt.pt's contents, as train_bio.py writes them, for the SMALL model; changes replace entries."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL))
    checkpoint = {'model': model.state_dict(), 'model_args': dict(SMALL), 'iter_num': 1, 'best_val_loss': 2.0,
                  'config': {'dataset': 'tiny'}, 'format_version': 1}
    return {**checkpoint, **changes}


class Marker:
    """Unpickling it creates a file (how a malicious pickle would run its code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, 'w')


def write_evil_meta(folder, marker):
    """A meta.pkl whose unpickling would create marker, and is otherwise a good one."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'meta.pkl'), 'wb') as f:
        pickle.dump({'vocab_size': 40, 'itos': dict(enumerate(CHARS)), 'payload': Marker(marker)}, f)


def check_each(cases):
    """Run each (label, load) case: it must load or raise a ValueError of one non-empty line, in little time
    and memory. Returns {label: 'loaded' or the message}."""
    results, wrong = {}, []
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for label, load in cases:
        start = time.perf_counter()
        try:
            load()
            results[label] = 'loaded'
        except ValueError as e:
            results[label] = str(e)
            if not str(e).strip() or '\n' in str(e):
                wrong.append(f'{label}: not one line: {str(e)!r:.300}')
        except Exception as e:  # any other type is a traceback for the user
            wrong.append(f'{label}: {type(e).__name__}: {str(e)!r:.300}')
        if time.perf_counter() - start > SECONDS_PER_FILE:
            wrong.append(f'{label}: took {time.perf_counter() - start:.1f} s')
    assert not wrong, f'{len(wrong)} of {len(cases)} cases went wrong:\n' + '\n'.join(wrong)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < MAX_GROWTH_KB
    return results


def load_and_codec(path):
    """What a script does with a checkpoint: load it, then get its encode and decode, and use them."""
    def run():
        _, checkpoint = load_model(str(path), 'cpu')
        encode, decode = load_codec(checkpoint)
        decode(encode('AB'))
    return run


def rezipped(data, compression, claimed=None):
    """A torch.save file's bytes (data) zipped again with compression; claimed, if given, is the size the zip's
    directory then says its first entry (data.pkl) unpacks to."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(buffer, 'w', compression) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
        if claimed:
            target.infolist()[0].file_size = claimed  # written into the directory at close
    return buffer.getvalue()


def cut_points(size, count):
    return sorted(set(range(0, size, max(1, size // count))) | {1, 2, 8, size - 1})


def test_mutated_checkpoint_files_load_or_fail_in_one_line(tmp_path):
    good = tmp_path / 'good.pt'
    torch.save(small_checkpoint(), good)
    data = good.read_bytes()
    files = {}
    for offset in cut_points(len(data), 60):
        files[f'cut at {offset}'] = data[:offset]
    for offset in cut_points(len(data), 60):
        files[f'byte {offset} flipped'] = data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1:]
    for name in GPTConfig.__dataclass_fields__:
        for value in BAD_VALUES:
            files[f'{name}={value!r}'] = small_checkpoint(model_args=dict(SMALL, **{name: value}))
    weights = small_checkpoint()['model']
    wte = 'transformer.wte.weight'
    for label, changes in {
            'model a list': {'model': [1]}, 'model of numbers': {'model': {'a': 1}}, 'model empty': {'model': {}},
            'model keyed by numbers': {'model': {1: weights[wte]}}, 'model_args a number': {'model_args': 5},
            'model_args a list': {'model_args': [1]}, 'model_args None': {'model_args': None},
            'config a list': {'config': []}, 'config a string': {'config': 'x'},
            'a weight missing': {'model': {k: v for k, v in weights.items() if k != 'lm_head.weight'}},
            'an extra weight': {'model': dict(weights, extra=torch.zeros(1))},
            'a weight of another shape': {'model': dict(weights, **{wte: torch.zeros(41, 16)})},
            'a huge vocabulary claimed': {'model_args': dict(SMALL, vocab_size=10 ** 9)},
            'a weight stored once, viewed huge': {'model': dict(weights, **{wte: torch.zeros(1).expand(10 ** 6, 16)}),
                                                  'model_args': dict(SMALL, vocab_size=10 ** 6)},
            'a long context claimed': {'model_args': dict(SMALL, block_size=10 ** 12)},
            'v2 claimed of v3 weights': {'model_args': dict(SMALL, bio_variant='v2')},
            'an odd head size for RoPE': {'model_args': dict(SMALL, n_head=16)},
            'heads that do not divide the width': {'model_args': dict(SMALL, n_head=3)},
            'a tokenizer string': {'tokenizer': 'gpt2'}, 'a tokenizer of words': {'tokenizer': {'type': 'characters', 'chars': ['ab']}},
            'an original release with a loss of text': {'format_version': None, 'best_val_loss': 'low'},
            # what export_hub.py formats and writes: numbers (0-d tensors, as the original release saved them) and plain settings
            'best_val_loss text': {'best_val_loss': 'x'}, 'best_val_loss None': {'best_val_loss': None},
            'best_val_loss of two numbers': {'best_val_loss': torch.zeros(2)},
            'best_val_loss true': {'best_val_loss': torch.tensor(True)},
            'best_val_loss past float': {'best_val_loss': 10 ** 400},
            'iter_num text': {'iter_num': 'x'}, 'iter_num of four numbers': {'iter_num': torch.zeros(2, 2)},
            'iter_num negative': {'iter_num': -1}, 'iter_num a fraction in a tensor': {'iter_num': torch.tensor(1.5)},
            'iter_num past int64': {'iter_num': 2 ** 63}, 'iter_num of 5,000 digits': {'iter_num': -10 ** 5000},
            'tokens text': {'tokens': 'x'}, 'tokens of two numbers': {'tokens': torch.ones(2, dtype=torch.long)},
            'flops negative': {'flops': -1}, 'flops past int64': {'flops': 2 ** 70}, 'flops unknown': {'flops': None},
            'config holding a tensor': {'config': {'dataset': 'tiny', 'w': torch.zeros(2, 2)}},
            'config holding bytes': {'config': {'dataset': 'tiny', 'b': b'x'}},
            'config holding a list': {'config': {'dataset': 'tiny', 'l': [1]}},
            'config keyed by a number': {'config': {'dataset': 'tiny', 1: 2}},
            'config keyed by a tensor': {'config': {'dataset': 'tiny', torch.zeros(2, 2): 2}},
            'counts and loss in 0-d tensors': {'iter_num': torch.tensor(5), 'tokens': torch.tensor(7, dtype=torch.int32),
                                               'best_val_loss': torch.tensor(2.5)}}.items():
        checkpoint = small_checkpoint(**changes)
        if checkpoint.get('format_version') is None:
            del checkpoint['format_version']
        files[label] = checkpoint
    files['a checkpoint that names os.system'] = small_checkpoint(run=os.system)
    for label, contents in {'a list': [1, 2], 'a tensor': torch.zeros(3), 'a number': 5}.items():
        files[f'the checkpoint {label}'] = contents
    # torch.save stores its entries uncompressed: a compressed one (a zip bomb's way) or sizes past the file's are crafted
    files['zipped again, compressed'] = rezipped(data, zipfile.ZIP_DEFLATED)
    files['zipped again, uncompressed'] = rezipped(data, zipfile.ZIP_STORED)
    files['an entry claiming a gigabyte'] = rezipped(data, zipfile.ZIP_STORED, claimed=10 ** 9)
    cases = []
    for i, (label, contents) in enumerate(files.items()):
        path = tmp_path / f'{i}.pt'
        if isinstance(contents, bytes):
            path.write_bytes(contents)
        else:
            torch.save(contents, path)
        cases.append((label, lambda path=path: load_model(str(path), 'cpu')))
    results = check_each(cases)
    assert len(results) > 300
    assert results['cut at 0'].startswith(f'{tmp_path}/0.pt is not a readable checkpoint')  # a zero-byte file
    assert results['vocab_size=10000000000000.0'].endswith('describes no buildable model: vocab_size=10000000000000.0 '
                                                           'is not a whole number from 1 to 2,097,152')
    assert 'block_size=1000000000000 is not a whole number' in results['a long context claimed']
    assert 'describes no buildable model: vocab_size=1000000000 is not' in results['a huge vocabulary claimed']
    assert results['model a list'].endswith('is malformed: its "model" is not a dict of named tensors')
    assert results['model_args a number'].endswith('is malformed: its "model_args" (and "config", if any) must be dicts')
    assert 'they make at least 16,003,072 weights' in results['a weight stored once, viewed huge']
    # v2's H x H matrices counted before anything is built: a v3 file claiming to be v2 is refused
    assert 'they make at least 11,904 weights' in results['v2 claimed of v3 weights']
    assert results['a weight of another shape'].endswith(
        'does not match the model its settings describe: its transformer.wte.weight is [41, 16], the settings make it [40, 16]')
    assert results['an extra weight'].endswith("it has 'extra', which that model has no place for")
    assert 'RoPE needs an even head size' in results['an odd head size for RoPE']
    assert results['a checkpoint that names os.system'].endswith('holds more than tensors and plain data (Trying to '
                                                                 'load unsupported GLOBAL posix.system whose module posix is blocked)')
    assert results['gradient_checkpointing=True'] == 'loaded'
    assert results['zipped again, compressed'].endswith("is not a checkpoint as torch.save writes it: its entry "
                                                        "'good/data.pkl' is compressed (torch.save stores them as they are), "
                                                        "so it is not read")
    assert results['zipped again, uncompressed'] == 'loaded'
    assert 'is not a checkpoint as torch.save writes it: its entries claim 1,00' in results['an entry claiming a gigabyte']
    assert results['best_val_loss of two numbers'].endswith('is malformed: its best_val_loss is not a number (a Tensor)')
    assert results['best_val_loss None'].endswith('is malformed: its best_val_loss is not a number (None)')
    assert results['iter_num text'].endswith("is malformed: its iter_num is not a whole number from 0 to 2**63 ('x')")
    assert results['flops negative'].endswith('is malformed: its flops is not a whole number from 0 (-1)')
    assert results['flops past int64'] == results['flops unknown'] == 'loaded'  # a long run's count; unknown
    assert results['tokens of two numbers'].endswith('is malformed: its tokens is not a whole number from 0 to 2**63 (a Tensor)')
    assert results['config holding bytes'].endswith(
        "is malformed: its config setting 'b' is a bytes, not text, a number, true/false or None")
    assert results['config keyed by a number'].endswith('is malformed: its config has a key that is not a setting name (1)')
    assert results['counts and loss in 0-d tensors'] == 'loaded'
    torch.save(small_checkpoint(iter_num=torch.tensor(5), tokens=torch.tensor(7), best_val_loss=torch.tensor(2.5)),
               tmp_path / 'tensors.pt')
    _, checkpoint = load_model(str(tmp_path / 'tensors.pt'), 'cpu')
    assert [(checkpoint[k], type(checkpoint[k])) for k in ('iter_num', 'tokens', 'best_val_loss')] == [
        (5, int), (7, int), (2.5, float)]


def test_a_zip_bomb_is_refused_before_torch_load_unpacks_it(tmp_path, monkeypatch):
    torch.save(small_checkpoint(padding=torch.zeros(2 ** 20)), tmp_path / 'good.pt')  # 4 MB of zeros
    bomb = tmp_path / 'bomb.pt'
    bomb.write_bytes(rezipped((tmp_path / 'good.pt').read_bytes(), zipfile.ZIP_DEFLATED))
    assert bomb.stat().st_size < 100_000
    loads = []
    monkeypatch.setattr(torch, 'load', lambda *args, **kwargs: loads.append(args))
    with pytest.raises(ValueError) as raised:
        load_model(str(bomb), 'cpu')
    assert not loads
    assert str(raised.value) == (f"{bomb} is not a checkpoint as torch.save writes it: its entry 'good/data.pkl' is "
                                 "compressed (torch.save stores them as they are), so it is not read")


def test_an_export_that_cannot_be_written_leaves_no_folder(tmp_path):
    # config.json's text is made before model.safetensors is written: a setting JSON cannot hold stops both
    with pytest.raises(TypeError):
        export_model(GPT(GPTConfig(**SMALL)), small_checkpoint(config={'b': b'x'}), None, str(tmp_path / 'export'))
    assert not (tmp_path / 'export').exists()


def test_a_log_line_nested_past_python_s_stack_is_skipped_like_a_torn_one(tmp_path):
    log = tmp_path / 'log.jsonl'
    log.write_text('{"iter": 0, "val_loss": 2.0}\n' + '[' * 100000 + '\n' + '{"x": ' * 100000 + '\n'
                   '{"iter": 1, "val_loss": 1.5}\n{"iter": 2, "val')
    assert read_log(str(log)) == [{'iter': 0, 'val_loss': 2.0}, {'iter': 1, 'val_loss': 1.5}]


def exported_folder(tmp_path):
    """An exported folder of the SMALL model (with its characters); returns (folder, its config.json contents)."""
    model, checkpoint = GPT(GPTConfig(**SMALL)), small_checkpoint()
    folder = tmp_path / 'export'
    export_model(model, checkpoint, {'type': 'characters', 'chars': CHARS}, str(folder))
    return folder, json.loads((folder / 'config.json').read_text())


def test_mutated_exported_folders_load_or_fail_in_one_line(tmp_path):
    folder, good = exported_folder(tmp_path)
    weights = (folder / 'model.safetensors').read_bytes()
    configs, weight_files = {}, {}
    for name in GPTConfig.__dataclass_fields__:
        for value in BAD_VALUES:
            configs[f'{name}={value!r}'] = dict(good, architecture=dict(good['architecture'], **{name: value}))
    tokenizers = ['gpt2', 5, [], {}, {'type': 'characters'}, {'type': 'characters', 'chars': 'ABC'},
                  {'type': 'characters', 'chars': [1, 2]}, {'type': 'characters', 'chars': ['AB']},
                  {'type': 'characters', 'chars': CHARS * 2}, {'type': 'tiktoken'},
                  {'type': 'tiktoken', 'encoding': 'cl100k_base', 'eot_id': 1},
                  {'type': 'tiktoken', 'encoding': 'gpt2', 'eot_id': '5'},
                  {'type': 'tiktoken', 'encoding': 'gpt2', 'eot_id': 50256}, {'type': 'sentencepiece'}]
    for tokenizer in tokenizers:
        configs[f'tokenizer {tokenizer!r}'] = dict(good, tokenizer=tokenizer)
    for label, training in {'a list': [], 'a string': 'x', 'settings a list': {'settings': []},
                            'iter_num a string': {'iter_num': 'x'}, 'iter_num negative': {'iter_num': -1},
                            'tokens a fraction': {'tokens': 1.5}, 'best_val_loss a string': {'best_val_loss': 'x'},
                            'best_val_loss a list': {'best_val_loss': []}}.items():
        configs[f'training {label}'] = dict(good, training=training)
    for label, architecture in {'a number': 5, 'a list': [], 'None': None}.items():
        configs[f'architecture {label}'] = dict(good, architecture=architecture)
    configs['no model_type'] = {k: v for k, v in good.items() if k != 'model_type'}
    configs['a list'] = [good]
    configs['config.json nested 100,000 deep'] = '[' * 100000  # past Python's stack
    config_text = json.dumps(good)
    for offset in cut_points(len(config_text), 20):
        configs[f'config.json cut at {offset}'] = config_text[:offset]
    for offset in cut_points(len(weights), 40):
        weight_files[f'model.safetensors cut at {offset}'] = weights[:offset]
    for offset in cut_points(min(len(weights), 400), 40):  # the header: its length and the JSON after it
        weight_files[f'model.safetensors byte {offset} flipped'] = weights[:offset] + bytes([weights[offset] ^ 0xFF]) + weights[offset + 1:]
    header = json.dumps({'transformer.wte.weight': {'dtype': 'F32', 'shape': [10 ** 9, 16], 'data_offsets': [0, 64 * 10 ** 9]}})
    weight_files['a 64 GB tensor claimed'] = len(header).to_bytes(8, 'little') + header.encode() + bytes(64)
    weight_files['a header of 2**60 bytes claimed'] = (2 ** 60).to_bytes(8, 'little') + b'{}'
    folders = {label: (config, weights) for label, config in configs.items()}
    folders.update({label: (good, contents) for label, contents in weight_files.items()})
    cases = []
    for i, (label, (config, contents)) in enumerate(folders.items()):
        case = tmp_path / str(i)
        case.mkdir()
        (case / 'config.json').write_text(config if isinstance(config, str) else json.dumps(config))
        (case / 'model.safetensors').write_bytes(contents)
        cases.append((label, load_and_codec(case)))
    cases.append(('the good folder', load_and_codec(folder)))
    results = check_each(cases)
    assert len(results) > 250 and results['the good folder'] == 'loaded'
    assert results['training settings a list'].endswith('is malformed: it needs an "architecture" object (and '
                                                        '"training", if any, an object whose "settings" are an object)')
    # the run's progress is checked as a checkpoint file's is (check_progress)
    assert results['training iter_num a string'].endswith("is malformed: its iter_num is not a whole number from 0 "
                                                          "to 2**63 ('x')")
    assert results["tokenizer {'type': 'characters'}"].endswith(
        'config.json: the tokenizer\'s "chars" must be a list of single characters, at most 40 (the vocabulary); '
        'export the model again')
    assert 'GPT-2 BPE needs 50257 tokens but the model has 40' in results[
        "tokenizer {'type': 'tiktoken', 'encoding': 'gpt2', 'eot_id': 50256}"]
    assert 'describes no buildable model: block_size=1000000000000 is not a whole number' in results['block_size=1000000000000']
    assert 'model.safetensors is not a readable safetensors file' in results['a 64 GB tensor claimed']
    assert 'model.safetensors is not a readable safetensors file' in results['model.safetensors cut at 0']
    assert 'config.json is unreadable (RecursionError: ' in results['config.json nested 100,000 deep']


def gpt2_folder(folder):
    """A small GPT-2 laid out as OpenAI's is on the hub (no prefix, Conv1D weights (in, out), mask buffers, no
    lm_head), made from this repository's model; returns (its config.json contents, its weights)."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=50257, gelu_tanh=True))
    conv1d = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
    weights = {k.removeprefix('transformer.'): (v.t() if k.endswith(conv1d) else v).contiguous()
               for k, v in model.state_dict().items() if k != 'lm_head.weight'}
    weights['h.0.attn.bias'] = torch.ones(1, 1, 8, 8).tril()
    config = {'model_type': 'gpt2', 'activation_function': 'gelu_new', 'vocab_size': 50257, 'n_positions': 8,
              'n_layer': 1, 'n_head': 2, 'n_embd': 8, 'n_inner': None, 'layer_norm_epsilon': 1e-5}
    folder.mkdir()
    save_file(weights, str(folder / 'model.safetensors'))
    (folder / 'config.json').write_text(json.dumps(config))
    return config, weights


def test_mutated_gpt2_folders_load_or_fail_in_one_line(tmp_path):
    from safetensors.torch import save_file
    good, weights = gpt2_folder(tmp_path / 'gpt2')
    configs = {f'{key}={value!r}': dict(good, **{key: value}) for value in BAD_VALUES
               for key in ('vocab_size', 'n_positions', 'n_layer', 'n_head', 'n_embd', 'n_inner', 'activation_function',
                           'layer_norm_epsilon', 'scale_attn_weights', 'scale_attn_by_inverse_layer_idx',
                           'tie_word_embeddings')}
    configs['vocab_size=50000'] = dict(good, vocab_size=50000)
    configs['scale_attn_weights=1'] = dict(good, scale_attn_weights=1)  # JSON's 1 is no true
    weight_sets = {'no wte': {k: v for k, v in weights.items() if k != 'wte.weight'},
                   'no c_fc bias': {k: v for k, v in weights.items() if k != 'h.0.mlp.c_fc.bias'},
                   'c_attn stored (out, in)': dict(weights, **{'h.0.attn.c_attn.weight': weights['h.0.attn.c_attn.weight'].t().contiguous()}),
                   'c_fc a vector': dict(weights, **{'h.0.mlp.c_fc.weight': torch.zeros(8 * 32)}),
                   'an extra block': dict(weights, **{'h.1.ln_1.weight': torch.ones(8)}),
                   'wte of integers': dict(weights, **{'wte.weight': torch.zeros(50257, 8, dtype=torch.int64)}),
                   'with the transformer. prefix and lm_head': {**{'transformer.' + k: v for k, v in weights.items()},
                                                                'lm_head.weight': weights['wte.weight'].clone()},
                   'wte twice': dict(weights, **{'transformer.wte.weight': weights['wte.weight'] + 1})}
    cases = []
    for i, (label, config) in enumerate(configs.items()):
        case = tmp_path / f'config{i}'
        case.mkdir()
        os.symlink(tmp_path / 'gpt2' / 'model.safetensors', case / 'model.safetensors')
        (case / 'config.json').write_text(json.dumps(config))
        cases.append((label, load_and_codec(case)))
    for i, (label, contents) in enumerate(weight_sets.items()):
        case = tmp_path / f'weights{i}'
        case.mkdir()
        save_file(contents, str(case / 'model.safetensors'))
        (case / 'config.json').write_text(json.dumps(good))
        cases.append((label, load_and_codec(case)))
    cases.append(('the good folder', load_and_codec(tmp_path / 'gpt2')))
    results = check_each(cases)
    assert results['the good folder'] == 'loaded' and results['with the transformer. prefix and lm_head'] == 'loaded'
    assert "its activation_function is 'x', not 'gelu_new' or 'gelu_pytorch_tanh'" in results["activation_function='x'"]
    assert 'its n_inner is 2.5, not None or 32' in results['n_inner=2.5']
    assert 'its scale_attn_weights is 1, not True' in results['scale_attn_weights=1']
    assert 'holds transformer.wte.weight twice (also as wte.weight)' in results['wte twice']
    assert 'GPT-2 BPE needs 50257 tokens but the model has 50000' in results['vocab_size=50000']
    assert 'its transformer.h.0.attn.c_attn.weight is [8, 24]' in results['c_attn stored (out, in)']
    assert "it has 'transformer.h.1.ln_1.weight', which that model has no place for" in results['an extra block']


def test_a_meta_pkl_is_read_as_plain_data_and_checked(tmp_path):
    marker = tmp_path / 'ran'
    write_evil_meta(tmp_path / 'evil', marker)
    good = {'vocab_size': 3, 'itos': {0: 'a', 1: 'b', 2: 'c'}, 'stoi': {'a': 0, 'b': 1, 'c': 2}}
    data = pickle.dumps(good)
    contents = {'good': data, 'empty': b'', 'junk': b'\x80\x05not a pickle'}
    for offset in range(1, len(data)):
        contents[f'cut at {offset}'] = data[:offset]
    for label, meta in {'a list': [1], 'no vocab_size': {'itos': good['itos']}, 'vocab_size a string': dict(good, vocab_size='3'),
                        'vocab_size 0': dict(good, vocab_size=0), 'vocab_size huge': dict(good, vocab_size=10 ** 13),
                        'vocab_size True': dict(good, vocab_size=True), 'itos a list': dict(good, itos=['a', 'b', 'c']),
                        'itos from 1': dict(good, itos={1: 'a', 2: 'b'}), 'itos of numbers': dict(good, itos={0: 5}),
                        'itos longer than vocab_size': dict(good, vocab_size=2)}.items():
        contents[label] = pickle.dumps(meta)
    contents['os.system'] = pickle.dumps({'vocab_size': 3, 'itos': good['itos'], 'x': os.system})
    cases = [('a pickle that opens a file', lambda: read_meta(str(tmp_path / 'evil' / 'meta.pkl')))]
    for i, (label, data) in enumerate(contents.items()):
        (tmp_path / f'{i}.pkl').write_bytes(data)
        cases.append((label, lambda path=tmp_path / f'{i}.pkl': read_meta(str(path))))
    results = check_each(cases)
    assert not marker.exists()
    assert read_meta(str(tmp_path / '0.pkl')) == good and results['good'] == 'loaded'
    assert results['a pickle that opens a file'] == (
        f'{tmp_path}/evil/meta.pkl names io.open, and a meta.pkl may hold only plain data (such a pickle can run '
        'code); it is not read: run python data/evil/prepare.py again')
    assert 'names posix.system' in results['os.system']
    assert all(message != 'loaded' for label, message in results.items() if label != 'good')


def test_a_checkpoint_names_its_dataset_by_a_plain_name_alone(tmp_path):
    marker = tmp_path / 'ran'
    write_evil_meta(tmp_path / 'evil', marker)
    cases = []
    for dataset in ('../../x', str(tmp_path / 'evil'), 'evil/../tiny', '..', '.', '', 'a\\b', 5, ['tiny']):
        checkpoint = {'model_args': dict(SMALL), 'config': {'dataset': dataset}}
        cases.append((repr(dataset), lambda checkpoint=checkpoint: load_codec(checkpoint)))
    results = check_each(cases)
    assert not marker.exists()
    assert results["'../../x'"] == ("the checkpoint names dataset='../../x', which is not a folder name in data/ (such as "
                                    'shakespeare_char); its characters are read from data/<dataset>/meta.pkl alone')
    assert all('is not a folder name in data/' in message for message in results.values())


@pytest.mark.slow
def test_scripts_refuse_a_dataset_outside_data_and_a_hub_checkpoint_s_dataset(workdir):
    marker = workdir / 'ran'
    # '../../<workdir>/evil', from data/: a folder outside data/ (still inside this test's folder)
    write_evil_meta(workdir / 'evil', marker)
    torch.save(small_checkpoint(config={'dataset': f'../../{workdir.name}/evil'}), workdir / 'crafted.pt')
    sample = ['sample_bio.py', '--device=cpu', '--num_samples=1', '--max_new_tokens=4', '--temperature=0', '--start=AB']
    proc = run_script(workdir, *sample, '--out_dir=.', '--ckpt=crafted.pt', check=False)
    assert proc.returncode == 2 and not marker.exists()
    assert message_lines(proc.stderr) == [
        f"error: the checkpoint names dataset='../../{workdir.name}/evil', which is not a folder name in data/ "
        '(such as shakespeare_char); its characters are read from data/<dataset>/meta.pkl alone']

    # from the hub, a checkpoint's dataset is its uploader's: the meta.pkl of a folder here of that name is never
    # opened; a GPT-2-sized vocabulary is GPT-2 BPE, a smaller one an error
    write_evil_meta(workdir / 'data' / 'tiny', marker)
    bpe = dict(SMALL, vocab_size=50304)
    torch.manual_seed(0)
    torch.save(small_checkpoint(model=GPT(GPTConfig(**bpe)).state_dict(), model_args=bpe), workdir / 'bpe.pt')
    model, checkpoint = GPT(GPTConfig(**SMALL)), small_checkpoint()
    export_model(model, checkpoint, None, str(workdir / 'export'))  # no tokenizer facts: its dataset, tiny, would say
    cache = workdir / 'hub-cache'
    hub_cache(cache, 'own/bpe', {'ckpt.pt': workdir / 'bpe.pt'})
    hub_cache(cache, 'own/chars', {n: workdir / 'export' / n for n in ('config.json', 'model.safetensors')})
    env = {**os.environ, 'HF_HUB_CACHE': str(cache), 'HF_HUB_OFFLINE': '1'}
    proc = run_script(workdir, *sample, '--ckpt=hf:own/bpe/ckpt.pt', env=env)
    assert proc.stdout.startswith('AB') and not marker.exists()
    proc = run_script(workdir, *sample, '--ckpt=hf:own/chars', env=env, check=False)
    assert proc.returncode == 2 and not marker.exists()
    assert message_lines(proc.stderr) == [
        "error: the hub checkpoint has a 40-token vocabulary but does not carry its characters, and a hub checkpoint's "
        'are never read from data/ here: download the file and pass its local path, with its dataset prepared in data/']
