"""The Flower app's components: dptrain's deployable ServerApp and ClientApp (dptrain.flower.app)."""

from dptrain.flower.app import client_app, server_app

__all__ = ["client_app", "server_app"]
