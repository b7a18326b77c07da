"""The `dr-gen` command line. Errors a user can fix are one line on stderr, exit code 2."""

from __future__ import annotations

import json
import sys
from enum import Enum
from typing import Any, Callable, Optional, TypeVar

import fsspec
import typer
from rich.console import Console
from rich.table import Table

from dr_pipeline.errors import ConfigError, DatasetError, DrGenError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Generate and inspect reinforced datasets.")
console = Console()
errors = Console(stderr=True)
T = TypeVar("T")


def _guarded(action: Callable[[], T]) -> T:
    """Run `action`; user-fixable problems become one line and exit code 2."""
    try:
        return action()
    except (ConfigError, DatasetError) as error:
        errors.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except DrGenError as error:
        errors.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _input_override(input_urls: list[str] | None) -> str | list[str] | None:
    """--input given zero, one or several times, as the job's input.urls."""
    if not input_urls:
        return None
    return input_urls[0] if len(input_urls) == 1 else input_urls


@app.command()
def run(
    job_file: str = typer.Argument(..., metavar="JOB.yaml", help="job config"),
    input_urls: Optional[list[str]] = typer.Option(None, "--input", help="input shards (URL, brace pattern or glob); repeatable"),
    output_url: Optional[str] = typer.Option(None, "--output", help="output folder URL"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: RAY_ADDRESS, else local)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an output written with another config"),
    extend: Optional[str] = typer.Option(
        None, "--extend", metavar="OUT",
        help="add JOB's teachers and captioners that the dataset OUT lacks, as sidecar files; nothing is recomputed",
    ),
) -> None:
    """Reinforce a dataset: plan, run teachers and captioners on Ray, write shards and dataset.json."""
    from dr_pipeline.config import load_job
    from dr_pipeline.extend import extend_dataset
    from dr_pipeline.progress import ProgressDisplay
    from dr_pipeline.runner import run_job

    if extend is not None and (output_url is not None or overwrite):
        errors.print("[red]error:[/red] --extend OUT names the output: drop --output and --overwrite", highlight=False)
        raise typer.Exit(2)
    output = extend if extend is not None else output_url
    job = _guarded(lambda: load_job(job_file, input_urls=_input_override(input_urls), output_url=output))
    try:
        with ProgressDisplay(console, job.name) as display:
            if extend is not None:
                summary = _guarded(lambda: extend_dataset(job, address=address, on_progress=display.update))
            else:
                summary = _guarded(lambda: run_job(job, address=address, overwrite=overwrite,
                                                   on_progress=display.update))
    except KeyboardInterrupt:  # before any unit ran (planning, starting Ray)
        errors.print("interrupted; rerun the same command to resume", highlight=False)
        raise typer.Exit(130) from None
    console.print(
        f"{summary.output}: {summary.units_done} units written, {summary.units_skipped} already committed, "
        f"{summary.samples} samples, {summary.failures} failures in {summary.seconds:.1f}s "
        f"({summary.startup_seconds:.1f}s starting models)"
    )
    _report_run_problems(summary)


def _report_run_problems(summary: Any) -> None:
    """After a run: Ctrl-C (exit 130), failed units or an unwritten manifest (exit 1), one line each
    and how to go on; the details are in the Ray logs, not on the terminal."""
    if summary.manifest_error:
        errors.print(summary.manifest_error, highlight=False, soft_wrap=True, markup=False)
    if summary.interrupted:
        committed = summary.units_skipped + summary.units_done
        errors.print(f"interrupted: {committed} of {summary.units_planned} units committed; "
                     "rerun the same command to resume", highlight=False)
        raise typer.Exit(130)
    if summary.units_failed or summary.manifest_error:
        for unit_id, reason in summary.units_failed:
            errors.print(f"unit {unit_id} failed: {reason}", highlight=False, soft_wrap=True, markup=False)
        errors.print("rerun the same command to retry the failed units", highlight=False)
        raise typer.Exit(1)


@app.command()
def plan(
    job_file: str = typer.Argument(..., metavar="JOB.yaml", help="job config"),
    input_urls: Optional[list[str]] = typer.Option(None, "--input", help="input shards (URL, brace pattern or glob); repeatable"),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="GPU type for the GPU-hours: a100, h100 (default), h200, b200, l4, ..."),
    tflops: Optional[float] = typer.Option(None, "--tflops", help="peak TFLOP/s of the GPU, instead of the table's"),
    mfu: Optional[float] = typer.Option(None, "--mfu", help="assumed model FLOPs utilisation of image and text forwards"),
    decode_mfu: Optional[float] = typer.Option(None, "--decode-mfu", help="assumed model FLOPs utilisation of caption decoding"),
    count_shards: Optional[int] = typer.Option(None, "--count-shards", min=1, help="shards whose samples are counted"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Estimate a job before running it: shards, samples, views, forward passes, caption tokens, FLOPs, GPU-hours, bytes."""
    from dr_pipeline.config import load_job
    from dr_pipeline.estimate import plan_job, print_plan

    job = _guarded(lambda: load_job(job_file, input_urls=_input_override(input_urls)))
    given = {"gpu": gpu, "tflops": tflops, "mfu": mfu, "decode_mfu": decode_mfu, "counted_shards": count_shards}
    estimate = _guarded(lambda: plan_job(job, **{name: value for name, value in given.items() if value is not None}))
    if as_json:
        sys.stdout.write(json.dumps(estimate.to_dict(), indent=1) + "\n")
    else:
        print_plan(estimate, console)


@app.command()
def inspect(
    dataset_url: str = typer.Argument(..., metavar="OUT", help="dataset folder URL"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    html_report: Optional[str] = typer.Option(None, "--html", help="also write a self-contained HTML page of plots"),
    report_rows: int = typer.Option(5000, "--report-rows", min=1, help="samples read for the HTML plots"),
) -> None:
    """Summarise a dataset: schema, teachers, captioners, counts, failures, one sample."""
    from dr_pipeline.reader import open_dataset
    from dr_pipeline.summary import dataset_summary, first_sample, print_summary

    def summarise() -> tuple[dict[str, Any], dict[str, Any] | None]:
        dataset = open_dataset(dataset_url)
        if html_report:
            from dr_pipeline.report_html import render_report

            with fsspec.open(html_report, "w", encoding="utf-8") as page:
                page.write(render_report(dataset, report_rows))
        return dataset_summary(dataset), first_sample(dataset)

    summary, sample = _guarded(summarise)
    if as_json:
        sys.stdout.write(json.dumps({**summary, "sample": sample}, indent=1) + "\n")
    else:
        print_summary(summary, sample, console)
    if html_report:
        errors.print(f"wrote {html_report}", highlight=False, soft_wrap=True)


@app.command()
def show(
    dataset_url: str = typer.Argument(..., metavar="OUT", help="dataset folder URL"),
    key: Optional[str] = typer.Option(None, "--key", help="sample key or source key (default: a random sample)"),
    out: str = typer.Option("grid.png", "--out", help="PNG to write"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed of the random pick (without --key)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Draw one sample: the original, its K replayed views, captions, and per teacher each view's cosine with the real caption."""
    from dr_pipeline.reader import open_dataset
    from dr_pipeline.show import show_sample

    shown = _guarded(lambda: show_sample(open_dataset(dataset_url), key, out, seed))
    if as_json:
        sys.stdout.write(json.dumps(shown, indent=1) + "\n")
        return
    console.print(f"{shown['key']} (unit {shown['unit']}) -> {out} ({shown['png_size'][0]} x {shown['png_size'][1]})",
                  highlight=False, soft_wrap=True)
    console.print("cosine of each view's embedding with the real caption's embedding:", highlight=False)
    for teacher, cosines in shown["cosines"].items():
        console.print(f"  {teacher}  " + " ".join(f"{c:.4f}" for c in cosines), highlight=False, soft_wrap=True)


@app.command()
def validate(
    dataset_url: str = typer.Argument(..., metavar="OUT", help="dataset folder URL"),
    workers: int = typer.Option(4, "--workers", min=1, help="units checked at once"),
) -> None:
    """Check every unit against the schema and the manifest; exit 1 with one line per problem."""
    from dr_pipeline.validate import validate_dataset

    report = validate_dataset(dataset_url, workers=workers)
    for problem in report.problems:
        typer.echo(problem)
    if report.problems:
        raise typer.Exit(1)
    typer.echo(f"intact: {report.units} units, {report.rows} samples, {report.files} files checked")


@app.command()
def verify(
    dataset_url: str = typer.Argument(..., metavar="OUT", help="dataset folder URL"),
    samples: int = typer.Option(64, "--samples", min=1, help="random samples to recompute"),
    threshold: float = typer.Option(0.99, "--threshold", help="lowest acceptable cosine"),
    seed: int = typer.Option(0, "--seed", help="seed of the random pick"),
    device: str = typer.Option("cpu", "--device", help="torch device for the teachers, e.g. cuda"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Recompute every teacher's embeddings of the replayed views and captions of N samples; compare cosines."""
    from dr_pipeline.reader import open_dataset
    from dr_pipeline.verify import verify_dataset

    keys, checks = _guarded(lambda: verify_dataset(open_dataset(dataset_url), samples, seed, device))
    failed = [c for c in checks if c.min < threshold]
    if as_json:
        report = {"samples": keys, "threshold": threshold, "passed": not failed,
                  "teachers": [c.to_dict() for c in checks]}
        sys.stdout.write(json.dumps(report, indent=1) + "\n")
    else:
        table = Table("teacher", "min", "mean", "views min / mean", "texts min / mean", "worst sample",
                      title=f"cosine of recomputed and stored embeddings, {len(keys)} samples", title_justify="left")
        for check in checks:
            parts = check.to_dict()
            table.add_row(check.teacher, f"{check.min:.6f}", f"{check.mean:.6f}",
                          *(f"{parts[p]['min']:.6f} / {parts[p]['mean']:.6f}" if parts[p] else "-"
                            for p in ("image", "text")),
                          str(check.worst_key))
        console.print(table)
        for check in checks:
            if check.card_differences:
                console.print(f"note: {check.teacher} rebuilt from its spec differs from its card in "
                              f"{', '.join(check.card_differences)}", highlight=False, soft_wrap=True)
    for check in failed:
        errors.print(f"{check.teacher}: min cosine {check.min:.6f} below {threshold} (sample {check.worst_key})",
                     highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


class ExportFormat(str, Enum):
    datacompdr = "datacompdr"


@app.command()
def export(
    dataset_url: str = typer.Argument(..., metavar="OUT", help="dataset folder URL"),
    dest: str = typer.Argument(..., metavar="DEST", help="folder URL to write the export to"),
    export_format: ExportFormat = typer.Option(..., "--format", help="layout to write"),
    images: bool = typer.Option(
        True, "--images/--no-images",
        help="include the original images (from the dataset, or read again from its input shards)",
    ),
) -> None:
    """Write a dataset in another training layout: datacompdr = Apple's DataCompDR tars + config.json."""
    from dr_pipeline.export import export_datacompdr
    from dr_pipeline.reader import open_dataset

    def write() -> Any:
        return export_datacompdr(
            open_dataset(dataset_url), dest, images=images,
            on_unit=lambda unit_id, so_far: console.print(f"{unit_id}: {so_far.samples} samples so far", highlight=False),
        )

    summary = _guarded(write)
    console.print(f"{summary.dest}: {summary.units} tars, {summary.samples} samples ({export_format.value})")


@app.command()
def teachers() -> None:
    """Known teacher and captioner kinds, with an example spec each."""
    from teachers import teacher_kinds

    for kind in teacher_kinds():
        console.print(f"[bold]{kind['kind']}[/bold]  ({', '.join(kind['roles'])})", highlight=False)
        console.print(f"  example: {kind['example']}", highlight=False, soft_wrap=True, markup=False)
        if kind["captioner_example"]:
            example = kind["captioner_example"]
            console.print(f"  captioner example: {example}", highlight=False, soft_wrap=True, markup=False)
        console.print(f"  {kind['description']}", highlight=False, soft_wrap=True, markup=False)
        options = kind["options"]
        for name, meaning in (options or {}).items():
            console.print(f"  option {name}: {meaning}", highlight=False, soft_wrap=True, markup=False)
        if options is None:
            console.print("  options: any, passed to the class", highlight=False)


@app.command("sample-data")
def sample_data(
    dest: str = typer.Argument("sample_data/quickstart", help="folder URL to write the sample shards to"),
    shards: int = typer.Option(3, "--shards", min=1, help="number of tar shards"),
) -> None:
    """Write the bundled sample image-text shards (real photographs from scikit-image)."""
    from dr_pipeline.sample_data import write_sample_data

    def write() -> list[str]:
        try:
            return write_sample_data(dest, num_shards=shards)
        except ModuleNotFoundError as missing:
            raise ConfigError(f"sample-data needs {missing.name}: pip install 'dr-gen[demo]'") from None

    written = _guarded(write)
    console.print(f"wrote {len(written)} shards to {dest}")


if __name__ == "__main__":
    app()
