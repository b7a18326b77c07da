"""A newcomer's first commands, as real processes with their output in pipes: the quickstart run
prints only dr-gen's own lines (library messages go to the log file it names once), no ANSI
codes, and its driver imports no torch nor any model library (the actors and unit tasks do);
`inspect` and `validate` never import torch, Ray or transformers; the quickstart's output
exports with the README's own command."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
QUICKSTART = REPOSITORY / "jobs" / "quickstart.yaml"
# every line a run may print: progress (pipe mode), this run, the whole dataset, the log's path
OUR_LINES = [
    re.compile(r"^quickstart: \d+/\d+ units, \d+ samples, [\d.]+ samples/s, \d+ failures, ETA \S+"
               r"(, \d+ model actors?)?$"),
    re.compile(r"^this run: \d+ units written, \d+ already committed, \d+ samples, \d+ failures in [\d.]+s "
               r"\([\d.]+s starting models\)$"),
    re.compile(r"^dataset \S+: \d+/\d+ units, \d+ input samples, \d+ samples, \d+ failures( \(.*\))?, complete$"),
    re.compile(r"^log: \S+\.log$"),
]


def _imported(stderr):
    """The modules a process run with `-X importtime` imported, and its stderr without those lines."""
    lines = stderr.splitlines(keepends=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}
    return imported, "".join(line for line in lines if not line.startswith("import time:"))


def _cli(args, tmp_path, *extra):
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "DR_GEN_LOG_DIR": str(tmp_path / "logs"),
           "RAY_USAGE_STATS_ENABLED": "0", "TERM": "xterm-256color"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, *extra, "-m", "dr_pipeline.cli", *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)


@pytest.fixture(scope="module")
def quickstart_run(sample_shards, tmp_path_factory):
    """`dr-gen run jobs/quickstart.yaml` on the sample shards, stdout and stderr piped; with the
    modules its driver imported (`-X importtime`, whose lines are taken out of stderr)."""
    root = tmp_path_factory.mktemp("newcomer")
    run = _cli(["run", str(QUICKSTART), "--input", str(Path(sample_shards[0]).parent / "{00000..00002}.tar"),
                "--output", str(root / "out")], root, "-X", "importtime")
    imported, run.stderr = _imported(run.stderr)
    logs = list((root / "logs").glob("*.log"))  # once torch or Ray could speak, stderr goes to the run's log
    return run, root, imported | set().union(*(_imported(log.read_text(errors="replace"))[0] for log in logs))


def test_quickstart_prints_only_our_lines_and_names_its_log_once(quickstart_run):
    run, root, _ = quickstart_run
    assert run.returncode == 0, run.stderr
    printed = run.stdout.splitlines() + run.stderr.splitlines()
    assert "\x1b" not in run.stdout + run.stderr
    strangers = [line for line in printed if not any(pattern.match(line) for pattern in OUR_LINES)]
    assert strangers == []
    assert any(line.startswith("this run: 3 units written") for line in printed)
    assert any(line.startswith("dataset ") and "20 input samples, 18 samples, 2 failures" in line for line in printed)
    (log_line,) = [line for line in printed if line.startswith("log: ")]
    log = Path(log_line.removeprefix("log: "))
    assert log.parent == root / "logs"
    # what used to reach the screen is in the log: Ray's start-up and the models' messages
    assert "No pretrained weights loaded" in log.read_text(errors="replace")


def test_the_run_driver_imports_no_torch_and_no_model_library(quickstart_run):
    """The spec checks read no model, the unit task and the model actors' class are imported by
    the processes that run them: the driver's start (Ray's, then the actors') waits on none of these."""
    run, _, imported = quickstart_run
    assert run.returncode == 0, run.stderr
    assert {"ray", "dr_pipeline.execution.runner", "dr_pipeline.execution.unit_tasks", "teachers.open_clip_spec"} <= imported
    assert not {"torch", "torchvision", "open_clip", "transformers", "timm", "webdataset"} & imported


def test_a_resume_summarises_the_whole_dataset_beside_this_run(quickstart_run, sample_shards):
    _, root, _ = quickstart_run
    rerun = _cli(["run", str(QUICKSTART), "--input", str(Path(sample_shards[0]).parent / "{00000..00002}.tar"),
                  "--output", str(root / "out")], root)
    assert rerun.returncode == 0, rerun.stderr
    assert "this run: 0 units written, 3 already committed, 0 samples, 0 failures" in rerun.stdout
    assert "3/3 units, 20 input samples, 18 samples, 2 failures (empty_text 1, undecodable_image 1)" in rerun.stdout


@pytest.mark.parametrize("command", ["inspect", "validate"])
def test_inspect_and_validate_never_import_torch_ray_or_transformers(quickstart_run, command):
    _, root, _ = quickstart_run
    done = _cli([command, str(root / "out")], root, "-X", "importtime")
    imported, stderr = _imported(done.stderr)
    assert done.returncode == 0, stderr
    assert imported and not {"torch", "ray", "transformers", "torchvision", "open_clip"} & imported
    assert "intact: 3 units, 18 samples" in done.stdout if command == "validate" else "One sample" in done.stdout


def test_the_quickstart_output_exports_with_the_readme_command(quickstart_run):
    """README: `dr-gen export out/quickstart out/quickstart-datacompdr --format datacompdr`."""
    _, root, _ = quickstart_run
    readme = (REPOSITORY / "README.md").read_text()
    assert "dr-gen export out/quickstart out/quickstart-datacompdr --format datacompdr" in readme
    done = _cli(["export", str(root / "out"), str(root / "exported"), "--format", "datacompdr"], root)
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout + done.stderr
    assert sorted(p.name for p in (root / "exported").glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    config = json.loads((root / "exported" / "config.json").read_text())
    assert config["num_samples"] == 8 and [t["embedding_dim"] for t in config["teachers"]] == [64, 96]


def test_the_flips_job_is_the_quickstart_with_flips_and_erasing():
    from dr_pipeline.core.config import load_job

    plain, flips = load_job(QUICKSTART), load_job(REPOSITORY / "jobs" / "quickstart-flips.yaml")
    assert (plain.augmentation.horizontal_flip.p, plain.augmentation.random_erasing.p) == (0.0, 0.0)
    assert (flips.augmentation.horizontal_flip.p, flips.augmentation.random_erasing.p) == (0.5, 0.25)
    assert plain.augmentation.rand_augment == flips.augmentation.rand_augment
    assert plain.teachers == flips.teachers and plain.captioners == flips.captioners


def test_package_metadata_builds_without_deprecation_warnings(tmp_path):
    """`make setup` (pip install -e .) stays quiet: pyproject.toml's license is an SPDX string."""
    script = "import setuptools.build_meta as b, sys; b.prepare_metadata_for_build_wheel(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          cwd=REPOSITORY, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "deprecat" not in (done.stdout + done.stderr).lower()
    (metadata,) = tmp_path.glob("*.dist-info/METADATA")
    assert "License-Expression: Apache-2.0" in metadata.read_text()


def test_make_setups_editable_install_prints_nothing(tmp_path):
    """`make setup`'s editable install, as the Makefile spells it (its environment and flags), prints
    nothing: setuptools' "Editable installation" notice, which pip shows even with --quiet, is
    filtered. Run on a copy of the project into a fresh virtualenv, without dependencies, with this
    Python's pip (recent enough to show build-backend warnings) aimed at that virtualenv."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPOSITORY / name, project / name)
    for package in ("dr_pipeline", "teachers", "schemas"):
        shutil.copytree(REPOSITORY / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    planned = subprocess.run(["make", "-n", "-s", "setup", f"VENV={venv}"], cwd=REPOSITORY, capture_output=True,
                             text=True, check=True, timeout=60).stdout.splitlines()
    (line,) = [line for line in planned if " -e '.[dev]'" in line]
    words = shlex.split(line)
    assignments = [word for word in words if re.match(r"^[A-Z_]+=", word)]
    command = words[len(assignments):]
    assert command[:3] == [str(venv / "bin" / "python"), "-m", "pip"] and command[-1] == ".[dev]"
    env = {**os.environ, **dict(assignment.split("=", 1) for assignment in assignments)}
    install = [sys.executable, "-m", "pip", "--python", command[0], *command[3:-1], ".", "--no-deps"]
    done = subprocess.run(install, cwd=project, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout + done.stderr == ""


def test_show_draws_with_the_bundled_fonts_and_names_the_characters_they_lack(quickstart_run):
    from dr_pipeline.tools.show import FONT_SIZE, CaptionFonts

    _, root, _ = quickstart_run
    done = _cli(["show", str(root / "out"), "--key", "000000000", "--out", str(root / "grid.png"), "--json"], root)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    text = "".join(c["text"] for c in shown["captions"])
    assert "NotoSansCJK-Regular.ttc" in shown["fonts"]
    assert shown["missing_glyphs"] == CaptionFonts(FONT_SIZE).missing(text)


def test_verify_prints_whole_teacher_ids_at_80_columns(quickstart_run):
    _, root, _ = quickstart_run
    done = subprocess.run([sys.executable, "-m", "dr_pipeline.cli", "verify", str(root / "out"), "--samples", "2"],
                          capture_output=True, text=True, timeout=600, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(REPOSITORY), "COLUMNS": "80",
                               "DR_GEN_LOG_DIR": str(root / "logs")})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("tiny_vit_16_160  ") for line in lines)
    assert any(line.startswith("tiny_vit_32  ") for line in lines) and "…" not in done.stdout
