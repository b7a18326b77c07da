"""examples/train_student.py: the MobileCLIP loss, and a few training steps that lower the distillation loss."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_student.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_student", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _unit_rows(generator, rows, dim):
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator), dim=1)


def test_ensemble_targets_average_each_teachers_softmax(example):
    generator = torch.Generator().manual_seed(0)
    image = {"a": _unit_rows(generator, 4, 8), "b": _unit_rows(generator, 4, 16)}
    text = {"a": _unit_rows(generator, 4, 8), "b": _unit_rows(generator, 4, 16)}
    image_to_text, text_to_image = example.ensemble_targets(image, text, {"a": 10.0, "b": 50.0})
    logits_a, logits_b = 10.0 * image["a"] @ text["a"].T, 50.0 * image["b"] @ text["b"].T
    torch.testing.assert_close(image_to_text, (logits_a.softmax(1) + logits_b.softmax(1)) / 2)
    torch.testing.assert_close(text_to_image, (logits_a.T.softmax(1) + logits_b.T.softmax(1)) / 2)
    torch.testing.assert_close(image_to_text.sum(1), torch.ones(4))


def test_distillation_is_zero_when_the_student_matches_its_single_teacher(example):
    generator = torch.Generator().manual_seed(1)
    image, text = _unit_rows(generator, 5, 8), _unit_rows(generator, 5, 8)
    targets = example.ensemble_targets({"t": image}, {"t": text}, {"t": 20.0})
    assert example.distillation_loss(20.0 * image @ text.T, targets).item() == pytest.approx(0.0, abs=1e-6)
    assert example.distillation_loss(5.0 * image @ text.T, targets).item() > 0.01


def test_a_few_steps_lower_the_distillation_loss(example, generated):
    result = example.train(generated["kept"].job.output.url, steps=8, batch_size=6, workers=0, log=lambda line: None)
    assert len(result.history) == 8
    assert all(torch.isfinite(torch.tensor(list(step.values()))).all() for step in result.history)
    assert result.distillation_after < 0.8 * result.distillation_before
