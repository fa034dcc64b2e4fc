"""Training stages: LightningModules over the shared backbone, selected with `stage=...`."""

from neuraflux.stages.lm import CausalLMStage, lm_loss

__all__ = ["CausalLMStage", "lm_loss"]
