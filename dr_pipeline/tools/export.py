"""`dr-gen export OUT DEST --format datacompdr`: a dataset in the public DataCompDR layout.

For MobileCLIP training code that reads that layout (apple/ml-mobileclip's open_clip
patch). DEST gets one tar per unit, `UNIT.tar`, whose samples have the members

    url.txt     source URL ("" when the input had none)
    txt         the real caption (that loader skips samples without one)
    syn.json    {"syn_text": [S synthetic captions, captioners in order]}
    paug.json   {"param_aug": K x [[top, left, height, width], [[op, magnitude], ...] or null]}
    npz         image_emb [K, sum D], text_emb [1 + S, sum D]: teachers concatenated in order
    json        {"uid": the sample's uid, "sha256": of the original image}, plus
                "normalised_image": "png" when the image member is the normalised one
    jpg|png|... the original image, unless images=False (then join by uid, as DataCompDR does);
                where the original does not decode by `Image.open(...).convert("RGB")` (what
                the loader does) to the pixels the teachers saw (decode.py's rule: EXIF
                rotation, transparency on white, 16-bit greys), or whose format the
                loader does not read (gif, bmp, tiff), the decoded image as a lossless
                `png` instead, counted in the summary's `normalised_images`

plus `config.json` (teachers and augmentation, shaped like Apple's datacompdr12m.json:
that loader reads `reinforce.image_augmentation` from it) and `sizes.json` (samples per
tar, which open_clip's webdataset loader reads for the epoch length).

The layout has no place for a flip, an erasing box, or a teacher without image or
text embeddings, and its loader applies RandAugment with nearest interpolation;
a dataset using any of those is refused with one line, never exported lossy.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import webdataset as wds

from dr_pipeline.views.decode import differs_from_plain_decode, normalised_png
from dr_pipeline.core.errors import DatasetError
from dr_pipeline.read.reader import ReinforcedDataset
from dr_pipeline.read.replay import dataset_job, unit_rows_with_images
from dr_pipeline.core.storage import Location

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
LOADER_IMAGE_SUFFIXES = ("jpg", "png", "jpeg", "webp")  # the image members MobileCLIP's loader looks for


@dataclass
class ExportSummary:
    dest: str
    units: int = 0
    samples: int = 0
    normalised_images: int = 0  # images written as their decoded PNG (decode.normalised_png)


def datacompdr_problems(dataset: ReinforcedDataset) -> list[str]:
    """Why the dataset cannot be written in the DataCompDR layout (empty when it can)."""
    augmentation = dataset_job(dataset).augmentation
    problems = []
    if augmentation.horizontal_flip.p > 0:
        problems.append(f"it flips views (horizontal_flip.p = {augmentation.horizontal_flip.p})")
    if augmentation.random_erasing.p > 0:
        problems.append(f"it erases boxes (random_erasing.p = {augmentation.random_erasing.p})")
    if augmentation.rand_augment.p > 0 and augmentation.rand_augment.interpolation != "nearest":
        problems.append(
            f"RandAugment used {augmentation.rand_augment.interpolation} interpolation, the layout's loader "
            "replays it with nearest"
        )
    for teacher in dataset.layout.teachers:
        if not (teacher.has_image and teacher.has_text):
            problems.append(f"teacher {teacher.id} has no {'image' if not teacher.has_image else 'text'} embeddings")
    if not dataset.layout.captioners:
        problems.append("it has no synthetic captions")
    return problems


def datacompdr_config(dataset: ReinforcedDataset) -> dict[str, Any]:
    """config.json: Apple's keys (model_name, pretrained, num_samples, reinforce) plus what a
    distillation loss needs (teacher dims and logit scales, what each text_emb row is)."""
    augmentation = dataset_job(dataset).augmentation
    cards = [entry["card"] for entry in dataset.manifest["teachers"]]
    crop = augmentation.random_resized_crop
    rand_augment = augmentation.rand_augment
    return {
        "model_name": ",".join(card["model"] for card in cards),
        "pretrained": ",".join(card["weights"] for card in cards),
        "num_samples": dataset.layout.num_views,
        "reinforce": {
            "image_augmentation": {
                "normalize": {"mean": cards[0]["mean"], "std": cards[0]["std"]},
                "rand_augment": {
                    "enable": rand_augment.p > 0,
                    "p": rand_augment.p,
                    "num_ops": rand_augment.num_ops,
                    "magnitude": rand_augment.magnitude,
                    "num_magnitude_bins": rand_augment.num_magnitude_bins,
                },
                "random_resized_crop": {
                    "interpolation": crop.interpolation,
                    "size": crop.size,
                    "scale": list(crop.scale),
                    "ratio": list(crop.ratio),
                },
                "to_rgb": {"enable": True},
                "to_tensor": {"enable": True},
            }
        },
        "teachers": [
            {"id": card["id"], "spec": card["spec"], "embedding_dim": card["embedding_dim"],
             "logit_scale": card["logit_scale"]}
            for card in cards
        ],
        "text_emb_rows": dataset.manifest["text_rows"],
        "source": {"schema_version": dataset.manifest["schema_version"],
                   "config_hash": dataset.manifest["config_hash"]},
    }


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz as np.load reads it, never pickled, with fixed member timestamps (np.savez
    stamps the current time) so that an export is byte-for-byte reproducible."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            with archive.open(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH), "w") as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def datacompdr_members(dataset: ReinforcedDataset, row: dict[str, Any], with_image: bool) -> dict[str, bytes]:
    """The tar members of one sample (without the key); the image member is the decoded
    image as PNG where a plain loader would see other pixels than the teachers did."""
    layout = dataset.layout
    # npz has no bfloat16; int8 rows times their scale keep all their precision in float16
    npz_dtype = np.float16 if layout.embedding_dtype in ("float16", "int8") else np.float32
    synthetic = [row[source["source"]][source["index"]] for source in dataset.manifest["text_rows"][1:]]
    members = {
        "url.txt": (row["url"] or "").encode(),
        "txt": row["text"].encode(),
        "syn.json": _json({"syn_text": synthetic}),
        "paug.json": _json({"param_aug": [view.to_datacompdr() for view in row["aug"]]}),
        "npz": _npz_bytes({
            "image_emb": np.concatenate([row[t.image_column] for t in layout.teachers], axis=1).astype(npz_dtype),
            "text_emb": np.concatenate([row[t.text_column] for t in layout.teachers], axis=1).astype(npz_dtype),
        }),
    }
    sample_json = {"uid": row["uid"], "sha256": row["image_sha256"]}
    if with_image:
        recorded = dataset.manifest["config"]["input"].get("max_image_pixels")  # cheaper than dataset_job per row
        max_pixels = recorded or dataset_job(dataset).input.max_image_pixels
        if row["image_format"] in LOADER_IMAGE_SUFFIXES and not differs_from_plain_decode(row["image"], max_pixels):
            members[row["image_format"]] = row["image"]
        else:
            members["png"] = normalised_png(row["image"], max_pixels)
            sample_json["normalised_image"] = "png"
    members["json"] = _json(sample_json)
    return members


def export_datacompdr(
    dataset: ReinforcedDataset,
    dest_url: str,
    *,
    images: bool = True,
    dest_storage_options: dict[str, Any] | None = None,
    input_storage_options: dict[str, Any] | None = None,
    on_unit: Callable[[str, ExportSummary], None] | None = None,
) -> ExportSummary:
    """Write every committed unit of `dataset` to DEST/UNIT.tar, then config.json and sizes.json.

    images: include the originals (from the dataset when it kept them, else read
    again from the input shards, checked by sha256).
    """
    problems = datacompdr_problems(dataset)
    if problems:
        raise DatasetError(f"cannot export {dataset.location.url()} as DataCompDR: {'; '.join(problems)}")
    dest = Location.from_url(dest_url, dest_storage_options)
    summary = ExportSummary(dest.url())
    sizes = {}
    for unit in dataset.units:
        name = f"{unit['id']}.tar"
        rows = unit_rows_with_images(dataset, unit, input_storage_options) if images else dataset.iter_unit(unit)
        count = 0
        with dest.open_atomic(name) as sink:
            tar = wds.TarWriter(sink, encoder=False, mtime=0)
            for row in rows:
                members = datacompdr_members(dataset, row, images)
                tar.write({"__key__": row["key"], **members})
                count += 1
                summary.normalised_images += b'"normalised_image"' in members["json"]
            tar.close()
        sizes[name] = count
        summary.units += 1
        summary.samples += count
        if on_unit:
            on_unit(unit["id"], summary)
    dest.write_json_atomic(datacompdr_config(dataset), "config.json")
    dest.write_json_atomic(sizes, "sizes.json")
    return summary
