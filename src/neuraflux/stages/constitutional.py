"""`stage=constitutional`: constitutional AI (Bai et al. 2022), both phases in one Lightning run.

Every `refresh_every` optimizer steps (0: once, at the first step) the stage samples `samples_per_prompt`
responses to every training prompt with the KV-cached generator and rebuilds its data
(`feedback.constitutional_data`):

(a) critique -> revision: a response that breaks a principle is replaced by the model's own revision (greedy,
    from a prompt showing the request, the response and the critique; `revise_with_model`) when that finishes
    and breaks nothing, else by the principle's template; clean responses stay. The policy is fine-tuned on
    (prompt, revision): cross-entropy on the revision's tokens.
(b) AI feedback: pairs ranked by the constitution (fewer broken principles = chosen). `feedback: dpo` adds
    feedback_weight * the DPO loss against a frozen copy of the starting policy; `export` appends the pairs to
    `<out_dir>/preferences.jsonl` (for `data=preference data.path=...`); `none` trains on (a) only.

A training step takes a batch of prompts from the data module and trains on the revisions and pairs built for
those prompts. The data is written to `out_dir` (revisions.jsonl, ai_feedback.jsonl) and kept in checkpoints,
so a resumed run continues on the same data.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch

from neuraflux.alignment.losses import DPOOutput, dpo_loss, response_logprobs
from neuraflux.chat import Message, render_prompt
from neuraflux.data.common import LMBatch, move_batch
from neuraflux.data.preference import PreferenceExample
from neuraflux.data.preference_batches import (
    Paired,
    collate_pairs,
    completion_text,
    encode_pairs,
    fit_sequence,
)
from neuraflux.data.prompts import PromptBatch, encode_prompts
from neuraflux.data.sft import make_sft_collate
from neuraflux.feedback.constitution import Constitution
from neuraflux.feedback.constitutional_data import (
    FeedbackPair,
    RevisionExample,
    append_preferences,
    build_revisions,
    feedback_pairs,
    feedback_records,
    revision_from_model,
    revision_records,
    violation_rates,
    write_jsonl,
)
from neuraflux.feedback.rollout import (
    SamplingSettings,
    check_rollout_fits,
    load_reference,
    response_validity,
)
from neuraflux.model import NanoLM, generate
from neuraflux.model.io import FrozenModels
from neuraflux.optim import OptimizerFactory
from neuraflux.stages.common import (
    check_finite,
    configure_optimizers,
    is_logging_step,
    log_lr,
)
from neuraflux.stages.lm import masked_lm_loss
from neuraflux.stages.reward import preference_metrics

log = logging.getLogger(__name__)

FEEDBACK_MODES: tuple[str, ...] = ("dpo", "export", "none")
REVISION_FIELDS: tuple[str, ...] = ("request", "response", "critique")
DEFAULT_REVISION_PROMPT = "{request}\nA first answer was: {response}\nCritique: {critique}\nAnswer again, better."


def check_revision_prompt(template: str) -> str:
    """The revision prompt must show all of request, response and critique, and nothing else."""
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"stage.module.revision_prompt must be a non-empty string, got {template!r}")
    names = set(re.findall(r"{(\w*)}", template))
    if names != set(REVISION_FIELDS):
        raise ValueError(
            f"stage.module.revision_prompt must use exactly the fields {list(REVISION_FIELDS)}; it uses {sorted(names)}"
        )
    return template


@dataclass(frozen=True)
class ConstitutionalSettings:
    """How the data is built and weighed; validated once, naming the config key."""

    feedback: str = "dpo"  # one of FEEDBACK_MODES
    feedback_weight: float = 1.0
    beta: float = 0.1
    refresh_every: int = 0  # optimizer steps between rebuilds; 0: built once
    samples_per_prompt: int = 4
    max_pairs_per_prompt: int | None = 2
    revise_with_model: bool = False
    revision_prompt: str = DEFAULT_REVISION_PROMPT
    generation_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.feedback not in FEEDBACK_MODES:
            raise ValueError(f"stage.module.feedback must be one of {list(FEEDBACK_MODES)}, got {self.feedback!r}")
        if not isinstance(self.feedback_weight, int | float) or self.feedback_weight < 0:
            raise ValueError(f"stage.module.feedback_weight must be a number >= 0, got {self.feedback_weight!r}")
        for key, low in (("refresh_every", 0), ("samples_per_prompt", 1), ("generation_batch_size", 1)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"stage.module.{key} must be an integer >= {low}, got {value!r}")
        pairs = self.max_pairs_per_prompt
        if pairs is not None and (not isinstance(pairs, int) or isinstance(pairs, bool) or pairs < 1):
            raise ValueError(f"stage.module.max_pairs_per_prompt must be a positive integer or null, got {pairs!r}")
        zero = torch.zeros(1)
        try:  # a dry call checks beta where the rule lives
            dpo_loss(zero, zero, zero, zero, beta=self.beta)
        except ValueError as err:
            raise ValueError(f"stage.module: {err}") from None
        check_revision_prompt(self.revision_prompt)


@dataclass
class ConstitutionalData:
    """What one refresh built: the revisions and pairs, looked up by prompt. Plain strings and ints, so it
    goes into checkpoints as it is (weights_only-safe)."""

    step: int  # the optimizer step it was built at
    revisions: list[RevisionExample]
    pairs: list[FeedbackPair]
    # prompt -> the revision of each of its samples, repeats kept: the SFT targets follow the policy's own
    # distribution (a template that replaced one sample in four weighs one in four)
    targets: dict[str, list[str]] = field(init=False)
    pairs_by_prompt: dict[str, list[FeedbackPair]] = field(init=False)

    def __post_init__(self) -> None:
        self.targets, self.pairs_by_prompt = {}, {}
        for ex in self.revisions:
            texts = self.targets.setdefault(ex.prompt, [])
            if ex.revision.strip():  # an empty answer (the model stopped at once) broke nothing but teaches nothing
                texts.append(ex.revision)
        for pair in self.pairs:
            self.pairs_by_prompt.setdefault(pair.prompt, []).append(pair)

    def state(self) -> dict:
        return {
            "step": self.step,
            "revisions": revision_records(self.revisions, self.step),
            "pairs": feedback_records(self.pairs, self.step),
        }

    @classmethod
    def from_state(cls, state: dict) -> ConstitutionalData:
        drop = {"step"}
        revisions = [
            RevisionExample.from_dict({k: v for k, v in r.items() if k not in drop}) for r in state["revisions"]
        ]
        pairs = [FeedbackPair(**{k: v for k, v in p.items() if k not in drop}) for p in state["pairs"]]
        return cls(int(state["step"]), revisions, pairs)


class NanoConstitutionalAI(pl.LightningModule):
    """Critique -> revision SFT and constitution-ranked AI feedback on `self.model`, started from
    `reference_path` (stage.init_from, required: the frozen DPO reference is reloaded from it, also on
    resume)."""

    def __init__(
        self,
        model: NanoLM,
        tokenizer,
        optim: OptimizerFactory,
        name: str = "constitutional",
        reference_path: str | None = None,
        constitution: Mapping | None = None,
        world: Mapping | None = None,
        feedback: str = "dpo",  # dpo (adds the DPO loss) | export (writes out_dir/preferences.jsonl) | none
        feedback_weight: float = 1.0,
        beta: float = 0.1,
        refresh_every: int = 0,
        samples_per_prompt: int = 4,
        max_pairs_per_prompt: int | None = 2,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        revise_with_model: bool = False,
        revision_prompt: str = DEFAULT_REVISION_PROMPT,
        generation_batch_size: int = 64,
        out_dir: str | None = None,
    ):
        super().__init__()
        # Every setting is checked before the world or the reference is built.
        self.settings = ConstitutionalSettings(
            feedback=feedback, feedback_weight=feedback_weight, beta=beta, refresh_every=refresh_every,
            samples_per_prompt=samples_per_prompt, max_pairs_per_prompt=max_pairs_per_prompt,
            revise_with_model=revise_with_model, revision_prompt=revision_prompt,
            generation_batch_size=generation_batch_size,
        )  # fmt: skip
        self.sampling = SamplingSettings(max_new_tokens, temperature, top_k, top_p)
        if constitution is None:
            raise ValueError("stage.module.constitution is not set: choose one with constitution=default")
        self.constitution = Constitution.from_config(constitution)
        if world is None:
            raise ValueError("stage.module.world must hold the world config (the constitution's judges read it)")
        if reference_path is None:
            raise ValueError(
                "stage.init_from is required for stage=constitutional: the policy to start from (an SFT "
                "model directory or .ckpt); the frozen reference is reloaded from it"
            )
        from neuraflux.world import WorldConfig, generate_world

        self.model, self.tokenizer, self.optim, self.name = model, tokenizer, optim, name
        self.reference_path, self.out_dir = reference_path, out_dir
        self.world = generate_world(WorldConfig.from_dict(world))
        # Only DPO reads the reference; it lives outside nn.Module registration (no state_dict, no optimizer).
        reference = load_reference(reference_path, model, tokenizer) if feedback == "dpo" else None
        self.frozen = FrozenModels(reference)
        self.data: ConstitutionalData | None = None

    @property
    def reference(self) -> NanoLM | None:
        return self.frozen.reference

    # ---- generation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def complete(self, prompts: list[str], temperature: float) -> tuple[list[str], list[bool]]:
        """Responses to rendered prompts from the KV-cached generator, in chunks, and whether each finished
        (ended with a stop token rather than at max_new_tokens). Stop and special tokens are dropped.

        Temperature 0 is greedy. A prompt longer than the model's block size keeps its last tokens (the
        question), as the prompt data module cuts them, and prompt + response always fit the positions.
        """
        s, tok, config = self.sampling, self.tokenizer, self.model.config
        budget = min(config.block_size, config.max_position_embeddings - s.max_new_tokens)
        stops = torch.tensor([tok.end_id, tok.eos_id], device=self.device)
        texts: list[str] = []
        finished: list[bool] = []
        chunk = self.settings.generation_batch_size
        for i in range(0, len(prompts), chunk):
            batch = encode_prompts(tok, prompts[i : i + chunk], max_prompt_tokens=budget)
            ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
            seq = generate(
                self.model,
                ids,
                s.max_new_tokens,
                temperature,
                s.top_k,
                s.top_p,
                eos_token_id=stops.tolist(),
                attention_mask=mask,
                pad_token_id=tok.pad_id,
            )
            new = seq[:, ids.shape[1] :]  # (B, R): left padding puts every response in the same columns
            stopped = torch.isin(new, stops)  # (B, R)
            keep = response_validity(new, stops) & ~stopped
            texts += [tok.decode(row[k].tolist(), skip_special_tokens=True) for row, k in zip(new, keep)]
            finished += stopped.any(-1).tolist()
        return texts, finished

    def revise(self, prompts: list[str], responses: list[str], critiques: list[str]) -> list[str]:
        """The model's own revisions: greedy answers to a prompt showing the request, its response and the
        critique.

        The request is the last user turn only, so a secret in the context is not shown again. A revision cut
        off at max_new_tokens is no answer (small models loop): it comes back empty, and the template is used.
        """
        from neuraflux.world.generator import question_text

        template = self.settings.revision_prompt
        texts = [
            render_prompt([Message("user", template.format(request=question_text(p), response=r, critique=c))])
            for p, r, c in zip(prompts, responses, critiques, strict=True)
        ]
        revisions, finished = self.complete(texts, temperature=0.0)
        return [text if done else "" for text, done in zip(revisions, finished)]

    # ---- the data -----------------------------------------------------------------------------------------
    def refresh(self) -> ConstitutionalData:
        """Sample, critique, revise and rank for every training prompt; write the data, log its statistics."""
        start = time.perf_counter()
        k = self.settings.samples_per_prompt
        prompts = [p for p in self.trainer.datamodule.train_set for _ in range(k)]
        responses, _ = self.complete(prompts, self.sampling.temperature)
        revise = self.revise if self.settings.revise_with_model else None
        revisions = build_revisions(prompts, responses, revise, self.constitution, self.world)
        pairs = feedback_pairs(revisions, self.settings.max_pairs_per_prompt)
        self.data = ConstitutionalData(self.global_step, revisions, pairs)
        if self.trainer.is_global_zero:
            out = Path(self.out_dir) if self.out_dir else Path(self.trainer.default_root_dir) / "constitutional"
            write_jsonl(out / "revisions.jsonl", revision_records(revisions, self.global_step))
            write_jsonl(out / "ai_feedback.jsonl", feedback_records(pairs, self.global_step))
            if self.settings.feedback == "export":
                append_preferences(out / "preferences.jsonl", pairs)
        ids = [p.id for p in self.constitution.principles]
        metrics = {f"constitution/violation_rate/{k}": v for k, v in violation_rates(revisions, ids).items()}
        own = revision_from_model(revisions)
        if own is not None:
            metrics["constitution/revision_from_model"] = own
        metrics["constitution/pairs"] = float(len(pairs))
        metrics["time/refresh_s"] = time.perf_counter() - start
        self.log_once(metrics)
        log.info(
            "constitutional data at step %d: %d samples, any-violation rate %.3f, %d pairs (%.1f s)",
            self.global_step,
            len(revisions),
            metrics["constitution/violation_rate/any"],
            len(pairs),
            metrics["time/refresh_s"],
        )
        return self.data

    def needs_refresh(self) -> bool:
        if self.data is None:
            return True
        every = self.settings.refresh_every
        return every > 0 and self.global_step - self.data.step >= every

    def sft_batch(self, prompts: list[str]) -> LMBatch | None:
        """(prompt, revision) for every sample of the prompts, loss on the revision; None if there is none."""
        tok, limit = self.tokenizer, self.model.config.block_size + 1
        records = []
        for prompt in prompts:
            for revision in self.data.targets.get(prompt, []):
                s = fit_sequence(tok.encode(prompt), tok.encode(completion_text(revision)), limit)
                records.append({"ids": s.ids, "response_start": s.response_start})
        return make_sft_collate(tok.pad_id)(records) if records else None

    def dpo_step(self, pairs: list[FeedbackPair]) -> tuple[DPOOutput, Paired]:
        """DPO on the pairs: policy log-probs with gradient, the frozen reference's without. Returns the
        per-pair losses and rewards, and the policy's sequence log-probs."""
        examples = [PreferenceExample(p.prompt, p.chosen, p.rejected) for p in pairs]
        batch = collate_pairs(
            encode_pairs(self.tokenizer, examples, self.model.config.block_size), self.tokenizer.pad_id
        )
        batch = move_batch(batch, self.device)
        # right padded: under the causal mask no real token sees the pads, so no padding mask (as stage=dpo)
        policy = batch.pair(response_logprobs(self.model, batch.input_ids, batch.targets, batch.response_mask))
        ref = self.reference
        if ref.lm_head.weight.device != self.device:
            ref.to(self.device)  # not registered, so Lightning does not move it
        with torch.no_grad():
            reference = batch.pair(response_logprobs(ref, batch.input_ids, batch.targets, batch.response_mask))
        beta = self.settings.beta
        out = dpo_loss(policy.chosen, policy.rejected, reference.chosen, reference.rejected, beta=beta)
        return out, policy

    # ---- steps --------------------------------------------------------------------------------------------
    def training_step(self, batch: PromptBatch, batch_idx: int) -> torch.Tensor | None:
        if self.needs_refresh():
            self.refresh()
        metrics: dict[str, torch.Tensor] = {}
        losses = []
        sft = self.sft_batch(batch.texts)
        if sft is not None:
            sft = move_batch(sft, self.device)
            # right padded, so no padding mask is needed; pad targets are outside the loss mask
            sft_loss = masked_lm_loss(self.model, sft.input_ids, sft.targets, sft.loss_mask)
            losses.append(sft_loss)
            metrics["train/sft_loss"] = sft_loss.detach()
        pairs = [p for t in batch.texts for p in self.data.pairs_by_prompt.get(t, [])]
        if self.settings.feedback == "dpo" and pairs and self.settings.feedback_weight > 0:
            out, policy = self.dpo_step(pairs)
            dpo = out.losses.mean()
            losses.append(self.settings.feedback_weight * dpo)
            metrics["train/dpo_loss"] = dpo.detach()
            metrics.update(preference_metrics(Paired(out.chosen_rewards, out.rejected_rewards)))
            metrics["logps/chosen"] = policy.chosen.detach().mean()
            metrics["logps/rejected"] = policy.rejected.detach().mean()
        if not losses:
            return None  # nothing was built for these prompts (every revision empty): no step
        loss = torch.stack(losses).sum()
        check_finite(self.global_step, "train/loss", loss, metrics)
        if is_logging_step(self):
            self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
            self.log_once(metrics)
            log_lr(self)
        return loss

    def log_once(self, metrics: Mapping[str, torch.Tensor | float]) -> None:
        """Write metrics that exist on some steps only (a refresh, a batch with pairs) to the loggers now.

        Lightning re-sends every value logged with self.log on each later step until the epoch ends, and the
        prompt stream never ends an epoch: a refresh's statistics would repeat as if measured at every step.
        """
        values = {k: float(v) for k, v in metrics.items()}
        for logger in self.loggers:
            logger.log_metrics(values, step=self.global_step)

    def on_validation_epoch_start(self) -> None:
        self._val_counts = {"red_team": 0, "violating": 0, "other": 0, "helpfulness": 0.0}

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """Greedy responses to held-out prompts: violations on the red-team ones, helpfulness on the rest."""
        from neuraflux.world import helpfulness, schema

        c = self._val_counts
        for prompt, response in zip(batch.texts, self.complete(batch.texts, temperature=0.0)[0]):
            if self.world.parse_prompt(prompt).kind in schema.RED_TEAM_CATEGORIES:
                c["red_team"] += 1
                c["violating"] += bool(self.constitution.violations(prompt, response, self.world))
            else:
                c["other"] += 1
                c["helpfulness"] += helpfulness(prompt, response, self.world)

    def on_validation_epoch_end(self) -> None:
        c = self._val_counts
        if c["red_team"]:
            self.log("val/violation_rate", c["violating"] / c["red_team"], prog_bar=True, sync_dist=True)
        if c["other"]:
            self.log("val/helpfulness", c["helpfulness"] / c["other"], sync_dist=True)

    def setup(self, stage: str) -> None:
        check_rollout_fits(getattr(self.trainer, "datamodule", None), self.sampling.max_new_tokens, self.model)

    def configure_optimizers(self):
        # the reference is not a registered submodule: these are the policy's parameters only
        return configure_optimizers(self, self.optim, self.model.named_parameters())

    # ---- checkpoints --------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["neuraflux"]["constitutional_data"] = self.data.state() if self.data is not None else None

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # the reference came from stage.init_from in the constructor; the built data comes back from here
        state = checkpoint.get("neuraflux", {}).get("constitutional_data")
        self.data = ConstitutionalData.from_state(state) if state is not None else None
