"""
Generation: the KV cache against full recomputation, the sampling filters, streaming text.

    python -m pytest tests/test_generate.py              (-m "not slow": the quick ones only)
"""

import os

import pytest
import torch
import torch.nn.functional as F

import generation
from conftest import REPO, write_original_checkpoint
from checkpoints import load_model, save_checkpoint
from configurator import allows, declared_rules
from generation import apply_repetition_penalty, generate_tokens, sample_next_token, stream_text
from model_bio import GPT, GPTConfig

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50)
POSITIONS = {'learned': dict(), 'rope': dict(use_rope=True), 'none': dict(use_positions=False)}


def sharp_model(**overrides):
    """A tiny model with large random weights, so its next token depends strongly on every position."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**dict(TINY, **overrides)))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


def count_fed_tokens(model):
    """A list whose sum is the number of token positions the model has been run on."""
    fed = []
    model.transformer.wte.register_forward_hook(lambda mod, inp, out: fed.append(inp[0].numel()))
    return fed


@pytest.mark.parametrize('positions', POSITIONS)
@pytest.mark.parametrize('temperature', [0, 1.0])
def test_kv_cache_gives_the_tokens_of_a_full_recompute(positions, temperature):
    model = sharp_model(**POSITIONS[positions], use_bio_mlp=True)
    fed = count_fed_tokens(model)
    results = {}
    for use_cache in (True, False):
        fed.clear()
        generator = torch.Generator().manual_seed(7)
        # 40 new tokens after 5: the text grows well past block_size=16
        results[use_cache] = list(generate_tokens(model, [1, 2, 3, 4, 5], 40, temperature=temperature,
                                                  top_k=20, repetition_penalty=3.0, penalty_window=6,
                                                  generator=generator, use_cache=use_cache))
        results[use_cache, 'fed'] = sum(fed)
    assert results[True] == results[False]
    assert len(set(results[True])) > 5  # varied text (the penalty breaks greedy loops), so a wrong cache would show
    assert results[True, 'fed'] < results[False, 'fed']  # and the cache was really used


def test_cached_logits_match_full_forward():
    model = sharp_model(use_rope=True)
    idx = torch.randint(0, 50, (1, 12))
    cache = model.new_kv_cache()
    model(idx[:, :6], kv_cache=cache)
    for t in range(6, 12):
        step_logits, _ = model(idx[:, t:t + 1], kv_cache=cache)
        full_logits, _ = model(idx[:, :t + 1])
        torch.testing.assert_close(step_logits, full_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('positions', POSITIONS)
def test_one_token_prompt(positions):
    model = sharp_model(**POSITIONS[positions], n_head=4)  # fewer prompt tokens than heads crashed the original
    # the penalty keeps greedy decoding from repeating one token, so that a wrong cache would show
    tokens = list(generate_tokens(model, [7], 8, temperature=0, repetition_penalty=3.0, penalty_window=6))
    ids = [7]  # the same decoding by hand: the whole text through the model at each step, no cache
    with torch.no_grad():
        for _ in range(8):
            logits = model(torch.tensor([ids]))[0][0, -1]
            ids.append(int(apply_repetition_penalty(logits, ids[-6:], 3.0).argmax()))
    assert tokens == ids[1:] and len(set(tokens)) > 5


def test_repetition_penalty_lowers_negative_and_positive_logits():
    logits = torch.tensor([-2.0, 1.5, 0.5, -0.5])
    before = F.softmax(logits, dim=-1)
    penalised = apply_repetition_penalty(logits.clone(), [0, 1], 1.3)
    after = F.softmax(penalised, dim=-1)
    assert penalised[0] == pytest.approx(-2.6) and penalised[1] == pytest.approx(1.5 / 1.3)
    assert after[0] < before[0] and after[1] < before[1]  # dividing -2 would have made token 0 more likely
    assert penalised[2] == logits[2] and penalised[3] == logits[3]


def test_repetition_penalty_spares_exempt_tokens_and_respects_the_window(monkeypatch):
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0])
    penalised = apply_repetition_penalty(logits.clone(), [0, 1, 2], 2.0, exempt_ids={1})
    assert penalised.tolist() == [0.5, 1.0, 0.5, 1.0]
    # through generation: each step penalises exactly the last penalty_window ids (prompt included)
    seen = []
    monkeypatch.setattr(generation, 'apply_repetition_penalty',
                        lambda logits, recent, *args: seen.append(list(recent)) or logits)
    prompt = [1, 2, 3, 4, 5]
    tokens = list(generate_tokens(sharp_model(), prompt, 4, temperature=0, repetition_penalty=1.5, penalty_window=3))
    ids = prompt + tokens
    assert seen == [ids[:len(prompt) + i][-3:] for i in range(4)]


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    generator = torch.Generator().manual_seed(0)
    seen = {sample_next_token(logits, 1.0, top_p=0.7, generator=generator) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 + 0.3 covers 0.7; tokens 2 and 3 are outside
    assert sample_next_token(logits, 0) == 0


@pytest.mark.parametrize('top_p', [1e-300, 1e-46, 1e-8])
def test_a_tiny_top_p_keeps_the_most_likely_token(top_p):
    # 1e-300 and 1e-46 are 0 in float32: every token was masked and torch.multinomial raised
    logits = torch.log(torch.tensor([0.2, 0.5, 0.3]))
    generator = torch.Generator().manual_seed(0)
    assert {sample_next_token(logits, 1.0, top_p=top_p, generator=generator) for _ in range(50)} == {1}


@pytest.mark.parametrize('script', ['sample_bio.py', 'chat.py'])
def test_every_repetition_penalty_a_script_allows_keeps_the_probabilities_finite(script):
    # 1e-320 and 1e300 are 0 and inf in float32, and turned the penalised logits into inf or NaN
    rule = declared_rules(os.path.join(REPO, script))['repetition_penalty']
    allowed = [p for p in (1e-320, 1e-30, 1e-3, 0.01, 0.5, 2.0, 100.0, 1e3, 1e30, 1e300) if allows(rule, p)]
    assert 0.01 in allowed and 100.0 in allowed  # the ends of the range are among those checked
    logits = torch.tensor([-150.0, -40.0, -1e-3, 0.0, 1e-3, 30.0, 90.0])  # the size of a model's logits
    generator = torch.Generator().manual_seed(0)
    for penalty in allowed:
        penalised = apply_repetition_penalty(logits.clone(), range(len(logits)), penalty)
        for temperature in (1e-6, 1.0, 100.0):  # 1e-6: the least temperature that samples rather than takes the argmax
            probs = F.softmax(penalised / temperature, dim=-1)
            assert torch.isfinite(probs).all() and float(probs.sum()) == pytest.approx(1.0), (penalty, temperature)
            assert 0 <= sample_next_token(penalised, temperature, top_p=0.9, generator=generator) < len(logits)


def test_stream_text_holds_back_a_possible_stop_and_cuts_before_it():
    chars = list('Hi <there> <|x|>!<|/assistant|>tail')
    pieces = list(stream_text(range(len(chars)), lambda ids: ''.join(chars[i] for i in ids),
                              ('<|/assistant|>',)))
    assert ''.join(pieces) == 'Hi <there> <|x|>!'
    # a piece never ends in the middle of what could still become the stop marker
    assert all(not p.endswith('<') and not p.endswith('<|') for p in pieces[:-1])
    assert list(stream_text(iter([0, 1]), lambda ids: 'ab'[:len(ids)], ('b',))) == ['a']
    # cut off while writing the marker: its start is not shown; without stops every character is
    assert ''.join(stream_text(range(21), lambda ids: ''.join(chars[i] for i in ids), ('<|/assistant|>',))) == 'Hi <there> <|x|>!'
    assert ''.join(stream_text(range(21), lambda ids: ''.join(chars[i] for i in ids))) == 'Hi <there> <|x|>!<|/a'


def test_original_format_checkpoint_runs_without_positions(tmp_path, capsys):
    """A checkpoint laid out as the original release wrote it (names from the notes, compile prefix)."""
    weights, model_args = write_original_checkpoint(tmp_path / 'original.pt')
    vocab = model_args['vocab_size']
    ours = {'model': weights, 'model_args': model_args, 'iter_num': 1, 'best_val_loss': 3.0, 'config': {},
            'format_version': 1}
    save_checkpoint(ours, str(tmp_path / 'ours.pt'))

    idx = torch.randint(0, vocab, (1, 10))
    loaded, ckpt = load_model(str(tmp_path / 'original.pt'), 'cpu')
    assert 'positional encoding off' in capsys.readouterr().err
    assert ckpt['model_args']['use_positions'] is False and ckpt['best_val_loss'] == pytest.approx(3.1621)
    reference = GPT(GPTConfig(**dict(model_args, use_positions=False)))
    reference.load_state_dict(weights)
    torch.testing.assert_close(loaded.eval()(idx)[0], reference.eval()(idx)[0], rtol=0, atol=0)

    ours_loaded, _ = load_model(str(tmp_path / 'ours.pt'), 'cpu')
    assert capsys.readouterr().err == ''
    assert not torch.allclose(ours_loaded.eval()(idx)[0], reference(idx)[0], atol=1e-3)
