"""Book-keeping clipping (Bu et al. 2023, "Differentially Private Optimization on Large Model at Small
Cost", ICML): DP-SGD's clipped gradient sum from one backward pass.

The backward pass computes only each layer's output gradients B (the weights are frozen while the
forward pass records the graph, so autograd never forms the unclipped weight gradient). Each example's
gradient norm comes from its activations A and B (ghost norm, Goodfellow 2015; Li et al. 2022 for
inputs with a sequence or spatial dimension), and the clipped sum of a layer is one weighted product
of the stored A and B: for a linear map sum_i c_i B_i^T A_i = (c B)^T A, with c_i = min(1, C / ||g_i||).
No second backward pass (ghost clipping's) and no per-example weight gradients (hooks mode's).

Supported layers (``unsupported_layers`` names the others): Linear (any leading dimensions), Conv2d
(zero padding, one group), Embedding (dense, no max_norm, no scale_grad_by_freq), LayerNorm and
GroupNorm (whose per-example gradients are one value per channel, taken from Opacus' grad samplers).
The noise is left to Opacus' ``DPOptimizerFastGradientClipping``, the optimizer of ghost clipping
(``BookkeepingOptimizer``), so noise and accounting are those of the other modes.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.module_utils import trainable_modules, trainable_parameters
from torch import nn
from torch.utils.data import DataLoader

def unsupported_layers(model: nn.Module) -> list[str]:
    """Names (and types) of ``model``'s trainable layers book-keeping clipping cannot handle; [] if none."""
    unsupported = []
    for name, layer in trainable_modules(model):
        if isinstance(layer, nn.Conv2d):
            ok = type(layer) is nn.Conv2d and layer.groups == 1 and layer.padding_mode == "zeros"
            ok = ok and not isinstance(layer.padding, str)
        elif isinstance(layer, nn.Embedding):
            # scale_grad_by_freq divides by counts over the whole batch: no per-example gradient.
            ok = type(layer) is nn.Embedding and layer.max_norm is None and not layer.sparse
            ok = ok and not layer.scale_grad_by_freq
        elif type(layer) is nn.LayerNorm:
            ok = layer.bias is not None  # Opacus' grad sampler reads the bias
        else:
            ok = type(layer) in (nn.Linear, nn.GroupNorm)
        if not ok:
            unsupported.append(f"{name} ({type(layer).__name__})")
    return unsupported


def _pair_norms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||sum_t b_t a_t^T||_F per example for a (n, T, d) and b (n, T, p): by the ghost norm
    sum_{t,t'} (a_t . a_t')(b_t . b_t') when its (n, T, T) Gram matrices are smaller than the
    (n, p, d) per-example gradients, else by forming those (Bu et al. 2023's hybrid rule)."""
    steps, d, p = a.shape[1], a.shape[2], b.shape[2]
    if steps == 1:
        return a[:, 0].norm(dim=1) * b[:, 0].norm(dim=1)
    if steps * steps < d * p:
        gram = (a @ a.mT) * (b @ b.mT)
        return gram.flatten(1).sum(1).clamp(min=0).sqrt()
    return (b.mT @ a).flatten(1).norm(dim=1)


def _positions(t: torch.Tensor) -> torch.Tensor:
    """(n, ..., d) as (n, T, d): the positions between batch and feature dimensions in one (T = 1 for none)."""
    return t.reshape(len(t), math.prod(t.shape[1:-1]), t.shape[-1])


def _linear(layer: nn.Linear, x: torch.Tensor, grad: torch.Tensor):
    a, b = _positions(x), _positions(grad)
    norms = {layer.weight: _pair_norms(a, b)}
    if layer.bias is not None:
        norms[layer.bias] = b.sum(1).norm(dim=1)

    def clipped_sum(c: torch.Tensor) -> dict:
        weighted = (b * c[:, None, None]).flatten(0, 1)
        sums = {layer.weight: weighted.T @ a.flatten(0, 1)}
        if layer.bias is not None:
            sums[layer.bias] = weighted.sum(0)
        return sums

    return norms, clipped_sum


def _conv2d(layer: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor):
    # Unfolded, a convolution is a linear map over the L output positions: A_i (D, L), B_i (C_out, L).
    # The ghost norm needs the unfolded A; the per-example gradients B_i A_i^T come faster from torch's
    # convolution weight-gradient kernel with the batch as groups (2-3x im2col and a batched product at
    # one thread, measured on the zoo CNN's layers at 28x28). The clipped sum is that kernel once, on the
    # weighted output gradients.
    n, b = len(x), grad.flatten(2)
    positions, fan_in, channels = b.shape[2], layer.weight[0].numel(), layer.out_channels
    if n == 0 or positions * positions < fan_in * channels:
        a = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        weight_norms = _pair_norms(a.mT, b.mT)
    else:
        per_example = torch.nn.grad.conv2d_weight(
            x.reshape(1, n * x.shape[1], *x.shape[2:]),
            (n * channels, *layer.weight.shape[1:]),
            grad.reshape(1, n * channels, *grad.shape[2:]),
            layer.stride,
            layer.padding,
            layer.dilation,
            groups=n,
        )
        weight_norms = per_example.reshape(n, -1).norm(dim=1)
    norms = {layer.weight: weight_norms}
    if layer.bias is not None:
        norms[layer.bias] = b.sum(2).norm(dim=1)

    def clipped_sum(c: torch.Tensor) -> dict:
        weighted = grad * c.view(-1, 1, 1, 1)
        sums = {
            layer.weight: torch.nn.grad.conv2d_weight(
                x, layer.weight.shape, weighted, layer.stride, layer.padding, layer.dilation
            )
        }
        if layer.bias is not None:
            sums[layer.bias] = weighted.sum((0, 2, 3))
        return sums

    return norms, clipped_sum


def _embedding(layer: nn.Embedding, x: torch.Tensor, grad: torch.Tensor):
    b = _positions(grad)
    ids = x.reshape(b.shape[:2])
    if layer.padding_idx is not None:
        # torch gives the padding row no gradient.
        b = b * (ids != layer.padding_idx)[:, :, None]
    # Positions holding the same token add into one row of the example's gradient.
    same = (ids[:, :, None] == ids[:, None, :]).to(b.dtype)
    norms = {layer.weight: (same * (b @ b.transpose(1, 2))).flatten(1).sum(1).clamp(min=0).sqrt()}

    def clipped_sum(c: torch.Tensor) -> dict:
        weighted = (b * c[:, None, None]).flatten(0, 1)
        return {layer.weight: torch.zeros_like(layer.weight).index_add_(0, ids.flatten(), weighted)}

    return norms, clipped_sum


def _normalization(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    # LayerNorm's and GroupNorm's per-example gradients are one value per channel: Opacus' grad
    # samplers form them cheaply.
    samples = GradSampleModule.GRAD_SAMPLERS[type(layer)](layer, [x], grad)
    norms = {p: g.flatten(1).norm(dim=1) for p, g in samples.items()}

    def clipped_sum(c: torch.Tensor) -> dict:
        return {p: torch.einsum("n,n...->...", c, g) for p, g in samples.items()}

    return norms, clipped_sum


def _layer_rule(layer: nn.Module) -> Callable:
    if isinstance(layer, nn.Linear):
        return _linear
    if isinstance(layer, nn.Conv2d):
        return _conv2d
    if isinstance(layer, nn.Embedding):
        return _embedding
    return _normalization


class BookkeepingModule(AbstractGradSampleModule):
    """``m`` wrapped for book-keeping clipping at ``max_grad_norm`` (flat clipping of the whole gradient).

    In training mode a forward pass records each supported layer's input and, in the backward pass that
    follows, the gradient of the summed per-example loss at its output; ``clip_and_accumulate`` then adds
    sum_i min(1, C / ||g_i||) g_i to each parameter's ``.grad``. Precondition: each layer runs once per
    forward pass (no weight tying) and one backward pass follows each forward pass, as
    ``BookkeepingLoss`` ensures; ``ValueError`` otherwise. Outside training mode or with the hooks
    disabled it is ``m``.
    """

    def __init__(self, m: nn.Module, *, max_grad_norm: float) -> None:
        unsupported = unsupported_layers(m)
        if unsupported:
            raise ValueError(f"book-keeping clipping does not support {', '.join(unsupported)}")
        # "mean" as for the optimizer, which divides the noised sum by the expected batch size.
        super().__init__(m, batch_first=True, loss_reduction="mean")
        self.max_grad_norm = max_grad_norm
        self.hooks_enabled = True
        self._recording = False
        self._records: dict[nn.Module, list] = {}
        self._trainable = [p for _, p in trainable_parameters(m)]
        self._handles = [layer.register_forward_hook(self._record) for _, layer in trainable_modules(m)]

    def forward(self, *args, **kwargs):
        if not (self.training and self.hooks_enabled and torch.is_grad_enabled()):
            return self._module(*args, **kwargs)
        # Frozen weights: the backward pass computes output gradients only; the layers' weight
        # gradients come from clip_and_accumulate, already clipped.
        for p in self._trainable:
            p.requires_grad_(False)
        self._recording = True
        try:
            return self._module(*args, **kwargs)
        finally:
            self._recording = False
            for p in self._trainable:
                p.requires_grad_(True)

    def _record(self, layer: nn.Module, inputs: tuple, output: torch.Tensor):
        if not self._recording:
            return None
        if layer in self._records:
            raise ValueError(f"book-keeping clipping: {type(layer).__name__} ran twice in one forward pass")
        # The first layer's output depends on no tensor that requires a gradient: start the graph there.
        traced = output if output.requires_grad else output.detach().requires_grad_(True)
        record = [inputs[0].detach(), None]
        self._records[layer] = record
        traced.register_hook(lambda grad: record.__setitem__(1, grad.detach()))
        return None if traced is output else traced

    def clip_and_accumulate(self) -> torch.Tensor:
        """Add the clipped sum of the per-example gradients recorded by the last forward and backward
        passes to each trainable parameter's ``.grad`` (a zero where a layer got no gradient); return the
        per-example gradient norms before clipping. Clipping factors are Opacus': min(1, C / (norm + 1e-6))."""
        records, self._records = self._records, {}
        layers = []
        for layer, (x, grad) in records.items():
            if grad is None:
                raise ValueError("book-keeping clipping: a forward pass was not followed by its backward pass")
            layers.append(_layer_rule(layer)(layer, x, grad))
        squares = [norm.square() for norms, _ in layers for norm in norms.values()]
        if not squares:
            raise ValueError("book-keeping clipping: no forward pass was recorded before the backward pass")
        norms = torch.stack(squares).sum(0).sqrt()
        factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        sums = {}
        for _, clipped_sum in layers:
            sums.update(clipped_sum(factors))
        for p in self._trainable:
            clipped = sums.get(p)
            clipped = torch.zeros_like(p) if clipped is None else clipped.to(p.dtype)
            p.grad = clipped if p.grad is None else p.grad + clipped
        return norms

    def disable_hooks(self) -> None:
        self.hooks_enabled = False

    def enable_hooks(self) -> None:
        self.hooks_enabled = True

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class BookkeepingOptimizer(DPOptimizerFastGradientClipping):
    """Ghost clipping's optimizer (noise N(0, (sigma C)^2) on the clipped sum, divided by the expected
    batch size), whose accumulation clones each gradient where Opacus' deep-copies it: the same sums,
    without ``copy.deepcopy``'s Python overhead (0.4 ms a step for the default job's logistic regression)."""

    def accumulate(self) -> None:
        for p in self.params:
            if p.summed_grad is not None:
                p.summed_grad.add_(p.grad)
            else:
                p.summed_grad = p.grad.detach().clone()


class BookkeepingLoss:
    """``criterion`` for book-keeping clipping: called on (logits, labels) it returns a loss whose
    ``backward()`` runs the one backward pass and the clipping (Opacus' ghost clipping packs its two
    passes into its loss object the same way)."""

    def __init__(self, module: BookkeepingModule, criterion: nn.Module) -> None:
        self.module = module
        self.criterion = criterion

    def __call__(self, *args, **kwargs) -> "BookkeepingLossValue":
        reduction = self.criterion.reduction
        self.criterion.reduction = "none"
        try:
            return BookkeepingLossValue(self.module, self.criterion(*args, **kwargs))
        finally:
            self.criterion.reduction = reduction


class BookkeepingLossValue:
    """A batch's per-example losses; ``item()`` is their mean, ``backward()`` leaves the clipped sum in ``.grad``."""

    def __init__(self, module: BookkeepingModule, per_example: torch.Tensor) -> None:
        self.module = module
        self.per_example = per_example

    def item(self) -> float:
        return self.per_example.detach().mean().item()

    def backward(self) -> None:
        # The sum, not the mean: each recorded output gradient is then one example's own.
        self.per_example.sum().backward()
        self.module.clip_and_accumulate()


def make_bookkeeping_private(
    engine: PrivacyEngine,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    loader: DataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    noise_generator: torch.Generator,
) -> tuple[BookkeepingModule, BookkeepingOptimizer, BookkeepingLoss]:
    """What ``engine.make_private(..., grad_sample_mode="ghost")`` returns, with book-keeping clipping in
    place of ghost clipping: the model (checked by Opacus' ``ModuleValidator`` as every mode is), ghost
    clipping's optimizer (``BookkeepingOptimizer``), which adds N(0, (noise_multiplier * max_grad_norm)^2) to the clipped sum and
    divides by Opacus' expected batch size, and the loss. The loader is the caller's, unchanged."""
    engine.validate(module=model, optimizer=optimizer, data_loader=loader)
    module = BookkeepingModule(model, max_grad_norm=max_grad_norm)
    private_optimizer = BookkeepingOptimizer(
        optimizer=optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        # Opacus' own expression (PrivacyEngine.make_private), so every mode divides by the same number.
        expected_batch_size=int(len(loader.dataset) * (1 / len(loader))),
        loss_reduction="mean",
        generator=noise_generator,
        secure_mode=engine.secure_mode,
    )
    return module, private_optimizer, BookkeepingLoss(module, criterion)
