"""Does a trigger-set watermark survive fine-tuning, pruning and extraction? A thief who holds the owner's
model and clean data of their own fine-tunes it, or prunes it, or (holding only its prediction API) trains a
surrogate on its answers, and the owner tests each copy (Adi et al. 2018, Section 5).

    python scripts/watermark_survival.py <owner run dir> [--epochs 1 5 20] [--lr 0.1] [--prune 0.5 0.8]
        [--extract 1000 10000] [--threads 1]

The thief's data is the run's population split (records that are neither members nor audit
non-members nor test records), trained on with plain SGD and cross-entropy at batch 64 from the owner's
weights; the table gives, after each number of epochs, the test accuracy, the keys' accuracy and the
binomial p-value of ``dptrain verify run_dir=<owner> model=<fine-tuned>``. Pruning (of the owner's model,
not fine-tuned) zeroes the given fraction of smallest-magnitude entries of every weight matrix or kernel
(biases and norms kept), without retraining. Extraction is the extraction audit's attacker
(``dptrain.audit.extraction``): population records then mixup points as queries, the owner model's
probabilities or top-1 labels as answers, a surrogate of the owner's architecture trained on them; the keys
are never queried, so the surrogate carries the watermark only as far as it generalizes from the answers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from dptrain.audit.extraction import answers, attacker_queries, train_surrogate
from dptrain.config import Config
from dptrain.training.recipe import resolve_device
from dptrain.training.target import load_data, trained_model
from dptrain.watermark import agreement, read_trigger_set, watermark_test


@torch.no_grad()
def _accuracy(model, records, device) -> float:
    model.eval()
    inputs, labels = records.tensors
    return float((model(inputs.to(device)).argmax(dim=1).cpu() == labels).float().mean())


@torch.no_grad()
def _pruned(model, fraction: float):
    """``model`` with the ``fraction`` smallest-magnitude entries of each weight matrix or kernel zeroed."""
    for parameter in model.parameters():
        if parameter.dim() > 1:
            count = int(fraction * parameter.numel())
            if count:
                threshold = parameter.abs().flatten().kthvalue(count).values
                parameter[parameter.abs() <= threshold] = 0.0
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run trained with train.watermark.enabled=true")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 5, 20], help="fine-tuning epochs to report")
    parser.add_argument("--lr", type=float, default=0.1, help="the thief's SGD learning rate")
    parser.add_argument("--prune", type=float, nargs="*", default=[], help="fractions of weights to prune")
    parser.add_argument("--extract", type=int, nargs="*", default=[], help="query budgets of extraction attacks")
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(options.run_dir / ".hydra" / "config.yaml"))
    device = resolve_device("cpu")
    data, _, _ = load_data(cfg, options.run_dir, reuse_split=True)
    keys = read_trigger_set(options.run_dir)
    model = trained_model(cfg, options.run_dir, data, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=options.lr)
    loader = DataLoader(data.population, batch_size=64, shuffle=True)
    print(f"thief's data: {len(data.population)} population records; lr {options.lr}")
    print("| fine-tuning epochs | test accuracy | key accuracy | p-value |")
    print("|---|---|---|---|")
    done = 0
    for target in [0, *sorted(options.epochs)]:
        for _ in range(target - done):
            model.train()
            for inputs, labels in loader:
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(inputs.to(device)), labels.to(device)).backward()
                optimizer.step()
        done = target
        check = watermark_test(agreement(model, keys, device), keys)
        print(f"| {target} | {_accuracy(model, data.test, device):.3f} | {check.accuracy:.2f} | {check.p_value:.2g} |")
    for fraction in options.prune:
        pruned = _pruned(trained_model(cfg, options.run_dir, data, device), fraction)
        check = watermark_test(agreement(pruned, keys, device), keys)
        print(f"pruned {fraction:.0%}: test accuracy {_accuracy(pruned, data.test, device):.3f}, "
              f"key accuracy {check.accuracy:.2f}, p-value {check.p_value:.2g}")
    if options.extract:
        owner = trained_model(cfg, options.run_dir, data, device).eval()
        queries = attacker_queries(data.population.tensors[0], max(options.extract), torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = owner(queries.to(device)).cpu()
        input_shape = tuple(queries.shape[1:])
        for output in ("probabilities", "label"):
            replies = answers(logits, output, decimals=2)
            for budget in options.extract:
                surrogate = train_surrogate(
                    cfg.model, input_shape, keys.num_classes, queries[:budget], replies[:budget],
                    cfg.audit.extraction.steps, device, seed=0,
                )  # fmt: skip
                check = watermark_test(agreement(surrogate, keys, device), keys)
                print(f"extracted ({output}, {budget} queries): test accuracy {_accuracy(surrogate, data.test, device):.3f}, "
                      f"key accuracy {check.accuracy:.2f}, p-value {check.p_value:.2g}")


if __name__ == "__main__":
    main()
