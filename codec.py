"""
Text to token ids and back, as a checkpoint was trained: its dataset's characters (meta.pkl) for
character-level runs, GPT-2's BPE otherwise. An exported model carries these facts in its config.json.

Files from outside are data, never code: a pickle can run anything, so a meta.pkl is read as plain
data alone (read_meta), only from a folder of this repository's data/ named by a plain dataset name,
and never for a checkpoint from the hub, whose dataset is its uploader's and no folder here.
"""

import io
import os
import pickle
import re

EOT_ID = 50256  # GPT-2's <|endoftext|>, which ends every document and conversation
GPT2_VOCAB_SIZE = EOT_ID + 1  # the tokens of GPT-2's BPE: a model with fewer cannot use it
GPT2_TOKENIZER = {'type': 'tiktoken', 'encoding': 'gpt2', 'eot_id': EOT_ID}  # GPT-2 BPE's facts (tokenizer_facts)
MAX_VOCAB_SIZE = 2 ** 21  # far above any real vocabulary; a file claiming more would only exhaust memory
DATASET_NAME = re.compile(r'[A-Za-z0-9_.-]+')  # one folder of data/: no separator can lead out of it
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')


class CodeInPickle(pickle.UnpicklingError):
    """A pickle names a class or function: the way a pickle runs code."""


class PlainDataUnpickler(pickle.Unpickler):
    """Unpickles containers, strings and numbers, whose opcodes name no global; anything that names one is refused."""

    def find_class(self, module, name):
        raise CodeInPickle(f'{module}.{name}')


def read_meta(path):
    """A dataset's meta.pkl as a dict, read as plain data: vocab_size (a whole number above 0) and itos
    ({id: character} for ids 0, 1, 2, ...), checked. Anything else raises ValueError with a one-line message."""
    prepare = f'python data/{os.path.basename(os.path.dirname(os.path.abspath(path)))}/prepare.py'
    try:
        with open(path, 'rb') as f:
            # from memory, not the file: a length in a garbled pickle then cannot exceed the bytes really there
            meta = PlainDataUnpickler(io.BytesIO(f.read())).load()
    except OSError as e:
        raise ValueError(f'cannot read {path} ({e.strerror or e})') from None
    except CodeInPickle as e:
        raise ValueError(f'{path} names {e}, and a meta.pkl may hold only plain data (such a pickle can run code); '
                         f'it is not read: run {prepare} again') from None
    except Exception as e:  # a pickle cut short or garbled fails in any of many ways
        raise ValueError(f'{path} is not a readable meta.pkl ({type(e).__name__}); run {prepare} again') from None
    vocab_size = meta.get('vocab_size') if isinstance(meta, dict) else None
    itos = meta.get('itos') if isinstance(meta, dict) else None
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not 1 <= vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(f'{path} has no vocab_size (a whole number from 1 to {MAX_VOCAB_SIZE:,}); run {prepare} again')
    if (not isinstance(itos, dict) or not itos or set(itos) != set(range(len(itos))) or len(itos) > vocab_size
            or not all(isinstance(c, str) and len(c) == 1 for c in itos.values())):
        raise ValueError(f'{path} has no itos mapping the ids 0, 1, 2, ... (at least one, at most vocab_size) each to '
                         f'a single character; run {prepare} again')
    return meta


def dataset_tokenizer(data_dir):
    """The tokenizer facts (see tokenizer_facts) of a prepared dataset: its meta.pkl's characters, else GPT-2
    BPE's (what every prepare script without a meta.pkl writes). ValueError for a meta.pkl that cannot be read."""
    meta_path = os.path.join(data_dir, 'meta.pkl')
    if os.path.isfile(meta_path):
        itos = read_meta(meta_path)['itos']
        return {'type': 'characters', 'chars': [itos[i] for i in range(len(itos))]}
    return GPT2_TOKENIZER


def tokenizer_difference(data, trained):
    """None where two tokenizer facts give every id the same meaning, else how the data's (data) differ from
    those a checkpoint was trained with (trained), in words."""
    def kind(facts):
        return f'{len(facts["chars"])} characters' if facts['type'] == 'characters' else f'{facts["encoding"]} BPE'
    if data['type'] != trained['type'] or kind(data) != kind(trained):
        return f'the data has {kind(data)}, the checkpoint {kind(trained)}'
    if data['type'] == 'characters' and data['chars'] != trained['chars']:
        i = next(i for i, (a, b) in enumerate(zip(data['chars'], trained['chars'])) if a != b)
        return (f'both have {kind(data)}, but id {i} is {data["chars"][i]!r} in the data and '
                f'{trained["chars"][i]!r} in the checkpoint')
    return None


def is_dataset_name(dataset):
    """Whether dataset names a folder of data/ and nothing else (no path, no '..')."""
    return isinstance(dataset, str) and DATASET_NAME.fullmatch(dataset) is not None and dataset not in ('.', '..')


def check_tokenizer(facts, vocab_size, source):
    """Raise ValueError (one line, naming source) unless facts are tokenizer facts (see tokenizer_facts)
    that a model of vocab_size tokens can use."""
    kind = facts.get('type') if isinstance(facts, dict) else None
    if kind == 'characters':
        chars = facts.get('chars')
        if (not isinstance(chars, list) or not chars or len(chars) > vocab_size
                or not all(isinstance(c, str) and len(c) == 1 for c in chars)):
            raise ValueError(f'{source}: the tokenizer\'s "chars" must be a list of single characters, at most '
                             f'{vocab_size} (the vocabulary); export the model again')
    elif kind == 'tiktoken':
        eot_id = facts.get('eot_id')
        if facts.get('encoding') != 'gpt2' or not isinstance(eot_id, int) or isinstance(eot_id, bool):
            raise ValueError(f'{source}: a tiktoken tokenizer must be {{"type": "tiktoken", "encoding": "gpt2", '
                             f'"eot_id": {EOT_ID}}}; export the model again')
        if vocab_size < GPT2_VOCAB_SIZE:
            raise ValueError(f'{source}: GPT-2 BPE needs {GPT2_VOCAB_SIZE} tokens but the model has {vocab_size}; '
                             'export the model again')
    else:
        raise ValueError(f'{source}: the tokenizer must be {{"type": "characters", "chars": [...]}} or '
                         f'{{"type": "tiktoken", ...}}; export the model again')


def gpt2_encoding():
    """tiktoken's GPT-2 BPE; ValueError (one line) where its files cannot be had."""
    import tiktoken
    try:
        return tiktoken.get_encoding(GPT2_TOKENIZER['encoding'])
    except Exception as e:  # its files are downloaded at first use: offline, that fails deep in requests
        raise ValueError(f'GPT-2\'s BPE files could not be loaded ({type(e).__name__}); tiktoken downloads them once '
                         'when online, or reads them from TIKTOKEN_CACHE_DIR') from None


def tokenizer_facts(checkpoint):
    """How a checkpoint's text becomes token ids, as JSON-ready facts: {'type': 'characters', 'chars': [...]}
    (a character's id is its place in chars) or {'type': 'tiktoken', 'encoding': 'gpt2', 'eot_id': 50256}."""
    if checkpoint.get('tokenizer') is not None:  # an exported model states them (checked as it loaded)
        return checkpoint['tokenizer']
    vocab_size = checkpoint['model_args']['vocab_size']
    gpt2 = GPT2_TOKENIZER
    if checkpoint.get('from_hub'):
        if vocab_size < GPT2_VOCAB_SIZE:
            raise ValueError(f'the hub checkpoint has a {vocab_size}-token vocabulary but does not carry its characters, '
                             "and a hub checkpoint's are never read from data/ here: download the file and pass its "
                             'local path, with its dataset prepared in data/')
        return gpt2
    dataset = checkpoint.get('config', {}).get('dataset')
    if dataset is not None and not is_dataset_name(dataset):
        raise ValueError(f'the checkpoint names dataset={dataset!r:.60}, which is not a folder name in data/ (such as '
                         'shakespeare_char); its characters are read from data/<dataset>/meta.pkl alone')
    meta_path = os.path.join(DATA_DIR, str(dataset), 'meta.pkl')
    if dataset is not None and os.path.isfile(meta_path):
        itos = read_meta(meta_path)['itos']
        if len(itos) > vocab_size or len(itos) < vocab_size < GPT2_VOCAB_SIZE:  # a character model: a token per character
            raise ValueError(f'{meta_path} has {len(itos)} characters but the checkpoint was trained on {vocab_size}: '
                             f'data/{dataset} was prepared again since, with other text; prepare it as it was')
        return {'type': 'characters', 'chars': [itos[i] for i in range(len(itos))]}
    if vocab_size < GPT2_VOCAB_SIZE and dataset is None:
        raise ValueError(f'the checkpoint has a {vocab_size}-token vocabulary but names no dataset whose meta.pkl '
                         'holds its characters')
    if vocab_size < GPT2_VOCAB_SIZE:
        raise ValueError(f'the checkpoint has a {vocab_size}-token vocabulary but '
                         f'{meta_path} is missing (run data/{dataset}/prepare.py again)')
    return gpt2


def load_codec(checkpoint):
    """(encode, decode) for a checkpoint, from its tokenizer_facts."""
    facts = tokenizer_facts(checkpoint)
    if facts['type'] == 'characters':
        itos = facts['chars']
        stoi = {c: i for i, c in enumerate(itos)}

        def encode(text):
            unknown = sorted(set(c for c in text if c not in stoi))
            if unknown:
                raise ValueError(f'characters outside the model\'s {len(itos)}-character vocabulary: {unknown!r}')
            return [stoi[c] for c in text]

        return encode, lambda ids: ''.join(itos[i] for i in ids)
    enc = gpt2_encoding()
    # ids past the vocabulary (vocab_size is padded to 50304) are no text: an untrained model may sample them
    return (lambda text: enc.encode(text, allowed_special={'<|endoftext|>'})), lambda ids: enc.decode([i for i in ids if i < enc.n_vocab])
