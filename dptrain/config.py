"""The config schema (dataclasses in Hydra's ConfigStore), one dataclass per config group.

Each group of ``conf/`` merges into the matching typed node below, so a typo in
an override key or a value of the wrong type fails in Hydra before anything
runs. ``validate`` adds the cross-field checks (sizes, budgets, combinations).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class DatasetConfig:
    name: str = "digits"
    # torchvision datasets: where the files are, and whether to fetch them.
    root: str = "data"
    download: bool = False
    # csv: file, label column, optional sensitive (categorical) column, and
    # columns to one-hot encode besides the non-numeric ones found automatically;
    # a one-hot column may have at most max_categories values, and every class of
    # the target needs min_class_records records (a stray label is refused).
    path: Optional[str] = None
    target: Optional[str] = None
    sensitive: Optional[str] = None
    categorical: List[str] = field(default_factory=list)
    max_categories: int = 50
    min_class_records: int = 10
    # synthetic: size and shape of the generated table.
    n_samples: int = 4000
    n_features: int = 10
    n_classes: int = 2
    sensitive_correlation: float = 0.8
    # split: seeded, disjoint members / non-members (same size) / population / test.
    seed: int = 0
    test_fraction: float = 0.2
    population_fraction: float = 0.2
    max_members: Optional[int] = None


@dataclass
class ModelConfig:
    name: str = "mlp"
    hidden: List[int] = field(default_factory=lambda: [64])
    channels: List[int] = field(default_factory=lambda: [16, 32])
    width: int = 16
    blocks: List[int] = field(default_factory=lambda: [1, 1, 1])
    groups: int = 4
    activation: str = "relu"
    # Start the output layer (the last nn.Linear) at zero, as De et al. 2022 do for DP-SGD.
    zero_head: bool = False
    # scattering: a fixed ScatterNet in front of the model (Tramer & Boneh 2021) at scale scattering_j
    # (null: 1 below 16 pixels, else 2); dptrain.models.features.
    features: str = "none"
    scattering_j: Optional[int] = None
    # Standardize each convolution's kernel per output channel in the forward pass (Qiao et al. 2019).
    weight_standardization: bool = False
    # cnn: average-pool the last block's output to pool_to x pool_to instead of a 2x2 max-pool per block
    # (null: max-pool), and skip: the head also reads the flattened input (docs/guide/recipes.md).
    pool_to: Optional[int] = None
    skip: bool = False


@dataclass
class PrivacyConfig:
    name: str = "dpsgd"
    # inf is the non-private baseline (no clipping, no noise); null with an
    # explicit noise_multiplier trains with that noise and reports what it spent.
    target_epsilon: Optional[float] = 3.0
    delta: float = 1e-5
    noise_multiplier: Optional[float] = None
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    clipping: str = "flat"
    # auto: time hooks, functorch, ghost and bk (book-keeping) clipping on the run's model and batch
    # shape before training and take the fastest (dptrain.privacy.mode_race).
    grad_sample_mode: str = "auto"
    poisson_sampling: bool = True
    # Recompute epsilon with dp-accounting's PLD accountant (metrics.json epsilon_pld) and warn when the
    # reported one is lower: null where dp-accounting is installed, true to require it, false to skip.
    pld_check: Optional[bool] = None


@dataclass
class WatermarkConfig:
    # A trigger-set watermark (Adi et al. 2018, dptrain.watermark): `count` uniform-noise images (keys) with
    # secret random labels, trained with the members and stored in the run's watermark.pt.
    enabled: bool = False
    count: int = 100


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 256
    max_physical_batch_size: Optional[int] = None
    optimizer: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    seed: int = 0
    device: str = "auto"
    # Torch intra-op threads: auto (timed on a few throwaway steps of the run's model, within this
    # process's share of the cores: dptrain.training.threads) or a count, e.g. "1".
    threads: str = "auto"
    resume: Optional[str] = None
    checkpoint: bool = True
    progress: bool = True
    # none, pgd (train on PGD L-inf adversarial examples) or trades (CE + trades_beta * KL to the
    # prediction at TRADES' adversarial examples): dptrain.training.adversarial. Radius
    # adversarial_eps in the data's units (pixels in [0, 1], standard deviations for tables).
    adversarial: str = "none"
    adversarial_eps: float = 0.1
    adversarial_steps: int = 7
    trades_beta: float = 6.0
    watermark: WatermarkConfig = field(default_factory=WatermarkConfig)
    # Public pretraining (dptrain.training.pretrain): none, or population: train without privacy on the
    # population split (assumed public, never the members) for pretrain_epochs at pretrain_lr, then
    # fine-tune with DP-SGD on the members, every parameter (finetune=full) or the last layer only
    # (last_layer). Epsilon covers the fine-tuning alone. pretrain_seed null: train.seed.
    pretrain: str = "none"
    finetune: str = "full"
    pretrain_epochs: int = 30
    pretrain_lr: float = 0.1
    pretrain_seed: Optional[int] = None
    # Parameter averaging (dptrain.training.averaging): null, or the decay of an exponential moving average
    # of the iterates after every step, which the run returns (post-processing: epsilon unchanged).
    ema: Optional[float] = None
    # Augmentation multiplicity (dptrain.training.augmult): each example becomes augmult views (image
    # translations by up to augment_shift pixels, horizontal flips if augment_flip) whose gradients are
    # averaged before clipping (epsilon unchanged). 1: off.
    augmult: int = 1
    augment_shift: int = 1
    augment_flip: bool = False
    # Tuning on a proxy (dptrain.training.proxy): none, or population: train on half of the population split
    # (assumed public, never the members) at the members' sample rate, steps and noise-to-batch ratio, and
    # report the accuracy on its other half; audit=none, nothing accounted (scripts/tune_recipe.py --proxy).
    proxy: str = "none"


@dataclass
class FlowerConfig:
    # Simulation Engine backend (flwr 1.42 ships "ray") and each ClientApp's share of the machine.
    backend: str = "ray"
    client_cpus: float = 1.0
    client_gpus: float = 0.0


@dataclass
class FederationConfig:
    name: str = "none"
    clients: int = 10
    rounds: int = 20
    # null: every client takes part in every round. With dp_level=user clients are Poisson-sampled
    # at rate clients_per_round / clients, so this is the expected count per round.
    clients_per_round: Optional[int] = None
    local_epochs: int = 1
    # iid, or dirichlet: each class spread over the clients in proportions ~ Dirichlet(alpha).
    partition: str = "iid"
    alpha: float = 0.5
    # sample: each client runs DP-SGD on its records; user: DP-FedAvg, clipped updates and server noise.
    dp_level: str = "sample"
    server_lr: float = 1.0
    # builtin: clients trained in this process; flower: a Flower ServerApp / ClientApp run under the
    # Simulation Engine (pip install "dptrain[flower]"), same rounds and aggregates.
    engine: str = "builtin"
    flower: FlowerConfig = field(default_factory=FlowerConfig)


@dataclass
class AggregatorConfig:
    name: str = "mean"
    # Number of Byzantine updates the rule tolerates; null means attack.byzantine.
    f: Optional[int] = None
    # Pre-aggregators applied in order before the rule: nnm, bucketing, clipping.
    pre: List[str] = field(default_factory=list)
    # multi_krum: how many best-scored updates to average; null means n - f.
    m: Optional[int] = None
    # geometric_median: Weiszfeld smoothing, step tolerance (relative to the median distance), iteration cap.
    nu: float = 1e-6
    tol: float = 1e-6
    max_iter: int = 100
    # centered_clipping: clipping radius around the previous aggregate, clipping iterations per round.
    tau: float = 10.0
    iterations: int = 1
    # pre-aggregators: updates per bucket (bucketing), norm bound (clipping).
    bucket_size: int = 2
    clip_threshold: float = 1.0


@dataclass
class AttackConfig:
    name: str = "none"
    byzantine: int = 0
    # sign_flip: the Byzantine update is -scale times the client's own update.
    scale: float = 1.0
    # gaussian: mean and standard deviation of the noise sent instead of an update.
    noise_mean: float = 0.0
    noise_std: float = 1.0
    # alie: deviation in standard deviations; null derives it from n and f (Baruch et al.).
    z: Optional[float] = None
    # ipm: the Byzantine update is -ipm_epsilon times the honest mean.
    ipm_epsilon: float = 0.1
    # mimic: index of the honest client to copy; null picks the most extreme one this round.
    mimic_target: Optional[int] = None
    # min_max, min_sum: perturbation direction, one of unit_vec, sign, std.
    perturbation: str = "unit_vec"
    # backdoor: label the triggered inputs get, share of the attacker's inputs triggered (null: half
    # of a Byzantine client's; centralized poisoning: the share of the members, or poison_count
    # members), trigger side (pixels) or width (features), trigger value, and whether the update is
    # scaled by n / server_lr to replace the global model (Bagdasaryan et al.).
    # label_flip: source_label null flips every label y -> C-1-y; set, only source_label's records
    # are poisoned, relabelled target_label (a targeted class pair).
    target_label: int = 0
    source_label: Optional[int] = None
    poison_fraction: Optional[float] = None
    poison_count: Optional[int] = None
    trigger_size: int = 3
    trigger_value: float = 1.0
    model_replacement: bool = False


@dataclass
class MembershipAuditConfig:
    attacks: List[str] = field(default_factory=lambda: ["loss", "rmia"])
    reference_models: int = 2
    # RMIA (Zarifzadeh et al. 2024): pairwise threshold and offline correction.
    rmia_gamma: float = 2.0
    rmia_offline_a: float = 0.3
    # LiRA (Carlini et al. 2022): per_example variances, or one shared by all examples (better with
    # few models): pooled_within (the spread across models) or global (the paper's code, also
    # the spread between examples).
    lira_variance: str = "pooled_within"
    bootstrap: int = 1000


@dataclass
class AttributeAuditConfig:
    enabled: bool = True
    # "imputation_prior": the model's fit weighted by the imputation model's P(value | other features, label);
    # "loss": the value the model fits best; "confidence_prior": weighted by the value's frequency.
    rule: str = "imputation_prior"


@dataclass
class CanaryAuditConfig:
    count: int = 0


@dataclass
class WhiteboxAuditConfig:
    # The implementation audit: separate trainings of the target's DP-SGD mechanism with `canaries`
    # Dirac gradient canaries each, `runs` of them, scored from every step, the final model, or both.
    enabled: bool = False
    canaries: int = 100000
    runs: int = 1
    setting: str = "all_iterates"


@dataclass
class EvasionAuditConfig:
    # Robust accuracy under FGSM and PGD on the first n test records, per norm over budgets in the
    # data's units (pixels in [0, 1]; standard deviations for tables), each list ending with a budget
    # that is unbounded for pixels; PGD takes `steps` steps of 2.5 * eps / steps (Madry et al.).
    enabled: bool = False
    norms: List[str] = field(default_factory=lambda: ["linf", "l2"])
    budgets_linf: List[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0])
    budgets_l2: List[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 100.0])
    steps: int = 20
    restarts: int = 2
    n: int = 500
    # Also torchattacks' APGD-CE (Croce & Hein 2020) at the same budgets, steps and restarts, to confirm
    # PGD's numbers (images only; needs the `attacks` extra): evasion.apgd_<norm>.
    apgd: bool = False


@dataclass
class ExtractionAuditConfig:
    # A black-box attacker queries the target on population records (then mixup points between them)
    # through each output interface (probabilities, label, rounded to `decimals`), and trains a
    # surrogate of the target's architecture for `steps` Adam steps per query budget in `queries`.
    enabled: bool = False
    queries: List[int] = field(default_factory=lambda: [100, 1000, 10000])
    output: List[str] = field(default_factory=lambda: ["probabilities", "label"])
    decimals: int = 2
    steps: int = 200


@dataclass
class GradientInversionAuditConfig:
    # Federated runs: the server inverts one simulated update of each of `clients` honest clients
    # holding `records` members as one local batch (dptrain.audit.gradient_inversion); the
    # optimization attack takes `steps` steps from each of `restarts` starts with a total-variation
    # prior of weight `tv_weight`.
    enabled: bool = False
    clients: int = 8
    records: int = 1
    steps: int = 1000
    tv_weight: float = 1e-4
    restarts: int = 1


@dataclass
class InversionAuditConfig:
    # MI-Face (Fredrikson et al. 2015) on image data: per class in `classes` (empty: every class),
    # `steps` steps of gradient descent of `lr` pixels on the class's cost (log_softmax: -log p_c;
    # mi_face: 1 - p_c) plus tv_weight * total variation + l2_weight * squared distance to the prior
    # (mean: the population's mean image; zeros; noise), scored against members and non-members.
    enabled: bool = False
    classes: List[int] = field(default_factory=list)
    prior: str = "mean"
    cost: str = "log_softmax"
    steps: int = 200
    lr: float = 0.1
    tv_weight: float = 0.05
    l2_weight: float = 0.0


@dataclass
class AuditConfig:
    name: str = "standard"
    mia: MembershipAuditConfig = field(default_factory=MembershipAuditConfig)
    aia: AttributeAuditConfig = field(default_factory=AttributeAuditConfig)
    canaries: CanaryAuditConfig = field(default_factory=CanaryAuditConfig)
    whitebox: WhiteboxAuditConfig = field(default_factory=WhiteboxAuditConfig)
    evasion: EvasionAuditConfig = field(default_factory=EvasionAuditConfig)
    extraction: ExtractionAuditConfig = field(default_factory=ExtractionAuditConfig)
    gradient_inversion: GradientInversionAuditConfig = field(default_factory=GradientInversionAuditConfig)
    inversion: InversionAuditConfig = field(default_factory=InversionAuditConfig)
    confidence: float = 0.95
    seed: int = 0
    # Processes that train reference models; null: one for stacked models (logreg, mlp, cnn:
    # dptrain.training.stacked), else one per two cores, at most one per model.
    workers: Optional[int] = None


@dataclass
class DefenseConfig:
    # Data sanitization before training (centralized recipe, non-private runs only): none,
    # spectral_signatures (Tran et al. 2018: the top remove_fraction of each class by squared
    # projection on its top singular vector) or activation_clustering (Chen et al. 2018: per class,
    # 2-means on 10 principal components, the smaller cluster removed below cluster_threshold of the
    # class), on each member's representation: penultimate (the output layer's input in a
    # preliminary model trained on the members) or input (the flattened features; logreg).
    # cluster_rule=silhouette also requires the class's 2-means silhouette above silhouette_threshold
    # (0.31: tuned on the digits CNN backdoor, seed 0; docs/guide/poisoning.md).
    # knn_label_consistency (Peri et al. 2020) removes each member whose label is not the plurality of
    # its `neighbours` nearest other members' labels.
    sanitize: str = "none"
    representation: str = "penultimate"
    remove_fraction: float = 0.1
    cluster_threshold: float = 0.35
    cluster_rule: str = "size"
    silhouette_threshold: float = 0.31
    neighbours: int = 10
    # Input preprocessing at inference (images only), evaluated by the evasion audit against BPDA
    # attacks: none, squeeze (bit depth squeeze_bits, Xu et al. 2018), median (median_kernel x median_kernel).
    preprocess: str = "none"
    squeeze_bits: int = 4
    median_kernel: int = 2


@dataclass
class LauncherConfig:
    nproc_per_node: int = 1
    backend: str = "auto"
    # gloo: allow more processes than usable CPU cores (nccl never runs more processes than GPUs).
    oversubscribe: bool = False


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


# Keys that change where or how visibly a run executes, not what it computes.
NOT_IN_RECIPE = ("train.resume", "train.progress", "train.device", "train.threads", "train.checkpoint")


def recipe_hash(cfg) -> str:
    """SHA-256 of the resolved config minus ``NOT_IN_RECIPE``: equal hashes mean the same training recipe."""
    import hashlib

    from omegaconf import OmegaConf

    plain = OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    for key in NOT_IN_RECIPE:
        OmegaConf.update(plain, key, None)
    return hashlib.sha256(OmegaConf.to_yaml(plain, sort_keys=True).encode("utf-8")).hexdigest()


def flat_config(cfg: Config) -> dict:
    """The config as ``{"group.key": value}``, the form HParams and reports use."""
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    flat: dict = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            flat[prefix] = node

    walk("", container)
    return flat


def register_configs() -> None:
    """Store the root schema under the name ``conf/config.yaml`` lists first in its defaults."""
    ConfigStore.instance().store(name="dptrain_schema", node=Config)
