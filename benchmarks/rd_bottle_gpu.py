"""RD and RD with Expert on MVTec AD bottle on one GPU, in the papers' setting (256 px, batch 16).

Writes ``benchmarks/results/rd_bottle_gpu.json``: ``runs`` (one flat record per run,
with quality, training and inference images/s, peak GPU memory and its provenance,
:mod:`benchmarks.harness`). Each run goes through ``kd-train``'s code path with
``trainer=gpu`` (:func:`rd_bottle.run_rd`, logged to MLflow), one run at a time, so the
throughput and the memory figures are the run's own. Resumable like ``benchmarks.rd_bottle``.

The plan (``--only`` picks entries as ``scheme:backbone``):

- ``wide_resnet50_2`` (the papers' encoder, Deng & Li, CVPR 2022; Liu et al., AAAI
  2025) at 256 px, batch 16: its ImageNet weights come from the hub, which no machine
  of this project can reach, so these runs use ``weights=none`` (a random encoder) and
  a short budget: their images/s and peak memory are the papers' architecture's, their
  AUROC figures are those of a random encoder and say nothing about the method. With
  hub access: ``--wrn-weights hub --wrn-epochs 200``.
- ``tf_efficientnet_lite0`` with its offline ImageNet weights (``weights=package``) at
  256 px, batch 16, the CPU benchmark's validation-chosen 35 epochs: quality, speed
  and memory of the default encoder on a GPU at the papers' resolution and batch.

AUPRO is anomalib's (``kd_experiments.metrics.aupro``). Where anomalib is not installed
(the lent GPU machine: its wheels and their needs did not fit the 64 MiB that travels
there), ``--defer-aupro DIR`` saves the test maps and masks of the package-weights runs
(float32, exactly what the metric would read) and records ``aupro`` as NaN;
``--finish-aupro DIR`` then computes it on a machine with anomalib, with the same
function, and fills the records in.

Usage::

    python -m benchmarks.rd_bottle_gpu            # needs a CUDA device
    python -m benchmarks.rd_bottle_gpu --defer-aupro $OUT   # on a GPU machine without anomalib
    python -m benchmarks.rd_bottle_gpu --finish-aupro DIR   # where anomalib is
    python -m benchmarks.rd_bottle_gpu --table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import ResultsFile, base_parser
from benchmarks.rd_bottle import add_mvtec_arguments, mvtec_root, run_rd, use_project_mlflow_store

#: (scheme, backbone)
PLAN: list[tuple[str, str]] = [
    ("rd", "wide_resnet50_2"),
    ("rd_expert", "wide_resnet50_2"),
    ("rd", "tf_efficientnet_lite0"),
    ("rd_expert", "tf_efficientnet_lite0"),
]


def markdown_table(path: Path) -> str:
    runs = json.loads(path.read_text())["runs"]
    lines = [
        "| scheme | backbone | weights | px | batch | epochs | precision | image AUROC | pixel AUROC | AUPRO "
        "| decoder | train img/s | infer img/s | peak GPU memory | student params | GPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['scheme']} | {r['backbone']} | {r['weights']} | {r['image_size']} | {r['batch_size']} | {r['epochs']} "
            f"| {r['precision']} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | {r['aupro']:.4f} "
            f"| {r.get('decoder', 'default')} | {r['train_images_per_s']:.1f} | {r['infer_images_per_s']:.1f} "
            f"| {r['peak_gpu_memory_bytes'] / 2**30:.2f} GiB | {r['student_params']:,} | {r['gpu']} |"
        )
    return "\n".join(lines)


class DeferredAupro:
    """Stands in for anomalib's AUPRO where anomalib is missing: saves the first map set
    a run scores (the student's test maps) to ``<dir>/<name>_{a,b}.npz`` (two halves, to
    keep each file small) and returns NaN. ``name=None``: save nothing."""

    def __init__(self, directory: Path) -> None:
        import kd_experiments.metrics as kd_metrics

        self.directory, self.name, self.saved = directory, None, []
        self.original = kd_metrics._anomalib_aupro
        kd_metrics._anomalib_aupro = self

    def __call__(self, maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
        if self.name is not None:
            half = len(maps) // 2
            self.directory.mkdir(parents=True, exist_ok=True)
            np.savez(self.directory / f"{self.name}_a.npz", maps=maps[:half].astype(np.float32),
                     masks=np.packbits(masks.astype(bool)), shape=np.array(masks.shape), fpr_limit=fpr_limit)
            np.savez(self.directory / f"{self.name}_b.npz", maps=maps[half:].astype(np.float32))
            self.saved = [f"{self.name}_a.npz", f"{self.name}_b.npz"]
            self.name = None
        return float("nan")


def finish_aupro(output: Path, directory: Path) -> None:
    """Compute the deferred AUPROs from the saved maps (anomalib's metric) into the records
    (each change is logged in the record's ``updates``)."""
    from kd_experiments import metrics as kd_metrics

    results = ResultsFile(output)
    for run in list(results.runs):
        files = run.get("aupro_deferred_files")
        if not files or run.get("aupro") == run.get("aupro"):  # none saved, or already a number
            continue
        first, second = (np.load(directory / name) for name in files)
        maps = np.concatenate([first["maps"], second["maps"]])
        masks = np.unpackbits(first["masks"])[: int(np.prod(first["shape"]))].reshape(first["shape"])
        aupro = kd_metrics.aupro(maps, masks, float(first["fpr_limit"]))
        key = {field: run.get(field) for field in KEY_FIELDS}
        results.update(key, {"aupro": aupro,
                             "aupro_computed_on": "CPU with anomalib, from this GPU run's saved float32 test maps"})
        print(f"{run['scheme']} {run['backbone']}: AUPRO {aupro:.4f}")


KEY_FIELDS = ("scheme", "backbone", "weights", "image_size", "batch_size", "epochs", "precision", "seed", "decoder")


def main() -> None:
    parser = base_parser(__doc__, output="rd_bottle_gpu.json", threads=False)
    add_mvtec_arguments(parser)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=35, help="budget of the package-weights runs")
    parser.add_argument("--wrn-epochs", type=int, default=3, help="budget of the wide_resnet50_2 runs")
    parser.add_argument("--wrn-weights", default="none", choices=["none", "hub", "file"])
    parser.add_argument("--precision", default="32", help="trainer.precision (32, bf16-mixed, 16-mixed)")
    parser.add_argument("--rd4ad-decoder", action="store_true",
                        help="RD4AD's own student for wide_resnet50_2 (experiment=rd_paper_bottle: bottleneck blocks, "
                             "width 128, OCBE 3 blocks, decoder 6/4/3 transposed, expansion 1, no projection, ResNet init)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=None, help="plan entries as scheme:backbone")
    parser.add_argument("--table", action="store_true", help="print the results as Markdown and exit")
    parser.add_argument("--defer-aupro", type=Path, default=None,
                        help="anomalib missing here: save the test maps to this folder, AUPRO left NaN")
    parser.add_argument("--finish-aupro", type=Path, default=None,
                        help="compute the deferred AUPROs from the maps in this folder and exit")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(args.output))
        return
    if args.finish_aupro is not None:
        finish_aupro(args.output, args.finish_aupro)
        return
    deferred = DeferredAupro(args.defer_aupro) if args.defer_aupro is not None else None
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.rd_bottle_gpu needs a CUDA device (trainer=gpu); the CPU benchmark is "
                         "benchmarks.rd_bottle")
    args.blur_sigma = None
    use_project_mlflow_store()
    results = ResultsFile(args.output)
    plan = [e for e in PLAN if args.only is None or f"{e[0]}:{e[1]}" in set(args.only)]
    for scheme, backbone in plan:
        wrn = backbone == "wide_resnet50_2"
        weights = args.wrn_weights if wrn else "package"
        epochs = args.wrn_epochs if wrn else args.epochs
        key = {"scheme": scheme, "backbone": backbone, "weights": weights, "image_size": args.image_size,
               "batch_size": args.batch_size, "epochs": epochs, "precision": args.precision, "seed": args.seed,
               "decoder": "rd4ad_bottleneck" if args.rd4ad_decoder else "default"}
        if results.has(key):
            print(f"[rd_bottle_gpu] skip {key} (done)", flush=True)
            continue
        print(f"[rd_bottle_gpu] run {key}", flush=True)
        run_args = argparse.Namespace(data=mvtec_root(args), image_size=args.image_size, batch_size=args.batch_size,
                                      epochs=epochs, blur_sigma=None)
        extra = ("trainer=gpu", f"trainer.precision={args.precision}", f"scheme.backbone={backbone}",
                 f"scheme.weights={weights}")
        if args.rd4ad_decoder:
            extra += ("scheme.decoder_upsampling=transposed", "scheme.decoder_blocks=[6,4,3]", "scheme.decoder_expansion=1",
                      "scheme.decoder_projection=false", "scheme.init=resnet", "scheme.block=bottleneck",
                      "scheme.block_base_width=128", "scheme.bottleneck_blocks=3")
        if deferred is not None:
            deferred.name = f"{scheme}_{backbone}_{args.image_size}px_s{args.seed}" if weights != "none" else None
            deferred.saved = []
        torch.cuda.reset_peak_memory_stats()
        with results.record(key) as record:
            record.update({"compression_ratio": 1.0,
                           **run_rd(scheme, 1.0, args.seed, run_args, extra, name_suffix=f"-{backbone}-gpu")})
            record.update({
                "peak_gpu_memory_bytes": int(torch.cuda.max_memory_allocated()),
                "peak_gpu_memory_reserved_bytes": int(torch.cuda.max_memory_reserved()),
                "gpu": torch.cuda.get_device_name(0), "device": "cuda",
                "quality_meaningful": weights != "none",
            })
            if deferred is not None:
                record["aupro_deferred_files"] = deferred.saved
        print(f"[rd_bottle_gpu] done {json.dumps(record)}", flush=True)


if __name__ == "__main__":
    main()
