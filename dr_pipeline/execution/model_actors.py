"""The model actors of a run, between `resources.actors` min and max, on a cluster whose nodes
come and go (spot or preemptible instances, the Ray autoscaler).

Ray places the actors (SPREAD over the nodes) and restarts one whose process dies
(`max_restarts`); this module only decides how many there are and which are usable:
- the run starts once `min` are up; it asks Ray's autoscaler for room for `max`
  (`request_resources`), and adds an actor whenever the cluster's resources
  (`ray.cluster_resources()`) hold one more: one per `gpus_per_actor` GPUs, or on a CPU
  cluster one per `cpus_per_actor + 1` CPUs (the actor's and one for a unit task feeding it);
- an actor whose node left the cluster (`ray.nodes()`) is killed without restart, so the
  unit tasks waiting on it fail at once and the driver hands their units to live actors.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.autoscaler.sdk import request_resources

from dr_pipeline.core.config import JobConfig
from dr_pipeline.core.errors import DrGenError, error_line
from dr_pipeline.core.records import ModelCards

WATCH_SECONDS = 1.0  # how often the cluster's nodes and resources are read again


class ModelHost:
    """The model actor's class: it names its worker ("module:Class") instead of holding it, so
    the driver creates model actors without importing torch or a model library; the actor's
    process imports them and builds the worker (generate.model_worker.ModelWorker, or extend's
    ExtensionWorker) from `args`."""

    def __init__(self, worker: str, *args: Any):
        module, _, name = worker.partition(":")
        self.worker = getattr(importlib.import_module(module), name)(*args)

    def describe(self) -> ModelCards:
        return self.worker.describe()

    def process(self, batch: Any) -> Any:
        """The worker's results for one batch (a ViewBatch: generate.model_worker.BatchResult)."""
        return self.worker.process(batch)


@dataclass
class ModelActor:
    handle: Any
    node_id: str
    described: Any  # the ref of its describe(): the cards of its models
    units: int = 0  # unit tasks it feeds now


@dataclass
class ModelActors:
    """Create with `ModelActors.start(job)`; the driver's loop calls `watch()` between unit
    completions, gives each unit to `least_loaded()` and reports units lost with their actor
    to `lost()`."""

    job: JobConfig
    actor_class: Any
    actor_args: tuple  # ModelHost's
    gpus: float
    live: list[ModelActor] = field(default_factory=list)
    starting: dict[Any, Any] = field(default_factory=dict)  # describe() ref -> actor handle
    nodes_used: list[str] = field(default_factory=list)  # node of every actor that ran, in order
    watched: float = 0.0
    first: list[Any] = field(default_factory=list)  # the first actors' describe() refs

    @classmethod
    def start(cls, job: JobConfig, worker: str, worker_arg: Any = None) -> "ModelActors":
        """Create the first `min` actors (more when the cluster already holds them) and return
        at once, while they load their models. On a single node they are usable at once (unit
        tasks start while the models load); on a cluster once `wait_started` has their nodes.
        Each actor builds `worker` ("module:Class") from (`worker_arg` or the job, use a GPU)."""
        resources = job.resources
        gpus = resources.gpus_per_actor
        if gpus == "auto":
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        actor_class = ray.remote(ModelHost).options(
            num_cpus=resources.cpus_per_actor, num_gpus=gpus, max_restarts=3, max_task_retries=3,
            scheduling_strategy="SPREAD",
        )
        actors = cls(job, actor_class, (worker, worker_arg or job, gpus > 0), gpus)
        span = resources.actor_range
        if span.max > span.min:
            bundle = {"CPU": resources.cpus_per_actor, **({"GPU": gpus} if gpus else {})}
            request_resources(bundles=[bundle] * span.max)  # the autoscaler launches nodes for them
        node = _single_node_id()
        for _ in range(span.min):
            handle = actor_class.remote(*actors.actor_args)
            described = handle.describe.remote()
            actors.first.append(described)
            if node:
                actors.add_live(ModelActor(handle, node, described))
            else:
                actors.starting[described] = handle
        actors.grow()
        return actors

    def wait_started(self) -> ModelCards:
        """Wait for the first `min` actors (a DrGenError naming why if one fails to start);
        returns the cards of their models."""
        try:
            described = ray.get(self.first)
        except ray.exceptions.RayError as error:
            raise DrGenError(f"model actors failed to start: {error_line(error, part='last')}") from None
        self.watch(force=True)
        return described[0]

    def add_live(self, actor: ModelActor) -> None:
        self.live.append(actor)
        self.nodes_used.append(actor.node_id)

    def capacity(self) -> int:
        """Actors the cluster's resources hold now."""
        total = ray.cluster_resources()
        if self.gpus > 0:
            return int(total.get("GPU", 0) // self.gpus)
        return int(total.get("CPU", 0) // (self.job.resources.cpus_per_actor + 1))

    def grow(self) -> None:
        """Add actors up to what the cluster holds, within [min, max]; at least `min` always
        exist (those waiting for room are the autoscaler's demand)."""
        span = self.job.resources.actor_range
        wanted = span.min if span.max == span.min else min(max(self.capacity(), span.min), span.max)
        while len(self.live) + len(self.starting) < wanted:
            handle = self.actor_class.remote(*self.actor_args)
            self.starting[handle.describe.remote()] = handle

    def watch(self, force: bool = False) -> None:
        """At most every WATCH_SECONDS: drop actors whose node died, take in the actors that
        came up, and grow to what the cluster holds."""
        if not force and time.monotonic() - self.watched < WATCH_SECONDS:
            return
        self.watched = time.monotonic()
        alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        for actor in [a for a in self.live if a.node_id not in alive]:
            self.drop(actor)
        if self.starting:
            ready, _ = ray.wait(list(self.starting), num_returns=len(self.starting), timeout=0)
            for ref in ready:
                handle = self.starting.pop(ref)
                try:
                    node_id = ray.get(ref)["node_id"]
                except ray.exceptions.RayError:
                    continue  # died while starting (its node left): grow() replaces it
                if node_id in alive:
                    self.add_live(ModelActor(handle, node_id, ref))
                else:
                    ray.kill(handle, no_restart=True)
        self.grow()

    def drop(self, actor: ModelActor) -> None:
        """Stop using `actor` and stop Ray restarting it: unit tasks waiting on it fail now."""
        if actor in self.live:
            self.live.remove(actor)
            ray.kill(actor.handle, no_restart=True)

    def least_loaded(self) -> ModelActor | None:
        return min(self.live, key=lambda a: a.units) if self.live else None

    def close(self) -> None:
        """The run is over: stop every actor now (a Ray session that outlives the run, a notebook's
        or a test module's, would otherwise keep their CPUs and GPUs) and withdraw the autoscaler
        request."""
        for handle in [actor.handle for actor in self.live] + list(self.starting.values()):
            ray.kill(handle, no_restart=True)
        self.live.clear()
        self.starting.clear()
        span = self.job.resources.actor_range
        if span.max > span.min:
            request_resources(bundles=[])


def _single_node_id() -> str | None:
    """The node id when the cluster has one node (local Ray), where every actor and task runs."""
    nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    return nodes[0] if len(nodes) == 1 else None
