"""A trained model's penultimate-layer representation of records: the input of its last ``nn.Linear``
(the output layer), which representation-based poison detectors read (Tran et al. 2018, Chen et al. 2018)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from dptrain.privacy import unwrap
from dptrain.training.loop import predict


def output_layer(model: nn.Module) -> nn.Linear | None:
    """The model's output layer: its last leaf module when that is an ``nn.Linear``, else None."""
    leaves = [module for module in model.modules() if not list(module.children())]
    return leaves[-1] if leaves and isinstance(leaves[-1], nn.Linear) else None


def has_hidden_layer(model: nn.Module) -> bool:
    """True when something other than flattening computes the output layer's input, i.e. the
    penultimate representation is learned rather than the flattened input itself."""
    leaves = [module for module in model.modules() if not list(module.children())]
    return any(not isinstance(module, (nn.Flatten, nn.Identity)) for module in leaves[:-1])


def penultimate(model: nn.Module, records: TensorDataset, device: torch.device) -> torch.Tensor:
    """The (records, features) input of ``model``'s output layer on every record, in order, on the CPU.

    Precondition: ``output_layer(model)`` is not None (validation refuses models without one)."""
    head = output_layer(unwrap(model))
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _module, inputs, _output: captured.append(inputs[0].detach().cpu()))
    try:
        predict(model, records, device)
    finally:
        hook.remove()
    return torch.cat(captured).flatten(start_dim=1)
