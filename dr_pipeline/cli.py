"""The `dr-gen` command line. Errors a user can fix are one line on stderr, exit code 2."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Optional, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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
    from dr_pipeline.runner import run_job

    if extend is not None and (output_url is not None or overwrite):
        errors.print("[red]error:[/red] --extend OUT names the output: drop --output and --overwrite", highlight=False)
        raise typer.Exit(2)
    job = _guarded(lambda: load_job(
        job_file,
        input_urls=None if not input_urls else (input_urls[0] if len(input_urls) == 1 else input_urls),
        output_url=extend if extend is not None else output_url,
    ))
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("units"),
        TextColumn("{task.fields[samples]} samples, {task.fields[rate]} samples/s, {task.fields[failures]} failures"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
    ) as progress:
        task = progress.add_task(job.name, total=None, samples=0, rate="-", failures=0)

        def on_unit_done(stats: dict[str, Any], summary: Any) -> None:
            elapsed = max(progress.tasks[task].elapsed or 0.0, 1e-9)
            progress.update(
                task, total=summary.units_planned, completed=summary.units_skipped + summary.units_done,
                samples=summary.samples, failures=summary.failures, rate=f"{summary.samples / elapsed:.1f}",
            )

        if extend is not None:
            summary = _guarded(lambda: extend_dataset(job, address=address, on_unit_done=on_unit_done))
        else:
            summary = _guarded(lambda: run_job(job, address=address, overwrite=overwrite, on_unit_done=on_unit_done))
        progress.update(task, total=summary.units_planned, completed=summary.units_skipped + summary.units_done)
    console.print(
        f"{summary.output}: {summary.units_done} units written, {summary.units_skipped} already committed, "
        f"{summary.samples} samples, {summary.failures} failures in {summary.seconds:.1f}s"
    )
    if summary.units_failed:
        for unit_id, reason in summary.units_failed:
            errors.print(f"unit {unit_id} failed: {reason}", highlight=False, soft_wrap=True)
        errors.print("rerun the same command to retry the failed units", highlight=False)
        raise typer.Exit(1)


@app.command()
def inspect(
    dataset_url: str = typer.Argument(..., metavar="OUT", help="dataset folder URL"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Summarise a dataset: schema, teachers, captioners, counts, failures, one sample."""
    from dr_pipeline.reader import open_dataset
    from dr_pipeline.summary import dataset_summary, first_sample, print_summary

    def summarise() -> tuple[dict[str, Any], dict[str, Any] | None]:
        dataset = open_dataset(dataset_url)
        return dataset_summary(dataset), first_sample(dataset)

    summary, sample = _guarded(summarise)
    if as_json:
        sys.stdout.write(json.dumps({**summary, "sample": sample}, indent=1) + "\n")
    else:
        print_summary(summary, sample, console)


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
