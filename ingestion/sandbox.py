"""The programs a parse runs: the converters (pandoc, LibreOffice) and the OCR tools (pdfinfo, pdftoppm, tesseract).
Each starts in a session of its own and dies with the process that started it: a Celery prefork child killed at the
hard time limit left pandoc or `soffice.bin` converting the document for minutes. None starts for a parse abandoned
at its time limit (`Cancellation`). A converter runs in a private temporary directory, its whole session killed at
the time limit and after it ends, before that directory (which holds the plaintext copy) is removed. Every program
this process started and that still runs is killed the same way, and waited for, before its private directory goes
(`sessions_ended`: at its exit, a SIGTERM, a stop). Should the process die first (SIGKILL), that directory stays
until the next worker process removes it (`ingestion.scratch`). All the
steps of one document's parse share its time limit (`Deadline`). A program missing as it starts is `ProgramMissing`,
whether or not it starts through setpriv and a shell (which would report it as their exit status 127)."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import itertools
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import forksafe
from core.errors import ErrorCode, GovragError

logger = logging.getLogger(__name__)

GROUP_EXIT_WAIT_SECONDS = 2.0  # after the kill, how long to wait for a converter's (or the OCR tools') processes to go
_PROC = Path("/proc")  # Linux's: where a process group's members (a zombie among them) can be told apart
# A converter's session is led by this shell, sent SIGTERM when the process that started it dies, and then kills the
# whole session: the signal reaches one process only, and `soffice` (oosplash) killed alone left the `soffice.bin` it
# started converting on. "$@" runs the converter's own argument vector, never parsed by the shell.
_SESSION_LEADER = ["/bin/sh", "-c", 'trap "kill -s KILL 0" TERM; "$@" & wait $!', "govrag-converter"]
# Every program starts through util-linux's setpriv, which asks Linux (PR_SET_PDEATHSIG) for the signal when the
# process that started it dies, then this shell, which ends at once should that process have died before the asking
# ($0: its pid) and else becomes the program. No Python code runs between fork and exec (no preexec_fn, unsafe in a
# threaded process: an at-fork hook or a lock another thread held could hang the child). Without setpriv (not Linux)
# programs start as they are, and outlive a killed worker (said once, as the first starts).
_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None
_PARENT_STILL_THERE = '[ "$PPID" = "$0" ] || exit 1; exec "$@"'
_NOT_FOUND = 127  # a shell's exit status when the program it was to run is not there (POSIX)


class ProgramMissing(FileNotFoundError):
    """A program a parse runs is not there (any longer) as it starts. A FileNotFoundError, as subprocess.Popen
    raises for a program it cannot find: pytesseract and pdf2image report it as their tool not installed."""


class Deadline:
    """One document's parse time limit (`limit_seconds`; 0 or less: none), shared by the steps of its parse: each
    (a conversion, the text layer, OCR) gets what the ones before it left, so no upload holds a worker longer."""

    def __init__(self, limit_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit_seconds = limit_seconds
        self._clock = clock
        self._ends_at = clock() + limit_seconds

    def remaining(self) -> float | None:
        """The seconds left for the next step, None without a limit; once none is left, the parse fails (`expired`)."""
        if self.limit_seconds <= 0:
            return None
        left = self._ends_at - self._clock()
        if left <= 0:
            raise self.expired()
        return left

    def expired(self) -> GovragError:
        """The failure of a parse that ran past its limit."""
        return GovragError(ErrorCode.invalid_request, f"parsing took longer than the {self.limit_seconds:g} s limit")


class Abandoned(BaseException):
    """Raised where a parse abandoned at its time limit would start a program. Not an Exception: a library's
    `except Exception` must not carry on to the next page."""


class Cancellation:
    """What tells a parse running on a thread that it was abandoned at its time limit: from then on it starts no
    program. `cancel` returns once a program being started has started, so the caller can then kill it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False

    def cancel(self) -> None:
        """Refuse every program the parse would start from now on."""
        with self._lock:
            self._cancelled = True

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        """Hold off `cancel` while a program starts; raise `Abandoned` once it has been called."""
        with self._lock:
            if self._cancelled:
                raise Abandoned
            yield


_cancellation: contextvars.ContextVar[Cancellation | None] = contextvars.ContextVar("govrag_parse_cancellation",
                                                                                    default=None)


@contextlib.contextmanager
def cancelled_by(cancellation: Cancellation) -> Iterator[None]:
    """The programs started in this block (on this thread) are refused once `cancellation` is cancelled."""
    token = _cancellation.set(cancellation)
    try:
        yield
    finally:
        _cancellation.reset(token)


_started: contextvars.ContextVar[list[ChildPopen] | None] = contextvars.ContextVar(
    "govrag_parse_started", default=None)


class _Starting(threading.local):
    now = False  # this thread is starting a program
    forked: list[int] | None = None  # where the start keeps the pid it forks (`_fork_exec_kept`); None: not kept


_starting = _Starting()


# subprocess.Popen starts a program with `self.pid = _fork_exec(...)`, a C function. A Ctrl-C arriving during the fork
# is raised as KeyboardInterrupt at the interpreter's first check after that call returns, before the assignment: the
# program runs on, and `ChildPopen` has no pid to kill it by. So subprocess's `_fork_exec` is replaced, for the whole
# process (Popen looks it up in subprocess's globals at each start), by `_fork_exec_kept`: a plain pass-through except
# during a `ChildPopen` start on the calling thread (`_starting` is thread-local, so other threads' starts are not
# touched), where list.extend takes the pid from itertools.starmap calling `_fork_exec`, all of it C code, which runs
# no signal handler: the pid is in the start's list before one can run. Blocking SIGINT around the start instead
# (signal.pthread_sigmask) would not do: the program inherits the blocked mask across fork and exec, and the mask holds
# for this thread only, while CPython raises KeyboardInterrupt in the main thread whichever thread the signal reached.
# `_fork_exec` is private to subprocess (CPython 3.11 to 3.13 at least): where this Python has no C function by that
# name, nothing is replaced, and a Ctrl-C there leaves the program running as before.
def _fork_exec_kept(*args: Any) -> int:  # Popen passes every argument by position (fork_exec takes no keyword)
    """subprocess.Popen's fork and exec, the pid kept in this thread's `_starting.forked` when set (see above)."""
    forked = _starting.forked
    if forked is None:
        return _fork_exec(*args)
    forked.extend(itertools.starmap(_fork_exec, [args]))
    return forked[-1]


def _c_fork_exec() -> Callable[..., int] | None:
    """subprocess's own `_fork_exec` if it is a C function (none calling Python code between the fork and the pid's
    return), the one `_fork_exec_kept` replaced where this module is imported again (importlib.reload); else None."""
    fork_exec = getattr(subprocess, "_fork_exec", None)
    fork_exec = getattr(fork_exec, "__wrapped__", fork_exec)
    return fork_exec if isinstance(fork_exec, types.BuiltinFunctionType) else None


_fork_exec = _c_fork_exec()
if _fork_exec is not None:
    _fork_exec_kept.__wrapped__ = _fork_exec  # type: ignore[attr-defined]
    subprocess._fork_exec = _fork_exec_kept  # type: ignore[attr-defined]

# The programs this process started (each the leader of its session), by pid, until one is seen ended as the next
# starts: those not yet reaped are killed by `sessions_ended`. Reentrant: the SIGTERM handler that ends them
# (`scratch._remove_and_end`) may run on a thread holding it. A forked child starts it empty: never the parent's.
_live_lock = forksafe.rlock()
_live: dict[int, subprocess.Popen[bytes]] = {}
forksafe.rebuilt_in_child(_live)


def starting_a_program() -> bool:
    """Whether this thread is in the middle of starting a program: a signal handler that raises (the parse time limit)
    must leave it to its next alarm, or the program would run on, started but held by no one."""
    return _starting.now


@contextlib.contextmanager
def killed_on_failure() -> Iterator[None]:
    """When the block fails (the parse time limit, a Ctrl-C), kill and reap the programs started in it (on this thread,
    or on the thread `parse.run_with_timeout` runs it on) that still run: pdf2image and pytesseract keep their Popen
    to themselves, and the limit, interrupting their wait, left tesseract (or pdfinfo) reading the document for
    minutes. Only those: never a program this process started for anything else, whatever its name. Their pipes are
    closed with them (`_close_pipes`). A block that ends normally has waited for its own and kills nothing."""
    started: list[ChildPopen] = []
    token = _started.set(started)
    try:
        yield
    except BaseException:
        _kill_sessions(_unreaped(started), reap=True)
        _close_pipes(started)
        raise
    finally:
        _started.reset(token)


def _close_pipes(processes: list[ChildPopen]) -> None:
    """Close the pipes to `processes`, killed, that no thread still reads: those started on this thread (the parse
    time limit's SIGALRM interrupted pdf2image's wait for pdfinfo, whose Popen kept them open until a garbage
    collection) or on one that has ended. A parse thread abandoned at its limit still in a wait closes its own as
    the killed program's output ends (closed here, its descriptors could be given to another file it then reads).
    Bytes still buffered for a killed program's input are dropped: their flush (a broken pipe) must not take the
    place of the block's own error (the time limit's)."""
    for process in processes:
        if process.started_on is threading.current_thread() or not process.started_on.is_alive():
            for pipe in (process.stdin, process.stdout, process.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()


def _dying_with(signum: int, args: list[Any]) -> list[Any]:
    """`args` started so that the program is sent `signum` when the process that starts it dies (see `_SETPRIV`)."""
    if _SETPRIV is None:
        _warn_started_unwrapped()
        return args
    return [_SETPRIV, f"--pdeathsig={signal.Signals(signum).name.removeprefix('SIG')}", "--", "/bin/sh", "-c",
            _PARENT_STILL_THERE, str(os.getpid()), *args]


@functools.cache
def _warn_started_unwrapped() -> None:
    """Say once per process that the programs a parse runs outlive a worker process killed mid-parse."""
    logger.warning("util-linux's setpriv is not available (%s): the programs a parse runs (converters, OCR tools) "
                   "are not killed with a worker process killed at the hard time limit", sys.platform)


def _missing(program: str, env: Mapping[str, str]) -> bool:
    """Whether `program` (a path, or a name looked up on `env`'s PATH, as subprocess.Popen does) cannot be run."""
    return shutil.which(program, path=env.get("PATH", os.defpath)) is None


def _refuse_missing(program: str, env: Mapping[str, str]) -> None:
    """Raise `ProgramMissing` where `program` cannot be run."""
    if _missing(program, env):
        raise ProgramMissing(errno.ENOENT, os.strerror(errno.ENOENT), program)


class ChildPopen(subprocess.Popen):  # type: ignore[type-arg]
    """subprocess.Popen for a program a parse starts: refused for a parse abandoned at its time limit, in a session
    of its own, killed (`dies_by`) when this process dies, its TMPDIR `temp_dir` (by default `tempfile`'s, this
    process's private one: `ingestion.scratch`), where LibreOffice writes its `lu*.tmp` copies, and held by the
    `killed_on_failure` block it starts in, before `cancel` or the parse time limit can end the start, and among this
    process's live ones (`sessions_ended`), or else killed: a Ctrl-C ending its start once it was forked. pdf2image
    and pytesseract start the OCR tools with it. `ProgramMissing` when the program is not there; FileNotFoundError
    when `temp_dir` is (`_refuse_removed`)."""

    def __init__(self, args: Any, *more: Any, dies_by: int = signal.SIGKILL, temp_dir: str | None = None,
                 **options: Any) -> None:
        self.started_on = threading.current_thread()  # whose wait for it uses its pipes (`_close_pipes`)
        env = options.pop("env", None)
        env = {**(os.environ if env is None else env), "TMPDIR": temp_dir or tempfile.gettempdir()}
        cancellation = _cancellation.get()
        program = [args] if isinstance(args, str | bytes | os.PathLike) else list(args)
        _refuse_missing(os.fsdecode(program[0]), env)
        started = _started.get()
        with cancellation.starting() if cancellation is not None else contextlib.nullcontext():
            _starting.now = True
            try:
                with _live_lock:  # none starts while `sessions_ended` kills them and its block runs
                    _refuse_removed(env["TMPDIR"])
                    forked: list[int] = []
                    _starting.forked = forked
                    try:
                        super().__init__(_dying_with(dies_by, program), *more, start_new_session=True, env=env,
                                         **options)
                        _held(self, started)
                    except BaseException:  # a Ctrl-C (or a failure) after the fork left it running, held by no one
                        _kill_unheld(self, forked)
                        raise
            finally:
                _starting.now = False
                _starting.forked = None


def _refuse_removed(temp_dir: str) -> None:
    """FileNotFoundError where a program's TMPDIR is gone: its process's private directory removed (`sessions_ended`
    blocked its start until then), where LibreOffice would make its profile's folders, the directory's path, again."""
    if not os.path.isdir(temp_dir):
        raise FileNotFoundError(errno.ENOENT, "the program's temporary directory is gone")


def _held(process: ChildPopen, started: list[ChildPopen] | None) -> None:
    """Hold `process`, just started, among this process's live ones, and among the programs of the
    `killed_on_failure` block it starts in (`started`; None: none); forget the live ones that have ended (reaped now
    if their owner has not)."""
    for pid in [pid for pid, held in _live.items() if held.poll() is not None]:
        del _live[pid]
    _live[process.pid] = process
    if started is not None:
        started.append(process)


def _kill_unheld(process: subprocess.Popen[bytes], forked: list[int]) -> None:
    """Kill and reap `process`, forked (its pid in `forked`, where Popen may not have it yet) but its start ended
    before it was held, and its session; its leader by pid first: subprocess.Popen forking (not vforking) it, a
    Ctrl-C as Popen waits for its exec may fall before the program makes its session (setsid), which the kill of that
    session then misses. Not yet reaped, that pid is still its own: no other thread holds it, and this one's handlers
    of SIGTERM and the parse time limit wait for its start to end (`starting_a_program`)."""
    if forked:
        process.pid = forked[-1]
    unreaped = _unreaped([process])
    for leader in unreaped:
        with contextlib.suppress(OSError):
            os.kill(leader.pid, signal.SIGKILL)
    _kill_sessions(unreaped, reap=True)


@contextlib.contextmanager
def sessions_ended() -> Iterator[None]:
    """Kill the whole session of every program this process started (on any thread) that still runs, wait for them
    to be gone (`GROUP_EXIT_WAIT_SECONDS` at most), and start none until the block ends: this process's private
    directory is then removed with no converter or OCR tool writing in it (LibreOffice's `lu*.tmp` copies), nor a
    `soffice.bin` making its pipe again once it was removed. Never a program another process started: a forked child
    holds none of its parent's. One not yet reaped still holds its pid, which no other process can then be given."""
    with _live_lock:
        _kill_sessions([process for process in _live.values() if process.returncode is None], reap=False)
        yield


def _unreaped(processes: Sequence[subprocess.Popen[bytes]]) -> list[subprocess.Popen[bytes]]:
    """Those of `processes` started (forked) and not yet reaped: each one's pid, leader of its own session, is still
    its."""
    return [process for process in processes if getattr(process, "pid", None) is not None and process.poll() is None]


def _kill_sessions(sessions: list[subprocess.Popen[bytes]], *, reap: bool) -> None:
    """Kill every process of the sessions `sessions` lead, then wait (`GROUP_EXIT_WAIT_SECONDS` at most) for all of
    them to end, reaping the leaders no other thread is waiting for. With `reap`, wait too, in what is left of that
    time, for every leader to be reaped (by this thread, or by the one waiting for it: pytesseract's, a parse's),
    none left a zombie; never in a SIGTERM's handler (`sessions_ended`), which may have interrupted the very thread
    waiting for one. Raises nothing: it runs in that handler too."""
    for process in sessions:
        with contextlib.suppress(OSError):  # all of that session had ended
            os.killpg(process.pid, signal.SIGKILL)
    deadline = time.monotonic() + GROUP_EXIT_WAIT_SECONDS
    running = sessions
    while running and time.monotonic() < deadline:
        for process in running:
            process.poll()
        running = [process for process in running if _group_alive(process.pid)]
        if running:
            time.sleep(0.02)
    if reap:
        for process in sessions:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(deadline - time.monotonic(), 0))


class _Subprocess:
    """The subprocess module as pytesseract sees it: its Popen is `ChildPopen`."""

    Popen = ChildPopen

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)


SUBPROCESS = _Subprocess()


def run_to_the_end(command: list[str], temp_dir: Path, timeout_seconds: float | None) -> int | None:
    """Run a converter in a session of its own, `temp_dir` its TMPDIR and its HOME (LibreOffice keeps a dconf cache
    there), no XDG base directory of this process's; its exit status, or None when it ran past `timeout_seconds`
    (None: no limit). Whatever happens (its end, the limit, the parse's own time limit interrupting the wait), every
    process of the session is killed: `soffice` starts `soffice.bin`, which a kill of `soffice` alone would leave
    running."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("XDG_")}
    process = ChildPopen([*_SESSION_LEADER, *command], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, dies_by=signal.SIGTERM, temp_dir=str(temp_dir),
                         env={**env, "HOME": str(temp_dir)})
    try:
        return process.wait(timeout=timeout_seconds)
    except subprocess.TimeoutExpired:
        return None
    finally:
        _kill_sessions([process], reap=False)
        process.wait()


def _group_alive(group: int) -> bool:
    """Whether a process of `group` still runs: on Linux, one ended but not yet reaped (a zombie) does not."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return not _PROC.is_dir() or any(_runs_in(stat, group) for stat in _PROC.glob("[0-9]*/stat"))


def _runs_in(stat: Path, group: int) -> bool:
    """Whether the process of `/proc/<pid>/stat` is in `group` and not a zombie (false once it is gone)."""
    try:
        text = stat.read_text()
    except OSError:
        return False
    state, _parent, process_group = text[text.rindex(")") + 2:].split()[:3]
    return int(process_group) == group and state not in ("Z", "X")


def _no_sockets(_work: Path) -> list[Path]:
    return []


@dataclass(frozen=True)
class Conversion:
    """One converter run on an upload: its files in the private directory, and what a failure calls the upload."""

    what: str  # the format uploaded, as a failure names it: "ODT", "Word 97-2003 (.doc)"
    prefix: str  # of the private directory's name
    source: str  # the upload's name in it
    output: str  # the converted file's path in it
    program: str  # the converter the command runs: `ProgramMissing` when it is not there
    # The sockets the converter makes outside its private directory (given its path), whatever TMPDIR says, and
    # leaves there when it is killed or aborts: removed after every run
    sockets: Callable[[Path], list[Path]] = _no_sockets


def convert(conversion: Conversion, data: bytes, command: Callable[[Path], list[str]],
            deadline: Deadline) -> tuple[int, bytes | None]:
    """The converter `command(private directory)`'s exit status and the bytes it made of `data` (None: no output), or
    a GovragError when it ran past what is left of the parse's time limit (`deadline`), `ProgramMissing` when the
    converter was not there to run. What a status means is the caller's to say."""
    seconds = deadline.remaining()
    with tempfile.TemporaryDirectory(prefix=conversion.prefix) as work:
        folder = Path(work)
        (folder / conversion.source).write_bytes(data)
        try:
            status = run_to_the_end(command(folder), folder, seconds)
        finally:
            remove_sockets(conversion.sockets(folder))
        if status == _NOT_FOUND:  # the shell's, or else the converter's own
            _refuse_missing(conversion.program, os.environ)
        if status is None:
            raise GovragError(ErrorCode.invalid_request, f"converting the {conversion.what} file took longer than "
                                                         f"the {deadline.limit_seconds:g} s limit")
        output = folder / conversion.output
        return status, output.read_bytes() if output.is_file() else None


def remove_sockets(paths: list[Path]) -> None:
    """Remove those of `paths` that are sockets of this user's: never a symbolic link (nor what it points to),
    another user's socket or any other file. In a sticky directory (/tmp) no other user can put anything else in the
    place of one of ours between the look and the removal. A failure leaves it there, and fails nothing else."""
    for path in paths:
        with contextlib.suppress(OSError):  # gone, or a folder this process cannot read
            status = path.lstat()
            if stat.S_ISSOCK(status.st_mode) and status.st_uid == os.getuid():
                path.unlink()
