"""Hydra entry point: `python train.py [group=option] [key=value] [-m sweeps]`; see conf/config.yaml."""

import hydra
from omegaconf import DictConfig

from neuraflux.stages.schema import register

register()  # the stages' structured configs, before Hydra composes conf/


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from neuraflux.run import run, user_errors_exit

    with user_errors_exit():  # a mistake in the config or a file: one line, not a traceback
        return run(cfg)


if __name__ == "__main__":
    main()
