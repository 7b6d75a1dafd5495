"""The gradient inversion audit: an honest-but-curious federated server reconstructs a client's records
from the one update it received.

The server sees each client's update ``delta = local - global`` before aggregating (any aggregator,
robust ones included: they read every individual update). The audit simulates one more round from the
trained global model for a few honest clients, each holding ``records`` audited members as one local
batch, trained by the run's own local training (``dptrain.training.clients.local_update``: its local
epochs, and at ``dp_level=sample`` DP-SGD with the run's noise multiplier and clipping norm). Under
``dp_level=user`` local training is non-private and DP-FedAvg clips and noises at the server, after it
has seen the update: the server attacks the raw update.

The update is read as a gradient, ``g = -delta / (lr * steps)`` (Geiping et al. 2020, "Inverting
Gradients", Sec. 5): exact for one plain SGD step, the average of the local gradients over several.

Two attacks:

- Analytic (Phong et al. 2017; Geiping et al. 2020, Prop. D.1): a first layer ``y = W x + b`` gives
  ``dL/dW_i = (dL/db_i) x`` for one record, so ``x = dL/dW_i / dL/db_i`` for any row with
  ``dL/db_i != 0``; exact for one record however many steps it was trained on with plain SGD, since every
  step's first-layer gradient is a multiple of the same ``x``. Used for one-record batches on a model whose
  first layer is ``nn.Linear`` with bias.
- Optimization (Zhu et al. 2019, "Deep Leakage from Gradients"; Geiping et al. 2020): dummy inputs
  whose gradient matches ``g`` in cosine distance, with a total-variation prior, by Adam on the signed
  gradient inside the valid pixel box; the restart with the lowest matching loss is kept (the attacker's
  own criterion, never the truth).

Labels: at one record the softmax cross-entropy's output-bias gradient ``p - e_y`` is negative at the
label only (Zhao et al. 2020, "iDLG"), after any number of steps on it; larger batches are given their
true labels (Geiping et al.'s setting, favourable to the attacker).
"""

from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from dptrain.audit.results import GradientInversionResult
from dptrain.config import Config, PrivacyConfig
from dptrain.data.dataset import InputUnits
from dptrain.privacy import PrivacyPlan, plan_privacy
from dptrain.privacy.engine import unwrap
from dptrain.training.clients import Client, local_update

# Adam on the signed gradient at this rate, divided by 10 at 3/8, 5/8 and 7/8 of the steps (Geiping et al.).
INVERSION_LR = 0.1


def first_linear(model: nn.Module) -> nn.Linear | None:
    """The model's first parametrized layer when it is an ``nn.Linear`` with bias (MLP, logistic
    regression), else None."""
    for module in model.modules():
        if next(module.parameters(recurse=False), None) is not None:
            return module if isinstance(module, nn.Linear) and module.bias is not None else None
    return None


def analytic_inversion(weight_gradient: Tensor, bias_gradient: Tensor) -> Tensor:
    """The one record behind a first-layer gradient: ``dL/dW_i / dL/db_i`` at the row with the largest
    ``|dL/db_i|`` (the best-conditioned division). Precondition: the gradient is one record's (or a sum
    of gradients on that record alone); exact then, a mixture of the records otherwise."""
    row = int(bias_gradient.abs().argmax())
    return weight_gradient[row] / bias_gradient[row]


def idlg_label(output_bias_gradient: Tensor) -> int:
    """Zhao et al. 2020: the label of a one-record cross-entropy gradient, the only class whose output
    bias gradient ``p_k - [k = y]`` is negative (the most negative under noise)."""
    return int(output_bias_gradient.argmin())


def total_variation(x: Tensor) -> Tensor:
    """Mean absolute difference of neighbouring pixels along the two spatial axes (Rudin et al. 1992)."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def optimization_inversion(
    model: nn.Module,
    gradient: list[Tensor],
    labels: Tensor,
    units: InputUnits,
    steps: int,
    tv_weight: float,
    restarts: int,
    generator: torch.Generator,
) -> Tensor:
    """Geiping et al.'s reconstruction of ``len(labels)`` records from ``gradient`` (one tensor per
    parameter of ``model``): minimize ``1 - cos(grad_x, gradient) + tv_weight * TV(x)`` over inputs in
    the valid box ``[units.low, units.high]``; the best of ``restarts`` uniform random starts by that
    loss. The search runs in data units (pixels), where every feature has the same range, so one step
    size suits them all."""
    model = model.eval()
    parameters = list(model.parameters())
    target = torch.cat([g.flatten() for g in gradient])
    # Features are low + scale * u for u in [0, span] data units (images: every feature moves with its pixel).
    low, scale = units.low, units.scale
    span = (units.high - units.low) / scale
    loss_fn = nn.CrossEntropyLoss()
    best, best_loss = None, float("inf")
    for _ in range(restarts):
        u = (span * torch.rand((len(labels), *span.shape), generator=generator)).requires_grad_(True)
        optimizer = torch.optim.Adam([u], lr=INVERSION_LR)
        milestones = [steps * 3 // 8, steps * 5 // 8, steps * 7 // 8]
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        for _ in range(steps):
            optimizer.zero_grad()
            matching = _matching_loss(model, parameters, low + scale * u, labels, target, loss_fn, u, tv_weight)
            (u.grad,) = torch.autograd.grad(matching, u)
            u.grad.sign_()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                u.copy_(torch.minimum(u.clamp_min(0), span))
        final = float(_matching_loss(model, parameters, low + scale * u, labels, target, loss_fn, u, tv_weight).detach())
        if final < best_loss:
            best, best_loss = (low + scale * u).detach(), final
    return best


def _matching_loss(model, parameters, x, labels, target, loss_fn, pixels, tv_weight) -> Tensor:
    """Geiping et al.'s objective at inputs ``x``, with the prior on their ``pixels`` (data units)."""
    dummy = torch.autograd.grad(loss_fn(model(x), labels), parameters, create_graph=True)
    flat = torch.cat([g.flatten() for g in dummy])
    cosine = torch.dot(flat, target) / (flat.norm() * target.norm()).clamp_min(1e-12)
    return 1 - cosine + tv_weight * total_variation(pixels)


def attacked_plan(cfg: Config, run_plan, records: int) -> PrivacyPlan:
    """The attacked client's local plan: its ``records`` records as one batch for ``local_epochs``
    steps. ``dp_level=sample`` with a private run: the run's noise multiplier and clipping norm (those of
    its reported client, the one with the largest epsilon), so each step adds the noise that client adds
    to one record's clipped gradient; otherwise non-private (``dp_level=user`` trains locally without noise)."""
    epochs = cfg.federation.local_epochs
    if run_plan.private and run_plan.dp_level == "sample":
        return dataclasses.replace(
            run_plan.guarantee, sample_rate=1.0, steps_per_epoch=1, steps=epochs, planned_epsilon=None
        )
    return plan_privacy(PrivacyConfig(name="none", target_epsilon=None), members=records, batch_size=records, epochs=epochs)


def reconstruction_scores(reconstructed: Tensor, members: Tensor, positions: Tensor, units: InputUnits):
    """Per true record (``members[positions]``), the MSE and PSNR in data units of the reconstruction
    assigned to it, and whether the member nearest to that reconstruction is the record itself. The
    order of a batch is lost in its gradient: reconstructions are assigned to records one to one by
    least total MSE (``linear_sum_assignment``)."""
    scale = units.scale.flatten()
    moved = scale > 0

    def in_units(x: Tensor) -> Tensor:
        return (x.flatten(1)[:, moved] / scale[moved]).double()

    r, m = in_units(reconstructed), in_units(members)
    cost = torch.cdist(m[positions], r).pow(2) / r.shape[1]
    rows, cols = linear_sum_assignment(cost.numpy())
    mse = cost[rows, cols].numpy()
    peak = float(((units.high - units.low).flatten()[moved] / scale[moved]).max())
    psnr = 10 * np.log10(peak**2 / np.maximum(mse, 1e-300))
    nearest = torch.cdist(r[cols], m).argmin(dim=1)
    return mse, psnr, (nearest == positions[rows]).numpy()


def gradient_inversion_audit(
    cfg: Config,
    run_plan,
    model: nn.Module,
    members: TensorDataset,
    units: InputUnits,
    device: torch.device,
    seed: int,
) -> GradientInversionResult:
    """Attack ``audit.gradient_inversion.clients`` simulated updates of ``records`` members each (client
    ``j`` holds members ``j * records`` to ``(j + 1) * records - 1``) sent from ``model``; score every
    record (``reconstruction_scores``, nearest member searched among all ``members`` and, past one record, among the
    client's own). Preconditions (``dptrain.validation``): image data, plain SGD, enough members."""
    settings = cfg.audit.gradient_inversion
    started = time.perf_counter()
    global_model = copy.deepcopy(unwrap(model)).to(device)
    records, epochs = settings.records, cfg.federation.local_epochs
    plan = attacked_plan(cfg, run_plan, records)
    local_cfg = copy.deepcopy(cfg)
    local_cfg.train.batch_size = records
    local_cfg.train.max_physical_batch_size = None
    linear = first_linear(global_model)
    method = "analytic" if linear is not None and records == 1 else "optimization"
    output = [m for m in global_model.modules() if isinstance(m, nn.Linear)][-1]
    sampling = torch.Generator().manual_seed(seed)
    noise = torch.Generator(device=device).manual_seed(seed + 1)
    inversion = torch.Generator().manual_seed(seed + 2)
    x_all, y_all = members.tensors
    mse, psnr, match_members, match_client, labels_right = [], [], [], [], []
    for j in range(settings.clients):
        x, y = x_all[j * records : (j + 1) * records], y_all[j * records : (j + 1) * records]
        client = Client(j, TensorDataset(x, y), False, plan)
        update = local_update(local_cfg, client, global_model, sampling, noise, device)
        gradient = [g.detach().cpu() for g in _as_gradients(update.delta, global_model, cfg.train.lr * epochs)]
        if method == "analytic":
            weight, bias = (gradient[_index(global_model, p)] for p in (linear.weight, linear.bias))
            reconstructed = analytic_inversion(weight, bias).reshape(1, *x.shape[1:])
            reconstructed = torch.maximum(torch.minimum(reconstructed, units.high), units.low)
        else:
            cpu_model = copy.deepcopy(global_model).cpu()
            reconstructed = optimization_inversion(
                cpu_model, gradient, y, units, settings.steps, settings.tv_weight, settings.restarts, inversion
            )
        if records == 1 and output.bias is not None:
            labels_right.append(idlg_label(gradient[_index(global_model, output.bias)]) == int(y[0]))
        m, p, found = reconstruction_scores(reconstructed, x_all, torch.arange(j * records, (j + 1) * records), units)
        mse += m.tolist()
        psnr += p.tolist()
        match_members += found.tolist()
        if records > 1:
            match_client += reconstruction_scores(reconstructed, x, torch.arange(records), units)[2].tolist()
    return GradientInversionResult(
        method=method,
        clients=settings.clients,
        records=records,
        local_steps=epochs,
        update="dp_sgd" if plan.private else "raw",
        noise_multiplier=plan.noise_multiplier if plan.private else None,
        max_grad_norm=plan.max_grad_norm if plan.private else None,
        mse=mse,
        psnr=psnr,
        nearest_member_is_true=match_members,
        nearest_client_record_is_true=match_client if records > 1 else None,
        members=len(x_all),
        label_recovered=labels_right if labels_right else None,
        seconds=time.perf_counter() - started,
    )


def _index(model: nn.Module, parameter: nn.Parameter) -> int:
    return next(i for i, p in enumerate(model.parameters()) if p is parameter)


def _as_gradients(delta: Tensor, model: nn.Module, scale: float) -> list[Tensor]:
    """``-delta / scale`` cut into tensors shaped like ``model``'s parameters."""
    flat = -delta / scale
    parts, start = [], 0
    for p in model.parameters():
        parts.append(flat[start : start + p.numel()].view_as(p))
        start += p.numel()
    return parts
