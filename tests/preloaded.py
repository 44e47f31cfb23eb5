"""
A Python that has imported torch already, forked for each script a test runs, so that a run starts in a
tenth of a second instead of the two or three a fresh interpreter spends importing torch and torch._dynamo
(which every optimizer imports). The script still runs in a process of its own, with its own command line,
working folder, environment, standard streams (the caller's own file descriptors, passed over a Unix
socket), signals and exit status, as `python ARGS...` would run it. What a fresh interpreter would do
differently is limited to what the preloaded modules did as they were imported, so a run is forked only
where its environment differs from the server's in variables read later than that (FORK_SAFE); anything
else, and any command line other than `[-u] SCRIPT ...` or `[-u] -m MODULE ...`, runs in a fresh
interpreter. PYTHONPATH is applied as the interpreter applies it, its sitecustomize imported, unless a
folder it adds holds a module that would shadow a preloaded one.

Three pieces, one protocol:
    server    `python tests/preloaded.py SOCKET PYTHON`: preloads, then forks a handler per connection
    handler   reads the request (one JSON line: argv, cwd, env; and three file descriptors), forks the
              runner, answers {"pid": ...}, passes on {"signal": N} messages, and {"returncode": N} (as
              subprocess reports it: -N for a signal) when the runner ends; if the client goes away first
              the runner is killed, as a process killed with its own would be. A run that cannot be
              forked is answered {"fresh": true}.
    clients   Server.run (conftest.run_script: subprocess.run's arguments and result) and the `python`
              shim (Server.python): an executable that forwards its command line, streams and signals,
              or execs the real interpreter for a fresh run. Runners see it as sys.executable, so the
              Python processes a script starts (compare_runs' training runs, torchrun's workers) are
              forked too; tests start torchrun through it.

Nothing in the server runs a torch operation before forking: a fork after torch's thread pools start
would hand the child locks that no thread of its own will release. Needs os.fork: elsewhere every run
is fresh.
"""

import gc
import io
import json
import locale
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import types

PRELOADED = ('numpy', 'torch', 'torch._dynamo', 'matplotlib.pyplot')
# what the interpreter and the preloaded modules do not read as they start: torchrun's per-process settings,
# the hub's and tiktoken's caches, the simulated machines' switches (read by tests/simulated/sitecustomize.py,
# which a forked run imports as the interpreter would); OMP_NUM_THREADS is applied to torch in the runner
FORK_SAFE = {'PYTHONPATH', 'OMP_NUM_THREADS', 'TIKTOKEN_CACHE_DIR', 'PYTEST_CURRENT_TEST', 'RANK', 'LOCAL_RANK',
             'GROUP_RANK', 'ROLE_RANK', 'ROLE_NAME', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE', 'GROUP_WORLD_SIZE',
             'ROLE_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'TORCH_NCCL_ASYNC_ERROR_HANDLING'}
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


def forkable(request, server):
    """Whether the request runs the same in a fork of the server (server: its env and cwd) as in a fresh
    interpreter."""
    env = request['env']
    if command(request['argv']) is None:
        return False
    changed = {k for k in env.keys() | server['env'].keys() if env.get(k) != server['env'].get(k)
               and env.get(k) != server['imported'].get(k)}  # what the imports set, a fresh run would too
    if not all(k in FORK_SAFE or k.startswith(FORK_SAFE_PREFIXES) for k in changed):
        return False
    added = set(path_entries(env, request['cwd'])) - set(path_entries(server['env'], server['cwd']))
    roots = {name.split('.')[0] for name in PRELOADED}
    return not any(os.path.exists(os.path.join(folder, name)) or os.path.exists(os.path.join(folder, name + '.py'))
                   for folder in added for name in roots)


def run(request, fds, server):
    """In the runner: become `python argv...` as a fresh interpreter would, run it, and exit as it would."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request['cwd'])
    os.environ.clear()
    os.environ.update({**server['imported'], **request['env']})
    unbuffered, module, script, args = command(request['argv'])
    if unbuffered:  # -u: each write goes straight to the file, as the interpreter sets the streams up for it
        sys.stdout, sys.stderr = (io.TextIOWrapper(io.FileIO(fd, 'w', closefd=False), encoding=stream.encoding,
                                                   errors=stream.errors, write_through=True)
                                  for fd, stream in ((1, sys.stdout), (2, sys.stderr)))
    if os.environ.get('OMP_NUM_THREADS') != server['env'].get('OMP_NUM_THREADS'):
        import torch
        torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS') or os.cpu_count()))
    server_entries = path_entries(server['env'], server['cwd'])
    entries = path_entries(request['env'], request['cwd'])
    first = request['cwd'] if module else os.path.dirname(os.path.abspath(script))
    sys.path[:] = [first, *entries, *(p for p in sys.path[1:] if p not in server_entries)]
    if entries != server_entries and any(os.path.isfile(os.path.join(e, 'sitecustomize.py')) for e in entries):
        sys.modules.pop('sitecustomize', None)
        import sitecustomize  # noqa: F401  (what the interpreter imports at start)
    sys.executable = server['python']
    import atexit
    import runpy
    status = 0
    try:
        if module:
            sys.argv = ['-m', *args]
            runpy.run_module(module, run_name='__main__', alter_sys=True)
        else:  # as the interpreter runs a script: in a new __main__, its __file__ absolute, sys.argv[0] as given
            sys.argv = [script, *args]
            with open(script, 'rb') as f:
                code = compile(f.read(), os.path.abspath(script), 'exec')
            main = types.ModuleType('__main__')
            main.__file__, main.__cached__ = os.path.abspath(script), None
            sys.modules['__main__'] = main
            exec(code, main.__dict__)
    except SystemExit as e:  # as the interpreter reads it: None is 0, a number its status, anything else printed
        if e.code is None or isinstance(e.code, int):
            status = (e.code or 0) & 0xFF
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        status = -signal.SIGINT
    except BaseException:
        sys.excepthook(*sys.exc_info())
        status = 1
    threading._shutdown()  # as the interpreter ends: wait for threads that are not daemons, run atexit, then
    atexit._run_exitfuncs()  # collect what the script made (its destructors run, as they would)
    gc.collect()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    if status < 0:  # ended by Ctrl-C: the interpreter re-raises the signal, so the status says so
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
    send(connection, {'pid': pid})
    lock, ended = threading.Lock(), []

    def pass_on_signals():
        for line in connection.makefile():
            with lock:
                if not ended:
                    os.kill(pid, json.loads(line)['signal'])
        with lock:  # the client went away: so does its run
            if not ended:
                os.kill(pid, signal.SIGKILL)

    threading.Thread(target=pass_on_signals, daemon=True).start()
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # ended, not yet reaped: its pid cannot be reused
    with lock:
        ended.append(True)
    _, status = os.waitpid(pid, 0)
    send(connection, {'returncode': os.waitstatus_to_exitcode(status)})
    os._exit(0)


def serve(path, python):
    started_with = dict(os.environ)
    for name in PRELOADED:
        __import__(name)
    # the variables the imports set (torch sets TORCHINDUCTOR_CACHE_DIR), which a fresh interpreter would set too
    imported = {k: v for k, v in os.environ.items() if started_with.get(k) != v}
    gc.freeze()  # what the imports made is never collected: a run's collections then leave the shared pages alone
    server = {'env': started_with, 'cwd': os.getcwd(), 'python': python, 'imported': imported}
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # handlers are reaped without waiting for them
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(64)
    print('ready', flush=True)
    while True:
        connection, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            handle(connection, server)
        connection.close()


def start(path, argv, cwd, env, fds):
    """Ask the server at path to run `python argv`; returns the connection, its replies and the first reply."""
    connection = socket.socket(socket.AF_UNIX)
    connection.connect(path)
    request = json.dumps({'argv': list(argv), 'cwd': os.path.abspath(cwd), 'env': dict(env)}).encode() + b'\n'
    socket.send_fds(connection, [request], fds)
    replies = connection.makefile()
    return connection, replies, json.loads(replies.readline())


def shim(path, python):
    """The `python` shim: run sys.argv[1:] forked from the server, passing on signals, and end as the run
    ended; or exec the real interpreter."""
    argv = sys.argv[1:]
    try:
        connection, replies, reply = start(path, argv, os.getcwd(), os.environ, [0, 1, 2])
    except OSError:  # the server is gone (the test session ended): a fresh interpreter all the same
        reply = {'fresh': True}
    if reply.get('fresh'):
        os.execv(python, [python, *argv])
    for number in FORWARDED_SIGNALS:
        signal.signal(number, lambda number, frame: send(connection, {'signal': number}))
    returncode = json.loads(replies.readline())['returncode']
    if returncode < 0:
        signal.signal(-returncode, signal.SIG_DFL)
        os.kill(os.getpid(), -returncode)
    sys.exit(returncode)


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
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
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
        with tempfile.TemporaryDirectory(dir=self.folder) as streams:
            paths = [os.path.join(streams, name) for name in ('stdin', 'stdout', 'stderr')]
            for path, text in zip(paths, (input or '', '', '')):
                with open(path, 'w') as f:
                    f.write(text)
            files = [open(path, mode) for path, mode in zip(paths, ('rb', 'wb', 'wb'))]
            try:
                connection, replies, reply = start(self.path, argv, cwd, env, [f.fileno() for f in files])
            finally:
                for f in files:
                    f.close()
            with connection:
                if reply.get('fresh'):
                    return None
                connection.settimeout(timeout)
                try:
                    returncode = json.loads(replies.readline())['returncode']
                except TimeoutError:
                    os.kill(reply['pid'], signal.SIGKILL)
                    raise subprocess.TimeoutExpired(argv, timeout, *self.read(paths[1:])) from None
            return subprocess.CompletedProcess([self.python, *argv], returncode, *self.read(paths[1:]))

    @staticmethod
    def read(paths):
        """The texts of these files as text=True reads a pipe: the locale's encoding, universal newlines."""
        texts = []
        for path in paths:
            with open(path, encoding=locale.getpreferredencoding(False)) as f:
                texts.append(f.read())
        return texts

    def close(self):
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


if __name__ == '__main__':
    serve(*sys.argv[1:])
