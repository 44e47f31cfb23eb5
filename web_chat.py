"""
chat.py's web page: python chat.py --web=True serves one page (web_chat.html) at http://127.0.0.1:8000
that chats with the model chat.py loaded, the reply streamed as it is generated.

The page keeps the conversation and sends it with each message; the server is the REPL's chat
(chatbot.py) behind one route:

    POST /chat  {"message": "...", "history": [["user text", "reply"], ...], "system": "...",
                 "temperature": 0.7, "top_k": 50}        (all but message optional)
    -> 200, one JSON object per line as it happens:
         {"waiting": "..."}          another reply is being generated; this one starts when it ends
         {"dropped": n}              the n oldest exchanges did not fit beside a reply (the page forgets them)
         {"piece": "text"} ...       the reply
         {"done": true, "reply": "the reply as kept in the history", "ran_out": false}
         {"error": "..."}            in place of done: the model failed (the server goes on)
    -> 4xx {"error": "one line"}     a request that cannot be served as sent

One reply is generated at a time (the model and its sampling generator are shared); a client that
disconnects stops its reply at the next token. The standard library's threaded HTTP server is
enough for one user's few tabs and adds no dependency; it is not meant to face the internet. On a
loopback address it answers only requests made to that address by name (so no other website can
reach it through DNS rebinding), and /chat takes only application/json, which a page of another
site cannot send without a preflight this server does not grant.
"""

import json
import os
import select
import socket
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from chat_template import chat_turn

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'web_chat.html')
MAX_BODY = 256 * 1024  # bytes of one request; the history beyond the model's context is dropped anyway
MAX_TEMPERATURE = 100.0
LOOPBACK_NAMES = ('127.0.0.1', 'localhost', '[::1]')
SETTINGS = {'message': str, 'history': list, 'system': str, 'temperature': (int, float), 'top_k': int}
WAITING = 'another reply is being generated; this one starts when it ends'


class RequestError(Exception):
    """A request that cannot be served as sent: its HTTP status and a one-line reason."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status


def client_gone(connection):
    """Whether the client has closed its connection (it sends nothing more once its request is read)."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and not connection.recv(1, socket.MSG_PEEK)
    except OSError:
        return True


def read_request(handler):
    """The JSON body of a chat request, checked: (message, [[user, reply], ...], settings given)."""
    if handler.headers.get_content_type() != 'application/json':
        raise RequestError(415, 'send the message as JSON, with Content-Type: application/json')
    length = handler.headers.get('Content-Length')
    if length is None:
        raise RequestError(411, 'the request needs a Content-Length header')
    if not length.isdigit():
        raise RequestError(400, f'Content-Length {length!r} is not a number of bytes')
    if int(length) > MAX_BODY:
        raise RequestError(413, f'the request is {int(length)} bytes; at most {MAX_BODY} are read')
    try:
        body = json.loads(handler.rfile.read(int(length)), parse_constant=reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f'the body is not JSON ({e})') from None
    if not isinstance(body, dict):
        raise RequestError(400, 'the body must be a JSON object such as {"message": "Hello"}')
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


def reject_constant(name):
    raise ValueError(f'{name} is not a number JSON allows')


class ChatHandler(BaseHTTPRequestHandler):
    server_version = 'WiggleGPT'
    timeout = 30  # seconds a client may take to send its request

    def foreign_host(self):
        """Refuse (403) a request that names another host than the loopback address served (DNS rebinding)."""
        host, port = self.server.server_address[:2]
        if host not in ('127.0.0.1', '::1'):
            return False
        if self.headers.get('Host', '') in (f'{name}:{port}' for name in LOOPBACK_NAMES):
            return False
        self.send_error_line(403, f'this server answers requests to http://127.0.0.1:{port}/ only')
        return True

    def do_GET(self):
        if self.foreign_host():
            return
        if self.path not in ('/', '/index.html'):
            return self.send_error_line(404, f'no page {self.path}; the chat is at /')
        self.send_response(200)
        self.send_header('Content-Type', 'text/html; charset=utf-8')
        self.send_header('Content-Length', str(len(self.server.page)))
        self.send_header('Cache-Control', 'no-store')
        self.end_headers()
        self.wfile.write(self.server.page)

    def do_POST(self):
        if self.foreign_host():
            return
        if self.path != '/chat':
            return self.send_error_line(404, f'no route {self.path}; messages go to POST /chat')
        try:
            message, history, settings = read_request(self)
            bot, max_new_tokens = self.server.bot, self.server.sampling['max_new_tokens']
            system = settings.get('system', self.server.system)
            # made before waiting for the model: trimming a long history takes no one's turn
            exchanges = [chat_turn('user', u) + chat_turn('assistant', r) for u, r in history]
            prompt, dropped = bot.prompt(system, exchanges, message, max_new_tokens)
            over = len(bot.encode(prompt)) + bot.reply_room(max_new_tokens) - bot.block_size
            if over > 0:  # even with every earlier exchange dropped
                raise RequestError(413, f'the message is {over} tokens too long: with the system prompt and '
                                        f'{bot.reply_room(max_new_tokens)} tokens kept for the reply it must fit '
                                        f'the model\'s context of {bot.block_size}')
        except RequestError as e:
            return self.send_error_line(e.status, str(e))
        self.send_response(200)
        self.send_header('Content-Type', 'application/x-ndjson; charset=utf-8')
        self.send_header('Cache-Control', 'no-store')
        self.send_header('X-Content-Type-Options', 'nosniff')
        self.end_headers()
        try:
            self.generate(prompt, dropped, settings)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left while a line was being written: its reply has ended with it

    def generate(self, prompt, dropped, settings):
        """Stream the reply to prompt, one generation at a time across all clients."""
        lock = self.server.generation_lock
        if not lock.acquire(blocking=False):
            self.send_line({'waiting': WAITING})
            while not lock.acquire(timeout=0.2):
                if client_gone(self.connection):
                    return
        try:
            bot, sampling = self.server.bot, dict(self.server.sampling)
            sampling.update((k, settings[k]) for k in ('temperature', 'top_k') if k in settings)
            if dropped:
                self.send_line({'dropped': dropped})
            reply, generated = '', []
            for piece in bot.reply(prompt, generated, generator=self.server.generator,
                                   should_stop=lambda: client_gone(self.connection), **sampling):
                self.send_line({'piece': piece})
                reply += piece
            if client_gone(self.connection):
                return
            self.send_line({'done': True, 'reply': reply.strip(), 'ran_out': bot.ran_out(generated, sampling['max_new_tokens'])})
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception as e:  # a fault of the model or the machine: the page says so, the server goes on
            traceback.print_exc()
            self.send_line({'error': f'the reply failed ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ""})'})
        finally:
            lock.release()

    def send_line(self, event):
        self.wfile.write(json.dumps(event).encode() + b'\n')
        self.wfile.flush()

    def send_error_line(self, status, reason):
        body = json.dumps({'error': reason}).encode() + b'\n'
        self.send_response(status)
        self.send_header('Content-Type', 'application/json; charset=utf-8')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def make_server(bot, generator, sampling, system, host, port):
    """A server (not yet serving) of the chat page for bot; sampling holds the generation settings of
    Chatbot.reply, of which a request may change temperature and top_k; system is the default system prompt."""
    with open(PAGE, encoding='utf-8') as f:
        page = f.read()
    try:
        server = ThreadingHTTPServer((host, port), ChatHandler)
    except OSError as e:
        raise ValueError(f'cannot listen on {host}:{port} ({e.strerror or e}); choose another --port (0 picks a free one)') from None
    server.daemon_threads = True  # open connections do not keep the process alive after Ctrl-C
    server.bot, server.generator, server.sampling, server.system = bot, generator, dict(sampling), system
    server.generation_lock = threading.Lock()
    defaults = {'system': system, 'temperature': sampling['temperature'], 'top_k': sampling['top_k']}
    # '<' escaped so no text in the settings can close the page's script element
    server.page = page.replace('/*DEFAULTS*/null', json.dumps(defaults).replace('<', '\\u003c')).encode()
    return server


def serve(server, location):
    """Serve until Ctrl-C."""
    host, port = server.server_address[:2]
    print(f'WiggleGPT chat ({location}) at http://{host}:{port}/ (Ctrl-C stops)', flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print('\nstopped', file=sys.stderr)
    finally:
        server.server_close()
