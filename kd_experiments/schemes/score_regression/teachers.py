"""Any trained anomaly detector as the teacher of unsupervised-to-supervised compression.

Pol et al. (arXiv 2310.06047) distil an autoencoder's score; nothing in the method
needs the teacher to be an autoencoder: the student only regresses a per-image score.
So a heavy detector (a reverse-distillation model, an EDE-GAN, any function of the
image) can be compressed into a tiny supervised student through one code path:

- :class:`ScoreTeacher`: wraps a callable ``images (B, C, H, W) -> scores (B,)`` as a
  frozen ``nn.Module`` the scheme uses in place of its own autoencoder;
- :func:`load_scheme_teacher`: a checkpoint of another scheme (any
  :class:`~kd_experiments.schemes.base.AnomalyScheme` subclass) as a ScoreTeacher
  whose score is that scheme's deployed score (``score_batch(...)["score"]``).

Give one to the scheme as ``teacher_model`` (Python) or, from a config, as
``scheme.teacher_model={_target_: kd_experiments.schemes.score_regression.teachers.load_scheme_teacher,
scheme_target: <class path>, checkpoint: <file>}`` (Hydra instantiates it first). The
checkpoint is read by this helper, with ``weights_only=True``
(:func:`kd_experiments.checkpoints.load_checkpoint`), not by the scheme.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from kd_experiments.errors import ConfigError


class ScoreTeacher(nn.Module):
    """A frozen image scorer. ``forward(images)`` returns scores ``(B,)``.

    Args:
        score_fn: the callable; if it is an ``nn.Module`` it is registered, so its
            parameters are counted (and moved with the scheme).
        parameters_count: the teacher's size when ``score_fn`` is not a module (e.g. a
            function around an external library); used for ``compression_ratio``.
    """

    def __init__(self, score_fn: Callable[[torch.Tensor], torch.Tensor], parameters_count: int | None = None) -> None:
        super().__init__()
        if not callable(score_fn):
            raise ConfigError(f"scheme.teacher_model must be callable, got {type(score_fn).__name__}")
        self.model = score_fn if isinstance(score_fn, nn.Module) else None
        self._score_fn = score_fn
        self.parameters_count = parameters_count
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> ScoreTeacher:  # always frozen, in eval mode
        super().train(False)
        return self

    def num_parameters(self) -> int:
        if self.parameters_count is not None:
            return int(self.parameters_count)
        count = sum(p.numel() for p in self.parameters())
        if count == 0:
            raise ConfigError(
                "scheme.teacher_model has no parameters to count; wrap it as "
                "ScoreTeacher(fn, parameters_count=...)"
            )
        return count

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        scores = self._score_fn(images)
        if isinstance(scores, dict):
            scores = scores["score"]
        scores = torch.as_tensor(scores, device=images.device).float().reshape(-1)
        if scores.numel() != images.shape[0]:
            raise ConfigError(
                f"scheme.teacher_model returned {scores.numel()} scores for {images.shape[0]} images"
            )
        return scores


class SchemeScorer(nn.Module):
    """The deployed score of a trained scheme as a plain ``images -> (B,)`` module."""

    def __init__(self, scheme: nn.Module) -> None:
        super().__init__()
        self.scheme = scheme.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scheme.score_batch({"image": images})["score"]


def load_scheme_teacher(scheme_target: str, checkpoint: str | Path) -> ScoreTeacher:
    """A trained scheme, rebuilt from its Lightning checkpoint, as a :class:`ScoreTeacher`.

    The scheme class (``scheme_target``, e.g.
    ``kd_experiments.schemes.reverse_distillation.ReverseDistillationScheme``) is built
    from the checkpoint's saved hyper-parameters and loaded strictly.
    """
    from kd_experiments.checkpoints import load_scheme

    scheme = load_scheme(scheme_target, checkpoint, key="scheme.teacher_model")
    return ScoreTeacher(SchemeScorer(scheme))
