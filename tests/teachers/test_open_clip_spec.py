"""The `open_clip:` spec checks read open_clip's files instead of importing it: what they read is
what open_clip itself answers, and checking a job's specs imports neither torch nor any model library."""

import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip

import teachers.open_clip_adapter  # noqa: F401  (registers the bundled tiny configs with open_clip)
from teachers import open_clip_spec

REPO_ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torchvision", "open_clip", "transformers", "timm", "ray")


def test_model_names_and_configs_are_open_clips():
    configs = open_clip_spec.model_configs()
    assert list(configs) == open_clip.list_models()
    assert {"dr-tiny-vit-32", "dr-tiny-coca", "ViT-L-14", "coca_ViT-L-14"} <= set(configs)
    assert all(configs[name] == open_clip.get_model_config(name) for name in configs)


def test_pretrained_table_is_open_clips():
    pairs = open_clip_spec.list_pretrained()
    assert pairs == open_clip.list_pretrained() and len(pairs) > 100
    assert ("ViT-B-32-quickgelu", "openai") in pairs  # the variants open_clip derives at import
    for model, tag in pairs:
        assert open_clip_spec.pretrained_cfg(model, tag) == open_clip.get_pretrained_cfg(model, tag)
        assert open_clip_spec.is_pretrained(model, tag.upper().replace("_", "-"))  # open_clip cleans tags
    for model in {model for model, _ in pairs}:
        assert open_clip_spec.pretrained_tags(model) == open_clip.list_pretrained_tags_by_model(model)
    assert not open_clip_spec.is_pretrained("ViT-B-32", "no_such_tag")
    assert open_clip_spec.registry_model_of_hub_id("apple/DFN2B-CLIP-ViT-L-14") == "ViT-L-14"


def test_checking_specs_imports_no_model_library():
    """A job's teacher and captioner specs of every open_clip form, every kind, checked and
    listed in a fresh interpreter: none of torch, open_clip, transformers, timm or Ray is imported."""
    specs = [
        ("open_clip:dr-tiny-vit-32", "teacher"),
        ("open_clip:ViT-L-14/datacomp_xl_s13b_b90k", "teacher"),
        ("open_clip:hf-hub:apple/DFN2B-CLIP-ViT-L-14", "teacher"),
        ("open_clip:coca_ViT-L-14@hf-hub:apple/mobileclip2_coca_dfn2b_s13b_mscoco38k_s12m_context77", "captioner"),
        ("open_clip:dr-tiny-coca", "captioner"),
        ("hf:openai/clip-vit-large-patch14", "teacher"),
        ("st:sentence-transformers/all-MiniLM-L6-v2", "teacher"),
        ("python:json:JSONDecoder", "teacher"),
    ]
    script = (
        "import json, sys\n"
        "from teachers import check_spec, model_cost, teacher_kinds\n"
        f"for spec, role in {specs!r}:\n"
        "    check_spec(spec, role)\n"
        "    model_cost(spec, role)\n"
        "teacher_kinds()\n"
        f"print(json.dumps([name for name in {HEAVY!r} if name in sys.modules]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
