"""Will this model fit: the planner applied to a catalog entry or a local
model, with a verdict and what to change when it does not fit. ``lanner
fit`` prints it; ``lanner serve`` refuses a model before loading it with it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lanner.catalog import planner
from lanner.catalog.entries import CatalogEntry, find, get
from lanner.catalog.local import LocalModel, describe
from lanner.catalog.planner import Architecture, Budget, Plan
from lanner.errors import CatalogError, InvalidRequest, ModelNotFound


@dataclass(frozen=True, slots=True)
class Subject:
    """What is being sized: a local model (real config and file sizes) or a
    catalog entry (published config)."""

    name: str
    arch: Architecture
    parameters: int
    runs_as: str
    """The weights' type when no --quant is given."""
    weights: int | None
    """Real bytes of a local model's weights; None for a catalog entry."""
    entry: CatalogEntry | None = None
    local: LocalModel | None = None

    @property
    def where(self) -> str:
        return "local" if self.local else "catalog"


@dataclass(frozen=True, slots=True)
class FitReport:
    subject: Subject
    plan: Plan
    budget: Budget
    verdict: str
    largest_context: int
    """Longest context that fits without offload at this quantisation."""
    better_quant: Plan | None
    """The most precise quantisation that fits without offload, if the asked
    one does not."""
    shorter: tuple[str, int] | None = None
    """When no quantisation fits at this context: the most precise one that
    fits a shorter context, and that context."""


def subject(name: str, home: Path) -> Subject:
    """A local model by name or path if there is one, else the catalog entry
    by name or Hub id; ModelNotFound if neither. A remote engine is planned
    as the catalog entry of the model id it serves, if the catalog has one."""
    from lanner.engine.registry import resolve

    try:
        spec = resolve(name, home)
        if spec.remote is not None:
            return _remote_subject(name, str(spec.remote.get("model") or ""))
        local = describe(spec, home)
    except ModelNotFound as local_error:
        try:
            entry = get(name)
        except CatalogError as catalog_error:
            raise ModelNotFound(f"{local_error}; and {catalog_error}") from None
        return Subject(entry.name, entry.arch, entry.parameters, "bf16", None, entry=entry)
    return _local_subject(local)


def _remote_subject(name: str, model: str) -> Subject:
    entry = find(model)
    if entry is None:
        raise CatalogError(f"{name} is a remote engine serving {model!r}, which the catalog "
                           "does not know; its memory is the server's to plan (try `lanner "
                           "fit` with the catalog name of its model)")
    return Subject(entry.name, entry.arch, entry.parameters, "bf16", None, entry=entry)


def _local_subject(local: LocalModel) -> Subject:
    return Subject(local.spec.name, local.arch, local.parameters, local.runs_as,
                   local.weights, entry=local.entry, local=local)


def check_settings(quant: str | None, context: int | None, batch: int, kv_dtype: str) -> None:
    """InvalidRequest naming the flag for a value the planner cannot use."""
    if quant is not None:
        try:
            planner.quant(quant)
        except KeyError:
            known = ", ".join(planner.QUANTS)
            raise InvalidRequest("--quant", f"unknown {quant!r} (known: {known})") from None
    if kv_dtype not in planner.KV_DTYPES:
        raise InvalidRequest("--kv-dtype", f"unknown {kv_dtype!r} "
                             f"(known: {', '.join(planner.KV_DTYPES)})")
    if context is not None and context < 1:
        raise InvalidRequest("--context", f"must be at least 1, got {context}")
    if batch < 1:
        raise InvalidRequest("--batch", f"must be at least 1, got {batch}")


def fit(s: Subject, budget: Budget, *, quant: str | None = None, context: int | None = None,
        batch: int = 1, kv_dtype: str = "f16") -> FitReport:
    """The plan at these settings, the verdict on ``budget``, and the longest
    context / most precise quantisation that would fit."""
    check_settings(quant, context, batch, kv_dtype)
    # A local model's real size, unless another quantisation is asked for.
    weights = s.weights if quant is None or planner.quant(quant).name == s.runs_as else None
    q = quant or s.runs_as
    p = planner.plan(s.arch, s.parameters, quant_name=q, context=context, batch=batch,
                     kv_dtype=kv_dtype, weights=weights)
    longest = planner.largest_context(s.arch, s.parameters, budget, quant_name=q, batch=batch,
                                      kv_dtype=kv_dtype, weights=weights)
    better, shorter = None, None
    if not planner.fits_alone(p, budget):
        ladder = planner.GPU_LADDER if budget.gpu else planner.GGUF_LADDER
        better = planner.best_quant_that_fits(s.arch, s.parameters, budget, ladder,
                                              context=context, batch=batch, kv_dtype=kv_dtype)
        if better is None and longest == 0:
            shorter = next(((name, n) for name in ladder if (n := planner.largest_context(
                s.arch, s.parameters, budget, quant_name=name, batch=batch,
                kv_dtype=kv_dtype))), None)
    return FitReport(s, p, budget, planner.verdict(p, budget), longest, better, shorter)


def budget(gpu: str | None, ram: str | None) -> Budget:
    """From --gpu / --ram (e.g. "80GB", "8x80GB", "24GiB"); RAM defaults to
    this machine's. InvalidRequest naming the flag for a bad size."""
    def size(flag: str, text: str) -> int:
        try:
            return planner.parse_size(text)
        except ValueError:
            raise InvalidRequest(flag, f"not a size: {text!r} (e.g. 80GB, 8x80GB, 24GiB)") \
                from None

    ram_bytes = size("--ram", ram) if ram else planner.machine_ram()
    ram_label = ram or f"{planner.gb(ram_bytes)} (this machine's)"
    if gpu:
        return Budget(size("--gpu", gpu), ram_bytes, gpu, ram_label)
    return Budget(0, ram_bytes, "", ram_label)


# -- lanner serve ----------------------------------------------------------------

# What the llama.cpp backend does with these settings (backends/llamacpp.py:
# DEFAULT_MAX_CTX, n_seq_max, n_batch, default_kv_budget); kept equal by a test.
SERVE_MAX_CTX = 8192
SERVE_SEQUENCES = 16
SERVE_BATCH_TOKENS = 512


@dataclass(frozen=True, slots=True)
class ServePlan:
    report: FitReport
    kv_layout: str
    """"unified" or "split": what ``lanner serve`` tells llama.cpp to allocate."""


def plan_serving(s: Subject, *, n_ctx: int | None, kv: str, ram: int | None = None
                 ) -> ServePlan:
    """The memory ``lanner serve`` will use for a GGUF model on llama.cpp: the
    KV layout ("auto": split when 16 sequences of ``n_ctx`` fit a quarter of
    RAM, at most 4 GiB), the KV cache that layout allocates, and the verdict
    on this machine's RAM."""
    ram = ram or planner.machine_ram()
    window = n_ctx or min(s.arch.context_length or SERVE_MAX_CTX, SERVE_MAX_CTX)
    split_kv = planner.kv_cache_bytes(s.arch, window, SERVE_SEQUENCES)
    layout = kv if kv != "auto" else (
        "split" if split_kv <= min(ram // 4, 4 << 30) else "unified")
    batch = SERVE_SEQUENCES if layout == "split" else 1
    p = planner.plan(s.arch, s.parameters, quant_name=s.runs_as, context=window, batch=batch,
                     weights=s.weights, prefill_tokens=min(window, SERVE_BATCH_TOKENS),
                     logit_rows=min(window, SERVE_BATCH_TOKENS))
    b = Budget(0, ram, "", f"{planner.gb(ram)} (this machine's)")
    longest = planner.largest_context(s.arch, s.parameters, b, quant_name=s.runs_as,
                                      batch=batch, weights=s.weights)
    return ServePlan(FitReport(s, p, b, planner.verdict(p, b), longest, None), layout)


def check_serving(s: Subject, *, n_ctx: int | None, kv: str, ram: int | None = None
                  ) -> ServePlan:
    """``plan_serving``, and WontFit (with the numbers) if it does not fit."""
    from lanner.errors import WontFit

    sp = plan_serving(s, n_ctx=n_ctx, kv=kv, ram=ram)
    r, p = sp.report, sp.report.plan
    if r.verdict == planner.NO_FIT:
        gb = planner.gb
        hint = (f"try --n-ctx {r.largest_context}" if r.largest_context else
                "try a smaller quantisation of it")
        raise WontFit(
            f"{s.name} will not fit: it needs {gb(p.total)} (weights {gb(p.weights)}, "
            f"KV cache {gb(p.kv_cache)} for {p.context} tokens x {p.batch} "
            f"{sp.kv_layout} sequence(s), activations {gb(p.activations)}, overhead "
            f"{gb(p.overhead)}) and this machine has {gb(r.budget.ram)} of RAM; {hint} "
            f"(see `lanner fit {s.name}`)")
    return sp


def check_models_for_serving(home: Path, names: list[str], *, backend: str | None,
                             n_ctx: int | None, kv: str, adapter: str | None = None) -> str:
    """Before ``lanner serve`` loads anything: the licence notice for each
    model, and WontFit for a GGUF model that llama.cpp could not hold in this
    machine's RAM. Returns the KV layout to ask llama.cpp for: the planner's
    choice when every model agrees on one, else ``kv`` unchanged."""
    from lanner.catalog.licensing import warn_for_spec
    from lanner.engine.registry import resolve

    layouts = set()
    for name in names:
        spec = resolve(name, home)
        warn_for_spec(home, spec)
        runs_on = backend or ("transformers" if adapter else spec.backend)
        if spec.format == "gguf" and runs_on == "llama.cpp":
            layouts.add(check_serving(_local_subject(describe(spec, home)), n_ctx=n_ctx,
                                      kv=kv).kv_layout)
    return layouts.pop() if len(layouts) == 1 else kv
