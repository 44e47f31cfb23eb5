"""
chat.py's web page over HTTP: the streamed reply, the history trimmed as the REPL trims it, one
generation at a time, each bad request's status and reason, a client leaving mid-reply, the host
names answered, the key, the limits under abuse (clients that trickle, a full queue, too many
connections from one client) and a few hundred fuzzed requests. tests/test_openai_api.py has the
OpenAI API.

    python -m pytest tests/test_web_chat.py              (-m "not slow": the quick ones only)
"""

import asyncio
import http.client
import json
import os
import random
import resource
import select
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest
import torch

import web_chat
from chat_template import chat_turn
from chatbot import Chatbot
from conftest import message_lines, python, run_script, serving, write_bpe_checkpoint

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
def start(bot):
    """start(host, allowed_hosts, **more ChatServer settings): a server of the chat serving in a thread,
    stopped after the test."""
    servers = []

    def start(host='127.0.0.1', allowed_hosts='', system='', **settings):
        server = web_chat.ChatServer(bot, torch.Generator().manual_seed(0), SAMPLING, system, host, 0, allowed_hosts,
                                     **settings)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return server

    yield start
    for server, thread in servers:
        server.shutdown()
        thread.join(30)
        assert not thread.is_alive()


@pytest.fixture(scope='module')
def shared_server(bot):
    with serving(web_chat.ChatServer(bot, torch.Generator().manual_seed(0), SAMPLING, '', '127.0.0.1', 0)) as server:
        yield server


@pytest.fixture
def server(shared_server):
    """The module's server, once the last test's replies and connections are over (starting one per test
    took most of these tests' time)."""
    wait_idle(shared_server)
    return shared_server


@pytest.fixture
def gate(bot):
    gate = Gate()
    handle = bot.model.register_forward_pre_hook(gate)
    yield gate
    gate.opened.set()
    handle.remove()


def post(server, body, headers=None, source=None):
    """An open POST /chat (from the loopback address source, if given): returns (connection, response)
    with the response's headers read."""
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30, source_address=source and (source, 0))
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    # Connection: close hands the socket to the response: closing the response is the client leaving
    connection.request('POST', '/chat', data, {'Content-Type': 'application/json', 'Connection': 'close', **(headers or {})})
    return connection, connection.getresponse()


def events(response):
    return stream_events(response.read().decode())


def stream_events(text):
    """The events of a 200 reply (blank lines are the server's checks that a client is still there)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def exchange(server, body=b'', headers=None, line=b'POST /chat HTTP/1.1', half_close=False):
    """A request sent as raw bytes: line, the server's Host, Content-Type: application/json, the body's
    Content-Length, Connection: close and body, each header replaced by headers (str or bytes; None leaves
    it out); with half_close the client then shuts its side (which tells the server it has gone). Returns
    (status, headers, text) once the server closes; status None where no HTTP answer came."""
    host, port = server.server_address[:2]
    fields = {'Host': f'{web_chat.bracketed(host)}:{port}', 'Content-Type': 'application/json',
              'Content-Length': str(len(body)), 'Connection': 'close', **(headers or {})}
    head = [line] + [name.encode() + b': ' + (value if isinstance(value, bytes) else value.encode())
                     for name, value in fields.items() if value is not None]
    with socket.create_connection((host, port), timeout=10) as s:
        try:  # the server may refuse and close before it has read all of a long request
            s.sendall(b'\r\n'.join(head) + b'\r\n\r\n' + body)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        return parse_answer(s.makefile('rb').read())


def parse_answer(answer):
    """(status, {lower-case header: value}, body text) of an HTTP answer; (None, {}, text) for no answer."""
    head, _, body = answer.partition(b'\r\n\r\n')
    lines = head.decode('latin-1').split('\r\n')
    if not lines[0].startswith('HTTP/1.'):
        return None, {}, answer.decode(errors='replace')
    fields = {k.lower(): v for k, v in (line.partition(': ')[::2] for line in lines[1:])}
    if fields.get('transfer-encoding') == 'chunked':  # a streamed reply: size in hex, CRLF, the chunk, CRLF, ...
        chunks, rest = [], body
        while rest:
            size, _, rest = rest.partition(b'\r\n')
            chunks.append(rest[:int(size, 16)])
            rest = rest[int(size, 16) + 2:]
        body = b''.join(chunks)
    return int(lines[0].split()[1]), fields, body.decode()


def error_of(text):
    """The reason of a one-line JSON error, asserting that text is one."""
    assert text.endswith('\n') and text.count('\n') == 1, text
    return json.loads(text)['error']


def wait_idle(server):
    """Wait until no reply is running or waiting and every connection has closed (and said what it would on
    stderr)."""
    deadline = time.monotonic() + 10
    while server.replies.queued or server.uvicorn.server_state.connections:
        assert time.monotonic() < deadline, 'the server stayed busy'
        time.sleep(0.02)


def get_page(server):
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    connection.request('GET', '/')
    response = connection.getresponse()
    assert response.status == 200 and response.getheader('Content-Type').startswith('text/html')
    page = response.read().decode()
    connection.close()
    return page


def test_the_page_is_served_with_the_chat_settings(server):
    page = get_page(server)
    assert 'const DEFAULTS = {"system": "", "temperature": 0.0, "top_k": 50}' in page
    assert '<textarea id="message"' in page and 'id="clear"' in page


def test_each_connection_writes_without_waiting_for_the_clients_ack(server):
    # Nagle's algorithm on, a write after a reply's first waited for the client's delayed ack: 40 ms a kept connection's request
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    connection.request('GET', '/')
    connection.getresponse().read()
    sockets = [c.transport.get_extra_info('socket') for c in server.uvicorn.server_state.connections]
    assert sockets and all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets)
    connection.close()


def test_the_operators_system_prompt_applies_but_is_shown_only_when_asked(start, bot, gate):
    hidden = start(system='Secret rules.')
    assert 'Secret rules' not in get_page(hidden)
    _, response = post(hidden, {'message': 'hi'})
    assert events(response)[-1]['done']
    assert gate.inputs[0] == bot.encode(bot.prompt('Secret rules.', [], 'hi', SAMPLING['max_new_tokens'])[0])
    _, response = post(hidden, {'message': 'hi', 'system': 'Mine.'})  # a visitor's own replaces it
    assert events(response)[-1]['done']
    prompts = [bot.decode(ids) for ids in gate.inputs if len(ids) > 1]
    assert len(prompts) == 2 and prompts[1] == bot.prompt('Mine.', [], 'hi', SAMPLING['max_new_tokens'])[0]
    shown = start(system='Open rules.', show_system=True)
    assert '"system": "Open rules."' in get_page(shown)


def test_the_reply_streams_piece_by_piece_as_the_repl_would_write_it(server, bot, gate):
    gate.hold_at = 5  # the 5th model call waits: the pieces before it must already have reached the client
    connection, response = post(server, {'message': 'Hello there', 'system': 'Be brief.'})
    assert response.status == 200 and response.getheader('Content-Type').startswith('application/x-ndjson')
    first = json.loads(response.readline())
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
    assert json.loads(second.readline()) == {'waiting': web_chat.WAITING}
    time.sleep(0.5)
    return first, second


def test_one_reply_at_a_time_and_a_second_client_is_told_to_wait(server, gate):
    first, second = hold_one_and_queue_another(server, gate)
    assert gate.calls == 3  # the second waits: the model has run only for the first, which is held
    gate.opened.set()
    assert events(first)[-1]['done']
    rest = events(second)
    assert rest[-1]['done']
    # every model call of the first reply came before any of the second's: a reply's first call takes its
    # whole prompt, the later ones a token each (the KV cache)
    starts = [i for i, ids in enumerate(gate.inputs) if len(ids) > 1]
    assert len(starts) == 2 and starts[0] == 0 and len(set(gate.threads)) == 1


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
    wait_idle(server)
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


@pytest.mark.parametrize('error, line', [
    (RuntimeError('probability tensor contains either inf, nan or element < 0\nmore'),
     'RuntimeError: probability tensor contains either inf, nan or element < 0'),
    (MemoryError(), 'MemoryError'),  # no message: the type alone, not 'MemoryError: '
])
def test_a_failing_model_ends_the_reply_with_a_one_line_error_and_the_server_goes_on(server, bot, monkeypatch,
                                                                                    error, line):
    def broken(*args, **kwargs):
        raise error
        yield

    with monkeypatch.context() as patched:
        patched.setattr(bot, 'reply', broken)
        _, response = post(server, {'message': 'hi'})
        got = events(response)
    assert got == [{'error': f'the reply failed ({line})'}]
    _, response = post(server, {'message': 'hi'})
    assert events(response)[-1]['done']


def test_a_client_that_leaves_stops_its_reply(server, gate):
    for leaving in hold_one_and_queue_another(server, gate):
        leaving.close()  # the socket closes with the response (an HTTP/1.0 reply owns it)
    time.sleep(0.5)
    gate.opened.set()
    # the reply ends within a token or two of the gate and frees the model; the client that left while
    # waiting never gets the model at all
    wait_idle(server)
    assert gate.calls <= 4 < SAMPLING['max_new_tokens'] and [len(ids) > 1 for ids in gate.inputs].count(True) == 1


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
    ({'message': 'hi'}, {'Host': 'evil.example:80'}, 403, "does not answer to the host 'evil.example:80'"),
    ({'message': 'hi', 'history': [['only one']]}, {}, 400, 'history must be a list of [user text, reply] pairs'),
])
def test_bad_requests_get_a_4xx_and_a_one_line_reason(server, gate, body, headers, status, reason):
    connection, response = post(server, body, headers)
    text = response.read().decode()
    assert response.status == status and text.count('\n') == 1, text
    assert reason in json.loads(text)['error']
    assert gate.calls == 0  # nothing was generated


@pytest.mark.parametrize('line, headers, body, status, reason', [
    pytest.param(b'POST /chat HTTP/1.1', {'Content-Length': None}, b'', 400, 'the body is not JSON', id='no-length'),
    pytest.param(b'POST /chat HTTP/1.1', {'Content-Length': '12x'}, b'', 400, 'the request is not HTTP/1.0 or 1.1',
                 id='length-12x'),
    pytest.param(b'POST /chat HTTP/1.1', {'Content-Length': b'\xb2'}, b'', 400, 'the request is not HTTP/1.0 or 1.1',
                 id='length-superscript-2'),
    pytest.param(b'POST /chat HTTP/1.1', {'Content-Length': '-1'}, b'', 400, 'the request is not HTTP/1.0 or 1.1',
                 id='length-negative'),
    pytest.param(b'POST /chat HTTP/1.1', {'Content-Length': '999999999'}, b'', 413,
                 'the body is too long: at most 1000 bytes are read', id='length-too-long'),
    pytest.param(b'POST /chat HTTP/1.1', {}, b'{"message": "' + b'x' * 1000 + b'"}', 413,
                 'the body is too long: at most 1000 bytes are read', id='body-too-long'),
    pytest.param(b'POST /chat HTTP/1.1', {'Content-Length': None, 'Transfer-Encoding': 'chunked'},
                 b'%x\r\n' % 1200 + b'x' * 1200 + b'\r\n0\r\n\r\n', 413, 'the body is too long: at most 1000 bytes',
                 id='chunked-body-too-long'),
    pytest.param(b'POST /chat HTTP/1.1', {'Content-Length': '9' * 5000}, b'', 400, 'the request is not HTTP/1.0 or 1.1',
                 id='length-5000-digits'),
    pytest.param(b'POST /chat HTTP/1.1', {}, b'[' * 200000, 400, 'the body is nested too deeply to read', id='nested-body'),
    pytest.param(b'POST /chat HTTP/1.1', {}, b'{"message": "hi", "top_k": ' + b'[' * 5000 + b']' * 5000 + b'}', 400,
                 'the body is nested too deeply to read', id='nested-setting'),
    pytest.param(b'GET /nope HTTP/1.1', {}, b'', 404, 'no route /nope; the page is /', id='no-page'),
    pytest.param(b'POST /other HTTP/1.1', {}, b'{}', 404, 'no route /other; the page is /, its messages go to POST /chat',
                 id='no-route'),
    pytest.param(b'GET / HTTP/1.1', {'Host': 'evil.example'}, b'', 403, "does not answer to the host 'evil.example'",
                 id='foreign-host'),
    pytest.param(b'BREW /chat HTTP/1.1', {}, b'', 405, 'BREW is not allowed on /chat', id='unknown-method'),
    pytest.param(b'GET /chat HTTP/1.1', {}, b'', 405, 'GET is not allowed on /chat', id='wrong-method'),
])
def test_malformed_requests_get_a_4xx_and_a_one_line_reason(server, gate, monkeypatch, line, headers, body, status, reason):
    if 'at most 1000 bytes' in reason:  # the body is counted as it comes, with or without its length
        monkeypatch.setattr(web_chat, 'MAX_BODY', 1000)
    got, fields, text = exchange(server, body, headers, line)
    assert got == status and reason in error_of(text), text
    assert fields['x-frame-options'] == 'DENY' and gate.calls == 0


@pytest.mark.parametrize('request_line', [b'GET /\r\n', b'GET /\n', b'\r\nGET / HTTP/2.0\r\n'])
def test_an_http_0_9_request_is_refused_at_its_first_line(server, request_line):
    """HTTP/0.9 sends no version and no headers: waiting for them would end in a 408 seconds later."""
    started = time.monotonic()
    with socket.create_connection(server.server_address, timeout=10) as s:
        s.sendall(request_line)
        status, fields, text = parse_answer(s.makefile('rb').read())
    assert status == 400 and 'the request is not HTTP/1.0 or 1.1' in error_of(text) and time.monotonic() - started < 2
    assert fields['x-frame-options'] == 'DENY'


def test_headers_past_16_kb_get_a_400_before_they_end(server):
    with socket.create_connection(server.server_address, timeout=10) as s:
        s.sendall(b'POST /chat HTTP/1.1\r\nX-Big: ' + b'x' * 20000)  # and no end in sight
        status, fields, text = parse_answer(s.makefile('rb').read())
    assert status == 400 and 'the request is not HTTP/1.0 or 1.1' in error_of(text)


def test_head_gets_the_pages_headers_and_no_server_names_its_software(server):
    status, fields, text = exchange(server, line=b'HEAD / HTTP/1.1', headers={'Content-Type': None, 'Content-Length': None})
    assert status == 200 and text == '' and fields['content-type'].startswith('text/html'), (status, text)
    assert 'server' not in fields and fields['x-frame-options'] == 'DENY'


@pytest.mark.parametrize('body, sent', [(b'', b''), (b'{"message": "hi"}', b'{"mess')], ids=['headers', 'body'])
def test_a_request_that_does_not_arrive_in_time_gets_a_408(server, monkeypatch, body, sent):
    monkeypatch.setattr(web_chat, 'REQUEST_SECONDS', 0.3)
    port = server.server_address[1]
    with socket.create_connection(server.server_address, timeout=10) as s:
        started = time.monotonic()
        head = b'POST /chat HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n' % port
        s.sendall(head + (b'Content-Length: %d\r\n\r\n' % len(body) + sent if body else b'X-Slow: 1'))
        status, fields, text = parse_answer(s.makefile('rb').read())
    assert status == 408 and 'did not arrive within 0.3 s' in error_of(text) and time.monotonic() - started < 5


@pytest.mark.parametrize('system, message, what', [('word ' * 130, 'hi', 'system prompt'),
                                                   ('Be brief.', 'word ' * 130, 'message')], ids=['system', 'message'])
def test_a_conversation_too_long_for_the_context_names_what_is_too_long(server, bot, gate, system, message, what):
    _, response = post(server, {'message': message, 'system': system})
    room, context = bot.reply_room(SAMPLING['max_new_tokens']), bot.block_size
    alone = bot.prompt(system, [], '' if what == 'system prompt' else message.strip(), SAMPLING['max_new_tokens'])[0]
    over = len(bot.encode(alone)) + room - context
    beside = {'system prompt': 'a message', 'message': 'the system prompt'}[what]
    assert response.status == 413 and error_of(response.read().decode()) == (
        f'the {what} is {over} tokens too long: with {beside} and {room} tokens kept for the reply it must fit '
        f"the model's context of {context}")
    assert gate.calls == 0


@pytest.mark.parametrize('host, allowed_hosts, answers', [
    ('127.0.0.1', '', [('127.0.0.1:{port}', 200), ('localhost:{port}', 200), ('LocalHost:{port}', 200), ('[::1]:{port}', 200),
                       (f'{socket.gethostname()}:{{port}}', 200), ('evil.example:{port}', 403),
                       ('127.0.0.1', 403),  # the port may be left out on port 80 only
                       ('localhost:1', 403), (None, 400)]),  # HTTP/1.1 needs a Host
    ('127.0.0.1', 'chat.lan, Box.LAN', [('box.lan:{port}', 200)]),
    ('0.0.0.0', '', [('evil.example:{port}', 403),  # any host used to be answered off loopback
                     ('0.0.0.0:{port}', 200), ('localhost:{port}', 200)]),
    ('0.0.0.0', 'chat.lan', [('chat.lan:{port}', 200), ('chat.lan.evil.example:{port}', 403)]),
    ('127.0.0.1', '::2, [FE80::1]', [('[fe80::1]:{port}', 200), ('[::2]:{port}', 200)]),  # IPv6 literals, bracketed or not
])
def test_only_requests_to_the_servers_own_names_are_answered(start, host, allowed_hosts, answers):
    """DNS rebinding (another site's name pointed at this machine) is refused on every address."""
    server = start(host, allowed_hosts, allow_anyone=host == '0.0.0.0')
    port = server.server_address[1]
    for header, status in answers:
        got, _, text = exchange(server, headers={'Host': header and header.format(port=port)}, line=b'GET / HTTP/1.1')
        assert got == status, (header, text)
        if status != 200:
            assert {403: 'does not answer to the host', 400: 'not HTTP/1.0 or 1.1'}[status] in error_of(text)


@pytest.mark.parametrize('host, allowed_hosts, message', [
    ('', '', '--host is empty; give the address to listen on'),  # '' listened on every interface
    ('127.0.0.1', 'name:8000', "--allowed_hosts names 'name:8000': give host names or addresses alone"),
    ('127.0.0.1', 'box.lan, 192.168.1.5:80', "--allowed_hosts names '192.168.1.5:80'"),
    ('127.0.0.1', '[::1]:8000', "--allowed_hosts names '[::1]:8000'"),
    ('127.0.0.1', 'box.lan/chat', "--allowed_hosts names 'box.lan/chat'"),
])
def test_an_empty_host_or_an_allowed_host_with_a_port_is_refused_in_one_line(bot, host, allowed_hosts, message):
    with pytest.raises(ValueError) as e:  # name:8000 used to become [name:8000]:8000, which nothing matches
        web_chat.ChatServer(bot, None, SAMPLING, '', host, 0, allowed_hosts)
    assert str(e.value).startswith(message) and '\n' not in str(e.value), str(e.value)


def test_on_port_80_a_host_may_come_without_its_port():
    assert {'127.0.0.1', 'localhost:80', '[::1]'} <= web_chat.host_names(['127.0.0.1'], 80, [])
    assert '127.0.0.1' not in web_chat.host_names(['127.0.0.1'], 8080, [])


def test_the_server_listens_on_ipv6(start):
    if not socket.has_ipv6:
        pytest.skip('no IPv6 on this machine')
    server = start('::1')
    status, _, text = exchange(server, json.dumps({'message': 'hi'}).encode())
    assert server.socket.family == socket.AF_INET6 and status == 200 and stream_events(text)[-1]['done']


def test_a_host_that_cannot_be_listened_on_is_named_as_the_trouble(bot):
    taken = socket.socket()
    taken.bind(('127.0.0.1', 0))
    taken.listen()
    port = taken.getsockname()[1]
    for host, port, message in [
        ('no-such-host.invalid', 0, 'cannot listen on no-such-host.invalid ('),
        ('192.0.2.1', 0, 'cannot listen on 192.0.2.1 (Cannot assign requested address); --host must be an address'),
        ('127.0.0.1', port, f'cannot listen on 127.0.0.1:{port} (Address already in use); choose another --port')]:
        with pytest.raises(ValueError) as e:
            web_chat.ChatServer(bot, None, SAMPLING, '', host, port)
        assert str(e.value).startswith(message) and ('--port' in str(e.value)) == (host == '127.0.0.1'), str(e.value)
    taken.close()


def test_no_other_site_may_frame_the_page_or_any_answer(server):
    for line, body in [(b'GET / HTTP/1.1', b''), (b'GET /nope HTTP/1.1', b''), (b'POST /chat HTTP/1.1', b'{"message": "hi"}')]:
        status, fields, _ = exchange(server, body, line=line)
        assert fields['x-frame-options'] == 'DENY' and fields['content-security-policy'] == "frame-ancestors 'none'", status


@pytest.mark.slow  # a second or two: -m 'not slow' stays under 40 s
def test_a_full_queue_answers_503_with_retry_after_on_both_routes(server, gate, monkeypatch):
    monkeypatch.setattr(web_chat, 'MAX_QUEUED', 2)
    first, second = hold_one_and_queue_another(server, gate)
    _, third = post(server, {'message': 'third'})
    assert third.status == 503 and int(third.getheader('Retry-After')) >= 1
    assert 'replies are running or waiting' in error_of(third.read().decode())
    with pytest.importorskip('openai').OpenAI(base_url=server.url + 'v1', api_key='-', max_retries=0) as client:
        with pytest.raises(Exception) as e:
            client.chat.completions.create(model='wigglegpt', messages=[{'role': 'user', 'content': 'Hi'}])
    assert e.value.status_code == 503 and e.value.body['code'] == 'overloaded' and e.value.body['type'] == 'server_error'
    gate.opened.set()
    assert events(first)[-1]['done'] and events(second)[-1]['done']
    _, fourth = post(server, {'message': 'fourth'})  # room again
    assert events(fourth)[-1]['done']


@pytest.mark.parametrize('settings, reach', [
    ({}, None),
    ({'api_key': 'k'}, "machines that reach port {port} by this machine's name ({name}) or one in --allowed_hosts, "
                       'with the key (--api_key)'),
    ({'allow_anyone': True}, "machines that reach port {port} by this machine's name ({name}) or one in --allowed_hosts, "
                             'with no key asked (--allow_anyone=True)'),
])
def test_listening_beyond_loopback_needs_a_key_or_an_explicit_anyone(bot, settings, reach):
    if reach is None:
        with pytest.raises(ValueError) as e:
            web_chat.ChatServer(bot, None, SAMPLING, '', '0.0.0.0', 0, **settings)
        assert str(e.value).startswith('--host=0.0.0.0 lets other machines connect: set --api_key=SECRET')
        return
    server = web_chat.ChatServer(bot, None, SAMPLING, '', '0.0.0.0', 0, **settings)
    server.socket.close()
    assert server.reach == reach.format(port=server.server_address[1], name=socket.gethostname())
    assert server.url.startswith('http://127.0.0.1:')
    local = web_chat.ChatServer(bot, None, SAMPLING, '', '127.0.0.1', 0)
    local.socket.close()
    assert local.reach == 'this machine only'


def test_connections_past_a_clients_limit_get_a_503_at_once_and_the_server_recovers(server):
    address = server.server_address[:2]
    idle = [socket.create_connection(address, timeout=10) for _ in range(web_chat.MAX_CONNECTIONS_PER_CLIENT)]
    try:
        for _ in range(20):  # each sends its request at once: the refusal must not be lost to a reset
            with socket.create_connection(address, timeout=5) as extra:
                extra.sendall(b'POST /chat HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n'
                              b'Content-Length: 17\r\n\r\n{"message": "hi"}' % address[1])
                status, fields, text = parse_answer(extra.makefile('rb').read())
            assert status == 503 and 'connections open, the most' in error_of(text) and fields['x-frame-options'] == 'DENY'
    finally:
        for connection in idle:
            connection.close()
    wait_idle(server)
    _, response = post(server, {'message': 'hi'})
    assert events(response)[-1]['done']


def test_a_reply_is_served_past_file_descriptor_1023(server):
    """select.select() refuses descriptors past 1023: on a busy machine every reply failed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f'at most {hard} files may be open')
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(1024)]  # every descriptor below 1024 is taken
    try:
        assert fillers[-1] > 1023
        _, response = post(server, {'message': 'hi'})
        assert events(response)[-1]['done']
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_client_gone_before_its_error_line_leaves_no_traceback(server, monkeypatch, capsys):
    left = threading.Event()

    async def refused_after_the_client_left(request):
        assert await asyncio.to_thread(left.wait, 10)
        raise web_chat.RequestError(400, 'too late')

    monkeypatch.setattr(web_chat, 'read_json', refused_after_the_client_left)
    with socket.create_connection(server.server_address[:2], timeout=10) as s:
        s.sendall(b'POST /chat HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n' % server.server_address[1])
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))  # closed with a reset
    time.sleep(0.1)
    left.set()
    wait_idle(server)
    assert 'Traceback' not in capsys.readouterr().err


def fuzzed_requests(rng):
    """A few hundred requests (headers, body), each a good one with one thing broken: a body truncated,
    its bytes flipped, a setting of the wrong type, nesting past any limit, or an odd Content-Length,
    Content-Type or Host."""
    good = [{'message': 'hi'}, {'message': 'Hello there', 'history': [['a', 'b']], 'system': 'Be brief.',
                                'temperature': 0.5, 'top_k': 3}]
    odd_values = [None, True, 0, -1, 2 ** 70, 1e308, '', 'x', '\ud800', [], {}, [[]], [['a']], [['a', 1]], {'a': 1}]
    odd_lengths = [b'', b' ', b'-1', b'+5', b'0x10', b'1e3', b'\xb2', b'\xd9\xa1', b'9' * 5000, b'99999999999', b'5, 5']
    odd_types = [b'text/plain', b'', b'application/JSON', b'application/json; charset=latin-1', b'multipart/form-data']
    odd_hosts = [b'', b'evil.example', b'localhost', b'localhost:0', b'[::1', b'\xff\xfe', b'x' * 5000, b'localhost.:1']
    for _ in range(300):
        body, headers = json.dumps(rng.choice(good)).encode(), {}
        kind = rng.randrange(9)
        if kind == 0:
            body = body[:rng.randrange(len(body))]
        elif kind == 1:
            headers['Content-Length'] = str(len(body) + rng.randrange(1, 9))  # promises more than comes
        elif kind == 2:
            flipped = bytearray(body)
            for _ in range(rng.randrange(1, 4)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            body = bytes(flipped)
        elif kind == 3:
            fields = json.loads(body)
            fields[rng.choice([*fields, 'extra'])] = rng.choice(odd_values)
            body = json.dumps(fields).encode()
        elif kind == 4:
            depth = rng.choice([10, 900, 5000, 100000])
            body = rng.choice([b'[' * depth, b'{"message": "hi", "history": ' + b'[' * depth + b']' * depth + b'}'])
        elif kind == 5:
            headers['Content-Length'] = rng.choice(odd_lengths + [str(rng.randrange(len(body)))])
        elif kind == 6:
            headers['Content-Type'] = rng.choice(odd_types)
        elif kind == 7:
            headers['Host'] = rng.choice(odd_hosts)
        else:
            body = rng.randbytes(rng.randrange(64))
        yield headers, body


@pytest.mark.slow  # a second or two: -m 'not slow' stays under 40 s
def test_fuzzed_requests_get_a_4xx_line_or_a_reply_and_no_traceback(server, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    answers = {}
    for headers, body in fuzzed_requests(random.Random(0)):
        length = headers.get('Content-Length', '')
        # a body short of its length would wait for the deadline: the client gives up on it (and shuts its side)
        short = isinstance(length, str) and length.isdigit() and int(length) > len(body)
        status, _, text = exchange(server, body, headers, half_close=short)
        answers[status] = answers.get(status, 0) + 1
        if status == 200:
            got = stream_events(text)
            assert all({'piece', 'dropped'} & set(e) for e in got[:-1]) and ('done' in got[-1] or 'error' in got[-1]), got
        elif status is None:  # a client that left before its body was complete: no one to answer
            assert text == '' and short, (headers, body[:80])
        else:
            assert status in range(400, 500) and error_of(text), (headers, body[:80], text)
    assert answers[200] and len(answers) > 4  # both kinds of answer, and several refusals, were seen
    _, response = post(server, {'message': 'still there?'})
    assert events(response)[-1]['done']
    wait_idle(server)
    assert 'Traceback' not in capsys.readouterr().err and os.listdir(tmp_path) == []


@pytest.mark.slow
def test_chat_py_serves_the_page_on_localhost_and_stops_on_ctrl_c(tmp_path):
    """chat.py --web=True as a user runs it: it binds 127.0.0.1, answers, and Ctrl-C ends it cleanly."""
    write_bpe_checkpoint(tmp_path / 'chat', block_size=64)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # started as from a terminal, where Ctrl-C is not ignored (as it is for a shell's background job)
    proc = subprocess.Popen([python(), os.path.join(repo, 'chat.py'), '--out_dir=chat', '--device=cpu',
                             '--web=True', '--port=0', '--max_new_tokens=4', '--system=Be brief.'], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stdout.readline()
        assert line.startswith('WiggleGPT chat (chat/ckpt.pt) at http://127.0.0.1:'), line
        port = int(line.split('127.0.0.1:')[1].split('/')[0])
        connection = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
        connection.request('POST', '/chat', json.dumps({'message': 'Hi'}).encode(), {'Content-Type': 'application/json'})
        got = [json.loads(x) for x in connection.getresponse().read().decode().splitlines()]
        assert got[-1]['done']
        connection.request('GET', '/')
        assert 'Be brief.' not in connection.getresponse().read().decode()  # the operator's, not the visitors'
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        finally:  # not left serving when it does not stop
            proc.kill()
    assert proc.returncode == 0 and 'stopped' in err and 'Traceback' not in err

    taken = socket.socket()
    taken.bind(('127.0.0.1', 0))
    taken.listen()
    for args, reason in [([f'--port={taken.getsockname()[1]}'], 'error: cannot listen on 127.0.0.1:'),
                         (['--port=70000'], 'error: port = 70000 is not allowed'),
                         (['--host='], 'error: --host is empty'),
                         (['--api_key=sekrit', '--port=70000'], 'error: port = 70000 is not allowed'),
                         (['--host=0.0.0.0', '--port=0'], 'error: --host=0.0.0.0 lets other machines connect: set --api_key'),
                         (['--port=0', '--allowed_hosts=name:8000'], "error: --allowed_hosts names 'name:8000'")]:
        busy = run_script(tmp_path, os.path.join(repo, 'chat.py'), '--out_dir=chat', '--device=cpu', '--web=True', *args,
                          check=False, timeout=120)
        lines = message_lines(busy.stderr)
        assert busy.returncode == 2 and len(lines) == 1 and lines[0].startswith(reason), busy.stderr
        assert 'sekrit' not in busy.stderr + busy.stdout  # the key is never printed
    taken.close()


def from_address(server, address):
    """A connection to server from the loopback address address (127.0.0.0/8 is all this machine's)."""
    return socket.create_connection(server.server_address, timeout=10, source_address=(address, 0))


@pytest.mark.slow
def test_clients_that_trickle_keep_no_one_else_out(server, monkeypatch):
    """64 connections from one client and 64 from 64 clients send a request a byte every 0.2 s; the one
    client gets MAX_CONNECTIONS_PER_CLIENT of them, the rest 503 at once; past MAX_CONNECTIONS the oldest
    are closed (503) to make room; every trickler is cut off REQUEST_SECONDS after its first byte (408),
    however steadily it trickles; meanwhile another client is answered within 5 s."""
    monkeypatch.setattr(web_chat, 'REQUEST_SECONDS', 3)
    monkeypatch.setattr(web_chat, 'MAX_CONNECTIONS', 60)  # fewer than the tricklers: the oldest make room
    started = time.monotonic()
    try:
        tricklers = [from_address(server, '127.0.0.2')]
    except OSError:
        pytest.skip('this machine cannot connect from 127.0.0.2')
    tricklers += [from_address(server, '127.0.0.2') for _ in range(63)]
    tricklers += [from_address(server, f'127.0.1.{i + 1}') for i in range(64)]
    request = b'POST /chat HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n' % server.server_address[1] + b'X-Slow: ' + b'y' * 1000
    answers, ended = {}, {}

    def trickle():
        sent = 0
        while len(ended) < len(tricklers) and time.monotonic() - started < 20:
            for i, s in enumerate(tricklers):
                if i in ended:
                    continue
                readable, _, _ = select.select([s], [], [], 0)
                if readable:  # the server has answered (and closes): read it all, send no more
                    s.settimeout(5)
                    answers[i] = parse_answer(s.makefile('rb').read())[0]
                    ended[i] = time.monotonic() - started
                    continue
                try:
                    s.send(request[sent:sent + 1])
                except OSError:
                    ended[i] = time.monotonic() - started
            sent += 1
            time.sleep(0.2)

    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        time.sleep(1)  # the tricklers are in
        asked = time.monotonic()
        _, response = post(server, {'message': 'hi'})
        assert events(response)[-1]['done'] and time.monotonic() - asked < 5
        thread.join(30)
    finally:
        for s in tricklers:
            s.close()
    one_client = [answers.get(i) for i in range(64)]
    assert one_client.count(503) >= 64 - web_chat.MAX_CONNECTIONS_PER_CLIENT, str(one_client)
    assert set(answers.values()) <= {408, 503} and len(ended) == len(tricklers)  # every one answered
    assert max(ended.values()) < web_chat.REQUEST_SECONDS + 2  # cut off from their first byte, not their last
    assert [i for i in range(64, 128) if answers.get(i) == 408]  # some of the many clients' held until the deadline


@pytest.mark.slow
def test_forty_queued_chats_are_answered_in_the_order_they_came(server, bot, gate):
    gate.hold_at = 1  # the first reply waits at its first model call, so the others queue behind it
    responses = []
    for i in range(40):  # forty clients, one connection each
        _, response = post(server, {'message': f'chat number {i}'}, source=f'127.0.2.{i + 1}')
        if i == 0:
            assert gate.held.wait(30)
        else:
            assert json.loads(response.readline()) == {'waiting': web_chat.WAITING}  # queued before the next comes
        responses.append(response)
    gate.opened.set()
    assert all(events(response)[-1]['done'] for response in responses)
    prompts = [ids for ids in gate.inputs if len(ids) > 1]
    assert prompts == [bot.encode(bot.prompt('', [], f'chat number {i}', SAMPLING['max_new_tokens'])[0]) for i in range(40)]
