"""The shell agent (``lanner do "objective"``): the model plans shell commands
one at a time, the user sees each and says yes, its output goes back to the
model, until the model says DONE or the step limit is reached.

Safety, in layers:

- Every command is shown and runs only after ``confirm`` says yes, unless
  ``yes`` (``--yes``) is given, which needs an explicit working folder.
- A command that names a path outside the working folder (an absolute path,
  ``~``, ``..`` leading out, a ``$VARIABLE``, a bare ``cd``) needs approval
  every time, even with ``yes``: ``outside_paths`` finds them.
- With ``yes``, the commands that run without a question run under bubblewrap
  in a read-only view of the machine where only the working folder (and a
  private /tmp) is writable, so a path the check missed still cannot be
  written. Commands the user approved run as the user's own shell would.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lanner.chat.calllog import CallLog
from lanner.chat.prompts import render_prompt
from lanner.engine.model import Model
from lanner.errors import InvalidRequest
from lanner.store import Store
from lanner.tools.sandbox import SandboxUnavailable

DEFAULT_MAX_STEPS = 10
_FENCE = re.compile(r"```[ \t]*(?:bash|sh|shell|console)?[ \t]*\n(.*?)(?:```|\Z)", re.S)
_DONE = re.compile(r"^\s*DONE\b:?\s*(.*)", re.S | re.M)
_EMBEDDED = re.compile(r"(?<![\w.:/~-])(/[^\s'\"`;|&<>()]*|~[\w./-]*)")
_SAFE = {"/dev/null", "/dev/stdout", "/dev/stderr", "/dev/stdin"}

Confirm = Callable[[str, list[str]], bool | None]
"""``confirm(command, outside_paths)``: True runs it, False declines, None stops."""


@dataclass
class Step:
    command: str
    outside: list[str]
    """Paths outside the working folder that the command names."""
    ran: bool = False
    exit_code: int | None = None
    output: str = ""
    asked: bool = False
    """The user was asked (False: it ran on --yes without a question)."""
    stop: bool = False
    """The user chose to stop the agent here."""


@dataclass
class AgentResult:
    objective: str
    steps: list[Step] = field(default_factory=list)
    summary: str = ""
    stopped: Literal["done", "max_steps", "user"] = "done"
    turn_id: int | None = None


class ShellAgent:
    """One objective, worked on in ``workdir``; ``run`` returns what happened."""

    def __init__(self, model: Model, workdir: str | Path, *, confirm: Confirm,
                 yes: bool = False, max_steps: int = DEFAULT_MAX_STEPS,
                 timeout_s: float = 60.0, output_chars: int = 4000,
                 store: Store | None = None, on_step: Callable[[Step], None] | None = None,
                 **options: Any) -> None:
        self.workdir = Path(workdir).expanduser().resolve()
        if not self.workdir.is_dir():
            raise InvalidRequest("--workdir", f"{self.workdir} is not a folder")
        if max_steps < 1:
            raise InvalidRequest("--max-steps", f"must be at least 1, got {max_steps}")
        self.model, self.confirm, self.yes = model, confirm, yes
        self.max_steps, self.timeout_s, self.output_chars = max_steps, timeout_s, output_chars
        self.store, self.on_step, self.options = store, on_step, options
        self._bwrap = shutil.which("bwrap") if yes else None
        if yes and self._bwrap is None:
            raise SandboxUnavailable("--yes runs commands under bubblewrap, which is not "
                                     "installed (apt-get install bubblewrap)")

    def run(self, objective: str) -> AgentResult:
        system = render_prompt("shell_agent_system.jinja", workdir=self.workdir,
                               system=f"{platform.system()} ({platform.machine()})").strip()
        messages: list[dict[str, Any]] = [{"role": "system", "content": system},
                                          {"role": "user", "content": objective}]
        log = CallLog(self.model, self.store, system=system)
        result = AgentResult(objective)
        try:
            self._loop(log, messages, result)
        finally:
            result.turn_id = log.commit(objective, result.summary, messages[:2], "shell-agent")
        return result

    def _loop(self, log: CallLog, messages: list[dict[str, Any]], result: AgentResult) -> None:
        for n in range(1, self.max_steps + 1):
            request = self.model.chat_request(messages, **self.options)
            reply = log.generate(request, list(messages), f"shell step {n}").text
            messages.append({"role": "assistant", "content": reply})
            command, summary = parse_reply(reply)
            if command is None:
                result.summary = summary
                return
            step = self._step(command)
            result.steps.append(step)
            if step.stop:
                result.stopped = "user"
                return
            messages.append({"role": "user", "content": render_prompt(
                "shell_agent_output.jinja", declined=not step.ran, exit_code=step.exit_code,
                output=step.output).strip()})
        result.stopped = "max_steps"
        result.summary = f"stopped after {self.max_steps} steps"

    def _step(self, command: str) -> Step:
        step = Step(command, outside_paths(command, self.workdir))
        auto = self.yes and not step.outside
        step.asked = not auto
        answer = True if auto else self.confirm(command, step.outside)
        if answer is None:
            step.stop = True
        elif answer:
            step.ran = True
            step.exit_code, step.output = self.execute(command, confined=auto)
        if self.on_step is not None:
            self.on_step(step)
        return step

    def execute(self, command: str, *, confined: bool) -> tuple[int, str]:
        """Run ``command`` with bash in the working folder: (exit status, output).
        ``confined`` runs it under bubblewrap with only the folder writable."""
        argv = ["bash", "-c", command]
        if confined and self._bwrap:
            argv = readonly_view(self._bwrap, self.workdir) + argv
        proc = subprocess.Popen(argv, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=self.timeout_s)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            code = -int(signal.SIGKILL)
            out += f"\n[stopped after {self.timeout_s:g} s]".encode()
        return code, _cut(out.decode("utf-8", errors="replace"), self.output_chars)


def parse_reply(reply: str) -> tuple[str | None, str]:
    """(the command in the reply's first fenced block, or None; the summary
    after DONE, or the reply itself when it has neither)."""
    fence = _FENCE.search(reply)
    done = _DONE.search(reply)
    if fence and fence.group(1).strip() and not (done and done.start() < fence.start()):
        return fence.group(1).strip(), ""
    return None, (done.group(1).strip() if done else reply.strip())


def outside_paths(command: str, workdir: Path) -> list[str]:
    """The paths (or path-like words) in ``command`` that reach outside
    ``workdir``. A heuristic that errs on the side of asking: anything it
    cannot resolve (variables, unparseable quoting) counts as outside."""
    try:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
    except ValueError:
        return ["(the command's quoting cannot be parsed)"]
    found: list[str] = []
    for i, word in enumerate(words):
        if "$" in word or "`" in word:
            found.append(word)
            continue
        if word == "cd" and (i + 1 == len(words) or words[i + 1] in (";", "&&", "||", "|")):
            found.append("cd (home folder)")
        for part in _candidates(word):
            if part not in _SAFE and not _inside(part, workdir):
                found.append(part)
    return list(dict.fromkeys(found))


def readonly_view(bwrap: str, workdir: Path) -> list[str]:
    """bwrap options: the whole machine read-only, ``workdir`` and a private
    /tmp writable, no capabilities, nothing left running afterwards."""
    return [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--tmpfs", "/tmp", "--bind", str(workdir), str(workdir), "--chdir", str(workdir),
            "--unshare-pid", "--unshare-ipc", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--"]


def _candidates(word: str) -> list[str]:
    """Path-like pieces of one shell word: the word, the value after ``=``,
    and absolute paths inside it (``python -c "open('/etc/x')"``)."""
    pieces = [word]
    if "=" in word:
        pieces.append(word.split("=", 1)[1])
    pieces += _EMBEDDED.findall(word)
    return [p for p in pieces if p.startswith(("/", "~")) or p == ".." or p.startswith("../")
            or "/../" in p or p.endswith("/..")]


def _inside(path: str, workdir: Path) -> bool:
    resolved = (workdir / os.path.expanduser(path)).resolve()
    return resolved == workdir or workdir in resolved.parents


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text.rstrip("\n")
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - limit} characters cut ...]\n{text[-half:]}"
