"""
chat.py's OpenAI chat API (web_chat.py, under /v1) driven by the official openai client, as existing
clients drive it: the model list, a completion equal to the REPL's reply, a streamed one equal to it
piece for piece, stop sequences, a seed, each bad request's error in OpenAI's shape, and the key.

    python -m pytest tests/test_openai_api.py
"""

import base64
import http.client
import json
import random

import pytest
import torch

import web_chat
from chat_template import chat_turn
from chatbot import Chatbot
from conftest import serving, write_bpe_checkpoint

openai = pytest.importorskip('openai', reason='the openai package is a test-only dependency (.ci/run installs it)')
SAMPLING = dict(max_new_tokens=12, temperature=0.0, top_k=50, top_p=1.0, repetition_penalty=1.15, penalty_window=64)
KEY = 'the-key'


@pytest.fixture(scope='module')
def bot(tmp_path_factory):
    folder = tmp_path_factory.mktemp('api') / 'chat'
    write_bpe_checkpoint(folder, block_size=128)
    return Chatbot(str(folder / 'ckpt.pt'), torch.device('cpu'), 'float32')


@pytest.fixture(scope='module')
def server(bot):
    """One server with a key for the module: requests do not change it."""
    keyed = web_chat.ChatServer(bot, torch.Generator().manual_seed(0), SAMPLING, '', '127.0.0.1', 0, api_key=KEY)
    with serving(keyed) as server:
        yield server


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + 'v1', api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture
def prompts(bot):
    """The prompts the model is given (its calls with more than one token: the KV cache feeds one after)."""
    fed = []
    handle = bot.model.register_forward_pre_hook(lambda module, args: fed.append(args[0][0].tolist()))
    yield lambda: [bot.decode(ids) for ids in fed if len(ids) > 1]
    handle.remove()


def repl_reply(bot, prompt, **changes):
    """The reply chat.py's REPL gives to prompt (greedy, so no generator state is involved)."""
    generated = []
    text = ''.join(bot.reply(prompt, generated, generator=torch.Generator().manual_seed(0), **{**SAMPLING, **changes}))
    return text.strip(), generated


def test_the_model_list_names_the_one_model(client):
    assert [m.id for m in client.models.list()] == ['wigglegpt'] and client.models.retrieve('wigglegpt').id == 'wigglegpt'
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve('gpt-4o')


def test_a_completion_is_the_repls_reply_with_its_token_counts(client, bot, prompts):
    messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'},
                {'role': 'assistant', 'content': 'Hello.'}, {'role': 'user', 'content': [{'type': 'text', 'text': 'Again?'}]}]
    got = client.chat.completions.create(model='wigglegpt', messages=messages, max_tokens=9)
    prompt = bot.prompt('Be brief.', [chat_turn('user', 'Hi') + chat_turn('assistant', 'Hello.')], 'Again?', 9)[0]
    assert prompts() == [prompt]
    reply, generated = repl_reply(bot, prompt, max_new_tokens=9)
    choice = got.choices[0]
    assert choice.message.role == 'assistant' and choice.message.content == reply and reply
    assert choice.finish_reason == ('length' if len(generated) == 9 else 'stop') and got.object == 'chat.completion'
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(bot.encode(prompt)), len(generated))
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_a_streamed_completion_is_the_same_reply_piece_by_piece(client, bot):
    messages = [{'role': 'user', 'content': 'Tell me something.'}]
    whole = client.chat.completions.create(model='wigglegpt', messages=messages)
    chunks = list(client.chat.completions.create(model='wigglegpt', messages=messages, stream=True,
                                                 stream_options={'include_usage': True}))
    deltas = [c.choices[0].delta.content or '' for c in chunks if c.choices]
    assert chunks[0].choices[0].delta.role == 'assistant' and len([d for d in deltas if d]) > 1
    assert ''.join(deltas) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[:-1] == [None] * (len(finishes) - 1) and finishes[-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == 'chat.completion.chunk'


def test_the_stream_is_server_sent_events_ending_with_done(server):
    connection = http.client.HTTPConnection(*server.server_address, timeout=60)
    body = {'model': 'wigglegpt', 'messages': [{'role': 'user', 'content': 'Hi'}], 'stream': True, 'max_tokens': 3}
    connection.request('POST', '/v1/chat/completions', json.dumps(body),
                       {'Content-Type': 'application/json', 'Authorization': f'Bearer {KEY}'})
    response = connection.getresponse()
    events = response.read().decode().split('\n\n')
    assert response.getheader('Content-Type').startswith('text/event-stream')
    assert events[-2:] == ['data: [DONE]', ''] and all(e.startswith('data: {') for e in events[:-2])


def test_a_stop_sequence_ends_the_reply_before_it_streamed_or_not(client):
    messages = [{'role': 'user', 'content': 'Count.'}]
    unstopped = client.chat.completions.create(model='wigglegpt', messages=messages).choices[0].message.content
    stop = unstopped.rstrip()[-3:]  # no whitespace: the reply is shown without its leading space
    assert stop.strip() == stop and unstopped.index(stop) < len(unstopped) - 3
    got = client.chat.completions.create(model='wigglegpt', messages=messages, stop=[stop, 'never seen'])
    assert got.choices[0].message.content == unstopped[:unstopped.index(stop)]  # spaces before it kept, as OpenAI does
    assert got.choices[0].finish_reason == 'stop' and got.usage.completion_tokens < 12
    chunks = list(client.chat.completions.create(model='wigglegpt', messages=messages, stop=stop, stream=True))
    assert ''.join(c.choices[0].delta.content or '' for c in chunks) == got.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == 'stop'


def test_a_seed_repeats_a_sampled_reply(client):
    asked = dict(model='wigglegpt', messages=[{'role': 'user', 'content': 'Hi'}], temperature=1.5, top_p=0.99)
    replies = [client.chat.completions.create(seed=seed, **asked).choices[0].message.content for seed in (7, 7, 8)]
    assert replies[0] == replies[1] != replies[2]


@pytest.mark.parametrize('changes, error, status, message, param', [
    ({'model': 'gpt-4o'}, openai.NotFoundError, 404, "The model 'gpt-4o' does not exist; this server has 'wigglegpt'", 'model'),
    ({'temperature': -1}, openai.BadRequestError, 400, 'temperature must be in [0, 100], got -1', 'temperature'),
    ({'top_p': 0}, openai.BadRequestError, 400, 'top_p must be in (0, 1], got 0', 'top_p'),
    ({'max_tokens': 13}, openai.BadRequestError, 400, 'max_tokens must be in [1, 12], got 13', 'max_tokens'),
    ({'n': 2}, openai.BadRequestError, 400, 'n must be 1', 'n'),
    ({'stop': ['a', 'b', 'c', 'd', 'e']}, openai.BadRequestError, 400, 'stop must be a string or a list of at most 4', 'stop'),
    ({'stop': 'x' * 257}, openai.BadRequestError, 400, 'each of 1 to 256 characters', 'stop'),
    ({'stream_options': {'include_usage': True}}, openai.BadRequestError, 400, 'only allowed with stream=true',
     'stream_options'),
    ({'frequency_penalty': 0.5}, openai.BadRequestError, 400, 'frequency_penalty is not supported here, except as 0',
     'frequency_penalty'),
    ({'messages': [{'role': ['user'], 'content': 'a'}]}, openai.BadRequestError, 400, 'messages[0] must be an object with a role',
     'messages[0]'),
    ({'messages': []}, openai.BadRequestError, 400, "the last message must be the user's", 'messages'),
    ({'messages': [{'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': 'b'}]}, openai.BadRequestError,
     400, "the last message must be the user's", 'messages'),
    ({'messages': [{'role': 'tool', 'content': 'a'}]}, openai.BadRequestError, 400, 'messages[0] must be an object with a role',
     'messages[0]'),
    ({'messages': [{'role': 'user', 'content': [{'type': 'image_url', 'image_url': {'url': 'x'}}]}]},
     openai.BadRequestError, 400, 'messages[0].content must be text', 'messages[0].content'),
    ({'messages': [{'role': 'user', 'content': 'a'}, {'role': 'system', 'content': 'b'}, {'role': 'user', 'content': 'c'}]},
     openai.BadRequestError, 400, 'messages[1]: system messages must come before the conversation', 'messages[1]'),
    ({'messages': [{'role': 'user', 'content': 'word ' * 200}]}, openai.BadRequestError, 400,
     "kept for the reply (max_tokens, at most half the context) they must fit the model's context of 128", 'messages'),
    ({'extra_body': {'logit_bias_typo': 1}}, openai.BadRequestError, 400, 'Unrecognized request argument supplied: logit_bias_typo',
     'logit_bias_typo'),
])
def test_a_bad_request_gets_openais_error_shape(client, prompts, changes, error, status, message, param):
    asked = {'model': 'wigglegpt', 'messages': [{'role': 'user', 'content': 'Hi'}], **changes}
    with pytest.raises(error) as e:
        client.chat.completions.create(**asked)
    assert e.value.status_code == status and message in e.value.body['message'], e.value.body
    assert e.value.body['param'] == param and e.value.body['type'] == 'invalid_request_error'
    assert prompts() == []  # nothing was generated


def test_openais_other_parameters_at_their_neutral_values_are_accepted(client):
    got = client.chat.completions.create(model='wigglegpt', messages=[{'role': 'user', 'content': 'Hi'}], max_tokens=2,
                                         frequency_penalty=0, presence_penalty=0, logprobs=False, logit_bias={},
                                         response_format={'type': 'text'}, user='someone')
    assert got.choices[0].message.role == 'assistant'


def test_fuzzed_api_requests_get_openais_error_shape_or_a_reply(server, client, capsys):
    """Each good request with one field given an odd value: a 4xx in OpenAI's shape or a reply, never a 500."""
    rng = random.Random(0)
    odd = [None, True, 0, -1, 2 ** 70, 1.5, '', 'x', [], {}, [[]], ['user'], {'role': 'user'}, [{'type': 'text'}],
           [{'role': 'user', 'content': None}], [{'role': ['user'], 'content': 'a'}], {'include_usage': 'yes'}]
    good = {'model': 'wigglegpt', 'messages': [{'role': 'user', 'content': 'Hi'}], 'max_tokens': 2}
    connection = http.client.HTTPConnection(*server.server_address, timeout=60)
    statuses = set()
    for _ in range(150):
        body = json.loads(json.dumps(good))
        where = rng.choice(['model', 'messages', 'max_tokens', 'temperature', 'top_p', 'top_k', 'stop', 'seed', 'n',
                            'stream', 'stream_options', 'frequency_penalty', 'logprobs', 'message', 'role', 'content'])
        if where in ('message', 'role', 'content'):
            target = body['messages'] if where == 'message' else body['messages'][0]
            target[0 if where == 'message' else where] = rng.choice(odd)
        else:
            body[where] = rng.choice(odd)
        connection.request('POST', '/v1/chat/completions', json.dumps(body),
                           {'Content-Type': 'application/json', 'Authorization': f'Bearer {KEY}'})
        response = connection.getresponse()
        text = response.read().decode()
        statuses.add(response.status)
        assert response.status == 200 or (400 <= response.status < 500 and set(json.loads(text)['error']) ==
                                          {'message', 'type', 'param', 'code'}), (body, response.status, text)
    assert 200 in statuses and len(statuses) > 1 and 'Traceback' not in capsys.readouterr().err


def test_a_conversation_longer_than_the_context_is_refused_with_its_code(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model='wigglegpt', messages=[{'role': 'user', 'content': 'word ' * 200}])
    assert e.value.code == 'context_length_exceeded'


def test_the_key_is_required_on_every_route(server, client):
    for wrong in ('wrong', KEY + 'x', KEY[:-1]):
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=server.url + 'v1', api_key=wrong, max_retries=0).models.list()
        assert e.value.body['code'] == 'invalid_api_key'
    connection = http.client.HTTPConnection(*server.server_address, timeout=60)
    for path, headers in [('/', {}), ('/', {'Authorization': 'Bearer wrong'}), ('/chat', {}), ('/nope', {}),
                          ('/', {'Authorization': 'Basic ' + base64.b64encode(b'user:wrong').decode()}),
                          ('/', {'Authorization': 'Basic ' + base64.b64encode(f'user:{KEY}x'.encode()).decode()})]:
        connection.request('GET', path, headers=headers)
        response = connection.getresponse()
        response.read()
        assert response.status == 401 and response.getheader('WWW-Authenticate').startswith('Basic'), path
    for authorization in [f'Bearer {KEY}', 'Basic ' + base64.b64encode(f'anyone:{KEY}'.encode()).decode()]:
        connection.request('GET', '/', headers={'Authorization': authorization})
        response = connection.getresponse()
        assert response.status == 200 and b'WiggleGPT chat' in response.read()
