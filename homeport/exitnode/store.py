"""What ``homeport exit-node`` keeps on the user's machine, one folder per node.

``<config dir>/exit-nodes/<name>/`` (mode 0700) holds:

- ``token``: the tunnel token (0600). The client needs it; nothing else does.
- ``tls.crt``: the control port's certificate, whose fingerprint the client pins.
- ``node.json``: what was created where (provider, region, ids, public IP)
  and what it serves (ports, the names it has HTTPS for, whether plain HTTP
  is redirected there), written as soon as each thing exists, so ``delete``
  can always find it.
- ``install-client.sh``: the installer to copy to the Pi with the token.

The TLS private key is not kept here: it exists only on the exit node.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Final

from homeport.exitnode.errors import ExitNodeError
from tunnel.auth import write_secret_file

NODES_DIR: Final = "exit-nodes"
RECORD_FILE: Final = "node.json"
TOKEN_FILE: Final = "token"  # noqa: S105 - a file name
CERT_FILE: Final = "tls.crt"
INSTALLER_FILE: Final = "install-client.sh"
#: A node name is also the VM's host name: a DNS label.
_NAME: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def check_name(name: str) -> str:
    """A node name: lowercase letters, digits and inner hyphens, at most 63 (a host name).

    Raises:
        ExitNodeError: anything else.
    """
    if _NAME.fullmatch(name) is None:
        raise ExitNodeError(
            f"--name {name!r} must be 1-63 lowercase letters, digits or inner hyphens "
            "(it becomes the VM's host name)"
        )
    return name


def default_config_dir() -> Path:
    """``$XDG_CONFIG_HOME/homeport``, else ``~/.config/homeport``."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "homeport"


@dataclass
class NodeRecord:
    """One exit node as homeport made it; ``None`` for what does not exist (yet)."""

    name: str
    provider: str
    region: str
    port: int
    control_port: int
    fingerprint: str
    instance_id: str | None = None
    firewall_id: str | None = None
    firewall_name: str | None = None
    public_ip: str | None = None
    tcp_ports: tuple[int, ...] = ()  #: raw TCP ports; a record from before them has none
    #: names served over HTTPS with a Let's Encrypt certificate; a record from before has none
    letsencrypt_domains: tuple[str, ...] = ()
    letsencrypt_issuer: str = "production"
    #: plain HTTP answered with a redirect to HTTPS; off in a record from before it
    https_redirect: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NodeRecord:
        """Read a record back, ignoring keys a later version may add.

        Raises:
            ExitNodeError: a required key is missing or has the wrong type.
        """
        known = {f.name for f in fields(cls)}
        try:
            record = cls(**{key: value for key, value in data.items() if key in known})
        except TypeError as exc:
            raise ExitNodeError(f"the node record is incomplete: {exc}") from None
        if not isinstance(record.name, str) or not isinstance(record.port, int):
            raise ExitNodeError("the node record is malformed")
        if not isinstance(record.tcp_ports, list | tuple) or not all(
            isinstance(port, int) for port in record.tcp_ports
        ):
            raise ExitNodeError("the node record's tcp_ports is not a list of ports")
        if not isinstance(record.letsencrypt_domains, list | tuple) or not all(
            isinstance(domain, str) for domain in record.letsencrypt_domains
        ):
            raise ExitNodeError("the node record's letsencrypt_domains is not a list of names")
        if not isinstance(record.letsencrypt_issuer, str):
            raise ExitNodeError("the node record's letsencrypt_issuer is not a name")
        if not isinstance(record.https_redirect, bool):
            raise ExitNodeError("the node record's https_redirect is not true or false")
        record.tcp_ports = tuple(record.tcp_ports)  # JSON has lists
        record.letsencrypt_domains = tuple(record.letsencrypt_domains)
        return record


class NodeStore:
    """The folder of every node's local files."""

    def __init__(self, config_dir: Path) -> None:
        self.root = config_dir / NODES_DIR

    def folder(self, name: str) -> Path:
        """Where one node's files are."""
        return self.root / check_name(name)

    def token_path(self, name: str) -> Path:
        return self.folder(name) / TOKEN_FILE

    def exists(self, name: str) -> bool:
        return (self.folder(name) / RECORD_FILE).exists()

    def _make_folder(self, name: str) -> Path:
        folder = self.folder(name)
        self.root.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path in (self.root, folder):
            path.mkdir(mode=0o700, exist_ok=True)
        return folder

    def save_new(self, record: NodeRecord, token: str, cert_pem: str, installer: str) -> None:
        """Write a new node's files: token 0600, certificate, installer, record.

        Raises:
            ExitNodeError: they cannot be written.
        """
        try:
            folder = self._make_folder(record.name)
            write_secret_file(folder / TOKEN_FILE, token)
            write_secret_file(folder / CERT_FILE, cert_pem.rstrip("\n"))
            installer_path = folder / INSTALLER_FILE
            installer_path.write_text(installer, encoding="utf-8")
            installer_path.chmod(0o700)
        except OSError as exc:
            raise ExitNodeError(f"cannot write the node's files in {self.root}: {exc}") from None
        self.save(record)

    def save(self, record: NodeRecord) -> None:
        """Write (or rewrite) a node's record.

        Raises:
            ExitNodeError: it cannot be written.
        """
        try:
            folder = self._make_folder(record.name)
            write_secret_file(folder / RECORD_FILE, json.dumps(asdict(record), indent=2))
        except OSError as exc:
            raise ExitNodeError(f"cannot write {self.root}: {exc}") from None

    def load(self, name: str) -> NodeRecord | None:
        """A node's record, or None when there is none.

        Raises:
            ExitNodeError: it exists but cannot be read.
        """
        path = self.folder(name) / RECORD_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ExitNodeError(f"cannot read {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ExitNodeError(f"{path} is not a node record")
        return NodeRecord.from_json(data)

    def records(self) -> list[NodeRecord]:
        """Every node with a readable record, by name.

        Raises:
            ExitNodeError: a record cannot be read.
        """
        if not self.root.is_dir():
            return []
        names = sorted(
            p.name
            for p in self.root.iterdir()
            if _NAME.fullmatch(p.name) and (p / RECORD_FILE).is_file()
        )
        return [record for name in names if (record := self.load(name)) is not None]

    def remove(self, name: str) -> None:
        """Forget a node: delete its folder, token included.

        Raises:
            ExitNodeError: it cannot be deleted.
        """
        try:
            shutil.rmtree(self.folder(name))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ExitNodeError(f"cannot delete {self.folder(name)}: {exc}") from None
