"""Map teachers: any map-producing detector of this framework, frozen.

A teacher is a :class:`~kd_experiments.deployable.DeployableModel` with
``produces_map = True``: raw images (``uint8`` or [0, 1]) in, ``(scores, maps)`` out,
with its own preprocessing. Reverse distillation, RD with Expert and PatchCore runs all
hand one over (``scheme.deployable_model()``), so a trained run is a teacher through
:func:`load_map_teacher` (its Lightning checkpoint, read weights-only by
:func:`kd_experiments.checkpoints.load_scheme`), from a config:

    scheme.teacher={_target_: kd_experiments.schemes.map_regression.teachers.load_map_teacher,
                    scheme_target: kd_experiments.schemes.patchcore.PatchCoreScheme,
                    checkpoint: /path/to/last.ckpt}
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kd_experiments.errors import ConfigError


class MapTeacher(nn.Module):
    """A frozen map-producing deployable model; ``forward(raw images)`` -> ``(scores, maps)``.

    ``leave_out``: optional ``(raw images, ids) -> (scores, maps)`` that scores each image as one
    the teacher never trained on (a PatchCore bank without the image's own patches,
    :meth:`~kd_experiments.schemes.patchcore.PatchCoreScheme.score_leaving_out`); ``forward``
    uses it when given ``ids``.
    """

    def __init__(self, model: nn.Module, scheme_name: str = "external", leave_out=None,
                 bank_ids: torch.Tensor | None = None) -> None:
        super().__init__()
        self.__dict__["leave_out"] = leave_out  # a bound method of the trained scheme, not a submodule
        #: the ids of the images the teacher was built from (those ``leave_out`` can leave out)
        self.bank_ids = None if bank_ids is None else torch.unique(bank_ids.detach().cpu())
        if not isinstance(model, nn.Module) or not getattr(model, "produces_map", False):
            raise ConfigError(
                f"scheme.teacher must be a map-producing deployable model (produces_map=True), got "
                f"{type(model).__name__}"
            )
        self.model = model
        self.scheme_name = scheme_name
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> MapTeacher:  # always frozen, in eval mode
        super().train(False)
        return self

    @property
    def input_size(self) -> tuple[int, ...]:
        return tuple(self.model.input_size)

    @property
    def input_channels(self) -> int:
        return int(self.model.input_channels)

    @property
    def can_leave_out(self) -> bool:
        return self.leave_out is not None

    def built_from(self, ids: torch.Tensor) -> torch.Tensor:
        """Which of the images ``ids`` ``(N,)`` the teacher was built from (all ``False`` when unknown)."""
        if self.bank_ids is None:
            return torch.zeros(len(ids), dtype=torch.bool)
        return torch.isin(ids.cpu(), self.bank_ids)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if ids is not None:
            if self.leave_out is None:
                raise ConfigError(f"the {self.scheme_name} teacher cannot score leaving its training images out "
                                  "(only a PatchCore memory bank that records its source images can)")
            scores, maps = self.leave_out(images, ids)
        else:
            scores, maps = self.model(images)
        if maps.dim() == 3:
            maps = maps.unsqueeze(1)
        return scores, maps


def load_map_teacher(scheme_target: str, checkpoint: str | Path) -> MapTeacher:
    """The deployable model of a trained map-producing run, from its Lightning checkpoint."""
    from kd_experiments.checkpoints import load_scheme

    scheme = load_scheme(scheme_target, checkpoint, key="scheme.teacher")
    if not hasattr(scheme, "deployable_model"):
        raise ConfigError(f"scheme.teacher.scheme_target={scheme_target!r} has no deployable model")
    model = scheme.deployable_model()
    if not getattr(model, "produces_map", False):
        raise ConfigError(
            f"scheme.teacher: {scheme_target} produces image scores only; a map teacher needs anomaly maps "
            "(reverse distillation, RD with Expert, PatchCore)"
        )
    known = getattr(scheme, "knows_bank_sources", False)
    return MapTeacher(model, getattr(scheme, "scheme_name", type(scheme).__name__),
                      scheme.score_leaving_out if known else None, scheme.memory_bank_sources if known else None)
