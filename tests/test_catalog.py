"""The catalog's data, the memory planner against the guides' figures and
llama.cpp's real allocation, and the licence notices."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lanner.catalog import entries, licensing, planner
from lanner.catalog.entries import catalog, get, licences
from lanner.catalog.fit import budget, check_models_for_serving, fit, subject
from lanner.catalog.licensing import checked_path, warn_for_repo, warn_for_spec
from lanner.engine.registry import add_entry, resolve
from lanner.errors import CatalogError, WontFit

GB = 1e9


def lanner(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lanner", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=120, env=os.environ.copy())


def total(name: str, **kw: object) -> float:
    e = get(name)
    return planner.plan(e.arch, e.parameters, **kw).total / GB  # type: ignore[arg-type]


# -- the data -------------------------------------------------------------------


def test_every_entry_is_complete_with_a_known_licence_and_consistent_shapes() -> None:
    wanted = {"falcon", "llama-2", "mistral", "qwen2.5", "pythia", "olmo", "starcoder2",
              "code-llama", "deepseek-coder", "gemma", "smollm2", "phi"}
    assert wanted <= {e.family for e in catalog()}
    for e in catalog():
        assert e.licence in licences(), e.name
        assert set(e.openness) == set(entries.OPENNESS_PARTS), e.name
        assert e.sources and e.hub and e.arch.layers and e.arch.vocab_size, e.name
        assert e.arch.attention_heads % e.arch.kv_heads == 0, e.name
        # A typo in a layer count or width shows as a parameter count that no
        # longer matches the published one.
        estimate = e.arch.estimated_parameters()
        assert abs(estimate / e.parameters - 1) < 0.02, (e.name, estimate, e.parameters)
    for lic in licences().values():
        assert lic.summary and lic.url.startswith("https://")


def test_the_guides_licence_facts_are_in_the_data() -> None:
    assert get("falcon-7b").licence == get("falcon-40b").licence == "apache-2.0"
    falcon180 = licences()[get("tiiuae/falcon-180B").licence]
    assert falcon180.hosting == "restricted" and falcon180.warns
    llama = licences()[get("llama-2-70b").licence]
    assert llama.user_threshold == 700_000_000 and llama.outputs == "restricted"
    assert licences()[get("gemma-2b").licence].acceptance
    assert not licences()["apache-2.0"].warns
    assert get("pythia-12b").is_open and get("olmo-2-7b").is_open
    assert get("llama-2-7b").openness["data"] == "closed"


def test_a_malformed_entry_is_refused_naming_the_field() -> None:
    good = {k: v for k, v in _raw("falcon-7b").items()}
    with pytest.raises(CatalogError, match="falcon-7b: missing kv_heads"):
        entries._entry({k: v for k, v in good.items() if k != "kv_heads"}, "f.toml", 0)
    with pytest.raises(CatalogError, match="unknown field.*kv_head"):
        entries._entry({**good, "kv_head": 1}, "f.toml", 0)
    with pytest.raises(CatalogError, match="licence 'wtfpl' is not in licences.toml"):
        entries._entry({**good, "licence": "wtfpl"}, "f.toml", 0)
    with pytest.raises(CatalogError, match="layers must be a non-negative int"):
        entries._entry({**good, "layers": "32"}, "f.toml", 0)


def test_the_smollm2_entry_matches_the_bundled_gguf(lanner_home: Path) -> None:
    local = subject("smollm2", lanner_home)
    assert local.local is not None
    assert local.arch.layers == get("smollm2-135m").arch.layers
    for field in ("hidden_size", "intermediate_size", "attention_heads", "kv_heads",
                  "head_dim", "vocab_size", "context_length"):
        assert getattr(local.arch, field) == getattr(get("smollm2-135m").arch, field), field
    assert abs(local.parameters / get("smollm2-135m").parameters - 1) < 0.01


# -- the planner against the guides --------------------------------------------


def test_falcon_figures_from_the_guides(lanner_home: Path) -> None:
    # "7B needs about 10 GB at 8-bit": within 15%.
    assert 8.5 < total("falcon-7b", quant_name="int8") < 11.5
    # "40B: 45-55 GB at 8-bit and over 100 GB at 16-bit".
    assert 45 < total("falcon-40b", quant_name="int8", context=2048) < 55
    assert total("falcon-40b", quant_name="bf16") > 100
    # The guides' "180B: 640 GB in bf16, 320 GB in 4-bit" are the hardware they
    # ran it on (8x A100 80GB / 8x A100 40GB), not what it needs (~430 / ~125 GB):
    # the plan must fit that hardware and not half of it.
    e = get("falcon-180b")
    bf16 = fit(subject("falcon-180b", lanner_home), budget("8x80GB", "64GB"))
    assert bf16.verdict == "fits" and 400 < bf16.plan.total / GB < 640
    assert fit(subject("falcon-180b", lanner_home), budget("4x80GB", "1GB")).verdict == "won't fit"
    four_bit = planner.plan(e.arch, e.parameters, quant_name="int4")
    assert planner.verdict(four_bit, budget("8x40GB", None)) == "fits"
    assert planner.verdict(four_bit, budget("1x80GB", "1GB")) == "won't fit"


def test_kv_cache_follows_kv_heads_and_sliding_windows() -> None:
    # Multi-query Falcon-7B (1 KV head) against multi-head Llama-2-7B (32).
    mqa = planner.kv_bytes_per_token(get("falcon-7b").arch)
    mha = planner.kv_bytes_per_token(get("llama-2-7b").arch)
    assert mqa == 2 * 32 * 1 * 64 * 2 and mha == 2 * 32 * 32 * 128 * 2
    # Mistral's 4096-token window: the cache stops growing past it.
    mistral = get("mistral-7b").arch
    assert planner.kv_cache_bytes(mistral, 32768) == planner.kv_cache_bytes(mistral, 4096)
    # Gemma 2: only half the layers are windowed.
    g = get("gemma-2-9b").arch
    per_layer_token = 2 * 8 * 256 * 2
    assert planner.kv_cache_bytes(g, 8192) == per_layer_token * (21 * 8192 + 21 * 4096)


def test_the_planner_kv_cache_is_what_llama_cpp_allocates(smollm2_gguf: Path,
                                                          lanner_home: Path) -> None:
    import llama_cpp

    from lanner.backends import llamacpp_native
    from lanner.backends.llamacpp import LlamaCppBackend

    llamacpp_native.init_llama()
    lines: list[str] = []

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def capture(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        backend = LlamaCppBackend(smollm2_gguf, n_ctx=1024, kv="split")
        backend.close()
    finally:
        llama_cpp.llama_log_set(llamacpp_native._log_callback, ctypes.c_void_p(0))
    kv_line = next(line for line in "".join(lines).splitlines() if "KV buffer size" in line)
    allocated = float(kv_line.split("=")[1].split()[0]) * 2**20  # "... = 360.00 MiB"
    s = subject("smollm2", lanner_home)
    planned = check_models_for_serving(lanner_home, ["smollm2"], backend=None, n_ctx=1024,
                                       kv="split")
    assert planned == "split"
    plan = planner.plan(s.arch, s.parameters, context=1024, batch=16, weights=s.weights)
    assert abs(plan.kv_cache / allocated - 1) < 0.05, (plan.kv_cache, allocated)


# -- lanner fit / info / models ---------------------------------------------------


def test_fit_prints_the_total_first_then_the_breakdown_and_a_verdict(lanner_home: Path) -> None:
    out = lanner("fit", "falcon-40b", "--quant", "int8", "--context", "2048", "--gpu", "80GB",
                 home=lanner_home)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("total: ") and lines[0].endswith(" GB")
    assert 45 < float(lines[0].split()[1]) < 55
    assert [line.split()[0] for line in lines[1:5]] == ["weights", "KV", "activations",
                                                        "overhead"]
    assert "falcon-40b (catalog): fits on 80GB" in lines[5]


def test_fit_that_fails_says_what_would_fit(lanner_home: Path) -> None:
    out = lanner("fit", "falcon-40b", "--ram", "30GB", home=lanner_home)
    assert out.returncode == 3
    assert "won't fit in 30GB of RAM" in out.stdout
    assert "most precise quantisation that fits: --quant q3_k_m" in out.stdout
    out = lanner("fit", "llama-2-7b", "--gpu", "16GB", "--context", "4096", "--batch", "8",
                 home=lanner_home)
    assert "fits with CPU offload" in out.stdout
    assert "at this context no quantisation fits; --quant int8 fits --context" in out.stdout
    out = lanner("fit", "llama-2-7b", "--gpu", "24GB", "--context", "4096", "--batch", "8",
                 home=lanner_home)
    assert "longest context that fits at bf16: " in out.stdout
    bad = lanner("fit", "falcon-7b", "--gpu", "lots", home=lanner_home)
    assert bad.returncode == 2 and "--gpu" in bad.stderr and "Traceback" not in bad.stderr
    unknown = lanner("fit", "falcon-8b", home=lanner_home)
    assert unknown.returncode != 0 and "falcon-7b" in unknown.stderr  # the close match


def test_fit_of_a_local_model_uses_its_file(lanner_home: Path, smollm2_gguf: Path) -> None:
    out = lanner("fit", "smollm2-q4_1", "--json", home=lanner_home)
    report = json.loads(out.stdout)
    assert report["source"] == "local" and report["weights"] == smollm2_gguf.stat().st_size
    assert report["quant"] == "q4_1" and report["context"] == 8192


def test_models_catalog_filters_and_info_shows_the_terms(lanner_home: Path) -> None:
    apache = lanner("models", "--catalog", "--license", "apache-2.0", home=lanner_home)
    names = {line.split()[0] for line in apache.stdout.splitlines()[1:-1]}
    assert {"falcon-7b", "falcon-40b", "mistral-7b"} <= names
    assert not names & {"falcon-180b", "llama-2-7b", "gemma-2b"}
    open_data = lanner("models", "--catalog", "--open-data", home=lanner_home)
    names = {line.split()[0] for line in open_data.stdout.splitlines()[1:-1]}
    assert {"pythia-12b", "olmo-2-7b", "smollm2-135m"} <= names and "falcon-7b" not in names
    bad = lanner("models", "--catalog", "--license", "wtfpl", home=lanner_home)
    assert bad.returncode == 2 and "--license" in bad.stderr
    info = lanner("info", "falcon-180b", home=lanner_home)
    assert "hosting use" in info.stdout and "KV heads:         8 (grouped-query" in info.stdout
    assert "https://huggingface.co/tiiuae/falcon-180B/blob/main/config.json" in info.stdout
    local = lanner("info", "smollm2", home=lanner_home)
    assert "from its GGUF header" in local.stdout and "layers:           30" in local.stdout


# -- licence notices -------------------------------------------------------------


def _restricted_model(home: Path, tinycoder_gguf: Path, licence: str = "llama2") -> str:
    add_entry(home, "tiny-llama", {"path": str(tinycoder_gguf), "license": licence,
                                   "source": "test"})
    return "tiny-llama"


def test_run_warns_once_about_a_restrictive_licence(lanner_home: Path,
                                                    tinycoder_gguf: Path) -> None:
    name = _restricted_model(lanner_home, tinycoder_gguf)
    quick = ("hi", "--raw", "--max-tokens", "1", "--no-log")
    first = lanner("run", name, *quick, home=lanner_home)
    assert first.returncode == 0, first.stderr
    assert "Llama 2 Community License" in first.stderr and "700M monthly users" in first.stderr
    again = lanner("run", name, *quick, home=lanner_home)
    assert "Llama 2" not in again.stderr
    plain = lanner("run", "tinycoder", *quick, home=lanner_home)
    assert "lanner: note" not in plain.stderr


def test_serve_warns_and_refuses_a_model_that_will_not_fit_before_loading(
    lanner_home: Path, tinycoder_gguf: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import uvicorn

    from lanner import cli

    served: list[object] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append(app))
    name = _restricted_model(lanner_home, tinycoder_gguf, "gemma")
    assert cli.main(["serve", name, "--no-embeddings"]) == 0
    assert served and "Gemma Terms of Use" in capsys.readouterr().err
    # This machine with 50 MB of RAM: smollm2 (0.3 GB as F16) is refused, with numbers.
    monkeypatch.setattr(planner, "machine_ram", lambda: 50_000_000)
    assert cli.main(["serve", "smollm2", "--no-embeddings"]) == WontFit.exit_code
    err = capsys.readouterr().err
    assert "smollm2 will not fit: it needs" in err and "50.0 MB of RAM" in err
    assert len(served) == 1  # nothing started for the refused model


def test_a_model_needing_no_notice_is_not_looked_up_again_until_its_licence_changes(
        lanner_home: Path, tinycoder_gguf: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    name = _restricted_model(lanner_home, tinycoder_gguf, licence="apache-2.0")
    assert not warn_for_spec(lanner_home, resolve(name, lanner_home))
    assert checked_path(lanner_home).is_file()
    looked_up = []
    real = licensing.licence_of
    monkeypatch.setattr(licensing, "licence_of",
                        lambda spec, home: looked_up.append(spec.license) or real(spec, home))
    assert not warn_for_spec(lanner_home, resolve(name, lanner_home))
    assert looked_up == []  # remembered: the catalog is not read
    # The same name now recorded under a restrictive licence: looked up, and shown.
    add_entry(lanner_home, name, {"path": str(tinycoder_gguf), "license": "llama2",
                                  "source": "test"}, replace=True)
    assert warn_for_spec(lanner_home, resolve(name, lanner_home))
    assert looked_up == ["llama2"] and "Llama 2" in capsys.readouterr().err
    # A notice is never remembered as "needs none": the next run looks it up again.
    assert not warn_for_spec(lanner_home, resolve(name, lanner_home))
    assert looked_up == ["llama2", "llama2"]
    # Keys of another Lanner version are dropped when the file is next written.
    checked_path(lanner_home).write_text(json.dumps(["0.0.0|old|mit|"]))
    add_entry(lanner_home, name, {"path": str(tinycoder_gguf), "license": "mit",
                                  "source": "test"}, replace=True)
    assert not warn_for_spec(lanner_home, resolve(name, lanner_home))
    kept = json.loads(checked_path(lanner_home).read_text())
    assert len(kept) == 1 and kept[0].endswith(f"|{name}|mit|")


def test_pull_warns_before_downloading_a_catalogued_repo(lanner_home: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    assert warn_for_repo(lanner_home, "tiiuae/falcon-180B")
    assert "hosting use" in capsys.readouterr().err
    assert not warn_for_repo(lanner_home, "tiiuae/falcon-180B")  # once
    assert not warn_for_repo(lanner_home, "tiiuae/falcon-7b")  # Apache-2.0: nothing to say
    assert warn_for_repo(lanner_home, "someone/llama-finetune", "llama2")  # from the card


def _raw(name: str) -> dict[str, object]:
    e = get(name)
    return {"name": e.name, "family": e.family, "kind": e.kind, "hub": list(e.hub),
            "parameters": e.parameters, **_arch_dict(e.arch), "licence": e.licence,
            "openness": e.openness, "sources": list(e.sources)}


def _arch_dict(a: planner.Architecture) -> dict[str, object]:
    from dataclasses import asdict

    return asdict(a)
