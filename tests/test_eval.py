"""
eval_bio.py: each task against a reference computed plainly here from its definition (the windows of val
and bpb; HellaSwag as lm-evaluation-harness scores it), lm-evaluation-harness itself scoring the same
HellaSwag items through eval_bio's harness model, that model's rolling loglikelihoods and generations, the
one-line errors, and an exported folder's results and card.

The runs that succeed start together, once, in the module's folder (runs); a random GPT-2 made by
transformers (conftest.write_gpt2_hub) loads as --ckpt=gpt2 from a local hub cache. Tests that need
transformers or lm-eval skip without them.

    python -m pytest tests/test_eval.py
"""
import importlib.util
import json
import math
import os
import pickle
import random
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np
import pytest
import tiktoken
import torch
import torch.nn.functional as F

import eval_bio
import eval_results
import prepared_data
from checkpoints import export_model, load_model, save_checkpoint
from codec import load_codec
from conftest import REPO, SHARED, message_lines, run_script, simulated_env, write_gpt2_hub
from model_bio import GPT, GPTConfig

HAS_GPT2 = importlib.util.find_spec('transformers') is not None
HAS_LM_EVAL = importlib.util.find_spec('lm_eval') is not None
GPT2_CONTEXT = 64  # the random GPT-2's block_size: the longest HellaSwag items here are cut from the left
with open(os.path.join(SHARED, 'data', 'tinyshakespeare', 'input.txt'), encoding='utf-8') as f:
    TEXT = f.read(1200) + '\nCafé — fin.\n'  # and characters of more than one byte
HARNESS_TASK = """include: {lm_eval}/tasks/hellaswag/hellaswag.yaml
task: hellaswag_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {items}
training_split: null
"""


def hellaswag_items():
    """20 items in the official format, with what the harness's cleaning changes: [title] and other
    bracketed markers, double spaces, a lower-case ctx_b, spaces that end a context, an empty ctx_b, endings
    with trailing spaces, and contexts longer than the model's (cut from the left)."""
    rng = random.Random(0)
    words = ['the', 'man', 'Woman', 'dog', 'runs', 'into', 'a', 'lake', 'slowly', 'and', 'then', 'washes', 'car',
             'is', 'seen', 'holding', '[step]', 'in  the', 'wax']

    def phrase(n):
        return ' '.join(rng.choice(words) for _ in range(n))

    items = []
    for i in range(20):
        ctx_b = ['then he ' + phrase(3), '', phrase(2) + ' [title]', 'a man ' + phrase(4)][i % 4]
        items.append({'ind': i, 'activity_label': ['Washing car', 'Home [title] Garden'][i % 2],
                      'ctx_a': phrase(40 if i % 5 == 0 else 6) + '  ' + phrase(2), 'ctx_b': ctx_b,
                      'endings': [phrase(rng.randint(1, 9)) + ' ' * (j % 2) for j in range(4)],
                      'label': (3 * i) % 4, 'source_id': f'activitynet~v_{i}', 'split': 'val', 'split_type': 'indomain'})
    return items


def harness_clean(text):
    """tasks/hellaswag/utils.py's preprocess, as its definition says."""
    text = text.strip().replace(' [title]', '. ')
    text = re.sub(r'\[.*?\]', '', text)
    return text.replace('  ', ' ')


def window_loss(model, ids):
    """The summed loss of ids[1:] in windows of block_size that do not overlap, one window per forward."""
    block_size, total = model.config.block_size, 0.0
    for start in range(0, len(ids) - 1, block_size):
        window = torch.tensor(ids[start:start + block_size + 1])
        with torch.no_grad():
            logits = model(window[None, :-1], all_positions=True)[0][0]
        total += F.cross_entropy(logits.float(), window[1:], reduction='sum').item()
    return total


def rolling_reference(model, sequence):
    """The summed log-likelihood of each token of sequence[1:] predicted once: windows of block_size predictions,
    each from its own tokens alone, except that the last, if shorter, sees the block_size tokens before its end."""
    block_size, total = model.config.block_size, 0.0
    for start in range(0, len(sequence) - 1, block_size):
        end = min(start + block_size, len(sequence) - 1)
        first = start if start == 0 or end - start == block_size else end - block_size
        with torch.no_grad():
            logits = model(torch.tensor([sequence[first:end]]), all_positions=True)[0][0]
        log_probs = F.log_softmax(logits.float(), dim=-1)[start - first:]
        total += sum(log_probs[j, t].item() for j, t in enumerate(sequence[start + 1:end + 1]))
    return total


def test_rolling_windows_are_the_harness_s():
    lm_eval_utils = pytest.importorskip('lm_eval.utils')
    for length in (0, 1, 5, 15, 16, 17, 31, 32, 33, 50):
        ids = list(range(100, 100 + length))
        expected = [lm_eval_utils.make_disjoint_window(window)
                    for window in lm_eval_utils.get_rolling_token_windows(ids, 7, 16, context_len=1)]
        assert eval_bio.rolling_windows(ids, 7, 16) == [(list(a), list(b)) for a, b in expected], length


def char_codec():
    """(encode, decode) of the character model, whose characters are TEXT's."""
    chars = sorted(set(TEXT))
    stoi = {c: i for i, c in enumerate(chars)}
    return (lambda text: [stoi[c] for c in text]), (lambda ids: ''.join(chars[i] for i in ids))


def write_dataset(folder, name, tokens, chars=None):
    """data/<name>/val.bin (and meta.pkl for characters), committed as a prepare script commits its files."""
    data = folder / 'data' / name
    data.mkdir(parents=True)
    staging = prepared_data.staging_dir(str(data))
    np.array(tokens, dtype=np.uint16).tofile(os.path.join(staging, 'val.bin'))
    if chars:
        with open(os.path.join(staging, 'meta.pkl'), 'wb') as f:
            pickle.dump({'vocab_size': len(chars), 'itos': dict(enumerate(chars))}, f)
    prepared_data.commit(str(data), 'tests/test_eval.py')


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """The scripts, a random character model of TEXT's characters (block_size 16) with its dataset `shake`,
    datasets that are wrong for it, the HellaSwag items, and (with transformers) the random GPT-2."""
    folder = tmp_path_factory.mktemp('eval')
    for name in os.listdir(REPO):
        if name.endswith('.py'):
            (folder / name).write_bytes(open(os.path.join(REPO, name), 'rb').read())
    chars = sorted(set(TEXT))
    write_dataset(folder, 'shake', char_codec()[0](TEXT[:300]), chars)  # 299 predicted: 18 windows and one of 11
    write_dataset(folder, 'short', [0], chars)
    write_dataset(folder, 'wide', [0, 200, 1], chars)
    write_dataset(folder, 'bpe', [15496, 995])
    model_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=len(chars), bias=False,
                      use_bio_mlp=True, use_rope=True)
    torch.manual_seed(0)
    (folder / 'char').mkdir()
    save_checkpoint({'model': GPT(GPTConfig(**model_args)).state_dict(), 'model_args': model_args, 'iter_num': 0,
                     'best_val_loss': 9.0, 'config': {'dataset': 'shake'}, 'format_version': 1},
                    str(folder / 'char' / 'ckpt.pt'))
    model, checkpoint = load_model(str(folder / 'char' / 'ckpt.pt'), 'cpu')
    export_model(model, checkpoint, {'type': 'characters', 'chars': chars}, str(folder / 'exported'))
    (folder / 'exported' / 'README.md').write_text('# my model\n\nNotes written by hand.\n', encoding='utf-8')
    (folder / 'text.txt').write_text(TEXT, encoding='utf-8')
    (folder / 'hellaswag.jsonl').write_text(''.join(json.dumps(item) + '\n' for item in hellaswag_items()))
    if HAS_GPT2:
        write_gpt2_hub(str(folder / 'hub'), n_positions=GPT2_CONTEXT)
    if HAS_LM_EVAL:
        import lm_eval
        (folder / 'tasks').mkdir()
        (folder / 'tasks' / 'hellaswag_local.yaml').write_text(HARNESS_TASK.format(
            lm_eval=os.path.dirname(lm_eval.__file__), items=folder / 'hellaswag.jsonl'))
    return folder


def env(folder):
    return {**os.environ, 'HF_HUB_CACHE': str(folder / 'hub'), 'HF_HUB_OFFLINE': '1',
            'HF_DATASETS_CACHE': str(folder / 'datasets'), 'HF_DATASETS_OFFLINE': '1'}


@pytest.fixture(scope='module')
def runs(folder):
    """The runs that succeed, all started at once: {name: (CompletedProcess, the JSON written)}."""
    eval_bio_args = {
        'char': ['--ckpt=char/ckpt.pt', '--tasks=val,bpb', '--text_path=text.txt', '--batch_size=3'],
        'exported': ['--ckpt=exported', '--tasks=val', '--max_tokens=50'],  # the same weights as char/ckpt.pt
    }
    if HAS_GPT2:
        eval_bio_args['gpt2'] = ['--ckpt=gpt2', '--tasks=hellaswag,bpb', '--hellaswag_path=hellaswag.jsonl',
                                 '--text_path=text.txt']
    if HAS_GPT2 and HAS_LM_EVAL:
        eval_bio_args['harness'] = ['--ckpt=gpt2', '--harness_tasks=hellaswag_local', '--harness_include_path=tasks']

    def run(name):
        proc = run_script(folder, 'eval_bio.py', *eval_bio_args[name], '--device=cpu', f'--out=results/{name}.json',
                          env=env(folder), fresh=name == 'char')
        return proc, json.loads((folder / 'results' / f'{name}.json').read_text())

    (folder / 'results').mkdir()
    with ThreadPoolExecutor(4) as pool:
        return dict(zip(eval_bio_args, pool.map(run, eval_bio_args)))


@pytest.fixture(scope='module')
def gpt2(folder):
    """The random GPT-2 loaded here as --ckpt=gpt2 loads it (test_gpt2.py shows it computes transformers' logits)."""
    pytest.importorskip('transformers')
    import huggingface_hub.constants
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(folder / 'hub'))
        patch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
        model, checkpoint = load_model('gpt2', 'cpu')
    return model.eval(), checkpoint


def test_harness_cleaning_as_its_hellaswag_utils_define_it():
    # a final ' [title]' leaves a space after the stripping: the harness keeps it
    assert eval_bio.harness_clean('  Home [title] Garden: a  dog [step] runs [title]  ') == 'Home. Garden: a dog runs. '
    # one pass of double spaces: three become two, as the harness leaves them
    assert eval_bio.harness_clean('a  [step] b') == harness_clean('a  [step] b') == 'a  b'
    for item in hellaswag_items():
        for text in [item['activity_label'] + ': ' + item['ctx_a'] + ' ' + item['ctx_b'].capitalize(), *item['endings']]:
            assert eval_bio.harness_clean(text) == harness_clean(text)


def test_the_pieces_of_the_harness_definition(gpt2):
    """What the 20-item comparison cannot tell apart: the continuation's ids are the whole text's past the
    context's; acc_norm divides by characters, not bytes; a tie goes to the first choice; <|endoftext|> has
    the 13 bytes of its name; a greedy continuation is reported as one."""
    enc = tiktoken.get_encoding('gpt2')
    context, continuation = eval_bio.encode_pair(enc.encode, 'hello wor', 'ld peace', 50256)
    assert (context, continuation) == (enc.encode('hello wor'), enc.encode('hello world peace')[len(enc.encode('hello wor')):])
    assert continuation != enc.encode('ld peace')
    items = [('c', ['éééé', 'aaaaa'], 1), ('c', ['x', 'y'], 0)]
    # by characters -1.1 < -1.0, so the second choice; by UTF-8 bytes (8 and 5) it would be the first
    assert eval_bio.hellaswag_accuracy(items, [[-4.4, -5.0], [-1.0, -1.0]]) == {'acc': 0.5, 'acc_norm': 1.0, 'n': 2}
    assert eval_bio.token_bytes({'type': 'tiktoken', 'encoding': 'gpt2'})[50256] == len('<|endoftext|>'.encode())
    model, _ = gpt2
    prompt = enc.encode('The meaning of life is')
    with torch.no_grad():
        greedy = [int(model(torch.tensor([prompt]))[0][0, -1].argmax())]
    other = [(greedy[0] + 1) % 50257]
    (_, is_greedy), (_, not_greedy) = eval_bio.score_continuations(model, [(prompt, greedy), (prompt, other)], nullcontext())
    assert is_greedy and not not_greedy


@pytest.mark.slow
def test_hellaswag_scores_each_choice_as_the_harness_defines_it(folder, runs, gpt2):
    """Per item and choice: one forward over the whole context + continuation (cut from the left to 65 tokens),
    the continuation's log-probabilities summed; acc and acc_norm from those."""
    model, checkpoint = gpt2
    enc = tiktoken.get_encoding('gpt2')
    expected, cut = [], 0
    for item in hellaswag_items():
        context = harness_clean(item['activity_label'] + ': ' + item['ctx_a'] + ' ' + item['ctx_b'].capitalize())
        row = []
        for ending in item['endings']:
            continuation = ' ' + harness_clean(ending)
            kept = context.rstrip()  # the harness moves a context's final spaces to the continuation
            context_ids = enc.encode(kept)
            continuation_ids = enc.encode(kept + context[len(kept):] + continuation)[len(context_ids):]
            sequence = (context_ids + continuation_ids)[-(GPT2_CONTEXT + 1):]
            cut += len(context_ids) + len(continuation_ids) > len(sequence)
            with torch.no_grad():
                log_probs = F.log_softmax(model(torch.tensor([sequence[:-1]]), all_positions=True)[0][0], dim=-1)
            first = len(sequence) - 1 - len(continuation_ids)
            row.append(sum(log_probs[first + j, t].item() for j, t in enumerate(continuation_ids)))
        expected.append(row)
    assert cut > 0  # the long items were cut from the left
    items = eval_bio.read_hellaswag(str(folder / 'hellaswag.jsonl'))
    assert items == [(harness_clean(i['activity_label'] + ': ' + i['ctx_a'] + ' ' + i['ctx_b'].capitalize()),
                      [harness_clean(e) for e in i['endings']], i['label']) for i in hellaswag_items()]
    encode, _ = load_codec(checkpoint)
    scores = eval_bio.hellaswag_loglikelihoods(model, items, encode, 50256, nullcontext())
    assert np.abs(np.array(scores) - np.array(expected)).max() < 1e-4
    labels = np.array([item['label'] for item in hellaswag_items()])
    lengths = np.array([[len(choice) for choice in choices] for _, choices, _ in items], dtype=float)
    acc = float(np.mean(np.argmax(expected, axis=1) == labels))
    with np.errstate(divide='ignore'):  # an ending that the cleaning empties, as the harness divides it
        acc_norm = float(np.mean(np.argmax(np.array(expected) / lengths, axis=1) == labels))
    assert runs['gpt2'][1]['hellaswag'] == {'acc': acc, 'acc_norm': acc_norm, 'n': 20}
    assert 0 < acc < 1 and acc != acc_norm  # the items tell the two apart


@pytest.mark.slow
def test_the_harness_scores_the_same_hellaswag_items_as_eval_bio_does(runs):
    pytest.importorskip('lm_eval')
    pytest.importorskip('transformers')
    from lm_eval.tasks.hellaswag.utils import preprocess
    for item in hellaswag_items():  # the cleaning here is the harness's
        for text in [item['activity_label'] + ': ' + item['ctx_a'] + ' ' + item['ctx_b'].capitalize(), *item['endings']]:
            assert eval_bio.harness_clean(text) == preprocess(text)
    harness = runs['harness'][1]['harness']['hellaswag_local']
    own = runs['gpt2'][1]['hellaswag']
    assert (harness['acc'], harness['acc_norm'], harness['n']) == (own['acc'], own['acc_norm'], 20)
    assert 'acc_stderr' in harness and not any(',' in name for name in harness)
    assert 'hellaswag_local  acc' in runs['harness'][0].stdout


@pytest.mark.slow
def test_val_is_the_loss_of_every_token_but_the_first_in_windows_of_block_size(folder, runs):
    model, checkpoint = load_model(str(folder / 'char' / 'ckpt.pt'), 'cpu')
    ids = np.fromfile(folder / 'data' / 'shake' / 'val.bin', dtype=np.uint16).astype(np.int64).tolist()
    for name, tokens in (('char', ids), ('exported', ids[:50])):  # 299 = 18 * 16 + 11, 49 = 3 * 16 + 1
        val = runs[name][1]['val']
        assert val['tokens'] == len(tokens) - 1 and (val['dataset'], val['split']) == ('shake', 'val')
        assert val['loss'] == pytest.approx(window_loss(model.eval(), tokens) / (len(tokens) - 1), abs=1e-5)
    assert runs['char'][1]['val']['loss'] != runs['exported'][1]['val']['loss']
    assert re.search(r'^val +loss \d\.\d{4} nats/token \(299 tokens of shake/val\)  \[[\d,.]+ tokens/s\]$',
                     runs['char'][0].stdout, re.M)


@pytest.mark.slow
def test_bits_per_byte_of_a_character_and_a_bpe_model_on_one_text(folder, runs, gpt2):
    # as lm-evaluation-harness scores a document: every token after <|endoftext|> (a character model's first
    # character unscored), the last window after a full context; over the whole text's bytes
    char_model, _ = load_model(str(folder / 'char' / 'ckpt.pt'), 'cpu')
    encode, _ = char_codec()
    gpt2_model, _ = gpt2
    bpe_ids = tiktoken.get_encoding('gpt2').encode(TEXT)
    text_bytes = len(TEXT.encode('utf-8'))
    for name, loglikelihood, tokens in (('char', rolling_reference(char_model.eval(), encode(TEXT)), len(TEXT) - 1),
                                        ('gpt2', rolling_reference(gpt2_model, [50256] + bpe_ids), len(bpe_ids))):
        bpb = runs[name][1]['bpb']
        assert (bpb['bytes'], bpb['tokens'], bpb['source']) == (text_bytes, tokens, 'text.txt')
        assert math.isfinite(bpb['bpb']) and bpb['bpb'] == pytest.approx(-loglikelihood / math.log(2) / text_bytes,
                                                                          rel=1e-5)
    assert len(TEXT) < text_bytes  # the text's non-ASCII characters take more than a byte


@pytest.mark.slow
def test_the_harness_model_rolls_generates_and_scores_as_defined(folder, gpt2):
    pytest.importorskip('lm_eval')
    from lm_eval.api.instance import Instance

    def requests(kind, *args):
        return [Instance(kind, {}, arguments, 0) for arguments in args]

    char_model, _ = load_model(str(folder / 'char' / 'ckpt.pt'), 'cpu')
    encode, decode = char_codec()
    char_lm = eval_bio.harness_model(char_model.eval(), encode, decode, None, 3, nullcontext())
    texts = [TEXT[:100], TEXT[200:216], TEXT[300:302]]  # several windows and a short last one; one window; one token
    assert char_lm.loglikelihood_rolling(requests('loglikelihood_rolling', *[(t,) for t in texts])) == pytest.approx(
        [rolling_reference(char_model, encode(t)) for t in texts], abs=1e-4)

    gpt2_model, _ = gpt2
    bpe = tiktoken.get_encoding('gpt2')
    gpt2_lm = eval_bio.harness_model(gpt2_model, lambda t: bpe.encode(t, allowed_special='all'), bpe.decode, 50256, 2,
                                     nullcontext())
    assert gpt2_lm.loglikelihood_rolling(requests('loglikelihood_rolling', (TEXT[:700],))) == pytest.approx(
        [rolling_reference(gpt2_model, [50256] + bpe.encode(TEXT[:700]))], abs=1e-3)
    # an empty context is <|endoftext|>
    (score, _), = gpt2_lm.loglikelihood(requests('loglikelihood', ('', ' Hello world')))
    with torch.no_grad():
        log_probs = F.log_softmax(gpt2_model(torch.tensor([[50256, 18435]]), all_positions=True)[0][0], dim=-1)
    assert score == pytest.approx(log_probs[0, 18435].item() + log_probs[1, 995].item(), abs=1e-4)

    def greedy(prompt, count):  # the model seeing its last block_size tokens
        ids = list(prompt)
        for _ in range(count):
            with torch.no_grad():
                ids.append(int(gpt2_model(torch.tensor([ids[-GPT2_CONTEXT:]]))[0][0, -1].argmax()))
        return bpe.decode(ids[len(prompt):])

    # greedy generation cut at the first stop string; the prompt cut from the left to leave max_gen_toks of the
    # context, as the harness cuts it (70 new tokens pass the 64 of the context: the prompt's last token alone)
    prompt = bpe.encode('ROMEO:')
    generated = greedy(prompt[-1:], 70)
    cut = next(i for i in range(30, len(generated) - 6) if generated.find(generated[i:i + 6]) == i)
    stop = generated[cut:cut + 6]  # its first appearance: the reply ends before it
    long_prompt = 'ROMEO: But soft, what light through yonder window breaks? ' * 4
    replies = gpt2_lm.generate_until(requests('generate_until', ('ROMEO:', {'until': [stop], 'max_gen_toks': 70}),
                                              ('ROMEO:', {'until': ['\x00'], 'max_gen_toks': 70, 'do_sample': False}),
                                              ('ROMEO:', {'until': [], 'max_gen_toks': 7}),
                                              (long_prompt, {'until': [], 'max_gen_toks': 10})))
    assert len(bpe.encode(long_prompt)) + 10 > GPT2_CONTEXT
    assert replies == [generated[:cut], generated, greedy(prompt, 7), greedy(bpe.encode(long_prompt)[-54:], 10)]


@pytest.mark.slow
def test_mistakes_are_one_line_and_write_nothing(folder):
    (folder / 'notes.txt').write_text('a file')
    (folder / 'other.json').write_text(json.dumps({'ckpt': 'elsewhere.pt', 'val': {'loss': 1.0, 'tokens': 9,
                                                                                     'dataset': 'x', 'split': 'val'}}))
    (folder / 'unknown.txt').write_text('What a piece of work is man @ 3')
    items = [json.dumps(item) for item in hellaswag_items()[:3]]
    (folder / 'bad_line.jsonl').write_text('\n'.join([items[0], items[1], '{"ctx_a": "cut sho']) + '\n')
    char = ['--ckpt=char/ckpt.pt']
    cases = [  # (arguments, the one line), each run with --out=written.json
        (char, 'error: no tasks to run: name some with --tasks=val,bpb,hellaswag or --harness_tasks=TASK,...'),
        ([*char, '--tasks=val,perplexity'], "error: unknown task 'perplexity': --tasks takes val, bpb, hellaswag "
                                            '(lm-evaluation-harness tasks go in --harness_tasks)'),
        (['--ckpt=missing.pt', '--tasks=val'],
         'error: no checkpoint at missing.pt (train one with train_bio.py, or pass its path)'),
        ([*char, '--tasks=hellaswag', '--limit=0'],
         'error: limit = 0 is not allowed: it must be at least 1 (leave it out to score every item)'),
        ([*char, '--tasks=val', '--max_tokens=-1'], 'error: max_tokens = -1 is not allowed: it must be >= 0'),
        ([*char, '--tasks=val', '--dataset=short'], 'error: data/short/val.bin holds 1 token (up to --max_tokens): at '
                                                    'least 2 are needed, one to predict from and one to predict'),
        ([*char, '--tasks=val', '--dataset=wide'], f'error: data/wide/val.bin holds token id 200, outside the model\'s '
                                                   f'{len(set(TEXT))}-token vocabulary; run python data/wide/prepare.py again'),
        ([*char, '--tasks=bpb', '--dataset=bpe'], 'error: data/bpe was prepared with another vocabulary than the model was '
                                                  f'trained on (the data has gpt2 BPE, the checkpoint {len(set(TEXT))} '
                                                  'characters); evaluate it on the data it was made for (--dataset), or '
                                                  'prepare data/bpe as it was'),
        ([*char, '--tasks=bpb', '--text_path=unknown.txt'], f'error: --text_path=unknown.txt has characters outside the '
                                                            f"model's {len(set(TEXT))}-character vocabulary: ['3', '@']"),
        ([*char, '--tasks=bpb', '--text_path=data'], 'error: --text_path=data is a folder; name a text file'),
        ([*char, '--tasks=hellaswag', '--hellaswag_path=absent.jsonl'],
         'error: --hellaswag_path=absent.jsonl is not found; name a jsonl file in the official format'),
        ([*char, '--tasks=hellaswag', '--hellaswag_path=bad_line.jsonl'], 'error: bad_line.jsonl line 3 is not a JSON '
         'object (JSONDecodeError: Invalid control character at: line 1 column 19 (char 18))'),
        ([*char, '--tasks=val', '--out=notes.txt/results.json'],
         f'error: --out=notes.txt cannot be a folder: {folder}/notes.txt is a file; name another folder'),
        ([*char, '--tasks=val', '--out=data'], 'error: --out=data is a folder; name a JSON file to write'),
        ([*char, '--tasks=val', '--out=other.json'],
         "error: other.json holds the results of another checkpoint ('elsewhere.pt'); write these to another --out"),
    ]
    cases = [(args + ([] if any(a.startswith('--out=') for a in args) else ['--out=written.json']), line, None)
             for args, line in cases]
    cases.append(([*char, '--harness_tasks=arc_easy', '--out=written.json'],
                  'error: --harness_tasks needs lm-eval: pip install lm-eval', simulated_env(SIMULATED_MISSING='lm_eval')))

    def run(case):
        args, _, case_env = case
        return run_script(folder, 'eval_bio.py', *args, check=False,
                          env=case_env)

    with ThreadPoolExecutor(4) as pool:
        for (args, line, _), proc in zip(cases, pool.map(run, cases)):
            assert (proc.returncode, message_lines(proc.stderr), proc.stdout) == (2, [line], ''), args
    assert not (folder / 'written.json').exists() and not (folder / 'notes.txt').is_dir()
    assert json.loads((folder / 'other.json').read_text())['ckpt'] == 'elsewhere.pt'


def test_hostile_hellaswag_and_results_files_are_one_line_naming_the_problem(tmp_path):
    item = hellaswag_items()[0]
    for line, problem in [('[1, 2]', 'is not a HellaSwag item: it needs "activity_label", "ctx_a" and "ctx_b" as text'),
                          (json.dumps({**item, 'ctx_b': None}), 'it needs "activity_label", "ctx_a" and "ctx_b" as text'),
                          (json.dumps({**item, 'endings': ['one']}), 'its "endings" must be a list of at least 2 texts'),
                          (json.dumps({**item, 'endings': 'abcd'}), 'its "endings" must be a list of at least 2 texts'),
                          (json.dumps({**item, 'label': 4}), 'its "label" must be a whole number from 0 to 3'),
                          (json.dumps({**item, 'label': '2'}), 'its "label" must be a whole number from 0 to 3'),
                          ('[' * 100000, 'is not a JSON object (RecursionError'),
                          (b'{"ctx_a": "\xff"}', 'is not a JSON object (UnicodeDecodeError')]:
        path = tmp_path / 'items.jsonl'
        path.write_bytes(b'\n'.join([json.dumps(item).encode(), b'', line if isinstance(line, bytes) else line.encode()]))
        with pytest.raises(ValueError, match=f'^{re.escape(str(path))} line 3 .*' + re.escape(problem)) as raised:
            eval_bio.read_hellaswag(str(path))
        assert '\n' not in str(raised.value)
    path.write_text('\n' + json.dumps(item) + '\n\n')  # blank lines are no items
    assert len(eval_bio.read_hellaswag(str(path))) == 1
    results = tmp_path / 'results.json'
    for text, problem in [('{"val": {"loss": "low", "tokens": 1, "dataset": "a", "split": "val"}}',
                           ': val.loss is "low", not a finite number'),
                          ('{"val": {"loss": 1.0}}', ': val lacks tokens, dataset, split (eval_bio.py writes them all)'),
                          ('{"ckpt": 3}', ': ckpt is 3, not a name of printable characters'),
                          ('{"harness": {"arc": {"acc": true}}}', ': harness.arc.acc is true, not a finite number'),
                          ('{"mmlu": {}}', ': "mmlu" is not a task eval_bio.py writes'),
                          ('[]', ' holds an array, not an object of results'), ('{"val": ', ' is not JSON (Expecting value')]:
        results.write_text(text)
        with pytest.raises(ValueError, match=re.escape(str(results) + problem)):
            eval_results.read_results(str(results))
    assert eval_results.read_results(str(tmp_path / 'absent.json')) == {}


def test_the_hellaswag_download_is_kept_only_whole(tmp_path, monkeypatch):
    item = {'activity_label': 'A', 'ctx_a': 'b', 'ctx_b': 'c', 'endings': ['d', 'e'], 'label': 1}
    official = [json.dumps({**item, 'ind': i}) + '\n' for i in range(eval_bio.HELLASWAG_ITEMS)]

    class Response:
        def __init__(self, body):
            self.body = body

        def read(self, size):
            chunk, self.body = self.body[:size], self.body[size:]
            return chunk

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    path = str(tmp_path / 'hellaswag' / 'hellaswag_val.jsonl')
    for body, problem in [(''.join(official[:-1]).encode(), 'it holds 10,041 items, not 10,042'),
                          (b'{"ctx_a": ', 'line 1 is not a JSON object')]:
        monkeypatch.setattr(eval_bio.urllib.request, 'urlopen', lambda url, timeout, body=body: Response(body))
        with pytest.raises(ValueError, match=re.escape(problem)) as raised:
            eval_bio.download_hellaswag(path)
        assert str(raised.value).endswith('download it yourself and pass it with --hellaswag_path=FILE')
        assert os.listdir(tmp_path / 'hellaswag') == []

    def offline(url, timeout):
        raise OSError('Name or service not known')

    monkeypatch.setattr(eval_bio.urllib.request, 'urlopen', offline)
    with pytest.raises(ValueError, match=r'^could not download HellaSwag from https://raw\.githubusercontent\.com/rowanz/'
                                         r'hellaswag/master/data/hellaswag_val\.jsonl \(OSError: Name or service'):
        eval_bio.download_hellaswag(path)
    monkeypatch.setattr(eval_bio.urllib.request, 'urlopen', lambda url, timeout: Response(''.join(official).encode()))
    eval_bio.download_hellaswag(path)
    assert os.listdir(tmp_path / 'hellaswag') == ['hellaswag_val.jsonl'] and open(path).read() == ''.join(official)


@pytest.mark.slow
def test_an_exported_folder_keeps_its_results_in_its_card(folder, runs):
    exported = folder / 'exported'
    first = runs['exported'][1]
    assert json.loads((exported / 'eval_results.json').read_text()) == {'val': first['val']}
    card = (exported / 'README.md').read_text(encoding='utf-8')
    assert card.startswith('# my model\n\nNotes written by hand.\n\n' + eval_results.CARD_START)
    assert f"| ` val ` | ` loss {first['val']['loss']:.4f} nats/token (49 tokens of shake/val) ` |" in card
    # the card edited by hand around the table: the next evaluation replaces the table alone
    edited = card.replace('# my model', '# my model, edited') + 'A footnote.\n'
    (exported / 'README.md').write_text(edited, encoding='utf-8')
    # --out holding this checkpoint's earlier results (spelled as a path of its own) gains the new task
    (folder / 'earlier.json').write_text(json.dumps({'ckpt': './exported', 'val': first['val']}))
    run_script(folder, 'eval_bio.py', '--ckpt=exported', '--tasks=bpb', '--text_path=text.txt', '--max_tokens=100',
               '--out=earlier.json')
    assert json.loads((folder / 'earlier.json').read_text()).keys() == {'ckpt', 'val', 'bpb'}
    results = json.loads((exported / 'eval_results.json').read_text())
    assert results['val'] == first['val'] and results['bpb']['tokens'] == 99
    card = (exported / 'README.md').read_text(encoding='utf-8')
    assert card == ('# my model, edited\n\nNotes written by hand.\n\n' + eval_results.card_section(results) + '\nA footnote.\n')
    assert card.count(eval_results.CARD_START) == 1 and '| ` bpb ` | ' in card
    # exported again, the new card keeps the table
    proc = run_script(folder, 'export_hub.py', '--out_dir=char', '--export_dir=exported')
    assert 'README.new.md' in proc.stdout and 'Notes written by hand' in (exported / 'README.md').read_text()
    new_card = (exported / 'README.new.md').read_text(encoding='utf-8')
    assert eval_results.card_section(results) in new_card and new_card.index('## Evaluation') < new_card.index('## Use')
    assert (exported / 'eval_results.json').exists()
    # exported again from other weights, the results measured the old ones: they go
    checkpoint = torch.load(folder / 'char' / 'ckpt.pt', weights_only=True)
    checkpoint['model']['transformer.ln_f.weight'] += 1
    (folder / 'other').mkdir()
    torch.save(checkpoint, folder / 'other' / 'ckpt.pt')
    proc = run_script(folder, 'export_hub.py', '--out_dir=other', '--export_dir=exported', '--overwrite_card=True')
    assert f'note: {os.path.join("exported", "eval_results.json")} measured the weights exported before' in proc.stderr
    assert not (exported / 'eval_results.json').exists()
    assert eval_results.CARD_START not in (exported / 'README.md').read_text(encoding='utf-8')


def test_a_card_s_hand_edits_and_the_hub_s_cache_are_left_alone():
    # a start marker whose end marker was deleted by hand: the text after it is kept, every time
    card = '# model\n' + eval_results.CARD_START + '\nImportant notes.\n'
    for results in ({'val': {'loss': 1.0, 'tokens': 9, 'dataset': 'a', 'split': 'val'}},
                    {'val': {'loss': 2.0, 'tokens': 9, 'dataset': 'a', 'split': 'val'}}):
        card = eval_results.with_card_section(card, eval_results.card_section(results))
        assert 'Important notes.' in card and card.count(eval_results.CARD_END) == 1
    assert 'loss 2.0000' in card and 'loss 1.0000' not in card
    assert eval_bio.in_hub_cache(os.path.join('hub', 'models--me--wiggle', 'snapshots', 'ea50', 'sub'))
    assert not eval_bio.in_hub_cache(os.path.join('exports', 'snapshots', 'wiggle'))
