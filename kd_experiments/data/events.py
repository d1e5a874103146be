"""Collision events in the LHC anomaly-detection challenge format (ADC2021), and a generator.

Govorkova et al., "LHC physics dataset for unsupervised New Physics detection at 40
MHz", Sci. Data 9, 118 (2022) (the ADC2021 challenge): each event is 19 reconstructed
objects, ``MET, 4 electrons, 4 muons, 10 jets``, each ``(pT, eta, phi, type)``, zero
padded, stored in HDF5 under the key ``Particles`` with shape ``(N, 19, 4)`` (types: 1
MET, 2 electron, 3 muon, 4 jet, 0 empty). The model input is the 57 numbers
``(pT, eta, phi)`` of the 19 objects. The same representation feeds the unsupervised
teacher / supervised student of Pol et al. (arXiv 2310.06047) and CICADA.

- :class:`EventsDataModule`: background events (normal) from one file, split into
  train / validation / test background (seeded); signal files (anomalous) join the test
  split. Features: ``log(1 + pT)``, eta, phi, standardised per feature with the
  training background's mean and std. Batches follow CONTRIBUTING.md with the
  57-vector in the ``image`` slot (``float32 (57,)``), so every scheme's batch code
  applies; ``input_shape`` is ``(57,)``.
- :func:`generate_events` / :func:`write_events`: a generator of synthetic background
  events (MET, Poisson object counts, falling pT spectra, ADC2021 acceptance cuts) and
  of events with injected anomalous signatures (``four_leptons``, ``dilepton``,
  ``high_met``, ``multijet``), written in the exact ADC2021 schema. With
  ``synthetic=true`` the datamodule writes such files to ``cache_dir`` (once) and reads
  them back through the same code as real files. For the demo and tests; it is not a
  physics simulation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from kd_experiments.data.common import SplitDataModule, check_choice, check_fraction, check_positive_int
from kd_experiments.errors import ConfigError, DataError

PARTICLES_KEY = "Particles"
NUM_OBJECTS = 19
NUM_FIELDS = 4  # pT, eta, phi, type
NUM_FEATURES = NUM_OBJECTS * 3
#: object slots: (first index, count, type id, |eta| acceptance, pT threshold)
OBJECT_SLOTS: dict[str, tuple[int, int, int, float, float]] = {
    "met": (0, 1, 1, 0.0, 0.0),
    "electron": (1, 4, 2, 3.0, 23.0),
    "muon": (5, 4, 3, 2.1, 23.0),
    "jet": (9, 10, 4, 4.0, 17.0),
}
SIGNATURES: tuple[str, ...] = ("four_leptons", "dilepton", "high_met", "multijet")
PT_TRANSFORMS: tuple[str, ...] = ("log1p", "none")


# --------------------------------------------------------------------------- generator


def _fill(events: np.ndarray, kind: str, counts: np.ndarray, pt: np.ndarray, rng: np.random.Generator) -> None:
    """Write ``counts[i]`` objects of ``kind`` into event ``i`` (pT sorted, descending)."""
    first, slots, type_id, eta_max, pt_min = OBJECT_SLOTS[kind]
    counts = np.minimum(counts, slots)
    for slot in range(slots):
        present = counts > slot
        if not present.any():
            continue
        events[present, first + slot, 0] = pt_min + pt[present, slot]
        events[present, first + slot, 1] = rng.uniform(-eta_max, eta_max, present.sum())
        events[present, first + slot, 2] = rng.uniform(-np.pi, np.pi, present.sum())
        events[present, first + slot, 3] = type_id
    block = events[:, first : first + slots]
    order = np.argsort(-block[:, :, 0], axis=1, kind="stable")
    events[:, first : first + slots] = np.take_along_axis(block, order[:, :, None], axis=1)


def generate_events(num_events: int, signature: str | None = None, seed: int = 0) -> np.ndarray:
    """Synthetic events ``float32 (num_events, 19, 4)`` in the ADC2021 layout.

    ``signature=None`` gives background (soft MET, few soft leptons, a few jets);
    a name of :data:`SIGNATURES` injects that anomalous signature into every event.
    """
    if signature is not None:
        check_choice("signature", signature, SIGNATURES)
    rng = np.random.default_rng(seed)
    n = int(num_events)
    events = np.zeros((n, NUM_OBJECTS, NUM_FIELDS), dtype=np.float32)
    events[:, 0, 0] = rng.exponential(20.0, n)
    events[:, 0, 2] = rng.uniform(-np.pi, np.pi, n)
    events[:, 0, 3] = 1
    electrons = rng.poisson(0.3, n)
    muons = rng.poisson(0.3, n)
    jets = rng.poisson(2.5, n)
    electron_pt = rng.exponential(15.0, (n, 4))
    muon_pt = rng.exponential(15.0, (n, 4))
    jet_pt = rng.exponential(25.0, (n, 10))
    if signature == "four_leptons":
        muons, electrons = np.full(n, 2) + rng.integers(0, 3, n), np.full(n, 2)
        muon_pt, electron_pt = rng.exponential(40.0, (n, 4)) + 10, rng.exponential(40.0, (n, 4)) + 10
    elif signature == "dilepton":
        muons = np.maximum(muons, 2)
        muon_pt = rng.exponential(80.0, (n, 4)) + 60
    elif signature == "high_met":
        events[:, 0, 0] = 120.0 + rng.exponential(80.0, n)
    elif signature == "multijet":
        jets = rng.integers(7, 11, n)
        jet_pt = rng.exponential(60.0, (n, 10)) + 20
    _fill(events, "electron", electrons, electron_pt, rng)
    _fill(events, "muon", muons, muon_pt, rng)
    _fill(events, "jet", jets, jet_pt, rng)
    return events


def write_events(path: str | Path, particles: np.ndarray) -> Path:
    """Write ``particles (N, 19, 4)`` to an HDF5 file in the ADC2021 schema."""
    import h5py

    particles = np.asarray(particles, dtype=np.float32)
    assert particles.ndim == 3 and particles.shape[1:] == (NUM_OBJECTS, NUM_FIELDS), particles.shape
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle.create_dataset(PARTICLES_KEY, data=particles, compression="gzip")
        handle.create_dataset("Particles_Names", data=np.array([b"Pt", b"Eta", b"Phi", b"Class"]))
        handle.create_dataset(
            "Particles_Classes",
            data=np.array([b"MET_class_1", b"Four_Ele_class_2", b"Four_Mu_class_3", b"Ten_Jet_class_4"]),
        )
    return path


# --------------------------------------------------------------------------- reading


def read_particles(path: str | Path, max_events: int | None = None) -> np.ndarray:
    """``Particles`` of an ADC2021 HDF5 file as ``float32 (N, 19, 4)``; one-line DataError otherwise."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise DataError(f"event file {path} does not exist")
    try:
        with h5py.File(path, "r") as handle:
            if PARTICLES_KEY not in handle:
                raise DataError(f"event file {path} has no '{PARTICLES_KEY}' dataset (keys: {sorted(handle.keys())})")
            dataset = handle[PARTICLES_KEY]
            if dataset.ndim != 3 or tuple(dataset.shape[1:]) != (NUM_OBJECTS, NUM_FIELDS):
                raise DataError(
                    f"event file {path}: '{PARTICLES_KEY}' has shape {tuple(dataset.shape)}, "
                    f"expected (N, {NUM_OBJECTS}, {NUM_FIELDS})"
                )
            stop = dataset.shape[0] if max_events is None else min(int(max_events), dataset.shape[0])
            particles = np.asarray(dataset[:stop], dtype=np.float32)
    except OSError as error:
        raise DataError(f"event file {path} is not a readable HDF5 file: {str(error).splitlines()[0][:150]}") from None
    if len(particles) == 0:
        raise DataError(f"event file {path} holds no events")
    if not np.isfinite(particles).all():
        raise DataError(f"event file {path} has {int((~np.isfinite(particles)).sum())} NaN or infinite values")
    return particles


def particles_to_features(particles: np.ndarray, pt_transform: str = "log1p") -> np.ndarray:
    """The 57 model inputs ``(pT, eta, phi)`` of the 19 objects, ``float32 (N, 57)``."""
    features = particles[:, :, :3].copy()
    if pt_transform == "log1p":
        features[:, :, 0] = np.log1p(np.clip(features[:, :, 0], 0.0, None))
    return features.reshape(len(features), NUM_FEATURES)


class EventDataset(Dataset):
    """In-memory event features with labels; items are CONTRIBUTING.md batch dicts."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        assert len(features) == len(labels)
        self.images = features  # the name every scheme reads, see the module docstring
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        return {"image": self.images[index], "label": int(self.labels[index]), "index": index}


class EventsDataModule(SplitDataModule):
    """Background events normal, signal events anomalous (ADC2021 HDF5 files or generated ones).

    Args:
        background_path: HDF5 file of background events (``Particles``); with
            ``synthetic=true`` and null, ``cache_dir/events_synthetic/background.h5``.
        signal_paths: ``{name: file}`` (or a list of files) of anomalous events for the
            test split; with ``synthetic=true`` and null, one generated file per signature.
        synthetic: generate the missing files (once, seeded) into ``cache_dir``.
        cache_dir: where generated files go.
        num_background, num_signal: sizes of generated files.
        max_background, max_signal: read at most this many events per file.
        val_fraction, test_fraction: shares of the background held out (seeded).
        pt_transform: ``log1p`` (default) or ``none`` before standardisation.
        batch_size, eval_batch_size, num_workers, seed: loaders and splits (training batches in
            an order drawn from ``seed`` and the epoch, so a resumed run is exact).
    """

    def __init__(
        self,
        background_path: str | Path | None = None,
        signal_paths: Mapping[str, str] | Sequence[str] | None = None,
        synthetic: bool = False,
        cache_dir: str | Path | None = None,
        num_background: int = 50_000,
        num_signal: int = 2_000,
        max_background: int | None = None,
        max_signal: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.3,
        pt_transform: str = "log1p",
        batch_size: int = 1024,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.synthetic = bool(synthetic)
        if isinstance(signal_paths, Mapping):
            self.signal_paths = {str(k): Path(v) for k, v in signal_paths.items()}
        elif signal_paths is not None:
            self.signal_paths = {Path(p).stem: Path(p) for p in signal_paths}
        else:
            self.signal_paths = None
        if not self.synthetic and (background_path is None or not self.signal_paths):
            raise ConfigError("data.background_path and data.signal_paths are required unless data.synthetic=true")
        if self.synthetic and cache_dir is None and (background_path is None or not self.signal_paths):
            raise ConfigError("data.synthetic=true needs data.cache_dir for the generated files")
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.background_path = None if background_path is None else Path(background_path)
        self.num_background = check_positive_int("num_background", num_background, minimum=10)
        self.num_signal = check_positive_int("num_signal", num_signal)
        self.max_background = None if max_background is None else check_positive_int("max_background", max_background, 10)
        self.max_signal = None if max_signal is None else check_positive_int("max_signal", max_signal)
        self.val_fraction = check_fraction("val_fraction", val_fraction)
        self.test_fraction = check_fraction("test_fraction", test_fraction)
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
        self.pt_transform = check_choice("pt_transform", pt_transform, PT_TRANSFORMS)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.eval_batch_size = self.batch_size if eval_batch_size is None else check_positive_int("eval_batch_size", eval_batch_size)
        self.num_workers = check_positive_int("num_workers", num_workers, minimum=0)
        self.seed = int(seed)
        self.feature_mean: torch.Tensor | None = None
        self.feature_std: torch.Tensor | None = None
        self.test_signal_names: list[str] = []

    # -- files -----------------------------------------------------------------------
    def prepare_data(self) -> None:
        """With ``synthetic=true``, write the missing generated files (seeded, once)."""
        if not self.synthetic:
            return
        folder = (self.cache_dir or Path(".")) / "events_synthetic"
        if self.background_path is None:
            self.background_path = folder / f"background_n{self.num_background}_s{self.seed}.h5"
            if not self.background_path.is_file():
                write_events(self.background_path, generate_events(self.num_background, None, self.seed))
        if not self.signal_paths:
            self.signal_paths = {}
            for offset, signature in enumerate(SIGNATURES, start=1):
                path = folder / f"{signature}_n{self.num_signal}_s{self.seed}.h5"
                if not path.is_file():
                    write_events(path, generate_events(self.num_signal, signature, self.seed + 1000 * offset))
                self.signal_paths[signature] = path

    def _ensure_loaded(self) -> None:
        if self._test is not None:
            return
        self.prepare_data()
        assert self.background_path is not None and self.signal_paths
        background = particles_to_features(read_particles(self.background_path, self.max_background), self.pt_transform)
        signals = {
            name: particles_to_features(read_particles(path, self.max_signal), self.pt_transform)
            for name, path in self.signal_paths.items()
        }
        order = np.random.default_rng(self.seed).permutation(len(background))
        num_val = max(1, round(len(background) * self.val_fraction))
        num_test = max(1, round(len(background) * self.test_fraction))
        if len(background) - num_val - num_test < 2:
            raise DataError(f"event file {self.background_path} has {len(background)} events, too few to split")
        val_index, test_index = order[:num_val], order[num_val : num_val + num_test]
        train_index = np.sort(order[num_val + num_test :])
        train = torch.from_numpy(background[train_index])
        self.feature_mean = train.mean(dim=0)
        std = train.std(dim=0)
        self.feature_std = torch.where(std > 1e-6, std, torch.ones_like(std))

        def standardise(features: np.ndarray) -> torch.Tensor:
            return ((torch.from_numpy(features) - self.feature_mean) / self.feature_std).float()

        self._train = EventDataset(standardise(background[train_index]), torch.zeros(len(train_index), dtype=torch.int64))
        self._val = EventDataset(standardise(background[np.sort(val_index)]), torch.zeros(num_val, dtype=torch.int64))
        test_parts = [background[np.sort(test_index)], *signals.values()]
        labels = [np.zeros(num_test, dtype=np.int64), *(np.ones(len(s), dtype=np.int64) for s in signals.values())]
        self.test_signal_names = ["background"] * num_test + [n for n, s in signals.items() for _ in range(len(s))]
        self._test = EventDataset(standardise(np.concatenate(test_parts)), torch.from_numpy(np.concatenate(labels)))

    # -- Lightning -------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int]:
        return (NUM_FEATURES,)

    def _load(self, stage: str | None) -> None:
        """Read, check, split and standardise every file (all splits at once, whatever ``stage``)."""
        self._ensure_loaded()
