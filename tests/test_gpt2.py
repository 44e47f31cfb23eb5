"""
OpenAI's GPT-2 by name (checkpoints.py): a small random GPT-2 made by transformers, laid out as the hub
holds openai-community/gpt2 (conftest.write_gpt2_hub), loads through the real huggingface_hub offline
and computes what transformers' GPT2LMHeadModel computes; the scripts take the name wherever they take
a checkpoint. transformers is a test-only dependency: these tests skip without it.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import prepared_data
from checkpoints import export_model, load_model
from codec import GPT2_TOKENIZER
from conftest import message_lines, run_script, write_gpt2_hub
from test_finetune import FINETUNE, prepare

pytest.importorskip('transformers')


@pytest.fixture
def gpt2_hub(tmp_path, monkeypatch):
    """A random GPT-2 in a local hub cache, which this process's huggingface_hub reads offline; returns
    (the transformers model, the environment for scripts)."""
    import huggingface_hub.constants
    cache = tmp_path / 'hub'
    hf_model = write_gpt2_hub(str(cache))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    return hf_model, {**os.environ, 'HF_HUB_CACHE': str(cache), 'HF_HUB_OFFLINE': '1'}


def test_gpt2_computes_the_logits_of_transformers_gpt2(gpt2_hub, tmp_path):
    hf_model, _ = gpt2_hub
    model, checkpoint = load_model('gpt2', 'cpu')
    model.eval()
    assert checkpoint['tokenizer'] == GPT2_TOKENIZER and checkpoint['from_hub']
    config = model.config
    assert (config.vocab_size, config.block_size, config.bias, config.use_bio_mlp, config.gelu_tanh) == (50257, 64, True, False, True)
    idx = torch.randint(0, 50257, (3, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model(idx).logits
        logits, _ = model(idx, all_positions=True)
        assert (logits - expected).abs().max() < 1e-5
        # the tanh approximation is what makes them equal: exact GELU is measurably off
        model.transformer.h[0].mlp.act.approximate = 'none'
        assert (model(idx, all_positions=True)[0] - expected).abs().max() > 1e-4
    # an exported GPT-2 keeps computing it
    model.transformer.h[0].mlp.act.approximate = 'tanh'
    export_model(model, checkpoint, GPT2_TOKENIZER, str(tmp_path / 'export'))
    exported, _ = load_model(str(tmp_path / 'export'), 'cpu')
    with torch.no_grad():
        assert (exported.eval()(idx, all_positions=True)[0] - expected).abs().max() < 1e-5


def test_a_gpt2_this_model_does_not_compute_is_one_line(gpt2_hub, tmp_path):
    import json

    import huggingface_hub
    config_path = huggingface_hub.hf_hub_download('openai-community/gpt2', 'config.json')
    folder = os.path.dirname(config_path)
    with open(config_path) as f:
        config = json.load(f)
    cases = {'activation_function': 'relu', 'layer_norm_epsilon': 1e-6, 'n_inner': 100,
             'scale_attn_by_inverse_layer_idx': True, 'tie_word_embeddings': False, 'n_embd': [32]}
    for key, value in cases.items():
        variant = tmp_path / key
        variant.mkdir()
        os.symlink(os.path.join(folder, 'model.safetensors'), variant / 'model.safetensors')
        (variant / 'config.json').write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError) as error:
            load_model(str(variant), 'cpu')
        assert key in str(error.value) and '\n' not in str(error.value), (key, error.value)


def bpe_workdir(workdir):
    """workdir with data/bpe: random GPT-2 BPE tokens (no meta.pkl), as the BPE prepare scripts write them."""
    staging = prepared_data.staging_dir(str(workdir / 'data' / 'bpe'))
    rng = np.random.default_rng(0)
    for split, n in (('train', 4000), ('val', 1000)):
        rng.integers(0, 50257, n, dtype=np.uint16).tofile(os.path.join(staging, f'{split}.bin'))
    prepared_data.commit(str(workdir / 'data' / 'bpe'), 'tests/test_gpt2.py')
    return workdir


@pytest.mark.slow
def test_scripts_take_gpt2_by_name(gpt2_hub, workdir):
    """sample_bio greedy equals transformers' greedy generate; training and fine-tuning start from its
    weights; the oscillating MLP cannot start from them; a name not in the cache is one line."""
    hf_model, env = gpt2_hub
    bpe_workdir(workdir)
    conversations, _ = prepare(workdir, '--val_fraction=0.2')
    os.rename(conversations, workdir / 'data' / 'chat')
    (workdir / 'out' / 'gpt2').mkdir(parents=True)  # a local folder of that name: the name still means OpenAI's
    prompt = 'The meaning of life is'
    train = ['--device=cpu', '--dtype=float32', '--dataset=bpe', '--block_size=32', '--batch_size=2',
             '--gradient_accumulation_steps=1', '--eval_iters=1', '--warmup_iters=1', '--lr_decay_iters=6',
             '--learning_rate=1e-3', '--max_iters=4', '--eval_interval=4']
    runs = {
        'sample': ('sample_bio.py', '--ckpt=gpt2', f'--start={prompt}', '--temperature=0', '--num_samples=1',
                   '--max_new_tokens=12', '--device=cpu', '--dtype=float32'),
        # its own architecture asked (gelu_tanh on, where train_bio's default MLP is the oscillating one)
        'train': ('train_bio.py', '--init_from=gpt2', '--out_dir=from-gpt2', '--gelu_tanh=True', *train),
        'finetune': ('finetune_native.py', *FINETUNE, '--init_from=gpt2', '--max_iters=2', '--eval_interval=2'),
        'bio': ('train_bio.py', '--init_from=gpt2', '--use_bio_mlp=True', '--out_dir=bio', *train),
        'medium': ('sample_bio.py', '--ckpt=gpt2-medium', '--device=cpu'),
    }
    with ThreadPoolExecutor(4) as pool:
        procs = dict(zip(runs, pool.map(lambda args: run_script(workdir, *args, env=env, check=False), runs.values())))

    import tiktoken
    enc = tiktoken.get_encoding('gpt2')
    with torch.no_grad():
        greedy = hf_model.generate(torch.tensor([enc.encode(prompt)]), max_new_tokens=12, do_sample=False,
                                   pad_token_id=50256)
    assert procs['sample'].returncode == 0, procs['sample'].stderr
    assert procs['sample'].stdout == enc.decode(greedy[0].tolist()) + '\n---------------\n'
    assert "note: gpt2 names OpenAI's GPT-2 (from the hub); for the local out/gpt2, pass --ckpt=out/gpt2" in procs['sample'].stderr

    assert procs['train'].returncode == 0, procs['train'].stderr
    assert 'starting from the weights of gpt2' in procs['train'].stdout
    saved = torch.load(workdir / 'from-gpt2' / 'ckpt.pt', weights_only=True)
    assert saved['iter_num'] == 4 and saved['model_args']['gelu_tanh'] and saved['model_args']['vocab_size'] == 50257
    # it trained from GPT-2's weights: the position table moved little from them
    wpe = hf_model.transformer.wpe.weight
    assert (saved['model']['transformer.wpe.weight'] - wpe).abs().max() < 0.05
    resumed = run_script(workdir, 'train_bio.py', '--init_from=resume', '--out_dir=from-gpt2', *train[:-2],
                         '--max_iters=6', '--eval_interval=6', env=env)
    assert 'resuming from from-gpt2/ckpt.pt at iter 4' in resumed.stdout
    saved = torch.load(workdir / 'from-gpt2' / 'ckpt.pt', weights_only=True)
    assert saved['iter_num'] == 6 and saved['model_args']['gelu_tanh'] and not saved['model_args']['use_bio_mlp']

    assert procs['finetune'].returncode == 0, procs['finetune'].stderr
    tuned = torch.load(workdir / 'ft' / 'ckpt.pt', weights_only=True)
    assert tuned['iter_num'] == 2 and tuned['model_args']['gelu_tanh'] and tuned['config']['task'] == 'finetune'

    for name in ('bio', 'medium'):
        proc = procs[name]
        assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr
        assert len(message_lines(proc.stderr)) == 1, proc.stderr
    assert 'has the MLP mlp=gelu, so mlp=bio cannot start from its weights' in procs['bio'].stderr
    assert not (workdir / 'bio').exists()
    assert 'gpt2-medium is not in the local hub cache' in procs['medium'].stderr
