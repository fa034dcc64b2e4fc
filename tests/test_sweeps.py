"""Sweeps and clusters: an Optuna search (conf/hparams_search/), the parallel and submitit launchers
(conf/hydra/launcher/), and FSDP (conf/trainer/fsdp.yaml, fsdp_cpu.yaml). The plugins are optional: each test that
needs one skips without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
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


def test_fsdp_builds_on_a_cpu_with_one_unit_per_layer_and_whole_gradient_clipping(tmp_path):
    # Lightning refuses its own FSDPStrategy on a CPU; neuraflux.fsdp's subclass is let through and brings the
    # precision plugin that clips by norm (Lightning's FSDPPrecision refuses gradient_clip_algorithm='norm')
    from neuraflux.fsdp import FSDPStrategy, ShardedNormClipPrecision
    from neuraflux.model.nano import NanoLayer
    from neuraflux.train import build

    cfg = compose_with_hydra(tmp_path, "trainer=fsdp_cpu")
    trainer = build(cfg.trainer, key="trainer", logger=False)
    assert isinstance(trainer.strategy, FSDPStrategy) and trainer.num_devices == 2
    assert trainer.strategy.kwargs["auto_wrap_policy"]._module_classes == {NanoLayer}
    assert isinstance(trainer.precision_plugin, ShardedNormClipPrecision)
    assert trainer.precision_plugin.precision == "32-true"
    gpu = compose_with_hydra(tmp_path, "trainer=fsdp")
    assert gpu.trainer.strategy.precision == "bf16-mixed"  # the trainer's precision, given to the plugin


class LocalShardSizes(pl.Callback):
    """Writes how many parameter elements this rank holds once training starts (`shards-<rank>.json` in the run
    directory): a test reads it from a run of `python train.py` (`+callbacks.shards._target_=...`)."""

    def on_train_start(self, trainer, pl_module) -> None:
        held = sum(p.numel() for p in trainer.strategy.model.parameters())
        Path(trainer.default_root_dir, f"shards-{trainer.global_rank}.json").write_text(json.dumps({"held": held}))


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_shards_and_resumes_to_the_single_process_weights(tmp_path):
    """trainer=fsdp_cpu: 2 ranks x 4 rows for 2 steps, then resumed from its checkpoint (whole weights, the
    optimizer's state) for 2 more, against one process x 8 rows for 4 steps. Each rank's data module takes every
    other row of the same seeded stream, so both runs read the same 8 rows a step, and every loss is normalised by
    the step's all-reduced token count: the same gradients, up to the order of float sums, so the same weights.
    Clipping is on (trainer.gradient_clip_val=1.0, the gradients' norm is above it), so it must clip by the whole
    gradient's norm, not one rank's shard's."""
    from neuraflux.model.io import load_pretrained

    tiny = [*CLI_TINY, "model.n_layer=2", "model.dropout=0.0", "optim.total_steps=4", "trainer.val_check_interval=2"]
    shards = f"+callbacks.shards._target_={__name__}.LocalShardSizes"
    fsdp_out, single_out = tmp_path / "fsdp", tmp_path / "one"
    first = run_cli("trainer=fsdp_cpu", f"paths.output_dir={fsdp_out}", shards, *tiny, "data.batch_size=4")
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = fsdp_out.glob("pretrain/*")
    held = [json.loads((run_dir / f"shards-{rank}.json").read_text())["held"] for rank in (0, 1)]
    resumed = run_cli("curriculum=none", f"resume={run_dir}", "trainer.max_steps=4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    single = run_cli("trainer=cpu", f"paths.output_dir={single_out}", *tiny, "data.batch_size=8", "trainer.max_steps=4")
    assert single.returncode == 0, single.stderr[-3000:]
    (single_dir,) = single_out.glob("pretrain/*")
    fsdp, one = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, single_dir))
    assert fsdp["global_step"] == one["global_step"] == 4
    # each rank held about half of the weights (a shard of every layer), not a copy
    assert sum(held) == fsdp["params"] and all(0.45 < n / fsdp["params"] < 0.55 for n in held), held
    sharded, _ = load_pretrained(run_dir / "model")  # exported whole, gathered on rank 0
    whole, _ = load_pretrained(single_dir / "model")
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(sharded.state_dict()[name], value, rtol=0, atol=1e-4, msg=name)
    assert fsdp["train/grad_norm"] == pytest.approx(one["train/grad_norm"], rel=1e-4)  # of every rank's shards
    # the same weights; rank 0 logs the loss of its half of the validation rows (the stage logs it unsynchronised)
    assert fsdp["val/loss"] == pytest.approx(one["val/loss"], rel=1e-3)
    # the checkpoint holds whole weights too: the exported model's, exactly
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    saved = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    for name, value in sharded.state_dict().items():
        assert torch.equal(saved[name], value), name
    # and the optimizer's weight-decay groups as one process has them: matrices decay, vectors do not
    single_checkpoint = torch.load(single_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    sizes = [
        [len(g["params"]) for g in c["optimizer_states"][0]["param_groups"]] for c in (checkpoint, single_checkpoint)
    ]
    assert sizes[0] == sizes[1] and min(sizes[0]) > 0, sizes


@pytest.mark.slow
@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="needs 2 GPUs: shards a tiny model over NCCL in bf16-mixed; "
    "test_fsdp_on_two_cpu_processes_shards_and_resumes_to_the_single_process_weights covers sharding on CPUs",
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
