"""
How this repository writes files, and how a run folder keeps to one writer.

Every file a script writes (checkpoints and their best copies, log.jsonl, evaluation results, model
cards, exports, prepared data, analysis outputs, benchmark JSON) goes through write_file(): a temporary
PATH.tmp is created new beside the target (O_CREAT | O_EXCL, which never opens through a link; a link
or stale file already at that name is removed first, never followed), written, flushed to the disk, and
renamed over the target. A rename replaces a link at the target rather than writing through it, so a
link planted in a folder (a git clone of a model repository keeps them) can never make a script
overwrite a file elsewhere. A crash mid-write leaves the old file whole; a disk that fills up (or a
file-size limit) is one line, with the partial temporary removed. Lines appended to a log go through
append_line(), which opens without following a link.

claim_folder() takes a run folder for this process alone: an exclusive lock on FOLDER/.lock
(fcntl.flock; msvcrt.locking on Windows), held until the process ends, and released by the operating
system if it dies. A second writer (another resume of the same run, an evaluation writing into an
export being written) is refused in one line naming the process that holds it. When the process ends
the lock file goes, and a folder it made goes too if nothing else was written into it.

Errors are WriteError (a ValueError) with one line, for the scripts to print as their error.
"""

import atexit
import errno
import io
import os
import socket
import sys
import time

try:
    import fcntl
    msvcrt = None
except ImportError:  # Windows
    fcntl = None
    import msvcrt

LOCK_NAME = '.lock'
# opening never follows a link at the name (Windows has no O_NOFOLLOW; its links need administrator rights)
NO_FOLLOW = getattr(os, 'O_NOFOLLOW', 0) | getattr(os, 'O_BINARY', 0)
# seconds to wait between tries of a rename: Windows refuses to replace a file that another program
# holds open (sample_bio.py reading it, a virus scan, a sync client such as OneDrive)
RENAME_WAITS = (0.1, 0.2, 0.5, 1.0, 2.0, 4.0)
NO_ROOM = (errno.ENOSPC, errno.EFBIG, getattr(errno, 'EDQUOT', errno.ENOSPC))


class WriteError(ValueError):
    """A file that could not be written, in one line (the scripts print it as their error)."""


def replace_file(src, dst):
    """os.replace(src, dst), retried while dst is held open; False, with a one-line warning, if it stays held.
    WriteError, with src removed, where dst cannot be replaced at all (a folder of that name, say)."""
    for wait in RENAME_WAITS + (None,):
        try:
            os.replace(src, dst)
            return True
        except PermissionError:
            if wait is None:
                break
            time.sleep(wait)
        except OSError as e:
            os.remove(src)
            raise write_error(dst, e) from None
    print(f'warning: could not replace {dst} (another program holds it open); the new file is complete '
          f'at {src}, and the next save tries again', file=sys.stderr)
    return False


def remove_entry(path):
    """Remove the file or link at path (a link itself, never what it points to), if there is one."""
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)


def write_error(path, error):
    """The one-line WriteError for an OSError met writing path."""
    if error.errno in NO_ROOM:
        return WriteError(f'no room to write {path} ({error.strerror}): the disk is full or a size limit was '
                          'reached; the file it would replace (if any) is as it was; free some space and run again')
    return WriteError(f'could not write {path} ({error.strerror or error})')


def create_new(path):
    """A binary file object of a file created at path, which must not exist (not even as a link)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NO_FOLLOW, 0o666), 'wb')


class RecordedWrites:
    """A file object's write and flush, remembering the OSError a write raised: torch.save reports one as a
    RuntimeError of its own ('unexpected pos'), which says nothing of a full disk."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def write_temp(path, write):
    """Write PATH.tmp, created new, by write(a binary file object: write and flush), flushed to the disk;
    returns its path. On an error nothing is left of it."""
    tmp = path + '.tmp'
    try:
        remove_entry(tmp)  # left by a crash or a refused rename (maybe hard-linked to a best copy), or planted
        f = create_new(tmp)
    except OSError as e:
        raise write_error(path, e) from None
    recorded = RecordedWrites(f)
    try:
        with f:
            write(recorded)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        os.remove(tmp)
        error = recorded.error or (e if isinstance(e, OSError) else None)
        if error is not None:
            raise write_error(path, error) from None
        raise
    return tmp


def write_file(path, data):
    """Replace path's contents by data (bytes, or str written as UTF-8) through a new temporary and a
    rename (the module docstring says why); False where Windows kept the rename refused."""
    if isinstance(data, str):
        data = data.encode('utf-8')
    return replace_file(write_temp(path, lambda f: f.write(data)), path)


def open_append(path):
    """A text file object appending to path (created if missing), never through a link at path."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NO_FOLLOW, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise WriteError(f'{path} is a link, and this repository never writes through one; remove it') from None
        raise write_error(path, e) from None
    return os.fdopen(fd, 'a', encoding='utf-8')


def append_line(path, line):
    """Append line and a newline to path as open_append opens it."""
    with open_append(path) as f:
        try:
            f.write(line + '\n')
            f.flush()
        except OSError as e:
            raise write_error(path, e) from None


def holder(lock_path):
    """What the lock file says of the process that holds it (written after its first byte, which
    Windows locks), or '' if it cannot be read."""
    try:
        with open(lock_path, 'rb') as f:
            f.seek(1)
            return f.read(1000).decode('utf-8', 'replace').strip()
    except OSError:
        return ''


class FolderClaim:
    """The lock that claim_folder() took; release() gives it up (atexit does so too)."""

    def __init__(self, folder, fd, made_folder):
        self.folder, self.fd, self.made_folder = folder, fd, made_folder

    def release(self):
        if self.fd is None:
            return
        lock_path = os.path.join(self.folder, LOCK_NAME)
        try:
            if fcntl:  # unlinked while still held: a process that opened it meanwhile sees it gone and tries again
                os.remove(lock_path)
            os.close(self.fd)
            if msvcrt:
                os.remove(lock_path)
            if self.made_folder and not os.listdir(self.folder):
                os.rmdir(self.folder)
        except OSError:
            pass
        self.fd = None


def claim_folder(folder, what='run'):
    """Make folder if need be and lock it for this process alone until it ends (see the module docstring);
    WriteError naming the process that holds it already. what names the folder's kind in that message."""
    made_folder = not os.path.isdir(folder)
    lock_path = os.path.join(folder, LOCK_NAME)
    while True:
        try:
            os.makedirs(folder, exist_ok=True)  # again on each try: a releasing process may have removed it
        except OSError as e:
            raise WriteError(f'cannot make the folder {folder} ({e.strerror or e})') from None
        try:
            if os.path.islink(lock_path):
                os.remove(lock_path)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | NO_FOLLOW, 0o666)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise write_error(lock_path, e) from None
        try:
            if fcntl:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES, errno.EDEADLK):  # locks unsupported
                raise WriteError(f'cannot lock {folder} ({e.strerror or e}): its file system takes no locks; use a '
                                 'folder on a local disk') from None
            who = holder(lock_path)
            raise WriteError(f'{folder} is being written by another process ({who or "unknown"}); one {what} '
                             'folder has one writer: wait for it to end, or use another folder') from None
        try:  # the file locked must still be the one at the name (a releasing process removes it)
            same = os.path.samestat(os.fstat(fd), os.lstat(lock_path))
        except OSError:
            same = False
        if same:
            break
        os.close(fd)
    claim = FolderClaim(folder, fd, made_folder)
    atexit.register(claim.release)  # at once: an exit (Ctrl-C) while the holder is written still gives the folder back
    command = ' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:])
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f'\nprocess {os.getpid()} on {socket.gethostname()}: {command}'[:1000].encode())
    except OSError as e:  # a full disk: nothing is left of the claim
        claim.release()
        raise write_error(lock_path, e) from None
    return claim


def save_figure(fig, path, dpi):
    """A matplotlib figure saved to path as write_file writes (its format from path's suffix)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=os.path.splitext(path)[1][1:], dpi=dpi)
    return write_file(path, buffer.getvalue())
