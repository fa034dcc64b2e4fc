"""Sweeps and clusters: an Optuna search (conf/hparams_search/), the parallel and submitit launchers
(conf/hydra/launcher/), and FSDP (conf/trainer/fsdp.yaml). The plugins are optional: each test that needs one skips
without it."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from tests.conftest import CONF
from tests.test_train import CLI_TINY, run_cli

# one torch thread per job: two jobs at once share the 2 cores
SWEEP_TINY = [*CLI_TINY, "threads=1"]


def compose_with_hydra(tmp_path, *overrides: str):
    """The config with its `hydra` node, as `python train.py OVERRIDES` composes it."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[*overrides, f"paths.output_dir={tmp_path}", f"paths.run_dir={tmp_path / 'run'}"],
            return_hydra_config=True,
        )


@pytest.mark.parametrize("stage, direction", [("sft", "minimize"), ("reward", "maximize")])
def test_optuna_takes_its_direction_from_the_stage(tmp_path, stage, direction):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_with_hydra(tmp_path, "hparams_search=optuna", f"stage={stage}")
    assert cfg.hydra.sweeper.direction == direction  # val/loss is minimised, val/accuracies maximised
    assert cfg.curriculum.stages == []  # one stage a trial: a curriculum would return its last stage's metric
    dpo = compose_with_hydra(tmp_path, "hparams_search=dpo_optuna", "stage=dpo")
    assert {"optim.lr", "data.batch_size", "stage.module.beta"} == set(dpo.hydra.sweeper.params)
    # DPO's loss moves with beta itself: trials of different beta are ranked by held-out pair accuracy
    assert (dpo.stage.optimized_metric, dpo.hydra.sweeper.direction) == ("val/accuracies", "maximize")
    assert dpo.hydra.sweeper.n_trials == 20


@pytest.mark.slow
def test_a_four_trial_optuna_sweep_in_two_processes_writes_its_best_parameters(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    out = run_cli(
        "hparams_search=optuna",
        "stage=sft",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.sampler.n_startup_trials=2",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "hydra.sweeper.n_jobs=2",
        f"paths.output_dir={tmp_path}",
        # data.batch_size is searched: on the command line it would be a fixed parameter, out of the search
        *(o for o in SWEEP_TINY if not o.startswith("data.batch_size=")),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (sweep_dir,) = tmp_path.glob("multirun/*")
    objectives = {int(p.parent.name): json.loads(p.read_text()) for p in sweep_dir.glob("*/objective.json")}
    assert sorted(objectives) == [0, 1, 2, 3]
    # the plugin's record of the best trial is the trial with the lowest val/loss, and so is the summary's
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    best = min(objectives, key=lambda n: objectives[n]["value"])
    assert results["best_value"] == pytest.approx(objectives[best]["value"])
    params = results["best_params"]
    assert set(params) == {"optim.lr", "data.batch_size"}
    assert 1e-4 <= params["optim.lr"] <= 1e-2 and params["data.batch_size"] in (8, 16, 32)
    trained = yaml.safe_load((sweep_dir / str(best) / "config.yaml").read_text())
    assert trained["optim"]["lr"] == pytest.approx(params["optim.lr"])
    assert trained["data"]["batch_size"] == params["data.batch_size"]
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["best"]["job"] == best and [j["status"] for j in summary["jobs"]] == ["COMPLETED"] * 4
    assert "multirun: 4 jobs" in out.stdout


@pytest.mark.slow
def test_the_submitit_local_launcher_runs_two_jobs_as_separate_processes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    out = run_cli("-m", "hydra/launcher=local", "optim.lr=1e-3,3e-3", f"paths.output_dir={tmp_path}", *SWEEP_TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    (sweep_dir,) = tmp_path.glob("multirun/*")
    assert len(list(sweep_dir.glob("*/model/model.safetensors"))) == 2
    assert len(list(sweep_dir.glob(".submitit/*/*_log.out"))) == 2  # submitit's own record of each job
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert [j["overrides"][0] for j in summary["jobs"]] == ["optim.lr=0.001", "optim.lr=0.003"]
    assert summary["best"] is not None


def test_the_slurm_launcher_asks_for_the_job_lightning_expects(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra.utils import instantiate
    from lightning_fabric.plugins.environments import SLURMEnvironment

    overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]
    cfg = compose_with_hydra(tmp_path, *overrides, "hydra.launcher.partition=gpu", "hydra.launcher.mem_gb=64")
    launcher = instantiate(cfg.hydra.launcher).params  # what sbatch is given
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 4, 4)
    assert (launcher["partition"], launcher["mem_gb"], launcher["timeout_min"]) == ("gpu", 64, 240)
    # the environment srun gives rank 5 of that job (node 2, its second task): what Lightning's trainer detects
    # SLURM by and reads the ranks from. (The SLURMEnvironment alone, not a Trainer: building one would set
    # Lightning's process-wide rank to 5 for the tests that follow; main_address would export MASTER_ADDR.)
    slurm = {"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2", "SLURM_PROCID": "5",
             "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_NODELIST": "gpu[07-08]", "SLURM_JOB_NAME": "train",
             "SLURM_JOB_ID": "4242"}  # fmt: skip
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    assert SLURMEnvironment.detect()
    environment = SLURMEnvironment()
    assert (environment.world_size(), environment.global_rank(), environment.local_rank()) == (8, 5, 1)
    assert environment.node_rank() == 1
    # Lightning checks this before it starts training: the launcher's tasks per node are the trainer's devices
    environment.validate_settings(num_devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes)
    with pytest.raises(ValueError, match="ntasks-per-node=4"):
        environment.validate_settings(num_devices=2, num_nodes=2)


def test_only_rank_zero_of_a_multi_task_job_writes_its_record(tmp_path, monkeypatch):
    # under hydra/launcher=slurm every rank of a job ends through Hydra's callbacks; a rank that is not 0 has no
    # objective.json to read, and writing its record after rank 0 would lose the metric's name and direction
    from hydra.core.utils import JobReturn, JobStatus
    from hydra.types import RunMode
    from omegaconf import OmegaConf
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    from neuraflux.sweep import JOB_FILE, MultirunSummary

    hydra = {"mode": RunMode.MULTIRUN, "runtime": {"output_dir": str(tmp_path)}, "job": {"num": 3},
             "overrides": {"task": ["optim.lr=0.001"]}}  # fmt: skip
    config = OmegaConf.create({"hydra": hydra})
    finished = JobReturn(status=JobStatus.COMPLETED, _return_value=2.5)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    MultirunSummary().on_job_end(config, finished)
    assert not (tmp_path / JOB_FILE).exists()
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    MultirunSummary().on_job_end(config, finished)
    record = json.loads((tmp_path / JOB_FILE).read_text())
    assert (record["job"], record["objective"], record["status"]) == (3, 2.5, "COMPLETED")


def test_fsdp_is_refused_on_a_cpu_with_a_message_naming_the_gpu(tmp_path):
    # Lightning's FSDPStrategy refuses accelerator=cpu and torch's FSDP needs an accelerator device, so the CPU tier
    # can only check that the strategy builds and that a CPU run fails at once saying why
    from hydra.utils import instantiate
    from pytorch_lightning.strategies import FSDPStrategy

    from neuraflux.model.nano import NanoLayer
    from neuraflux.train import build

    cfg = compose_with_hydra(tmp_path, "trainer=fsdp")
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy) and strategy.kwargs["auto_wrap_policy"]._module_classes == {NanoLayer}
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        build(cfg.trainer, key="trainer", accelerator="cpu", logger=False)


@pytest.mark.slow
@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="FSDP needs GPUs: Lightning's FSDPStrategy refuses accelerator=cpu and torch's FSDP has no CPU device; "
    "this test shards a tiny model over 2 GPUs",
)
def test_fsdp_on_two_gpus_trains_and_exports_whole_weights(tmp_path):
    from neuraflux.model.io import load_pretrained

    tiny = [*CLI_TINY, "trainer.precision=32-true"]
    sharded = run_cli("trainer=fsdp", "trainer.devices=2", f"paths.output_dir={tmp_path / 'fsdp'}", *tiny)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    single = run_cli("trainer=gpu", f"paths.output_dir={tmp_path / 'one'}", *tiny, "data.batch_size=8")
    assert single.returncode == 0, single.stderr[-3000:]
    (fsdp_metrics,) = (tmp_path / "fsdp").glob("pretrain/*/metrics.json")
    (one_metrics,) = (tmp_path / "one").glob("pretrain/*/metrics.json")
    fsdp, one = json.loads(fsdp_metrics.read_text()), json.loads(one_metrics.read_text())
    assert fsdp["params"] == one["params"]  # counted on the gathered weights, not on rank 0's shard
    model, _ = load_pretrained(fsdp_metrics.parent / "model")  # exported whole
    assert sum(p.numel() for p in model.parameters()) == one["params"]
    # the same initial weights and 2 steps of the same size (2 ranks x 4 rows, 1 x 8 rows), on batches drawn
    # differently: the losses agree loosely, not exactly
    assert fsdp["val/loss"] == pytest.approx(one["val/loss"], rel=0.05)
