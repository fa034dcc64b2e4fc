"""Multi-task RL from a composite reward (`stage=multitask`): several reward signals, one policy update.

Every training rollout is scored by each component of `feedback.rewards.COMPONENTS` (the three world judges,
the reward model when one is given, a length and a format term), and the components are combined into one
scalar per response by `combine`, each component first standardised, z_i = (r_i - mean_i) / std_i, by its running
moments over the stage's training rollouts (so a weight is a share of the signal, whatever the component's scale):

* `weighted_sum`: r = sum_i w_i z_i / sum_i w_i;
* `lagrangian`: maximise E[that] subject to E[r_j] >= c_j (`thresholds` on the raw component, e.g. harmlessness
  >= 0.95): the policy maximises r = sum_i w_i z_i / sum_i w_i + sum_j lambda_j (r_j - c_j), and after each step
  every multiplier takes a projected dual-ascent step,
  lambda_j <- clip(lambda_j + lagrange_lr (c_j - mean r_j), 0, lagrange_max).

The update is the existing machinery, picked by `algorithm`: REINFORCE with a leave-one-out baseline
(`NanoREINFORCE`) or PPO (`NanoPPO`); their own settings sit under `stage.module.reinforce` / `stage.module.ppo`.
On top of what the algorithm logs, each step logs `reward/<component>` (the rollout's raw mean),
`reward_mean/<component>` and `reward_std/<component>` (the moments it was standardised by), `reward/composite` and
`lagrange/<component>` (the multipliers that scored the step); validation logs `val/<component>` of the greedy
responses. Multipliers and moments are saved in the checkpoint and restored on resume.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from neuraflux.data.prompts import PromptBatch
from neuraflux.feedback.rewards import CompositeReward, make_composite
from neuraflux.feedback.rollout import SamplingSettings
from neuraflux.model import NanoLM
from neuraflux.optim import OptimizerFactory
from neuraflux.stages.ppo import NanoPPO
from neuraflux.stages.reinforce import NanoREINFORCE
from neuraflux.world.judges import JUDGES


class NanoMultiTaskRL:
    """The composite reward and its logging, mixed in before an RL stage (`MultiTaskREINFORCE`, `MultiTaskPPO`).

    Build from a config with `NanoMultiTaskRL.build(algorithm=...)`; every multi-task setting is checked before
    the reference policy, the world or a reward model is loaded.
    """

    algorithm: str  # set by each concrete stage; stored in checkpoints so a resume cannot switch it

    def __init__(
        self,
        model: NanoLM,
        tokenizer,
        optim: OptimizerFactory,
        name: str = "multitask",
        reference_path: str | None = None,
        reward_model_path: str | None = None,
        world: Mapping | None = None,
        weights: Mapping[str, float] | None = None,
        combine: str = "weighted_sum",  # weighted_sum | lagrangian
        thresholds: Mapping[str, float] | None = None,
        lagrange_lr: float = 1.0,  # dual ascent step: lambda <- clip(lambda + lr * (threshold - mean), 0, max)
        lagrange_max: float = 10.0,
        lagrange_init: float = 0.0,
        # length term: 1 up to this many response tokens, down to 0 at max_new_tokens (and 0 when cut off)
        length_target: int = 24,
        # format term: half for ending with the stop token, half for repeating no word n-gram of this size
        format_ngram: int = 5,
        max_new_tokens: int = 32,
        **algorithm_settings,
    ):
        SamplingSettings(max_new_tokens)  # checked first: the length term's range depends on it
        reward = make_composite(
            tokenizer,
            world,
            dict(weights if weights is not None else dict.fromkeys(JUDGES, 1.0)),
            combine,
            dict(thresholds or {}),
            reward_model_path,
            max_new_tokens,
            length_target,
            format_ngram,
            lagrange_lr,
            lagrange_max,
            lagrange_init,
        )
        super().__init__(
            model,
            tokenizer,
            optim,
            name=name,
            reference_path=reference_path,
            reward_fn=reward.fn,
            max_new_tokens=max_new_tokens,
            **algorithm_settings,
        )
        # The base stage saw only a callable: hand it the reward model so it is frozen-and-moved with the reference.
        self.frozen.reward_model = reward.reward_model

    @property
    def reward(self) -> CompositeReward:
        """The composite the algorithm scores with (`reward_fn`, a submodule: its moments are checkpointed)."""
        return self.reward_fn

    @classmethod
    def build(
        cls,
        model: NanoLM,
        tokenizer,
        optim: OptimizerFactory,
        algorithm: str = "reinforce",  # reinforce | ppo; their own settings under stage.module.reinforce / .ppo
        reinforce: Mapping | None = None,
        ppo: Mapping | None = None,
        **settings,
    ) -> MultiTaskREINFORCE | MultiTaskPPO:
        """The stage for `stage.module.algorithm`, with that algorithm's own settings (`stage.module.<algorithm>`)."""
        if algorithm not in ALGORITHMS:
            raise ValueError(f"stage.module.algorithm must be one of {list(ALGORITHMS)}, got {algorithm!r}")
        specific = dict({"reinforce": reinforce, "ppo": ppo}[algorithm] or {})
        clash = sorted(set(specific) & set(settings))
        if clash:
            raise ValueError(f"stage.module.{algorithm} repeats {clash}, already set directly under stage.module")
        return ALGORITHMS[algorithm](model, tokenizer, optim, **settings, **specific)

    def training_step(self, batch: PromptBatch, batch_idx: int) -> Tensor | None:
        out = super().training_step(batch, batch_idx)
        # The algorithm's step scored exactly one rollout with the composite: its components are in `last`.
        means = self.reward.last.means()
        moments = self.reward.moments
        self.log_dict(
            {
                **{f"reward/{name}": value for name, value in means.items()},
                "reward/composite": self.reward.last.reward.mean(),
                **{f"lagrange/{name}": value for name, value in self.reward.multipliers.items()},
                # what each component is standardised by (its running mean and std, this rollout included)
                **{f"reward_mean/{n}": float(m) for n, m in zip(self.reward.names, moments.mean, strict=True)},
                **{f"reward_std/{n}": float(s) for n, s in zip(self.reward.names, moments.std, strict=True)},
            },
            on_step=True,
            on_epoch=False,
        )
        self.reward.update_multipliers(means)
        return out

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)  # greedy responses scored by the composite: val/reward
        B = len(batch)
        for name, values in self.reward.last.values.items():
            self.log(f"val/{name}", values.mean(), on_epoch=True, batch_size=B)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["neuraflux"]["multitask"] = {
            "algorithm": self.algorithm,
            "multipliers": dict(self.reward.multipliers),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint["neuraflux"].get("multitask", {})
        if saved.get("algorithm", self.algorithm) != self.algorithm:
            raise ValueError(
                f"resume: the checkpoint was trained with stage.module.algorithm={saved['algorithm']}, "
                f"not {self.algorithm}"
            )
        multipliers = saved.get("multipliers", {})
        if set(multipliers) != set(self.reward.multipliers):
            raise ValueError(
                f"resume: the checkpoint has Lagrange multipliers for {sorted(multipliers)} but "
                f"stage.module.thresholds constrains {sorted(self.reward.multipliers)}"
            )
        self.reward.multipliers = {k: float(v) for k, v in multipliers.items()}


class MultiTaskREINFORCE(NanoMultiTaskRL, NanoREINFORCE):
    """The composite reward optimised with RLOO: k samples per prompt, leave-one-out baseline, KL shaping.

    Gradients are clipped to `max_grad_norm` (stage.module.reinforce.max_grad_norm), as PPO clips to its own,
    so that one stage config leaves trainer.gradient_clip_val unset for both algorithms (PPO's manual
    optimization refuses it).
    """

    algorithm = "reinforce"

    def __init__(self, *args, max_grad_norm: float = 1.0, **kwargs):
        if max_grad_norm is None or max_grad_norm <= 0:
            raise ValueError(f"stage.module.reinforce.max_grad_norm must be > 0, got {max_grad_norm}")
        super().__init__(*args, **kwargs)
        self.max_grad_norm = float(max_grad_norm)

    def setup(self, stage: str) -> None:
        if self.trainer.gradient_clip_val:
            raise ValueError(
                f"stage {self.name} clips with stage.module.reinforce.max_grad_norm; leave "
                f"trainer.gradient_clip_val unset (got {self.trainer.gradient_clip_val})"
            )
        super().setup(stage)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")


class MultiTaskPPO(NanoMultiTaskRL, NanoPPO):
    """The composite reward optimised with PPO: value head, GAE, clipped updates."""

    algorithm = "ppo"


ALGORITHMS: dict[str, type[NanoMultiTaskRL]] = {"reinforce": MultiTaskREINFORCE, "ppo": MultiTaskPPO}
