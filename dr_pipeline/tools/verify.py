"""`dr-gen verify`: recompute what the teachers stored, for a random subset, and compare.

For N random samples the K views are replayed from the original (replay.py), and
compared pixel for pixel with the views rendered from parameters sampled afresh from
(run seed, key), as the generator sampled them: a stored parameter that changed (a crop
shifted by one pixel, a flip, another RandAugment op) changes pixels, where the tiny
teachers' cosines may stay above any threshold. Then
every teacher, rebuilt from its spec in the manifest, embeds them and the texts
(the real caption, then every synthetic caption in the manifest's text_rows
order). The cosine between each recomputed and stored embedding says whether
the dataset still holds what its teachers produce: a tampered file, a replay
that drifted (other augmentation code or torch build) or other weights behind
the same spec all show as cosines below the threshold. Random-init specs are
seeded from the spec, so they reproduce exactly; stored float16 costs ~1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from dr_pipeline.core.accelerator import teacher_batch_size
from dr_pipeline.views.augment import render_views, sample_views
from dr_pipeline.read.reader import ReinforcedDataset
from dr_pipeline.read.replay import ViewRenderer, dataset_job, original_images, pick_samples, row_texts
from teachers import build_teacher

DEFAULT_THRESHOLD = 0.99


@dataclass
class TeacherCheck:
    """Cosines between recomputed and stored embeddings of one teacher, over the checked samples."""

    teacher: str
    image: list[float] = field(default_factory=list)
    text: list[float] = field(default_factory=list)
    worst_key: str | None = None
    card_differences: list[str] = field(default_factory=list)

    @property
    def cosines(self) -> list[float]:
        return self.image + self.text

    @property
    def min(self) -> float:
        return min(self.cosines)

    @property
    def mean(self) -> float:
        return float(np.mean(self.cosines))

    def to_dict(self) -> dict[str, Any]:
        def stats(values: list[float]) -> dict[str, Any] | None:
            return {"min": min(values), "mean": float(np.mean(values)), "count": len(values)} if values else None

        return {"teacher": self.teacher, "image": stats(self.image), "text": stats(self.text), "min": self.min,
                "mean": self.mean, "worst_key": self.worst_key, "card_differences": self.card_differences}


@dataclass
class ReplayCheck:
    """Views rendered from the stored parameters against views rendered from parameters sampled
    afresh: (key, view index) of every view whose pixels differ."""

    views: int = 0
    mismatched: list[tuple[str, int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"views": self.views, "mismatched": [{"key": key, "view": view} for key, view in self.mismatched]}


def _cosines(recomputed: torch.Tensor, stored: np.ndarray) -> np.ndarray:
    """Row-wise cosine of [M, D] recomputed and stored embeddings, in float64."""
    a = recomputed.double().numpy()
    b = stored.astype(np.float64)
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _in_batches(encode: Callable[[Any], torch.Tensor], items: Any, batch_size: int) -> torch.Tensor:
    return torch.cat([encode(items[start : start + batch_size]) for start in range(0, len(items), batch_size)])


def verify_dataset(
    dataset: ReinforcedDataset,
    num_samples: int,
    seed: int = 0,
    device: str = "cpu",
    on_teacher_done: Callable[[TeacherCheck], None] | None = None,
) -> tuple[list[str], list[TeacherCheck], ReplayCheck]:
    """(keys checked, one check per teacher, the pixel check of the stored parameters); teachers
    are built one at a time to bound memory."""
    job = dataset_job(dataset)
    layout = dataset.layout
    samples = pick_samples(dataset, num_samples, seed)
    renderer = ViewRenderer(job)
    for image, sample in zip(original_images(dataset, samples), samples):
        sample.row["image"] = image
    replay = ReplayCheck()
    rendered = []
    for sample in samples:
        pixels, stored_views = renderer.render_all(sample.row)
        fresh = sample_views(job.seed, sample.key, int(pixels.shape[1]), int(pixels.shape[2]), job.augmentation)
        fresh_views = render_views(pixels, fresh, renderer.view_size, job.augmentation)
        replay.views += len(stored_views)
        replay.mismatched += [(sample.key, index) for index in range(len(stored_views))
                              if not torch.equal(stored_views[index], fresh_views[index])]
        rendered.append(stored_views)
    views = torch.cat(rendered)
    texts = [text for sample in samples for text in row_texts(sample.row, layout)]
    view_owner = [s.key for s in samples for _ in range(layout.num_views)]
    text_owner = [s.key for s in samples for _ in range(layout.num_texts)]
    checks = []
    for config, columns, entry in zip(job.teachers, layout.teachers, dataset.manifest["teachers"]):
        teacher = build_teacher(config, device, "fp32")
        check = TeacherCheck(config.id)
        rebuilt_card = teacher.card.to_dict()
        check.card_differences = sorted(k for k, v in entry["card"].items() if rebuilt_card.get(k) != v)
        worst = (2.0, None)
        batch_size = teacher_batch_size(
            config.batch_size, teacher.encode_image, renderer.view_size, torch.device(device)
        )
        if columns.image_column:
            stored = np.concatenate([s.row[columns.image_column] for s in samples])
            cosines = _cosines(_in_batches(teacher.encode_image, views, batch_size), stored)
            check.image = cosines.tolist()
            worst = min(worst, (float(cosines.min()), view_owner[int(cosines.argmin())]))
        if columns.text_column:
            stored = np.concatenate([s.row[columns.text_column] for s in samples])
            cosines = _cosines(_in_batches(teacher.encode_text, texts, batch_size), stored)
            check.text = cosines.tolist()
            worst = min(worst, (float(cosines.min()), text_owner[int(cosines.argmin())]))
        check.worst_key = worst[1]
        del teacher
        checks.append(check)
        if on_teacher_done:
            on_teacher_done(check)
    return [s.key for s in samples], checks, replay
