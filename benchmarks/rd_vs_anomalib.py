"""Our reverse distillation against anomalib 2.7's ``ReverseDistillation``, side by side.

Writes ``benchmarks/results/rd_vs_anomalib.json`` (``runs`` with ``implementation`` =
``kd_experiments`` or ``anomalib``, each with its provenance); resumable like
``benchmarks.rd_bottle``. Both implementations are trained in *this* process, one
after the other, by the same loop: same data (MVTec AD bottle, same split, same
shuffling seed), same image size, batch size, epochs, thread count and the same
frozen encoder *weights*; each uses its own bottleneck, decoder, loss, optimiser
settings and inference path (anomalib: ``ReverseDistillationModel``,
``ReverseDistillationLoss``, Adam lr 0.005 betas (0.5, 0.99) on decoder + bottleneck as
its ``configure_optimizers``; ours: the scheme itself (``experiment=rd_bottle`` composed with
this study's overrides: its encoder, student, maps and scores), student width 0.5 and 1.0, with the bilinear decoder
(our default) or with ``--decoder-upsampling transposed --decoder-blocks 2``, RD4AD's
decoder layout, which at width 0.5 is the architecture of anomalib's ``de_resnet18``,
:func:`distillation_loss`, Adam lr 0.005 betas (0.5, 0.999)). Throughput counts forward,
backward and optimiser step (training) and the full scoring path to maps and scores
(inference), data loading excluded, one thread.

Backbone: anomalib's RD builds its decoder only for ResNet-family backbones
(``get_decoder``: resnet18 ... wide_resnet101_2), so it cannot take our default
EfficientNet-Lite0, and its ``TimmFeatureExtractor`` would fetch pretrained weights from
the hub. Both therefore use timm ``resnet18`` (layers 1-3), the smallest backbone
anomalib's RD supports, built with ``pre_trained=False`` and given *identical* encoder
weights: ours (``weights="none"``, seeded) copied into anomalib's encoder tensor by
tensor (checked by position and shape). Offline, no pretrained ResNet weights exist,
so the encoder is a random-init network: absolute quality is far below the pretrained
setting; the comparison of the two implementations is like for like.
The map smoothing is the paper's sigma 4 at 256 px scaled to the image size, for both.

    nohup .venv/bin/python -m benchmarks.rd_vs_anomalib > logs/benchmarks/rd_vs_anomalib.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.harness import ResultsFile, base_parser, compose, now_utc
from benchmarks.rd_bottle import add_mvtec_arguments, mvtec_root


def copy_by_position(source: torch.nn.Module, target: torch.nn.Module) -> int:
    """Copy every tensor of ``source``'s state dict into ``target``'s, in order, checking shapes."""
    source_state, target_state = source.state_dict(), target.state_dict()
    assert len(source_state) == len(target_state), (len(source_state), len(target_state))
    copied = {}
    for (source_name, tensor), (target_name, reference) in zip(source_state.items(), target_state.items(), strict=True):
        assert tensor.shape == reference.shape, (source_name, target_name, tensor.shape, reference.shape)
        copied[target_name] = tensor.clone()
    target.load_state_dict(copied)
    return len(copied)


def our_scheme(args: argparse.Namespace, width: float):
    """Our RD scheme as ``kd-train experiment=rd_bottle`` builds it, with this study's encoder and student.

    The encoder is ``--backbone`` with random weights (``scheme.weights=none``); the student is
    the width and decoder options of the command line; everything else is the scheme's own
    (its :class:`~kd_experiments.schemes.reverse_distillation.ReverseDistillationScheme`:
    features, maps, blur, image scores)."""
    from kd_experiments import config as kd_config

    cfg = compose([
        "experiment=rd_bottle", f"data.root={mvtec_root(args)}", f"data.image_size={args.image_size}",
        f"scheme.backbone={args.backbone}", "scheme.weights=none", f"scheme.width_multiplier={width}",
        f"scheme.decoder_blocks={args.decoder_blocks}", f"scheme.decoder_upsampling={args.decoder_upsampling}",
        f"scheme.decoder_expansion={args.decoder_expansion}", f"scheme.decoder_projection={str(not args.no_projection).lower()}",
        f"scheme.init={args.init}", f"scheme.blur_sigma={4.0 * args.image_size / 256}",
        "scheme.val_synthetic_anomalies=false",
    ])
    return kd_config.instantiate(cfg.scheme, input_shape=(3, args.image_size, args.image_size))


def build(implementation: str, args: argparse.Namespace, seed: int, width: float = 1.0):
    from kd_experiments.schemes.reverse_distillation import loss as rd_loss

    torch.manual_seed(seed)
    scheme = our_scheme(args, width)
    scheme.eval()
    encoder = scheme.encoder
    sigma = float(scheme.hparams.blur_sigma)
    if implementation == "kd_experiments":
        student = scheme.student
        optimizer = torch.optim.Adam(student.parameters(), lr=0.005, betas=(0.5, 0.999))

        def train_step(images):
            teacher = scheme.teacher_features(images)
            return rd_loss.distillation_loss(student(teacher), teacher)

        def score(images):
            with torch.no_grad():
                scored = scheme.score_batch({"image": images})
            return scored["score"], scored["map"]

        trainable = student
        deployed = scheme
    else:
        from anomalib.models.image.reverse_distillation.loss import ReverseDistillationLoss
        from anomalib.models.image.reverse_distillation.torch_model import ReverseDistillationModel

        model = ReverseDistillationModel(
            backbone=args.backbone, input_size=(args.image_size, args.image_size),
            layers=["layer1", "layer2", "layer3"], anomaly_map_mode="add", pre_trained=False,
        )
        copied = copy_by_position(encoder.extractor.model, model.encoder.feature_extractor)
        print(f"[rd_vs_anomalib] copied {copied} encoder tensors into anomalib's encoder", flush=True)
        model.anomaly_map_generator.sigma = sigma
        model.anomaly_map_generator.kernel_size = 2 * int(4.0 * sigma + 0.5) + 1
        for parameter in model.encoder.parameters():
            parameter.requires_grad_(False)
        loss_function = ReverseDistillationLoss()
        optimizer = torch.optim.Adam(
            list(model.decoder.parameters()) + list(model.bottleneck.parameters()), lr=0.005, betas=(0.5, 0.99)
        )

        def train_step(images):
            model.train()
            encoder_features, decoder_features = model(images)
            return loss_function(encoder_features=encoder_features, decoder_features=decoder_features)

        def score(images):
            model.eval()
            with torch.no_grad():
                output = model(images)
            return output.pred_score.flatten(), output.anomaly_map.squeeze(1)

        trainable = torch.nn.ModuleList([model.bottleneck, model.decoder])
        deployed = model
    encoder_params = sum(p.numel() for p in encoder.parameters())
    student_params = sum(p.numel() for p in trainable.parameters())
    return train_step, score, optimizer, trainable, deployed, encoder_params, student_params


def run(implementation: str, seed: int, args: argparse.Namespace, width: float = 1.0) -> dict:
    from kd_experiments import metrics as kd_metrics
    from kd_experiments.data.mvtec import MVTecDataModule

    datamodule = MVTecDataModule(mvtec_root(args), "bottle", image_size=args.image_size, batch_size=args.batch_size,
                                 seed=seed, cache_images=True)
    datamodule.setup("fit")
    datamodule.setup("test")
    train_step, score, optimizer, trainable, _deployed, encoder_params, student_params = build(implementation, args, seed, width)
    torch.manual_seed(seed)
    train_seconds, train_images = 0.0, 0
    losses = []
    for _epoch in range(args.epochs):
        trainable.train()
        for batch in datamodule.train_dataloader():
            images = batch["image"]
            started = time.perf_counter()
            loss = train_step(images)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            train_seconds += time.perf_counter() - started
            train_images += images.shape[0]
            losses.append(float(loss.detach()))
    trainable.eval()
    scores, maps, masks, labels = [], [], [], []
    infer_seconds, infer_images = 0.0, 0
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            started = time.perf_counter()
            batch_scores, batch_maps = score(batch["image"])
            infer_seconds += time.perf_counter() - started
            infer_images += batch["image"].shape[0]
            scores.append(batch_scores)
            maps.append(batch_maps)
            masks.append(batch["mask"].squeeze(1) > 0.5)
            labels.append(batch["label"])
    image = kd_metrics.evaluate_image_scores(torch.cat(scores), torch.cat(labels))
    pixel = kd_metrics.evaluate_maps(torch.cat(maps), torch.cat(masks))
    return {
        "image_auroc": image["image_auroc"],
        "pixel_auroc": pixel["pixel_auroc"],
        "aupro": pixel["aupro"],
        "student_params": student_params,
        "deployed_params": encoder_params + student_params,
        "train_images_per_s": train_images / train_seconds,
        "infer_images_per_s": infer_images / infer_seconds,
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "train_seconds": train_seconds,
    }


def paired_speed(args: argparse.Namespace, rounds: int, steps: int) -> dict:
    """Training and inference speed of both implementations, measured *interleaved*.

    Whole-run throughputs of runs made one after the other can differ by the machine's
    load at the time (this machine is shared). Here both models are built (seed 0), then
    for ``rounds`` rounds: ``steps`` training steps of each, then ``steps`` scoring calls
    of each, all on the same batch of real training images, the order of the two
    alternating from round to round. Per round the ratio of speeds ours / anomalib is
    taken; the figures are medians over rounds.
    """
    import statistics

    from kd_experiments.data.mvtec import MVTecDataModule

    datamodule = MVTecDataModule(mvtec_root(args), "bottle", image_size=args.image_size, batch_size=args.batch_size,
                                 seed=0, cache_images=True)
    datamodule.setup("fit")
    images = next(iter(datamodule.train_dataloader()))["image"]
    built = {name: build(name, args, 0, args.widths[0]) for name in ("anomalib", "kd_experiments")}
    times: dict[str, dict[str, list[float]]] = {name: {"train": [], "infer": []} for name in built}

    def train_steps(name: str) -> float:
        train_step, _score, optimizer, trainable, *_ = built[name]
        trainable.train()
        started = time.perf_counter()
        for _ in range(steps):
            loss = train_step(images)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return (time.perf_counter() - started) / steps

    def infer_steps(name: str) -> float:
        _train_step, score, _optimizer, trainable, *_ = built[name]
        trainable.eval()
        started = time.perf_counter()
        with torch.no_grad():
            for _ in range(steps):
                score(images)
        return (time.perf_counter() - started) / steps

    for name in built:  # warm-up
        train_steps(name)
        infer_steps(name)
    names = list(built)
    for round_index in range(rounds):
        order = names if round_index % 2 == 0 else names[::-1]  # alternate who goes first
        for name in order:
            times[name]["train"].append(train_steps(name))
        for name in order:
            times[name]["infer"].append(infer_steps(name))
    batch = images.shape[0]
    result: dict = {"rounds": rounds, "steps_per_round": steps, "batch_size": batch, "image_size": args.image_size,
                    "our_student": {"width_multiplier": args.widths[0], "decoder_upsampling": args.decoder_upsampling,
                                    "decoder_blocks": args.decoder_blocks, "decoder_expansion": args.decoder_expansion,
                                    "decoder_projection": not args.no_projection, "init": args.init}}
    for phase in ("train", "infer"):
        for name in built:
            result[f"{name}_{phase}_images_per_s"] = batch / statistics.median(times[name][phase])
        ratios = [a / b for a, b in zip(times["anomalib"][phase], times["kd_experiments"][phase], strict=True)]
        result[f"{phase}_speed_ratio_ours_over_anomalib"] = statistics.median(ratios)
        result[f"{phase}_speed_ratio_rounds"] = ratios
    return result


def markdown_table(path: Path) -> str:
    """The records as Markdown: one row per implementation and configuration, mean +- std over seeds."""
    import statistics

    runs = json.loads(path.read_text())["runs"]
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        config = (run["implementation"], run.get("width_multiplier"), run.get("decoder_upsampling"),
                  run.get("decoder_blocks"), run.get("decoder_expansion"), run.get("decoder_projection"),
                  run.get("init"), run["epochs"], run["image_size"])
        groups.setdefault(config, []).append(run)

    def cell(rows: list[dict], key: str, digits: int = 4) -> str:
        values = [r[key] for r in rows]
        if len(values) == 1:
            return f"{values[0]:.{digits}f}"
        return f"{statistics.mean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f}"

    lines = [("| implementation | student | seeds | image AUROC | pixel AUROC | AUPRO | student params | train img/s "
             "| infer img/s |"), "|---|---|---|---|---|---|---|---|---|"]
    for config, rows in sorted(groups.items(), key=lambda item: (item[0][0] != "anomalib", str(item[0]))):
        implementation, width, upsampling, blocks, expansion, projection, init = config[:7]
        if implementation == "anomalib":
            student = "anomalib OCBE + de_resnet18"
        else:
            student = (f"w {width:g}, {upsampling}, {blocks} block(s)/stage, expansion {expansion:g}, "
                       f"{'1x1 projection' if projection else 'no projection'}, {init} init")
        lines.append(
            f"| {implementation} | {student} | {','.join(str(r['seed']) for r in rows)} | {cell(rows, 'image_auroc')} "
            f"| {cell(rows, 'pixel_auroc')} | {cell(rows, 'aupro')} | {rows[0]['student_params']:,} "
            f"| {cell(rows, 'train_images_per_s', 1)} | {cell(rows, 'infer_images_per_s', 1)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = base_parser(__doc__, output="rd_vs_anomalib.json")
    add_mvtec_arguments(parser)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--widths", type=float, nargs="+", default=[0.5, 1.0],
                        help="width multipliers of our student (0.5: decoder widths = encoder channels, "
                             "like RD4AD's mirrored decoder)")
    parser.add_argument("--decoder-upsampling", default="bilinear", choices=("bilinear", "transposed"),
                        help="our decoder's up-sampling (transposed: RD4AD's, as anomalib's de_resnet)")
    parser.add_argument("--decoder-blocks", type=int, default=1,
                        help="residual blocks per decoder stage (2 with transposed: de_resnet18's layout)")
    parser.add_argument("--decoder-expansion", type=float, default=2.0,
                        help="decoder width / encoder channels at width 1 (1: RD4AD's mirrored decoder)")
    parser.add_argument("--no-projection", action="store_true",
                        help="compare the decoder blocks' outputs directly (RD4AD; needs widths = encoder channels)")
    parser.add_argument("--init", default="torch", choices=("torch", "resnet"), help="student initialisation")
    parser.add_argument("--skip-anomalib", action="store_true", help="run only our student(s)")
    parser.add_argument("--table", action="store_true", help="print the results as Markdown and exit")
    parser.add_argument("--paired-speed", type=int, default=0, metavar="ROUNDS",
                        help="instead of training runs, measure both implementations' speed interleaved, "
                             "ROUNDS rounds (see paired_speed); stored under 'paired_speed' in the results file")
    parser.add_argument("--paired-steps", type=int, default=5, help="steps per implementation and round")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(args.output))
        return
    if args.paired_speed:
        torch.set_num_threads(args.threads)
        results = ResultsFile(args.output)
        started_at, started = now_utc(), time.perf_counter()
        measured = paired_speed(args, args.paired_speed, args.paired_steps)
        results.set_section("paired_speed", measured, started_at=started_at, wall_s=time.perf_counter() - started)
        print(json.dumps({k: v for k, v in measured.items() if not k.endswith("_rounds")}, indent=1))
        return
    torch.set_num_threads(args.threads)
    results = ResultsFile(args.output)
    jobs = [] if args.skip_anomalib else [("anomalib", None)]
    jobs += [("kd_experiments", width) for width in args.widths]
    for seed in args.seeds:
        for implementation, width in jobs:
            key = {"implementation": implementation, "backbone": args.backbone, "seed": seed,
                   "image_size": args.image_size, "epochs": args.epochs, "width_multiplier": width}
            if implementation == "kd_experiments":
                key |= {"decoder_upsampling": args.decoder_upsampling, "decoder_blocks": args.decoder_blocks,
                        "decoder_expansion": args.decoder_expansion,
                        "decoder_projection": not args.no_projection, "init": args.init}
            if results.has(key):
                print(f"[rd_vs_anomalib] skip {key} (done)", flush=True)
                continue
            print(f"[rd_vs_anomalib] run {key}", flush=True)
            with results.record(key) as record:
                record.update({**run(implementation, seed, args, width or 1.0), "device": "cpu",
                               "weights": "none (random, shared)", "batch_size": args.batch_size,
                               "torch_threads": torch.get_num_threads(), "compression_ratio": 1})
            print(f"[rd_vs_anomalib] done {json.dumps(record)}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
