"""The curriculum: stages chained through exported models, resumable, validated before training."""

import json

import pytest
from hydra import initialize_config_dir

from neuraflux.curriculum import CurriculumState, run_curriculum
from tests.conftest import CONF, TINY, compose_cfg

SMALL = [o for o in TINY if not o.startswith("trainer.max_steps")] + [
    "curriculum=world",  # pretrain + SFT + eval; the default (full) is tested below with its report
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "curriculum.overrides.pretrain=[]",
    "curriculum.overrides.sft=[]",
    "curriculum.eval_limit=3",
    "world.practice_entities=0",  # the default 500 practice entities only slow this chain test
]


def run(tmp_path, *extra):
    overrides = [*SMALL, f"paths.output_dir={tmp_path}", f"paths.run_dir={tmp_path / 'world' / 'run1'}", *extra]
    cfg = compose_cfg(tmp_path, *overrides, tiny=False)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return run_curriculum(cfg, overrides)


def test_two_stage_curriculum_end_to_end(tmp_path):
    result = run(tmp_path)
    parent = tmp_path / "world" / "run1"
    assert list(result["stages"]) == ["pretrain", "sft"]
    for stage in ("pretrain", "sft"):
        assert (parent / stage / "model" / "model.safetensors").is_file()
        assert (parent / stage / "tensorboard").is_dir()
        assert json.loads((parent / stage / "metrics.json").read_text())["global_step"] == 4
    sft_cfg = (parent / "sft" / "config.yaml").read_text()
    assert f"init_from: {parent / 'pretrain' / 'model'}" in sft_cfg
    assert (parent / "pretrain" / "model" / "tokenizer.json").read_text() == (
        parent / "sft" / "model" / "tokenizer.json"
    ).read_text()
    assert CurriculumState.load(parent).completed == ["pretrain", "sft"]
    assert set(json.loads((parent / "eval.json").read_text())["exact_match"]) == {"seen", "unseen", "unknown"}


def test_interrupted_curriculum_resumes_at_its_stage(tmp_path):
    run(tmp_path, "curriculum.eval=false")
    parent = tmp_path / "world" / "run1"
    # pretend the run died during sft: sft not completed, its model not exported
    state = CurriculumState.load(parent)
    state.completed = ["pretrain"]
    state.save(parent)
    pretrain_weights = (parent / "pretrain" / "model" / "model.safetensors").stat().st_mtime_ns
    (parent / "sft" / "model" / "model.safetensors").unlink()
    result = run(tmp_path, "resume=last", "curriculum.eval=false")
    assert list(result["stages"]) == ["pretrain", "sft"] and result["parent"] == parent
    assert (parent / "pretrain" / "model" / "model.safetensors").stat().st_mtime_ns == pretrain_weights
    assert (parent / "sft" / "model" / "model.safetensors").is_file()


def test_unknown_stage_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['bogus'\]; available: .*'pretrain'"):
        run(tmp_path, "curriculum.stages=[pretrain,bogus]")
    assert not (tmp_path / "world" / "run1" / "pretrain").exists()


def test_a_stage_listed_twice_fails_before_training_naming_it(tmp_path):
    # it used to be skipped as "already done": the second dpo never ran and nothing said so
    with pytest.raises(
        ValueError, match=r"curriculum.stages names 'sft' more than once \(\['pretrain', 'sft', 'sft'\]\)"
    ):
        run(tmp_path, "curriculum.stages=[pretrain,sft,sft]")
    assert not (tmp_path / "world" / "run1").exists()


def test_start_at_runs_the_tail(tmp_path):
    with pytest.raises(ValueError, match="curriculum.start_at='dpo' is not one of curriculum.stages"):
        run(tmp_path, "curriculum.start_at=dpo")


def test_stage_needing_a_reward_model_fails_before_training_without_one(tmp_path):
    with pytest.raises(ValueError, match="stage 'ppo' scores with a reward model but no 'reward' stage comes before"):
        run(
            tmp_path,
            "curriculum.stages=[pretrain,ppo]",
            "+curriculum.overrides.ppo=['stage.module.reward_source=both']",
        )
    assert not (tmp_path / "world" / "run1").exists()


def test_constraint_on_the_reward_model_needs_one_before_training(tmp_path):
    constrained = (
        "+curriculum.overrides.multitask=['stage.module.combine=lagrangian','stage.module.thresholds.reward_model=0.5']"
    )
    with pytest.raises(ValueError, match="stage 'multitask' scores with a reward model but no 'reward' stage"):
        run(tmp_path, "curriculum.stages=[pretrain,multitask]", constrained)
    assert not (tmp_path / "world" / "run1").exists()


def test_refining_stage_without_a_policy_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"stage 'dpo' refines a policy .* curriculum.init_from=PATH"):
        run(tmp_path, "curriculum.stages=[dpo]")
    with pytest.raises(ValueError, match="stage 'reward' starts from a policy but none comes before it"):
        run(tmp_path, "curriculum.stages=[reward,ppo]")
    assert not (tmp_path / "world" / "run1").exists()


def test_missing_reward_model_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="curriculum.reward_model: .*nowhere does not exist"):
        run(tmp_path, f"curriculum.reward_model={tmp_path / 'nowhere'}")


@pytest.mark.slow
def test_reward_stage_feeds_later_stages_and_does_not_break_the_policy_chain(tmp_path):
    ppo = "+curriculum.overrides.ppo=['stage.module.reward_source=reward_model','stage.module.max_new_tokens=8']"
    run(tmp_path, "curriculum.stages=[pretrain,reward,ppo]", "curriculum.eval=false", ppo)
    parent = tmp_path / "world" / "run1"
    ppo_cfg = (parent / "ppo" / "config.yaml").read_text()
    assert f"init_from: {parent / 'pretrain' / 'model'}" in ppo_cfg  # the policy, not the reward model
    assert f"reward_model: {parent / 'reward' / 'model'}" in ppo_cfg
    reward_cfg = (parent / "reward" / "config.yaml").read_text()
    assert f"init_from: {parent / 'pretrain' / 'model'}" in reward_cfg
    state = CurriculumState.load(parent)
    assert state.completed == ["pretrain", "reward", "ppo"] and set(state.wall_s) == set(state.completed)


@pytest.mark.slow
def test_full_curriculum_part_writes_the_report(tmp_path):
    """The default curriculum (full) cut to [sft, constitutional] on a tiny config: both stages measured, the
    report written with a row per stage and the targets read from the constitutional and final stages."""
    parent = tmp_path / "full" / "run1"
    overrides = [
        *[o for o in SMALL if o != "curriculum=world" and not o.startswith("curriculum.")],
        "curriculum.stages=[sft,constitutional]",
        "curriculum.overrides.sft=[]",
        "curriculum.overrides.constitutional=['stage.module.max_new_tokens=6','stage.module.samples_per_prompt=2']",
        "curriculum.report.eval_limit=2",
        "curriculum.report.max_new_tokens=4",
        "curriculum.report.red_team_samples=1",
        f"paths.output_dir={tmp_path}",
        f"paths.run_dir={parent}",
    ]
    cfg = compose_cfg(tmp_path, *overrides, tiny=False)
    assert cfg.curriculum.name == "full"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        result = run_curriculum(cfg, overrides)
    report = json.loads((parent / "report.json").read_text())
    assert result["report"] == report
    assert [row["stage"] for row in report["stages"]] == ["sft", "constitutional"]
    sft, const = (row["measure"] for row in report["stages"])
    assert sft["kl_to_sft"] == 0.0 and const["kl_to_sft"] >= 0.0  # the SFT model is the KL reference
    for m in (sft, const):
        assert 0.0 <= m["violation_rate"] <= 1.0 and m["val_ppl"] > 1.0
        assert set(m["judges"]) == {"helpfulness", "harmlessness", "honesty", "mean"}
    assert report["targets"]["violation_rate"]["value"] == const["violation_rate"]
    assert report["targets"]["helpfulness_unseen"]["value"] == const["exact_match"]["unseen"]["with_retrieval"]
    md = (parent / "report.md").read_text()
    assert "| sft |" in md and "| constitutional |" in md and "## Targets" in md
    assert f"init_from: {parent / 'sft' / 'model'}" in (parent / "constitutional" / "config.yaml").read_text()


def test_print_stages_shows_each_stages_composed_config_and_trains_nothing(tmp_path, capsys):
    from omegaconf import OmegaConf

    from neuraflux.run import run as run_job

    overrides = [*SMALL, "curriculum.print_stages=true", "curriculum.overrides.sft=['optim.lr=0.005']",
                 f"paths.output_dir={tmp_path}", f"paths.run_dir={tmp_path / 'world' / 'run1'}"]  # fmt: skip
    cfg = compose_cfg(tmp_path, *overrides, tiny=False)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        assert run_job(cfg, overrides) is None
    out = capsys.readouterr().out
    parts = out.split("# ---- stage ")[1:]
    assert [p.split(" ", 1)[0] for p in parts] == ["pretrain", "sft"]
    stages = {p.split(" ", 1)[0]: OmegaConf.create(p.split("\n", 1)[1]) for p in parts}
    assert stages["sft"].optim.lr == 0.005 and stages["pretrain"].optim.lr == cfg.optim.lr  # its own overrides
    assert stages["sft"].stage.name == "sft" and stages["sft"].trainer.max_steps == 4
    assert not (tmp_path / "world" / "run1").exists()  # nothing trained, nothing written
