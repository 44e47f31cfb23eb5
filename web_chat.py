"""
chat.py's web page: python chat.py --web=True serves one page (web_chat.html) at http://127.0.0.1:8000
that chats with the model chat.py loaded, the reply streamed as it is generated.

The page keeps the conversation and sends it with each message; the server is the REPL's chat
(chatbot.py) behind one route:

    POST /chat  {"message": "...", "history": [["user text", "reply"], ...], "system": "...",
                 "temperature": 0.7, "top_k": 50}        (all but message optional)
    -> 200, one JSON object per line as it happens (blank lines may come between them: skip them):
         {"waiting": "..."}          another reply is being generated; this one starts when it ends
         {"dropped": n}              the n oldest exchanges did not fit beside a reply (the page forgets them)
         {"piece": "text"} ...       the reply
         {"done": true, "reply": "the reply as kept in the history", "ran_out": false}
         {"error": "..."}            in place of done: the model failed (the server goes on)
    -> 4xx {"error": "one line"}     a request that cannot be served as sent
    -> 503 {"error": "one line"}     MAX_CONNECTIONS (32) connections are open already

One reply is generated at a time (the model and its sampling generator are shared); a client that
disconnects stops its reply at the next token. The standard library's threaded HTTP server is
enough for one user's few tabs and adds no dependency; it is not meant to face the internet. It
listens on IPv6 for an IPv6 address (--host=::1). Whatever the host, it answers only requests made
to it by one of its names (its address, localhost, 127.0.0.1, [::1], the machine's name, and those
of allowed_hosts), so no other website can reach it through DNS rebinding; no other site may show
its page in a frame; and /chat takes only application/json, which a page of another site cannot
send without a preflight this server does not grant.
"""

import contextlib
import errno
import json
import os
import selectors
import socket
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from chat_template import chat_turn
from checkpoints import error_line

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'web_chat.html')
MAX_BODY = 256 * 1024  # bytes of one request; the history beyond the model's context is dropped anyway
MAX_CONNECTIONS = 32  # handled at once: a few tabs need a handful; more get a 503 rather than a thread each
MAX_TEMPERATURE = 100.0
MACHINE_NAMES = ('localhost', '127.0.0.1', '::1')
SETTINGS = {'message': str, 'history': list, 'system': str, 'temperature': (int, float), 'top_k': int}
WAITING = 'another reply is being generated; this one starts when it ends'
# on every response: no other site may frame the page (and trick clicks on it) or take a reply for another type
SAFETY_HEADERS = {'X-Frame-Options': 'DENY', 'Content-Security-Policy': "frame-ancestors 'none'",
                  'X-Content-Type-Options': 'nosniff'}


class RequestError(Exception):
    """A request that cannot be served as sent: its HTTP status and a one-line reason."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status


def peer_state(connection):
    """What the client's side of connection shows without a write: 'open' (nothing more sent, or more
    bytes), 'finished' (it will send nothing more: a half-close, or a close only a write can reveal)
    or 'reset'."""
    with selectors.DefaultSelector() as selector:  # select.select() fails past file descriptor 1023
        selector.register(connection, selectors.EVENT_READ)
        if not selector.select(0):
            return 'open'
    try:
        return 'open' if connection.recv(1, socket.MSG_PEEK) else 'finished'
    except OSError:
        return 'reset'


def read_request(handler):
    """The JSON body of a chat request, checked: (message, [[user, reply], ...], settings given)."""
    if handler.headers.get_content_type() != 'application/json':
        raise RequestError(415, 'send the message as JSON, with Content-Type: application/json')
    length = handler.headers.get('Content-Length')
    if length is None:
        raise RequestError(411, 'the request needs a Content-Length header')
    if not (length.isascii() and length.isdigit()):  # isdigit() alone takes '²', which int() refuses
        raise RequestError(400, f'Content-Length {length[:40]!r} is not a number of bytes')
    digits = length.lstrip('0') or '0'
    if len(digits) > len(str(MAX_BODY)) or int(digits) > MAX_BODY:  # int() refuses thousands of digits
        raise RequestError(413, f'the body is too long: at most {MAX_BODY} bytes are read')
    size = int(digits)
    try:
        data = handler.rfile.read(size)
    except TimeoutError:
        raise RequestError(408, f'the body did not arrive within {handler.timeout} s') from None
    if len(data) < size:
        raise RequestError(400, f'the body ended after {len(data)} of its {size} bytes')
    try:
        body = json.loads(data, parse_constant=reject_constant)
    except RecursionError:
        raise RequestError(400, 'the body is nested too deeply to read') from None
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


def fit(bot, system, history, message, max_new_tokens):
    """(prompt, how many of the oldest exchanges were dropped) for a conversation, or a 413 naming
    what is too long when even the message alone leaves no room for the reply."""
    exchanges = [chat_turn('user', u) + chat_turn('assistant', r) for u, r in history]
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


class ChatHandler(BaseHTTPRequestHandler):
    server_version = 'WiggleGPT'
    timeout = 30  # seconds a client may take to send its request
    gone = False  # the client has gone: its connection reset, or a write to it failed
    written = False  # something was written since client_gone last looked

    def foreign_host(self):
        """Refuse (403) a request that names a host other than this server's names (DNS rebinding)."""
        host = self.headers.get('Host', '')
        if host.lower() in self.server.hosts:
            return False
        self.send_error_line(403, f'this server does not answer to the host {host[:80]!r}; open {self.server.url} '
                                  'or add the name to --allowed_hosts')
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
            # made before waiting for the model: trimming a long history takes no one's turn
            prompt, dropped = fit(self.server.bot, settings.get('system', self.server.system), history, message,
                                  self.server.sampling['max_new_tokens'])
        except RequestError as e:
            return self.send_error_line(e.status, str(e))
        self.send_response(200)
        self.send_header('Content-Type', 'application/x-ndjson; charset=utf-8')
        self.send_header('Cache-Control', 'no-store')
        self.end_headers()
        self.generate(prompt, dropped, settings)

    def generate(self, prompt, dropped, settings):
        """Stream the reply to prompt, one generation at a time across all clients."""
        lock = self.server.generation_lock
        if not lock.acquire(blocking=False):
            self.send_line({'waiting': WAITING})
            while not lock.acquire(timeout=0.2):
                if self.client_gone():
                    return
        try:
            bot, sampling = self.server.bot, dict(self.server.sampling)
            sampling.update((k, settings[k]) for k in ('temperature', 'top_k') if k in settings)
            if dropped:
                self.send_line({'dropped': dropped})
            reply, generated = '', []
            for piece in bot.reply(prompt, generated, generator=self.server.generator, should_stop=self.client_gone,
                                   **sampling):
                self.send_line({'piece': piece})
                reply += piece
            if self.client_gone():
                return
            self.send_line({'done': True, 'reply': reply.strip(), 'ran_out': bot.ran_out(generated, sampling['max_new_tokens'])})
        except Exception as e:  # a fault of the model or the machine: the page says so, the server goes on
            traceback.print_exc()
            self.send_line({'error': f'the reply failed ({error_line(e)})'})
        finally:
            lock.release()

    def client_gone(self):
        """Whether the client has gone. Having sent all it will is not enough: a half-closed client still
        reads. Only a write tells the two apart (a closed client answers it with a reset), so when nothing
        else was written since the last look, a blank line is."""
        if not self.gone:
            state = peer_state(self.connection)
            if state == 'reset':
                self.gone = True
            elif state == 'finished' and not self.written:
                self.write(b'\n')
        self.written = False
        return self.gone

    def write(self, data):
        """Send data at once; a failed write means the client has gone (its reply stops at the next token)."""
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            self.gone = True
        self.written = True

    def send_line(self, event):
        self.write(json.dumps(event).encode() + b'\n')

    def send_error_line(self, status, reason):
        body = json.dumps({'error': reason}).encode() + b'\n'
        self.send_response(status)
        self.send_header('Content-Type', 'application/json; charset=utf-8')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_error(self, code, message=None, explain=None):
        # http.server's own refusals (a malformed request line, headers too long...) in the one-line form too
        self.send_error_line(code, message or self.responses[code][0])

    def end_headers(self):
        for name, value in SAFETY_HEADERS.items():
            self.send_header(name, value)
        super().end_headers()


class ChatServer(ThreadingHTTPServer):
    """The threaded HTTP server, on IPv6 for an IPv6 address, handling at most MAX_CONNECTIONS at once."""

    daemon_threads = True  # open connections do not keep the process alive after Ctrl-C
    request_queue_size = MAX_CONNECTIONS  # a burst of connections waits to be accepted (or refused), not resent

    def __init__(self, host, port):
        self.address_family = socket.AF_INET6 if ':' in host else socket.AF_INET
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__((host, port), ChatHandler)

    def process_request(self, request, client_address):
        if self.slots.acquire(blocking=False):
            return super().process_request(request, client_address)
        refuse(request)
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address):
        # a client that left or stalled is no fault of the server's: only other errors deserve a traceback
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def refuse(connection):
    """Answer a connection over MAX_CONNECTIONS with a 503, without waiting on the client."""
    body = json.dumps({'error': f'{MAX_CONNECTIONS} connections are open, the most this server takes; '
                                'try again when one has closed'}).encode() + b'\n'
    head = ['HTTP/1.0 503 Service Unavailable', 'Content-Type: application/json; charset=utf-8',
            f'Content-Length: {len(body)}', *(f'{k}: {v}' for k, v in SAFETY_HEADERS.items())]
    connection.setblocking(False)
    with contextlib.suppress(OSError):  # closed with its request unread, the connection would reset and lose the answer
        connection.recv(65536)
    with contextlib.suppress(OSError):
        connection.sendall('\r\n'.join(head + ['', '']).encode() + body)


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


def make_server(bot, generator, sampling, system, host, port, allowed_hosts=''):
    """A server (not yet serving) of the chat page for bot; sampling holds the generation settings of
    Chatbot.reply, of which a request may change temperature and top_k; system is the default system
    prompt; allowed_hosts names (comma-separated) more hosts the page may be reached by."""
    if not host:  # '' would listen on every interface, which only --host=0.0.0.0 may ask for
        raise ValueError('--host is empty; give the address to listen on: 127.0.0.1 (this machine only), ::1, '
                         'or 0.0.0.0 (other machines too)')
    allowed = allowed_names(allowed_hosts)
    with open(PAGE, encoding='utf-8') as f:
        page = f.read()
    try:
        server = ChatServer(host, port)
    except OSError as e:
        raise ValueError(listen_failure(host, port, e)) from None
    bound, port = server.server_address[:2]
    server.hosts = host_names((host, bound), port, allowed)
    server.url = f'http://{bracketed(bound)}:{port}/'
    server.bot, server.generator, server.sampling, server.system = bot, generator, dict(sampling), system
    server.generation_lock = threading.Lock()
    defaults = {'system': system, 'temperature': sampling['temperature'], 'top_k': sampling['top_k']}
    # '<' escaped so no text in the settings can close the page's script element
    server.page = page.replace('/*DEFAULTS*/null', json.dumps(defaults).replace('<', '\\u003c')).encode()
    return server


def serve(server, location):
    """Serve until Ctrl-C."""
    print(f'WiggleGPT chat ({location}) at {server.url} (Ctrl-C stops)', flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print('\nstopped', file=sys.stderr)
    finally:
        server.server_close()
