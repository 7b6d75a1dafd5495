"""The Flower app's components: dptrain's deployable ServerApp and ClientApp (dptrain.flower_app)."""

from dptrain.flower_app import client_app, server_app

__all__ = ["client_app", "server_app"]
