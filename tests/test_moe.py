"""
moe.py: the mixture of experts that grows and prunes itself. The choice counts a split's tied pair once;
a split leaves the model's function as it was (float64) and gives the child the parent's optimizer
state, for every optimizer; a merge's change is measured; the cache is exact; training splits and
merges, logs each event, and resumes bit for bit across them; bad settings are one line.

    python -m pytest tests/test_moe.py              (-m "not slow": the quick ones only)
"""

import copy
import json
import subprocess
from dataclasses import asdict

import matplotlib.image
import pytest
import torch

import moe
from checkpoints import config_problem, load_model
from conftest import TINY, load, message_lines, read_log, run_script, trained_straight_and_in_halves
from model_bio import GPT, GPTConfig, MLP_KINDS
from test_ddp import torchrun
from test_optimizers import INSTALLED, build
from test_train import assert_same_state


def model(mlp='bio', **changes):
    torch.manual_seed(0)
    settings = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, mlp=mlp, use_moe=True, moe_experts=3,
                    moe_top_k=2, moe_max_experts=6, moe_min_experts=2, bias=True)
    return GPT(GPTConfig(**{**settings, **changes}))


def test_the_choice_takes_the_top_k_distinct_scores_and_a_tie_counts_once():
    inf = float('-inf')
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0], [3.0, 3.0, 2.0, 1.0], [1.0, inf, inf, 2.0], [5.0, 5.0, 5.0, 5.0]])
    chosen = moe.choose(scores, 2)
    assert chosen.tolist() == [[True, False, True, False], [True, True, True, False],
                               [True, False, False, True], [True, True, True, True]]


@pytest.mark.parametrize('mlp', MLP_KINDS)
def test_a_split_leaves_the_function_as_it_was_and_the_pair_then_grows_apart(mlp):
    net = model(mlp).double()
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    net.eval()
    with torch.no_grad():
        before = net(x, all_positions=True)[0]
    layer = net.transformer.h[0].mlp
    child = layer.split(1, [], torch.Generator().manual_seed(0))
    with torch.no_grad():
        after = net(x, all_positions=True)[0]
    assert child == 3 and layer.active.tolist() == [True, True, True, True, False, False]
    assert (after - before).abs().max() < 1e-12  # float64 rounding: the pair's gates add up to the parent's
    net.train()
    net(x, y)[1].backward()
    parent_grad, child_grad = layer.experts[1].c_fc.weight.grad, layer.experts[child].c_fc.weight.grad
    assert parent_grad.abs().sum() > 0 and not torch.allclose(parent_grad, child_grad)  # the perturbation parts them


def test_after_a_split_training_moves_the_model_as_it_would_have_without_it():
    """The pair stays one unit: a step after the split no token has lost an expert, and the model differs
    from the unsplit one's step by far less than the step itself moved it."""
    x, y = torch.randint(0, 64, (8, 16)), torch.randint(0, 64, (8, 16))
    outputs = []
    for split in (False, True):
        net = model()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        for step in range(4):
            if split and step == 3:
                net.transformer.h[0].mlp.split(0, [opt], torch.Generator().manual_seed(0))
            net.eval()
            with torch.no_grad():
                outputs.append(net(x, all_positions=True)[0])
            net.train()
            net(x, y)[1].backward()
            for block in net.transformer.h:
                block.mlp.drop_inactive_grads()
            opt.step()
            opt.zero_grad()
        net.eval()
        with torch.no_grad():
            outputs.append(net(x, all_positions=True)[0])
    plain, grown = outputs[:5], outputs[5:]
    assert (grown[3] - plain[3]).abs().max() < 1e-5  # the split's instant
    step = (plain[4] - plain[3]).norm()
    assert (grown[4] - plain[4]).norm() < 0.1 * step, ((grown[4] - plain[4]).norm() / step).item()


@pytest.mark.slow  # a second or two each: -m 'not slow' stays under 40 s
@pytest.mark.parametrize('name', INSTALLED)
def test_the_child_starts_with_the_parents_optimizer_state(name):
    net = model()
    built = build(net, name)
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    for _ in range(2):
        net(x, y)[1].backward()
        for opt in built:
            opt.step()
            opt.zero_grad()
    layer = net.transformer.h[1].mlp
    child = layer.split(0, built, torch.Generator().manual_seed(0))
    pairs = list(zip(layer.experts[0].parameters(), layer.experts[child].parameters()))
    pairs += [(layer.router[0], layer.router[child]), (layer.gate_bias[0], layer.gate_bias[child])]
    states = [(opt.state[p], opt.state[c]) for opt in built for p, c in pairs if p in opt.state]
    assert len(states) == len(pairs)  # every parameter of the expert has its state, in one optimizer or another
    for parent, copied in states:
        assert parent.keys() == copied.keys()
        for key in parent:
            same = torch.equal(parent[key], copied[key]) if torch.is_tensor(parent[key]) else parent[key] == copied[key]
            assert same and (not torch.is_tensor(parent[key]) or parent[key].data_ptr() != copied[key].data_ptr()), key
    layer.merge(child, built)
    assert not any(c in opt.state for opt in built for _, c in pairs)


def test_a_merge_is_measured_and_accounts_decide_alike_from_the_counts():
    net = model().eval()  # as train_bio.py measures: no gates counted
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    layer = net.transformer.h[0].mlp
    layer.energy[2] = -0.5  # bankrupt
    layer.routed.copy_(torch.tensor([10.0, 10.0, 0.0, 0, 0, 0]))
    net.transformer.h[1].mlp.routed.copy_(torch.tensor([5.0, 5.0, 5.0, 0, 0, 0]))

    def measure():
        with torch.no_grad():
            return net(x, y)[1].item()

    settings = dict(moe_tax=0.1, moe_health_decay=0.5, moe_split_health=9.0, moe_split_energy=0.0, moe_change_every=2,
                    lr_decay_iters=8)
    # the last moe_change_every iterations change nothing: training gets that long to recover from the last change
    assert moe.keep_accounts(copy.deepcopy(net), [], 8, settings, measure, 1337, ddp=False) == []
    settings['moe_change_every'] = 1
    before = measure()
    events = moe.keep_accounts(net, [], 7, settings, measure, 1337, ddp=False)
    assert [(e['event'], e['layer'], e['expert'], e['experts']) for e in events] == [('merge', 0, 2, 2)]
    assert events[0]['loss_change'] == pytest.approx(measure() - before, abs=1e-6) and events[0]['iter'] == 7
    # the layer's accounts: load 1.5, 1.5, 0 of an even 1; energy +-tax * (load - 1); health halfway to the load
    assert layer.energy[:2].tolist() == pytest.approx([1.05, 1.05]) and layer.health[:2].tolist() == pytest.approx([1.25] * 2)
    assert layer.routed.sum() == 0


def test_slots_not_in_use_are_left_alone_by_the_optimizer():
    net = model()
    opt = build(net, 'adamw')[0]
    layer = net.transformer.h[0].mlp
    layer.merge(1, [opt])
    unused = [*layer.experts[1].parameters(), *layer.experts[5].parameters()]
    before = [p.clone() for p in unused]
    for _ in range(2):
        net(torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16)))[1].backward()
        for block in net.transformer.h:
            block.mlp.drop_inactive_grads()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, q) and p not in opt.state for p, q in zip(unused, before))  # no decay, no state
    assert layer.experts[0].c_fc.weight in opt.state
    copy.deepcopy(net)  # no graph of the last forward kept (the balance term is read once)


def test_routing_under_bf16_autocast_is_computed_in_float32(monkeypatch):
    net = model(moe_experts=6, moe_max_experts=8)
    seen, choose = [], moe.choose

    def watched(units, k):
        chosen = choose(units, k)
        seen.append((units.dtype, chosen.sum(-1)))
        return chosen

    monkeypatch.setattr(moe, 'choose', watched)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        net(torch.randint(0, 64, (128, 16)), torch.randint(0, 64, (128, 16)))
    # no ties between distinct experts (bf16 scores had them): top_k units each, not more
    assert all(dtype == torch.float32 and (count == 2).all() for dtype, count in seen) and len(seen) == 2


def test_flops_count_the_parameters_a_token_meets():
    dense, experts = model(moe_experts=4, bias=False, use_moe=False), model(moe_experts=4, bias=False)
    routers = 2 * 4 * (32 + 1)  # layers x active experts x (router row + gate bias)
    assert experts.flops_per_token() - dense.flops_per_token() == 6 * routers
    assert experts.get_num_params() > 2 * dense.get_num_params() - 64 * 32  # every slot's weights exist


def test_the_balance_term_is_reported_apart_and_checkpointing_changes_nothing():
    plain, checkpointed = model(dropout=0.0), model(dropout=0.0, gradient_checkpointing=True)
    x, y = torch.randint(0, 64, (3, 16)), torch.randint(0, 64, (3, 16))
    losses = []
    for net in (plain, checkpointed):
        loss = net(x, y)[1]
        loss.backward()
        losses.append(loss)
        # the training loss is the language model's (as in eval mode) plus the balance term the log shows apart
        assert net.balance_loss > 0 and torch.allclose(loss - net.balance_loss, net.eval()(x, y)[1], atol=1e-6)
    # recomputing the blocks in backward gives the same gradients, and the same loads (the gates counted twice)
    assert torch.equal(*losses)
    for p, q in zip(plain.parameters(), checkpointed.parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.allclose(p.grad, q.grad, atol=1e-7))
    for a, b in zip(plain.transformer.h, checkpointed.transformer.h):
        assert torch.allclose(a.mlp.routed / a.mlp.routed.sum(), b.mlp.routed / b.mlp.routed.sum())


def test_cached_tokens_are_the_recomputed_ones():
    net = model('swiglu').double().eval()
    net.transformer.h[0].mlp.split(0, [], torch.Generator().manual_seed(0))
    x = torch.randint(0, 64, (1, 16))
    cache = net.new_kv_cache()
    with torch.no_grad():
        full = net(x, all_positions=True)[0]
        net(x[:, :10], kv_cache=cache)
        steps = [net(x[:, t:t + 1], kv_cache=cache)[0][0, -1] for t in range(10, 16)]
    assert max((s - full[0, t]).abs().max() for s, t in zip(steps, range(10, 16))) < 1e-12


@pytest.mark.parametrize('changes, message', [
    ({'moe_top_k': 3}, 'use_moe=True needs moe_top_k <= moe_min_experts <= moe_experts <= moe_max_experts (here 3, 2, 4, 8)'),
    ({'moe_experts': 9}, 'use_moe=True needs moe_top_k <= moe_min_experts <= moe_experts <= moe_max_experts'),
    ({'mlp': 'bio', 'bio_variant': 'v2'}, 'use_moe=True makes experts of an MLP kind as it is'),
    ({'mlp': 'gelu', 'gelu_params_like': 'v3'}, 'use_moe=True makes experts of an MLP kind as it is'),
    ({'moe_balance': -1.0}, 'moe_balance=-1.0 is not a finite number from 0'),
    ({'n_layer': 32, 'moe_max_experts': 256}, 'use_moe=True builds n_layer x moe_max_experts = 8192 experts, more than the 4096'),
])
def test_bad_settings_are_named(changes, message):
    settings = {**asdict(GPTConfig()), 'use_moe': True, 'moe_experts': 4, 'moe_max_experts': 8, **changes}
    assert config_problem(settings).startswith(message), config_problem(settings)


@pytest.mark.slow
def test_a_bad_setting_is_one_line_as_a_user_meets_it(workdir):
    proc = run_script(workdir, 'train_bio.py', *TINY, '--use_moe=True', '--max_iters=2', '--moe_experts=9', check=False)
    lines = message_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and 'moe_top_k <= moe_min_experts <= moe_experts' in lines[0], proc.stderr


@pytest.mark.slow
def test_training_splits_and_merges_and_resumes_bit_for_bit_across_them(workdir):
    args = [*TINY, '--use_moe=True', '--eval_interval=6', '--moe_change_every=2', '--moe_tax=1.0',
            '--moe_split_health=1.02', '--moe_split_energy=1.0', '--moe_experts=3', '--moe_max_experts=4']
    straight = trained_straight_and_in_halves(workdir, 'train_bio.py', *args, iters=12)
    events = [r for r in read_log(workdir / 'straight') if 'event' in r]
    kinds = {(r['event'], r['iter'] <= 6) for r in events}
    assert {('split', True), ('merge', True), ('split', False), ('merge', False)} <= kinds, events
    assert ' split of expert ' in straight.stdout and ' merge of expert ' in straight.stdout
    # each iteration's record: the language model's loss, the balance term beside it
    iterations = [r for r in read_log(workdir / 'straight') if 'loss' in r]
    assert iterations and all(r['balance'] > 0 for r in iterations)
    assert ', balance ' in straight.stdout
    a, b = load(workdir / 'straight' / 'ckpt.pt'), load(workdir / 'split' / 'ckpt.pt')
    assert_same_state(a, b)
    assert events == [r for r in read_log(workdir / 'split') if 'event' in r]
    # the training FLOPs count each iteration at the structure it trained: replayed from the events
    replay = GPT(GPTConfig(**a['model_args']))
    tokens_per_iter, flops = 2 * 4 * 16, 0
    for it in range(1, 13):
        flops += replay.flops_per_token() * tokens_per_iter
        for r in (r for r in events if r['iter'] == it):
            layer = replay.transformer.h[r['layer']].mlp
            if r['event'] == 'split':
                layer.active[r['child']], layer.unit[r['child']] = True, layer.unit[r['expert']]
            else:
                layer.active[r['expert']] = False
    evals = [[(r['iter'], r['flops']) for r in read_log(workdir / run) if 'val_loss' in r] for run in ('straight', 'split')]
    assert evals[0][-1] == (12, flops) == (12, a['flops']) == (12, b['flops']) and evals[0] == evals[1]
    # the plot of the experts over training, from the log
    plotted = run_script(workdir, 'analysis/plot_moe.py', 'straight', '--out_dir', 'plot')
    written = json.loads((workdir / 'plot' / 'moe.json').read_text())
    assert len(written['layers']) == 2 and written['events'] == events and ' merges' in plotted.stdout
    assert written['layers'][0]['experts'][-1] == [r for r in events if r['layer'] == 0][-1]['experts']
    assert matplotlib.image.imread(workdir / 'plot' / 'moe.png').shape[0] > 300
    # the changed structure loads wherever a checkpoint does: sampled, exported and read back, evaluated
    run_script(workdir, 'sample_bio.py', '--out_dir=straight', '--start=hello', '--num_samples=1', '--max_new_tokens=4',
               '--device=cpu')
    run_script(workdir, 'export_hub.py', '--out_dir=straight', '--export_dir=exported')
    run_script(workdir, 'eval_bio.py', '--ckpt=exported', '--tasks=val', '--dataset=tiny', '--device=cpu')
    x = torch.randint(0, 50, (2, 16))
    logits = [load_model(str(workdir / where), torch.device('cpu'))[0].eval()(x, all_positions=True)[0]
              for where in ('straight/ckpt.pt', 'exported')]
    assert torch.equal(*logits) and a['model']['transformer.h.0.mlp.active'].tolist() != [True] * 3 + [False]
    # a checkpoint from before the FLOPs were kept: after splits and merges they are unknown, and not logged
    ckpt = load(workdir / 'straight' / 'ckpt.pt')
    del ckpt['flops']
    torch.save(ckpt, workdir / 'straight' / 'ckpt.pt')
    run_script(workdir, 'train_bio.py', *args, '--init_from=resume', '--max_iters=14', '--out_dir=straight')
    last = [r for r in read_log(workdir / 'straight') if 'val_loss' in r][-1]
    assert last['iter'] == 14 and 'flops' not in last
    assert load(workdir / 'straight' / 'ckpt.pt')['flops'] is None


@pytest.mark.slow
def test_two_processes_make_the_same_events(workdir):
    """Under torchrun each process sums its own tokens' gates; the sums are all-reduced, so all decide
    alike (keep_accounts checks it and stops a run whose processes disagree)."""
    args = [*TINY, '--use_moe=True', '--eval_interval=6', '--moe_change_every=2', '--moe_tax=1.0',
            '--moe_split_health=1.02', '--moe_split_energy=1.0', '--moe_experts=3', '--moe_max_experts=4']
    proc = subprocess.run(torchrun('train_bio.py', *args, '--max_iters=12', '--out_dir=out'), cwd=workdir,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    events = [r for r in read_log(workdir / 'out') if 'event' in r]
    assert {'split', 'merge'} <= {r['event'] for r in events} and proc.stdout.count(' split of expert ') == len(
        [r for r in events if r['event'] == 'split'])  # said once, by the first process
