"""Study: how many epochs does Pol et al.'s autoencoder teacher need? (validation data only)

The paper trains the teacher for 300 epochs (AdrianAlan/kd4ad: Adam lr 1e-3, weight
decay 1e-5, batch 100, ReduceLROnPlateau); ``benchmarks.score_regression`` runs
5, 30 and 300 on a 2-core CPU. This script measures, per epoch, the teacher's AUROC on a
*validation* set built from the training split only, so that the epoch budget of the
main benchmark is chosen without looking at any test image:

- normal: the 10% of the normal class's training images the datamodule holds out
  (``val_fraction=0.1``), never trained on;
- anomalous: as many training images of the other nine classes (seeded draw).

Optimiser: the authors' Adam lr 1e-3, weight decay 1e-5, batch 100, at a constant
learning rate (their plateau scheduler rarely fires on this loss in the first tens of
epochs), trained by :func:`~kd_experiments.schemes.score_regression.family.fit_teacher`
(``lr_schedule="constant"``), so the batch order is the main benchmark's.

Resumable: one record per (dataset, class, seed, epoch), appended at once to
``benchmarks/results/score_regression_teacher_budget_<dataset>.json``::

    .venv/bin/python -m benchmarks.score_regression_teacher_budget --dataset mnist --classes 0 1 2 --epochs 40
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks.harness import RESULTS, ROOT, ResultsFile, base_parser, now_utc
from kd_experiments import metrics as kd_metrics
from kd_experiments.data.one_class import OneClassDataModule
from kd_experiments.schemes.score_regression.family import autoencoder_scorer, fit_teacher, predict
from kd_experiments.schemes.score_regression.lightning_model import teacher_training_loss
from kd_experiments.schemes.score_regression.torch_model import ConvAutoencoder


def validation_set(data_root: Path, dataset: str, normal_class: int, seed: int):
    """``(train_images, val_images, val_labels)``: training split only, see the module docstring
    (the datamodule's labelled validation split, ``val_anomalies="other_classes"``)."""
    data = OneClassDataModule(dataset=dataset, root=data_root / dataset, normal_class=normal_class, protocol="balanced",
                              val_fraction=0.1, batch_size=100, normalization="none", seed=seed,
                              val_anomalies="other_classes")
    data.setup("fit")
    return data.train_dataset.images, data.val_dataset.images, data.val_dataset.labels


def main() -> None:
    parser = base_parser(__doc__, threads=False)
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist"])
    parser.add_argument("--classes", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None,
                        help="results file (default: benchmarks/results/score_regression_teacher_budget_<dataset>.json)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    output = args.output or RESULTS / f"score_regression_teacher_budget_{args.dataset}.json"
    results = ResultsFile(output, ("dataset", "normal_class", "seed", "epoch", "lr"))
    for normal_class in args.classes:
        if results.has(dataset=args.dataset, normal_class=normal_class, seed=args.seed, epoch=args.epochs, lr=args.lr):
            print(f"[{args.dataset} {normal_class}] done, skipped", flush=True)
            continue
        train_images, val_images, labels = validation_set(args.data_root, args.dataset, normal_class, args.seed)
        torch.manual_seed(args.seed)
        teacher = ConvAutoencoder()
        started_at, started = now_utc(), time.perf_counter()

        def measure(epoch: int, train_loss: float, normal_class: int = normal_class, teacher=teacher,
                    val_images=val_images, labels=labels, started=started, started_at=started_at) -> None:
            scores = predict(autoencoder_scorer(teacher), val_images)
            record = {
                "dataset": args.dataset, "normal_class": normal_class, "seed": args.seed, "epoch": epoch,
                "lr": args.lr, "train_loss": train_loss,
                "val_normal_loss": float(scores[labels == 0].mean()),
                "val_auroc": kd_metrics.image_auroc(scores, labels),
                "seconds": round(time.perf_counter() - started, 1), "val_images": int(labels.numel()),
            }
            results.append(record, started_at=started_at, wall_s=record["seconds"], skip_if_present=True)
            if epoch % 10 == 0 or epoch == args.epochs:
                cache = ROOT / ".cache" / "score_regression_teacher_budget" / (
                    f"{args.dataset}_c{normal_class}_lr{args.lr}_s{args.seed}_e{epoch}.pt")
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save(teacher.state_dict(), cache)
            print(f"[{args.dataset} {normal_class}] epoch {epoch}: val AUROC {record['val_auroc']:.4f} "
                  f"loss {train_loss:.5f} ({record['seconds']} s)", flush=True)

        fit_teacher(teacher, train_images, args.epochs, loss_fn=teacher_training_loss, batch_size=100, lr=args.lr,
                    weight_decay=1e-5, seed=args.seed, lr_schedule="constant", on_epoch_end=measure)

if __name__ == "__main__":
    main()
