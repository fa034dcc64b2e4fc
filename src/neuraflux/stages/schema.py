"""Each stage's settings have one home: the stage class's constructor, whose defaults are the tuned values.

`module_schema` turns a constructor's signature (after model, tokenizer and optimizer factory) into a dataclass,
registered with Hydra as a structured config in the `stage_module` group. A stage's YAML starts from it
(`- /stage_module@stage.module: ppo` in its defaults list) and holds only its choices: interpolations such as
`world: ${world}` and what that config sets differently. So `python train.py --cfg job` still shows every setting,
`stage.module.KEY=VALUE` still overrides it, a misspelt key or a value of the wrong type fails at composition
naming the key, and no default is written twice (the way litgpt and TRL keep a config beside each trainer).

Register the schemas before composing a config: `train.py`, the tests and the benches call `register()`.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Mapping
from typing import Any

GROUP = "stage_module"
RETRIEVAL_GROUP = "retrieval_schema"
# what train() passes to every stage: built objects, not settings
BUILT = ("self", "model", "tokenizer", "optim")


def _field_type(annotation: Any) -> Any:
    """The annotation as a type OmegaConf can check: scalars (optionally None) as they are, anything else (a
    mapping, a callable, a config node) as Any."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return typing.Optional[_field_type(inner[0])]  # noqa: UP045  (OmegaConf reads Optional)
        return Any
    if annotation in (str, int, float, bool):
        return annotation
    # mappings (a world config, judge weights) stay untyped: a typed node would resolve `${world}` while the stage
    # YAML is merged, before the root config holds `world`
    return Any


def parameters(init: Any) -> dict[str, tuple[Any, Any]]:
    """A constructor's settings: name -> (OmegaConf type, default), the built objects and **kwargs left out."""
    hints = typing.get_type_hints(init)
    out = {}
    for name, p in inspect.signature(init).parameters.items():
        if name in BUILT or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        typ = _field_type(hints.get(name, Any))
        if p.default is inspect.Parameter.empty:
            out[name] = (typing.Optional[typ] if typ is not Any else Any, None)  # noqa: UP045
        else:
            out[name] = (typ, p.default)
    return out


def _field(typ: Any, default: Any) -> tuple[Any, Any]:
    if isinstance(default, Mapping):  # a read-only default mapping becomes a fresh dict per config
        return typ, dataclasses.field(default_factory=lambda d=default: dict(d))
    if isinstance(default, list):
        return typ, dataclasses.field(default_factory=lambda d=default: list(d))
    return typ, dataclasses.field(default=default)


def module_schema(name: str, target: str, settings: dict[str, tuple[Any, Any]]) -> type:
    """A dataclass with `_target_` and the given settings (name -> (type, default))."""
    fields = [("_target_", str, dataclasses.field(default=target))]
    fields += [(key, *_field(typ, default)) for key, (typ, default) in settings.items()]
    return dataclasses.make_dataclass(name, fields)


def schema_of(cls: type) -> type:
    """The structured config of a stage class: its constructor's settings and its `_target_`."""
    return module_schema(f"{cls.__name__}Settings", f"{cls.__module__}.{cls.__qualname__}", parameters(cls.__init__))


# what multi-task RL passes through to either algorithm: sampling, the KL penalty and gradient clipping
SHARED_RL = (
    "temperature", "top_k", "top_p", "kl_estimator", "kl_controller", "kl_coef", "kl_target", "kl_horizon",
    "max_grad_norm",
)  # fmt: skip


def schemas() -> dict[str, type]:
    """The structured config of every stage, by the name a stage YAML selects it with."""
    from neuraflux.stages.constitutional import NanoConstitutionalAI
    from neuraflux.stages.dpo import NanoDPO
    from neuraflux.stages.grpo import NanoGRPO
    from neuraflux.stages.kto import NanoKTO
    from neuraflux.stages.lm import CausalLMStage
    from neuraflux.stages.multitask import NanoMultiTaskRL
    from neuraflux.stages.ppo import NanoPPO
    from neuraflux.stages.reinforce import NanoREINFORCE
    from neuraflux.stages.reward import RewardModelStage

    # multi-task RL: its own settings, the shared RL ones with REINFORCE's defaults, and each algorithm's own
    # settings (what PPO or REINFORCE has that the other has not, what GRPO has that both have not) under
    # `ppo` / `reinforce` / `grpo`
    reinforce, ppo = parameters(NanoREINFORCE.__init__), parameters(NanoPPO.__init__)
    common = set(reinforce) & set(ppo)
    settings = parameters(NanoMultiTaskRL)
    settings.update({k: reinforce[k] for k in SHARED_RL})
    settings["reinforce"] = (Any, {k: d for k, (_, d) in reinforce.items() if k not in common})
    settings["ppo"] = (Any, {k: d for k, (_, d) in ppo.items() if k not in common})
    settings["grpo"] = (Any, {k: d for k, (_, d) in parameters(NanoGRPO.__init__).items() if k not in common})
    return {
        "causal_lm": schema_of(CausalLMStage),
        "reward": schema_of(RewardModelStage),
        "dpo": schema_of(NanoDPO),
        "kto": schema_of(NanoKTO),
        "ppo": schema_of(NanoPPO),
        "reinforce": schema_of(NanoREINFORCE),
        "grpo": schema_of(NanoGRPO),
        "constitutional": schema_of(NanoConstitutionalAI),
        "multitask": module_schema("NanoMultiTaskRLSettings", "neuraflux.stages.multitask.NanoMultiTaskRL", settings),
    }


def register() -> None:
    """Put every stage schema, and the retrieval settings' schema, in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    from neuraflux.retrieval.documents import retrieval_schema

    store = ConfigStore.instance()
    for name, node in schemas().items():
        store.store(group=GROUP, name=name, node=node)
    # the `retrieval` group's keys and defaults (RetrievalSettings), under conf/retrieval/default.yaml
    store.store(group=RETRIEVAL_GROUP, name="settings", node=retrieval_schema())
