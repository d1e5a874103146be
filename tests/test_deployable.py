"""The deployable model of each scheme: raw images in, the datamodule's preprocessing inside,
the student's scores out, equal to what the test step computes; and its speed and size figures.
Tiny data, CPU, seconds; no timing is asserted."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from kd_experiments.compression import count_parameters
from kd_experiments.data.one_class import OneClassDataModule
from kd_experiments.deployable import Preprocessing, measure_deployment
from kd_experiments.errors import DataError
from kd_experiments.metrics import image_auroc
from kd_experiments.schemes.progressive_gan import ProgressiveGANScheme
from kd_experiments.schemes.progressive_gan.torch_model import latent_distance
from kd_experiments.schemes.score_regression import ScoreRegressionScheme
from kd_experiments.train import train
from tests.conftest import fast_overrides


def _digits(image_size: int) -> OneClassDataModule:
    """Digits (8x8 uint8, resized by the datamodule) normalised with the set's own statistics,
    so that the deployable model has a real resize and a real normalisation to reproduce."""
    return OneClassDataModule(
        dataset="digits", root=None, normal_class=0, image_size=image_size, normalization="dataset",
        batch_size=16, max_train_samples=48, max_test_samples=40,
    )


def _raw_test_images(data: OneClassDataModule) -> torch.Tensor:
    """The test split as the user has it: the 8x8 uint8 digits, before any datamodule step."""
    _, test_raw = data._load_raw()
    return test_raw.images[data._test_positions(test_raw.class_ids)].unsqueeze(1)


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def _fit_and_test(scheme: L.LightningModule, data: OneClassDataModule, tmp_path: Path) -> Path:
    trainer = _trainer(max_steps=4, limit_val_batches=0)
    trainer.fit(scheme, datamodule=data)
    trainer.test(scheme, datamodule=data, verbose=False)
    checkpoint = tmp_path / "run.ckpt"
    trainer.save_checkpoint(checkpoint)
    return checkpoint


def _check_contract(deployable, raw: torch.Tensor, expected: torch.Tensor, scheme, size: int) -> None:
    deployable.eval()
    with torch.no_grad():
        from_uint8 = deployable(raw)
        from_float = deployable(raw.float() / 255.0)
        from_hw = deployable(raw[:, 0])  # (N, H, W): one channel
        from_rgb = deployable(raw.expand(-1, 3, -1, -1))  # an RGB copy of a grey image
    assert from_uint8.shape == (len(raw),)
    for scores in (from_uint8, from_float, from_hw, from_rgb):
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    # what the test step scored is what the deployable model gives on the raw images
    torch.testing.assert_close(scheme.test_results["score"], expected, atol=1e-5, rtol=0)
    labels = scheme.test_results["label"]
    assert scheme.test_metrics["image_auroc"] == pytest.approx(image_auroc(expected, labels), abs=1e-6)
    assert deployable.produces_map is False
    assert deployable.input_size == (size, size) and deployable.input_channels == 1
    with pytest.raises(DataError, match="1-channel images, got 2 channels"):
        deployable(raw.expand(-1, 2, -1, -1))
    with pytest.raises(DataError, match="uint8"):
        deployable(raw.long())


def test_score_regression_deployable_is_the_student_on_raw_images(tmp_path: Path) -> None:
    data = _digits(28)
    torch.manual_seed(0)
    scheme = ScoreRegressionScheme((1, 28, 28), student="E", compression_ratio=None, co_learning=True)
    checkpoint = _fit_and_test(scheme, data, tmp_path)
    scheme.eval()
    with torch.no_grad():  # the path before the deployable model: the student on normalised tensors
        expected = scheme.student(data.test_dataset.images)

    deployable = scheme.deployable_model()
    _check_contract(deployable, _raw_test_images(data), expected, scheme, 28)
    mean, std = data.normalization_stats
    assert deployable.preprocessing.mean == mean and deployable.preprocessing.std == std
    # the student only: every parameter is the student's, none the teacher's
    student_ids = {id(p) for p in scheme.student.parameters()}
    assert {id(p) for p in deployable.parameters()} == student_ids
    summary = scheme.compression_summary()
    assert count_parameters(deployable) == summary["student_params"] == summary["deployed_params"]
    assert summary["deployed_compression_ratio"] == pytest.approx(summary["compression_ratio"])

    # the preprocessing travels with the checkpoint
    restored = ScoreRegressionScheme.load_from_checkpoint(checkpoint).eval()
    assert restored.preprocessing == scheme.preprocessing
    with torch.no_grad():
        torch.testing.assert_close(restored.deployable_model()(_raw_test_images(data)), expected, atol=1e-5, rtol=0)


def test_progressive_gan_deployable_is_the_student_generator_on_raw_images(tmp_path: Path) -> None:
    data = _digits(16)
    torch.manual_seed(0)
    scheme = ProgressiveGANScheme((1, 16, 16), teacher_width=4, teacher_depth=2, latent_dim=8,
                                  mac_compression_ratio=None, student_width=2, student_discriminator_width=2)
    _fit_and_test(scheme, data, tmp_path)
    scheme.eval()
    with torch.no_grad():  # the path before the deployable model: the student E-D-E on normalised tensors
        _, latent, latent_of_reconstruction = scheme.student_generator(scheme.to_gan_range(data.test_dataset.images))
    expected = latent_distance(latent, latent_of_reconstruction)

    deployable = scheme.deployable_model()
    _check_contract(deployable, _raw_test_images(data), expected, scheme, 16)
    assert {id(p) for p in deployable.parameters()} == {id(p) for p in scheme.student_generator.parameters()}
    summary = scheme.compression_summary()
    assert summary["deployed_params"] == count_parameters(scheme.student_generator)
    assert summary["deployed_compression_ratio"] == pytest.approx(
        count_parameters(scheme.teacher_generator) / count_parameters(scheme.student_generator))


def test_feature_vectors_are_standardised_inside() -> None:
    torch.manual_seed(0)
    scheme = ScoreRegressionScheme((57,), compression_ratio=20, latent_dim=3).eval()
    mean, std = torch.randn(57), torch.rand(57) + 0.5
    scheme.preprocessing = Preprocessing((), 57, tuple(mean.tolist()), tuple(std.tolist()))
    features = torch.randn(6, 57) * 3 + 1
    deployable = scheme.deployable_model()
    with torch.no_grad():
        torch.testing.assert_close(deployable(features), scheme.student((features - mean) / std), atol=1e-5, rtol=0)
    assert deployable.input_size == () and deployable.example_input(2).shape == (2, 57)
    with pytest.raises(DataError, match=r"\(N, 57\) feature vectors"):
        deployable(torch.randn(2, 56))


def test_measure_deployment_gives_every_figure_for_student_and_teacher() -> None:
    torch.manual_seed(0)
    scheme = ScoreRegressionScheme((1, 28, 28), student="G", compression_ratio=None)
    figures = measure_deployment(scheme.deployable_model(), scheme.teacher_deployable_model(),
                                 latency_calls=2, throughput_calls=1, onnx=True)
    for prefix in ("", "teacher_"):
        for key in ("latency_ms_b1", "images_per_s_b32", "model_bytes", "params", "macs",
                    "onnx_latency_ms_b1", "onnx_images_per_s_b32", "onnx_model_bytes"):
            value = figures[f"deploy/{prefix}{key}"]
            assert math.isfinite(value) and value > 0, (prefix, key, value)
    summary = scheme.compression_summary()
    assert figures["deploy/params"] == summary["student_params"] == 77
    assert figures["deploy/teacher_params"] == summary["teacher_params"]
    assert figures["deploy/macs"] == summary["student_macs"]
    assert "deploy/onnx_latency_ms_b1" not in measure_deployment(scheme.deployable_model(), latency_calls=1,
                                                                throughput_calls=1, onnx=False)


def test_every_run_logs_the_deployment_figures(compose_cfg) -> None:
    cfg = compose_cfg("experiment=quickstart", "logger=none", *fast_overrides("trainer.max_epochs=2"))
    metrics = train(cfg)
    for key in ("deploy/latency_ms_b1", "deploy/teacher_latency_ms_b1", "deploy/onnx_latency_ms_b1",
                "deploy/teacher_onnx_latency_ms_b1", "deploy/images_per_s_b32", "deploy/model_bytes"):
        assert key in metrics and metrics[key] > 0, key
    cfg = compose_cfg("experiment=quickstart", "logger=none", "deploy.measure=false",
                      *fast_overrides("trainer.max_epochs=2"))
    assert not any(key.startswith("deploy/") for key in train(cfg))


def test_reverse_distillation_deployable_gives_the_test_steps_scores_and_maps(tmp_path: Path) -> None:
    from kd_experiments.anomaly_maps import image_scores
    from kd_experiments.data.common import load_image, pil_to_uint8_tensor
    from kd_experiments.data.synthetic import SyntheticMVTecDataModule
    from kd_experiments.schemes.reverse_distillation import ReverseDistillationScheme

    data = SyntheticMVTecDataModule(root=tmp_path / "synthetic", n_train=8, n_test_good=4, n_test_defect_per_type=2,
                                    image_size=32, batch_size=4)
    torch.manual_seed(0)
    scheme = ReverseDistillationScheme((3, 32, 32), compression_ratio=4, blur_sigma=1.0, expert=True,
                                       skip_fusion=True, guided_injection=True, val_synthetic_anomalies=False)
    _trainer().test(scheme, datamodule=data, verbose=False)
    scheme.eval()
    items = [data.test_dataset[i] for i in range(len(data.test_dataset))]
    with torch.no_grad():  # the path before the deployable model: the scheme's forward on normalised tensors
        expected_maps = scheme(torch.stack([item["image"] for item in items]))
        raw = torch.stack([pil_to_uint8_tensor(load_image(item["path"])) for item in items])  # the PNG files
        deployable = scheme.deployable_model().eval()
        scores, maps = deployable(raw)
        from_float = deployable(raw.float() / 255.0)[1]
    assert maps.shape == (len(items), 1, 32, 32) and scores.shape == (len(items),)
    torch.testing.assert_close(maps[:, 0], expected_maps, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_float, maps, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores, image_scores(expected_maps), atol=1e-5, rtol=0)
    torch.testing.assert_close(scheme.test_results["score"], scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(scheme.test_results["map"], maps[:, 0], atol=1e-5, rtol=0)
    assert deployable.produces_map is True and deployable.input_size == (32, 32) and deployable.input_channels == 3

    # encoder + student, no expert; the reference is the encoder with a full-width student
    deployed_ids = {id(p) for p in deployable.parameters()}
    assert deployed_ids == {id(p) for p in [*scheme.encoder.parameters(), *scheme.student.parameters()]}
    assert not deployed_ids & {id(p) for p in scheme.expert.parameters()}
    summary = scheme.compression_summary()
    assert summary["deployed_params"] == summary["teacher_params"] + summary["student_params"]
    reference = summary["teacher_params"] + summary["full_student_params"]
    assert count_parameters(scheme.teacher_deployable_model()) == reference
    assert summary["deployed_compression_ratio"] == pytest.approx(reference / summary["deployed_params"])


def test_report_latency_axis_uses_the_deployed_students_latency() -> None:
    from kd_experiments.report import RunRecord, choose_latency

    def record(metrics: dict[str, float]) -> RunRecord:
        return RunRecord("id", "run", "FINISHED", "score_regression", "digits", "0", "s", 8.0, 8.0, 100.0, 10.0,
                         1.0, 30.0, metrics)

    runs = [record({"deploy/latency_ms_b1": 0.2, "deploy/teacher_latency_ms_b1": 3.0, "test/latency_ms": 5.0})]
    assert choose_latency(runs).metric == "deploy/latency_ms_b1"
    assert choose_latency([record({})]).metric == "duration_s"
