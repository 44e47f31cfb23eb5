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
from devices import saved_bytes
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

    def over_the_batch(self, q, k, v, cache=None, dropout_p=0.0):
        return depress(self, q + q.mean(0, keepdim=True), k, v, cache, dropout_p)
    monkeypatch.setattr(synapses.PresynapticDepression, 'forward', over_the_batch)
    _, across, _ = earlier_logits_moved(sharp_model(FLAGS['presynaptic']))
    assert across > 1e-3


def reference_depressed_attention(q, k, v, drain, lam, refill):
    """synapses.py's docstring, one query at a time: each key's depletion (minus the log of its pool) grows by
    drain times the attention a query paid it before depression, and shrinks by the factor refill per position."""
    B, nh, T, hs = q.shape
    out = torch.zeros_like(v)
    for b in range(B):
        for h in range(nh):
            depletion = torch.zeros(T, dtype=q.dtype)
            for t in range(T):
                scores = q[b, h, t] @ k[b, h, :t + 1].T / math.sqrt(hs)
                pool = torch.exp(-depletion[:t + 1])
                depressed = scores + lam[h] * torch.log(pool.clamp(min=synapses.POOL_EPS))
                out[b, h, t] = depressed.softmax(-1) @ v[b, h, :t + 1]
                depletion[:t + 1] = refill * depletion[:t + 1] + drain[h] * scores.softmax(-1)
    return out


def dense_depressed_attention(q, k, v, log_drain, log_lambda, refill, dropout_p=0.0, stochastic=False, draws=None):
    """The dense form synapses.py trained with before its chunks (T x T by T x T per head), kept as their
    reference: (attention, the used sums the query after the last inherits). draws: the uniform numbers of
    the release and then of dropout, each (B, nh, T, T)."""
    T, hs = q.size(2), q.size(3)
    scores = ((q / math.sqrt(hs)) @ k.transpose(-1, -2)).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1),
                                                                     float('-inf'))
    used_all = synapses.decayed_past(T + 1, T, refill, q.device).to(q.dtype) @ scores.softmax(-1)
    log_pool = (-log_drain.exp()[:, None, None] * used_all[:, :, :T]).clamp(min=math.log(synapses.POOL_EPS))
    if stochastic:
        log_release = torch.full_like(log_pool, math.log(synapses.POOL_EPS)).masked_fill(draws[0] < log_pool.exp(), 0.0)
        log_pool = log_pool + (log_release - log_pool).detach()
    att = (scores + log_lambda.exp()[:, None, None] * log_pool).softmax(-1)
    if dropout_p:
        att = att * (draws[-1] >= dropout_p) / (1 - dropout_p)
    return att @ v, used_all[:, :, T]


def chunked_draws(seed, shape, chunk):
    """The draws DepressedAttention makes chunk by chunk with both the release and dropout on, laid out whole as
    dense_depressed_attention takes them."""
    B, nh, T = shape
    whole = [torch.ones(B, nh, T, T, dtype=torch.float64) for _ in range(2)]
    for index, start in enumerate(range(0, T, chunk)):
        n = min(chunk, T - start)
        for full, part in zip(whole, synapses.chunk_draws(seed, index, (B, nh, n, start + n), 'cpu', torch.float64,
                                                          True, 0.5)):
            full[:, :, start:start + n, :start + n] = part
    return whole


def qkv(T, B=2, nh=2, hs=4, seed=0, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(B, nh, T, hs, dtype=torch.float64, generator=generator) for _ in range(3)]


def test_presynaptic_depression_is_the_one_query_at_a_time_recursion():
    config = GPTConfig(**SMALL, use_presynaptic=True, synapse_chunk=4)
    depression = synapses.PresynapticDepression(config).double()
    drain, lam = [9.0, 0.3], [1.5, 0.5]  # the first head's pools empty past eps: the clamp is tested too
    with torch.no_grad():
        depression.log_drain.copy_(torch.tensor(drain, dtype=torch.float64).log())
        depression.log_lambda.copy_(torch.tensor(lam, dtype=torch.float64).log())
    T = 9
    q, k, v = qkv(T, scale=3.0)
    expected = reference_depressed_attention(q, k, v, drain, lam, math.exp(-1 / config.tau_rrp))
    got = depression(q, k, v)
    torch.testing.assert_close(got, expected)
    _, used = dense_depressed_attention(q, k, v, depression.log_drain, depression.log_lambda, depression.refill)
    assert (-9.0 * used).min() < math.log(synapses.POOL_EPS)  # some pool does empty
    # and as generation runs it: a prompt of 4 queries, then one query at a time, each seeing every key so far
    cache = {}
    steps = [depression(q[:, :, :4], k[:, :, :4], v[:, :, :4], cache)]
    steps += [depression(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], cache) for t in range(4, T)]
    torch.testing.assert_close(torch.cat(steps, dim=2), got)


@pytest.mark.parametrize('T', [1, 6, 33, 100])
def test_chunks_give_the_dense_form_s_numbers_and_gradients(T):
    """In float64, at chunk sizes that divide T, that do not, of 1 and past T: attention, the cache's used
    sums, and the gradients of q, k, v and both parameters, against the dense form."""
    q, k, v = qkv(T)
    log_drain, log_lambda = torch.tensor([9.0, 0.3], dtype=torch.float64).log(), torch.tensor([1.5, 0.5]).double().log()
    refill = math.exp(-1 / 5)
    dy = torch.randn(2, 2, T, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    leaves = [t.clone().requires_grad_() for t in (q, k, v, log_drain, log_lambda)]
    expected, expected_used = dense_depressed_attention(*leaves, refill)
    expected_grads = torch.autograd.grad(expected, leaves, dy)
    for chunk in sorted({1, 3, 7, 16, T, T + 5}):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, log_drain, log_lambda)]
        got, used = synapses.DepressedAttention.apply(*leaves, refill, chunk, 0.0, False, None)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=f'chunk {chunk}')
        torch.testing.assert_close(used, expected_used, rtol=1e-12, atol=1e-12, msg=f'chunk {chunk}')
        for name, grad, want in zip('q k v log_drain log_lambda'.split(), torch.autograd.grad(got, leaves, dy),
                                    expected_grads):
            torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-10, msg=f'chunk {chunk}, {name}')


def test_chunks_draw_what_the_dense_form_would_have_drawn():
    """With stochastic release and dropout, a seed's draws laid out whole give the dense form the same
    attention and gradients: the backward pass recomputes each chunk with its forward's draws."""
    T, chunk, seed, p = 23, 5, 1234, 0.3
    q, k, v = qkv(T)
    log_drain, log_lambda = torch.tensor([0.9, 0.3], dtype=torch.float64).log(), torch.tensor([1.5, 0.5]).double().log()
    leaves = [t.clone().requires_grad_() for t in (q, k, v, log_drain, log_lambda)]
    got, _ = synapses.DepressedAttention.apply(*leaves, 0.8, chunk, p, True, seed)
    draws = chunked_draws(seed, (2, 2, T), chunk)
    twins = [t.clone().requires_grad_() for t in (q, k, v, log_drain, log_lambda)]
    expected, _ = dense_depressed_attention(*twins, 0.8, p, True, draws)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    seen = torch.ones(T, T, dtype=torch.bool).tril()
    assert 0.25 < (draws[1][..., seen] < p).double().mean() < 0.35  # dropout's share, where keys are seen
    undrawn, _ = dense_depressed_attention(q, k, v, log_drain, log_lambda, 0.8)
    assert (got - undrawn).abs().max() > 0.1
    for grad, want in zip(torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(expected.sum(), twins)):
        torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-10)


def test_backward_keeps_no_square_of_the_sequence():
    """Bytes autograd keeps for backward at T = 1024 (bench_bio's count, each storage once): presynaptic
    attention keeps q, k, v and a carry per chunk, the fast weights a few chunk x chunk products per chunk,
    both well below one float32 T x T tensor per head (the dense forms kept about five and three)."""
    T, chunk = 1024, 64
    q, k, v = [t.float().requires_grad_() for t in qkv(T, B=1)]
    config = GPTConfig(**{**SMALL, 'n_embd': 8}, use_presynaptic=True, use_fast_weights=True, synapse_chunk=chunk)
    square = 2 * T * T * 4  # one float32 T x T tensor for each of the 2 heads
    kept = saved_bytes(lambda: synapses.PresynapticDepression(config)(q, k, v))
    assert kept < 0.1 * square, kept / square
    kept = saved_bytes(lambda: synapses.FastWeights(config)(torch.randn(1, T, 8, requires_grad=True)))
    assert kept < 0.5 * square, kept / square


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


@pytest.mark.parametrize('chunk', [1, 4, 9, 64])
def test_fast_weights_are_the_one_token_at_a_time_recursion(chunk):
    torch.manual_seed(0)
    module = synapses.FastWeights(GPTConfig(**SMALL, use_fast_weights=True, synapse_chunk=chunk)).double()
    x = torch.randn(2, 9, SMALL['n_embd'], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference_fast_weights(module, x), rtol=1e-12, atol=1e-12)
        cache = {}  # and as generation runs it: a prompt of 4, then one token at a time
        steps = [module(x[:, :4], cache)] + [module(x[:, t:t + 1], cache) for t in range(4, 9)]
        torch.testing.assert_close(torch.cat(steps, dim=1), module(x), rtol=1e-12, atol=1e-12)


def test_gradcheck_in_float64():
    """Presynaptic attention (in chunks of 2 and, with dropout's draws replayed by seed, of 3) and the fast
    weights (chunks of 2 over 5 tokens). The release's straight-through gradient is no finite difference (its
    value is the draw's): test_chunks_draw_what_the_dense_form_would_have_drawn checks it against the dense form."""
    T = 5
    q, k, v = [t.requires_grad_() for t in qkv(T, scale=1.0)]
    drain = torch.tensor([0.6, 0.2], dtype=torch.float64).log().requires_grad_()
    lam = torch.tensor([1.2, 0.7], dtype=torch.float64).log().requires_grad_()
    for chunk, dropout_p, seed in ((2, 0.0, None), (3, 0.25, 5)):
        assert torch.autograd.gradcheck(
            lambda *args: synapses.DepressedAttention.apply(*args, 0.8, chunk, dropout_p, False, seed)[0],
            (q, k, v, drain, lam))

    torch.manual_seed(0)
    fast = synapses.FastWeights(GPTConfig(**SMALL, use_fast_weights=True, synapse_chunk=2)).double()
    names = [name for name, _ in fast.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in fast.named_parameters()]
    x = torch.randn(2, T, SMALL['n_embd'], dtype=torch.float64, requires_grad=True)
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
