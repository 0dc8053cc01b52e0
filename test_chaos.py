"""Issue 24's proof: each engine frozen, killed and restarted, black-holed and reset, and a node killed, under load.

Real processes throughout (iss_testing.chaos): PostgreSQL and SeaweedFS, each behind a TCP
proxy that can partition it, two gunicorn nodes, the cluster nginx site in front. Six
clients upload (single, batch, tus), read, delete, list and ask /stats and /health through
nginx while one fault lasts a few seconds; then the checker holds the cluster to the whole
promise (see ``chaos.check``): nothing acknowledged lost, nothing half-written after one
reconcile interval, listings and /stats equal to the bucket, every answer a success or a
JSON 503 with Retry-After, none later than the deadline plus one second.

Each test prints what it measured (a line starting ``chaos:``; run with ``-s``): the rows of
RELIABILITY.md's table.
"""

from __future__ import annotations

import json

import pytest

from iss_testing import chaos

# NOTE: not in the fast subset: real engines, two nodes and nginx, a fault of seconds in each test.
pytestmark = [pytest.mark.slow, pytest.mark.chaos]

#: How long each fault lasts, seconds: over the deadline (2 s), so that a hang shows as one.
FAULT_SECONDS = 6.0
ENGINES = ['postgres', 's3']


@pytest.fixture(scope='module')
def engines(tmp_path_factory):
    """The module's own engines: the faults below must not reach other modules' tests."""
    with chaos.Engines.started(tmp_path_factory.mktemp('chaos-engines')) as started:
        yield started


@pytest.fixture
def cluster(engines, tmp_path):
    with chaos.cluster(engines, tmp_path) as started:
        yield started


def held(run: chaos.Run, cluster: chaos.Cluster, name: str) -> None:
    """Check the promise after ``run``; print the row measured, then fail with every promise broken."""
    report = chaos.check(cluster, run)
    print(f'\nchaos: {name}: {json.dumps(report.measured)}')
    assert not report.problems, report.summary()


@pytest.mark.parametrize('engine', ENGINES)
def test_an_engine_frozen(cluster, engine):
    run = chaos.run(cluster, lambda: cluster.freeze(engine), lambda: cluster.thaw(engine), FAULT_SECONDS)

    held(run, cluster, f'{engine} frozen')


@pytest.mark.parametrize('engine', ENGINES)
def test_an_engine_killed_and_restarted(cluster, engine):
    # NOTE: down for the fault's time, then started again on its data (PostgreSQL: crash recovery first).
    run = chaos.run(cluster, lambda: cluster.kill_engine(engine), lambda: cluster.restart_engine(engine), FAULT_SECONDS)

    held(run, cluster, f'{engine} killed and restarted')


@pytest.mark.parametrize('engine', ENGINES)
def test_an_engine_black_holed_then_reset(cluster, engine):
    proxy = cluster.proxy(engine)

    # NOTE: first a partition as long as the other faults (nothing answers, connections stay open),
    # then every connection reset for a third of that.
    run = chaos.run(cluster, proxy.blackhole, proxy.heal, FAULT_SECONDS * 4 / 3, midway=proxy.reset, midway_at=0.75)

    held(run, cluster, f'{engine} black-holed, then reset')


def test_a_node_killed(cluster):
    # NOTE: SIGKILL of its master and workers mid-requests; started again on its scratch directory.
    run = chaos.run(cluster, lambda: cluster.kill_node(1), lambda: cluster.restart_node(1), FAULT_SECONDS)

    held(run, cluster, 'a node killed and restarted')
