"""Hydra entry point: `python train.py [group=option] [key=value] [-m sweeps]`; see conf/config.yaml."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from neuraflux.run import run

    return run(cfg, conf_dir=CONF)


if __name__ == "__main__":
    main()
