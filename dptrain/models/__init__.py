"""Model zoo: networks that Opacus can train as they are (no BatchNorm), built by name from config."""

from dptrain.models.compat import ensure_dp_compatible
from dptrain.models.zoo import ACTIVATIONS, IMAGE_ONLY, MODELS, build_model

__all__ = ["ACTIVATIONS", "IMAGE_ONLY", "MODELS", "build_model", "ensure_dp_compatible"]
