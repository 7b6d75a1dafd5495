"""Validation, the pipeline's first stage: the whole config checked before any data is loaded or model
built, every failure one ``UserError`` line naming the key, the bad value and the fix.

``keys`` checks every key against the schema (unknown keys, numeric ranges); this module checks
choices and combinations, importing the registries and rules it checks against.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from dptrain.adversarial import NORMS, PREPROCESSORS
from dptrain.adversarial import library
from dptrain.audit.extraction import OUTPUTS as EXTRACTION_OUTPUTS
from dptrain.audit.inversion import COSTS as INVERSION_COSTS
from dptrain.audit.inversion import PRIORS as INVERSION_PRIORS
from dptrain.audit.membership import LIRA_VARIANCES
from dptrain.config import AuditConfig, Config, DefenseConfig, LauncherConfig
from dptrain.data import DatasetInfo, SplitSizes, describe, split_sizes
from dptrain.errors import UserError
from dptrain.models import ACTIVATIONS, IMAGE_ONLY, MODELS, build_model
from dptrain.models.features import check_features
from dptrain.privacy import ACCOUNTANTS
from dptrain.privacy import crosscheck
from dptrain.privacy.plan import is_private
from dptrain.robust import alie_z, build_aggregator, build_attack, tolerated_byzantine
from dptrain.training import ranks
from dptrain.training.adversarial import check_adversarial
from dptrain.training.augmult import check_augmult
from dptrain.training.averaging import check_averaging
from dptrain.training.distributed import parallel_mode
from dptrain.training.pretrain import check_pretrain
from dptrain.training.proxy import check_proxy
from dptrain.training.poisoning import POISONING_ATTACKS, poisoned_count, poisons_members
from dptrain.training.representations import has_hidden_layer, output_layer
from dptrain.training.sanitization import CLUSTER_RULES, REPRESENTATIONS, SANITIZERS
from dptrain.training.threads import thread_count, usable_cores
from dptrain.validation.engine import validate_engine
from dptrain.validation.keys import check_known_keys, check_ranges

PRIVACY_NAMES = ("dpsgd", "none")
CLIPPING_MODES = ("flat", "per_layer")
GRAD_SAMPLE_MODES = ("auto", "hooks", "functorch", "ghost", "bk")
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "cosine", "step")
FEDERATIONS = ("none", "fedavg")
AUDIT_LEVELS = ("standard", "fast", "thorough", "implementation", "none")
WHITEBOX_SETTINGS = ("all_iterates", "final_model", "both")
MIA_ATTACKS = ("loss", "rmia", "lira")
AIA_RULES = ("imputation_prior", "loss", "confidence_prior")


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise UserError(f"{key}={value} is unknown: choose one of {', '.join(map(str, choices))}")


def validate(cfg: Config) -> tuple[DatasetInfo, SplitSizes]:
    """Check ``cfg`` before any data is loaded or model built; return the dataset's description and split sizes.

    Every failure is one ``UserError`` line naming the key, the bad value and the fix.
    """
    check_known_keys(cfg)
    check_ranges(cfg)
    info = describe(cfg.dataset, progress=cfg.train.progress)
    sizes = split_sizes(info, cfg.dataset)
    members = sizes.members

    model = cfg.model
    _choice("model", model.name, tuple(MODELS))
    _choice("model.activation", model.activation, tuple(ACTIVATIONS))
    if model.name in IMAGE_ONLY and info.modality != "image":
        raise UserError(
            f"model={model.name} needs image input but dataset={info.name} is tabular: use model=mlp or model=logreg"
        )
    if model.name != "cnn" and (model.skip or model.pool_to is not None):
        raise UserError(
            f"model.pool_to={model.pool_to} model.skip={model.skip} shape the cnn's head and model={model.name} would "
            "ignore them: use model=cnn, or leave them at null and false"
        )
    check_features(model, cfg.privacy.grad_sample_mode, info.modality, info.input_shape)

    privacy = cfg.privacy
    _choice("privacy", privacy.name, PRIVACY_NAMES)
    if privacy.accountant == "gdp":
        raise UserError(
            "privacy.accountant=gdp (Dong et al. 2019's central-limit approximation) under-reports epsilon for the "
            "step counts of a run, so dptrain does not report it: use privacy.accountant=prv (tight) or rdp; "
            "noise calibration already starts from GDP, so prv plans as fast"
        )
    _choice("privacy.accountant", privacy.accountant, ACCOUNTANTS)
    _choice("privacy.clipping", privacy.clipping, CLIPPING_MODES)
    _choice("privacy.grad_sample_mode", privacy.grad_sample_mode, GRAD_SAMPLE_MODES)
    target = privacy.target_epsilon
    baseline = privacy.name == "none" or (target is not None and math.isinf(target))
    if privacy.name == "none" and target is not None and math.isfinite(target):
        raise UserError(
            f"privacy=none trains without privacy but privacy.target_epsilon={target}: use privacy=dpsgd for a budget"
        )
    if privacy.noise_multiplier is not None:
        if baseline:
            raise UserError(
                f"privacy.noise_multiplier={privacy.noise_multiplier} conflicts with the non-private baseline "
                f"(privacy.target_epsilon=inf or privacy=none): drop the noise multiplier or set a finite target_epsilon"
            )
    elif target is None:
        raise UserError("privacy.target_epsilon=null needs privacy.noise_multiplier: set one of the two")
    if not baseline:
        if not privacy.poisson_sampling:
            raise UserError(
                "privacy.poisson_sampling=false would train on shuffled fixed-size batches, which the subsampled "
                "Gaussian accounting does not cover (Chua et al. 2024; without amplification the default job spends "
                "about 6.85, not 3): use privacy.poisson_sampling=true"
            )
        if privacy.delta >= 1.0 / members:
            raise UserError(
                f"privacy.delta={privacy.delta} must be in (0, 1/n) = (0, {1.0 / members:.3g}) for n={members} "
                f"training records: use e.g. privacy.delta={_suggest_delta(members)}"
            )
        crosscheck.pld_check_enabled(privacy.pld_check)
        if privacy.grad_sample_mode in ("ghost", "bk") and privacy.clipping != "flat":
            raise UserError(
                f"privacy.grad_sample_mode={privacy.grad_sample_mode} supports flat clipping only, not "
                f"privacy.clipping={privacy.clipping}: use privacy.clipping=flat or privacy.grad_sample_mode=hooks"
            )

    train = cfg.train
    _choice("train.optimizer", train.optimizer, OPTIMIZERS)
    _choice("train.lr_schedule", train.lr_schedule, LR_SCHEDULES)
    if train.batch_size > members:
        raise UserError(
            f"train.batch_size={train.batch_size} must be between 1 and the {members} training records of "
            f"dataset={info.name}: lower it"
        )
    _validate_device(train.device)
    _validate_threads(train.threads)
    check_adversarial(cfg)
    check_pretrain(cfg, _world_size(cfg), info.input_shape, info.num_classes)
    check_averaging(cfg)
    check_augmult(cfg, info.modality, info.input_shape, _world_size(cfg))
    check_proxy(cfg, _world_size(cfg))
    if train.resume is not None and not (Path(train.resume) / "checkpoint.pt").is_file():
        raise UserError(
            f"train.resume={train.resume} holds no checkpoint.pt, so there is nothing to resume: the run stopped "
            "before its first checkpoint (start it again) or this is not a run directory"
        )

    _validate_attackers(cfg)
    _validate_poisoning(cfg, info, members)
    _validate_sanitization(cfg, info, members)
    _validate_preprocessing(cfg, info)
    _validate_watermark(cfg, info)
    _validate_inversion(cfg.audit.inversion, info)
    _validate_launcher(cfg)
    _validate_federation(cfg, sizes)
    validate_engine(cfg, usable_cores())
    _validate_audit(cfg.audit, sizes.population)
    _validate_gradient_inversion(cfg, info, members)
    # Last, so that a setup that is wrong on any machine says so before this machine's limits do.
    _validate_process_count(cfg.launcher)
    return info, sizes


def _world_size(cfg: Config) -> int:
    """Processes of the run: ``launcher.nproc_per_node``, or WORLD_SIZE under an outside torchrun."""
    return max(cfg.launcher.nproc_per_node, int(os.environ.get("WORLD_SIZE", "1")))


def _validate_launcher(cfg: Config) -> None:
    """Several processes: data parallelism (DPDDP) or robust aggregation of the workers' gradients."""
    launcher, attack = cfg.launcher, cfg.attack
    _choice("launcher.backend", launcher.backend, ("auto", "gloo", "nccl"))
    world = _world_size(cfg)
    if world == 1:
        return
    if cfg.federation.name != "none":
        raise UserError(
            f"federation={cfg.federation.name} simulates its clients in one process: use launcher.nproc_per_node=1"
        )
    if launcher.backend == "nccl":
        import torch

        if not torch.cuda.is_available():
            raise UserError("launcher.backend=nccl needs CUDA GPUs: use launcher.backend=gloo (or auto) on CPU")

    if parallel_mode(cfg, world) == "dpddp":
        privacy = cfg.privacy
        if privacy.grad_sample_mode == "bk":
            # DPDDP all-reduces gradients as autograd accumulates them; book-keeping clipping writes them after.
            raise UserError(
                f"privacy.grad_sample_mode=bk over {world} workers (DPDDP) is not supported: "
                "use privacy.grad_sample_mode=auto (ghost there) or ghost"
            )
        if privacy.clipping == "per_layer" and privacy.grad_sample_mode != "hooks":
            # Opacus' distributed per-layer optimizer computes per-example gradients with hooks only.
            raise UserError(
                f"privacy.clipping=per_layer over {world} workers (DPDDP) needs privacy.grad_sample_mode=hooks, "
                f"not {privacy.grad_sample_mode}: set privacy.grad_sample_mode=hooks or privacy.clipping=flat"
            )
        return
    # Robust data parallelism: each rank sends one update per step, Byzantine ranks included.
    if cfg.train.batch_size < world:
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} is split over {world} workers: use at least {world}"
        )
    if not 0 <= attack.byzantine < world:
        raise UserError(f"attack.byzantine={attack.byzantine} must be in [0, {world}) workers: lower it")
    _validate_robust_step(cfg, world, f"over {world} workers")


def _validate_process_count(launcher: LauncherConfig) -> None:
    """At most as many worker processes as devices to run them: nccl gives each rank the GPU of its local
    rank, so never more ranks than GPUs; gloo ranks at most one per usable CPU core unless
    ``launcher.oversubscribe`` (more processes than cores multiplies memory and slows every step).
    Checked where ``dptrain`` spawns the processes, not in a rank an outside launcher started."""

    nproc = launcher.nproc_per_node
    if nproc == 1 or ranks.launched_by_torchrun():
        return
    if ranks.backend(launcher.backend) == "nccl":
        import torch

        gpus = torch.cuda.device_count()
        if nproc > gpus:
            raise UserError(
                f"launcher.nproc_per_node={nproc} exceeds the {gpus} GPU(s) here: nccl runs one process per GPU, "
                f"use launcher.nproc_per_node={gpus} (or launcher.backend=gloo for CPU processes)"
            )
        return
    cores = usable_cores()
    if nproc > cores and not launcher.oversubscribe:
        raise UserError(
            f"launcher.nproc_per_node={nproc} exceeds the {cores} CPU cores available here: use at most "
            f"{cores}, or launcher.oversubscribe=true to start {nproc} processes anyway"
        )


def _validate_robust_step(cfg: Config, n: int, where: str):
    """The aggregator and the attack over the n updates of a step (workers) or round (clients): the
    aggregator's precondition for n and its f, the attack's parameters and, for ALIE without
    ``attack.z``, its z at (n, attack.byzantine). Returns the attack."""

    aggregator, attack = cfg.aggregator, cfg.attack
    f = tolerated_byzantine(aggregator, attack)
    try:
        build_aggregator(aggregator, f, cfg.train.seed).check(n)
    except UserError as error:
        raise UserError(f"aggregator={aggregator.name} {where} with f={f} Byzantine: {error}") from None
    built = build_attack(attack, cfg.train.seed, cfg.federation.server_lr)
    if attack.name == "alie" and attack.z is None:
        alie_z(n, attack.byzantine)
    return built


def _validate_attackers(cfg: Config) -> None:
    """An attack needs attackers (Byzantine clients or workers, or centralized data poisoning's
    ``attack.poison_fraction`` of the members), and attackers need an attack."""
    attack = cfg.attack
    if attack.name != "none" and attack.byzantine == 0 and not poisons_members(cfg):
        poisoning = (
            ", or with federation=none attack.poison_fraction=<share of members>"
            if attack.name in POISONING_ATTACKS and cfg.federation.name == "none"
            else ""
        )
        raise UserError(
            f"attack={attack.name} with attack.byzantine=0 attacks nothing: set attack.byzantine=<count>{poisoning}"
        )
    if attack.name == "none" and attack.byzantine:
        raise UserError(
            f"attack.byzantine={attack.byzantine} with attack=none: the Byzantine clients or workers would train "
            "honestly yet be left out of the reported epsilon and the audit; choose an attack or attack.byzantine=0"
        )


def _validate_sanitization(cfg: Config, info: DatasetInfo, members: int) -> None:
    """Sanitization runs in the centralized recipe without Byzantine workers, and only without DP:
    it removes members by a rule that reads all of them, which the accountant does not cover. Its
    penultimate representation needs a model whose output layer is an ``nn.Linear`` fed by a hidden
    layer, each method's parameter is the only one it reads, and a k-NN vote has fewer voters than
    the ``members`` (each member's neighbours are the others)."""
    defense = cfg.defense
    method = defense.sanitize
    _choice("defense.sanitize", method, SANITIZERS)
    _choice("defense.representation", defense.representation, REPRESENTATIONS)
    _choice("defense.cluster_rule", defense.cluster_rule, CLUSTER_RULES)
    if method == "none":
        return
    if is_private(cfg.privacy):
        raise UserError(
            f"defense.sanitize={method} needs a non-private run (privacy.target_epsilon=inf): it drops members by "
            "a rule that reads every member, a step the reported epsilon does not cover"
        )
    if cfg.federation.name != "none" or cfg.attack.byzantine > 0:
        raise UserError(
            f"defense.sanitize={method} sanitizes a centralized run's members: use federation=none and "
            "attack.byzantine=0"
        )
    # Each method reads its own parameters; a value set for another would be silently ignored.
    reader = f"defense.sanitize={method}"
    clustering = ("cluster_threshold", "cluster_rule", "silhouette_threshold")
    unread = {
        "spectral_signatures": (*clustering, "neighbours"),
        "activation_clustering": ("remove_fraction", "neighbours"),
        "knn_label_consistency": ("remove_fraction", *clustering),
    }[method]
    if method == "activation_clustering" and defense.cluster_rule == "size":
        reader, unread = f"{reader} with defense.cluster_rule=size", (*unread, "silhouette_threshold")
    for key in unread:
        if getattr(defense, key) != getattr(DefenseConfig, key):
            raise UserError(
                f"defense.{key}={getattr(defense, key)} is not read by {reader}: leave it at {getattr(DefenseConfig, key)}"
            )
    if method == "knn_label_consistency" and defense.neighbours >= members:
        raise UserError(
            f"defense.neighbours={defense.neighbours} needs more than {defense.neighbours} members to vote among, and "
            f"the run has {members}: lower defense.neighbours"
        )
    if defense.representation == "penultimate":
        # A throwaway model, built without consuming the global RNG the run seeds from.
        with torch.random.fork_rng(devices=[]):
            model = build_model(cfg.model, info.input_shape, info.num_classes)
        if output_layer(model) is None:
            raise UserError(
                f"defense.representation=penultimate reads the input of the output layer, and model={cfg.model.name} "
                "does not end in an nn.Linear: use defense.representation=input"
            )
        if not has_hidden_layer(model):
            raise UserError(
                f"defense.representation=penultimate: model={cfg.model.name} has no hidden layer, so its penultimate "
                "representation is the input itself: use defense.representation=input"
            )


def _validate_preprocessing(cfg: Config, info: DatasetInfo) -> None:
    """Inference-time preprocessing and torchattacks' APGD work on pixels in [0, 1], so on images only;
    the preprocessing is measured by the evasion audit alone, so it asks for that audit."""
    method = cfg.defense.preprocess
    _choice("defense.preprocess", method, PREPROCESSORS)
    if method != "none" and info.modality != "image":
        raise UserError(
            f"defense.preprocess={method} works on pixels and dataset={info.name} is a table (standard deviations "
            "have no bit depth nor neighbours): use defense.preprocess=none"
        )
    if method != "none" and not cfg.audit.evasion.enabled:
        raise UserError(
            f"defense.preprocess={method} is measured by the evasion audit alone, which is off: add "
            "audit.evasion.enabled=true (or audit=thorough)"
        )
    if cfg.audit.evasion.enabled and cfg.audit.evasion.apgd:
        if info.modality != "image":
            raise UserError(
                f"audit.evasion.apgd=true runs torchattacks, which clamps inputs to pixels in [0, 1], and "
                f"dataset={info.name} is a table: set audit.evasion.apgd=false"
            )
        if not library.available():
            raise UserError('audit.evasion.apgd=true needs torchattacks: pip install "dptrain[attacks]"')


def _validate_watermark(cfg: Config, info: DatasetInfo) -> None:
    """A trigger-set watermark (``dptrain.watermark``) is noise images: image data, and the records of one
    training set, which the centralized recipe's privacy plan counts (``training_size``). Federated
    clients and robust data parallelism split or poison records per client or rank, not planned for keys."""
    if not cfg.train.watermark.enabled:
        return
    if info.modality != "image":
        raise UserError(
            f"train.watermark.enabled=true draws noise images as keys: dataset={info.name} is not image data "
            "(use digits, mnist, fashion_mnist or cifar10)"
        )
    if cfg.federation.name != "none" or parallel_mode(cfg, cfg.launcher.nproc_per_node) == "robust":
        raise UserError(
            "train.watermark.enabled=true trains the keys in the centralized recipe only: use federation=none, "
            "and with launcher.nproc_per_node > 1 private training with the mean aggregator and no Byzantine workers"
        )


def _validate_inversion(inversion, info: DatasetInfo) -> None:
    """Model inversion reconstructs images in pixels: image data, and classes the dataset has."""
    _choice("audit.inversion.prior", inversion.prior, INVERSION_PRIORS)
    _choice("audit.inversion.cost", inversion.cost, INVERSION_COSTS)
    if not inversion.enabled:
        return
    if info.modality != "image":
        raise UserError(
            f"audit.inversion.enabled=true reconstructs images and dataset={info.name} is a table: on tabular data "
            "model inversion is attribute inference (Fredrikson et al. 2014), so use audit.aia.enabled=true "
            "and audit.inversion.enabled=false"
        )
    classes = list(inversion.classes)
    if len(set(classes)) != len(classes) or any(c >= info.num_classes for c in classes):
        raise UserError(
            f"audit.inversion.classes={classes}: list distinct classes of dataset={info.name} (0 to "
            f"{info.num_classes - 1}), or [] for every class"
        )


def _validate_poisoning(cfg: Config, info: DatasetInfo, members: int) -> None:
    """A data-poisoning attack's parameters against the data (any recipe: the trigger fits the input,
    the target label is a class, a targeted label flip's two classes differ) and, for centralized
    poisoning (``poisons_members``), its share of the ``members`` in [0, 1) or its count below them
    (exactly one given), poisoning at least one record unless it is a backdoor or a targeted label flip
    given 0 (it then measures its baseline on a clean model: the trigger's success rate, the source
    class's accuracy)."""
    attack = cfg.attack
    if attack.name == "backdoor":
        spatial = info.input_shape[-2:] if len(info.input_shape) >= 2 else info.input_shape[-1:]
        if attack.trigger_size > min(spatial):
            raise UserError(
                f"attack.trigger_size={attack.trigger_size} does not fit dataset={info.name}'s inputs of shape "
                f"{tuple(info.input_shape)}: use at most {min(spatial)}"
            )
        if attack.target_label >= info.num_classes:
            raise UserError(
                f"attack.target_label={attack.target_label} is not one of dataset={info.name}'s {info.num_classes} "
                f"classes: use 0 to {info.num_classes - 1}"
            )
    if attack.source_label is not None:
        if attack.name != "label_flip":
            raise UserError(
                f"attack.source_label={attack.source_label} is the targeted label flip's source class: use "
                f"attack=label_flip, not attack={attack.name}, or attack.source_label=null"
            )
        for key, label in (("source_label", attack.source_label), ("target_label", attack.target_label)):
            if label >= info.num_classes:
                raise UserError(
                    f"attack.{key}={label} is not one of dataset={info.name}'s {info.num_classes} classes: use 0 "
                    f"to {info.num_classes - 1}"
                )
        if attack.source_label == attack.target_label:
            raise UserError(
                f"attack.source_label={attack.source_label} equals attack.target_label: a targeted label flip "
                "relabels one class as another, choose two different classes"
            )
    if not poisons_members(cfg):
        if attack.poison_count is not None:
            raise UserError(
                f"attack.poison_count={attack.poison_count} counts poisoned members of centralized poisoning "
                "(federation=none, attack.byzantine=0): use attack.poison_fraction for Byzantine clients' records"
            )
        return
    fraction, count = attack.poison_fraction, attack.poison_count
    if (fraction is None) == (count is None):
        given = "both" if count is not None else "neither"
        raise UserError(
            f"attack={attack.name} poisons members given attack.poison_fraction=<share> or attack.poison_count="
            f"<records>, exactly one of the two ({given} given): set the other to null"
        )
    if fraction is not None and not 0 <= fraction < 1:
        raise UserError(
            f"attack.poison_fraction={fraction} is the share of the {members} members to poison and must be in "
            "[0, 1): a run on poisoned records only has no clean task to measure"
        )
    if count is not None and count >= members:
        raise UserError(
            f"attack.poison_count={count} must be below the {members} members: a run on poisoned records only has "
            "no clean task to measure"
        )
    # A backdoor or targeted flip at 0 measures its baseline (trigger, source-class accuracy) on a clean model.
    baseline = attack.name == "backdoor" or attack.source_label is not None
    if poisoned_count(attack, members) == 0 and not (baseline and not fraction):
        given = f"poison_count={count}" if count is not None else f"poison_fraction={fraction}"
        raise UserError(
            f"attack={attack.name} attack.{given} poisons 0 of the {members} members: raise it (a backdoor or a "
            "targeted label flip at 0 measures its baseline)"
        )


def _validate_federation(cfg: Config, sizes: SplitSizes) -> None:
    """Federation, aggregator, attack and launcher: the combinations of clients, rules and attackers.

    The aggregator's precondition is checked for n = clients_per_round and f = aggregator.f (null:
    attack.byzantine), the most Byzantine updates a round can hold.
    """
    federation, attack, aggregator = cfg.federation, cfg.attack, cfg.aggregator
    _choice("federation", federation.name, FEDERATIONS)
    if federation.name == "none":
        if _world_size(cfg) == 1 and (aggregator.name != "mean" or attack.byzantine):
            raise UserError(
                f"aggregator={aggregator.name} attack={attack.name} need several clients or workers (attack.byzantine="
                f"{attack.byzantine}): one process has one update per step, use federation=fedavg, "
                "launcher.nproc_per_node>1, or aggregator=mean with attack=none or centralized data poisoning "
                "(attack=label_flip|backdoor attack.byzantine=0 attack.poison_fraction=<share of members>)"
            )
        return

    if federation.clients > sizes.members:
        raise UserError(
            f"federation.clients={federation.clients} exceeds the {sizes.members} member records to partition: "
            "lower federation.clients"
        )
    per_round = federation.clients if federation.clients_per_round is None else federation.clients_per_round
    if per_round > federation.clients:
        raise UserError(
            f"federation.clients_per_round={federation.clients_per_round} must be between 1 and "
            f"federation.clients={federation.clients}: lower it, or null for every client in every round"
        )
    _choice("federation.partition", federation.partition, ("iid", "dirichlet"))
    _choice("federation.dp_level", federation.dp_level, ("sample", "user"))
    if federation.dp_level == "user" and (aggregator.name != "mean" or aggregator.pre):
        pre = f" with aggregator.pre={list(aggregator.pre)}" if aggregator.pre else ""
        raise UserError(
            f"federation.dp_level=user (DP-FedAvg) calibrates its noise to the mean of clipped updates, not to "
            f"aggregator={aggregator.name}{pre}: use aggregator=mean without pre-aggregators, or "
            "federation.dp_level=sample"
        )
    if not 0 <= attack.byzantine < per_round:
        raise UserError(
            f"attack.byzantine={attack.byzantine} must be in [0, federation.clients_per_round={per_round}): "
            "a round needs an honest client, lower attack.byzantine"
        )
    if cfg.audit.canaries.count:
        raise UserError(
            f"audit.canaries.count={cfg.audit.canaries.count}: canaries are inserted into centralized training only, "
            "set audit.canaries.count=0 with federation=fedavg"
        )
    mia = cfg.audit.mia
    if "rmia" in mia.attacks and "lira" not in mia.attacks and sizes.population < federation.clients:
        # RMIA's reference models are federations of the same clients over the population.
        raise UserError(
            f"audit.mia.attacks=[rmia] trains reference federations of federation.clients={federation.clients} "
            f"clients on the {sizes.population} population records: lower federation.clients or raise "
            "dataset.population_fraction"
        )
    built = _validate_robust_step(cfg, per_round, f"with federation.clients_per_round={per_round} updates per round")
    if federation.dp_level == "user" and built.omniscient and is_private(cfg.privacy):
        raise UserError(
            f"attack={attack.name} crafts its updates from the honest clients' unclipped ones, so one client would "
            f"move the DP-FedAvg mean by more than the clipping norm its noise is sized for: with "
            "federation.dp_level=user use a non-omniscient attack (sign_flip, gaussian, label_flip, backdoor), or "
            "federation.dp_level=sample"
        )


def _validate_audit(audit: AuditConfig, population: int) -> None:

    _choice("audit", audit.name, AUDIT_LEVELS)
    for attack in audit.mia.attacks:
        _choice("audit.mia.attacks", attack, MIA_ATTACKS)
    _choice("audit.mia.lira_variance", audit.mia.lira_variance, LIRA_VARIANCES)
    references = audit.mia.reference_models
    if "lira" in audit.mia.attacks and (references < 4 or references % 2):
        raise UserError(
            f"audit.mia.reference_models={references}: LiRA needs an even number of at least 4 reference models "
            "(each record is IN for half of them): set audit.mia.reference_models=4 or more"
        )
    if "rmia" in audit.mia.attacks and references < 1:
        raise UserError(f"audit.mia.reference_models={references}: RMIA needs at least 1 reference model")
    _choice("audit.aia.rule", audit.aia.rule, AIA_RULES)
    whitebox = audit.whitebox
    _choice("audit.whitebox.setting", whitebox.setting, WHITEBOX_SETTINGS)
    if whitebox.enabled and not crosscheck.available():
        raise UserError(
            'audit.whitebox needs the dp-accounting package for its f-DP bound (the accountant\'s curves): '
            'pip install "dptrain[accounting]"'
        )
    for norm in audit.evasion.norms:
        _choice("audit.evasion.norms", norm, NORMS)
    for norm in ("linf", "l2"):
        budgets = list(getattr(audit.evasion, f"budgets_{norm}"))
        if norm in audit.evasion.norms and not budgets:
            raise UserError(f"audit.evasion.budgets_{norm} is empty: list budgets, or drop {norm} from audit.evasion.norms")
        if budgets != sorted(set(budgets)):
            raise UserError(
                f"audit.evasion.budgets_{norm}={budgets}: list the budgets in increasing order without repeats, "
                "ending with the unbounded one"
            )
    _extraction(audit.extraction)
    if audit.canaries.count > population // 2:
        raise UserError(
            f"audit.canaries.count={audit.canaries.count} must be between 0 and half the {population} population "
            "records (canaries are drawn from the population): lower it or raise dataset.population_fraction"
        )


def _extraction(extraction) -> None:
    """The extraction audit's interfaces and budgets (each budget >= 1 is checked with the ranges)."""
    for output in extraction.output:
        _choice("audit.extraction.output", output, EXTRACTION_OUTPUTS)
    if not extraction.enabled:
        return
    if not extraction.output:
        raise UserError(f"audit.extraction.output is empty: list one or more of {', '.join(EXTRACTION_OUTPUTS)}")
    budgets = list(extraction.queries)
    if not budgets or budgets != sorted(set(budgets)):
        raise UserError(
            f"audit.extraction.queries={budgets}: list the query budgets in increasing order without repeats, "
            "e.g. [100,1000,10000]"
        )


def _validate_gradient_inversion(cfg: Config, info: DatasetInfo, members: int) -> None:
    """The gradient inversion audit inverts one federated client's update, read as a plain SGD gradient,
    into images (``dptrain.audit.gradient_inversion``)."""
    settings = cfg.audit.gradient_inversion
    if not settings.enabled:
        return
    if cfg.federation.name != "fedavg":
        raise UserError(
            "audit.gradient_inversion.enabled=true attacks a federated client's update to the server: "
            "use federation=fedavg, or set audit.gradient_inversion.enabled=false"
        )
    if info.modality != "image":
        raise UserError(
            f"audit.gradient_inversion reconstructs images and scores them in pixels (PSNR, total-variation "
            f"prior): dataset={info.name} is a table; use an image dataset (digits, mnist, ...)"
        )
    if cfg.train.optimizer != "sgd" or cfg.train.weight_decay != 0:
        raise UserError(
            f"audit.gradient_inversion reads a client's update as -lr * steps * gradient, true of SGD without "
            f"weight decay only (train.optimizer={cfg.train.optimizer}, train.weight_decay={cfg.train.weight_decay}): "
            "use train.optimizer=sgd train.weight_decay=0"
        )
    if cfg.train.adversarial != "none":
        raise UserError(
            f"audit.gradient_inversion simulates local training on clean records, and train.adversarial="
            f"{cfg.train.adversarial} trains on adversarial examples: use train.adversarial=none"
        )
    needed = settings.clients * settings.records
    if needed > members:
        raise UserError(
            f"audit.gradient_inversion attacks clients * records = {needed} members and the split has {members}: "
            "lower audit.gradient_inversion.clients or .records"
        )


def _suggest_delta(members: int) -> str:
    exponent = math.ceil(math.log10(members)) + 1
    return f"1e-{exponent}"


def _validate_threads(setting: str) -> None:
    try:
        thread_count(setting)
    except ValueError as error:
        raise UserError(f"{error}: use train.threads=auto (timed on the run's model) or e.g. train.threads=1") from None


def _validate_device(device: str) -> None:
    if device in ("auto", "cpu"):
        return
    if device == "cuda" or device.startswith("cuda:"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"train.device={device} but CUDA is not available here: use train.device=cpu or auto")
        return
    raise UserError(f"train.device={device} is unknown: use auto, cpu, cuda or cuda:<index>")
