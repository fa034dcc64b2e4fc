"""A user's mistake (a setting, a path, a damaged file) reaches the terminal as one line `error: <message>` naming
it, exit status 1, never a traceback through Hydra and Lightning; a bug keeps its traceback. Shapes a config.json
or a command line cannot mean are refused before anything is allocated."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from neuraflux.model import NanoConfig, NanoLM
from neuraflux.run import user_errors_exit
from neuraflux.tokenizer import NanoTokenizer
from neuraflux.train import train
from tests.test_train import run_cli


def one_line_error(out) -> str:
    """The error line of a `python train.py` that failed on a user's mistake; asserts there is nothing more."""
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    # at most one line of Lightning's before it ("Seed set to 1337"), from runs that fail after seeding
    lines = out.stderr.strip().splitlines()
    assert len(lines) <= 2 and lines[-1].startswith("error: "), out.stderr[-3000:]
    return lines[-1]


def tiny_model_dir(cfg, path):
    """An untrained model with the composed config's shapes, and a character tokenizer: a stage.init_from."""
    model = NanoLM(NanoConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True)))
    return model.save_pretrained(path, NanoTokenizer.train(["the river folk"], 0, mode="char"))


def test_a_setting_of_the_wrong_type_is_one_line_naming_it(tmp_path):
    out = run_cli("debug=tiny", "curriculum=none", f"paths.output_dir={tmp_path}", "trainer.max_steps=abc")
    assert one_line_error(out) == "error: trainer.max_steps must be an integer, got 'abc'"
    assert list(tmp_path.iterdir()) == []  # no stub run directory: Hydra's files of the refused job are removed


def test_a_curriculum_checks_every_stage_before_it_writes_anything(tmp_path):
    out = run_cli("debug=tiny", f"paths.output_dir={tmp_path}", "trainer.max_steps=abc")
    assert one_line_error(out) == "error: stage pretrain: trainer.max_steps must be an integer, got 'abc'"
    assert list(tmp_path.iterdir()) == []  # no curriculum.json that resume=last would take for an interrupted run
    # a run directory that holds a run's files is never removed
    keep = tmp_path / "none" / "2026-01-01_00-00-00"
    (keep / ".hydra").mkdir(parents=True)
    (keep / "metrics.json").write_text("{}")
    from neuraflux.run import remove_stub

    remove_stub(keep)
    assert (keep / "metrics.json").is_file()


def test_a_stage_setting_refused_by_the_stage_is_one_line_naming_it(tiny_cfg, tmp_path):
    model_dir = tiny_model_dir(tiny_cfg("curriculum=none", "stage=dpo"), tmp_path / "m")
    out = run_cli("debug=tiny", "curriculum=none", "stage=dpo", f"stage.init_from={model_dir}",
                  f"paths.output_dir={tmp_path}", "stage.module.rpo_alpha=-1")  # fmt: skip
    assert one_line_error(out) == "error: stage.module.rpo_alpha must be >= 0 or null, got -1.0"


def test_a_damaged_model_file_given_as_init_from_is_one_line_naming_it(tiny_cfg, tmp_path):
    model_dir = tiny_model_dir(tiny_cfg("curriculum=none", "stage=sft"), tmp_path / "m")
    config = model_dir / "config.json"
    config.write_text(config.read_text().replace('"vocab_size": 512', '"vocab_size": 1000000000000'))
    out = run_cli("debug=tiny", "curriculum=none", "stage=sft", f"stage.init_from={model_dir}",
                  f"paths.output_dir={tmp_path}")  # fmt: skip
    assert one_line_error(out) == (
        f"error: stage.init_from: {config}: model.vocab_size must be <= 2,097,152, got 1,000,000,000,000"
    )


def test_user_errors_become_one_line_and_bugs_keep_their_traceback(monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    for err in (ValueError("optim.lr must be > 0"), FileNotFoundError("data.path: x.txt not found")):
        with pytest.raises(SystemExit) as exit_, user_errors_exit():
            raise err
        assert exit_.value.code == f"error: {err}"  # printed to stderr, exit status 1
    for bug in (AttributeError("'NoneType' object has no attribute 'model'"), KeyError("model"), TypeError("x")):
        with pytest.raises(type(bug)), user_errors_exit():
            raise bug
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # as for Hydra's own errors: the whole traceback, on request
    with pytest.raises(ValueError, match="optim.lr"), user_errors_exit():
        raise ValueError("optim.lr must be > 0")


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.max_steps=abc", "trainer.max_steps must be an integer, got 'abc'"),
        ("+trainer.max_step=10", "trainer.max_step is not a setting of pytorch_lightning.Trainer"),
        ("trainer.max_steps=null", "trainer.max_steps must be a positive integer (training length), got None"),
        ("trainer.accumulate_grad_batches=2.5", "trainer.accumulate_grad_batches must be an integer, got 2.5"),
        ("trainer.log_every_n_steps=often", "trainer.log_every_n_steps must be an integer, got 'often'"),
        ("trainer.val_check_interval=sometimes", "trainer.val_check_interval must be a number, got 'sometimes'"),
        ("trainer.gradient_clip_val=true", "trainer.gradient_clip_val must be a number, got True"),
        ("data.block_size=long", "data.block_size must be an integer, got 'long'"),
        ("model.dropout=abc", "model.dropout must be a number, got 'abc'"),
        ("+model.pad_token_id=first", "model.pad_token_id must be an integer, got 'first'"),
        ("model.vocab_size=1000000000000", "model.vocab_size must be <= 2,097,152, got 1,000,000,000,000"),
        ("trainer.devices=abc", "trainer.devices must be a count, a list of device indices or 'auto', got 'abc'"),
        ("+data.bogus=1", "data.bogus is not a setting of neuraflux.data.LMDataModule"),
        ("+optim.momentum=0.9", "optim.momentum is not a setting of neuraflux.optim.OptimizerFactory"),
    ],
)
def test_a_setting_of_the_wrong_type_is_named_before_anything_is_written(tiny_cfg, tmp_path, override, message):
    with pytest.raises(ValueError) as err:
        train(tiny_cfg(override))
    assert str(err.value) == message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "sizes, message",
    [
        ({"n_layer": 10**6}, "model.n_layer must be <= 1,024, got 1,000,000"),
        ({"n_embd": 2**20, "n_head": 1}, "model.n_embd must be <= 65,536, got 1,048,576"),
        ({"block_size": 2**21, "max_position_embeddings": 2**21}, "model.block_size must be <= 1,048,576"),
        # every size allowed alone; together (2M + 64) x 65k embeddings and 12 x 65k^2 in the layer: 189 billion
        (
            {"vocab_size": 2**21, "n_embd": 2**16, "n_head": 1},
            "model.vocab_size=2097152, model.n_embd=65536, model.n_layer=1 and model.max_position_embeddings=64 "
            "make about 188,982,755,328 parameters, more than the 10,000,000,000 a NanoConfig allows",
        ),
    ],
)
def test_a_shape_too_large_to_mean_anything_is_refused_before_allocating(sizes, message):
    with pytest.raises(ValueError) as err:
        NanoConfig(**{"vocab_size": 64, "block_size": 64, "max_position_embeddings": 64, "n_layer": 1, "n_head": 2,
                      "n_embd": 8, **sizes})  # fmt: skip
    assert str(err.value).startswith(message)


@pytest.mark.parametrize(
    "override, message",
    [
        ("retrieval.index=annoy", "retrieval.index must be one of flat, ivf, hnsw, got 'annoy'"),
        ("retrieval.k=0", "retrieval.k must be a positive integer, got 0"),
        ("+retrieval.index_params.nlist=8",
         "retrieval.index_params: index 'flat' has no settings ['nlist']; its settings are []"),
        ("retrieval.embedder.type=bag", "retrieval.embedder: embedder config needs 'type', one of ['backbone', "
         "'lexical']; got {'type': 'bag'}"),
    ],
)  # fmt: skip
def test_a_bad_retrieval_setting_is_named_before_anything_is_written(tiny_cfg, tmp_path, override, message):
    # the reward stage retrieves context from the world store the `retrieval` group describes
    with pytest.raises(ValueError) as err:
        train(tiny_cfg("curriculum=none", "stage=reward", override))
    assert str(err.value) == message
    assert not (tmp_path / "run").exists()


def test_a_curriculum_checks_the_retrieval_settings_before_it_writes_anything(tmp_path):
    from hydra import compose, initialize_config_dir

    from neuraflux.curriculum import run_curriculum
    from tests.conftest import CONF

    overrides = ["debug=tiny", "retrieval.index=annoy", f"paths.output_dir={tmp_path}", f"paths.run_dir={tmp_path}/c"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises(ValueError) as err:
            run_curriculum(compose(config_name="config", overrides=overrides), overrides)
    assert str(err.value) == "stage pretrain: retrieval.index must be one of flat, ivf, hnsw, got 'annoy'"
    assert not (tmp_path / "c").exists()
