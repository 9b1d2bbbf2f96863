"""``[host] migrate`` / ``migrate_key``: checked before anything starts."""

from __future__ import annotations

import pytest

from xmp.topology import TopologyError, load_topology

pytestmark = pytest.mark.timeout(10)


def _load(tmp_path, host: str):
    path = tmp_path / "lab.toml"
    path.write_text(f"[host]\nmemory = 512\n{host}")
    return load_topology(path)


def test_migrate_with_a_key_next_to_the_file(tmp_path):
    (tmp_path / "lab.key").write_text("k" * 64)
    host = _load(tmp_path, 'migrate = "10.0.0.1:8002"\nmigrate_key = "lab.key"\n').host
    assert host.migrate == "10.0.0.1:8002" and host.migrate_key == str(tmp_path / "lab.key")
    v6 = _load(tmp_path, 'migrate = "[fd00::1]:0"\nmigrate_key = "lab.key"\n').host
    assert v6.migrate == "[fd00::1]:0"


def test_no_migrate_no_listener(tmp_path):
    host = _load(tmp_path, "").host
    assert host.migrate is None and host.migrate_key is None


@pytest.mark.parametrize(("host", "message"), [
    ('migrate = "10.0.0.1"\nmigrate_key = "lab.key"\n', "'10.0.0.1' is not ADDR:PORT"),
    ('migrate = "10.0.0.1:99999"\nmigrate_key = "lab.key"\n', "is not ADDR:PORT"),
    ('migrate = ":8002"\nmigrate_key = "lab.key"\n', "is not ADDR:PORT"),
    ('migrate = "10.0.0.1:8002"\n', "needs migrate_key"),
    ('migrate_key = "lab.key"\n', "a key without migrate"),
    ('migrate = 8002\nmigrate_key = "lab.key"\n', "expected a string"),
])
def test_mistakes_are_located_errors(tmp_path, host, message):
    (tmp_path / "lab.key").write_text("k" * 64)
    with pytest.raises(TopologyError, match=message) as exc:
        _load(tmp_path, host)
    assert exc.value.line is not None and exc.value.table == "[host]"
