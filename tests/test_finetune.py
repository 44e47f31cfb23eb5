"""
Conversation data (data/smoltalk/prepare.py) and finetune_native.py: the loss mask, splits, freezing, resume.

    python -m pytest tests/test_finetune.py              (-m "not slow": the quick ones only)
"""

import json
import os

import numpy as np
import pytest
import tiktoken
import torch
import torch.nn.functional as F

from conftest import REPO, message_lines, read_log, run_script, trained_straight_and_in_halves
from checkpoints import load_model, save_checkpoint
from model_bio import GPT, GPTConfig

enc = tiktoken.get_encoding('gpt2')
PREPARE = os.path.join(REPO, 'data', 'smoltalk', 'prepare.py')
CONVERSATIONS = [
    {'messages': [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi there'},
                  {'role': 'assistant', 'content': 'Hello! How can I help?'},
                  {'role': 'user', 'content': 'Say yes.'}, {'role': 'assistant', 'content': 'Yes.'}]},
    {'conversations': [{'from': 'human', 'value': 'What is 2+2?'}, {'from': 'gpt', 'value': ' 4 '}]},
    {'messages': [{'role': 'user', 'content': 'a question nobody answers'}]},
    {'text': 'not a conversation at all'},
] + [{'messages': [{'role': 'user', 'content': f'Question {i}?'}, {'role': 'assistant', 'content': f'Answer {i}.'}]}
     for i in range(40)]


def prepare(tmp_path, *args, records=CONVERSATIONS, fresh=False):
    source = tmp_path / 'conv.jsonl'
    source.write_text(''.join(json.dumps(r) + '\n' for r in records))
    out = tmp_path / 'out'
    proc = run_script(tmp_path, PREPARE, f'--dataset={source}', f'--out_dir={out}', *args, fresh=fresh)
    return out, proc


def read_split(out, split):
    tokens = np.fromfile(out / f'{split}.bin', dtype=np.uint16)
    mask = np.fromfile(out / f'{split}_mask.bin', dtype=np.uint8)
    offsets = np.load(out / f'{split}_offsets.npy')
    return tokens, mask, offsets


@pytest.mark.slow
def test_mask_covers_exactly_the_assistant_replies(tmp_path):
    out, proc = prepare(tmp_path, '--val_fraction=0.2', fresh=True)
    meta = json.loads((out / 'meta.json').read_text())
    assert meta['records'] == 44 and meta['skipped'] == 2
    assert meta['train']['conversations'] + meta['val']['conversations'] == 42 and meta['val']['conversations'] > 0
    replies = {'<|system|>\nBe brief.': ['Hello! How can I help?', 'Yes.'], '<|user|>\nWhat is 2+2?': ['4']}
    replies.update({f'<|user|>\nQuestion {i}?': [f'Answer {i}.'] for i in range(40)})
    seen = 0
    for split in ('train', 'val'):
        tokens, mask, offsets = read_split(out, split)
        assert len(tokens) == len(mask) and offsets[0] == 0 and np.all(np.diff(offsets) > 0)
        for start, end in zip(offsets, list(offsets[1:]) + [len(tokens)]):
            conv, conv_mask = tokens[start:end].tolist(), mask[start:end]
            text = enc.decode(conv)
            key = next(k for k in replies if text.startswith(k))  # each offset is a conversation's start
            expected = ''.join(r + '\n<|/assistant|>' for r in replies[key]) + '<|endoftext|>'
            assert enc.decode([t for t, m in zip(conv, conv_mask) if m]) == expected
            unmasked = enc.decode([t for t, m in zip(conv, conv_mask) if not m])
            assert unmasked.startswith(key)  # system and user text are not trained on
            assert not any(reply in unmasked for reply in replies[key])
            assert conv[-1] == 50256 and conv_mask[-1] == 1
            seen += 1
    assert seen == 42


@pytest.mark.slow
def test_val_split_is_deterministic_and_seeded(tmp_path):
    outs = {}
    for name, args in (('first', []), ('again', []), ('other', ['--seed=7'])):
        (tmp_path / name).mkdir()
        outs[name], _ = prepare(tmp_path / name, '--val_fraction=0.3', *args)
    for file in ('val.bin', 'val_mask.bin', 'train.bin', 'val_offsets.npy'):
        assert (outs['first'] / file).read_bytes() == (outs['again'] / file).read_bytes()
    assert (outs['first'] / 'val.bin').read_bytes() != (outs['other'] / 'val.bin').read_bytes()


@pytest.mark.slow
def test_long_conversations_are_cut_at_a_turn_boundary(tmp_path):
    long = {'messages': [{'role': 'user', 'content': 'First question?'}, {'role': 'assistant', 'content': 'First answer.'},
                         {'role': 'user', 'content': 'word ' * 60}, {'role': 'assistant', 'content': 'Second.'}]}
    out, _ = prepare(tmp_path, '--max_tokens=40', '--val_fraction=0', records=[long])
    tokens, mask, _ = read_split(out, 'train')
    assert len(tokens) <= 40
    assert enc.decode(tokens.tolist()).endswith('First answer.\n<|/assistant|>\n<|endoftext|>')
    assert json.loads((out / 'meta.json').read_text())['cut'] == 1


@pytest.mark.slow
def test_prepare_errors(tmp_path):
    proc = run_script(tmp_path, PREPARE, '--dataset=missing.jsonl', check=False)
    assert proc.returncode == 2 and 'not found' in proc.stderr and 'Traceback' not in proc.stderr
    (tmp_path / 'bad.jsonl').write_text(json.dumps({'text': 'no turns'}) + '\n')
    proc = run_script(tmp_path, PREPARE, '--dataset=bad.jsonl', f'--out_dir={tmp_path / "o"}', check=False)
    assert proc.returncode == 2 and 'none of the 1 records' in proc.stderr and 'Traceback' not in proc.stderr


@pytest.mark.slow
def test_finetune_without_data_names_the_prepare_command(workdir):
    proc = run_script(workdir, 'finetune_native.py', 'config_finetune_native.py', '--device=cpu', check=False)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    lines = message_lines(proc.stderr)
    assert len(lines) == 1 and 'python data/smoltalk/prepare.py' in lines[0]


FINETUNE = ['--device=cpu', '--dtype=float32', '--dataset=chat', '--batch_size=4', '--block_size=32',
            '--gradient_accumulation_steps=2', '--learning_rate=3e-3', '--warmup_iters=2', '--log_interval=1',
            '--eval_interval=10', '--lr_decay_iters=20', '--out_dir=ft']


@pytest.fixture
def chat_workdir(workdir):
    """workdir with conversation files in data/chat and a small GPT-2-vocabulary checkpoint in base/."""
    prepare_out, _ = prepare(workdir, '--val_fraction=0.2')
    os.rename(prepare_out, workdir / 'data' / 'chat')
    model_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50304, bias=False,
                      use_bio_mlp=True, use_rmsnorm=True, use_rope=True)
    torch.manual_seed(0)
    (workdir / 'base').mkdir()
    save_checkpoint({'model': GPT(GPTConfig(**model_args)).state_dict(), 'model_args': model_args, 'iter_num': 0,
                     'best_val_loss': 9.0, 'config': {}, 'format_version': 1}, str(workdir / 'base' / 'ckpt.pt'))
    return workdir


@pytest.mark.slow
def test_finetune_lowers_val_loss_and_freezes_what_it_is_told(chat_workdir):
    proc = run_script(chat_workdir, 'finetune_native.py', *FINETUNE, '--init_from=base/ckpt.pt', '--max_iters=20')
    assert 'starting from the weights of base/ckpt.pt' in proc.stdout
    evals = [json.loads(line) for line in (chat_workdir / 'ft' / 'log.jsonl').read_text().splitlines()]
    evals = [e for e in evals if 'val_loss' in e]
    assert [e['iter'] for e in evals] == [0, 10, 20] and evals[-1]['val_loss'] < evals[0]['val_loss'] - 0.5
    _, ckpt = load_model(str(chat_workdir / 'ft' / 'ckpt.pt'), 'cpu')
    assert ckpt['model_args']['block_size'] == 64  # the model keeps its context; block_size=32 is the window

    run_script(chat_workdir, 'finetune_native.py', *FINETUNE, '--init_from=base/ckpt.pt', '--max_iters=2',
               '--freeze_layers=1', '--freeze_embeddings=True', '--out_dir=frozen')
    before = load_model(str(chat_workdir / 'base' / 'ckpt.pt'), 'cpu')[0].state_dict()
    after = load_model(str(chat_workdir / 'frozen' / 'ckpt.pt'), 'cpu')[0].state_dict()
    for name in before:
        frozen = name.startswith('transformer.h.0.') or name in ('transformer.wte.weight', 'lm_head.weight')
        assert torch.equal(before[name], after[name]) == frozen, name


@pytest.mark.slow
def test_finetune_resume_is_exact(chat_workdir):
    trained_straight_and_in_halves(chat_workdir, 'finetune_native.py', *FINETUNE, '--init_from=base/ckpt.pt',
                                   '--eval_interval=4', iters=8)
    straight = torch.load(chat_workdir / 'straight' / 'ckpt.pt', weights_only=True)['model']
    halves = torch.load(chat_workdir / 'split' / 'ckpt.pt', weights_only=True)['model']
    for name in straight:
        assert torch.equal(straight[name], halves[name]), name


# in a training process: the logits and targets of every loss computed with gradients (training's
# micro-batches, not evaluation's), saved to micro_batches.pt after each
RECORD_MICRO_BATCHES = '''
import torch
import torch.nn.functional as F

cross_entropy, micro_batches = F.cross_entropy, []


def recorded(logits, targets, *args, **kwargs):
    if torch.is_grad_enabled():
        trained = targets != -1
        micro_batches.append((logits.detach()[trained], targets[trained]))
        torch.save(micro_batches, 'micro_batches.pt')
    return cross_entropy(logits, targets, *args, **kwargs)


F.cross_entropy = recorded
'''


@pytest.mark.slow
def test_the_loss_is_the_mean_over_all_trained_tokens_of_the_iteration(workdir):
    # replies of 1 to 109 words, one conversation per micro-batch: their trained tokens differ many
    # times over, so the mean of the micro-batches' means would be a different number
    records = [{'messages': [{'role': 'user', 'content': f'Question {i}?'},
                             {'role': 'assistant', 'content': ' '.join(['word'] * (1 + 12 * i))}]} for i in range(10)]
    prepare_out, _ = prepare(workdir, '--val_fraction=0.2', records=records)
    os.rename(prepare_out, workdir / 'data' / 'chat')
    startup = workdir / 'startup'
    startup.mkdir()
    (startup / 'sitecustomize.py').write_text(RECORD_MICRO_BATCHES)
    run_script(workdir, 'finetune_native.py', '--device=cpu', '--dtype=float32', '--dataset=chat', '--n_layer=1',
               '--n_head=2', '--n_embd=32', '--block_size=128', '--batch_size=1', '--gradient_accumulation_steps=4',
               '--max_iters=1', '--eval_interval=100', '--eval_conversations=1', '--log_interval=1', '--out_dir=ft',
               env={**os.environ, 'PYTHONPATH': str(startup)})
    micro_batches = torch.load(workdir / 'micro_batches.pt', weights_only=True)
    counts = [len(targets) for _, targets in micro_batches]
    assert len(counts) == 4 and max(counts) >= 3 * min(counts) > 0
    logits, targets = (torch.cat(parts) for parts in zip(*micro_batches))
    loss = next(r['loss'] for r in read_log(workdir / 'ft') if 'loss' in r)
    assert loss == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)
