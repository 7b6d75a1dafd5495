"""dptrain on Flower (flwr 1.42, Message API): the Flower engine (``federation.engine=flower``: a
ServerApp and ClientApp over the federated recipe, deployable as ``dptrain.flower_app``), and for any
Flower app ``RobustStrategy`` (dptrain's robust rules as a strategy) and ``mods.epsilon_mod`` (each
Opacus client's epsilon in its replies), and ``audit.audit_global_model`` (dptrain's membership and
attribute inference on a final global model, where the app can see the records).

Flower is an optional extra (``pip install "dptrain[flower]"``); nothing here imports it until a
Flower run starts or ``RobustStrategy`` is used.
"""

from __future__ import annotations


def __getattr__(name: str):
    # Lazy, so that importing dptrain.flower (the recipe) never needs flwr.
    if name == "RobustStrategy":
        from dptrain.flower.strategy import RobustStrategy

        return RobustStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
