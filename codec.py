"""
Text to token ids and back, as a checkpoint was trained: its dataset's characters (meta.pkl) for
character-level runs, GPT-2's BPE otherwise. An exported model carries these facts in its config.json.
"""

import os
import pickle

EOT_ID = 50256  # GPT-2's <|endoftext|>, which ends every document and conversation


def tokenizer_facts(checkpoint):
    """How a checkpoint's text becomes token ids, as JSON-ready facts: {'type': 'characters', 'chars': [...]}
    (a character's id is its place in chars) or {'type': 'tiktoken', 'encoding': 'gpt2', 'eot_id': 50256}."""
    if checkpoint.get('tokenizer'):  # an exported model states them
        return checkpoint['tokenizer']
    dataset = checkpoint.get('config', {}).get('dataset')
    meta_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', str(dataset), 'meta.pkl')
    if dataset and os.path.isfile(meta_path):
        with open(meta_path, 'rb') as f:
            itos = pickle.load(f)['itos']
        return {'type': 'characters', 'chars': [itos[i] for i in range(len(itos))]}
    if checkpoint['model_args']['vocab_size'] < 50257:
        raise ValueError(f'the checkpoint has a {checkpoint["model_args"]["vocab_size"]}-token vocabulary but '
                         f'{meta_path} is missing (run data/{dataset}/prepare.py again)')
    return {'type': 'tiktoken', 'encoding': 'gpt2', 'eot_id': EOT_ID}


def load_codec(checkpoint):
    """(encode, decode) for a checkpoint, from its tokenizer_facts."""
    facts = tokenizer_facts(checkpoint)
    if facts.get('type') == 'characters':
        itos = facts['chars']
        stoi = {c: i for i, c in enumerate(itos)}

        def encode(text):
            unknown = sorted(set(c for c in text if c not in stoi))
            if unknown:
                raise ValueError(f'characters outside the model\'s {len(itos)}-character vocabulary: {unknown!r}')
            return [stoi[c] for c in text]

        return encode, lambda ids: ''.join(itos[i] for i in ids)
    if facts.get('type') != 'tiktoken':
        raise ValueError(f'unknown tokenizer {facts!r}: expected type characters or tiktoken')
    import tiktoken
    enc = tiktoken.get_encoding(facts['encoding'])
    # ids past the vocabulary (vocab_size is padded to 50304) are no text: an untrained model may sample them
    return (lambda text: enc.encode(text, allowed_special={'<|endoftext|>'})), lambda ids: enc.decode([i for i in ids if i < enc.n_vocab])
