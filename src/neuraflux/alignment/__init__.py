"""The alignment math: losses, advantage estimators, masked statistics and KL control as pure tensor functions.

Stages in `neuraflux.stages` call these; nothing here knows about trainers, loggers or models.
"""

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
    "DPO_LOSS_TYPES",
    "IGNORE_INDEX",
    "KL_KINDS",
    "AdaptiveKLController",
    "DPOOutput",
    "FixedKLController",
    "GAEOutput",
    "LossOutput",
    "PolicyLossOutput",
    "ValueLossOutput",
    "dpo_loss",
    "gae",
    "kl_penalty",
    "leave_one_out_baseline",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reward_loss",
    "response_logprobs",
    "sequence_logprobs",
    "token_logprobs",
]
