"""ray_session starts a local Ray in a thread while the caller goes on, and shuts it down from
that same thread: from another thread Ray's driver shutdown takes about 5 s instead of 1.4 s,
which was most of the end of every quickstart run."""

import threading

import ray

from dr_pipeline.execution.unit_tasks import ray_session


def test_a_ray_started_in_the_session_is_shut_down_from_the_thread_that_started_it(monkeypatch):
    threads: dict[str, int] = {}
    real_init, real_shutdown = ray.init, ray.shutdown

    def init(*args, **kwargs):
        threads["init"] = threading.get_ident()
        return real_init(*args, num_cpus=2, object_store_memory=200 * 1024**2, **kwargs)

    def shutdown(*args, **kwargs):
        threads["shutdown"] = threading.get_ident()
        return real_shutdown(*args, **kwargs)

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", shutdown)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")

    with ray_session(None) as ray_up:
        ray_up()
        assert ray.is_initialized() and ray.cluster_resources()["CPU"] == 2

    assert not ray.is_initialized()
    assert threads["init"] != threading.get_ident()  # started in a thread while the caller went on
    assert threads["shutdown"] == threads["init"]
