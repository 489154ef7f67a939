"""A sandbox for model-written Python: a separate process that sees only its
working folder, has no network, and runs under limits.

Containment comes from bubblewrap (``bwrap``, Debian/Ubuntu package
``bubblewrap``), required: Lanner refuses to run code without it.

- File system: a fresh root holding only read-only ``/usr`` and the Python
  installation (interpreter and virtual environment), ``/dev`` (null, zero,
  random, ...), a private ``/proc``, a small private ``/tmp`` and the working
  folder at ``/lanner/work`` (the only writable place that outlives the run).
  ``/etc``, ``/home``, ``/root``, ``~/.ssh`` and the rest do not exist inside.
- Network: a new, empty network namespace (no interface but a down loopback).
- Processes: a new PID namespace; when the run ends or is stopped its first
  process dies and the kernel kills everything else in it, so nothing outlives
  the run, not even a double-forked daemon.
- User: as root, the code runs as an unprivileged user id picked per Sandbox,
  with no capabilities and ``no_new_privs``; as another user, in a user
  namespace as that user.
- Limits (``Limits``): wall-clock time (the whole sandbox is killed), CPU time,
  address space (memory), processes/threads (RLIMIT_NPROC, effective because
  the user id is not root), size of any one written file, open files, bytes of
  output kept (the run is stopped past it), and disk space the run adds to the
  working folder (measured every ``DISK_CHECK_S``; the run is stopped past it).
- Environment: cleared; only PATH, HOME, LANG, TMPDIR and thread-count
  variables are set, so no secret in Lanner's environment reaches the code.

Not contained: CPU/memory pressure on the machine for the duration of a run
(there are no cgroups here), and the disk a run fills between two checks of the
working folder (at most what it can write in ``DISK_CHECK_S``). ``/usr`` is
readable.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lanner.errors import LannerError

INSIDE_WORK = "/lanner/work"
INSIDE_RUNNER = "/lanner/run/runner.py"
_RUNNER = Path(__file__).with_name("sandbox_runner.py")
DISK_CHECK_S = 0.1
"""How often a running sandbox's working folder is measured (``Limits.disk_bytes``)."""
_UID_RANGE = (2_000_000, 2_100_000)  # unused ids: RLIMIT_NPROC counts only this run


@dataclass(frozen=True)
class Limits:
    wall_s: float = 30.0
    """Wall-clock seconds before the whole sandbox is killed."""
    cpu_s: int = 20
    """CPU seconds per process (SIGXCPU, then SIGKILL)."""
    memory_bytes: int = 1 << 30
    """Address space per process (RLIMIT_AS): a larger allocation fails."""
    processes: int = 32
    """Processes and threads the sandbox user may have at once."""
    file_bytes: int = 64 << 20
    """Largest file the code may write."""
    tmp_bytes: int = 64 << 20
    """Size of the private /tmp."""
    open_files: int = 256
    output_bytes: int = 256_000
    """Bytes of stdout (and of stderr) kept; the run is stopped past it."""
    disk_bytes: int = 256 << 20
    """Disk space (allocated blocks) the run may add to the working folder; the run
    is stopped past it (what it wrote stays, for the user to see)."""


@dataclass
class RunResult:
    """What one run did; ``to_text()`` is what the model reads."""

    stdout: str = ""
    stderr: str = ""
    value: str | None = None
    """repr of the last expression's value, if it had one."""
    error: str | None = None
    """The exception the code raised ("Type: message"), or why it was stopped."""
    files: list[str] = field(default_factory=list)
    """Files created or changed in the working folder, "path (N bytes)"."""
    exit_code: int | None = None
    stopped: str | None = None
    """"timeout", "cpu", "killed", "memory", "output" or "file size": the limit that
    ended the run."""
    duration_s: float = 0.0

    def to_text(self, max_chars: int = 6000) -> str:
        """A plain report for the model: output, value, error, files."""
        parts = []
        if self.stdout:
            parts.append("stdout:\n" + _cut(self.stdout, max_chars // 2, head=True))
        if self.stderr:
            parts.append("stderr:\n" + _cut(self.stderr, max_chars // 4, head=False))
        if self.value is not None:
            parts.append("value: " + _cut(self.value, max_chars // 4, head=True))
        if self.error:
            parts.append("error: " + self.error)
        if self.files:
            parts.append("files created or changed: " + ", ".join(self.files[:20]))
        return "\n".join(parts) or "(the code ran and printed nothing)"


class SandboxUnavailable(LannerError):
    """bubblewrap (or setpriv, as root) is missing: code is never run unconfined."""


class Sandbox:
    """A working folder and limits; ``run_python`` runs code in a fresh process.

    Without ``workdir`` a temporary folder is made and removed by ``close``.
    Files persist between runs of the same Sandbox (not variables).
    """

    def __init__(self, workdir: str | Path | None = None, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._bwrap = _require("bwrap", "install bubblewrap (apt-get install bubblewrap)")
        self._root = os.geteuid() == 0
        self._setpriv = _require("setpriv", "install util-linux") if self._root else ""
        self._prlimit = _require("prlimit", "install util-linux")
        self._owned = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="lanner-sandbox-") if workdir is None
                            else workdir).resolve()
        if not self.workdir.is_dir():
            raise LannerError(f"sandbox working folder {self.workdir} is not a folder")
        self.uid = _UID_RANGE[0] + secrets.randbelow(_UID_RANGE[1] - _UID_RANGE[0])
        if self._root:
            os.chown(self.workdir, self.uid, self.uid)  # the only place it may write
        # A folder we made goes away with the Sandbox, or at exit at the latest.
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.workdir, True) \
            if self._owned else None

    def run_python(self, code: str) -> RunResult:
        """Run ``code``; never raises for what the code does (see RunResult)."""
        before = _snapshot(self.workdir)
        read_fd, write_fd = os.pipe()
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                self.argv(write_fd), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, pass_fds=(write_fd,), start_new_session=True,
                env={"PATH": "/usr/bin:/bin"})
        except OSError as exc:
            os.close(read_fd)
            raise SandboxUnavailable(f"cannot start the sandbox: {exc}") from exc
        finally:
            os.close(write_fd)
        result = self._collect(proc, code, read_fd)
        result.duration_s = time.monotonic() - start
        result.files = _changes(before, _snapshot(self.workdir))
        return result

    def argv(self, result_fd: int) -> list[str]:
        """The command line: bwrap, then prlimit, then (as root) setpriv, then Python."""
        lim = self.limits
        limits = [self._prlimit, f"--as={lim.memory_bytes}", f"--cpu={lim.cpu_s}:{lim.cpu_s + 1}",
                  f"--nproc={lim.processes}", f"--fsize={lim.file_bytes}",
                  f"--nofile={lim.open_files}", "--core=0", "--"]
        user = [self._setpriv, f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups",
                "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--"] \
            if self._root else []
        python = [sys.executable, "-I", INSIDE_RUNNER, str(result_fd)]
        return [self._bwrap, *self._mounts(), *_namespaces(self._root), *_environment(),
                "--chdir", INSIDE_WORK, "--", *limits, *user, *python]

    def _mounts(self) -> list[str]:
        ro = sorted({str(Path(p).resolve()) for p in (sys.prefix, sys.base_prefix)})
        if any(p == "/lanner" or p.startswith("/lanner/") for p in ro):
            raise SandboxUnavailable("the Python installation lives under /lanner, "
                                     "where the sandbox mounts its own folders")
        # The private /tmp comes first: a Python that lives under /tmp (a clone
        # in /tmp with its .venv) is mounted on top of it, not hidden by it.
        args = ["--ro-bind", "/usr", "/usr",
                "--perms", "1777", "--size", str(self.limits.tmp_bytes), "--tmpfs", "/tmp"]
        for name in ("bin", "lib", "lib64", "sbin"):  # merged-/usr links, or real folders
            top = Path("/") / name
            if top.is_symlink():
                args += ["--symlink", os.readlink(top), f"/{name}"]
            elif top.is_dir():
                args += ["--ro-bind", str(top), f"/{name}"]
        for path in ro:
            if not path.startswith("/usr/"):
                args += [*_parents(path), "--ro-bind", path, path]
        args += [*_parents(INSIDE_WORK), "--bind", str(self.workdir), INSIDE_WORK,
                 *_parents(INSIDE_RUNNER), "--ro-bind", str(_RUNNER), INSIDE_RUNNER,
                 "--proc", "/proc", "--dev", "/dev"]
        return args

    def _collect(self, proc: subprocess.Popen[bytes], code: str, result_fd: int) -> RunResult:
        result = RunResult()
        streams = _Streams(proc, result_fd, self.limits.output_bytes)
        # A broken pipe means the sandbox died at once; its exit status says why.
        with contextlib.suppress(BrokenPipeError):
            if proc.stdin is not None:
                proc.stdin.write(code.encode("utf-8"))
                proc.stdin.close()
        base = disk_usage(self.workdir)
        over_disk = lambda: disk_usage(self.workdir) - base > self.limits.disk_bytes  # noqa: E731
        result.stopped = streams.pump(time.monotonic() + self.limits.wall_s, over_disk)
        if result.stopped:
            _kill(proc)
        result.exit_code = proc.wait()
        if self._root:
            _wait_gone(self.uid)
        result.stdout, result.stderr = streams.text(1), streams.text(2)
        report = streams.report()
        result.value, result.error = report.get("value"), report.get("error")
        result.stopped = result.stopped or _signal_limit(result.exit_code)
        if result.stopped:
            result.error = _stop_message(result.stopped, self.limits, result.error)
        elif result.exit_code and not report and not result.error:
            result.error = f"the process ended with exit status {result.exit_code}"
        return result

    def close(self) -> None:
        """Remove the working folder if the Sandbox made it."""
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Streams:
    """Reads stdout, stderr and the result pipe together, keeping at most
    ``limit`` bytes of each."""

    def __init__(self, proc: subprocess.Popen[bytes], result_fd: int, limit: int) -> None:
        self.limit = limit
        self.data: dict[int, bytearray] = {1: bytearray(), 2: bytearray(), 3: bytearray()}
        self.sel = selectors.DefaultSelector()
        if proc.stdout is not None and proc.stderr is not None:
            self.sel.register(proc.stdout.fileno(), selectors.EVENT_READ, 1)
            self.sel.register(proc.stderr.fileno(), selectors.EVENT_READ, 2)
        self.sel.register(result_fd, selectors.EVENT_READ, 3)
        self.result_fd = result_fd

    def pump(self, deadline: float, over_disk: Callable[[], bool]) -> str | None:
        """Read until every pipe is closed; "timeout", "output" or "disk" if
        stopped (``over_disk`` is asked every ``DISK_CHECK_S``)."""
        next_check = time.monotonic() + DISK_CHECK_S
        try:
            while self.sel.get_map():
                now = time.monotonic()
                if now >= deadline:
                    return "timeout"
                if now >= next_check:
                    if over_disk():
                        return "disk"
                    next_check = now + DISK_CHECK_S
                wait = min(deadline, next_check) - now
                for key, _ in self.sel.select(timeout=wait):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        self.sel.unregister(key.fd)
                        continue
                    buf = self.data[key.data]
                    buf += chunk[: max(0, self.limit - len(buf))]
                    if len(chunk) and len(buf) >= self.limit and key.data != 3:
                        return "output"
            return None
        finally:
            self.sel.close()
            os.close(self.result_fd)

    def text(self, which: int) -> str:
        return self.data[which].decode("utf-8", errors="replace")

    def report(self) -> dict[str, str | None]:
        try:
            value = json.loads(self.text(3)) if self.data[3] else {}
        except json.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}


def _require(program: str, hint: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise SandboxUnavailable(f"the code sandbox needs {program}, which is not installed; "
                                 f"{hint}")
    return path


def _namespaces(root: bool) -> list[str]:
    common = ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
              "--unshare-cgroup-try", "--die-with-parent", "--new-session",
              "--hostname", "sandbox"]
    # As root the user switch happens inside (setpriv) so RLIMIT_NPROC applies;
    # otherwise a user namespace maps the caller to an unprivileged id.
    return common if root else [*common, "--unshare-user", "--uid", "65534", "--gid", "65534"]


def _environment() -> list[str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": INSIDE_WORK, "TMPDIR": "/tmp",
           "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "MPLBACKEND": "Agg",
           "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = ["--clearenv"]
    for key, value in env.items():
        args += ["--setenv", key, value]
    return args


def _parents(path: str) -> list[str]:
    """bwrap options creating each missing parent of ``path`` world-readable
    (bwrap would make them 0700, which the sandbox user could not enter)."""
    out: list[str] = []
    parts = Path(path).parts[1:-1]
    for i in range(len(parts)):
        out += ["--perms", "0755", "--dir", "/" + "/".join(parts[: i + 1])]
    return out


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill bwrap; its PID-namespace init dies with it (--die-with-parent) and
    takes every process of the run along."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _wait_gone(uid: int, timeout_s: float = 5.0) -> None:
    """Wait until no process of ``uid`` is left. The kernel kills a PID
    namespace's processes when its init dies, but not instantly; the next run
    (same user id, same process limit) must not find them still there."""
    deadline = time.monotonic() + timeout_s
    while _processes_of(uid) and time.monotonic() < deadline:
        time.sleep(0.02)


def _processes_of(uid: int) -> list[int]:
    """Ids of the processes whose real user id is ``uid``."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    found.append(int(entry.name))
            except OSError:
                continue  # it ended while we looked
    return found


_SIGNAL_LIMITS = {int(signal.SIGXCPU): "cpu", int(signal.SIGKILL): "killed",
                  int(signal.SIGXFSZ): "file size", int(signal.SIGSEGV): "memory"}


def _signal_limit(exit_code: int) -> str | None:
    """The limit behind a death by signal (bwrap reports 128 + signal)."""
    signum = -exit_code if exit_code < 0 else exit_code - 128 if exit_code > 128 else 0
    return _SIGNAL_LIMITS.get(signum)


def _stop_message(stopped: str, limits: Limits, error: str | None) -> str:
    messages = {
        "timeout": f"the run was stopped after {limits.wall_s:g} s (wall-clock limit)",
        "cpu": f"the run was killed: it used its {limits.cpu_s} s of CPU time",
        "killed": "the run was killed (CPU time or memory limit)",
        "memory": "the run crashed for lack of memory "
                  f"(limit {limits.memory_bytes >> 20} MiB)",
        "output": f"the run was stopped: it printed more than {limits.output_bytes} bytes",
        "file size": f"the run was killed: it wrote a file larger than "
                     f"{limits.file_bytes >> 20} MiB",
        "disk": f"the run was stopped: it added more than {limits.disk_bytes >> 20} MiB "
                "to the working folder",
    }
    text = messages[stopped]
    return f"{text}; before that: {error}" if error else text


def disk_usage(root: Path) -> int:
    """Bytes of disk the files and folders under ``root`` take (allocated blocks,
    so a sparse file counts for what it really uses; links not followed)."""
    total = 0
    stack = [str(root)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:  # removed meanwhile, or unreadable
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            total += st.st_blocks * 512
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
    return total


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of the files under ``root`` (links not followed)."""
    out: dict[str, tuple[int, int]] = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            try:
                st = path.lstat()
            except OSError:
                continue
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def _changes(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    return [f"{path} ({size} bytes)" for path, (size, mtime) in sorted(after.items())
            if before.get(path) != (size, mtime)]


def _cut(text: str, limit: int, *, head: bool) -> str:
    if len(text) <= limit:
        return text.rstrip("\n")
    cut = len(text) - limit
    if head:
        return text[:limit] + f"\n[... {cut} more characters cut]"
    return f"[... {cut} characters cut ...]\n" + text[-limit:]
