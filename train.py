"""Hydra entry point: `python train.py [group=option] [key=value] [-m sweeps]`; see conf/config.yaml."""

import hydra
from omegaconf import DictConfig

from neuraflux.stages.schema import register

register()  # the stages' structured configs, before Hydra composes conf/


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from neuraflux.run import run, user_errors_exit

    # a mistake in the config or a file: one line, not a traceback, and no stub run directory left behind
    with user_errors_exit(HydraConfig.get().runtime.output_dir):
        return run(cfg)


if __name__ == "__main__":
    main()
