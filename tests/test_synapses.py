"""
Seed 003's synaptic mechanisms (synapses.py) made sound: each against a plain one-token-at-a-time reference
and gradcheck in float64; for each flag alone and all together, later tokens and batch-mates leave earlier
logits alone and the KV cache gives the tokens of recomputation (also past block_size); the checks are shown
to catch a mechanism that peeks ahead or across the batch; stochastic release draws in training only;
train_bio.py trains, resumes bit-exactly, samples and exports them.

    python -m pytest tests/test_synapses.py              (-m "not slow": the quick ones only)
"""

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import synapses
from checkpoints import checked_config, load_model
from conftest import TINY, load, read_log, run_script
from generation import generate_tokens
from model_bio import GPT, GPTConfig
from test_train import assert_same_state

SMALL = dict(n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=40, fast_weight_rank=4, tau_rrp=5.0)
FLAGS = {'presynaptic': dict(use_presynaptic=True), 'fast_weights': dict(use_fast_weights=True),
         'stochastic': dict(use_presynaptic=True, stochastic_release=True),
         'all': dict(use_presynaptic=True, stochastic_release=True, use_fast_weights=True)}


def sharp_model(flags, **overrides):
    """A small GPT with the mechanisms of flags and large random weights, so that every token moves every later
    output; drains start high enough to empty pools within the sequence."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**SMALL, **flags, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.5)
            if name.endswith('log_drain'):
                p.fill_(math.log(0.8))
    return model.eval()


def earlier_logits_moved(model, cut=6):
    """How far the logits before position cut move when the tokens from cut on change (row 0), and how far
    a row's logits move when another row of its batch changes entirely (row 1 changed, row 2 compared)."""
    idx = torch.randint(0, SMALL['vocab_size'], (3, SMALL['block_size']), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[0, cut:] = (idx[0, cut:] + 1) % SMALL['vocab_size']
    changed[1] = (idx[1] + 1) % SMALL['vocab_size']
    with torch.no_grad():
        before, _ = model(idx, all_positions=True)
        after, _ = model(changed, all_positions=True)
    later = (after[0, cut:] - before[0, cut:]).abs().max().item()
    return (after[0, :cut] - before[0, :cut]).abs().max().item(), (after[2] - before[2]).abs().max().item(), later


@pytest.mark.parametrize('flags', FLAGS.values(), ids=FLAGS.keys())
def test_later_tokens_and_batch_mates_leave_earlier_logits_alone(flags):
    ahead, across, later = earlier_logits_moved(sharp_model(flags))
    assert ahead < 1e-5 and across < 1e-5, (ahead, across)
    assert later > 1e-2  # the changed tokens do reach the logits after them


def test_the_checks_catch_a_mechanism_that_peeks(monkeypatch):
    """Seed 003's flaws put back: a decay matrix over the whole sequence (a normaliser over all positions)
    lets later tokens in, a pool normalised over the batch lets batch-mates in."""
    everywhere = lambda queries, keys, rate, device: torch.ones(queries, keys, device=device)  # noqa: E731
    with monkeypatch.context() as patch:
        patch.setattr(synapses, 'decayed_past', everywhere)
        for flags in (FLAGS['presynaptic'], FLAGS['fast_weights']):
            ahead, _, _ = earlier_logits_moved(sharp_model(flags))
            assert ahead > 1e-3, flags
    depress = synapses.PresynapticDepression.forward

    def over_the_batch(self, scores, cache=None):
        return depress(self, scores + scores.masked_fill(scores.isinf(), 0.0).mean(0, keepdim=True), cache)
    monkeypatch.setattr(synapses.PresynapticDepression, 'forward', over_the_batch)
    _, across, _ = earlier_logits_moved(sharp_model(FLAGS['presynaptic']))
    assert across > 1e-3


def reference_depressed_scores(scores, drain, lam, refill):
    """synapses.py's docstring, one query at a time: each key's depletion (minus the log of its pool) grows by
    drain times the attention a query paid it before depression, and shrinks by the factor refill per position."""
    B, nh, T, _ = scores.shape
    out = torch.full_like(scores, float('-inf'))
    for b in range(B):
        for h in range(nh):
            depletion = torch.zeros(T, dtype=scores.dtype)
            for t in range(T):
                pool = torch.exp(-depletion[:t + 1])
                out[b, h, t, :t + 1] = scores[b, h, t, :t + 1] + lam[h] * torch.log(pool.clamp(min=synapses.POOL_EPS))
                depletion[:t + 1] = refill * depletion[:t + 1] + drain[h] * scores[b, h, t, :t + 1].softmax(-1)
    return out


def test_presynaptic_depression_is_the_one_query_at_a_time_recursion():
    config = GPTConfig(**SMALL, use_presynaptic=True)
    depression = synapses.PresynapticDepression(config).double()
    drain, lam = [9.0, 0.3], [1.5, 0.5]  # the first head's pools empty past eps: the clamp is tested too
    with torch.no_grad():
        depression.log_drain.copy_(torch.tensor(drain, dtype=torch.float64).log())
        depression.log_lambda.copy_(torch.tensor(lam, dtype=torch.float64).log())
    T = 9
    torch.manual_seed(0)
    scores = 3 * torch.randn(2, 2, T, T, dtype=torch.float64).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1),
                                                                         float('-inf'))
    expected = reference_depressed_scores(scores, drain, lam, math.exp(-1 / config.tau_rrp))
    got = depression(scores)
    torch.testing.assert_close(got, expected)
    bias = (got - scores).nan_to_num().detach()
    assert math.isclose(bias.min(), 1.5 * math.log(synapses.POOL_EPS)) and (bias[:, 1] < -0.2).any()
    # and as generation runs it: a prompt of 4 queries, then one query at a time, each seeing every key so far
    cache = {}
    steps = [depression(scores[:, :, :4, :4], cache)]
    steps += [depression(scores[:, :, t:t + 1, :t + 1], cache)[..., :t + 1] for t in range(4, T)]
    for t, step in enumerate(steps[1:], start=4):
        torch.testing.assert_close(step[:, :, 0], got[:, :, t, :t + 1])
    torch.testing.assert_close(steps[0], got[:, :, :4, :4])


def reference_fast_weights(module, x):
    """synapses.py's docstring, one token at a time: read F_(t-1) q_t, then write F_t."""
    B, T, _ = x.shape
    nh, r = module.n_head, module.rank
    q, k, v = (part.view(B, T, nh, r) for part in module.c_qkv(x).split(nh * r, dim=2))
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    gate = torch.sigmoid(module.c_gate(x))
    reads = torch.zeros(B, T, nh, r, dtype=x.dtype)
    for b in range(B):
        for h in range(nh):
            scratch = torch.zeros(r, r, dtype=x.dtype)
            for t in range(T):
                reads[b, t, h] = scratch @ q[b, t, h]
                scratch = module.decay * scratch + gate[b, t, h] * torch.outer(v[b, t, h], k[b, t, h])
    return module.c_proj(reads.reshape(B, T, nh * r))


def test_fast_weights_are_the_one_token_at_a_time_recursion():
    torch.manual_seed(0)
    module = synapses.FastWeights(GPTConfig(**SMALL, use_fast_weights=True)).double()
    x = torch.randn(2, 9, SMALL['n_embd'], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference_fast_weights(module, x))
        cache = {}  # and as generation runs it: a prompt of 4, then one token at a time
        steps = [module(x[:, :4], cache)] + [module(x[:, t:t + 1], cache) for t in range(4, 9)]
        torch.testing.assert_close(torch.cat(steps, dim=1), module(x))


def test_gradcheck_in_float64():
    config = GPTConfig(**SMALL, use_presynaptic=True, use_fast_weights=True)
    torch.manual_seed(0)
    depression = synapses.PresynapticDepression(config).double()
    T = 5
    # a finite stand-in for -inf above the diagonal (exp(-50) is 0 to the tolerance), so differences stay finite
    scores = torch.randn(2, 2, T, T, dtype=torch.float64).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -50.0)
    drain = torch.tensor([0.6, 0.2], dtype=torch.float64).log().requires_grad_()
    lam = torch.tensor([1.2, 0.7], dtype=torch.float64).log().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s, d, lm: functional_call(depression, {'log_drain': d, 'log_lambda': lm}, (s,)),
        (scores.requires_grad_(), drain, lam))

    fast = synapses.FastWeights(config).double()
    names = [name for name, _ in fast.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in fast.named_parameters()]
    x = torch.randn(2, 4, SMALL['n_embd'], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *ps: functional_call(fast, dict(zip(names, ps)), (x,)), (x, *params))


@pytest.mark.parametrize('flags', FLAGS.values(), ids=FLAGS.keys())
@pytest.mark.parametrize('temperature', [0.0, 1.0])
def test_kv_cache_gives_the_tokens_of_a_full_recompute(flags, temperature):
    model = sharp_model(flags)
    fed = []
    model.transformer.wte.register_forward_hook(lambda mod, inp, out: fed.append(inp[0].numel()))
    results = {}
    for use_cache in (True, False):
        fed.clear()
        # 30 new tokens after 4: the text grows well past block_size=12; the penalty keeps greedy from one token
        results[use_cache] = list(generate_tokens(model, [1, 2, 3, 4], 30, temperature=temperature, top_k=20,
                                                  repetition_penalty=3.0, penalty_window=6,
                                                  generator=torch.Generator().manual_seed(7), use_cache=use_cache))
        results[use_cache, 'fed'] = sum(fed)
    assert results[True] == results[False] and len(set(results[True])) > 3
    assert results[True, 'fed'] < results[False, 'fed']  # the cache was used


@pytest.mark.parametrize('flags', FLAGS.values(), ids=FLAGS.keys())
def test_cached_logits_are_the_logits_of_the_whole_sequence(flags):
    model = sharp_model(flags)
    idx = torch.randint(0, SMALL['vocab_size'], (2, SMALL['block_size']), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole, _ = model(idx, all_positions=True)
        cache = model.new_kv_cache()
        steps = [model(idx[:, :3], kv_cache=cache, all_positions=True)[0]]
        steps += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(3, SMALL['block_size'])]
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=1e-5, rtol=1e-5)


def test_stochastic_release_draws_in_training_only():
    model = sharp_model(FLAGS['stochastic'])
    twin = sharp_model(FLAGS['presynaptic'])  # the same weights, no draws
    idx = torch.randint(0, SMALL['vocab_size'], (2, SMALL['block_size']), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(idx, all_positions=True)[0], twin(idx, all_positions=True)[0])
    model.train()
    torch.manual_seed(1)
    first, loss = model(idx, targets=idx)
    second, _ = model(idx, targets=idx)
    assert (first - second).abs().max() > 1e-3  # two draws
    torch.manual_seed(1)
    torch.testing.assert_close(model(idx, targets=idx)[0], first)  # a draw is the seed's
    # the first position's only key is its own, which arrives full and always releases
    with torch.no_grad():
        torch.testing.assert_close(first[:, 0], twin(idx, all_positions=True)[0][:, 0])
    loss.backward()
    assert all(block.attn.presynaptic.log_drain.grad.abs().sum() > 0 for block in model.transformer.h)


def test_a_file_s_number_past_float_range_is_one_line():
    with pytest.raises(ValueError, match=r'describes no buildable model: tau_rrp=1000000000\d* is not a finite number'):
        checked_config('ckpt.pt', {**SMALL, 'use_presynaptic': True, 'tau_rrp': 10 ** 400}, 10 ** 9)


def test_a_file_too_small_for_its_fast_weights_is_refused_before_building():
    # these settings would build 2 x 4 x 16 x 2 x 1024 fast-weight numbers (and the rest); the file holds 10,000
    args = {**SMALL, 'use_fast_weights': True, 'fast_weight_rank': 1024}
    with pytest.raises(ValueError, match='they make at least 269,120 weights'):
        checked_config('ckpt.pt', args, 10_000)
    checked_config('ckpt.pt', {**args, 'fast_weight_rank': 4}, 20_000)


RUN = [*TINY, '--use_bio_mlp=True', '--use_presynaptic=True', '--stochastic_release=True', '--use_fast_weights=True',
       '--fast_weight_rank=4', '--tau_rrp=8', '--dropout=0.1', '--eval_interval=2']


@pytest.mark.slow
def test_train_bio_trains_resumes_bit_exactly_samples_and_exports(workdir):
    def split():  # 2 iterations, then resumed to 4
        run_script(workdir, 'train_bio.py', *RUN, '--max_iters=2', '--out_dir=split')
        run_script(workdir, 'train_bio.py', *RUN, '--max_iters=4', '--out_dir=split', '--init_from=resume')
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(run_script, workdir, 'train_bio.py', *RUN, '--max_iters=4', '--out_dir=straight'),
                pool.submit(split)]
        [run.result() for run in runs]
    straight, resumed = load(workdir / 'straight' / 'ckpt.pt'), load(workdir / 'split' / 'ckpt.pt')
    assert straight['iter_num'] == resumed['iter_num'] == 4
    assert_same_state(straight, resumed)
    losses = [r['loss'] for r in read_log(workdir / 'straight') if 'loss' in r]
    assert losses == [r['loss'] for r in read_log(workdir / 'split') if 'loss' in r] and all(map(math.isfinite, losses))
    names = straight['model'].keys()
    assert {'transformer.h.1.attn.presynaptic.log_drain', 'transformer.h.1.attn.presynaptic.log_lambda',
            'transformer.h.1.fast_weights.c_qkv.weight', 'transformer.h.1.fast_weights.c_gate.weight'} <= names

    # 40 tokens past a 16-token block: the cache is filled, then rebuilt as the window slides
    sampled = run_script(workdir, 'sample_bio.py', '--out_dir=straight', '--device=cpu', '--num_samples=1',
                         '--max_new_tokens=40', '--seed=5', '--start=ab').stdout
    assert sampled.startswith('ab') and len(sampled.split('\n---')[0]) >= 42

    run_script(workdir, 'export_hub.py', '--out_dir=straight', '--export_dir=hub')
    exported, _ = load_model(str(workdir / 'hub'), 'cpu')
    trained, _ = load_model(str(workdir / 'straight' / 'ckpt.pt'), 'cpu')
    assert exported.config.use_fast_weights and exported.config.stochastic_release
    idx = torch.randint(0, 50, (2, 16))
    assert torch.equal(exported.eval()(idx, idx)[0], trained.eval()(idx, idx)[0])
