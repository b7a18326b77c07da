"""Job configs: the shipped jobs validate, bad ones fail with one line naming the problem."""

from pathlib import Path

import pytest
import yaml

from dr_pipeline.core.config import load_job, parse_job
from dr_pipeline.core.errors import ConfigError

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def _minimal(**overrides):
    data = {
        "input": {"urls": "data/{00000..00001}.tar"},
        "output": {"url": "out/x"},
        "teachers": [{"id": "t1", "spec": "open_clip:dr-tiny-vit-32"}],
    }
    data.update(overrides)
    return data


@pytest.mark.parametrize("name", ["quickstart", "quickstart-flips", "datacompdr-12m", "datacompdr-1b", "dfndr"])
def test_shipped_jobs_validate(name):
    job = load_job(JOBS / f"{name}.yaml")
    assert job.teachers and job.output.embedding_dtype == "float16"


def test_published_recipes_are_encoded():
    dr12m = load_job(JOBS / "datacompdr-12m.yaml")
    assert dr12m.augmentation.num_views == 30
    assert [t.spec for t in dr12m.teachers] == [
        "open_clip:ViT-L-14/openai",
        "open_clip:ViT-L-14/datacomp_xl_s13b_b90k",
    ]
    rrc, ra = dr12m.augmentation.random_resized_crop, dr12m.augmentation.rand_augment
    assert (rrc.size, rrc.interpolation, ra.num_ops, ra.magnitude, ra.p) == (224, "bicubic", 2, 9, 1.0)
    (coca,) = dr12m.captioners
    assert coca.num_captions == 5 and coca.sampler.top_p == 0.9
    assert load_job(JOBS / "datacompdr-1b.yaml").augmentation.num_views == 10
    dfndr = load_job(JOBS / "dfndr.yaml")
    assert [t.spec for t in dfndr.teachers] == [
        "open_clip:hf-hub:apple/DFN2B-CLIP-ViT-L-14",
        "open_clip:hf-hub:apple/DFN2B-CLIP-ViT-L-14-39B",
    ]
    assert [c.spec for c in dfndr.captioners] == [
        f"open_clip:coca_ViT-L-14@hf-hub:apple/mobileclip2_coca_dfn2b_s13b_{name}"
        for name in ("mscoco38k_s12m_context77", "gbc1m-short_context77", "docci_s12m_context77")
    ]


def test_overrides_replace_input_and_output():
    job = load_job(JOBS / "quickstart.yaml", input_urls="memory://in/*.tar", output_url="memory://out")
    assert job.input.url_list == ["memory://in/*.tar"]
    assert job.output.url == "memory://out"


@pytest.mark.parametrize(
    "data, expected",
    [
        (_minimal(colour="red"), "colour: unknown key"),
        (_minimal(augmentation={"num_views": 0}), "augmentation.num_views: Input should be greater than or equal to 1"),
        (_minimal(augmentation={"rand_augment": {"magnitude": 31}}), "magnitude 31 must be below num_magnitude_bins 31"),
        (_minimal(teachers=[]), "teachers: List should have at least 1 item"),
        (_minimal(teachers=[{"id": "Bad Id", "spec": "open_clip:x"}]), "teachers.0.id: String should match pattern"),
        (
            _minimal(captioners=[{"id": "t1", "spec": "open_clip:dr-tiny-coca"}]),
            "teacher and captioner ids must be unique, repeated: t1",
        ),
        (
            _minimal(captioners=[{"id": "c", "spec": "open_clip:dr-tiny-coca", "num_captions": 65}]),
            "captioners.0.num_captions: Input should be less than or equal to 64",
        ),
        (_minimal(output={"url": "o", "embedding_dtype": "int4"}), "output.embedding_dtype: Input should be"),
        ({"output": {"url": "o"}, "teachers": [{"id": "a", "spec": "open_clip:x"}]}, "input: required key missing"),
    ],
)
def test_bad_config_is_one_line_naming_the_problem(data, expected):
    with pytest.raises(ConfigError) as info:
        parse_job(data, "job.yaml")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("job.yaml: ")
    assert expected in message


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read job file"):
        load_job(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("teachers: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_job(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_job(scalar)


def test_output_hash_ignores_resources_and_secrets_but_not_content():
    base = parse_job(_minimal())
    resized = parse_job(_minimal(resources={"actors": 8, "batch_size": 3}))
    secret = parse_job(_minimal(input={"urls": "data/{00000..00001}.tar", "storage_options": {"key": "s3cr3t"}}))
    reseeded = parse_job(_minimal(seed=1))
    assert base.output_hash() == resized.output_hash() == secret.output_hash()
    assert base.output_hash() != reseeded.output_hash()
    assert "s3cr3t" not in yaml.safe_dump(secret.public_dump())


def test_actors_is_a_number_or_a_min_max_range():
    assert parse_job(_minimal()).resources.actor_range.model_dump() == {"min": 1, "max": 1}
    assert parse_job(_minimal(resources={"actors": 8})).resources.actor_range.model_dump() == {"min": 8, "max": 8}
    elastic = parse_job(_minimal(resources={"actors": {"min": 2, "max": 16}}))
    assert elastic.resources.actor_range.model_dump() == {"min": 2, "max": 16}
    assert elastic.output_hash() == parse_job(_minimal()).output_hash()
    for bad in (0, True, "8", {"min": 3, "max": 2}, {"min": 0, "max": 2}, {"min": 2}, {"min": 1.5, "max": 2}):
        with pytest.raises(ConfigError, match=r"^config: resources.actors: .*\{min: M, max: N\}") as error:
            parse_job(_minimal(resources={"actors": bad}))
        assert "\n" not in str(error.value)
