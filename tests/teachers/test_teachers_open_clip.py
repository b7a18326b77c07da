"""The `open_clip:` teacher kind against open_clip called directly on the same weights.

Random weights only (bundled tiny configs); nothing touches a model hub.
"""

import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from dr_pipeline.core.config import CaptionerConfig, TeacherConfig
from dr_pipeline.core.errors import ConfigError
from dr_pipeline.core.seeding import derive_seed
from teachers import build_captioner, build_teacher, check_spec, teacher_kinds
import teachers.open_clip_adapter  # noqa: F401  (registers the bundled tiny configs with open_clip)

OPENAI_MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_MODELS = ["dr-tiny-vit-32", "dr-tiny-vit-16-160", "dr-tiny-coca"]
TEXTS = ["a photo of a dog", "two cats on a sofa", "word " * 200]  # the last exceeds the context


def _views(count: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


def _reference(model_name: str, teacher) -> torch.nn.Module:
    """A second open_clip model holding the teacher's weights, built without dr-gen."""
    model = open_clip.create_model(model_name)
    model.load_state_dict(teacher.model.state_dict())
    return model.eval()


def _assert_same_finite_weights(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name
        assert torch.isfinite(tensor).all(), name


@pytest.fixture(scope="module")
def tiny_vit32():
    return build_teacher(TeacherConfig(id="tiny", spec="open_clip:dr-tiny-vit-32"))


def test_teacher_matches_open_clip_called_directly(tiny_vit32):
    reference = _reference("dr-tiny-vit-32", tiny_vit32)
    views = _views(4, 224)
    with torch.no_grad():
        expected_image = reference.encode_image((views.float() / 255 - OPENAI_MEAN) / OPENAI_STD, normalize=True)
        expected_text = reference.encode_text(open_clip.get_tokenizer("dr-tiny-vit-32")(TEXTS), normalize=True)

    image = tiny_vit32.encode_image(views)
    text = tiny_vit32.encode_text(TEXTS)

    assert image.dtype == text.dtype == torch.float32
    assert image.shape == (4, 64) and text.shape == (3, 64)
    torch.testing.assert_close(image, expected_image, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(text, expected_text, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))


def test_views_of_another_size_are_resized_bicubic_antialiased():
    teacher = build_teacher(TeacherConfig(id="small", spec="open_clip:dr-tiny-vit-16-160"))
    reference = _reference("dr-tiny-vit-16-160", teacher)
    views = _views(3, 224, seed=1)
    resized = F.interpolate(views.float(), size=(160, 160), mode="bicubic", antialias=True, align_corners=False)
    with torch.no_grad():
        expected = reference.encode_image((resized.clamp(0, 255) / 255 - OPENAI_MEAN) / OPENAI_STD, normalize=True)

    embeddings = teacher.encode_image(views)

    assert teacher.card.input_size == 160 and teacher.card.view_resize == "bicubic"
    assert embeddings.shape == (3, 96)
    torch.testing.assert_close(embeddings, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3))


def test_card_describes_the_model(tiny_vit32):
    card = tiny_vit32.card.to_dict()

    assert json.loads(json.dumps(card)) == card
    seed = derive_seed(0, "dr-tiny-vit-32", "random-init", 0)
    assert card == {
        "id": "tiny",
        "spec": "open_clip:dr-tiny-vit-32",
        "kind": "open_clip",
        "model": "dr-tiny-vit-32",
        "weights": f"random-init:{seed}",
        "embedding_dim": 64,
        "input_size": 224,
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "view_resize": "bicubic",
        "context_length": 77,
        "tokenizer": "open_clip.SimpleTokenizer",
        "logit_scale": pytest.approx(1 / 0.07),
        "logit_bias": None,
        "normalized": True,
        "has_image": True,
        "has_text": True,
    }


@pytest.mark.parametrize("model_name", TINY_MODELS)
def test_random_init_is_reproducible_and_leaves_global_rng_alone(model_name):
    rng_before = torch.random.get_rng_state()
    first = build_teacher(TeacherConfig(id="first", spec=f"open_clip:{model_name}")).model.state_dict()
    second = build_teacher(TeacherConfig(id="second", spec=f"open_clip:{model_name}")).model.state_dict()

    assert torch.equal(torch.random.get_rng_state(), rng_before)
    _assert_same_finite_weights(first, second)


def test_random_init_is_identical_in_another_process(tmp_path):
    script = (
        "import sys, torch\n"
        "from dr_pipeline.core.config import TeacherConfig\n"
        "from teachers import build_teacher\n"
        "torch.manual_seed(1234)  # the caller's RNG state must not matter\n"
        "for name in sys.argv[2:]:\n"
        "    teacher = build_teacher(TeacherConfig(id='t', spec=f'open_clip:{name}'))\n"
        "    torch.save(teacher.model.state_dict(), f'{sys.argv[1]}/{name}.pt')\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path), *TINY_MODELS], check=True, cwd=REPO_ROOT)

    for model_name in TINY_MODELS:
        here = build_teacher(TeacherConfig(id="here", spec=f"open_clip:{model_name}")).model.state_dict()
        _assert_same_finite_weights(here, torch.load(tmp_path / f"{model_name}.pt", weights_only=True))


def test_local_checkpoint_is_loaded(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(99)  # weights unlike the spec's random init
        source = open_clip.create_model("dr-tiny-vit-32")
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)

    teacher = build_teacher(TeacherConfig(id="local", spec=f"open_clip:dr-tiny-vit-32@{path}"))

    assert teacher.card.weights == str(path)
    loaded = teacher.model.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in source.state_dict().items())


def test_unloadable_checkpoints_raise_one_line_config_errors(tmp_path):
    wrong_architecture = tmp_path / "vit16.pt"
    torch.save(open_clip.create_model("dr-tiny-vit-16-160").state_dict(), wrong_architecture)
    pickled_object = tmp_path / "pickled.pt"
    torch.save({"state_dict": {}, "extra": ConfigError("not a tensor")}, pickled_object)

    for path in (wrong_architecture, pickled_object):
        with pytest.raises(ConfigError, match="cannot load the open_clip model") as raised:
            build_teacher(TeacherConfig(id="bad", spec=f"open_clip:dr-tiny-vit-32@{path}"))
        assert "\n" not in str(raised.value)


def test_coca_serves_as_teacher():
    teacher = build_teacher(TeacherConfig(id="coca", spec="open_clip:dr-tiny-coca"))
    reference = _reference("dr-tiny-coca", teacher)
    views = _views(2, 224, seed=2)
    with torch.no_grad():
        expected = reference.encode_text(open_clip.get_tokenizer("dr-tiny-coca")(TEXTS), normalize=True)

    assert teacher.card.context_length == 76 and teacher.card.embedding_dim == 64
    assert teacher.encode_image(views).shape == (2, 64)
    torch.testing.assert_close(teacher.encode_text(TEXTS), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("spec", "role"),
    [
        ("open_clip:ViT-L-14/datacomp_xl_s13b_b90k", "teacher"),
        ("open_clip:ViT-L-14/openai", "teacher"),
        ("open_clip:hf-hub:apple/DFN2B-CLIP-ViT-L-14", "teacher"),
        ("open_clip:dr-tiny-vit-32", "teacher"),
        ("open_clip:coca_ViT-L-14/mscoco_finetuned_laion2B-s13B-b90k", "captioner"),
        ("open_clip:coca_ViT-L-14/mscoco_finetuned_laion2B-s13B-b90k", "teacher"),
        ("open_clip:dr-tiny-coca", "captioner"),
    ],
)
def test_check_spec_accepts_good_specs(spec, role):
    check_spec(spec, role)


def test_check_spec_accepts_an_existing_weights_file(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"")
    check_spec(f"open_clip:ViT-B-32@{path}", "teacher")


@pytest.mark.parametrize(
    ("spec", "role", "problem"),
    [
        ("", "teacher", "empty teacher spec"),
        ("ViT-B-32/openai", "teacher", "expected KIND:NAME"),
        ("clip:ViT-B-32/openai", "teacher", "unknown kind 'clip'"),
        ("open_clip:", "teacher", "missing model name"),
        ("open_clip:ViT-B-99/openai", "teacher", "unknown open_clip model 'ViT-B-99'"),
        ("open_clip:ViT-B-32/no_such_tag", "teacher", "unknown pretrained tag 'no_such_tag' for ViT-B-32"),
        ("open_clip:ViT-B-32@/no/such/weights.pt", "teacher", "weights file not found: '/no/such/weights.pt'"),
        ("open_clip:hf-hub:not-an-id", "teacher", "hf-hub id must be ORG/NAME"),
        ("open_clip:ViT-L-14/openai", "captioner", "ViT-L-14 has no text decoder"),
        ("open_clip:hf-hub:apple/DFN2B-CLIP-ViT-L-14", "captioner", "has no text decoder"),
    ],
)
def test_check_spec_rejects_with_one_line(spec, role, problem):
    with pytest.raises(ConfigError) as raised:
        check_spec(spec, role)
    message = str(raised.value)
    assert problem in message
    assert "\n" not in message


def test_build_captioner_refuses_a_clip_model_before_loading_it():
    with pytest.raises(ConfigError, match="no text decoder"):
        build_captioner(CaptionerConfig(id="clip", spec="open_clip:dr-tiny-vit-32"))


def test_teacher_kinds_lists_open_clip():
    kinds = {entry["kind"]: entry for entry in teacher_kinds()}
    assert kinds["open_clip"]["roles"] == ["teacher", "captioner"]
    check_spec(kinds["open_clip"]["example"], "teacher")
    assert kinds["open_clip"]["description"]
