"""The code sandbox: each attack is contained, the model gets a clear error, and
nothing outside the sandbox is touched. Needs bubblewrap (``make install``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lanner.tools import sandbox as sandbox_module
from lanner.tools.sandbox import Limits, Sandbox, SandboxUnavailable, disk_usage


@pytest.fixture
def box() -> Iterator[Sandbox]:
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap is not installed; run `make install` "
                    "(apt-get install bubblewrap)")
    with Sandbox(limits=Limits(wall_s=4, cpu_s=2, output_bytes=50_000)) as made:
        yield made


def leftovers(marker: str) -> list[str]:
    """Command lines of host processes that contain ``marker``."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmd:
                found.append(cmd)
    return found


def test_output_value_and_files_come_back(box: Sandbox) -> None:
    result = box.run_python("import math\nprint('hello')\n"
                            "open('out.txt', 'w').write('x' * 10)\nmath.factorial(12)")
    assert result.stdout == "hello\n"
    assert result.value == "479001600" and result.error is None
    assert result.files == ["out.txt (10 bytes)"]
    assert (box.workdir / "out.txt").read_text() == "x" * 10
    text = result.to_text()
    assert "stdout:\nhello" in text and "value: 479001600" in text and "out.txt" in text


def test_files_persist_between_runs_variables_do_not(box: Sandbox) -> None:
    box.run_python("x = 1\nopen('keep.txt', 'w').write('kept')")
    result = box.run_python("print(open('keep.txt').read())\nx")
    assert result.stdout == "kept\n"
    assert result.error == "NameError: name 'x' is not defined"


def test_errors_are_reported_with_the_code_line(box: Sandbox) -> None:
    result = box.run_python("a = 1\nb = a / 0")
    assert result.error == "ZeroDivisionError: division by zero"
    assert 'File "<code>", line 2' in result.stderr and "b = a / 0" in result.stderr
    assert "sandbox_runner" not in result.stderr
    assert box.run_python("def f(:\n  pass").error.endswith("SyntaxError: invalid syntax")


def test_network_is_unreachable_even_the_hosts_loopback(box: Sandbox) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    connected: list[object] = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # the timeout: nobody came
            connected.append(server.accept())

    thread = threading.Thread(target=accept)
    thread.start()
    result = box.run_python(
        "import socket\nfor addr in [('127.0.0.1', PORT), ('1.1.1.1', 80)]:\n"
        "    try:\n        socket.create_connection(addr, timeout=1)\n"
        "        print('connected', addr)\n"
        "    except OSError as e:\n        print('refused', addr, e)\n"
        "socket.create_connection(('example.com', 80), timeout=1)".replace("PORT", str(port)))
    thread.join()
    server.close()
    assert connected == []  # the host's server never saw the sandbox
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("refused") for line in lines)
    assert "Network is unreachable" in result.stdout or "refused" in result.stdout
    assert result.error is not None and "gaierror" in result.error  # no DNS either


def test_secret_files_are_not_there(box: Sandbox, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-42")
    shadow = Path("/etc/shadow").read_text().splitlines()[0] \
        if os.access("/etc/shadow", os.R_OK) else "root:"
    targets = [str(secret), "/etc/shadow", "~/.ssh/id_rsa", str(Path.home() / ".ssh/id_rsa"),
               "/proc/1/root/etc/shadow"]
    code = ("import os\nfor p in PATHS:\n"
            "    try:\n        print(open(os.path.expanduser(p)).read())\n"
            "    except OSError as e:\n        print('blocked', type(e).__name__, p)\n"
            "os.listdir(os.path.expanduser('~'))").replace("PATHS", repr(targets))
    result = box.run_python(code)
    assert "TOP-SECRET-42" not in result.to_text() and shadow not in result.to_text()
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["blocked"] * 5
    assert result.value == "[]"  # HOME is the empty working folder


def test_writing_outside_the_working_folder_fails(box: Sandbox, tmp_path: Path) -> None:
    # box.workdir.parent is the host's /tmp: inside, that path is the private /tmp
    beside = box.workdir.parent / "escape.txt"
    targets = [str(tmp_path / "escape.txt"), "/escape.txt", "../escape.txt",
               "/usr/escape.txt", "/lanner/escape.txt"]
    code = ("import os\nfor p in PATHS:\n    try:\n        open(p, 'w').write('x')\n"
            "        print('wrote', p)\n    except OSError as e:\n"
            "        print(type(e).__name__, p)\n").replace("PATHS", repr(targets))
    result = box.run_python(code)
    assert "wrote" not in result.stdout
    assert result.stdout.count("Error") == len(targets)
    assert not (tmp_path / "escape.txt").exists()
    assert not Path("/escape.txt").exists() and not Path("/usr/escape.txt").exists()
    result = box.run_python(f"open({str(beside)!r}, 'w').write('x')")
    assert result.error is None and not beside.exists()


def test_environment_secrets_do_not_reach_the_code(box: Sandbox,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-very-secret-value")
    result = box.run_python(
        "import os\nprint(dict(os.environ))\n"
        "for p in ['/proc/1/environ', '/proc/self/environ']:\n"
        "    print(open(p, 'rb').read())")
    assert "sk-very-secret-value" not in result.to_text()
    assert "OPENAI_API_KEY" not in result.stdout


def test_the_code_runs_unprivileged(box: Sandbox) -> None:
    result = box.run_python(
        "import os\nstatus = open('/proc/self/status').read()\n"
        "print(os.getuid(), [l.split()[1] for l in status.splitlines()"
        " if l.startswith('CapEff')])")
    uid, caps = result.stdout.split(" ", 1)
    assert int(uid) != 0 and "'0000000000000000'" in caps


def test_memory_bomb_gets_memory_error(box: Sandbox) -> None:
    result = box.run_python("x = bytearray(8 << 30)")
    assert result.error == "MemoryError"


def test_infinite_loop_is_killed(box: Sandbox) -> None:
    start = time.monotonic()
    result = box.run_python("while True:\n    pass")
    assert time.monotonic() - start < 4 + 2
    assert result.stopped in ("cpu", "timeout")
    assert "CPU time" in (result.error or "") or "wall-clock" in (result.error or "")


def test_sleeping_forever_hits_the_wall_clock(box: Sandbox) -> None:
    result = box.run_python("import time\ntime.sleep(600)")
    assert result.stopped == "timeout"
    assert result.error == "the run was stopped after 4 s (wall-clock limit)"


def test_huge_output_is_stopped_and_cut(box: Sandbox) -> None:
    result = box.run_python("while True:\n    print('y' * 1000)")
    assert result.stopped == "output"
    assert len(result.stdout) <= 50_000
    text = result.to_text()
    assert len(text) < 7000 and "printed more than 50000 bytes" in text


def test_filling_the_disk_is_stopped() -> None:
    # Many files, each under the per-file limit: the working folder's total is watched.
    limits = Limits(wall_s=20, cpu_s=10, file_bytes=4 << 20, disk_bytes=16 << 20)
    with Sandbox(limits=limits) as box:
        (box.workdir / "mine.txt").write_text("kept")
        # 1 MiB files at up to ~100 MiB/s: unchecked, 20 s of this would write ~2 GiB.
        result = box.run_python(
            "import os, itertools, time\n"
            "for i in itertools.count():\n"
            "    with open(f'f{i}.bin', 'wb') as f:\n"
            "        f.write(os.urandom(1 << 20))\n"
            "    time.sleep(0.01)\n")
        assert result.stopped == "disk"
        assert "added more than 16 MiB to the working folder" in result.to_text()
        # Stopped within a few checks of the limit, and nothing of the user's lost.
        assert disk_usage(box.workdir) < 64 << 20
        assert (box.workdir / "mine.txt").read_text() == "kept"


def test_fork_bomb_is_contained(box: Sandbox) -> None:
    start = time.monotonic()
    result = box.run_python(
        "import os\nn = 0\nwhile True:\n    try:\n        os.fork()\n"
        "    except OSError:\n        n += 1")
    assert time.monotonic() - start < 4 + 6
    assert result.stopped in ("timeout", "cpu", "killed")
    assert sandbox_module._processes_of(box.uid) == []  # every fork is gone


def test_a_daemon_does_not_outlive_the_run(box: Sandbox) -> None:
    result = box.run_python(
        "import os, subprocess\n"
        "subprocess.Popen(['sleep', '4242.5'], start_new_session=True)\n"
        "if os.fork() == 0:\n    os.setsid()\n    os.execvp('sleep', ['sleep', '4243.5'])\n"
        "print('spawned')")
    assert result.stdout == "spawned\n" and result.error is None
    time.sleep(0.2)
    assert leftovers("4242.5") == [] and leftovers("4243.5") == []


def test_no_bubblewrap_means_no_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox_module.shutil, "which", lambda name: None)
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        Sandbox()


def test_the_working_folder_is_removed_on_close() -> None:
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap is not installed")
    box = Sandbox()
    box.run_python("open('a.txt', 'w').write('a')")
    folder = box.workdir
    box.close()
    assert not folder.exists()
