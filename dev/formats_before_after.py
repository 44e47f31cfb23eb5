"""
Do checkpoints and exports written by an earlier version of this repository load, and give the same logits,
in this one? Write them with the earlier code on the import path, check them with this code:

    git worktree add /tmp/before <commit>
    PYTHONPATH=/tmp/before python dev/formats_before_after.py write /tmp/formats
    PYTHONPATH=. python dev/formats_before_after.py check /tmp/formats

`write` saves, with whatever model_bio and checkpoints.py are first on the path: a bio (v3, sparse gate) and a
GELU checkpoint as train_bio.py writes them (format_version 1), the original release's layout (no
format_version, compile prefix, its model_args), an export of the bio one, and each one's logits on fixed
tokens. `check` loads each with checkpoints.load_model and prints the largest logit difference (0 expected).
"""
import os
import sys
from dataclasses import asdict

import torch

sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))


def fixed_tokens(vocab_size):
    return torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))


def write(folder):
    from checkpoints import export_model, save_checkpoint  # first: conftest puts this tree on the path
    from model_bio import GPT, GPTConfig
    from conftest import write_original_checkpoint
    import model_bio
    print(f'writing with {model_bio.__file__}')
    os.makedirs(folder, exist_ok=True)
    logits = {}
    arms = {'bio': dict(use_bio_mlp=True, use_sparse_gate=True), 'gelu': dict(use_bio_mlp=False, gelu_params_like='v3')}
    for name, arm in arms.items():
        torch.manual_seed(0)
        config = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=False, use_rmsnorm=True,
                           use_rope=True, **arm)
        model = GPT(config).eval()
        for p in model.parameters():  # away from the initial values, so that every weight counts
            p.data.add_(torch.randn_like(p) * 0.1)
        checkpoint = {'model': model.state_dict(), 'model_args': asdict(config), 'iter_num': 5, 'best_val_loss': 3.0,
                      'config': {'dataset': 'shakespeare_char'}, 'format_version': 1}
        save_checkpoint(checkpoint, os.path.join(folder, f'{name}.pt'))
        logits[name] = model(fixed_tokens(65), all_positions=True)[0]
        if name == 'bio':
            export_model(model, checkpoint, None, os.path.join(folder, 'bio_export'))
            logits['bio_export'] = logits['bio']
    weights, model_args = write_original_checkpoint(os.path.join(folder, 'original.pt'))
    model = GPT(GPTConfig(**dict(model_args, use_positions=False)))
    model.load_state_dict(weights)
    logits['original'] = model.eval()(fixed_tokens(model_args['vocab_size']), all_positions=True)[0]
    torch.save(logits, os.path.join(folder, 'logits.pt'))
    print(f'wrote {", ".join(logits)} to {folder}')


def check(folder):
    from checkpoints import load_model
    expected = torch.load(os.path.join(folder, 'logits.pt'), weights_only=True)
    for name, before in expected.items():
        path = os.path.join(folder, name if name.endswith('export') else f'{name}.pt')
        model, _ = load_model(path, 'cpu')
        after = model.eval()(fixed_tokens(model.config.vocab_size), all_positions=True)[0]
        print(f'{name:11s} mlp={model.config.mlp!r:9s} largest logit difference {(after - before).abs().max().item():.3g}')


if __name__ == '__main__':
    {'write': write, 'check': check}[sys.argv[1]](sys.argv[2])
