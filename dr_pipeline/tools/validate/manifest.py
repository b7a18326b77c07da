"""dataset.json against itself, its plan and the units' stats markers."""

from __future__ import annotations

from dr_pipeline.core.storage import redact_url
from dr_pipeline.dataset.manifest import read_unit_stats, totals
from dr_pipeline.dataset.plan import read_plan
from dr_pipeline.dataset.sidecars import sidecar_folder
from dr_pipeline.tools.validate.common import CheckedDataset


def manifest_problems(dataset: CheckedDataset) -> list[str]:
    """Status, totals, columns, teacher cards; plan.json; every unit entry against its marker."""
    manifest, layout, problems = dataset.manifest, dataset.full_layout, []
    units = manifest["units"]
    recorded = manifest["totals"]
    if manifest["status"] != "complete":
        problems.append(
            f"dataset.json: status {manifest['status']}: {len(units)} of {recorded['units_planned']} units committed"
        )
    summed = totals(recorded["units_planned"], units)
    for name, value in summed.items():
        if recorded[name] != value:
            problems.append(f"dataset.json: totals.{name} is {recorded[name]}, the units sum to {value}")
    expected_columns = {f.name: str(f.type) for f in layout.arrow_schema()}
    if manifest.get("columns", expected_columns) != expected_columns:
        problems.append("dataset.json: columns differ from the Arrow schema of its layout")
    card_dims = [(t["id"], t["card"]["embedding_dim"]) for t in manifest["teachers"]]
    if card_dims != [(t.id, t.dim) for t in layout.teachers]:
        problems.append("dataset.json: layout teachers differ from the teacher cards (ids, order or dims)")
    plan = read_plan(dataset.out)
    if plan is None:
        problems.append("plan.json: missing")
        return problems
    config_hash, planned, _ = plan
    extensions = manifest.get("extensions", [])
    planned_hash = extensions[0]["extends"] if extensions else manifest["config_hash"]
    if config_hash != planned_hash:  # the plan is the base run's; extensions keep it
        problems.append(f"plan.json: config hash {config_hash}, dataset.json says {planned_hash}")
    if len(planned) != recorded["units_planned"]:
        problems.append(f"plan.json: {len(planned)} units, dataset.json says {recorded['units_planned']} planned")
    markers = read_unit_stats(dataset.out, planned)
    sidecar_markers = {s.extension: read_unit_stats(dataset.out, planned, sidecar_folder(s.extension))
                       for s in dataset.sidecars}
    planned_by_id = {u.id: u for u in planned}
    listed = {u["id"] for u in units}
    for unit in units:
        where = f"unit {unit['id']}"
        if unit["id"] not in planned_by_id:
            problems.append(f"{where}: not in plan.json")
            continue
        marker = planned_by_id[unit["id"]].stats_file
        own_files = {name: info for name, info in unit["files"].items() if name not in sidecar_markers}
        if unit["id"] not in markers:
            problems.append(f"{where}: no stats marker {marker} (unit not committed)")
        elif {**markers[unit["id"]], "input": redact_url(markers[unit["id"]]["input"])} != {**unit, "files": own_files}:
            problems.append(f"{where}: dataset.json entry differs from {marker}")
        for extension, committed in sidecar_markers.items():
            sidecar_marker = committed.get(unit["id"])
            if sidecar_marker is None:
                problems.append(f"{where}: extension {extension} has no stats marker for it (not committed)")
            elif sidecar_marker["files"]["data"] != unit["files"].get(extension):
                problems.append(f"{where}: dataset.json entry of extension {extension} differs from its marker")
    for unit_id in sorted(set(markers) - listed):
        problems.append(f"unit {unit_id}: committed but missing from dataset.json (rerun the job to rebuild it)")
    return problems
