"""The supervised fine-tuning loop: plain PyTorch and peft, through accelerate.

One optimizer step trains on one global batch (``plan.Plan``): each process
runs its micro-batches, summing the cross-entropy of their trained tokens, and
every sum is divided by the global batch's trained-token count before
``backward``. So the gradient is the same mean over the same tokens whether
the batch is split by gradient accumulation, by processes (``accelerate
launch``: DDP, gloo on CPU) or not at all. Single-process runs need no launcher.

Deterministic with the seed: the LoRA initialisation, the row order (a function
of seed and step) and dropout (torch's RNG, saved in every checkpoint). A run
whose ``output_dir`` holds a checkpoint resumes from it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lanner import __version__, paths
from lanner.errors import InvalidRequest, LannerError
from lanner.tune import checkpoint, report
from lanner.tune.base import base_model_folder, load_tokenizer, tokenizer_chat_format
from lanner.tune.batches import Plan, collate, trained_count
from lanner.tune.config import TuneConfig
from lanner.tune.dataset import IGNORE, Example, build_examples, pack
from lanner.tune.lora import (
    NextTokenLoss,
    add_lora,
    check_qlora,
    head_matches,
    load_base,
    packing_works,
    shared_prefix_works,
)

ADAPTER = "adapter"
ADAPTER_INFO = "lanner-adapter.json"
MAX_GRAD_NORM = 1.0  # as transformers' Trainer (and TRL) clip by default
_SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
# Keys that may change between a checkpoint and its resumption.
_MAY_CHANGE = {"output_dir", "save_steps", "eval_steps", "logging_steps", "max_steps", "epochs"}


@dataclass
class TuneResult:
    output_dir: Path
    adapter: Path
    """The trained adapter (peft format, with the tokenizer and chat template)."""
    metrics: dict[str, Any]
    """What ``metrics.json`` holds."""
    main_process: bool = True
    """False in the other processes of an ``accelerate launch`` run."""


def train(config: TuneConfig, *, home: str | Path | None = None, resume: bool | None = None,
          progress: bool = True) -> TuneResult:
    """Fine-tune ``config.base_model`` with LoRA on ``config.data``.

    ``resume``: None resumes from the newest checkpoint in ``output_dir`` if it
    has one; True requires one; False refuses a folder that has one. Under
    ``accelerate launch`` every process calls this and they train together.
    """
    check_qlora(config)
    return _Run(config, paths.home(home), resume, progress).run()


class _Run:
    def __init__(self, config: TuneConfig, home: Path, resume: bool | None,
                 progress: bool) -> None:
        from accelerate import Accelerator

        self.config, self.out = config, config.output_dir
        # cpu without CUDA (the transformers backend's devices): then several
        # processes on CPU train together over gloo.
        self.acc = Accelerator(cpu=not torch.cuda.is_available())
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.device, self.main = self.acc.device, self.acc.is_main_process
        with self.acc.main_process_first():  # a GGUF is converted once
            self.folder = base_model_folder(config.base_model, home)
        self.tokenizer = load_tokenizer(self.folder)
        self.chat_format = tokenizer_chat_format(self.tokenizer, config.chat_format)
        examples = build_examples(config, self.tokenizer, self.chat_format)
        self.rows = pack(examples.train, config.max_seq_len) if config.packing else examples.train
        self.trained = [trained_count(row) for row in self.rows]
        self.evals = _eval_batches(examples.eval, config.batch_size)
        self.data = {"train": vars(examples.train_stats), "eval": vars(examples.eval_stats),
                     "train_rows": len(self.rows)}
        self.plan = Plan(len(self.rows), config.batch_size, config.gradient_accumulation_steps,
                         self.world, config.seed)
        self.total = config.max_steps or (config.epochs or 1) * self.plan.steps_per_epoch
        self.progress = progress and self.main
        self.pad_id = _pad_id(self.tokenizer)
        self.fresh = checkpoint.TrainerState(global_batch=self.plan.global_batch,
                                             config=config.to_dict(), data_sha256=self._digest())
        last = self._checkpoint(resume)  # a refusal comes before the weights load
        self._build_model()
        self.state, self.resumed_from = self._start(last)

    # -- setup -------------------------------------------------------------------

    def _build_model(self) -> None:
        torch.manual_seed(self.config.seed)
        base = load_base(self.folder, self.device, self.config.qlora)
        self.model = add_lora(base, self.config.lora)
        self.model.eval()
        if self.config.packing and not packing_works(self.model, self.device):
            raise InvalidRequest("packing", f"{self.folder.name}: this architecture does not "
                                 "keep attention inside packed examples; set packing: false")
        # A batch's common prompt computed once (batches.collate), where the
        # architecture honours a 4D attention mask.
        self.share_prefix = shared_prefix_works(self.model, self.device)
        self.loss_fn = NextTokenLoss(self.model, head_matches(self.model, self.device))
        self.model.train()
        # What training calls: under DDP the wrapped loss (gradients averaged).
        self.loss = self.acc.prepare_model(self.loss_fn) if self.world > 1 else self.loss_fn
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.config.learning_rate,
                                           weight_decay=0.0)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(_SCHEDULERS[self.config.lr_scheduler], self.optimizer,
                                       num_warmup_steps=self.config.warmup_steps,
                                       num_training_steps=self.total)

    def _checkpoint(self, resume: bool | None) -> Path | None:
        """The checkpoint to resume from, if any (see ``train``)."""
        last = checkpoint.latest(self.out) if self.out.is_dir() else None
        if last is None and resume:
            raise LannerError(f"--resume: there is no checkpoint in {self.out}")
        if last is not None and resume is False:
            raise LannerError(f"{self.out} holds checkpoints of an earlier run; resume it, "
                              "or choose another output_dir")
        if last is not None:
            _check_same_run(last, checkpoint.TrainerState.read(last), self.fresh)
        return last

    def _start(self, last: Path | None) -> tuple[checkpoint.TrainerState, int | None]:
        if last is None:
            return self.fresh, None
        state = checkpoint.restore(last, model=self.model, optimizer=self.optimizer,
                                   scheduler=self.scheduler, rank=self.rank, device=self.device)
        state.config = self.fresh.config  # epochs / max_steps / cadences may have changed
        self._say(f"resuming from {last} (step {state.step} of {self.total})")
        return state, state.step

    def _digest(self) -> str:
        """A hash of the training rows, so a resumed run trains on the same data."""
        digest = hashlib.sha256()
        for row in self.rows:
            digest.update(json.dumps([row.input_ids, row.labels, row.position_ids]).encode())
        return digest.hexdigest()

    # -- the loop --------------------------------------------------------------------

    def run(self) -> TuneResult:
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            report.write_resolved_config(self.out, self.config.to_dict())
        from tqdm import tqdm

        bar = tqdm(total=self.total, initial=self.state.step, disable=not self.progress,
                   unit="step", desc="tune", file=sys.stderr, dynamic_ncols=True)
        session_tokens, session_seconds = 0, 0.0
        try:
            while self.state.step < self.total:
                start = time.perf_counter()
                loss, tokens = self._step()
                seconds = time.perf_counter() - start
                session_tokens, session_seconds = session_tokens + tokens, session_seconds + seconds
                self.state.seconds += seconds
                bar.update()
                bar.set_postfix(loss=f"{loss:.4f}",
                                tok_s=f"{session_tokens / session_seconds:.0f}", refresh=False)
                self._after_step(bar)
        except KeyboardInterrupt:
            last = checkpoint.latest(self.out)
            self._say(f"\ninterrupted at step {self.state.step}; "
                      + (f"running the same command resumes from {last.name}" if last else
                         "no checkpoint was saved yet"))
            raise
        finally:
            bar.close()
        return self._finish()

    def _step(self) -> tuple[float, int]:
        """One optimizer step; returns its mean loss and its real tokens."""
        step = self.state.step
        rows = self.plan.rows(step)
        trained = sum(self.trained[i] for i in rows)
        tokens = sum(len(self.rows[i].input_ids) for i in rows)
        scale = self.world / max(trained, 1)  # DDP averages gradients over processes
        micro = self.plan.micro_batches(step, self.rank)
        total = torch.zeros((), device=self.device)
        for m, chunk in enumerate(micro):
            batch = collate([self.rows[i] for i in chunk], self.pad_id,
                            share_prefix=self.share_prefix).to(self.device)
            last = m == len(micro) - 1
            with nullcontext() if last else self.acc.no_sync(self.loss):
                summed = self.loss(batch.input_ids, batch.position_ids, batch.targets,
                                   batch.allowed)
                (summed * scale).backward()
            total += summed.detach()
        lr = self.scheduler.get_last_lr()[0]
        self.acc.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.world > 1:
            total = self.acc.reduce(total, reduction="sum")
        loss = float(total) / max(trained, 1)
        self.state.step += 1
        self.state.epoch, k = divmod(self.state.step, self.plan.steps_per_epoch)
        self.state.epoch_position = k * self.plan.global_batch
        self.state.tokens += tokens
        self.state.trained_tokens += trained
        self.state.history.append({"step": self.state.step, "loss": loss, "learning_rate": lr})
        return loss, tokens

    def _after_step(self, bar: Any) -> None:
        step, config = self.state.step, self.config
        if self.progress and step % config.logging_steps == 0:
            window = self.state.history[-config.logging_steps:]
            mean = sum(h["loss"] for h in window) / len(window)
            bar.write(f"step {step}/{self.total}  loss {mean:.4f}  "
                      f"lr {window[-1]['learning_rate']:.3g}")
        if self.evals and step % (config.eval_steps or config.save_steps) == 0:
            self._evaluate()
        # The last step too: running a finished config again only rewrites its outputs.
        if step % config.save_steps == 0 or step == self.total:
            self._save()

    def _save(self) -> None:
        checkpoint.save(self.out, self.state, model=self.model, optimizer=self.optimizer,
                        scheduler=self.scheduler, rank=self.rank,
                        barrier=self.acc.wait_for_everyone)

    @torch.no_grad()
    def _evaluate(self) -> float:
        """Mean loss per trained token over the eval split (shared out by process)."""
        self.model.eval()
        sums = torch.zeros(2, device=self.device)  # (summed loss, trained tokens)
        for rows in self.evals[self.rank :: self.world]:
            batch = collate(rows, self.pad_id, share_prefix=self.share_prefix).to(self.device)
            # The unwrapped loss: processes may run different numbers of batches.
            sums[0] += self.loss_fn(batch.input_ids, batch.position_ids, batch.targets,
                                    batch.allowed)
            sums[1] += int((batch.targets != IGNORE).sum())
        self.model.train()
        if self.world > 1:
            sums = self.acc.reduce(sums, reduction="sum")
        value = float(sums[0] / sums[1].clamp(min=1))
        self.state.evals.append({"step": self.state.step, "eval_loss": value})
        self._say(f"step {self.state.step}: eval loss {value:.4f}")
        return value

    # -- outputs ------------------------------------------------------------------------

    def _finish(self) -> TuneResult:
        if self.evals and not any(e["step"] == self.state.step for e in self.state.evals):
            self._evaluate()
        values = report.metrics(self.state, total_steps=self.total,
                                steps_per_epoch=self.plan.steps_per_epoch,
                                processes=self.world, data=self.data,
                                resumed_from=self.resumed_from)
        if self.main:
            self._save_adapter(self.out / ADAPTER)
            report.write_metrics(self.out, values)
            report.plot_loss(self.out, self.state)
            rate = values["tokens_per_second"]
            self._say(f"adapter saved to {self.out / ADAPTER}; final loss "
                      f"{values['final_loss']:.4f}"
                      + (f", eval loss {values['eval_loss']:.4f}" if values["eval_loss"] else "")
                      + (f"; {rate:,.0f} training tokens/s" if rate else ""))
        self.acc.wait_for_everyone()
        return TuneResult(self.out, self.out / ADAPTER, values, self.main)

    def _save_adapter(self, folder: Path) -> None:
        """The adapter with the tokenizer and the chat template it was trained
        on, written beside and renamed into place."""
        partial = folder.with_name(f".{folder.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        self.model.save_pretrained(partial)
        self.tokenizer.chat_template = self.chat_format.template
        self.tokenizer.save_pretrained(partial)
        info = {"base_model": self.config.base_model, "base_folder": str(self.folder),
                "chat_format": self.chat_format.name,
                "chat_template_sha256": self.chat_format.template_hash,
                "steps": self.state.step, "lanner": __version__}
        (partial / ADAPTER_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)

    def _say(self, text: str) -> None:
        if self.main:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stderr)  # above the progress bar, if one is shown


def _check_same_run(folder: Path, saved: checkpoint.TrainerState,
                    now: checkpoint.TrainerState) -> None:
    """A checkpoint resumes only the run that wrote it: same settings, same data."""
    changed = [k for k in sorted({*saved.config, *now.config} - _MAY_CHANGE)
               if saved.config.get(k) != now.config.get(k)]
    if changed:
        key = changed[0]
        raise LannerError(f"{folder} was trained with {key}: {saved.config.get(key)!r}, not "
                          f"{now.config.get(key)!r}; use another output_dir to start over")
    if saved.global_batch != now.global_batch:
        raise LannerError(f"{folder} was trained with {saved.global_batch} rows a step, this "
                          f"run has {now.global_batch} (processes x batch_size x "
                          "gradient_accumulation_steps); resume with as many processes")
    if saved.data_sha256 != now.data_sha256:
        raise LannerError(f"{folder} was trained on other data than the files hold now; "
                          "use another output_dir to start over")


def _eval_batches(examples: list[Example], batch_size: int) -> list[list[Example]]:
    """Eval examples in batches of similar length (less padding; order does
    not change a mean)."""
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def _pad_id(tokenizer: Any) -> int:
    """Any id will do (pads are neither attended to nor trained): the pad token's."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            return value
    return 0
