"""Several small models of one recipe trained at once as one stacked model (``torch.func``): a
membership audit's reference models, each trained exactly as ``train_model`` trains it alone.

The K models' parameters are stacked along a leading dimension (``stack_module_state``); one
``vmap`` over the models of a ``vmap`` over the examples of ``grad`` of the one-example loss gives
every model's per-example gradients in one call (the functorch recipe of Opacus'
``grad_sample_mode=functorch``). Each model keeps its own streams, derived from its ``train.seed``
as ``train_model`` derives them: its initialization, its batches (Poisson at the plan's rate, or the
baseline's shuffled batches: the batch samplers of the loaders ``make_private`` builds)
and its noise. Batches of different sizes are padded to the largest, and a padded example's
weight is zero, so model k's update is DP-SGD's (Abadi et al. 2016, Algorithm 1, with Opacus'
conventions): the sum over its batch of per-example gradients clipped to norm C (factor
min(1, C / (norm + 1e-6))), plus N(0, (sigma C)^2) drawn per parameter in order from its noise
generator, divided by its expected batch size int(n q). SGD and Adam act coordinate by coordinate,
so one optimizer over the stacked parameters steps each model as its own optimizer would.
"""

from __future__ import annotations

import copy
import itertools
import math

import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap
from torch.utils.data import TensorDataset

from dptrain.config import Config
from dptrain.models import build_model, ensure_dp_compatible
from dptrain.privacy import PrivacyPlan
from dptrain.privacy.plan import is_private
from dptrain.privacy.engine import baseline_loader, poisson_loader
from dptrain.seeds import Stream, derived_seed
from dptrain.training.recipe import make_optimizer, make_scheduler

# The zoo's models whose per-example gradients vmap handles and whose stacks fit in memory.
STACKABLE_MODELS = ("logreg", "mlp", "cnn")
# Per-example gradients held at once (bytes): larger batches are handled in slices of examples.
PER_EXAMPLE_BUDGET = 256 * 2**20


def unstackable(cfg: Config) -> str | None:
    """The setting that keeps ``cfg``'s models from being trained stacked, None when nothing does."""
    if cfg.federation.name != "none":
        return f"federation={cfg.federation.name}"
    if cfg.model.name not in STACKABLE_MODELS:
        return f"model={cfg.model.name}"
    # kymatio's scattering writes its FFT buffers in place, which vmap cannot batch.
    if cfg.model.features != "none":
        return f"model.features={cfg.model.features}"
    if cfg.train.adversarial != "none":
        return f"train.adversarial={cfg.train.adversarial}"
    if cfg.privacy.clipping != "flat":
        return f"privacy.clipping={cfg.privacy.clipping}"
    # The stacked loop starts from fresh weights and returns the last iterate: train_model alone starts
    # from the public model (and freezes for last_layer) and returns the average of the iterates.
    if cfg.train.pretrain != "none":
        return f"train.pretrain={cfg.train.pretrain}"
    if cfg.train.ema is not None:
        return f"train.ema={cfg.train.ema}"
    if cfg.train.augmult > 1:
        return f"train.augmult={cfg.train.augmult}"
    return None


def _example_gradients(base: nn.Module):
    """(params, buffers, inputs, labels) -> per-example gradients, (K, B, *shape) per parameter, of
    the cross-entropy of each model k on each of its examples ``inputs[k, i]``."""

    def loss(params, buffers, x, y):
        logits = functional_call(base, (params, buffers), (x.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, y.unsqueeze(0))

    return vmap(vmap(grad(loss), in_dims=(None, None, 0, 0)), in_dims=(0, 0, 0, 0))


def weighted_gradient_sums(
    base: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    max_grad_norm: float | None,
) -> dict[str, torch.Tensor]:
    """Per model k, the sum over examples i of ``weights[k, i]`` times model k's gradient on
    ``(inputs[k, i], labels[k, i])``, each first clipped to ``max_grad_norm`` (Opacus' flat clipping)
    unless it is None. ``params`` and ``buffers`` are stacked (K, ...) tensors of ``base``'s."""
    per_example = _example_gradients(base)
    size = sum(p[0].numel() for p in params.values()) * inputs.shape[0] * params[next(iter(params))].element_size()
    chunk = max(1, PER_EXAMPLE_BUDGET // size)
    detached = {name: p.detach() for name, p in params.items()}
    sums = {name: torch.zeros_like(p) for name, p in detached.items()}
    for start in range(0, inputs.shape[1], chunk):
        part = slice(start, start + chunk)
        grads = per_example(detached, buffers, inputs[:, part], labels[:, part])
        factor = weights[:, part]
        if max_grad_norm is not None:
            norms = torch.stack([g.flatten(2).norm(dim=2) for g in grads.values()], dim=2).norm(dim=2)
            factor = factor * (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for name, g in grads.items():
            sums[name] += torch.einsum("ki,ki...->k...", factor, g)
    return sums


def private_gradients(
    sums: dict[str, torch.Tensor],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    noise: list[torch.Generator],
    expected_batch_sizes: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """DP-SGD's gradient of each model k from its clipped sums: plus N(0, (sigma C)^2) drawn per
    parameter, in order, from ``noise[k]`` (Opacus' draw, so model k's noise is the one it would draw
    alone), divided by ``expected_batch_sizes[k]``."""
    std = noise_multiplier * max_grad_norm
    noised = {}
    for name, total in sums.items():
        draws = [torch.normal(0, std, size=total.shape[1:], generator=g, device=total.device, dtype=total.dtype) for g in noise]
        per_model = expected_batch_sizes.to(total).view(-1, *[1] * (total.dim() - 1))
        noised[name] = (total + torch.stack(draws)) / per_model
    return noised


class _Records:
    """The models' training sets side by side on ``device`` (a set several models share, once), so that a
    step's batches are gathered by one indexing."""

    def __init__(self, train_sets: list[TensorDataset], device: torch.device) -> None:
        distinct = list({id(data): data for data in train_sets}.values())
        offsets = dict(zip(map(id, distinct), [0, *itertools.accumulate(len(data) for data in distinct)]))
        self.starts = torch.tensor([offsets[id(data)] for data in train_sets])
        self.inputs, self.labels = (torch.cat(parts).to(device) for parts in zip(*(data.tensors for data in distinct)))
        self.device = device

    def batch(self, positions: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, labels, mask) of shape (K, B, ...): model k's records at ``positions[k]``, then copies
        of its first record (mask False) up to the largest batch (at least one)."""
        lengths = torch.tensor([len(batch) for batch in positions])
        mask = torch.arange(max(1, int(lengths.max()))) < lengths[:, None]
        index = torch.zeros(mask.shape, dtype=torch.long)
        index[mask] = torch.tensor(list(itertools.chain.from_iterable(positions)), dtype=torch.long)
        index = (index + self.starts[:, None]).flatten().to(self.device)
        # index_select: several times faster than advanced indexing on the CPU.
        inputs = self.inputs.index_select(0, index).view(*mask.shape, *self.inputs.shape[1:])
        return inputs, self.labels.index_select(0, index).view(mask.shape), mask.to(self.device)


def _train_stack(
    cfgs: list[Config], train_sets: list[TensorDataset], plan: PrivacyPlan, input_shape, num_classes: int,
    device: torch.device,
) -> list[dict]:
    """State dicts of the models of ``cfgs`` (one recipe, own seeds) on ``train_sets``, all under
    ``plan``'s schedule (the same steps per epoch), trained stacked."""
    train = cfgs[0].train
    models = []
    for cfg in cfgs:
        torch.manual_seed(derived_seed(cfg.train.seed, Stream.MODEL))
        model = build_model(cfg.model, input_shape, num_classes)
        if plan.private:
            model, _ = ensure_dp_compatible(model)
        models.append(model.to(device))
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    optimizer = make_optimizer(train, params.values())
    scheduler = make_scheduler(train, optimizer)
    sampling = [torch.Generator().manual_seed(derived_seed(cfg.train.seed, Stream.SAMPLING, 0)) for cfg in cfgs]
    noise = [torch.Generator(device=device).manual_seed(derived_seed(cfg.train.seed, Stream.NOISE, 0)) for cfg in cfgs]
    # The loaders train_model's make_private builds: the same draws from the same streams.
    if plan.private:
        loaders = [poisson_loader(data, plan, g) for data, g in zip(train_sets, sampling)]
        # Opacus' expected batch size for a loader of len(data) records at rate 1 / len(loader).
        expected = torch.tensor([int(len(data) * (1 / plan.steps_per_epoch)) for data in train_sets])
    else:
        loaders = [baseline_loader(data, plan, train.batch_size, g) for data, g in zip(train_sets, sampling)]
    records = _Records(train_sets, device)
    for _ in range(train.epochs):
        # Starting an epoch, a DataLoader draws its workers' base seed from its generator, then its batch
        # sampler draws the batches: the same draws here, with the records gathered by position at once.
        for loader in loaders:
            iter(loader)
        for batches in zip(*(loader.batch_sampler for loader in loaders)):
            inputs, labels, mask = records.batch(batches)
            if plan.private:
                sums = weighted_gradient_sums(base, params, buffers, inputs, labels, mask.float(), plan.max_grad_norm)
                grads = private_gradients(
                    sums, noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm, noise=noise,
                    expected_batch_sizes=expected,
                )  # fmt: skip
            else:
                # The baseline's loss is the mean over the batch drawn.
                weights = mask.float() / mask.sum(dim=1, keepdim=True).clamp(min=1)
                grads = weighted_gradient_sums(base, params, buffers, inputs, labels, weights, None)
            for name, p in params.items():
                p.grad = grads[name]
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return [
        {name: (params | buffers)[name][k].detach().clone() for name in model.state_dict()}
        for k, model in enumerate(models)
    ]


def _plan(cfg: Config, records: int) -> PrivacyPlan:
    """``plan_privacy``'s plan for ``records`` at ``cfg``'s fixed noise multiplier, without its epsilon:
    a reference model reports none, and a PRV epsilon costs more than training a small stack."""
    steps_per_epoch = math.ceil(records / cfg.train.batch_size)
    private = is_private(cfg.privacy)
    if private and cfg.privacy.noise_multiplier is None:
        raise ValueError("stacked models train at a fixed privacy.noise_multiplier (reference_config sets the target's)")
    return PrivacyPlan(
        private=private, accountant=cfg.privacy.accountant, delta=cfg.privacy.delta, target_epsilon=None,
        noise_multiplier=cfg.privacy.noise_multiplier if private else 0.0,
        max_grad_norm=cfg.privacy.max_grad_norm if private else None, sample_rate=1.0 / steps_per_epoch,
        steps_per_epoch=steps_per_epoch, steps=cfg.train.epochs * steps_per_epoch, planned_epsilon=None,
    )  # fmt: skip


def train_stacked(cfgs: list[Config], train_sets: list[TensorDataset], *, input_shape, num_classes: int, device) -> list[dict]:
    """The state dicts ``train_model(cfgs[k], train_sets[k])`` would train (to float rounding), for
    configs that differ only in ``train.seed``, that ``unstackable`` lets through and, when private, fix
``privacy.noise_multiplier`` (``reference_config``: the target's). Models whose
    plans take the same steps per epoch train in one stack (the halves scheme's training sets differ
    in size, so a few groups)."""
    plans = [_plan(cfg, len(data)) for cfg, data in zip(cfgs, train_sets)]
    states: list[dict | None] = [None] * len(cfgs)
    order = sorted(range(len(cfgs)), key=lambda k: plans[k].steps_per_epoch)
    for _, group in itertools.groupby(order, key=lambda k: plans[k].steps_per_epoch):
        group = list(group)
        trained = _train_stack(
            [cfgs[k] for k in group], [train_sets[k] for k in group], plans[group[0]], input_shape, num_classes,
            device,
        )  # fmt: skip
        for k, state in zip(group, trained):
            states[k] = state
    return states
