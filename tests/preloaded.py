"""
A Python that has imported torch already, forked for each script a test runs, so that a run starts in a
tenth of a second instead of the two or three a fresh interpreter spends importing torch and torch._dynamo
(which every optimizer imports). The script still runs in a process of its own, as `python ARGS...` would:
its command line, working folder, environment, the caller's own stdin/stdout/stderr (file descriptors
passed over a Unix socket), Ctrl-C as the caller would pass it on, a new __main__, the interpreter's ending
(threads joined, atexit, the script's objects freed, streams flushed) and exit status, and numpy's global
random state drawn afresh. What differs from a fresh interpreter is what the preloaded modules did as they
were imported (more modules in sys.modules, their warnings filters and atexit callbacks, one hash seed for
every forked run), and that the modules are not torn down at the end: an object the script left in a
module's keeping (a process group in torch.distributed) is not destroyed, so a crash in its destructor
would not show. So a run is forked only where that cannot change it (forkable): a command line of the
form `[-u] SCRIPT ...` or `[-u] -m MODULE ...`; an environment that differs from the server's only in
variables read later than that (FORK_SAFE); no folder on its path (the script's, or those PYTHONPATH adds)
holding a module that would shadow one already loaded; no SIMULATED_MISSING naming a loaded module.
Anything else runs in a fresh interpreter, and tests/conftest.py runs one happy path of each script fresh
(run_script(..., fresh=True)), where a script using a module it never imports would fail.

Three pieces, one protocol:
    server    `python tests/preloaded.py SOCKET PYTHON`: preloads, then forks a handler per connection;
              it ends when its stdin closes (the test process is gone)
    handler   reads the request (one JSON line: argv, cwd, env, whether SIGINT is ignored; and three file
              descriptors), forks the runner, answers {"pid": ...}, passes on {"signal": N} messages, and
              {"returncode": N} (as subprocess reports it: -N for a signal) when the runner ends; if the
              client goes away first the runner is killed, as a process killed with its parent's would
              be. A run that cannot be forked is answered {"fresh": true}.
    clients   Server.run (conftest.run_script: subprocess.run's arguments and result, read through pipes
              to their end) and the `python` shim (Server.python): an executable that forwards its command
              line, streams and signals, or execs the real interpreter for a fresh run. Runners see it as
              sys.executable, so the Python processes a script starts (compare_runs' training runs,
              torchrun's workers) are forked too; tests start torchrun and Popen through it.

Nothing in the server runs a torch operation before forking: a fork after torch's thread pools start
would hand the child locks that no thread of its own will release. Needs os.fork: elsewhere every run
is fresh.
"""

import gc
import importlib.machinery
import io
import json
import locale
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types

PRELOADED = ('numpy', 'torch', 'torch._dynamo', 'matplotlib.pyplot')
# what neither the interpreter nor the preloaded modules read as they start: torchrun's per-process settings,
# the hub's and tiktoken's caches, pytest's note of the running test, the simulated machines' switches (read by
# tests/simulated/sitecustomize.py, which a forked run imports as the interpreter would)
FORK_SAFE = {'PYTHONPATH', 'TIKTOKEN_CACHE_DIR', 'PYTEST_CURRENT_TEST', 'RANK', 'LOCAL_RANK', 'GROUP_RANK',
             'ROLE_RANK', 'ROLE_NAME', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE', 'GROUP_WORLD_SIZE', 'ROLE_WORLD_SIZE',
             'MASTER_ADDR', 'MASTER_PORT', 'TORCH_NCCL_ASYNC_ERROR_HANDLING'}
FORK_SAFE_PREFIXES = ('HF_', 'HUGGINGFACE_', 'SIMULATED_', 'TORCHELASTIC_')
FORWARDED_SIGNALS = [getattr(signal, name) for name in ('SIGINT', 'SIGTERM', 'SIGHUP', 'SIGQUIT', 'SIGUSR1', 'SIGUSR2')
                     if hasattr(signal, name)]  # (Windows has no fork, and fewer signals)


def command(argv):
    """(unbuffered, module or None, script or None, arguments) of `python argv`, or None for a form the
    runner does not take."""
    unbuffered = argv[:1] == ['-u']
    rest = argv[unbuffered:]
    if rest[:1] == ['-m'] and len(rest) > 1:
        return unbuffered, rest[1], None, rest[2:]
    if rest and not rest[0].startswith('-'):
        return unbuffered, None, rest[0], rest[1:]
    return None


def path_entries(env, cwd):
    """The folders PYTHONPATH puts on sys.path, as the interpreter makes them absolute (an empty one is cwd)."""
    value = env.get('PYTHONPATH')
    return [os.path.join(cwd, entry) if entry else cwd for entry in value.split(os.pathsep)] if value else []


def module_names(folder):
    """The top-level module names that folder offers an import."""
    try:
        entries = os.listdir(folder)
    except OSError:
        return set()
    return {entry.split('.')[0] for entry in entries if entry.endswith(('.py', '.so', '.pyd'))
            or os.path.isdir(os.path.join(folder, entry))}


def forkable(request, server):
    """Whether the request runs the same in a fork of the server as in a fresh interpreter."""
    env, cwd, parsed = request['env'], request['cwd'], command(request['argv'])
    if parsed is None:
        return False
    unbuffered, module, script, _ = parsed
    if script and not os.path.isfile(os.path.join(cwd, script)):  # the interpreter's own message, and status 2
        return False
    imported = server['imported']  # what the imports set, a fresh interpreter sets too: absent or the same is no change
    changed = {k for k in env.keys() | server['env'].keys() if env.get(k) != server['env'].get(k)
               and not (k in imported and env.get(k) in (None, imported[k]))}
    if not all(k in FORK_SAFE or k.startswith(FORK_SAFE_PREFIXES) for k in changed):
        return False
    missing = {name.split('.')[0] for name in env.get('SIMULATED_MISSING', '').split(',') if name}
    folders = [cwd if module else os.path.dirname(os.path.join(cwd, script)),
               *(set(path_entries(env, cwd)) - set(path_entries(server['env'], server['cwd'])))]
    offered = set().union(*(module_names(folder) for folder in folders))
    return not (missing | offered) & server['loaded']


def run(request, fds, server):
    """In the runner: become `python argv...` as a fresh interpreter would, and end as it would."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request['cwd'])
    # Ctrl-C as the caller passes it on: a process started where SIGINT is ignored (a shell's background job)
    # keeps ignoring it, as the interpreter leaves it; otherwise it raises KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.SIG_IGN if request['sigint_ignored'] else signal.default_int_handler)
    os.environ.clear()
    os.environ.update({**server['imported'], **request['env']})
    sys.modules['numpy'].random.seed()  # a fresh interpreter draws it from the system's entropy
    unbuffered, module, script, args = command(request['argv'])
    if unbuffered:  # -u: each write goes straight to the file, as the interpreter sets the streams up for it
        sys.stdout, sys.stderr = (io.TextIOWrapper(io.FileIO(fd, 'w', closefd=False), encoding=stream.encoding,
                                                   errors=stream.errors, write_through=True)
                                  for fd, stream in ((1, sys.stdout), (2, sys.stderr)))
    server_entries = path_entries(server['env'], server['cwd'])
    entries = path_entries(request['env'], request['cwd'])
    first = request['cwd'] if module else os.path.dirname(os.path.abspath(script))
    sys.path[:] = [first, *entries, *(p for p in sys.path[1:] if p not in server_entries)]
    if entries != server_entries and any(os.path.isfile(os.path.join(e, 'sitecustomize.py')) for e in entries):
        sys.modules.pop('sitecustomize', None)
        try:  # what the interpreter imports at start, and what it says when that fails
            import sitecustomize  # noqa: F401
        except Exception as e:
            print(f'Error in sitecustomize; set PYTHONVERBOSE for traceback:\n{type(e).__name__}: {e}',
                  file=sys.stderr)
    sys.executable = server['python']
    import atexit
    import traceback
    main = types.ModuleType('__main__')
    status = 0
    try:
        if module:
            import runpy
            sys.argv = ['-m', *args]
            runpy.run_module(module, run_name='__main__', alter_sys=True)
        else:  # as the interpreter runs a script: in a new __main__, its __file__ absolute, sys.argv[0] as given
            sys.argv = [script, *args]
            path = os.path.abspath(script)
            with open(script, 'rb') as f:
                source = f.read()
            try:
                code = compile(source, path, 'exec')
            except SyntaxError as e:  # reported as the interpreter reports it, without a traceback
                sys.stderr.write(''.join(traceback.format_exception_only(e)))
                raise SystemExit(1) from None
            main.__dict__.update(__file__=path, __cached__=None, __builtins__=__builtins__,
                                 __loader__=importlib.machinery.SourceFileLoader('__main__', path))
            sys.modules['__main__'] = main
            exec(code, main.__dict__)
    except SystemExit as e:  # as the interpreter reads it: None is 0, a number its status, anything else printed
        if e.code is None or isinstance(e.code, int):
            status = (e.code or 0) & 0xFF
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except BaseException as e:
        sys.excepthook(type(e), e, e.__traceback__)
        status = -signal.SIGINT if isinstance(e, KeyboardInterrupt) else 1  # Ctrl-C: the signal is the status
    # As the interpreter ends: threads that are not daemons joined, atexit run, the script's objects freed (their
    # destructors run, files left open flushed), the streams flushed, a failed stdout flush reported with status
    # 120. (Module teardown is not: in a fork it takes a quarter of a second, touching every preloaded object.)
    threading._shutdown()
    atexit._run_exitfuncs()
    if sys.modules.get('__main__') is main:  # let go of the script's module: what only it held is collected,
        del sys.modules['__main__']  # destructors first, with the script's globals still in place
    main = None
    gc.collect()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception as e:
            if stream is sys.stdout:
                sys.stderr.write(f'Exception ignored in: {stream!r}\n{"".join(traceback.format_exception_only(e))}')
                status = 120
    try:
        sys.stderr.flush()
    except Exception:
        pass
    if status < 0:
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    os._exit(status)


def send(connection, message):
    connection.sendall(json.dumps(message).encode() + b'\n')


def handle(connection, server):
    """In a forked handler: one request, from start to end."""
    data, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
    while not data.endswith(b'\n'):
        data += connection.recv(1 << 20)
    request = json.loads(data)
    if not forkable(request, server):
        send(connection, {'fresh': True})
        os._exit(0)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        connection.close()
        run(request, fds, server)
    for fd in fds:
        os.close(fd)
    lock, ended = threading.Lock(), []

    def kill(number):
        with lock:
            if not ended:
                os.kill(pid, number)

    def pass_on_signals():
        try:
            for line in connection.makefile():
                kill(json.loads(line)['signal'])
        except (OSError, ValueError):
            pass
        kill(signal.SIGKILL)  # the client went away: so does its run

    try:
        send(connection, {'pid': pid})
        threading.Thread(target=pass_on_signals, daemon=True).start()
    except OSError:  # gone before it heard of the run
        kill(signal.SIGKILL)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # ended, not yet reaped: its pid cannot be reused
    with lock:
        ended.append(True)
    _, status = os.waitpid(pid, 0)
    try:
        send(connection, {'returncode': os.waitstatus_to_exitcode(status)})
    except OSError:
        pass
    os._exit(0)


def serve(path, python):
    started_with = dict(os.environ)
    for name in PRELOADED:
        __import__(name)
    # the variables the imports set (torch sets TORCHINDUCTOR_CACHE_DIR), which a fresh interpreter would set too
    imported = {k: v for k, v in os.environ.items() if started_with.get(k) != v}
    loaded = {name.split('.')[0] for name in sys.modules} - set(sys.builtin_module_names) - {'__main__'}
    server = {'env': started_with, 'cwd': os.getcwd(), 'python': python, 'imported': imported, 'loaded': loaded}
    gc.freeze()  # what the imports made is never collected: a run's collections then leave the shared pages alone
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # handlers are reaped without waiting for them
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(64)
    print('ready', flush=True)
    while True:
        readable, _, _ = select.select([listener, sys.stdin], [], [])
        if sys.stdin in readable:  # the test process closed it, or is gone
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
            os._exit(0)
        connection, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            handle(connection, server)
        connection.close()


def start(path, argv, cwd, env, fds):
    """Ask the server at path to run `python argv`; returns the connection, its replies and the first reply."""
    connection = socket.socket(socket.AF_UNIX)
    connection.connect(path)
    request = json.dumps({'argv': list(argv), 'cwd': os.path.abspath(cwd), 'env': dict(env),
                          'sigint_ignored': signal.getsignal(signal.SIGINT) == signal.SIG_IGN}).encode() + b'\n'
    socket.send_fds(connection, [request], fds)
    replies = connection.makefile()
    return connection, replies, json.loads(replies.readline())


def shim(path, python):
    """The `python` shim: run sys.argv[1:] forked from the server, passing on signals, and end as the run
    ended; or exec the real interpreter."""
    argv = sys.argv[1:]
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)  # held until they can be passed on
    try:
        connection, replies, reply = start(path, argv, os.getcwd(), os.environ, [0, 1, 2])
    except OSError:  # the server is gone (the test session ended): a fresh interpreter all the same
        reply = {'fresh': True}
    if reply.get('fresh'):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
        os.execv(python, [python, *argv])
    for number in FORWARDED_SIGNALS:
        signal.signal(number, lambda number, frame: send(connection, {'signal': number}))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
    returncode = json.loads(replies.readline())['returncode']
    for number in FORWARDED_SIGNALS:  # the run has ended: a signal now changes nothing, as it would not have
        signal.signal(number, signal.SIG_IGN)
    if returncode < 0:
        signal.signal(-returncode, signal.SIG_DFL)
        os.kill(os.getpid(), -returncode)
    os._exit(returncode)


class Server:
    """The tests' side: a server of their own (started at once, ready at the first run), and runs through it."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix='preloaded-')
        self.path = os.path.join(self.folder, 'socket')
        self.python = os.path.join(self.folder, 'python')  # the shim
        with open(self.python, 'w') as f:
            f.write(f'#!{sys.executable} -S\nimport sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n'
                    f'import preloaded\npreloaded.shim({self.path!r}, {sys.executable!r})\n')
        os.chmod(self.python, 0o755)
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), self.path, self.python],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.starting = threading.Lock()
        self.ready = False

    def wait_ready(self):
        with self.starting:
            self.ready = self.ready or self.process.stdout.readline() == 'ready\n'
        assert self.ready, 'the preloaded server did not start'

    def run(self, argv, cwd, env, input, timeout):
        """subprocess.run([python, *argv], cwd=cwd, env=env, input=input, timeout=timeout, capture_output=True,
        text=True), the run forked from the server; None where it needs a fresh interpreter."""
        self.wait_ready()
        deadline = time.monotonic() + timeout
        pipes = [os.pipe() for _ in range(3)]  # stdin, stdout, stderr: (read end, write end)
        theirs = [pipes[0][0], pipes[1][1], pipes[2][1]]
        try:
            connection, replies, reply = start(self.path, argv, cwd, env, theirs)
        finally:
            for fd in theirs:
                os.close(fd)
        outputs = [[], []]

        def read(fd, chunks):
            with open(fd, 'rb') as f:
                chunks.extend(iter(lambda: f.read1(1 << 16), b''))

        def write(fd):
            try:
                with open(fd, 'wb') as f:
                    f.write((input or '').encode(locale.getpreferredencoding(False)))
            except BrokenPipeError:  # the script ended without reading it all, as subprocess allows
                pass

        threads = [threading.Thread(target=write, args=(pipes[0][1],), daemon=True),
                   *(threading.Thread(target=read, args=(pipes[i][0], outputs[i - 1]), daemon=True) for i in (1, 2))]
        for thread in threads:
            thread.start()
        with connection:
            if reply.get('fresh'):
                for thread in threads:
                    thread.join()
                return None
            try:
                connection.settimeout(max(deadline - time.monotonic(), 0.001))
                returncode = json.loads(replies.readline())['returncode']
                for thread in threads:  # to the pipes' end, as communicate() reads: what the run started may hold them
                    thread.join(max(deadline - time.monotonic(), 0))
                    if thread.is_alive():
                        raise TimeoutError
            except TimeoutError:
                try:
                    os.kill(reply['pid'], signal.SIGKILL)
                except ProcessLookupError:
                    pass
                raise subprocess.TimeoutExpired(argv, timeout, *(b''.join(chunks) for chunks in outputs)) from None
        text = [b''.join(chunks).decode(locale.getpreferredencoding(False)).replace('\r\n', '\n').replace('\r', '\n')
                for chunks in outputs]
        return subprocess.CompletedProcess([self.python, *argv], returncode, *text)

    def close(self):
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


if __name__ == '__main__':
    serve(*sys.argv[1:])
