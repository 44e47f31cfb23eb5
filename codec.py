"""
Text to token ids and back, as a checkpoint was trained: its dataset's characters (meta.pkl) for
character-level runs, GPT-2's BPE otherwise.
"""

import os
import pickle

EOT_ID = 50256  # GPT-2's <|endoftext|>, which ends every document and conversation


def load_codec(checkpoint):
    """(encode, decode) for a checkpoint: its dataset's meta.pkl for character-level runs, else GPT-2 BPE."""
    dataset = checkpoint.get('config', {}).get('dataset')
    meta_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', str(dataset), 'meta.pkl')
    if dataset and os.path.isfile(meta_path):
        with open(meta_path, 'rb') as f:
            meta = pickle.load(f)
        stoi, itos = meta['stoi'], meta['itos']

        def encode(text):
            unknown = sorted(set(c for c in text if c not in stoi))
            if unknown:
                raise ValueError(f'characters outside the {dataset} vocabulary: {unknown!r}')
            return [stoi[c] for c in text]

        return encode, lambda ids: ''.join(itos[i] for i in ids)
    if checkpoint['model_args']['vocab_size'] < 50257:
        raise ValueError(f'the checkpoint has a {checkpoint["model_args"]["vocab_size"]}-token vocabulary but '
                         f'{meta_path} is missing (run data/{dataset}/prepare.py again)')
    import tiktoken
    enc = tiktoken.get_encoding('gpt2')
    return (lambda text: enc.encode(text, allowed_special={'<|endoftext|>'})), enc.decode
