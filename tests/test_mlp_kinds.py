"""
The MLP kinds (GPTConfig.mlp): each one's parameters at the repository's configs, its formula against a
float64 reference, the KV cache, autocast, gradient checkpointing, export and reload; use_bio_mlp as the
older name of 'bio' and 'gelu'; the parameter-matched widths; train_bio.py with a kind, as users run it.

    python -m pytest tests/test_mlp_kinds.py
"""

import math
import os
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from checkpoints import export_model, load_export, load_model, save_checkpoint
from conftest import REPO, TINY, load, message_lines, run_script
from generation import generate_tokens
from model_bio import GPT, MLP_KINDS, GPTConfig

SMALL = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50)


def config_file_model(name):
    """The architecture a config file gives train_bio.py (its defaults where the file is silent)."""
    settings = {}
    with open(os.path.join(REPO, name)) as f:
        exec(f.read(), settings)
    train_defaults = dict(bias=False, use_rmsnorm=True, use_rope=True, vocab_size=50304)  # train_bio.py's
    keys = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'use_rmsnorm', 'use_rope')
    return {**train_defaults, **{k: settings[k] for k in keys if k in settings}}


def test_parameter_counts_of_each_kind_at_the_quick_start_and_124m_configs():
    quick = dict(config_file_model('config_shakespeare_char_cpu.py'), vocab_size=65)
    gpt2 = config_file_model('config_gpt2_bio_3070.py')
    expected = {  # get_num_params: the tied embedding once, learned positions left out
        'quick': {'bio': 802_048, 'gelu': 795_904, 'swiglu': 795_392, 'relu2': 795_904, 'bio_glu': 799_484},
        '124M': {'bio': 123_697_920, 'gelu': 123_587_328, 'swiglu': 123_587_328, 'relu2': 123_587_328,
                 'bio_glu': 123_661_056},
    }
    with torch.device('meta'):  # counted without allocating
        counts = {name: {kind: GPT(GPTConfig(**cfg, mlp=kind)).get_num_params() for kind in MLP_KINDS}
                  for name, cfg in (('quick', quick), ('124M', gpt2))}
    assert counts == expected
    # at 768 (a multiple of 3) SwiGLU's three matrices of 2048 hold GELU's two of 3072 exactly; at 128 the
    # width rounds to 341, one row of 3 x 128 short of 8/3; bio_glu adds omega, phi, baseline per gate neuron
    assert counts['124M']['bio_glu'] - counts['124M']['swiglu'] == 12 * 3 * 2048
    assert counts['quick']['gelu'] - counts['quick']['swiglu'] == 4 * 128


def test_a_matched_mlp_holds_the_parameters_of_the_bio_mlp_it_is_matched_to():
    with torch.device('meta'):
        for variant in ('v3', 'v2', 'v1'):
            bio = GPT(GPTConfig(**SMALL, bias=True, mlp='bio', bio_variant=variant)).get_num_params()
            for kind, per_unit in (('gelu', 2 * 32 + 1), ('relu2', 2 * 32 + 1), ('swiglu', 3 * 32 + 2)):
                matched = GPT(GPTConfig(**SMALL, bias=True, mlp=kind, gelu_params_like=variant)).get_num_params()
                # to within half a hidden unit in each layer
                assert abs(matched - bio) <= SMALL['n_layer'] * per_unit / 2, (variant, kind)


def test_use_bio_mlp_names_bio_and_gelu_and_mlp_decides_where_set():
    assert (GPTConfig(use_bio_mlp=True).mlp, GPTConfig(use_bio_mlp=False).mlp, GPTConfig().mlp) == ('bio', 'gelu', 'gelu')
    for kind in MLP_KINDS:
        for use_bio_mlp in (True, False):
            config = GPTConfig(mlp=kind, use_bio_mlp=use_bio_mlp)
            assert (config.mlp, config.use_bio_mlp) == (kind, kind == 'bio')
            assert GPTConfig(**asdict(config)) == config  # what a checkpoint records builds the same model


def reference_mlp(kind, mlp, x):
    """The MLP's output in float64 from its weights by the plain formulas (torch.tanh, erf, x * sigmoid(x))."""
    def linear(layer, h):
        return F.linear(h, layer.weight.double(), None if layer.bias is None else layer.bias.double())

    def oscillation(h, act):
        return torch.sin(act.omega.double() * h + act.phi.double()) * torch.tanh(h) + act.baseline.double()

    h = linear(mlp.c_fc, x)
    if kind == 'gelu':
        a = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    elif kind == 'relu2':
        a = torch.where(h > 0, h * h, torch.zeros_like(h))
    elif kind == 'bio':
        a = oscillation(h, mlp.activation)
    else:
        gate, value = h[..., :h.size(-1) // 2], h[..., h.size(-1) // 2:]
        a = (gate * torch.sigmoid(gate) if kind == 'swiglu' else oscillation(gate, mlp.activation)) * value
    return linear(mlp.c_proj, a)


@pytest.mark.parametrize('kind', MLP_KINDS)
@pytest.mark.parametrize('bias', [False, True])
def test_each_kind_computes_its_formula(kind, bias):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, bias=bias, mlp=kind))
    mlp = model.transformer.h[0].mlp
    with torch.no_grad():
        for p in mlp.parameters():  # biases and oscillation parameters away from their initial 0s
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(3, 5, 32, dtype=torch.float64) * 2
    expected = reference_mlp(kind, mlp, x)
    # float32's rounding, summed over a hidden layer, against the output's scale
    torch.testing.assert_close(mlp(x.float()).double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    # and its gradients for the input and the oscillation's parameters (its hand-derived backward, on the
    # gate's strided view in bio_glu); the matrices' are PyTorch's own
    mlp.double()
    oscillation = [p for name, p in mlp.named_parameters() if name.startswith('activation.')]
    assert torch.autograd.gradcheck(lambda x, *params: mlp(x), (x[:1, :2].requires_grad_(), *oscillation))


def tiny_sharp(kind, **overrides):
    """A tiny model with large random weights, so that its next token depends on every earlier one."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, mlp=kind, use_rope=True, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


@pytest.mark.parametrize('kind', MLP_KINDS)
def test_each_kind_s_cached_tokens_are_its_recomputed_ones(kind):
    model = tiny_sharp(kind)
    tokens = {use_cache: list(generate_tokens(model, [1, 2, 3], 20, temperature=1.0, top_k=20, use_cache=use_cache,
                                              generator=torch.Generator().manual_seed(3)))
              for use_cache in (True, False)}
    assert tokens[True] == tokens[False] and len(set(tokens[True])) > 4
    idx = torch.randint(0, 50, (2, 12))
    cache = model.new_kv_cache()
    model(idx[:, :6], kv_cache=cache)
    for t in range(6, 12):
        torch.testing.assert_close(model(idx[:, t:t + 1], kv_cache=cache)[0], model(idx[:, :t + 1])[0],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kind', MLP_KINDS)
def test_each_kind_trains_under_autocast_and_gradient_checkpointing(kind):
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**SMALL, mlp=kind))
    checkpointed = GPT(GPTConfig(**SMALL, mlp=kind, gradient_checkpointing=True))
    checkpointed.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 50, (2, 16))
    plain(idx, idx)[1].backward()
    checkpointed(idx, idx)[1].backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
    # bfloat16 autocast (a CPU has it; CUDA's float16 is the same code path in the MLPs): near float32
    reference = plain(idx, idx)[1].item()
    plain.zero_grad()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = plain(idx, idx)[1]
    loss.backward()
    assert abs(loss.item() - reference) < 0.05 * reference
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in plain.parameters())


@pytest.mark.parametrize('kind', MLP_KINDS)
def test_each_kind_saves_exports_and_reloads_to_the_same_logits(kind, tmp_path):
    model = tiny_sharp(kind)
    checkpoint = {'model': model.state_dict(), 'model_args': asdict(model.config), 'iter_num': 1,
                  'best_val_loss': 2.0, 'config': {}, 'format_version': 1}
    save_checkpoint(checkpoint, str(tmp_path / 'ckpt.pt'))
    export_model(model, checkpoint, None, str(tmp_path / 'export'))
    idx = torch.randint(0, 50, (2, 10))
    expected = model(idx, all_positions=True)[0]
    for loaded, _ in (load_model(str(tmp_path / 'ckpt.pt'), 'cpu'), load_export(str(tmp_path / 'export'), 'cpu')):
        assert loaded.config.mlp == kind
        torch.testing.assert_close(loaded.eval()(idx, all_positions=True)[0], expected, rtol=0, atol=0)


def test_a_checkpoint_from_before_mlp_existed_loads_as_its_use_bio_mlp_says(tmp_path):
    for use_bio_mlp, kind in ((True, 'bio'), (False, 'gelu')):
        model = tiny_sharp(kind)
        old_args = {k: v for k, v in asdict(model.config).items() if k != 'mlp'}
        old_args['use_bio_mlp'] = use_bio_mlp
        save_checkpoint({'model': model.state_dict(), 'model_args': old_args, 'iter_num': 1, 'best_val_loss': 2.0,
                         'config': {}, 'format_version': 1}, str(tmp_path / 'old.pt'))
        loaded, checkpoint = load_model(str(tmp_path / 'old.pt'), 'cpu')
        assert loaded.config.mlp == kind and checkpoint['model_args']['mlp'] == kind
        idx = torch.randint(0, 50, (1, 8))
        torch.testing.assert_close(loaded.eval()(idx)[0], model(idx)[0], rtol=0, atol=0)


@pytest.mark.slow
def test_train_bio_trains_samples_and_keeps_a_kind_as_users_run_it(workdir):
    run_script(workdir, 'train_bio.py', *TINY, '--mlp=bio_glu', '--max_iters=4', '--eval_interval=2', '--out_dir=glu')
    saved = load(workdir / 'glu' / 'ckpt.pt')
    assert saved['iter_num'] == 4 and (saved['model_args']['mlp'], saved['model_args']['use_bio_mlp']) == ('bio_glu', False)
    assert 'transformer.h.0.mlp.activation.omega' in saved['model']
    sample = run_script(workdir, 'sample_bio.py', '--out_dir=glu', '--device=cpu', '--start=abc', '--num_samples=1',
                        '--max_new_tokens=5')
    assert sample.stdout.startswith('abc') and sample.stdout.endswith('---------------\n')
    # a new run from its weights keeps its MLP; asking for another is one line, and nothing is written
    refused = run_script(workdir, 'train_bio.py', *TINY, '--init_from=glu/ckpt.pt', '--mlp=swiglu', '--out_dir=other',
                         check=False)
    assert refused.returncode == 2 and message_lines(refused.stderr) == [
        'error: glu/ckpt.pt has the MLP mlp=bio_glu, so mlp=swiglu cannot start from its weights; leave mlp and '
        'use_bio_mlp out (the checkpoint keeps its MLP) or train mlp=swiglu from scratch']
    assert not (workdir / 'other').exists()
