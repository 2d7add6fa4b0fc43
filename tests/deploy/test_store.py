"""The node record on the user's machine: what `create` made, read back as it was written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from homeport.exitnode.errors import ExitNodeError
from homeport.exitnode.store import NodeRecord, NodeStore

FINGERPRINT = "sha256:" + "ab" * 32


def test_a_record_keeps_its_tcp_ports(tmp_path: Path) -> None:
    store = NodeStore(tmp_path)
    record = NodeRecord("exit", "civo", "lon1", 80, 8123, FINGERPRINT, tcp_ports=(2222, 5432))

    store.save(record)

    assert json.loads((store.folder("exit") / "node.json").read_text())["tcp_ports"] == [
        2222,
        5432,
    ]
    assert store.load("exit") == record


def test_a_record_from_before_tcp_ports_has_none(tmp_path: Path) -> None:
    store = NodeStore(tmp_path)
    store.save(NodeRecord("exit", "civo", "lon1", 80, 8123, FINGERPRINT))
    path = store.folder("exit") / "node.json"
    data = json.loads(path.read_text())
    del data["tcp_ports"]
    path.write_text(json.dumps(data))

    record = store.load("exit")

    assert record is not None
    assert record.tcp_ports == ()


@pytest.mark.parametrize("tcp_ports", ["2222", ["2222"], [2222, None]])
def test_a_record_with_malformed_tcp_ports_is_refused(tmp_path: Path, tcp_ports: object) -> None:
    store = NodeStore(tmp_path)
    store.save(NodeRecord("exit", "civo", "lon1", 80, 8123, FINGERPRINT))
    path = store.folder("exit") / "node.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "tcp_ports": tcp_ports}))

    with pytest.raises(ExitNodeError, match="tcp_ports is not a list of ports"):
        store.load("exit")


def test_a_record_keeps_its_https_names_and_redirect(tmp_path: Path) -> None:
    store = NodeStore(tmp_path)
    record = NodeRecord(
        "exit",
        "civo",
        "lon1",
        80,
        8123,
        FINGERPRINT,
        letsencrypt_domains=("fn.example.com", "www.example.com"),
        letsencrypt_issuer="staging",
        https_redirect=True,
    )

    store.save(record)

    data = json.loads((store.folder("exit") / "node.json").read_text())
    assert data["letsencrypt_domains"] == ["fn.example.com", "www.example.com"]
    assert data["letsencrypt_issuer"] == "staging"
    assert data["https_redirect"] is True
    assert store.load("exit") == record


def test_a_record_from_before_https_has_none(tmp_path: Path) -> None:
    store = NodeStore(tmp_path)
    store.save(NodeRecord("exit", "civo", "lon1", 80, 8123, FINGERPRINT, tcp_ports=(2222,)))
    path = store.folder("exit") / "node.json"
    data = json.loads(path.read_text())
    del data["letsencrypt_domains"], data["letsencrypt_issuer"], data["https_redirect"]
    path.write_text(json.dumps(data))

    record = store.load("exit")

    assert record is not None
    assert (record.letsencrypt_domains, record.letsencrypt_issuer) == ((), "production")
    assert record.https_redirect is False
    assert record.tcp_ports == (2222,)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"letsencrypt_domains": "fn.example.com"}, "letsencrypt_domains is not a list of names"),
        ({"letsencrypt_domains": [1]}, "letsencrypt_domains is not a list of names"),
        ({"letsencrypt_issuer": None}, "letsencrypt_issuer is not a name"),
        ({"https_redirect": "true"}, "https_redirect is not true or false"),
        ({"https_redirect": 1}, "https_redirect is not true or false"),
        ({"https_redirect": None}, "https_redirect is not true or false"),
    ],
)
def test_a_record_with_malformed_https_settings_is_refused(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    store = NodeStore(tmp_path)
    store.save(NodeRecord("exit", "civo", "lon1", 80, 8123, FINGERPRINT))
    path = store.folder("exit") / "node.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    with pytest.raises(ExitNodeError, match=message):
        store.load("exit")
