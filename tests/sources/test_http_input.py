"""http(s) input and datasets served over http, against a real HTTP server on loopback
(python's http.server, which answers whole files: no Range requests, as many static hosts)."""

import functools
import http.server
import json
import threading
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dr_pipeline.cli import app
from dr_pipeline.core.config import InputConfig
from dr_pipeline.sources.listing import list_shards
from dr_pipeline.tools.sample_data import write_sample_data

pytestmark = pytest.mark.usefixtures("local_ray")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(root folder, base URL) of an HTTP server on 127.0.0.1, a free port, serving root."""
    root = tmp_path_factory.mktemp("served")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    write_sample_data(str(root / "shards"), num_shards=3)
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=30)


def _cli(args):
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.stdout, result.stderr


def _job_file(tmp_path, small_job_dict, output) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(small_job_dict("unused", str(output))))
    return str(path)


def test_aiohttp_is_a_main_dependency():
    """fsspec's HTTP filesystem needs aiohttp: a fresh install must bring it (not an extra)."""
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    assert any(dependency.split(">")[0].split("=")[0].strip() == "aiohttp" for dependency in project["dependencies"])


def test_plan_of_shards_served_over_http_equals_the_local_plan(served, small_job_dict, tmp_path):
    root, base = served
    job = _job_file(tmp_path, small_job_dict, tmp_path / "out")
    estimates = []
    for shards in (f"{base}/shards/{{00000..00002}}.tar", f"{root}/shards/{{00000..00002}}.tar"):
        code, out, err = _cli(["plan", job, "--input", shards, "--json"])
        assert code == 0, err
        estimate = json.loads(out)["input"]
        estimates.append({k: v for k, v in estimate.items() if not k.endswith("_seconds")})
    assert estimates[0] == estimates[1] and estimates[0]["shards"] == 3 and estimates[0]["samples"] > 0


def test_run_reads_http_shards_and_the_dataset_is_inspected_and_validated_over_http(served, small_job_dict, tmp_path):
    root, base = served
    job = _job_file(tmp_path, small_job_dict, root / "out")
    code, out, err = _cli(["run", job, "--input", f"{base}/shards/{{00000..00002}}.tar"])
    assert code == 0, err
    assert "18 samples, 2 failures" in " ".join(out.split())
    plan = json.loads((root / "out" / "plan.json").read_text())
    assert [unit["input"] for unit in plan["units"]] == [f"{base}/shards/{i:05d}.tar" for i in range(3)]
    code, out, err = _cli(["inspect", f"{base}/out"])
    assert code == 0, err
    assert "18" in out and "tiny_vit_32" in out
    code, out, err = _cli(["validate", f"{base}/out"])
    assert code == 0, out + err


def test_an_http_folder_listing_is_listed_like_the_local_folder(served):
    """A web server's index page of a folder stands for its shards, as the folder itself does."""
    root, base = served
    local = list_shards(InputConfig(urls=f"{root}/shards"))
    expected = [shard.replace(str(root), base) for shard in local]
    assert len(local) == 3
    for folder in (f"{base}/shards/", f"{base}/shards"):
        assert list_shards(InputConfig(urls=folder)) == expected, folder
