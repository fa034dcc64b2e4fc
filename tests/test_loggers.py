"""logger=tensorboard|csv|mlflow|many: every logger gets the run's scalars and the diagnostics; FLOPs/s and MFU
beside tokens/s; what `python train.py` returns (the stage's optimized_metric) for a sweeper."""

from __future__ import annotations

import csv
import json
import re
import sys
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import (
    HISTOGRAMS,
    IMAGES,
    SCALARS,
    TENSORS,
    EventAccumulator,
)
from tensorboard.util import tensor_util

from neuraflux.callbacks.sinks import table_markdown
from neuraflux.callbacks.throughput import ThroughputMonitor
from neuraflux.loggers import MLFLOW_MISSING, build_loggers
from neuraflux.sweep import summarize
from neuraflux.train import build, objective, train
from tests.conftest import CONF, compose_cfg

# the diagnostics that debug=tiny switches off, back on every 3 steps of its 6
DIAGNOSTICS = [
    "+callbacks.attention_maps={_target_:neuraflux.callbacks.AttentionMapLogger,every_n_steps:3,text:'The river',"
    "layers:[0]}",
    "+callbacks.gradient_flow={_target_:neuraflux.callbacks.GradientFlowLogger,every_n_steps:3}",
    "+callbacks.text_samples={_target_:neuraflux.callbacks.TextSampleLogger,every_n_steps:3,prompts:['<|bos|>'],"
    "max_new_tokens:4}",
]


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---- building the loggers ----------------------------------------------------------------------------------
def test_each_logger_config_builds_its_loggers(tiny_cfg, tmp_path, monkeypatch):
    def kinds(name: str) -> list[str]:
        return [type(lg).__name__ for lg in build_loggers(tiny_cfg(f"logger={name}").logger, build)]

    assert kinds("tensorboard") == ["TensorBoardLogger"]
    assert kinds("csv") == ["CSVLogger"]
    assert build_loggers(tiny_cfg("~logger").get("logger"), build) is False
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if MLflow were not installed
    assert kinds("many") == ["TensorBoardLogger", "CSVLogger"]  # many takes MLflow only when it is there
    with pytest.raises(ValueError, match=f"^{re.escape(MLFLOW_MISSING)}$"):
        kinds("mlflow")
    with pytest.raises(ValueError, match=f"^{re.escape(MLFLOW_MISSING)}$"):  # refused before anything is written
        train(tiny_cfg("logger=mlflow"))
    assert not (tmp_path / "run").exists()


def test_mlflow_logger_defaults_to_a_file_store_in_the_run_directory(tiny_cfg, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (logger,) = build_loggers(tiny_cfg("logger=mlflow").logger, build)
    assert logger._tracking_uri == (tmp_path / "run" / "mlruns").as_uri()
    (logger,) = build_loggers(tiny_cfg("logger=mlflow", "logger.tracking_uri=file:///elsewhere").logger, build)
    assert logger._tracking_uri == "file:///elsewhere"


# ---- one run with logger=many: each logger gets the same values --------------------------------------------
@pytest.fixture(scope="module")
def many(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("many")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on two shared, busy cores run the tiny model slower than one
    try:
        metrics, objects = train(compose_cfg(tmp_path, "logger=many", *DIAGNOSTICS))
    finally:
        torch.set_num_threads(threads)
    return metrics, objects["run_dir"], objects["trainer"]


def test_tensorboard_gets_scalars_images_histograms_and_text(many):
    _, run_dir, _ = many
    sizes = {SCALARS: 0, IMAGES: 0, HISTOGRAMS: 0, TENSORS: 0}
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance=sizes)
    acc.Reload()
    assert len(acc.Scalars("train/loss")) == 6
    # at the start, then every 3 steps (6 is also the end)
    assert [e.step for e in acc.Images("attention/layer0")] == [0, 3, 6]
    assert [e.step for e in acc.Images("attention_raw/layer0")] == [0, 3, 6]
    assert [e.step for e in acc.Histograms("grad_hist/layer1")] == [0, 3]
    assert [e.step for e in acc.Tensors("samples/text_summary")] == [0, 3, 6]


def test_csv_gets_the_same_scalars_images_tables_and_histograms(many):
    _, run_dir, _ = many
    rows = read_csv(run_dir / "csv" / "metrics.csv")
    assert len([r for r in rows if r["train/loss"]]) == 6
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={SCALARS: 0, TENSORS: 0})
    acc.Reload()
    # the diagnostics' scalars, as TensorBoard has them
    tensorboard = {e.step: e.value for e in acc.Scalars("grad_norm/layer0")}
    written = {int(r["step"]): float(r["grad_norm/layer0"]) for r in rows if r["grad_norm/layer0"]}
    assert written == pytest.approx(tensorboard, rel=1e-6)
    images = run_dir / "csv" / "images"
    assert sorted(p.name for p in (images / "attention" / "layer0").glob("*.png")) == [
        "step_000000.png",
        "step_000003.png",
        "step_000006.png",
    ]
    from PIL import Image

    raw = Image.open(images / "attention_raw" / "layer0" / "step_000006.png")
    T = raw.size[1] // 4  # the probe's tokens, four pixels each (AttentionMapLogger's default)
    assert raw.mode == "L" and raw.size == ((2 * T + 1) * 4, T * 4)  # two heads and a one-token gap
    # the samples: a table of rows, whose markdown is what TensorBoard shows
    samples = read_csv(run_dir / "csv" / "samples.csv")
    assert [r["step"] for r in samples] == ["0", "3", "6"] and {r["prompt"] for r in samples} == {"<|bos|>"}
    last = tensor_util.make_ndarray(acc.Tensors("samples/text_summary")[-1].tensor_proto).item().decode()
    assert last == table_markdown([{"prompt": samples[-1]["prompt"], "sample": samples[-1]["sample"]}])
    histograms = [json.loads(line) for line in (run_dir / "csv" / "histograms.jsonl").read_text().splitlines()]
    assert {(h["step"], h["tag"]) for h in histograms} == {(s, f"grad_hist/layer{i}") for s in (0, 3) for i in (0, 1)}
    for h in histograms:
        assert sum(h["counts"]) == h["num"] and len(h["edges"]) == len(h["counts"]) + 1
        if h["tag"] == "grad_hist/layer0":  # its sum of squares is the squared norm logged beside it
            assert h["sum_squares"] ** 0.5 == pytest.approx(written[h["step"]], rel=1e-4)


def test_mlflow_gets_the_metrics_and_artifacts(many):
    pytest.importorskip("mlflow")
    _, run_dir, trainer = many
    from pytorch_lightning.loggers import MLFlowLogger

    (logger,) = [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]
    client = logger.experiment
    assert len(client.get_metric_history(logger.run_id, "train/loss")) == 6
    assert [m.step for m in client.get_metric_history(logger.run_id, "grad_norm/layer0")] == [0, 3]
    store = run_dir / "mlruns"
    (artifacts,) = store.glob(f"*/{logger.run_id}/artifacts")
    assert {p.name for p in (artifacts / "attention" / "layer0").iterdir()} == {
        "step_000000.png",
        "step_000003.png",
        "step_000006.png",
    }
    table = json.loads((artifacts / "samples" / "step_000006.json").read_text())
    assert table["columns"] == ["prompt", "sample"]
    assert {p.name for p in (artifacts / "grad_hist" / "layer0").iterdir()} == {"step_000000.json", "step_000003.json"}


def test_flops_per_sec_is_logged_beside_tokens_per_sec(many):
    metrics, _, _ = many
    assert metrics["train/flops_per_sec"] > 0 and "train/mfu" not in metrics  # peak_flops null: no MFU


# ---- FLOPs and MFU by hand ---------------------------------------------------------------------------------
class Recorder:
    def __init__(self, model):
        self.model, self.logged = model, {}

    def log(self, name, value, on_step):
        self.logged[name] = value


def window(model, peak_flops):
    """Two batches of (4, 8) tokens on 2 devices, 0.5 s apart, window_steps=2: one window of one interval."""
    monitor = ThroughputMonitor(window_steps=2, peak_flops=peak_flops)
    module = Recorder(model)
    batch = SimpleNamespace(input_ids=torch.zeros(4, 8, dtype=torch.long))
    clock = iter([10.0, 10.5])
    import neuraflux.callbacks.throughput as throughput

    real = throughput.time
    throughput.time = SimpleNamespace(perf_counter=lambda: next(clock))
    try:
        for step in (1, 2):
            trainer = SimpleNamespace(world_size=2, accumulate_grad_batches=1, global_step=step)
            monitor.on_train_batch_end(trainer, module, None, batch, step - 1)
    finally:
        throughput.time = real
    return module.logged


def test_flops_and_mfu_by_hand():
    # PaLM's 6N + 12·L·T·C with N = 1000 parameters, L = 2 layers, C = 16 channels, at T = 8: 6000 + 3072 = 9072
    model = SimpleNamespace(flops_per_token=lambda T: 6 * 1000 + 12 * 2 * T * 16)
    logged = window(model, peak_flops=1e6)
    # 4 x 8 tokens on each of 2 devices = 64 tokens in 0.5 s
    assert logged["train/tokens_per_sec"] == pytest.approx(128.0)
    # 64 x 9072 FLOPs in 0.5 s = 1,161,216 FLOPs/s, over a peak of 2 devices x 1e6
    assert logged["train/flops_per_sec"] == pytest.approx(1_161_216.0)
    assert logged["train/mfu"] == pytest.approx(0.580608)
    assert "train/mfu" not in window(model, peak_flops=None)  # no peak, no MFU
    # a model without flops_per_token (a reward model) logs tokens/s only
    assert set(window(SimpleNamespace(), peak_flops=1e6)) == {"train/tokens_per_sec"}
    with pytest.raises(ValueError, match="callbacks.throughput.peak_flops must be positive or null"):
        ThroughputMonitor(peak_flops=0)


# ---- what `python train.py` returns -----------------------------------------------------------------------
@pytest.mark.usefixtures("one_thread")
def test_run_returns_the_stages_optimized_metric(tiny_cfg, tmp_path):
    from neuraflux.run import run

    cfg = tiny_cfg("curriculum=none", "logger=csv")
    value = run(cfg, overrides=[])
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert cfg.stage.optimized_metric == "val/loss" and value == saved["val/loss"]
    assert json.loads((tmp_path / "run" / "objective.json").read_text()) == {
        "metric": "val/loss",
        "mode": "min",
        "value": value,
    }
    # logger=csv alone: the stage's scalars in metrics.csv, its last val/loss the value returned
    rows = read_csv(tmp_path / "run" / "csv" / "metrics.csv")
    assert len([r for r in rows if r["train/loss"]]) == 6
    assert float([r["val/loss"] for r in rows if r["val/loss"]][-1]) == pytest.approx(value)
    # a metric the run did not log: one line naming it and the ones there are
    stage = tiny_cfg("curriculum=none", "stage.optimized_metric=val/bogus").stage
    with pytest.raises(ValueError) as err:
        objective(saved, stage)
    assert str(err.value).startswith("stage.optimized_metric='val/bogus' is not among the run's final metrics: ")
    assert "val/loss" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.usefixtures("one_thread")
def test_a_single_run_that_never_validated_still_succeeds_without_an_objective(tiny_cfg, tmp_path, caplog):
    from neuraflux.run import run

    cfg = tiny_cfg("curriculum=none", "trainer.max_steps=2", "trainer.val_check_interval=5")
    assert run(cfg, overrides=[]) is None  # trained and saved; before, it ended with `error:` and exit status 1
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "objective.json").exists()
    assert "stage.optimized_metric='val/loss' was not logged" in caplog.text


def test_every_stage_names_a_validation_metric_to_optimize(tmp_path):
    for path in sorted((CONF / "stage").glob("*.yaml")):
        stage = compose_cfg(tmp_path, "curriculum=none", f"stage={path.stem}").stage
        assert str(stage.get("optimized_metric", "")).startswith("val/"), path.name
        assert stage.get("optimized_mode") in ("min", "max"), path.name


def test_a_sweep_ranks_jobs_by_the_metrics_mode():
    jobs = [
        {"job": 0, "status": "COMPLETED", "objective": 0.4, "mode": "max"},
        {"job": 1, "status": "COMPLETED", "objective": 0.7, "mode": "max"},
        {"job": 2, "status": "FAILED", "objective": None, "mode": None},
    ]
    assert summarize(jobs)["best"]["job"] == 1
    assert summarize([{**j, "mode": "min"} for j in jobs[:2]])["best"]["job"] == 0


@pytest.mark.slow
def test_a_curriculum_returns_its_last_stages_metric(tmp_path):
    from hydra import initialize_config_dir

    from neuraflux.run import run

    overrides = [
        "debug=tiny",
        "curriculum=world",
        "curriculum.stages=[pretrain,reward]",
        "curriculum.eval=false",
        "curriculum.overrides.pretrain=[]",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "world.practice_entities=0",
        "world.practice_preference_entities=0",
        f"paths.output_dir={tmp_path}",
        f"paths.run_dir={tmp_path / 'run'}",
    ]
    cfg = compose_cfg(tmp_path, *overrides, tiny=False)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        value = run(cfg, overrides)
    # the reward model's share of validation pairs ranked right, not the pretraining's val/loss
    saved = json.loads((tmp_path / "run" / "reward" / "metrics.json").read_text())
    assert value == saved["val/accuracies"]
    assert json.loads((tmp_path / "run" / "objective.json").read_text())["mode"] == "max"
