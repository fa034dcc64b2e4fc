"""Multi-task RL (`stage=multitask`): a composite reward handed to PPO, REINFORCE or GRPO.

Every training rollout is scored by each component of `feedback.rewards.COMPONENTS` (the three world judges,
the reward model when one is given, a length and a format term), and the components are combined into one
scalar per response by `combine`, each component first standardised, z_i = (r_i - mean_i) / std_i, by its running
moments over the stage's training rollouts (so a weight is a share of the signal, whatever the component's scale):

* `weighted_sum`: r = sum_i w_i z_i / sum_i w_i;
* `lagrangian`: maximise E[that] subject to E[r_j] >= c_j (`thresholds` on the raw component, e.g. harmlessness
  >= 0.95): the policy maximises r = sum_i w_i z_i / sum_i w_i + sum_j lambda_j (r_j - c_j), and after each step
  every multiplier takes a projected dual-ascent step,
  lambda_j <- clip(lambda_j + lagrange_lr (c_j - mean r_j), 0, lagrange_max).

`NanoMultiTaskRL(...)` builds that `CompositeReward` and returns the stage `algorithm` names, `NanoREINFORCE`
(a leave-one-out baseline), `NanoPPO` or `NanoGRPO`, with the composite as its reward; their own settings sit under
`stage.module.reinforce` / `stage.module.ppo` / `stage.module.grpo` (GRPO's KL term is its own `grpo.beta`, so
the shared `kl_*` settings are refused with it). Those stages log any composite's parts: `reward/<component>` (the
rollout's raw mean), `reward_mean/<component>` and `reward_std/<component>` (the moments it was standardised by),
`lagrange/<component>` (the multipliers that scored the step), and `val/<component>` of the greedy validation
responses; `objective/reward` is the composite. Multipliers and moments are saved in the checkpoint and restored
on resume.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from neuraflux.feedback.rewards import make_composite
from neuraflux.feedback.rollout import SamplingSettings
from neuraflux.model import NanoLM
from neuraflux.optim import OptimizerFactory
from neuraflux.stages.grpo import NanoGRPO
from neuraflux.stages.ppo import NanoPPO
from neuraflux.stages.reinforce import NanoREINFORCE
from neuraflux.world.judges import JUDGES

ALGORITHMS: dict[str, type[NanoREINFORCE | NanoPPO | NanoGRPO]] = {
    "reinforce": NanoREINFORCE,
    "ppo": NanoPPO,
    "grpo": NanoGRPO,
}
# the KL penalty REINFORCE and PPO share; GRPO's is a k3 loss term weighted by its own `beta`
KL_SETTINGS = ("kl_estimator", "kl_controller", "kl_coef", "kl_target", "kl_horizon")


def NanoMultiTaskRL(  # noqa: N802  (named as the stage it builds; a factory, not a subclass)
    model: NanoLM,
    tokenizer,
    optim: OptimizerFactory,
    algorithm: str = "reinforce",  # reinforce | ppo | grpo; their own settings under stage.module.<algorithm>
    reinforce: Mapping | None = None,
    ppo: Mapping | None = None,
    grpo: Mapping | None = None,
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
    **shared,  # sampling, KL and max_grad_norm: the settings both algorithms have
) -> NanoREINFORCE | NanoPPO | NanoGRPO:
    """The `algorithm` stage optimising the composite reward; every multi-task setting is checked before the
    reference policy, the world or a reward model is loaded."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"stage.module.algorithm must be one of {list(ALGORITHMS)}, got {algorithm!r}")
    specific = dict({"reinforce": reinforce, "ppo": ppo, "grpo": grpo}[algorithm] or {})
    clash = sorted(set(specific) & (set(shared) | {"max_new_tokens", "name", "reference_path"}))
    if clash:
        raise ValueError(f"stage.module.{algorithm} repeats {clash}, already set directly under stage.module")
    if algorithm == "grpo":
        # the config carries the shared KL settings at REINFORCE's defaults: any other value would be ignored
        defaults = inspect.signature(NanoREINFORCE.__init__).parameters
        changed = [k for k in KL_SETTINGS if k in shared and shared[k] != defaults[k].default]
        if changed:
            raise ValueError(
                f"stage.module.{changed[0]} does not apply to algorithm=grpo: its KL term is k3 in the loss, "
                "weighted by stage.module.grpo.beta"
            )
        shared = {k: v for k, v in shared.items() if k not in KL_SETTINGS}
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
    return ALGORITHMS[algorithm](
        model,
        tokenizer,
        optim,
        name=name,
        reference_path=reference_path,
        reward_fn=reward,
        max_new_tokens=max_new_tokens,
        **shared,
        **specific,
    )
