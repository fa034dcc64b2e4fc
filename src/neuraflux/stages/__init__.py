"""Training stages: LightningModules over the shared backbone, selected with `stage=...`."""

from neuraflux.model.reward import NanoRewardModel
from neuraflux.stages.constitutional import NanoConstitutionalAI
from neuraflux.stages.dpo import NanoDPO
from neuraflux.stages.grpo import NanoGRPO
from neuraflux.stages.kto import NanoKTO
from neuraflux.stages.lm import CausalLMStage, lm_loss, masked_lm_loss
from neuraflux.stages.multitask import NanoMultiTaskRL
from neuraflux.stages.ppo import NanoPPO
from neuraflux.stages.reinforce import NanoREINFORCE
from neuraflux.stages.reward import RewardModelStage

__all__ = [
    "CausalLMStage",
    "NanoConstitutionalAI",
    "NanoDPO",
    "NanoGRPO",
    "NanoKTO",
    "NanoMultiTaskRL",
    "NanoPPO",
    "NanoREINFORCE",
    "NanoRewardModel",
    "RewardModelStage",
    "lm_loss",
    "masked_lm_loss",
]
