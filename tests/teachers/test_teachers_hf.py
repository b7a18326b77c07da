"""The `hf:` kind against transformers called directly on the same weights.

Tiny random-weight models saved to local folders (tests/teachers/tiny_hf_models.py); nothing touches a
model hub. Captioners: our seeded sampler inside `generate` must emit the same tokens with and
without the model's KV cache, the same tokens as transformers' own greedy decoding when it is
made greedy (top_k=1), and the same caption for a seed whatever the batch.
"""

import pytest
import torch
from transformers import AutoModel, AutoProcessor, AutoTokenizer

from tests.teachers import captioning_reference as before
from tests.teachers import tiny_hf_models
from dr_pipeline.core.config import CaptionerConfig, CaptionPostprocessConfig, SamplerConfig, TeacherConfig
from dr_pipeline.core.errors import ConfigError
from dr_pipeline.core.seeding import derive_seed
from teachers import build_captioner, build_teacher, check_spec
from teachers import hf_adapter

TEXTS = ["a photo of a dog", "two cats on a sofa", "word " * 100]  # the last exceeds every context
CAPTIONERS = ["blip", "git", "vision_encoder_decoder", "llava"]
PROMPTS = {"llava": "<image> a photo of"}
SEEDS = [[11, 12], [13, 14], [15, 16]]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _views(count: int, size: int = tiny_hf_models.IMAGE_SIZE, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_models")
    names = ["clip", "siglip", *CAPTIONERS]
    return {name: getattr(tiny_hf_models, name)(root / name) for name in names}


def _reference_embeddings(folder: str, views: torch.Tensor, padding) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own forward (which L2-normalises) on its processor's inputs."""
    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)  # image processor + tokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder)
    pixels = processor(images=list(views), return_tensors="pt")["pixel_values"]
    context = model.config.text_config.max_position_embeddings
    tokens = tokenizer(TEXTS, padding=padding, truncation=True, max_length=context, return_tensors="pt")
    with torch.no_grad():
        output = model(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"), pixel_values=pixels)
    return output.image_embeds, output.text_embeds


@pytest.mark.parametrize(
    ("name", "padding", "size"),
    [("clip", True, 64), ("siglip", "max_length", 48)],  # how each family's documentation tokenises
)
def test_teacher_matches_the_model_called_directly(folders, name, padding, size):
    teacher = build_teacher(TeacherConfig(id=name, spec=f"hf:{folders[name]}"))
    views = _views(3, size)
    expected_image, expected_text = _reference_embeddings(folders[name], views, padding)

    image, text = teacher.encode_image(views), teacher.encode_text(TEXTS)

    assert image.dtype == text.dtype == torch.float32
    assert image.shape == (3, teacher.card.embedding_dim) and text.shape == (3, teacher.card.embedding_dim)
    torch.testing.assert_close(image, expected_image, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(text, expected_text, rtol=1e-5, atol=1e-6)


def test_teacher_cards_describe_the_models(folders):
    clip = build_teacher(TeacherConfig(id="clip", spec=f"hf:{folders['clip']}")).card
    siglip = build_teacher(TeacherConfig(id="siglip", spec=f"hf:{folders['siglip']}")).card
    reference = AutoModel.from_pretrained(folders["siglip"])

    assert (clip.embedding_dim, clip.input_size, clip.context_length) == (24, 64, 24)
    assert (clip.kind, clip.model, clip.weights, clip.interpolation) == ("hf", "CLIPModel", folders["clip"], "bicubic")
    assert clip.logit_scale == pytest.approx(AutoModel.from_pretrained(folders["clip"]).logit_scale.exp().item())
    assert clip.logit_bias is None and clip.tokenizer.startswith("transformers.BertTokenizer")
    assert (siglip.embedding_dim, siglip.input_size, siglip.mean, siglip.std) == (32, 48, (0.5,) * 3, (0.5,) * 3)
    assert siglip.logit_bias == pytest.approx(reference.logit_bias.item())


def test_config_only_folder_builds_the_same_random_weights_whatever_the_rng_state(tmp_path):
    folder = tiny_hf_models.clip(tmp_path / "config_only", weights=False)
    torch.manual_seed(1)
    rng_before = torch.random.get_rng_state()
    first = build_teacher(TeacherConfig(id="first", spec=f"hf:{folder}"))
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    torch.manual_seed(2)
    second = build_teacher(TeacherConfig(id="second", spec=f"hf:{folder}")).model.state_dict()

    assert first.card.weights == f"random-init:{derive_seed(0, folder, 'random-init', 0)}"
    trained = AutoModel.from_pretrained(tiny_hf_models.clip(tmp_path / "saved")).state_dict()
    assert first.model.state_dict().keys() == second.keys() == trained.keys()
    assert all(torch.equal(tensor, second[name]) for name, tensor in first.model.state_dict().items())
    assert not torch.equal(second["visual_projection.weight"], trained["visual_projection.weight"])  # seeded init


def _captioner(folders, name: str, stop_bias: float = 0.0):
    """The adapter for `name`; stop_bias raises the stop token's logit so captions end at
    mixed lengths (random weights almost never stop on their own)."""
    options = {"prompt": PROMPTS[name]} if name in PROMPTS else {}
    captioner = build_captioner(CaptionerConfig(id=name, spec=f"hf:{folders[name]}", options=options))
    if stop_bias:
        model = captioner.model
        head = model.get_output_embeddings() or model.text_decoder.get_output_embeddings()  # BLIP keeps it inside
        shift = torch.zeros(head.out_features)
        shift[tiny_hf_models.SEP] = stop_bias
        head.register_forward_hook(lambda module, inputs, logits: logits + shift)
    return captioner


@pytest.mark.parametrize("name", CAPTIONERS)
def test_cached_decoder_emits_the_same_tokens_as_full_recompute(folders, name):
    captioner = _captioner(folders, name, stop_bias=6.0)
    sampler = SamplerConfig(top_p=0.95, top_k=2000, temperature=0.9, repetition_penalty=1.2, max_length=12,
                            min_length=2)
    images = _views(3, seed=1)

    cached = captioner.generate(images, SEEDS, sampler, decoding="kv-cache")
    reference = captioner.generate(images, SEEDS, sampler, decoding="full-recompute")

    assert cached == reference
    lengths = {len(tokens) for rows in cached for tokens in rows}
    assert len(lengths) > 1  # rows finished at different steps
    assert all(tokens[-1] == tiny_hf_models.SEP for rows in cached for tokens in rows if len(tokens) < 12)


@pytest.mark.parametrize("name", ["blip", "git"])
def test_the_same_tokens_as_the_sampler_before_issue_15(folders, name, monkeypatch):
    captioner = _captioner(folders, name, stop_bias=4.0)
    sampler = SamplerConfig(top_p=0.9, temperature=0.9, repetition_penalty=1.2, max_length=12, min_length=2)
    images = _views(3, seed=5)

    new = captioner.generate(images, SEEDS, sampler)
    monkeypatch.setattr(hf_adapter, "choose_tokens", before.choose_tokens)
    monkeypatch.setattr(hf_adapter, "RowNoise", before.RowNoise)

    assert captioner.generate(images, SEEDS, sampler) == new


@pytest.mark.parametrize("name", CAPTIONERS)
def test_greedy_sampler_matches_transformers_greedy_generate(folders, name):
    captioner = _captioner(folders, name, stop_bias=3.0)
    images = _views(2, seed=2)
    inputs = captioner.model_inputs(images)

    ours = captioner.generate(images, [[1], [2]], SamplerConfig(top_p=None, top_k=1, max_length=10, min_length=0))
    with torch.no_grad():
        theirs = captioner.model.generate(**inputs, do_sample=False, max_new_tokens=10)

    prompt = inputs["input_ids"].shape[1] if "input_ids" in inputs else 1
    for (row,), expected in zip(ours, theirs[:, prompt:].tolist()):
        assert row == expected[: len(row)]
        assert len(row) == 10 or row[-1] == tiny_hf_models.SEP


def test_a_caption_does_not_depend_on_the_rest_of_the_batch(folders):
    captioner = _captioner(folders, "git", stop_bias=4.0)
    sampler = SamplerConfig(max_length=12, min_length=2)
    images = _views(3, seed=3)
    seeds = [[21, 22], [23], [24, 25]]

    in_batch = captioner.generate(images, seeds, sampler)

    for index, image_seeds in enumerate(seeds):
        for seed, batched in zip(image_seeds, in_batch[index]):
            assert captioner.generate(images[index : index + 1], [[seed]], sampler) == [[batched]]


def test_min_length_and_blip_stop_token(folders):
    forced = _captioner(folders, "blip", stop_bias=40.0)  # the stop token wins as soon as it is allowed
    sampler = SamplerConfig(max_length=12, min_length=4)
    images = _views(2, seed=4)

    rows = forced.generate(images, SEEDS[:2], sampler)
    raw = forced.caption(images, SEEDS[:2], sampler, CaptionPostprocessConfig(strip_special_tokens=False))
    clean = forced.caption(images, SEEDS[:2], sampler, CaptionPostprocessConfig(cut_at_first_period=False))

    assert all(len(tokens) == 5 and tokens[-1] == tiny_hf_models.SEP for image in rows for tokens in image)
    assert all(caption.endswith("[SEP]") for image in raw for caption in image)
    for image_rows, image_captions in zip(rows, clean):
        for tokens, caption in zip(image_rows, image_captions):
            assert caption == forced.tokenizer.decode(tokens[:-1]).strip()


def test_captioner_cards_and_limits(folders):
    llava = _captioner(folders, "llava")
    card = llava.card.to_dict()
    assert (card["kind"], card["model"], card["weights"], card["decoding"]) == (
        "hf", "LlavaForConditionalGeneration", folders["llava"], "kv-cache")
    assert (card["input_size"], card["interpolation"], card["context_length"]) == (64, "bicubic", 128)
    with pytest.raises(ConfigError, match="exceed the context length 128"):
        llava.generate(_views(1), [[1]], SamplerConfig(max_length=120, min_length=0))
    with pytest.raises(ConfigError, match="a prompt needs a model folder with a joint processor"):
        build_captioner(CaptionerConfig(id="ved", spec=f"hf:{folders['vision_encoder_decoder']}",
                                        options={"prompt": "a photo of"}))


@pytest.mark.parametrize(
    ("spec", "role", "options", "problem"),
    [
        ("hf:/no/such/folder", "teacher", {}, "model folder not found: '/no/such/folder'"),
        ("hf:not a hub id", "teacher", {}, "not a hub id"),
        ("hf:", "captioner", {}, "missing model id or folder"),
        ("hf:openai/clip-vit-large-patch14", "teacher", {"colour": "red"}, "unknown option 'colour' for kind 'hf'"),
    ],
)
def test_check_spec_rejects_with_one_line(spec, role, options, problem):
    with pytest.raises(ConfigError) as raised:
        check_spec(spec, role, options)
    assert problem in str(raised.value) and "\n" not in str(raised.value)


def test_check_spec_accepts_hub_ids_and_folders(folders):
    check_spec("hf:openai/clip-vit-large-patch14", "teacher")
    check_spec("hf:Salesforce/blip-image-captioning-large", "captioner", {"prompt": "a photography of"})
    check_spec(f"hf:{folders['blip']}", "captioner")
