"""
chat.py's web page over HTTP: the streamed reply, the history trimmed as the REPL trims it, one
generation at a time, each bad request's status and reason, and a client leaving mid-reply.

    python -m pytest tests/test_web_chat.py              (-m "not slow": the quick ones only)
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import web_chat
from chat_template import chat_turn
from chatbot import Chatbot
from conftest import write_bpe_checkpoint

SAMPLING = dict(max_new_tokens=12, temperature=0.0, top_k=50, top_p=1.0, repetition_penalty=1.15, penalty_window=64)


class Gate:
    """A forward pre-hook on the model: counts the model's calls, and holds call number hold_at until opened."""

    def __init__(self, hold_at=None):
        self.calls, self.inputs, self.threads, self.hold_at = 0, [], [], hold_at
        self.opened, self.held = threading.Event(), threading.Event()

    def __call__(self, module, args):
        self.calls += 1
        self.inputs.append(args[0][0].tolist())
        self.threads.append(threading.current_thread().name)
        if self.calls == self.hold_at:
            self.held.set()
            assert self.opened.wait(30), 'the test never opened the gate'


@pytest.fixture(scope='module')
def bot(tmp_path_factory):
    folder = tmp_path_factory.mktemp('web') / 'chat'
    write_bpe_checkpoint(folder, block_size=128)
    return Chatbot(str(folder / 'ckpt.pt'), torch.device('cpu'), 'float32')


@pytest.fixture
def server(bot):
    server = web_chat.make_server(bot, torch.Generator().manual_seed(0), SAMPLING, '', '127.0.0.1', 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def gate(bot):
    gate = Gate()
    handle = bot.model.register_forward_pre_hook(gate)
    yield gate
    gate.opened.set()
    handle.remove()


def post(server, body, headers=None):
    """An open POST /chat: returns (connection, response) with the response's headers read."""
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection.request('POST', '/chat', data, {'Content-Type': 'application/json', **(headers or {})})
    return connection, connection.getresponse()


def events(response):
    return [json.loads(line) for line in response.read().decode().splitlines()]


def test_the_page_is_served_with_the_chat_settings(server):
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    connection.request('GET', '/')
    response = connection.getresponse()
    page = response.read().decode()
    assert response.status == 200 and response.getheader('Content-Type').startswith('text/html')
    assert 'const DEFAULTS = {"system": "", "temperature": 0.0, "top_k": 50}' in page
    assert '<textarea id="message"' in page and 'id="clear"' in page


def test_the_reply_streams_piece_by_piece_as_the_repl_would_write_it(server, bot, gate):
    gate.hold_at = 5  # the 5th model call waits: the pieces before it must already have reached the client
    connection, response = post(server, {'message': 'Hello there', 'system': 'Be brief.'})
    assert response.status == 200 and response.getheader('Content-Type').startswith('application/x-ndjson')
    first = json.loads(response.fp.readline())
    assert gate.held.wait(30) and not gate.opened.is_set() and 'piece' in first
    gate.opened.set()
    rest = events(response)
    pieces = [first['piece']] + [e['piece'] for e in rest if 'piece' in e]
    done = rest[-1]
    assert done['done'] and done['reply'] == ''.join(pieces).strip() and len(pieces) > 1

    prompt, dropped = bot.prompt('Be brief.', [], 'Hello there', SAMPLING['max_new_tokens'])
    assert dropped == 0 and gate.inputs[0] == bot.encode(prompt)
    repl_reply = ''.join(bot.reply(prompt, [], generator=torch.Generator().manual_seed(0), **SAMPLING))
    assert done['reply'] == repl_reply.strip()


def test_the_history_is_trimmed_as_the_repl_trims_it(server, bot, gate):
    history = [[f'question {i}', f'answer {i}'] for i in range(6)]
    connection, response = post(server, {'message': 'And now?', 'history': history, 'top_k': 5})
    got = events(response)
    exchanges = [chat_turn('user', u) + chat_turn('assistant', r) for u, r in history]
    prompt, dropped = bot.prompt('', exchanges, 'And now?', SAMPLING['max_new_tokens'])
    assert 0 < dropped < len(history) and got[0] == {'dropped': dropped}
    assert gate.inputs[0] == bot.encode(prompt) and got[-1]['done']


def hold_one_and_queue_another(server, gate):
    """A first reply held at its 3rd model call and a second request told to wait: their responses."""
    gate.hold_at = 3
    _, first = post(server, {'message': 'first, a long story'})
    assert gate.held.wait(30)
    _, second = post(server, {'message': 'second'})
    assert json.loads(second.fp.readline()) == {'waiting': web_chat.WAITING}
    time.sleep(0.5)
    return first, second


def test_one_reply_at_a_time_and_a_second_client_is_told_to_wait(server, gate):
    first, second = hold_one_and_queue_another(server, gate)
    assert gate.calls == 3  # the second waits: the model has run only for the first, which is held
    gate.opened.set()
    assert events(first)[-1]['done']
    rest = events(second)
    assert rest[-1]['done']
    # every model call of the first reply came before any of the second's (each request has its own thread)
    first_thread, second_thread = gate.threads[0], gate.threads[-1]
    n_first = gate.threads.count(first_thread)
    assert first_thread != second_thread and gate.threads == [first_thread] * n_first + [second_thread] * (gate.calls - n_first)


def test_a_client_that_leaves_while_nothing_is_written_stops_its_reply(server, bot, gate, monkeypatch):
    """The reply stops at the next token even while no text is due (held back as a possible stop
    marker), when no failed write could tell the server the client has gone."""
    monkeypatch.setattr(bot, 'decode', lambda ids: '<|/assistant' * bool(ids))  # always a marker's start
    gate.hold_at = 3
    _, response = post(server, {'message': 'tell me a long story'})
    assert gate.held.wait(30)
    response.close()
    time.sleep(0.2)
    gate.opened.set()
    assert server.generation_lock.acquire(timeout=10)
    server.generation_lock.release()
    assert gate.calls <= 4 < SAMPLING['max_new_tokens']


def test_a_long_history_is_trimmed_in_linear_time(bot):
    history = [chat_turn('user', f'question {i}') + chat_turn('assistant', f'answer {i}') for i in range(3000)]
    started = time.perf_counter()
    prompt, dropped = bot.prompt('', history, 'last?', SAMPLING['max_new_tokens'])
    assert time.perf_counter() - started < 5  # the old way, re-encoding after each drop, took minutes
    assert prompt == ''.join(history[dropped:]) + chat_turn('user', 'last?') + '<|assistant|>\n'
    assert len(bot.encode(prompt)) + bot.reply_room(SAMPLING['max_new_tokens']) <= bot.block_size
    longer = ''.join(history[dropped - 1:]) + chat_turn('user', 'last?') + '<|assistant|>\n'
    assert len(bot.encode(longer)) + bot.reply_room(SAMPLING['max_new_tokens']) > bot.block_size  # one more would not fit


def test_a_failing_model_ends_the_reply_with_a_one_line_error_and_the_server_goes_on(server, bot, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError('probability tensor contains either inf, nan or element < 0')
        yield

    with monkeypatch.context() as patched:
        patched.setattr(bot, 'reply', broken)
        _, response = post(server, {'message': 'hi'})
        got = events(response)
    assert got == [{'error': 'the reply failed (RuntimeError: probability tensor contains either inf, nan or element < 0)'}]
    _, response = post(server, {'message': 'hi'})
    assert events(response)[-1]['done']


def test_a_client_that_leaves_stops_its_reply(server, gate):
    for leaving in hold_one_and_queue_another(server, gate):
        leaving.close()  # the socket closes with the response (an HTTP/1.0 reply owns it)
    time.sleep(0.5)
    gate.opened.set()
    # the reply ends within a token or two of the gate and frees the model; the client that left while
    # waiting never gets the model at all
    assert server.generation_lock.acquire(timeout=10)
    server.generation_lock.release()
    time.sleep(0.5)
    assert gate.calls <= 4 < SAMPLING['max_new_tokens'] and len(set(gate.threads)) == 1


@pytest.mark.parametrize('body, headers, status, reason', [
    ({'message': ''}, {}, 400, 'the message is empty'),
    ({'message': '   \n'}, {}, 400, 'the message is empty'),
    ({'history': []}, {}, 400, 'the message is empty'),
    ({'message': 'word ' * 130}, {}, 413, 'tokens too long'),
    (b'{"message": "hi"', {}, 400, 'the body is not JSON'),
    (b'\xff\xfe', {}, 400, 'the body is not JSON'),
    (b'["hi"]', {}, 400, 'the body must be a JSON object'),
    ({'message': 'hi', 'temprature': 1}, {}, 400, "unknown setting 'temprature'; known: message, history"),
    ({'message': 'hi', 'temperature': 'hot'}, {}, 400, 'temperature must be a number, got "hot"'),
    ({'message': 'hi', 'top_k': 2.5}, {}, 400, 'top_k must be a whole number'),
    ({'message': 'hi', 'top_k': -1}, {}, 400, 'temperature must be in [0, 100] and top_k >= 0'),
    (b'{"message": "hi", "temperature": 1e400}', {}, 400, 'temperature must be in [0, 100]'),
    (b'{"message": "hi", "temperature": NaN}', {}, 400, 'NaN is not a number JSON allows'),
    ({'message': 'hi'}, {'Content-Type': 'text/plain'}, 415, 'with Content-Type: application/json'),
    ({'message': 'hi'}, {'Host': 'evil.example:80'}, 403, 'answers requests to http://127.0.0.1:'),
    ({'message': 'hi', 'history': [['only one']]}, {}, 400, 'history must be a list of [user text, reply] pairs'),
])
def test_bad_requests_get_a_4xx_and_a_one_line_reason(server, gate, body, headers, status, reason):
    connection, response = post(server, body, headers)
    text = response.read().decode()
    assert response.status == status and text.count('\n') == 1, text
    assert reason in json.loads(text)['error']
    assert gate.calls == 0  # nothing was generated


def test_requests_without_a_length_or_to_unknown_places_are_refused(server):
    host = f'Host: 127.0.0.1:{server.server_address[1]}\r\n'.encode()
    for head, status, reason in [(b'', 411, 'needs a Content-Length header'),
                                 (b'Content-Length: 12x\r\n', 400, "Content-Length '12x' is not a number"),
                                 (b'Content-Length: 999999999\r\n', 413, f'at most {web_chat.MAX_BODY} are read')]:
        with socket.create_connection(server.server_address[:2], timeout=30) as s:
            s.sendall(b'POST /chat HTTP/1.1\r\n' + host + b'Content-Type: application/json\r\n' + head + b'\r\n')
            reply = s.makefile('rb').read().decode()
        assert reply.startswith(f'HTTP/1.0 {status}') and reason in reply.splitlines()[-1], reply
    for method, path, status in [('GET', '/nope', 404), ('POST', '/other', 404)]:
        connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
        connection.request(method, path, b'{}')
        response = connection.getresponse()
        assert response.status == status and 'error' in json.loads(response.read())


@pytest.mark.slow
def test_chat_py_serves_the_page_on_localhost_and_stops_on_ctrl_c(tmp_path):
    """chat.py --web=True as a user runs it: it binds 127.0.0.1, answers, and Ctrl-C ends it cleanly."""
    write_bpe_checkpoint(tmp_path / 'chat', block_size=64)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, os.path.join(repo, 'chat.py'), '--out_dir=chat', '--device=cpu',
                             '--web=True', '--port=0', '--max_new_tokens=4', '--system=Be brief.'], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith('WiggleGPT chat (chat/ckpt.pt) at http://127.0.0.1:'), line
        port = int(line.split('127.0.0.1:')[1].split('/')[0])
        connection = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
        connection.request('POST', '/chat', json.dumps({'message': 'Hi'}).encode(), {'Content-Type': 'application/json'})
        got = [json.loads(x) for x in connection.getresponse().read().decode().splitlines()]
        assert got[-1]['done']
        connection.request('GET', '/')
        assert '"system": "Be brief."' in connection.getresponse().read().decode()
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and 'stopped' in err and 'Traceback' not in err

    taken = socket.socket()
    taken.bind(('127.0.0.1', 0))
    taken.listen()
    for port, reason in [(taken.getsockname()[1], 'cannot listen on 127.0.0.1:'), (70000, 'port=70000 is not a port number')]:
        busy = subprocess.run([sys.executable, os.path.join(repo, 'chat.py'), '--out_dir=chat', '--device=cpu', '--web=True',
                               f'--port={port}'], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert busy.returncode == 2 and reason in busy.stderr and 'Traceback' not in busy.stderr
    taken.close()
