"""The alignment math as pure tensor functions: losses, advantage estimators, masked statistics, KL control and
the combination of several rewards (`combine`).

Stages in `neuraflux.stages` and the reward sources in `neuraflux.feedback` call these; nothing here knows about
trainers, loggers, models, tokenizers or files.
"""

from neuraflux.alignment.combine import combine_weighted, dual_ascent_step, lagrangian, length_score
from neuraflux.alignment.grpo import (
    GRPO_LOSS_AGGREGATIONS,
    GRPOLossOutput,
    aggregate_tokens,
    group_advantages,
    grpo_loss,
)
from neuraflux.alignment.kto import KTOOutput, kto_loss, kto_reference_point
from neuraflux.alignment.losses import (
    DPO_LOSS_TYPES,
    IGNORE_INDEX,
    DPOOutput,
    GAEOutput,
    LossOutput,
    PolicyLossOutput,
    ValueLossOutput,
    dpo_loss,
    gae,
    leave_one_out_baseline,
    ppo_policy_loss,
    ppo_value_loss,
    response_logprobs,
    reward_loss,
    sequence_logprobs,
    token_logprobs,
)
from neuraflux.alignment.stats import (
    KL_KINDS,
    AdaptiveKLController,
    FixedKLController,
    kl_penalty,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

__all__ = [
    "AdaptiveKLController",
    "DPOOutput",
    "DPO_LOSS_TYPES",
    "FixedKLController",
    "GAEOutput",
    "GRPOLossOutput",
    "GRPO_LOSS_AGGREGATIONS",
    "IGNORE_INDEX",
    "KL_KINDS",
    "KTOOutput",
    "LossOutput",
    "PolicyLossOutput",
    "ValueLossOutput",
    "aggregate_tokens",
    "combine_weighted",
    "dpo_loss",
    "dual_ascent_step",
    "gae",
    "group_advantages",
    "grpo_loss",
    "kl_penalty",
    "kto_loss",
    "kto_reference_point",
    "lagrangian",
    "leave_one_out_baseline",
    "length_score",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "ppo_policy_loss",
    "ppo_value_loss",
    "response_logprobs",
    "reward_loss",
    "sequence_logprobs",
    "token_logprobs",
]
