"""
The model: RoPE, the sparse gate, parameter counts and FLOPs, weight decay groups, checkpoints.

    python -m pytest tests/test_model.py              (-m "not slow": the quick ones only)
"""

import os

import pytest
import torch

from conftest import REPO
import oscillation
from checkpoints import load_model, save_checkpoint
from model_bio import GPT, GPTConfig, OscillatingActivation, SparseGate, apply_rope, rope_tables

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    head_dim = 16
    cos, sin = rope_tables(head_dim, 64)
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(m, n):  # q at position m, k at position n
        rq = apply_rope(q.view(1, 1, 1, -1), cos[m:m + 1], sin[m:m + 1])
        rk = apply_rope(k.view(1, 1, 1, -1), cos[n:n + 1], sin[n:n + 1])
        return (rq * rk).sum().item()

    for m, n, shift in [(5, 2, 10), (0, 0, 40), (9, 3, 1)]:
        assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-4)
    # and it is not a no-op: a different offset gives a different score
    assert abs(score(5, 2) - score(5, 4)) > 1e-3


def test_rope_changes_attention_and_any_length_works():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, use_rope=True))
    model.eval()
    for T in (1, 2, 7, 16):
        logits, _ = model(torch.randint(0, 50, (2, T)))
        assert logits.shape == (2, 1, 50)
    # the rotation must reach attention: the same weights with no positional encoding give other logits
    # (order alone is not a test: a causal model without positions is not order-blind either)
    unrotated = GPT(GPTConfig(**TINY, use_rope=True, use_positions=False))
    unrotated.load_state_dict(model.state_dict())
    unrotated.eval()
    idx = torch.tensor([[3, 7, 3, 9]])
    assert not torch.allclose(model(idx)[0], unrotated(idx)[0], atol=1e-4)
    assert torch.equal(model(idx[:, :1])[0], unrotated(idx[:, :1])[0])  # position 0 is not rotated


def test_sparse_gate_sparsity_is_the_zero_fraction_and_gate_learns():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, use_bio_mlp=True, use_sparse_gate=True))
    outputs = []
    for gate in model.sparse_gates():
        gate.register_forward_hook(lambda mod, inp, out: outputs.append(out.detach()))
    idx = torch.randint(0, 50, (4, 16))
    _, loss = model(idx, idx)
    loss.backward()
    zeros = sum((o == 0).sum().item() for o in outputs)
    total = sum(o.numel() for o in outputs)
    assert 0 < zeros < total
    assert model.read_sparsity() == pytest.approx(zeros / total, abs=1e-12)
    assert model.read_sparsity() is None  # reading resets the count
    for gate in model.sparse_gates():
        assert gate.gate_weight.grad is not None and gate.gate_weight.grad.abs().sum() > 0
        assert gate.gate_bias.grad is not None and gate.gate_bias.grad.abs().sum() > 0


@pytest.mark.parametrize('impl', ['plain', 'function'])
def test_sparse_gate_forward_is_exact_and_backward_is_the_sigmoid_surrogate(impl, monkeypatch):
    monkeypatch.setattr(oscillation, 'OSCILLATION_IMPL', impl)
    torch.manual_seed(0)
    gate, act = SparseGate(6, threshold=0.25).double(), OscillatingActivation(6).double()
    with torch.no_grad():
        gate.gate_weight.copy_(torch.linspace(0.5, 1.5, 6))
        gate.gate_bias.copy_(torch.linspace(-0.2, 0.2, 6))
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    out = gate(x, act)
    # by hand: a = sin(w x + p) tanh(x) + b, and its derivative in x
    w, p, b = act.omega.detach(), act.phi.detach(), act.baseline.detach()
    xd = x.detach()
    a = torch.sin(w * xd + p) * torch.tanh(xd) + b
    da_dx = w * torch.cos(w * xd + p) * torch.tanh(xd) + torch.sin(w * xd + p) * (1 - torch.tanh(xd) ** 2)
    voltage = gate.gate_weight.detach() * xd + gate.gate_bias.detach() - 0.25
    fires = voltage > 0
    assert 0 < fires.sum() < fires.numel()
    assert torch.equal(out.detach() == 0, ~fires | (a == 0))  # silent neurons are exactly 0
    torch.testing.assert_close(out.detach(), torch.where(fires, a, torch.zeros_like(a)))
    upstream = torch.randn_like(out)
    out.backward(upstream)
    s = torch.sigmoid(5 * voltage)
    dvoltage = upstream * a * 5 * s * (1 - s)
    torch.testing.assert_close(x.grad, upstream * fires * da_dx + dvoltage * gate.gate_weight.detach())
    torch.testing.assert_close(act.baseline.grad, (upstream * fires).sum(0))
    torch.testing.assert_close(gate.gate_weight.grad, (dvoltage * xd).sum(0))
    torch.testing.assert_close(gate.gate_bias.grad, dvoltage.sum(0))


def test_oscillating_activation_formula_and_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, use_bio_mlp=True))
    act = model.transformer.h[0].mlp.activation
    x = torch.randn(3, 128)
    expected = torch.sin(act.omega * x + act.phi) * torch.tanh(x) + act.baseline
    assert torch.allclose(act(x), expected)
    omegas = torch.cat([b.mlp.activation.omega for b in model.transformer.h]).detach()
    assert abs(omegas.mean().item() - 1.0) < 0.03 and abs(omegas.std().item() - 0.1) < 0.03
    assert all((b.mlp.activation.baseline == 0).all() for b in model.transformer.h)


@pytest.mark.slow
def test_param_counts_of_the_124m_config():
    settings = {}
    with open(os.path.join(REPO, 'config_gpt2_bio_3070.py')) as f:
        exec(f.read(), settings)
    model_keys = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'use_bio_mlp', 'use_rmsnorm', 'use_rope')
    cfg = {k: settings[k] for k in model_keys}
    with torch.device('meta'):  # counted without allocating
        bio = GPT(GPTConfig(**cfg)).get_num_params()
        gelu = GPT(GPTConfig(**{**cfg, 'use_bio_mlp': False})).get_num_params()
        gated = GPT(GPTConfig(**cfg, use_sparse_gate=True)).get_num_params()
    assert bio == 123_697_920
    assert bio - gelu == 110_592
    assert gated - bio == 2 * 3072 * 12


def test_param_counts_of_the_lineage():
    # seed 002's small v2 and seed 000's v1 setup: 4 layers, 6 heads, 384 wide, no biases (no position embedding counted)
    small = dict(n_layer=4, n_head=6, n_embd=384, vocab_size=50304, bias=False, use_bio_mlp=True)
    with torch.device('meta'):  # counted without allocating
        assert GPT(GPTConfig(**small, bio_variant='v2')).get_num_params() == 45_309_312  # seed 002's "45.31M"
        assert GPT(GPTConfig(**small, bio_variant='v1', bio_compartments=2)).get_num_params() == 83_058_064  # not 89M
        # at GPT-2's size the H x H matrices dominate (seed 004's blow-ups)
        counts = {v: GPT(GPTConfig(bias=False, use_bio_mlp=True, bio_variant=v)).get_num_params() for v in ('v2', 'v1')}
        assert counts == {'v2': 350_300_928, 'v1': 803_285_808}
        # the parameter-matched GELU control: as many parameters as each bio MLP, to within one hidden neuron
        for variant, bio in (('v3', 26_416_512), ('v2', 45_309_312), ('v1', 83_058_064)):
            gelu = GPT(GPTConfig(**{**small, 'use_bio_mlp': False}, gelu_params_like=variant))
            assert abs(gelu.get_num_params() - bio) <= 2 * 384 and isinstance(gelu.transformer.h[0].mlp.act, torch.nn.GELU)


def test_the_size_bound_of_a_checkpoint_s_settings_holds_for_every_mlp():
    # checkpoints.py refuses a file holding fewer weights than its settings' MLP matrices need: a bound that
    # must never exceed a real model (else a good file is refused) and must count what makes v1/v2 large
    from checkpoints import mlp_matrix_weights
    for settings in ({}, {'gelu_params_like': 'v1'}, {'use_bio_mlp': True}, {'use_bio_mlp': True, 'bio_variant': 'v2'},
                     {'use_bio_mlp': True, 'bio_variant': 'v1', 'bio_compartments': 4}):
        for bias in (False, True):
            config = GPTConfig(n_layer=1, n_head=2, n_embd=30, vocab_size=50, bias=bias, **settings)
            mlp = sum(p.numel() for p in GPT(config).transformer.h[0].mlp.parameters())
            assert 0.9 * mlp <= mlp_matrix_weights(config) <= mlp, (settings, bias)


def test_loss_ignores_minus_one_targets():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    idx = torch.randint(0, 50, (2, 8))
    targets = idx.clone()
    targets[:, :4] = -1
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 50), idx[:, 4:].reshape(-1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**TINY, use_bio_mlp=True, use_rope=True))
    ckpt = GPT(GPTConfig(**TINY, use_bio_mlp=True, use_rope=True, gradient_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 50, (2, 16))
    block_runs = {}
    for m in (plain, ckpt):
        runs = block_runs[m] = []
        for block in m.transformer.h:  # counted by wrapping forward: recomputation does not call module hooks
            block.forward = lambda *args, forward=block.forward, runs=runs: runs.append(1) or forward(*args)
        m(idx, idx)[1].backward()
    # checkpointing keeps no activations inside the blocks: backward runs each block's forward again
    assert len(block_runs[plain]) == 2 and len(block_runs[ckpt]) == 4
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_load_model_strips_compile_prefix_and_rejects_foreign_files(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, use_bio_mlp=True))
    state = {'_orig_mod.' + k: v for k, v in model.state_dict().items()}
    path = str(tmp_path / 'ckpt.pt')
    save_checkpoint({'model': state, 'model_args': dict(TINY, use_bio_mlp=True), 'iter_num': 3,
                     'best_val_loss': torch.tensor(2.5)}, path)
    loaded, ckpt = load_model(path, 'cpu')
    assert ckpt['iter_num'] == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    torch.save({'something': 1}, tmp_path / 'foreign.pt')
    with pytest.raises(ValueError, match='not a WiggleGPT checkpoint'):
        load_model(str(tmp_path / 'foreign.pt'), 'cpu')
    with pytest.raises(ValueError, match='no checkpoint at'):
        load_model(str(tmp_path / 'missing.pt'), 'cpu')
    (tmp_path / 'junk.pt').write_bytes(b'not a zip file at all')
    with pytest.raises(ValueError, match='not a readable checkpoint'):
        load_model(str(tmp_path / 'junk.pt'), 'cpu')


def test_flops_per_token_and_mfu():
    model = GPT(GPTConfig(**TINY))
    # counted by hand: per layer 2 LayerNorms (64 each), qkv 32*96+96, proj 32*32+32, fc 32*128+128,
    # mlp proj 128*32+32 = 12704; two layers, the tied embedding 50*32 and the final norm 64 -> 27072
    assert model.get_num_params() == 27072
    assert model.flops_per_token() == 6 * 27072 + 12 * 2 * 32 * 16  # plus attention: 12 * layers * width * context
    assert model.estimate_mfu(1000.0, None) is None
    assert model.estimate_mfu(1000.0, 1e12) == pytest.approx(174720 * 1000.0 / 1e12)
