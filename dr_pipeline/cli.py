"""The `dr-gen` command line. Errors a user can fix are one line on stderr, exit code 2."""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import fsspec
import typer
from rich.console import Console
from rich.text import Text

from dr_pipeline.core.errors import ConfigError, DatasetError, DrGenError
from dr_pipeline.tools.run_log import library_output_to_log

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Generate and inspect reinforced datasets.")
console = Console()
errors = Console(stderr=True)
T = TypeVar("T")


def _print_error(message: str) -> None:
    """`error: message` on stderr, the message as plain text (brackets in paths and patterns kept)."""
    errors.print(Text.assemble(("error:", "red"), " ", message), highlight=False, soft_wrap=True)


def _guarded(action: Callable[[], T]) -> T:
    """Run `action`; user-fixable problems become one line and exit code 2."""
    try:
        return action()
    except (ConfigError, DatasetError) as error:
        _print_error(str(error))
        raise typer.Exit(2) from None
    except DrGenError as error:
        _print_error(str(error))
        raise typer.Exit(1) from None


STORAGE_OPTIONS_ENV = "DR_GEN_STORAGE_OPTIONS"
_STORAGE_OPTIONS_HELP = (
    "fsspec storage options for every URL the command reads or writes (endpoint, profile, keys): "
    f"JSON, or @FILE holding JSON; default ${STORAGE_OPTIONS_ENV}. Never written to any output or log"
)


def _storage_options(given: str | None) -> dict[str, Any]:
    """--storage-options, else $DR_GEN_STORAGE_OPTIONS: JSON or @file. Errors never repeat the
    text, which holds credentials."""
    text = given if given is not None else os.environ.get(STORAGE_OPTIONS_ENV)
    if not text:
        return {}
    source = "--storage-options" if given is not None else f"${STORAGE_OPTIONS_ENV}"
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as error:
            raise ConfigError(f"{source}: cannot read {text[1:]} ({error.strerror or error})") from None
    try:
        options = json.loads(text)
    except ValueError:
        raise ConfigError(f"{source}: not valid JSON (an object of fsspec storage options)") from None
    if not isinstance(options, dict):
        raise ConfigError(f"{source}: expected a JSON object of fsspec storage options")
    return options


def _quiet(command: str, always_announce: bool = False):
    """Library output of `command` to its log file (dr_pipeline.tools.run_log)."""
    return library_output_to_log(command, [console, errors], errors, always_announce)


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
    storage_options: Optional[str] = typer.Option(None, "--storage-options", metavar="JSON|@FILE", help=_STORAGE_OPTIONS_HELP),
) -> None:
    """Reinforce a dataset: plan, run teachers and captioners on Ray, write shards and dataset.json."""
    from dr_pipeline.core.config import load_job, with_storage_options

    if extend is not None and (output_url is not None or overwrite):
        _print_error("--extend OUT names the output: drop --output and --overwrite")
        raise typer.Exit(2)
    output = extend if extend is not None else output_url
    job = _guarded(lambda: with_storage_options(
        load_job(job_file, input_urls=_input_override(input_urls), output_url=output), _storage_options(storage_options)))
    with _quiet(job.name, always_announce=True):  # the log line comes last
        # torch and Ray are imported only once the job file is known good, their messages into the log;
        # the extension's modules (reader, replay, decode) only for --extend
        from dr_pipeline.execution.progress import ProgressDisplay

        try:
            with ProgressDisplay(console, job.name) as display:
                if extend is not None:
                    from dr_pipeline.execution.extend import extend_dataset

                    summary = _guarded(lambda: extend_dataset(job, address=address, on_progress=display.update))
                else:
                    from dr_pipeline.execution.runner import run_job

                    summary = _guarded(lambda: run_job(job, address=address, overwrite=overwrite,
                                                       on_progress=display.update))
        except KeyboardInterrupt:  # before any unit ran (planning, starting Ray)
            errors.print("interrupted; rerun the same command to resume", highlight=False)
            raise typer.Exit(130) from None
        console.print(
            f"this run: {summary.units_done} units written, {summary.units_skipped} already committed, "
            f"{summary.samples} samples, {summary.failures} failures in {summary.seconds:.1f}s "
            f"({summary.startup_seconds:.1f}s starting models)", markup=False, highlight=False, soft_wrap=True,
        )
        console.print(_dataset_line(summary.output, job.output.storage_options), markup=False, highlight=False,
                      soft_wrap=True)
        _report_run_problems(summary)


def _report_run_problems(summary: Any) -> None:
    """After a run: Ctrl-C (exit 130), failed units or an unwritten manifest (exit 1; exit 2 when every
    failed unit was refused for its input, which a rerun cannot fix), one line each and how to go on;
    the details are in the run's log file, not on the terminal."""
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
        if summary.units_failed and len(summary.units_refused) == len(summary.units_failed) \
                and not summary.manifest_error:  # bad input: a rerun fails the same way
            raise typer.Exit(2)
        errors.print("rerun the same command to retry the failed units"
                     + (" (fix the input of the others first)" if summary.units_refused else ""), highlight=False)
        raise typer.Exit(1)

def _dataset_line(url: str, storage_options: dict[str, Any]) -> str:
    """The whole dataset as its manifest now counts it (every run, every --extend), beside this run's line."""
    from dr_pipeline.core.storage import Location

    try:
        manifest = Location.from_url(url, storage_options).read_json("dataset.json")
        totals = manifest["totals"]
    except Exception as error:  # noqa: BLE001 - the run's own line was printed; say why this one is missing
        return f"dataset {url}: no manifest to summarise ({type(error).__name__})"
    reasons = ", ".join(f"{reason} {count}" for reason, count in totals.get("failures_by_reason", {}).items())
    return (f"dataset {url}: {totals['units_done']}/{totals['units_planned']} units, "
            f"{totals['input_samples']} input samples, {totals['samples']} samples, {totals['failures']} failures"
            + (f" ({reasons})" if reasons else "") + f", {manifest['status']}")


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
    calibrate_samples: Optional[int] = typer.Option(
        None, "--calibrate", metavar="N", min=1,
        help="also run the first N samples through the real pipeline here and scale the measured rate to the input",
    ),
    price_per_hour: Optional[float] = typer.Option(
        None, "--price-per-hour", min=0.0, help="with --calibrate: price of one GPU-hour (actor-hour on a CPU)"),
    storage_options: Optional[str] = typer.Option(None, "--storage-options", metavar="JSON|@FILE", help=_STORAGE_OPTIONS_HELP),
) -> None:
    """Estimate a job before running it: shards, samples, views, forward passes, caption tokens, FLOPs, GPU-hours, bytes."""
    from dr_pipeline.core.config import load_job, with_storage_options
    from dr_pipeline.tools.estimate import plan_job, print_plan

    if price_per_hour is not None and calibrate_samples is None:
        errors.print("[red]error:[/red] --price-per-hour prices a measured rate: add --calibrate N", highlight=False)
        raise typer.Exit(2)
    job = _guarded(lambda: with_storage_options(
        load_job(job_file, input_urls=_input_override(input_urls)), _storage_options(storage_options)))
    given = {"gpu": gpu, "tflops": tflops, "mfu": mfu, "decode_mfu": decode_mfu, "counted_shards": count_shards}
    estimate = _guarded(lambda: plan_job(job, **{name: value for name, value in given.items() if value is not None}))
    calibration = None
    if calibrate_samples is not None:
        from dr_pipeline.tools.calibrate import calibrate, calibration_lines

        calibration = _guarded(lambda: calibrate(job, calibrate_samples, estimate.input.samples, estimate.gpu_hours,
                                                 price_per_hour))
    if as_json:
        report = estimate.to_dict()
        if calibration is not None:
            report["calibration"] = calibration.to_dict()
        sys.stdout.write(json.dumps(report, indent=1) + "\n")
        return
    print_plan(estimate, console)
    for line in calibration_lines(calibration, estimate.gpu["name"]) if calibration is not None else []:
        console.print(line, highlight=False, soft_wrap=True)


@app.command()
def inspect(
    dataset_url: str = typer.Argument(..., metavar="OUT", help="dataset folder URL"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    html_report: Optional[str] = typer.Option(None, "--html", help="also write a self-contained HTML page of plots"),
    report_rows: int = typer.Option(5000, "--report-rows", min=1, help="samples read for the HTML plots"),
    storage_options: Optional[str] = typer.Option(None, "--storage-options", metavar="JSON|@FILE", help=_STORAGE_OPTIONS_HELP),
) -> None:
    """Summarise a dataset: schema, teachers, captioners, counts, failures, one sample."""
    from dr_pipeline.read.reader import open_dataset
    from dr_pipeline.tools.summary import dataset_summary, first_sample, print_summary

    def summarise() -> tuple[dict[str, Any], dict[str, Any] | None]:
        dataset = open_dataset(dataset_url, _storage_options(storage_options))
        if html_report:
            from dr_pipeline.tools.report_html import render_report

            with fsspec.open(html_report, "w", encoding="utf-8") as page:
                page.write(render_report(dataset, report_rows))
        return dataset_summary(dataset), first_sample(dataset)

    summary, sample = _guarded(summarise)
    if as_json:
        sys.stdout.write(json.dumps({**summary, "sample": sample}, indent=1) + "\n")
    else:
        print_summary(summary, sample, console)
    if html_report:
        errors.print(f"wrote {html_report}", markup=False, highlight=False, soft_wrap=True)


@app.command()
def show(
    dataset_url: str = typer.Argument(..., metavar="OUT", help="dataset folder URL"),
    key: Optional[str] = typer.Option(None, "--key", help="sample key or source key (default: a random sample)"),
    out: str = typer.Option("grid.png", "--out", help="PNG to write"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed of the random pick (without --key)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    storage_options: Optional[str] = typer.Option(None, "--storage-options", metavar="JSON|@FILE", help=_STORAGE_OPTIONS_HELP),
) -> None:
    """Draw one sample: the original, its K replayed views, captions, and per teacher each view's cosine with the real caption."""
    from dr_pipeline.read.reader import open_dataset
    from dr_pipeline.tools.show import show_sample

    with _quiet("show"):
        shown = _guarded(
            lambda: show_sample(open_dataset(dataset_url, _storage_options(storage_options)), key, out, seed))
    if as_json:
        sys.stdout.write(json.dumps(shown, indent=1) + "\n")
        return
    console.print(f"{shown['key']} (unit {shown['unit']}) -> {out} ({shown['png_size'][0]} x {shown['png_size'][1]})",
                  markup=False, highlight=False, soft_wrap=True)
    if shown["missing_glyphs"]:
        errors.print(f"note: {len(shown['missing_glyphs'])} characters of the captions have no glyph in the "
                     f"bundled fonts and show as boxes ({''.join(shown['missing_glyphs'][:20])}); set "
                     f"DR_GEN_FONT to a font that has them", markup=False, highlight=False, soft_wrap=True)
    if shown["also_matching"]:
        others = ", ".join(f"{m['key']} in unit {m['unit']}" for m in shown["also_matching"])
        errors.print(f"note: --key {key} is ambiguous: {1 + len(shown['also_matching'])} samples match; shown: "
                     f"{shown['key']} in unit {shown['unit']}; also: {others}", markup=False, highlight=False,
                     soft_wrap=True)
    console.print("cosine of each view's embedding with the real caption's embedding:", highlight=False)
    for teacher, cosines in shown["cosines"].items():
        console.print(f"  {teacher}  " + " ".join(f"{c:.4f}" for c in cosines), markup=False, highlight=False,
                      soft_wrap=True)


@app.command()
def validate(
    dataset_url: str = typer.Argument(..., metavar="OUT", help="dataset folder URL"),
    workers: int = typer.Option(4, "--workers", min=1, help="units checked at once"),
    storage_options: Optional[str] = typer.Option(None, "--storage-options", metavar="JSON|@FILE", help=_STORAGE_OPTIONS_HELP),
) -> None:
    """Check every unit against the schema and the manifest; exit 1 with one line per problem."""
    from dr_pipeline.tools.validate import validate_dataset

    report = validate_dataset(dataset_url, _guarded(lambda: _storage_options(storage_options)), workers=workers)
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
    storage_options: Optional[str] = typer.Option(None, "--storage-options", metavar="JSON|@FILE", help=_STORAGE_OPTIONS_HELP),
) -> None:
    """Recompute every teacher's embeddings of the replayed views and captions of N samples; compare cosines;
    compare the replayed views' pixels with views rendered from freshly sampled parameters."""
    from dr_pipeline.read.reader import open_dataset
    from dr_pipeline.tools.verify import verify_dataset

    with _quiet("verify"):
        keys, checks, replay = _guarded(
            lambda: verify_dataset(open_dataset(dataset_url, _storage_options(storage_options)), samples, seed, device))
    failed = [c for c in checks if c.min < threshold]
    if as_json:
        report = {"samples": keys, "threshold": threshold, "passed": not failed and not replay.mismatched,
                  "teachers": [c.to_dict() for c in checks], "replay": replay.to_dict()}
        sys.stdout.write(json.dumps(report, indent=1) + "\n")
    else:
        # plain aligned columns, never wrapped or cut to the terminal's width: ids and keys stay whole
        rows = [("teacher", "min", "mean", "views min / mean", "texts min / mean", "worst sample")]
        for check in checks:
            parts = check.to_dict()
            rows.append((check.teacher, f"{check.min:.6f}", f"{check.mean:.6f}",
                         *(f"{parts[p]['min']:.6f} / {parts[p]['mean']:.6f}" if parts[p] else "-"
                           for p in ("image", "text")),
                         str(check.worst_key)))
        widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
        console.print(f"cosine of recomputed and stored embeddings, {len(keys)} samples", highlight=False)
        for row in rows:
            console.print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip(), markup=False,
                          highlight=False, soft_wrap=True)
        for check in checks:
            if check.card_differences:
                console.print(f"note: {check.teacher} rebuilt from its spec differs from its card in "
                              f"{', '.join(check.card_differences)}", markup=False, highlight=False, soft_wrap=True)
    for check in failed:
        errors.print(f"{check.teacher}: min cosine {check.min:.6f} below {threshold} (sample {check.worst_key})",
                     markup=False, highlight=False, soft_wrap=True)
    for key, view in replay.mismatched:
        errors.print(f"replay: sample {key} view {view}: its stored parameters render other pixels than "
                     "parameters sampled afresh from the run seed and key", markup=False, highlight=False,
                     soft_wrap=True)
    if failed or replay.mismatched:
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
    storage_options: Optional[str] = typer.Option(None, "--storage-options", metavar="JSON|@FILE", help=_STORAGE_OPTIONS_HELP),
) -> None:
    """Write a dataset in another training layout: datacompdr = Apple's DataCompDR tars + config.json."""
    from dr_pipeline.tools.export import export_datacompdr
    from dr_pipeline.read.reader import open_dataset

    def write() -> Any:
        options = _storage_options(storage_options)
        return export_datacompdr(
            open_dataset(dataset_url, options), dest, images=images, dest_storage_options=options,
            on_unit=lambda unit_id, so_far: console.print(f"{unit_id}: {so_far.samples} samples so far", markup=False,
                                                             highlight=False),
        )

    with _quiet("export"):
        summary = _guarded(write)
    console.print(f"{summary.dest}: {summary.units} tars, {summary.samples} samples ({export_format.value})",
                  markup=False, highlight=False, soft_wrap=True)
    if summary.normalised_images:
        console.print(
            f"{summary.normalised_images} images written as their decoded PNG (EXIF rotation, transparency, "
            "bit depth: what the teachers saw differs from a plain decode of the original); their json says "
            '"normalised_image": "png"', markup=False, highlight=False,
        )


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
    from dr_pipeline.tools.sample_data import write_sample_data

    def write() -> list[str]:
        try:
            return write_sample_data(dest, num_shards=shards)
        except ModuleNotFoundError as missing:
            raise ConfigError(f"sample-data needs {missing.name}: pip install 'dr-gen[demo]'") from None

    written = _guarded(write)
    console.print(f"wrote {len(written)} shards to {dest}", markup=False, highlight=False, soft_wrap=True)


if __name__ == "__main__":
    app()
