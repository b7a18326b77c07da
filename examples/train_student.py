"""Distil a tiny CLIP student from a reinforced dataset with the MobileCLIP loss, on a CPU.

    dr-gen run jobs/quickstart.yaml            # writes out/quickstart
    python examples/train_student.py out/quickstart [--steps 60] [--batch-size 8]

The student is an open_clip CLIP with random weights, built from the bundled tiny
config `dr-tiny-vit-32` at a small input size. Every batch comes from
`ReinforcedTorchDataset`: one replayed view per image, its embeddings by each
teacher, the real caption and one synthetic caption with theirs.

The loss, per batch, is MobileCLIP's (its DRClipLoss): computed once with the real
captions and once with the synthetic ones, and summed; each is

    (1 - distill_weight) * CLIP contrastive loss of the student
    + distill_weight * distillation

where distillation is the KL divergence from the teacher ensemble's image-to-text
(and text-to-image) distribution over the batch to the student's, averaged over the
two directions. The ensemble's distribution is the mean over teachers of
softmax(logit_scale * image_emb @ text_emb.T), each teacher with the logit scale of
its card in the manifest. Apple's DataCompDR runs use distill_weight = 1.

Prints the loss per step, and the distillation loss on a fixed batch before and
after training (it goes down: the student learns the teachers' similarities).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import teachers
from dr_pipeline.read.torch_dataset import ReinforcedTorchDataset

STUDENT_CONFIG = "dr-tiny-vit-32"
open_clip.add_model_config(Path(teachers.__file__).parent / "model_configs")


def build_student(image_size: int) -> tuple[nn.Module, open_clip.tokenizer.SimpleTokenizer]:
    model = open_clip.create_model(STUDENT_CONFIG, pretrained=None, force_image_size=image_size)
    return model, open_clip.get_tokenizer(STUDENT_CONFIG)


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy: image i belongs with text i."""
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def ensemble_targets(
    image_emb: dict[str, torch.Tensor], text_emb: dict[str, torch.Tensor], logit_scales: dict[str, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teachers' mean image-to-text and text-to-image distributions, [B, B] each."""
    image_to_text, text_to_image = [], []
    for teacher, scale in logit_scales.items():
        logits = scale * image_emb[teacher] @ text_emb[teacher].T
        image_to_text.append(logits.softmax(dim=1))
        text_to_image.append(logits.T.softmax(dim=1))
    return torch.stack(image_to_text).mean(0), torch.stack(text_to_image).mean(0)


def distillation_loss(student_logits: torch.Tensor, targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    image_to_text, text_to_image = targets
    forward = F.kl_div(student_logits.log_softmax(dim=1), image_to_text, reduction="batchmean")
    backward = F.kl_div(student_logits.T.log_softmax(dim=1), text_to_image, reduction="batchmean")
    return (forward + backward) / 2


@dataclass
class Student:
    model: nn.Module
    tokenizer: open_clip.tokenizer.SimpleTokenizer
    logit_scales: dict[str, float]  # teacher id -> logit scale from its card

    def losses(self, batch: dict, distill_weight: float) -> dict[str, torch.Tensor]:
        """Contrastive and distillation losses summed over real and synthetic captions, and their mix."""
        image = self.model.encode_image(batch["image"], normalize=True)
        scale = self.model.logit_scale.exp()
        contrastive, distillation = torch.zeros(()), torch.zeros(())
        for text_field in ("text", "syn_text"):
            text = self.model.encode_text(self.tokenizer(batch[text_field]), normalize=True)
            logits = scale * image @ text.T
            targets = ensemble_targets(batch["image_emb"], batch[f"{text_field}_emb"], self.logit_scales)
            contrastive = contrastive + contrastive_loss(logits)
            distillation = distillation + distillation_loss(logits, targets)
        total = (1 - distill_weight) * contrastive + distill_weight * distillation
        return {"contrastive": contrastive, "distillation": distillation, "total": total}


@dataclass
class TrainingResult:
    history: list[dict[str, float]]
    distillation_before: float  # on a fixed batch of epoch 0
    distillation_after: float
    seconds: float


def train(
    dataset_url: str,
    *,
    steps: int = 60,
    batch_size: int = 8,
    image_size: int = 112,
    lr: float = 2e-3,
    distill_weight: float = 0.7,
    seed: int = 0,
    workers: int = 1,
    threads: int = 1,
    log=print,
) -> TrainingResult:
    started = time.perf_counter()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model, tokenizer = build_student(image_size)
    preprocess = open_clip.get_model_preprocess_cfg(model)
    data = ReinforcedTorchDataset(dataset_url, image_size=image_size, mean=preprocess["mean"],
                                  std=preprocess["std"], seed=seed)
    if not data.dataset.layout.captioners:
        raise SystemExit(f"{dataset_url} has no synthetic captions; this example distils from real and synthetic")
    logit_scales = {t["id"]: t["card"]["logit_scale"] for t in data.dataset.manifest["teachers"]
                    if t["card"]["has_image"] and t["card"]["has_text"]}
    student = Student(model, tokenizer, logit_scales)
    fixed_batch = next(iter(DataLoader(data, batch_size=batch_size)))

    def fixed_distillation() -> float:
        model.eval()
        with torch.no_grad():
            value = student.losses(fixed_batch, distill_weight)["distillation"].item()
        model.train()
        return value

    before = fixed_distillation()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    history: list[dict[str, float]] = []
    epoch = 0
    while len(history) < steps:
        data.set_epoch(epoch)
        for batch in DataLoader(data, batch_size=batch_size, drop_last=True, num_workers=workers):
            losses = student.losses(batch, distill_weight)
            optimizer.zero_grad()
            losses["total"].backward()
            optimizer.step()
            history.append({name: value.item() for name, value in losses.items()})
            log(f"step {len(history):3d}  epoch {epoch}  " + "  ".join(f"{k} {v:.4f}" for k, v in history[-1].items()))
            if len(history) == steps:
                break
        epoch += 1
    after = fixed_distillation()
    return TrainingResult(history, before, after, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="reinforced dataset folder URL (e.g. out/quickstart)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--distill-weight", type=float, default=0.7)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the training process (a tiny model gains nothing from more)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = train(args.dataset, steps=args.steps, batch_size=args.batch_size, image_size=args.image_size,
                   lr=args.lr, distill_weight=args.distill_weight, seed=args.seed, workers=args.workers,
                   threads=args.threads)
    print(f"distillation loss on a fixed batch: {result.distillation_before:.4f} before, "
          f"{result.distillation_after:.4f} after {len(result.history)} steps ({result.seconds:.1f} s)")


if __name__ == "__main__":
    main()
