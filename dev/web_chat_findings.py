"""
The web chat's findings of issue 32, probed against chat.py --web=True as a user starts it, so that the
server before the change and after it can be compared with one command each:

    git worktree add /tmp/before 1c295db
    python dev/web_chat_findings.py /tmp/before       (the standard library's server)
    python dev/web_chat_findings.py .                 (Starlette on uvicorn)

Each line: a finding, then what the server did. Takes about a minute; needs tiktoken's GPT-2 files.
"""

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(HERE, 'tests'))
from conftest import write_bpe_checkpoint  # noqa: E402


def start(tree, folder, *args):
    """chat.py --web=True from tree on a free port: (process, port, its first lines)."""
    process = subprocess.Popen([sys.executable, os.path.join(tree, 'chat.py'), '--out_dir=chat', '--device=cpu',
                                '--web=True', '--port=0', *args], cwd=folder, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline()
    if ' at http' not in first:
        process.kill()
        return process, None, (first + process.communicate()[1]).strip().splitlines()[-1]
    return process, int(first.split(':')[-1].split('/')[0]), first.strip()


def stop(process):
    process.terminate()
    process.communicate(timeout=30)


def raw(port, data, wait=10.0, source='127.0.0.1'):
    """Send data, read the answer until the server closes or wait seconds pass: (first line, headers dict, body)."""
    with socket.create_connection(('127.0.0.1', port), timeout=wait, source_address=(source, 0)) as s:
        s.sendall(data)
        answer = b''
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except (TimeoutError, socket.timeout):
            answer += b'[no end after %.0f s]' % wait
        except ConnectionResetError:
            answer += b'[reset]'
    head, _, body = answer.partition(b'\r\n\r\n')
    lines = head.decode('latin-1').split('\r\n')
    if not lines[0].startswith('HTTP/'):
        return '(no status line)', {}, answer
    return lines[0], {k.lower(): v for k, v in (x.partition(': ')[::2] for x in lines[1:])}, body


def trickle(port, connections, every, seconds):
    """connections (each from its own loopback address: 64 clients) that send a request a byte every `every` s
    for `seconds` s, in a thread."""
    sockets = [socket.create_connection(('127.0.0.1', port), source_address=(f'127.0.5.{i + 1}', 0))
               for i in range(connections)]

    def run():
        for byte in (b'GET / HTTP/1.1\r\nX-Slow: ' + b'y' * 1000)[:int(seconds / every)]:
            for s in sockets:
                try:
                    s.send(bytes([byte]))
                except OSError:
                    pass
            time.sleep(every)
        for s in sockets:
            s.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def main(tree):
    folder = tempfile.mkdtemp()
    write_bpe_checkpoint(__import__('pathlib').Path(folder) / 'chat', block_size=1024)
    process, port, first = start(tree, folder, '--system=Operator secret.', '--max_new_tokens=1000')
    host = f'Host: 127.0.0.1:{port}\r\nConnection: close\r\n'.encode()
    try:
        status, headers, body = raw(port, b'GET / HTTP/1.1\r\n' + host + b'\r\n')
        print(f'Server header: {headers.get("server", "(none)")}')
        print(f'the operator\'s --system in the page: {"Operator secret." in body.decode()}')
        status, headers, body = raw(port, b'HEAD / HTTP/1.1\r\n' + host + b'\r\n')
        print(f'HEAD /: {status}')
        for request in (b'GET /\r\nHost: 127.0.0.1:%d\r\n\r\n' % port, b'GET /\r\n'):
            started = time.monotonic()
            status, headers, body = raw(port, request, wait=12)
            print(f'HTTP/0.9 {request[:24]!r}: {status} after {time.monotonic() - started:.1f} s, X-Frame-Options '
                  f'{headers.get("x-frame-options", "(none)")}, body starts {body[:40]!r}')

        started = time.monotonic()
        thread = trickle(port, 64, 2, 24)
        time.sleep(1)
        status, _, body = raw(port, b'GET / HTTP/1.1\r\n' + host + b'\r\n', source='127.0.0.1')
        print(f'64 clients trickling a header byte every 2 s, then a normal GET: {status} after '
              f'{time.monotonic() - started - 1:.2f} s')
        thread.join()

        started = time.monotonic()
        with socket.create_connection(('127.0.0.1', port), timeout=60) as s:
            s.sendall(b'POST /chat HTTP/1.1\r\n' + host + b'Content-Type: application/json\r\nContent-Length: 20\r\n\r\n')
            answer = b''
            for byte in b'{"message": "hello"}':
                try:
                    s.settimeout(2)
                    answer = s.recv(4096)
                    break
                except (TimeoutError, socket.timeout):
                    s.send(bytes([byte]))
                if time.monotonic() - started > 25:
                    break
        status = answer.split(b'\r\n')[0].decode() or 'still held, no answer'
        print(f'a body trickled a byte every 2 s: after {time.monotonic() - started:.0f} s {status}')

        chats = []
        for i in range(32):  # 32 clients, each with a chat of up to 512 tokens
            connection = http.client.HTTPConnection('127.0.0.1', port, timeout=60, source_address=(f'127.0.3.{i + 1}', 0))
            connection.request('POST', '/chat', json.dumps({'message': f'chat {i}'}), {'Content-Type': 'application/json'})
            chats.append(connection)
        time.sleep(0.5)
        body = json.dumps({'message': 'one more'}).encode()
        status, _, answer = raw(port, b'POST /chat HTTP/1.1\r\n' + host + b'Content-Type: application/json\r\n'
                                b'Content-Length: %d\r\n\r\n' % len(body) + body, wait=2, source='127.0.4.1')
        first_line = next(line for line in answer.decode(errors='replace').splitlines() if line.startswith('{'))
        print(f'32 queued chats, then a 33rd client: {status} {first_line[:110]}')
        for c in chats:
            c.close()
    finally:
        stop(process)
    for more in ([], ['--allow_anyone=True']):
        process, port, first = start(tree, folder, '--host=0.0.0.0', *more)
        print(f'--host=0.0.0.0 {" ".join(more) or "without a key"}: {first}')
        if port:
            status, _, body = raw(port, b'GET / HTTP/1.1\r\nHost: 192.168.1.5:%d\r\n\r\n' % port)
            print(f'  a machine on the network, by its address: {status} {body.decode(errors="replace").strip()[:170]}')
            stop(process)

if __name__ == '__main__':
    main(os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else HERE))
