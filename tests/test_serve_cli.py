"""``lanner serve`` as a user starts it: a real process on a loopback port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lanner(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "lanner", "--home", str(home), *args]


def test_serve_prints_its_url_answers_and_logs_the_kv_layout(
    smollm2_gguf: Path, tmp_path: Path,
) -> None:
    port = free_port()
    proc = subprocess.Popen(
        lanner(tmp_path, "serve", str(smollm2_gguf), "--port", str(port), "--no-embeddings",
               "--kv", "split", "--n-ctx", "512"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = f"http://127.0.0.1:{port}/v1"
        assert url in proc.stdout.readline()
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4,
            temperature=0)
        assert reply.choices[0].message.content
        assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 4
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "512 tokens a request, 16 slots, split KV cache of 0.18 GiB" in err


def test_serve_refuses_bad_flags_by_name(tmp_path: Path) -> None:
    bad = subprocess.run(lanner(tmp_path, "serve", "--kv", "paged"), capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--kv" in bad.stderr and "paged" in bad.stderr
    bad = subprocess.run(lanner(tmp_path, "serve", "--max-queue", "0"), capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--max-queue" in bad.stderr
