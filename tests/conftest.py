import os

import pytest
from hypothesis import HealthCheck, settings
from litefs_cluster import Cluster, NodeApp, create_schema, unusable_reason

from litefs_wsgi.testing import LiteFSMount

# The long fuzz run: HYPOTHESIS_PROFILE=fuzz python -m pytest tests/test_fuzz.py (README,
# "Reliability"). The normal suite keeps each test's own small count.
settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("FUZZ_EXAMPLES") or 100_000),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,  # every run draws new inputs instead of replaying the last run's
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or "default")


@pytest.fixture
def mount(tmp_path):
    """A LiteFS-style mount where this node is the primary."""
    m = LiteFSMount(tmp_path / "litefs")
    m.make_primary()
    return m


@pytest.fixture
def replica(tmp_path):
    """A LiteFS-style mount where this node is a replica of node-a, with app.db at TXID 1."""
    m = LiteFSMount(tmp_path / "replica")
    m.make_replica("node-a")
    m.set_position("app.db", 1)
    return m


# -- a real LiteFS cluster (tests marked litefs) -----------------------------------------------


def pytest_collection_modifyitems(config, items):
    # Without a usable LiteFS (no binary on PATH, no FUSE) the tests marked litefs skip, saying why.
    marked = [item for item in items if item.get_closest_marker("litefs")]
    reason = unusable_reason() if marked else None
    if reason:
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=reason))


# The middleware's options on every node's app in these tests.
LITEFS_APP_OPTIONS = {"max_lag": "2s", "read_timeout": "5s", "connect_timeout": "5s", "require_mount": "true"}


@pytest.fixture(scope="session")
def _litefs_session(tmp_path_factory):
    reason = unusable_reason()
    if reason:
        pytest.skip(reason)
    cluster = Cluster(tmp_path_factory.mktemp("litefs"), proxy={"max-lag": "2s"})
    with cluster:
        cluster.wait_replicated(create_schema(cluster.primary))
        cluster.apps = {node.name: NodeApp(node, **LITEFS_APP_OPTIONS) for node in cluster.nodes}
        try:
            for app in cluster.apps.values():
                app.start()
            yield cluster
        finally:
            for app in cluster.apps.values():
                app.stop()


@pytest.fixture
def litefs(_litefs_session):
    """A real two-node LiteFS cluster (tests/litefs_cluster.py): ``litefs.primary`` (node a) and
    ``litefs.replica`` (node b), each with its app (``litefs.apps[name]``) and LiteFS's proxy.
    Shared by the session: relays are set back to no delay after each test, and the replica
    has caught up with the primary before the next one."""
    cluster = _litefs_session
    yield cluster
    for node in cluster.nodes:
        node.relay.delay = 0.0
        node.relay.resume()
    cluster.wait_replicated(cluster.primary.pos() or 0)


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium with one page, driven over DevTools (the browser tests skip without it)."""
    from test_browser import DevTools

    devtools = DevTools(str(tmp_path / "profile"), str(tmp_path / "chromium.log"))
    try:
        devtools.open_page()
        yield devtools
    finally:
        devtools.close()
