"""dptrain's federated recipe as a deployable Flower app: ``server_app`` and ``client_app`` for the
components of a pyproject-based Flower app (examples/flower_app), run by ``flwr run`` on a SuperLink
whose SuperNodes each hold one client's partition (``--node-config "partition-id=<i>"``).

The app's run config carries the recipe: ``overrides``, the ``dptrain train`` overrides separated by
spaces (``federation.engine=flower`` is implied), and ``run-dir``, where the ServerApp writes the run
directory. Every SuperNode builds its own client's records from the same config and train.seed.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from hydra import compose, initialize_config_module

from dptrain import pipeline
from dptrain.config import Config, register_configs
from dptrain.flower.engine import client_app as recipe_client_app
from dptrain.flower.engine import deployed_on

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _composed(overrides: str) -> Config:
    register_configs()
    with initialize_config_module(config_module="dptrain.conf", version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides.split(), "federation.engine=flower"])


def recipe_config(context: Context) -> Config:
    """The config of the run: ``dptrain train``'s defaults with the run config's ``overrides``."""
    return _composed(str(context.run_config["overrides"]))


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate and run the recipe (``pipeline.train``: training over ``grid``, audits, artifacts)."""
    run_dir = Path(str(context.run_config["run-dir"])).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    with deployed_on(grid):
        metrics, _ = pipeline.train(recipe_config(context), run_dir)
    log.warning("dptrain: run written to %s (test accuracy %.4f, epsilon %s)", run_dir, metrics.test_accuracy, metrics.epsilon)


client_app = recipe_client_app(recipe_config)
