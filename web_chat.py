"""
chat.py's web server: python chat.py --web=True serves the chat page (web_chat.html) and the OpenAI
chat API at http://127.0.0.1:8000, both on the model chat.py loaded (Starlette on uvicorn).

    GET  /                      the page; it keeps the conversation and sends it with each message
    POST /chat                  the page's route: {"message": "...", "history": [["user text", "reply"], ...],
                                "system": "...", "temperature": 0.7, "top_k": 50}   (all but message optional)
        -> 200, one JSON object per line as it happens:
             {"waiting": "..."}      other replies are queued first; this one starts when they end
             {"dropped": n}          the n oldest exchanges did not fit beside a reply (the page forgets them)
             {"piece": "text"} ...   the reply
             {"done": true, "reply": "the reply as kept in the history", "ran_out": false}
             {"error": "..."}        in place of done: the model failed (the server goes on)
        -> 4xx {"error": "one line"}  a request that cannot be served as sent
    GET  /v1/models             the OpenAI model list: one model, "wigglegpt"
    POST /v1/chat/completions   the OpenAI chat API: model, messages (system, developer, user, assistant; text),
                                temperature, top_p, max_tokens (or max_completion_tokens), stop, seed, n=1,
                                stream (server-sent events ending with data: [DONE]), stream_options
                                {"include_usage": true}, and top_k beyond OpenAI's; usage token counts and
                                finish_reason ("stop" or "length"); errors in OpenAI's shape. A conversation
                                longer than the context is refused (400, context_length_exceeded), not trimmed.

Any OpenAI client works: OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='the --api_key or anything').

One reply is generated at a time (the model and its sampling generator are shared), first come, first
served; at most MAX_QUEUED are running or waiting, more get 503 with Retry-After. A client that
disconnects stops its reply at the next token, or before it starts (one that only shuts its sending
side has gone too, as uvicorn takes it: HTTP clients do not half-close). A client's system prompt replaces
the operator's (--system), which otherwise applies; the page does not show the operator's unless
--show_system=True.

Limits that hold under abuse: the whole request (headers and body) must arrive within REQUEST_SECONDS
of its first byte (else 408 and the connection closes), a client (an IP address) holds at most
MAX_CONNECTIONS_PER_CLIENT connections (more get 503 at once), MAX_CONNECTIONS in all, and a body at most
MAX_BODY bytes; waiting connections cost a socket, not a thread, and when all MAX_CONNECTIONS are open
the oldest one not being answered is closed to make room, so clients that trickle bytes keep no one
else out. HTTP/0.9 requests are refused (400) at their first line.

Who may connect: it listens on loopback (this machine only) unless --host names another address, which
needs --api_key=SECRET (a Bearer token on every route; the page's browser asks for it as a password,
any user name) or --allow_anyone=True; startup says which. The key travels in clear over http: on an
untrusted network put the server behind TLS. Whatever the host, it answers only requests made to it by
one of its names (its address, localhost, 127.0.0.1, [::1], the machine's name, and those of
--allowed_hosts: another machine reaching it by an address needs that address there), so no other website can reach it through DNS rebinding; no other site may show its
page in a frame; and its POST routes take only application/json, which a page of another site cannot
send without a preflight this server does not grant.
"""

import asyncio
import base64
import binascii
import collections
import errno
import hashlib
import hmac
import ipaddress
import json
import math
import os
import socket
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus

import h11
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from chat_template import chat_turn
from checkpoints import error_line

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'web_chat.html')
MODEL_ID = 'wigglegpt'
MAX_BODY = 256 * 1024  # bytes of one request; the history beyond the model's context is dropped anyway
REQUEST_SECONDS = 10  # from a request's first byte to its last
MAX_CONNECTIONS = 256  # in all; an idle connection costs a socket and a little memory
MAX_CONNECTIONS_PER_CLIENT = 16  # a browser opens up to 6 per server; a few tabs and an API client fit
MAX_QUEUED = 64  # replies running or waiting; each holds its client's connection while it waits
MAX_TEMPERATURE = 100.0
MACHINE_NAMES = ('localhost', '127.0.0.1', '::1')
SETTINGS = {'message': str, 'history': list, 'system': str, 'temperature': (int, float), 'top_k': int}
WAITING = 'other replies are being generated; this one starts when they end'
# on every response: no other site may frame the page (and trick clicks on it) or take a reply for another type
SAFETY_HEADERS = {'X-Frame-Options': 'DENY', 'Content-Security-Policy': "frame-ancestors 'none'",
                  'X-Content-Type-Options': 'nosniff'}


class RequestError(Exception):
    """A request that cannot be served as sent: its HTTP status, a one-line reason and, for the API,
    the parameter at fault and OpenAI's error code."""

    def __init__(self, status, reason, param=None, code=None):
        super().__init__(reason)
        self.status, self.param, self.code = status, param, code


def error_response(path, status, reason, param=None, code=None, headers=None):
    """A refusal in the shape the route's clients read: OpenAI's error object under /v1, else one JSON line."""
    if path.startswith('/v1/'):
        kind = 'invalid_request_error' if status < 500 else 'server_error'
        body = {'error': {'message': reason, 'type': kind, 'param': param, 'code': code}}
    else:
        body = {'error': reason}
    return Response(json.dumps(body) + '\n', status, headers, media_type='application/json')


async def read_json(request):
    """The request's JSON object, read within MAX_BODY bytes, or a RequestError saying what is wrong."""
    if request.headers.get('content-type', '').split(';')[0].strip().lower() != 'application/json':
        raise RequestError(415, 'send the request as JSON, with Content-Type: application/json')
    length = request.headers.get('content-length', '')
    if length.isascii() and length.isdigit() and int(length) > MAX_BODY:
        raise RequestError(413, f'the body is too long: at most {MAX_BODY} bytes are read')
    data = bytearray()
    try:
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY:
                raise RequestError(413, f'the body is too long: at most {MAX_BODY} bytes are read')
    except ClientDisconnect:  # the answer goes to no one
        raise RequestError(400, 'the client left before its body arrived') from None
    try:
        body = json.loads(data, parse_constant=reject_constant)
    except RecursionError:
        raise RequestError(400, 'the body is nested too deeply to read') from None
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f'the body is not JSON ({e})') from None
    if not isinstance(body, dict):
        raise RequestError(400, 'the body must be a JSON object')
    return body


def reject_constant(name):
    raise ValueError(f'{name} is not a number JSON allows')


def page_request(body):
    """A /chat body checked: (message, [[user, reply], ...], settings given)."""
    for key, value in body.items():
        if key not in SETTINGS:
            raise RequestError(400, f'unknown setting {key!r}; known: {", ".join(SETTINGS)}')
        if not isinstance(value, SETTINGS[key]) or isinstance(value, bool):
            kind = {'temperature': 'a number', 'top_k': 'a whole number', 'history': 'a list'}.get(key, 'text')
            raise RequestError(400, f'{key} must be {kind}, got {json.dumps(value)[:40]}')
    if not 0 <= body.get('temperature', 0) <= MAX_TEMPERATURE or body.get('top_k', 0) < 0:
        raise RequestError(400, f'temperature must be in [0, {MAX_TEMPERATURE:g}] and top_k >= 0')
    message = body.get('message', '').strip()
    if not message:
        raise RequestError(400, 'the message is empty')
    history = body.get('history', [])
    if not all(isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair) for pair in history):
        raise RequestError(400, 'history must be a list of [user text, reply] pairs')
    return message, history, body


def fit(bot, system, exchanges, message, max_new_tokens):
    """(prompt, how many of the oldest exchanges were dropped) for a conversation, or a 413 naming
    what is too long when even the message alone leaves no room for the reply."""
    prompt, dropped = bot.prompt(system, exchanges, message, max_new_tokens)
    room = bot.reply_room(max_new_tokens)
    over = len(bot.encode(prompt)) + room - bot.block_size
    if over <= 0:
        return prompt, dropped
    # the system prompt is at fault when not even an empty message would fit beside it
    system_over = len(bot.encode(bot.prompt(system, [], '', max_new_tokens)[0])) + room - bot.block_size
    if system_over > 0:
        raise RequestError(413, f'the system prompt is {system_over} tokens too long: with a message and {room} '
                                f'tokens kept for the reply it must fit the model\'s context of {bot.block_size}')
    raise RequestError(413, f'the message is {over} tokens too long: with the system prompt and {room} tokens '
                            f'kept for the reply it must fit the model\'s context of {bot.block_size}')


API_SETTINGS = {'model': (str,), 'messages': (list,), 'temperature': (int, float), 'top_p': (int, float),
                'top_k': (int,), 'max_tokens': (int,), 'max_completion_tokens': (int,), 'stop': (str, list),
                'seed': (int,), 'stream': (bool,), 'stream_options': (dict,), 'n': (int,), 'user': (str,)}
# OpenAI's other parameters, which clients and front-ends send with these values when they mean nothing by them
NEUTRAL = {'frequency_penalty': (0,), 'presence_penalty': (0,), 'logprobs': (False,), 'logit_bias': ({},),
           'parallel_tool_calls': (True, False), 'tools': ([],), 'tool_choice': ('none', 'auto'), 'store': (False,),
           'response_format': ({'type': 'text'},), 'metadata': ({},)}
MAX_STOP_CHARACTERS = 256  # each stop string is looked for after every token: a long one would hold the model
ROLES = {'system': 'system', 'developer': 'system', 'user': 'user', 'assistant': 'assistant'}


def api_request(body, max_new_tokens):
    """A /v1/chat/completions body checked: (system or None, [(role, text), ...] ending with the user's,
    {sampling settings it changes}, stop strings, seed or None, stream, include_usage)."""
    for key, value in body.items():
        if key in NEUTRAL and (value is None or any(value == v and type(value) is type(v) for v in NEUTRAL[key])):
            continue
        if key in NEUTRAL:
            raise RequestError(400, f'{key} is not supported here, except as {" or ".join(map(json.dumps, NEUTRAL[key]))}', key)
        if key not in API_SETTINGS:
            raise RequestError(400, f'Unrecognized request argument supplied: {key}', key)
        is_bool = isinstance(value, bool) and bool not in API_SETTINGS[key]
        if value is not None and (not isinstance(value, API_SETTINGS[key]) or is_bool):
            raise RequestError(400, f'{key} must be of type {API_SETTINGS[key][0].__name__}, got {json.dumps(value)[:40]}', key)
    given = {key: value for key, value in body.items() if value is not None and key in API_SETTINGS}
    if 'model' not in given or 'messages' not in given:
        missing = 'model' if 'model' not in given else 'messages'
        raise RequestError(400, f'Missing required parameter: {missing!r}', missing)
    if given['model'] != MODEL_ID:
        raise RequestError(404, f'The model {given["model"][:80]!r} does not exist; this server has {MODEL_ID!r}',
                           'model', 'model_not_found')
    sampling = {}
    for key, low, high in (('temperature', 0, MAX_TEMPERATURE), ('top_p', 0, 1), ('top_k', 0, math.inf),
                           ('max_tokens', 1, max_new_tokens), ('max_completion_tokens', 1, max_new_tokens)):
        if key in given and not (low <= given[key] <= high) or key == 'top_p' and given.get(key) == 0:
            span = '(0, 1]' if key == 'top_p' else f'[{low:g}, {high:g}]'
            raise RequestError(400, f'{key} must be in {span}, got {given[key]}', key)
    sampling.update((key, given[key]) for key in ('temperature', 'top_p', 'top_k') if key in given)
    sampling['max_new_tokens'] = given.get('max_completion_tokens', given.get('max_tokens', max_new_tokens))
    if given.get('n', 1) != 1:
        raise RequestError(400, 'n must be 1: this server generates one choice per request', 'n')
    stops = [given['stop']] if isinstance(given.get('stop'), str) else given.get('stop', [])
    if len(stops) > 4 or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARACTERS for s in stops):
        raise RequestError(400, f'stop must be a string or a list of at most 4, each of 1 to {MAX_STOP_CHARACTERS} '
                                'characters', 'stop')
    seed = given.get('seed')
    if seed is not None and not 0 <= seed < 2 ** 63:
        raise RequestError(400, f'seed must be in [0, 2**63), got {seed}', 'seed')
    options = given.get('stream_options', {})
    if options and not given.get('stream'):
        raise RequestError(400, 'stream_options is only allowed with stream=true', 'stream_options')
    if set(options) - {'include_usage'}:
        raise RequestError(400, 'stream_options takes include_usage only', 'stream_options')
    system, turns = None, []
    for i, message in enumerate(given['messages']):
        param = f'messages[{i}]'
        if not isinstance(message, dict) or not isinstance(message.get('role'), str) or message['role'] not in ROLES:
            raise RequestError(400, f'{param} must be an object with a role among {", ".join(ROLES)}', param)
        text = message_text(message.get('content'), param)
        role = ROLES[message['role']]
        if role == 'system':
            if turns:
                raise RequestError(400, f'{param}: system messages must come before the conversation', param)
            system = text if system is None else system + '\n' + text
        else:
            turns.append((role, text))
    if not turns or turns[-1][0] != 'user':
        raise RequestError(400, 'the last message must be the user\'s', 'messages')
    return system, turns, sampling, stops, seed, given.get('stream', False), options.get('include_usage', False)


def message_text(content, param):
    """A message's content as text: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get('type') == 'text' and isinstance(p.get('text'), str)
                                         for p in content):
        return ''.join(p['text'] for p in content)
    raise RequestError(400, f'{param}.content must be text (a string or a list of text parts)', f'{param}.content')


def exchanges_of(turns):
    """The template text of the turns before the last, one string per user turn and the replies after it
    (the units the oldest of which go first when the context is full)."""
    exchanges = []
    for role, text in turns[:-1]:
        if role == 'user' or not exchanges:
            exchanges.append('')
        exchanges[-1] += chat_turn(role, text)
    return exchanges


class Replies:
    """The replies, generated one at a time on one thread, first come, first served."""

    def __init__(self, bot, generator):
        self.bot, self.generator = bot, generator
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix='reply')
        self.queued = 0  # running or waiting; read and changed on the event loop's thread only
        self.seconds = collections.deque([1.0], maxlen=16)  # the last replies' durations, for Retry-After
        self.stop_events = set()

    def retry_after(self):
        """Seconds until a place is likely to free: a reply's recent mean duration, whole, at least 1."""
        return str(max(1, math.ceil(sum(self.seconds) / len(self.seconds))))

    def start(self, prompt, sampling, stops=(), seed=None):
        """Queue a reply (on the event loop's thread) and return an async iterator of its events:
        ('piece', text) ... then ('end', generated token ids) or ('error', one line). Closing the iterator
        early (the client has gone) stops the reply at its next token, or before it starts."""
        loop = asyncio.get_running_loop()
        events, stop = asyncio.Queue(), threading.Event()

        def emit(event):
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed: the server is stopping
                stop.set()

        def generate():
            if stop.is_set():
                return
            start, generated = time.perf_counter(), []
            generator = self.generator if seed is None else torch.Generator(self.generator.device).manual_seed(seed)
            try:
                for piece in self.bot.reply(prompt, generated, generator=generator, should_stop=stop.is_set,
                                            stops=stops, **sampling):
                    emit(('piece', piece))
                emit(('end', generated))
            except Exception as e:  # a fault of the model or the machine: the client is told, the server goes on
                traceback.print_exc()
                emit(('error', f'the reply failed ({error_line(e)})'))
            if not stop.is_set():  # a reply cut short by its client's leaving says nothing of how long one takes
                self.seconds.append(time.perf_counter() - start)

        released = False

        def release(_=None):  # once: at the reply's last event (before the client hears it ended) or its job's end
            nonlocal released
            if not released:
                released = True
                self.queued -= 1
                self.stop_events.discard(stop)

        self.queued += 1
        self.stop_events.add(stop)
        loop.run_in_executor(self.worker, generate).add_done_callback(release)

        async def until_the_end():
            try:
                while True:
                    event = await events.get()
                    if event[0] != 'piece':
                        release()
                        yield event
                        return
                    yield event
            finally:
                stop.set()

        return until_the_end()

    def close(self):
        """Stop every reply at its next token and let the worker go."""
        for stop in list(self.stop_events):
            stop.set()
        self.worker.shutdown(wait=False, cancel_futures=True)


def ndjson(event):
    return json.dumps(event) + '\n'


def build_app(chat):
    """The Starlette app of a server's chat (a ChatServer's settings and replies)."""
    bot, replies = chat.bot, chat.replies

    async def page(request):
        return Response(chat.page, media_type='text/html; charset=utf-8', headers={'Cache-Control': 'no-store'})

    async def page_chat(request):
        try:
            message, history, settings = page_request(await read_json(request))
            exchanges = [chat_turn('user', u) + chat_turn('assistant', r) for u, r in history]
            # made before queueing: trimming a long history takes no one's turn
            prompt, dropped = fit(bot, settings.get('system', chat.system), exchanges, message,
                                  chat.sampling['max_new_tokens'])
        except RequestError as e:
            return error_response(request.url.path, e.status, str(e))
        if replies.queued >= MAX_QUEUED:
            return busy_response(request.url.path, replies)
        sampling = dict(chat.sampling)
        sampling.update((k, settings[k]) for k in ('temperature', 'top_k') if k in settings)
        waiting = replies.queued > 0
        events = replies.start(prompt, sampling)

        async def lines():
            if waiting:
                yield ndjson({'waiting': WAITING})
            if dropped:
                yield ndjson({'dropped': dropped})
            reply = ''
            async for kind, value in events:
                if kind == 'piece':
                    reply += value
                    yield ndjson({'piece': value})
                elif kind == 'end':
                    yield ndjson({'done': True, 'reply': reply.strip(),
                                  'ran_out': bot.ran_out(value, sampling['max_new_tokens'])})
                else:
                    yield ndjson({'error': value})

        return StreamingResponse(lines(), media_type='application/x-ndjson; charset=utf-8',
                                 headers={'Cache-Control': 'no-store'})

    the_model = {'id': MODEL_ID, 'object': 'model', 'created': chat.created, 'owned_by': 'wigglegpt'}

    async def models(request):
        return JSONResponse({'object': 'list', 'data': [the_model]})

    async def model(request):
        if request.path_params['name'] != MODEL_ID:
            return error_response(request.url.path, 404, f'The model {request.path_params["name"][:80]!r} does not '
                                                          f'exist; this server has {MODEL_ID!r}', 'model', 'model_not_found')
        return JSONResponse(the_model)

    async def completions(request):
        try:
            body = await read_json(request)
            system, turns, asked, stops, seed, stream, include_usage = api_request(body, chat.sampling['max_new_tokens'])
            sampling = {**chat.sampling, **asked}
            prompt, dropped = bot.prompt(chat.system if system is None else system, exchanges_of(turns), turns[-1][1],
                                         sampling['max_new_tokens'])
            prompt_tokens = len(bot.encode(prompt))
            if dropped or prompt_tokens + bot.reply_room(sampling['max_new_tokens']) > bot.block_size:
                raise RequestError(400, f'the messages take {prompt_tokens} tokens; with {bot.reply_room(sampling["max_new_tokens"])} '
                                        f'kept for the reply (max_tokens, at most half the context) they must fit the '
                                        f'model\'s context of {bot.block_size}', 'messages', 'context_length_exceeded')
        except RequestError as e:
            return error_response(request.url.path, e.status, str(e), e.param, e.code)
        if replies.queued >= MAX_QUEUED:
            return busy_response(request.url.path, replies)
        events = replies.start(prompt, sampling, stops, seed)
        head = {'id': f'chatcmpl-{uuid.uuid4().hex}', 'created': int(time.time()), 'model': MODEL_ID}

        def outcome(generated):
            finish = 'length' if bot.ran_out(generated, sampling['max_new_tokens'], stops) else 'stop'
            usage = {'prompt_tokens': prompt_tokens, 'completion_tokens': len(generated),
                     'total_tokens': prompt_tokens + len(generated)}
            return finish, usage

        if stream:
            def chunk(delta, finish=None):
                return 'data: ' + json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': [
                    {'index': 0, 'delta': delta, 'logprobs': None, 'finish_reason': finish}]}) + '\n\n'

            async def server_sent_events():
                yield chunk({'role': 'assistant', 'content': ''})
                started = False
                async for kind, value in events:
                    if kind == 'piece':
                        # spaces before the reply are not the reply's (the same content as without stream)
                        value = value if started else value.lstrip()
                        started = started or bool(value)
                        if value:
                            yield chunk({'content': value})
                    elif kind == 'end':
                        finish, usage = outcome(value)
                        yield chunk({}, finish)
                        if include_usage:
                            yield 'data: ' + json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': [],
                                                         'usage': usage}) + '\n\n'
                    else:
                        yield 'data: ' + json.dumps({'error': {'message': value, 'type': 'server_error',
                                                               'param': None, 'code': None}}) + '\n\n'
                yield 'data: [DONE]\n\n'

            return StreamingResponse(server_sent_events(), media_type='text/event-stream', headers={'Cache-Control': 'no-store'})

        async def whole_reply():
            pieces = []
            async for kind, value in events:
                if kind == 'piece':
                    pieces.append(value)
                elif kind == 'error':
                    return error_response(request.url.path, 500, value)
                else:
                    finish, usage = outcome(value)
                    return JSONResponse({**head, 'object': 'chat.completion', 'choices': [
                        {'index': 0, 'message': {'role': 'assistant', 'content': ''.join(pieces).lstrip()},
                         'logprobs': None, 'finish_reason': finish}], 'usage': usage})

        return await unless_gone(request, whole_reply())

    async def refused(request, exc):
        path = request.url.path
        if exc.status_code == 404:
            routes = 'the page is /, its messages go to POST /chat, the API is under /v1'
            return error_response(path, 404, f'no route {path[:80]}; {routes}', code='not_found')
        return error_response(path, exc.status_code, f'{request.method} is not allowed on {path[:80]}',
                              code='method_not_allowed', headers=exc.headers)

    routes = [Route('/', page), Route('/index.html', page), Route('/chat', page_chat, methods=['POST']),
              Route('/v1/models', models), Route('/v1/models/{name:path}', model),
              Route('/v1/chat/completions', completions, methods=['POST'])]
    return Guard(Starlette(routes=routes, exception_handlers={404: refused, 405: refused}), chat)


def busy_response(path, replies):
    return error_response(path, 503, f'{MAX_QUEUED} replies are running or waiting, the most this server queues; '
                                      'try again later', code='overloaded', headers={'Retry-After': replies.retry_after()})


async def unless_gone(request, work):
    """work's result, or, if the client disconnects first, nothing more done (work cancelled) and an empty
    answer that no one reads."""
    task = asyncio.ensure_future(work)

    async def disconnected():
        while (await request.receive())['type'] != 'http.disconnect':
            pass

    watcher = asyncio.ensure_future(disconnected())
    await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    return Response(status_code=499)


class Guard:
    """ASGI middleware for every route: the Host allow-list, the key, and the safety headers."""

    def __init__(self, app, chat):
        self.app, self.chat = app, chat

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http':
            return await self.app(scope, receive, send)

        async def send_safely(message):
            if message['type'] == 'http.response.start':
                message['headers'] = [*message.get('headers', []),
                                      *((k.lower().encode(), v.encode()) for k, v in SAFETY_HEADERS.items())]
            await send(message)

        headers = dict(scope['headers'])
        host = headers.get(b'host', b'').decode('latin-1')
        refusal = None
        if host.lower() not in self.chat.hosts:
            refusal = error_response(scope['path'], 403, f'this server does not answer to the host {host[:80]!r}; '
                                                         'its operator may add the name with --allowed_hosts')
        elif self.chat.api_key and not key_matches(headers.get(b'authorization', b''), self.chat.api_key):
            challenge = 'Bearer' if scope['path'].startswith('/v1/') else 'Basic realm="WiggleGPT chat", charset="UTF-8"'
            refusal = error_response(scope['path'], 401, 'this server needs its key: an Authorization: Bearer header '
                                     '(or, in a browser, the key as the password)', code='invalid_api_key',
                                     headers={'WWW-Authenticate': challenge})
        if refusal is not None:
            return await refusal(scope, receive, send_safely)
        await self.app(scope, receive, send_safely)


def key_matches(authorization, key):
    """Whether an Authorization header carries key, as a Bearer token or a Basic password (any user name),
    compared in constant time."""
    scheme, _, credentials = authorization.partition(b' ')
    if scheme.lower() == b'basic':
        try:
            credentials = base64.b64decode(credentials.strip(), validate=True).partition(b':')[2]
        except (binascii.Error, ValueError):
            return False
    elif scheme.lower() != b'bearer':
        return False
    # digests of equal length: the comparison's time says nothing of the key, its length included
    return hmac.compare_digest(hashlib.sha256(credentials.strip()).digest(), hashlib.sha256(key.encode()).digest())


def guarded_protocol():
    """uvicorn's HTTP/1.1 protocol with the limits that hold under abuse (a class per server, whose
    connections it counts): a deadline for each request, a cap on each client's connections and on all,
    and HTTP/0.9 refused at its first line."""
    clients = collections.Counter()  # open connections by the client's address
    connections = {}  # every open connection, oldest first (a dict keeps the order of insertion)

    class GuardedProtocol(H11Protocol):
        deadline = None
        refused = False

        def connection_made(self, transport):
            super().connection_made(transport)
            # Nagle's algorithm off, which asyncio leaves on for these sockets (their proto is 0; on Windows every
            # accepted one's is): a write after a reply's first waited for the client's delayed ack, 40 ms a
            # request on a kept connection
            try:
                transport.get_extra_info('socket').setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # the client has gone already (macOS then says EINVAL)
                pass
            self.address, self.head = self.client[0] if self.client else '', b''
            clients[self.address] += 1
            connections[self] = None
            if clients[self.address] > MAX_CONNECTIONS_PER_CLIENT:
                return self.refuse(503, f'this client has {MAX_CONNECTIONS_PER_CLIENT} connections open, the most '
                                        'this server takes from one; close one and try again', 'Retry-After: 5')
            if len(connections) > MAX_CONNECTIONS and not self.make_room():
                return self.refuse(503, f'{MAX_CONNECTIONS} connections are being served, the most this server takes; '
                                        'try again shortly', 'Retry-After: 5')
            # a client that connects and sends nothing has REQUEST_SECONDS too
            self.deadline = self.loop.call_later(REQUEST_SECONDS, self.too_slow)

        def make_room(self):
            """Close the oldest connection not being served (one sending its request, or idle between
            requests), so that clients that connect and wait cannot fill the server; False if none is."""
            for other in connections:
                if other is not self and not other.refused and not other.serving():
                    other.refuse(503, 'the server needed room for a newer connection, and this one had no request '
                                      'being answered; send the whole request at once')
                    return True
            return False

        def serving(self):
            """Whether a request has arrived whole and its response is not finished."""
            return (self.conn.their_state in (h11.DONE, h11.MUST_CLOSE) and self.cycle is not None
                    and not self.cycle.response_complete)

        def data_received(self, data):
            if self.refused:
                return  # answered and closing: what the client still sends is read and dropped
            if self.deadline is None and self.conn.their_state is not h11.DONE:
                self.deadline = self.loop.call_later(REQUEST_SECONDS, self.too_slow)
            if self.conn.their_state is h11.IDLE and len(self.head) < 8192:
                # h11 would wait for headers that an HTTP/0.9 request ("GET /" and a newline) never sends
                self.head += data
                line, newline, _ = self.head.lstrip(b'\r\n').partition(b'\n')
                if newline and not line.rstrip(b'\r').endswith((b' HTTP/1.0', b' HTTP/1.1')):
                    return self.send_400_response('')
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self.head = b''
            if self.deadline is not None and self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
                self.deadline.cancel()
                self.deadline = None

        def connection_lost(self, exc):
            clients[self.address] -= 1
            if not clients[self.address]:
                del clients[self.address]
            connections.pop(self, None)
            if self.deadline is not None:
                self.deadline.cancel()
            super().connection_lost(exc)

        def send_400_response(self, msg):  # h11 could not parse the request
            self.refuse(400, 'the request is not HTTP/1.0 or 1.1 as this server reads it (a request line '
                             '"METHOD /path HTTP/1.1", then headers, each "Name: value")')

        def too_slow(self):
            self.deadline = None
            if self.cycle is None or not self.cycle.response_started:
                return self.refuse(408, f'the request did not arrive within {REQUEST_SECONDS} s of its first byte')
            self.transport.close()

        def refuse(self, status, reason, *more_headers):
            """Answer status with a one-line reason, whatever the client has sent so far, and close. The
            close waits a second, reading and dropping what the client still sends: closed at once with its
            request unread, the connection would be reset and the answer lost."""
            if self.refused or self.transport.is_closing():
                return
            self.refused = True
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None
            body = ndjson({'error': reason}).encode()
            head = [f'HTTP/1.1 {status} {HTTPStatus(status).phrase}', 'Content-Type: application/json',
                    f'Content-Length: {len(body)}', 'Connection: close', *more_headers,
                    *(f'{k}: {v}' for k, v in SAFETY_HEADERS.items())]
            self.transport.write('\r\n'.join(head + ['', '']).encode() + body)
            self.transport.write_eof()
            self.loop.call_later(1, self.transport.close)

    return GuardedProtocol


def bracketed(name):
    """A host as a URL or a Host header writes it: an IPv6 address in brackets."""
    return f'[{name}]' if ':' in name else name


def allowed_names(allowed_hosts):
    """The names in allowed_hosts (comma-separated), each a bare name or address; a ValueError for one that
    carries a port or a path, which would never match: the server's own port is added to every name."""
    names = [name.strip() for name in allowed_hosts.split(',') if name.strip()]
    for name in names:
        inside = name[1:-1] if name.startswith('[') and name.endswith(']') else name  # [::1] is an IPv6 address
        # one ':' is a port (an IPv6 address has two or more); a bracket left inside is '[::1]:8000'
        if '/' in name or name.count(':') == 1 or '[' in inside or ']' in inside:
            raise ValueError(f'--allowed_hosts names {name!r}: give host names or addresses alone, without a port '
                             'or a path (e.g. --allowed_hosts=box.lan,192.168.1.5,::1)')
    return names


def host_names(addresses, port, allowed):
    """The Host headers a server listening on port answers to: its addresses (the host as given and as
    bound), this machine's names and allowed (a list of allowed_names), each with the port, and
    without it on port 80, where browsers leave it out."""
    names = {*addresses, *MACHINE_NAMES, socket.gethostname(), socket.getfqdn(), *allowed}
    names = {bracketed(name.strip().strip('[]').lower()) for name in names if name.strip()}
    return {f'{name}:{port}' for name in names} | (names if port == 80 else set())


def listen_failure(host, port, error):
    """Why the server cannot listen, blaming the port only when the port is the trouble."""
    reason = error.strerror or str(error)
    if error.errno in (errno.EADDRINUSE, errno.EACCES):
        return f'cannot listen on {host}:{port} ({reason}); choose another --port (0 picks a free one)'
    return f'cannot listen on {host} ({reason}); --host must be an address of this machine such as 127.0.0.1, ::1 or 0.0.0.0'


def listening_socket(host, port):
    """A socket listening on host:port (IPv6 for an IPv6 address), or a ValueError saying why not."""
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except (OSError, OverflowError) as e:
        sock.close()
        raise ValueError(listen_failure(host, port, e) if isinstance(e, OSError) else f'--port={port} is not a port') from None
    return sock


class ChatServer:
    """The chat's server, listening (not yet serving): serve_forever() serves until shutdown() or Ctrl-C;
    a ValueError with a one-line reason where it cannot listen as asked. sampling holds the generation settings of Chatbot.reply, of which a request may change temperature and
    top_k (the API also top_p and max_tokens, up to sampling's); system is the operator's system prompt."""

    def __init__(self, bot, generator, sampling, system, host, port, allowed_hosts='', api_key='',
                 allow_anyone=False, show_system=False):
        if not host:  # '' would listen on every interface, which only --host=0.0.0.0 may ask for
            raise ValueError('--host is empty; give the address to listen on: 127.0.0.1 (this machine only), ::1, '
                             'or 0.0.0.0 (other machines too)')
        allowed = allowed_names(allowed_hosts)
        self.socket = listening_socket(host, port)
        bound, port = self.socket.getsockname()[:2]
        self.server_address = (bound, port)
        if not ipaddress.ip_address(bound).is_loopback and not api_key and not allow_anyone:
            self.socket.close()
            raise ValueError(f'--host={host} lets other machines connect: set --api_key=SECRET (clients send it as a '
                             'Bearer token, a browser as the password) or, on a network you trust, --allow_anyone=True')
        self.hosts = host_names((host, bound), port, allowed)
        unspecified = ipaddress.ip_address(bound).is_unspecified  # 0.0.0.0 or ::: every address of this machine
        self.url = f'http://{bracketed("127.0.0.1" if unspecified else bound)}:{port}/'
        self.reach = ('this machine only' if ipaddress.ip_address(bound).is_loopback else
                      f'machines that reach port {port} by this machine\'s name ({socket.gethostname()}) or one in '
                      f'--allowed_hosts{"" if unspecified else f" at {bracketed(bound)}"}, '
                      + ('with the key (--api_key)' if api_key else 'with no key asked (--allow_anyone=True)'))
        self.bot, self.sampling, self.system, self.api_key = bot, dict(sampling), system, api_key
        self.replies = Replies(bot, generator)
        self.created = int(time.time())
        defaults = {'system': system if show_system else '', 'temperature': sampling['temperature'],
                    'top_k': sampling['top_k']}
        with open(PAGE, encoding='utf-8') as f:
            # '<' escaped so no text in the settings can close the page's script element
            self.page = f.read().replace('/*DEFAULTS*/null', json.dumps(defaults).replace('<', '\\u003c')).encode()
        config = uvicorn.Config(build_app(self), http=guarded_protocol(), ws='none', lifespan='off', log_config=None,
                                log_level='warning', access_log=False, server_header=False, timeout_graceful_shutdown=2)
        self.uvicorn = uvicorn.Server(config)

    def serve_forever(self):
        """Serve until shutdown() (from another thread) or Ctrl-C; then every reply stops."""
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self.replies.close()
            self.socket.close()

    def shutdown(self):
        self.uvicorn.should_exit = True


def serve(server, location):
    """Serve until Ctrl-C."""
    print(f'WiggleGPT chat ({location}) at {server.url} (Ctrl-C stops)', flush=True)
    print(f'reachable by {server.reach}; the OpenAI API at {server.url}v1', flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # uvicorn stops at Ctrl-C, then raises it again for the caller
        pass
    print('\nstopped', file=sys.stderr)
