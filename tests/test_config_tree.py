"""Every option of every config group composes, resolves, and names importable targets (as litgpt tests its
config hub): a typo in a YAML fails here, not in a user's run."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from tests.conftest import CONF

# groups of the training config; `serve` configures the server (loaded by neuraflux.serve.config, tested there),
# `retrieval` the stores `neuraflux index` builds (retrieval.documents, tests/test_index.py), and `hydra` is Hydra's
# own run-directory settings
NOT_TRAINING = ("serve", "retrieval", "hydra")
TRAIN_GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in NOT_TRAINING)
OPTIONS = [(group, p.stem) for group in TRAIN_GROUPS for p in sorted((CONF / group).glob("*.yaml"))]
# a group that only a stage's defaults list pulls in is composed with that stage
NEEDS = {"constitution": ["stage=constitutional"]}


def targets(node) -> list[str]:
    """Every `_target_` string in a config tree."""
    if isinstance(node, DictConfig):
        found = [str(node["_target_"])] if "_target_" in node else []
        return found + [t for key in node for t in targets(node._get_node(key))]
    if isinstance(node, ListConfig):
        return [t for item in node for t in targets(item)]
    return []


def test_every_group_has_options_and_the_list_covers_them():
    assert {"model", "data", "stage", "trainer", "experiment", "debug", "curriculum"} <= set(TRAIN_GROUPS)
    assert ("model", "nano") in OPTIONS and ("trainer", "gpu") in OPTIONS and ("experiment", "char_cpu") in OPTIONS
    assert len(OPTIONS) >= 30


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_each_option_composes_resolves_and_names_importable_targets(tmp_path, group, option):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        overrides = [*NEEDS.get(group, []), f"{group}={option}", f"paths.output_dir={tmp_path}"]
        cfg = compose(config_name="config", overrides=[*overrides, f"paths.run_dir={tmp_path}/run"])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    found = targets(cfg)
    assert found, "a training config instantiates its stage, data, trainer, ..."
    for target in found:
        get_object(target)  # raises naming the target when it does not import


def test_debug_shrinks_whatever_the_stage_sets(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        plain = compose(config_name="config", overrides=["stage=reward"])
        debug = compose(config_name="config", overrides=["stage=reward", "debug=tiny"])
        # the command line still has the last word
        mine = compose(config_name="config", overrides=["stage=reward", "debug=tiny", "trainer.max_steps=9"])
    assert plain.trainer.max_steps == 150 and debug.trainer.max_steps == 6 and mine.trainer.max_steps == 9
    assert debug.model.n_layer == 2 and debug.world.n_entities == 20 and debug.callbacks.progress_bar is None


STAGES = sorted(p.stem for p in (CONF / "stage").glob("*.yaml"))


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_module_holds_exactly_its_constructors_settings(tmp_path, stage):
    # one home: the composed stage.module is the stage class's constructor settings, defaults included, so a value
    # the YAML does not set is the Python default and a key the class does not take cannot be set
    import inspect

    from hydra.utils import get_object

    from neuraflux.stages.schema import parameters

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"stage={stage}", f"paths.run_dir={tmp_path}"])
    module = OmegaConf.to_container(cfg.stage.module, resolve=False)
    target = get_object(module.pop("_target_"))
    init = target if inspect.isfunction(target) or inspect.ismethod(target) else target.__init__
    expected = parameters(init)
    if stage == "multitask":  # build() hands the rest to the chosen algorithm's class
        assert {"algorithm", "reinforce", "ppo", "temperature", "kl_coef"} <= set(module)
        module = {k: v for k, v in module.items() if k in expected}
    assert set(module) == set(expected)
    # and the stage's YAML sets only choices: interpolations, or values that differ from the Python default
    import dataclasses

    from neuraflux.stages.schema import schemas

    schema = schemas()["causal_lm" if stage in ("pretrain", "sft") else stage]
    defaults = {f.name: f.default for f in dataclasses.fields(schema) if f.default is not dataclasses.MISSING}
    raw = OmegaConf.load(CONF / "stage" / f"{stage}.yaml")
    own = raw.get("stage", raw).get("module", {})
    for key in own:
        value = own._get_node(key)._value()
        if isinstance(value, str) and value.startswith("${"):
            continue
        assert value != defaults.get(key) or key in ("weights", "thresholds"), f"{stage}.yaml repeats {key}={value}"


def test_a_misspelt_or_mistyped_stage_setting_fails_naming_the_key(tmp_path):
    from hydra.errors import ConfigCompositionException

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises(ConfigCompositionException) as typo:
            compose(config_name="config", overrides=["stage=ppo", "stage.module.kl_cof=0.1"])
        with pytest.raises(ConfigCompositionException) as wrong:
            compose(config_name="config", overrides=["stage=ppo", "stage.module.ppo_epochs=two"])
    assert "stage.module.kl_cof" in str(typo.value.__cause__ or typo.value)
    assert "ppo_epochs" in str(wrong.value.__cause__ or wrong.value)
