"""Augmentation parameters are a pure function of their inputs, follow torchvision's
distributions, survive storage exactly, and replay to the same pixels."""

import json
import math
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pytest
import torch
import torchvision.transforms.functional as pil_ops
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

from dr_pipeline.core.records import RAND_AUGMENT_OPS, ViewParams
from dr_pipeline.views.augment import (
    center_view_params,
    render_picture_view,
    render_view,
    render_views,
    render_views_tensor,
    sample_view_params,
    sample_views,
)
from dr_pipeline.core.config import AugmentationConfig
from dr_pipeline.views.fidelity import to_picture
from schemas import load_spec

VIEW = 64  # a small view size keeps rendering tests fast


def make_cfg(**sections) -> AugmentationConfig:
    return AugmentationConfig.model_validate(sections)


ALL_STAGES = make_cfg(
    num_views=16,
    random_resized_crop={"size": VIEW},
    horizontal_flip={"p": 0.5},
    rand_augment={"p": 0.5},
    random_erasing={"p": 0.5},
)


def make_image(height: int = 120, width: int = 160) -> torch.Tensor:
    """Smooth structure plus texture, so every op visibly changes something."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.randint(0, 256, (3, height // 10 + 2, width // 10 + 2), dtype=torch.uint8, generator=generator)
    smooth = F.resize(coarse, [height, width], interpolation=InterpolationMode.BILINEAR, antialias=True)
    texture = torch.randint(-20, 21, (3, height, width), generator=generator)
    return (smooth.int() + texture).clamp(0, 255).to(torch.uint8)


# --- sampling ----------------------------------------------------------------


def test_op_order_is_the_schemas():
    assert RAND_AUGMENT_OPS == tuple(op["name"] for op in load_spec()["rand_augment_ops"])
    assert RAND_AUGMENT_OPS[0] == "Identity" and RAND_AUGMENT_OPS[13] == "Equalize"


def test_params_are_a_pure_function_of_the_inputs():
    all_views = sample_views(7, "sample-a", 300, 400, ALL_STAGES)
    assert len(all_views) == ALL_STAGES.num_views
    reversed_one_by_one = [sample_view_params(7, "sample-a", i, 300, 400, ALL_STAGES) for i in reversed(range(16))]
    assert reversed_one_by_one[::-1] == all_views
    assert sample_view_params(7, "sample-a", 11, 300, 400, ALL_STAGES) == all_views[11]
    assert sample_views(7, "sample-a", 300, 400, ALL_STAGES.model_copy(update={"num_views": 4})) == all_views[:4]


def f32(value: float) -> float:
    return float(np.float32(value))


def test_params_are_pinned_across_processes_and_releases():
    """Fixed values, not just self-consistency: a change to the draw order or the
    distributions would silently stop `verify` and replays from matching old datasets."""
    expected = {
        0: ViewParams(crop=(9, 96, 279, 293), flip=True, rand_augment=None, erase=None),
        8: ViewParams(
            crop=(53, 4, 123, 162),
            flip=False,
            rand_augment=((4, f32(-150 / 331 * VIEW * 9 / 30)), (10, 7.0)),
            erase=(4, 6, 34, 40),
        ),
        9: ViewParams(
            crop=(1, 58, 299, 326), flip=True, rand_augment=((5, 9.0), (2, f32(-0.09))), erase=(26, 17, 22, 39)
        ),
        12: ViewParams(crop=(10, 49, 218, 289), flip=True, rand_augment=((7, f32(0.27)), (7, f32(-0.27))), erase=None),
    }
    for index, params in expected.items():
        assert sample_view_params(7, "sample-a", index, 300, 400, ALL_STAGES) == params


def test_keys_indices_and_seeds_give_different_params():
    crops_a = [v.crop for v in sample_views(0, "a", 480, 640, ALL_STAGES)]
    crops_b = [v.crop for v in sample_views(0, "b", 480, 640, ALL_STAGES)]
    crops_seed = [v.crop for v in sample_views(1, "a", 480, 640, ALL_STAGES)]
    assert len(set(crops_a)) == len(crops_a)  # 16 distinct views
    assert not set(crops_a) & set(crops_b)
    assert not set(crops_a) & set(crops_seed)


@pytest.mark.parametrize("height,width", [(480, 640), (640, 480), (333, 500), (97, 53)])
def test_crops_lie_inside_and_respect_scale_and_ratio(height, width):
    cfg = make_cfg(random_resized_crop={"scale": (0.25, 0.8), "ratio": (0.5, 2.0)})
    area = height * width
    crops = [sample_view_params(3, f"k{i}", 0, height, width, cfg).crop for i in range(300)]
    for top, left, crop_height, crop_width in crops:
        assert 0 <= top and top + crop_height <= height and 0 <= left and left + crop_width <= width
        # sides are rounded from exact values: each is within 0.5 of sqrt(area * ratio^(+-1))
        assert 0.25 * area <= (crop_width + 0.5) * (crop_height + 0.5)
        assert (crop_width - 0.5) * (crop_height - 0.5) <= 0.8 * area
        assert (crop_width - 0.5) / (crop_height + 0.5) <= 2.0
        assert (crop_width + 0.5) / (crop_height - 0.5) >= 0.5
    fractions = [h * w / area for _, _, h, w in crops]
    assert min(fractions) < 0.3 and max(fractions) > 0.7  # the whole range is used
    assert len(set(crops)) > 290


@pytest.mark.parametrize(
    "height,width,expected",
    [
        (1, 1000, (0, 499, 1, 1)),  # ratio clamped to 4/3 of a 1-pixel height: rounds to 1
        (1000, 1, (499, 0, 1, 1)),
        (1, 1, (0, 0, 1, 1)),
        (10, 1000, (0, 493, 10, 13)),  # width round(10 * 4/3) = 13, centred
        (1000, 10, (493, 0, 13, 10)),  # height round(10 / (3/4)) = 13
    ],
)
def test_extreme_aspect_ratios_fall_back_to_a_clamped_centre_crop(height, width, expected):
    views = sample_views(0, "extreme", height, width, make_cfg(num_views=20))
    assert {v.crop for v in views} == {expected}


def test_fallback_keeps_at_least_one_pixel_when_the_ratio_rounds_a_side_to_zero():
    cfg = make_cfg(random_resized_crop={"ratio": (50.0, 100.0)})
    # 10x20 has ratio 2 < 50: full width, height round(20 / 50) = 0 -> 1, centred
    assert sample_view_params(0, "k", 0, 10, 20, cfg).crop == (4, 0, 1, 20)


def test_invalid_image_size_is_rejected():
    with pytest.raises(ValueError, match="at least 1x1"):
        sample_view_params(0, "k", 0, 0, 10, ALL_STAGES)


def _observed_magnitudes(cfg: AugmentationConfig, keys: int = 400) -> dict[str, set[float]]:
    seen: dict[str, set[float]] = defaultdict(set)
    for i in range(keys):
        for op, magnitude in sample_view_params(0, f"k{i}", 0, 300, 300, cfg).rand_augment:
            seen[RAND_AUGMENT_OPS[op]].add(magnitude)
    return seen


MAGNITUDES_AT_9_OF_31 = {
    "Identity": 0.0,
    "ShearX": 0.09,
    "ShearY": 0.09,
    "TranslateX": 150 / 331 * 224 * 9 / 30,  # 30.45 view pixels
    "TranslateY": 150 / 331 * 224 * 9 / 30,
    "Rotate": 9.0,
    "Brightness": 0.27,
    "Color": 0.27,
    "Contrast": 0.27,
    "Sharpness": 0.27,
    "Posterize": 7.0,
    "Solarize": 255 * (1 - 9 / 30),  # 178.5
    "AutoContrast": 0.0,
    "Equalize": 0.0,
}
SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}


def test_rand_augment_magnitudes_come_from_torchvisions_table():
    seen = _observed_magnitudes(make_cfg())  # defaults: 2 ops, magnitude 9 of 31 bins, view 224
    assert set(seen) == set(RAND_AUGMENT_OPS)
    for name, expected in MAGNITUDES_AT_9_OF_31.items():
        if name in SIGNED:
            assert sorted(seen[name]) == pytest.approx([-expected, expected], rel=1e-6), name
        else:
            assert sorted(seen[name]) == pytest.approx([expected], rel=1e-6), name
        # stored as float32: exactly representable, so the Arrow column gives the same value back
        assert all(float(np.float32(m)) == m for m in seen[name])


def test_signed_magnitudes_are_negated_half_the_time():
    cfg = make_cfg()
    signs = [
        magnitude < 0
        for i in range(1000)
        for op, magnitude in sample_view_params(0, f"k{i}", 0, 300, 300, cfg).rand_augment
        if RAND_AUGMENT_OPS[op] in SIGNED
    ]
    assert len(signs) > 1000
    assert 0.46 < sum(signs) / len(signs) < 0.54


def test_rand_augment_magnitudes_at_the_last_bin_and_other_view_size():
    seen = _observed_magnitudes(make_cfg(random_resized_crop={"size": 331}, rand_augment={"magnitude": 30}))
    assert seen["Posterize"] == {4.0}
    assert seen["Solarize"] == {0.0}
    assert sorted(seen["Rotate"]) == [-30.0, 30.0]
    assert sorted(seen["TranslateX"]) == pytest.approx([-150.0, 150.0])


def test_magnitude_zero_is_never_negative_zero():
    seen = _observed_magnitudes(make_cfg(rand_augment={"magnitude": 0}), keys=100)
    assert all(math.copysign(1.0, m) == 1.0 for values in seen.values() for m in values)
    assert seen["Posterize"] == {8.0} and seen["Solarize"] == {255.0}


def test_rand_augment_probability_and_op_count():
    never = sample_views(0, "k", 100, 100, make_cfg(num_views=50, rand_augment={"p": 0.0}))
    assert all(v.rand_augment is None for v in never)
    always = sample_views(0, "k", 100, 100, make_cfg(num_views=50, rand_augment={"num_ops": 3}))
    assert all(len(v.rand_augment) == 3 for v in always)
    half = [sample_view_params(0, f"k{i}", 0, 100, 100, ALL_STAGES).rand_augment for i in range(1000)]
    assert 0.45 < sum(r is not None for r in half) / 1000 < 0.55


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_flip_frequency_follows_p(p):
    cfg = make_cfg(horizontal_flip={"p": p})
    flips = [sample_view_params(0, f"k{i}", 0, 100, 100, cfg).flip for i in range(2000)]
    assert abs(sum(flips) / len(flips) - p) < 0.035


def test_erase_boxes_lie_in_the_view_and_respect_scale_and_ratio():
    cfg = make_cfg(random_resized_crop={"size": 224}, random_erasing={"p": 1.0})
    boxes = [sample_view_params(0, f"k{i}", 0, 300, 300, cfg).erase for i in range(300)]
    area = 224 * 224
    for top, left, height, width in boxes:
        assert 0 <= top and top + height <= 224 and 0 <= left and left + width <= 224
        assert height < 224 and width < 224
        assert 0.02 * area <= (height + 0.5) * (width + 0.5) and (height - 0.5) * (width - 0.5) <= 0.33 * area
        assert (height - 0.5) / (width + 0.5) <= 3.3 and (height + 0.5) / (width - 0.5) >= 0.3
    assert all(v.erase is None for v in sample_views(0, "k", 300, 300, make_cfg(num_views=30)))


def test_erasing_gives_up_when_no_box_fits():
    # a square of > 99.6% of the view area rounds to the full side: it never fits strictly inside
    cfg = make_cfg(random_erasing={"p": 1.0, "scale": (0.996, 1.0), "ratio": (1.0, 1.0)})
    assert all(v.erase is None for v in sample_views(0, "k", 300, 300, cfg))


def test_center_view_is_the_largest_centred_square():
    assert center_view_params(480, 640) == ViewParams(crop=(0, 80, 480, 480), flip=False, rand_augment=None, erase=None)
    assert center_view_params(641, 480).crop == (80, 0, 480, 480)
    assert center_view_params(1, 1).crop == (0, 0, 1, 1)


# --- records -------------------------------------------------------------------

AUG_STRUCT = pa.struct(
    [
        pa.field("crop", pa.list_(pa.int32(), 4), nullable=False),
        pa.field("flip", pa.bool_(), nullable=False),
        pa.field(
            "rand_augment",
            pa.list_(
                pa.struct(
                    [pa.field("op", pa.int8(), nullable=False), pa.field("magnitude", pa.float32(), nullable=False)]
                )
            ),
            nullable=True,
        ),
        pa.field("erase", pa.list_(pa.int32(), 4), nullable=True),
    ]
)


def test_to_record_layout():
    params = ViewParams(crop=(1, 2, 30, 40), flip=True, rand_augment=((5, -9.0), (0, 0.0)), erase=(3, 4, 5, 6))
    assert params.to_record() == {
        "crop": [1, 2, 30, 40],
        "flip": True,
        "rand_augment": [{"op": 5, "magnitude": -9.0}, {"op": 0, "magnitude": 0.0}],
        "erase": [3, 4, 5, 6],
    }
    skipped = ViewParams(crop=(1, 2, 30, 40), flip=False, rand_augment=None, erase=None)
    assert skipped.to_record() == {"crop": [1, 2, 30, 40], "flip": False, "rand_augment": None, "erase": None}


def test_records_round_trip_through_json_and_an_arrow_table():
    samples = [sample_views(0, f"k{i}", 200 + i, 300, ALL_STAGES) for i in range(20)]
    flat = [v for views in samples for v in views]
    # every optional part occurs both ways, so both branches are exercised
    assert {v.flip for v in flat} == {True, False}
    assert any(v.rand_augment is None for v in flat) and any(v.rand_augment for v in flat)
    assert any(v.erase is None for v in flat) and any(v.erase for v in flat)

    assert [ViewParams.from_record(json.loads(json.dumps(v.to_record()))) for v in flat] == flat

    records = [[v.to_record() for v in views] for views in samples]
    table = pa.table({"aug": pa.array(records, type=pa.list_(AUG_STRUCT))})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    read_back = pa.ipc.open_file(sink.getvalue()).read_all()
    replayed = [[ViewParams.from_record(r) for r in row] for row in read_back.column("aug").to_pylist()]
    assert replayed == samples


def test_from_record_rejects_malformed_records():
    good = ViewParams(crop=(0, 0, 10, 10), flip=False, rand_augment=((1, 0.09),), erase=None).to_record()
    with pytest.raises(ValueError, match="box"):
        ViewParams.from_record({**good, "crop": [0, 0, 10]})
    with pytest.raises(ValueError, match="height, width >= 1"):
        ViewParams.from_record({**good, "crop": [0, 0, 0, 10]})
    with pytest.raises(ValueError, match="op index 14"):
        ViewParams.from_record({**good, "rand_augment": [{"op": 14, "magnitude": 0.0}]})


def test_to_datacompdr_layout():
    params = ViewParams(crop=(1, 2, 30, 40), flip=False, rand_augment=((11, 178.5), (5, -9.0)), erase=None)
    assert params.to_datacompdr() == [[1, 2, 30, 40], [[11, 178.5], [5, -9.0]]]
    assert json.dumps(params.to_datacompdr()) == "[[1, 2, 30, 40], [[11, 178.5], [5, -9.0]]]"
    skipped = ViewParams(crop=(1, 2, 30, 40), flip=False, rand_augment=None, erase=None)
    assert skipped.to_datacompdr() == [[1, 2, 30, 40], None]


# --- rendering ------------------------------------------------------------------

IMAGE = make_image()
CROP = (10, 20, 90, 120)
OP_MAGNITUDES = {
    "Identity": 0.0,
    "ShearX": 0.09,
    "ShearY": -0.09,
    "TranslateX": -8.7,
    "TranslateY": 8.7,
    "Rotate": -9.0,
    "Brightness": 0.27,
    "Color": -0.27,
    "Contrast": 0.27,
    "Sharpness": -0.27,
    "Posterize": 5.0,
    "Solarize": 178.5,
    "AutoContrast": 0.0,
    "Equalize": 0.0,
}


def _torchvision_op(view, name: str, magnitude: float, interpolation: InterpolationMode, ops=F):
    """The op as torchvision's RandAugment defines it, called directly: `ops` is the functional
    module (v1 on PIL images, the reference; v2 on tensors)."""
    shear_angle = math.degrees(math.atan(magnitude))
    calls = {
        "Identity": lambda: view,
        "ShearX": lambda: ops.affine(view, 0.0, [0, 0], 1.0, [shear_angle, 0.0], interpolation, center=[0, 0]),
        "ShearY": lambda: ops.affine(view, 0.0, [0, 0], 1.0, [0.0, shear_angle], interpolation, center=[0, 0]),
        "TranslateX": lambda: ops.affine(view, 0.0, [int(magnitude), 0], 1.0, [0.0, 0.0], interpolation),
        "TranslateY": lambda: ops.affine(view, 0.0, [0, int(magnitude)], 1.0, [0.0, 0.0], interpolation),
        "Rotate": lambda: ops.rotate(view, magnitude, interpolation),
        "Brightness": lambda: ops.adjust_brightness(view, 1 + magnitude),
        "Color": lambda: ops.adjust_saturation(view, 1 + magnitude),
        "Contrast": lambda: ops.adjust_contrast(view, 1 + magnitude),
        "Sharpness": lambda: ops.adjust_sharpness(view, 1 + magnitude),
        "Posterize": lambda: ops.posterize(view, int(magnitude)),
        "Solarize": lambda: ops.solarize(view, magnitude),
        "AutoContrast": lambda: ops.autocontrast(view),
        "Equalize": lambda: ops.equalize(view),
    }
    return calls[name]()


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
@pytest.mark.parametrize("name", RAND_AUGMENT_OPS)
def test_each_op_renders_as_torchvision_does(name, interpolation):
    """The CPU renderer is torchvision's PIL path; the accelerator renderer its tensor path."""
    cfg = make_cfg(random_resized_crop={"size": VIEW}, rand_augment={"interpolation": interpolation})
    op = (RAND_AUGMENT_OPS.index(name), OP_MAGNITUDES[name])
    params = ViewParams(crop=CROP, flip=True, rand_augment=(op,), erase=None)
    mode = InterpolationMode(interpolation)
    picture = pil_ops.resized_crop(to_picture(IMAGE), *CROP, [VIEW, VIEW], interpolation=InterpolationMode.BICUBIC)
    expected = pil_ops.pil_to_tensor(_torchvision_op(pil_ops.hflip(picture), name, OP_MAGNITUDES[name], mode, pil_ops))
    rendered = render_view(IMAGE, params, VIEW, cfg)
    assert rendered.dtype == torch.uint8 and rendered.shape == (3, VIEW, VIEW)
    assert torch.equal(rendered, expected)
    if name != "Identity":
        assert not torch.equal(rendered, pil_ops.pil_to_tensor(pil_ops.hflip(picture)))
    view = F.resized_crop(IMAGE, *CROP, [VIEW, VIEW], interpolation=InterpolationMode.BICUBIC, antialias=True)
    tensor_expected = _torchvision_op(F.hflip(view), name, OP_MAGNITUDES[name], mode)
    assert torch.equal(render_views_tensor(IMAGE, [params], VIEW, cfg)[0], tensor_expected)


def test_ops_do_what_their_names_say():
    cfg = make_cfg(random_resized_crop={"size": VIEW})
    base = render_view(IMAGE, ViewParams(CROP, False, None, None), VIEW, cfg)

    def one(name: str, magnitude: float) -> torch.Tensor:
        op = (RAND_AUGMENT_OPS.index(name), magnitude)
        return render_view(IMAGE, ViewParams(CROP, False, (op,), None), VIEW, cfg)

    shifted = one("TranslateX", 8.7)  # truncated to 8 pixels to the right, zeros come in
    assert torch.equal(shifted[:, :, 8:], base[:, :, :-8]) and not shifted[:, :, :8].any()
    shifted_up = one("TranslateY", -8.7)
    assert torch.equal(shifted_up[:, :-8], base[:, 8:]) and not shifted_up[:, -8:].any()
    assert torch.equal(one("Posterize", 5.0), base & 0b11111000)
    assert torch.equal(one("Solarize", 178.5), torch.where(base >= 179, 255 - base, base))
    assert torch.equal(one("Rotate", 0.0), base)
    assert torch.equal(one("Brightness", 0.0), base)
    flipped = render_view(IMAGE, ViewParams(CROP, True, None, None), VIEW, cfg)
    assert torch.equal(flipped, base.flip(-1))


def test_crop_and_resize_use_the_configured_interpolation():
    for interpolation in ("bicubic", "bilinear", "nearest"):
        cfg = make_cfg(random_resized_crop={"size": VIEW, "interpolation": interpolation})
        mode = InterpolationMode(interpolation)
        expected = pil_ops.pil_to_tensor(pil_ops.resized_crop(to_picture(IMAGE), *CROP, [VIEW, VIEW], interpolation=mode))
        assert torch.equal(render_view(IMAGE, ViewParams(CROP, False, None, None), VIEW, cfg), expected)


def test_replay_is_pixel_identical():
    params = sample_views(0, "replay", *IMAGE.shape[1:], ALL_STAGES)
    first = render_views(IMAGE, params, VIEW, ALL_STAGES)
    assert first.shape == (len(params), 3, VIEW, VIEW) and first.dtype == torch.uint8
    replayed_from_records = [ViewParams.from_record(json.loads(json.dumps(p.to_record()))) for p in params]
    assert torch.equal(render_views(IMAGE, replayed_from_records, VIEW, ALL_STAGES), first)
    assert torch.equal(torch.stack([render_view(IMAGE, p, VIEW, ALL_STAGES) for p in params]), first)
    assert len({view.numpy().tobytes() for view in first}) == len(params)


@pytest.mark.parametrize("size", [VIEW, 40])
def test_picture_views_are_render_views_channels_last_written_into_the_buffer(size):
    params = sample_views(0, "picture", *IMAGE.shape[1:], ALL_STAGES)
    assert any(p.erase for p in params) and any(p.flip for p in params) and any(p.rand_augment for p in params)
    expected = render_views(IMAGE, params, size, ALL_STAGES).permute(0, 2, 3, 1).numpy()
    picture = to_picture(IMAGE)
    buffer = np.full((len(params), size, size, 3), 7, dtype=np.uint8)
    for target, view_params in zip(buffer, params):
        assert render_picture_view(picture, view_params, size, ALL_STAGES, out=target) is target
    np.testing.assert_array_equal(buffer, expected)
    np.testing.assert_array_equal(render_picture_view(picture, params[0], size, ALL_STAGES), expected[0])


def test_picture_views_need_an_rgb_picture():
    with pytest.raises(ValueError, match="RGB picture, got mode L"):
        render_picture_view(to_picture(IMAGE).convert("L"), ViewParams(CROP, False, None, None), VIEW, ALL_STAGES)


def test_erase_sets_the_box_to_zero_and_nothing_else():
    cfg = make_cfg(random_resized_crop={"size": VIEW})
    clean = render_view(IMAGE, ViewParams(CROP, True, ((5, 9.0),), None), VIEW, cfg)
    erased = render_view(IMAGE, ViewParams(CROP, True, ((5, 9.0),), (5, 7, 20, 30)), VIEW, cfg)
    assert not erased[:, 5:25, 7:37].any()
    outside = torch.ones(VIEW, VIEW, dtype=torch.bool)
    outside[5:25, 7:37] = False
    assert torch.equal(erased[:, outside], clean[:, outside])


def test_rendering_at_another_size_scales_pixel_parameters():
    cfg = make_cfg(random_resized_crop={"size": VIEW})
    params = ViewParams(CROP, False, ((3, 8.7),), (4, 6, 10, 12))
    doubled = render_view(IMAGE, params, 2 * VIEW, cfg)
    assert doubled.shape == (3, 2 * VIEW, 2 * VIEW)
    assert not doubled[:, 8:28, 12:36].any()
    assert not doubled[:, :, :17].any()  # translation int(8.7 * 2) = 17 pixels at twice the size
    assert doubled[:, 40:, 40:].any()


def test_rendering_never_modifies_the_input_image():
    image = make_image(VIEW, VIEW)
    original = image.clone()
    cfg = make_cfg(random_resized_crop={"size": VIEW})
    view = render_view(image, ViewParams((0, 0, VIEW, VIEW), False, None, (0, 0, 10, 10)), VIEW, cfg)
    assert torch.equal(image, original)
    assert not view[:, :10, :10].any() and torch.equal(view[:, 10:], image[:, 10:])


def test_grayscale_and_odd_sized_images_render():
    gray = F.rgb_to_grayscale(make_image(37, 53), num_output_channels=3)
    cfg = make_cfg(
        num_views=12,
        random_resized_crop={"size": VIEW},
        horizontal_flip={"p": 0.5},
        rand_augment={"num_ops": 3},
        random_erasing={"p": 0.5},
    )
    params = sample_views(5, "gray", 37, 53, cfg)
    views = render_views(gray, params, VIEW, cfg)
    assert views.shape == (12, 3, VIEW, VIEW) and views.dtype == torch.uint8
    # every op treats channels alike, so a grey image stays grey
    assert torch.equal(views[:, 0], views[:, 1]) and torch.equal(views[:, 1], views[:, 2])
    # a single-channel decode is rendered as its RGB broadcast
    assert torch.equal(render_views(gray[:1], params, VIEW, cfg), views)


def test_render_rejects_bad_images_and_crops_that_do_not_fit():
    cfg = make_cfg(random_resized_crop={"size": VIEW})
    with pytest.raises(ValueError, match="does not fit"):
        render_view(IMAGE, ViewParams((100, 0, 30, 30), False, None, None), VIEW, cfg)
    with pytest.raises(ValueError, match="uint8"):
        render_view(IMAGE.float(), ViewParams(CROP, False, None, None), VIEW, cfg)
    with pytest.raises(ValueError, match="uint8"):
        render_view(torch.zeros(4, 10, 10, dtype=torch.uint8), ViewParams((0, 0, 5, 5), False, None, None), VIEW, cfg)
