"""The exit node's first-boot files, rendered from the templates shipped with homeport.

Two forms say the same thing: ``bootstrap.sh`` (a shell script, what Civo's
``script`` field runs once at first boot) and ``cloud-config.yaml`` (for
providers that take cloud-init); a test keeps them equal. Each value is
checked against a strict pattern *before* it is put into a template, so
nothing a user types can become shell or YAML: ports are numbers (the raw
TCP ports a list of them, one space apart), the token hash is 64 hex
digits, PEM blocks are base64 lines between their armour lines, the
package spec is a pinned name or an https URL of a fixed alphabet, the
names for Let's Encrypt are lower-case DNS names (one space apart), its
contact address is letters, digits and ``._+-`` around one ``@``, and the
redirect to HTTPS is ``true`` or empty. The shell script checks the simple
values again itself.

Templates mark a value as ``@@NAME@@``. A marker alone on its line takes a
multi-line value, each line indented as the marker was.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Final

from homeport.exitnode.errors import ExitNodeError
from server.certificates import domain_problem, email_problem
from server.config import tcp_ports_problem

EXIT_UNIT: Final = "homeport-exit.service"
CLIENT_UNIT: Final = "homeport-client.service"
BOOTSTRAP: Final = "bootstrap.sh"
CLOUD_CONFIG: Final = "cloud-config.yaml"
INSTALL_CLIENT: Final = "install-client.sh"

_MARKER: Final = re.compile(r"@@([A-Z_]+)@@")
_PACKAGE: Final = re.compile(
    r"homeport==[0-9A-Za-z.+!-]+|(?:git\+)?https://[A-Za-z0-9._~:/@+%#=?&-]+"
)
_TOKEN_HASH: Final = re.compile(r"[0-9a-f]{64}")
_PEM: Final = re.compile(
    r"-----BEGIN (?P<label>CERTIFICATE|PRIVATE KEY)-----\n"
    r"(?:[A-Za-z0-9+/=]{1,76}\n)+"
    r"-----END (?P=label)-----\n?"
)
#: The public HTTPS port an exit node serves with --letsencrypt-domain (the server's default).
HTTPS_PORT: Final = 443
#: Let's Encrypt's CAs, named as ``homeport server --letsencrypt-issuer`` names them.
ISSUERS: Final = ("production", "staging")
#: Let's Encrypt puts at most 100 names in one certificate.
MAX_DOMAINS: Final = 100
_LABEL: Final = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
#: What domain_problem takes, with a top-level label that starts with a letter (no IP
#: address can match); bootstrap.sh checks the same.
_DOMAIN: Final = re.compile(rf"(?:{_LABEL}\.)+[a-z](?:[a-z0-9-]{{0,61}}[a-z0-9])?")
#: Stricter than email_problem: the address goes into a root shell script and an env file.
_EMAIL: Final = re.compile(r"[A-Za-z0-9._+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})+")
#: Lines that end the quoted here-documents of bootstrap.sh: never inside a value.
_HEREDOC_ENDS: Final = frozenset({"EOF_ENV", "EOF_HASH", "EOF_CERT", "EOF_KEY", "EOF_UNIT"})


def template(name: str) -> str:
    """The text of one shipped template (``bootstrap.sh``, ``homeport-exit.service``, ...)."""
    return (
        resources.files("homeport.exitnode").joinpath("templates", name).read_text(encoding="utf-8")
    )


def render(text: str, values: dict[str, str]) -> str:
    """Replace every ``@@NAME@@`` in ``text``; a marker alone on a line takes a block.

    Raises:
        ExitNodeError: a marker has no value, or a value was given that no marker uses.
    """
    used: set[str] = set()

    def value_of(name: str) -> str:
        if name not in values:
            raise ExitNodeError(f"template value {name} is missing")
        used.add(name)
        return values[name]

    lines: list[str] = []
    for line in text.splitlines(keepends=True):
        whole = _MARKER.fullmatch(line.strip())
        if whole is not None:
            indent = line[: len(line) - len(line.lstrip())]
            block = value_of(whole.group(1)).rstrip("\n").split("\n")
            lines.extend(f"{indent}{item}\n" if item else "\n" for item in block)
        else:
            lines.append(_MARKER.sub(lambda match: value_of(match.group(1)), line))
    unused = set(values) - used
    if unused:
        raise ExitNodeError(f"template values {', '.join(sorted(unused))} are not used")
    return "".join(lines)


def check_package(spec: str) -> str:
    """A pip requirement we are willing to put in a script: ``homeport==X`` or an https URL.

    Raises:
        ExitNodeError: anything else.
    """
    if _PACKAGE.fullmatch(spec) is None:
        raise ExitNodeError(
            f"--package {spec!r} must be homeport==VERSION or an https:// (or git+https://) URL "
            "made of letters, digits and ._~:/@+%#=?&-"
        )
    return spec


def check_port(port: int, what: str) -> int:
    """A TCP port from 1 to 65535.

    Raises:
        ExitNodeError: out of range.
    """
    if not 1 <= port <= 65535:
        raise ExitNodeError(f"{what} {port} must be from 1 to 65535")
    return port


def check_tcp_ports(tcp_ports: tuple[int, ...], port: int, control_port: int) -> tuple[int, ...]:
    """The raw TCP ports (``--tcp-port``): each once, none the public or the control port.

    The exit server refuses the same at its start; refused here, nothing is
    created for a node that would never serve.

    Raises:
        ExitNodeError: one is not.
    """
    for tcp_port in tcp_ports:
        check_port(tcp_port, "--tcp-port")
    problem = tcp_ports_problem(tcp_ports, port, control_port)
    if problem is not None:
        raise ExitNodeError(problem)
    return tcp_ports


@dataclass(frozen=True)
class LetsEncrypt:
    """HTTPS for visitors, with a certificate the exit server gets from Let's Encrypt.

    ``homeport server``'s ``--letsencrypt-domain``, ``--letsencrypt-email``,
    ``--letsencrypt-issuer`` and ``--https-redirect`` (plain HTTP answered
    with a 308 to the same URL over HTTPS, the ACME challenges excepted); no
    domains, no HTTPS (port 443 stays closed) and so no redirect.
    """

    domains: tuple[str, ...] = ()
    email: str | None = None
    issuer: str = "production"
    https_redirect: bool = False

    @property
    def https_redirect_value(self) -> str:
        """``HOMEPORT_HTTPS_REDIRECT`` as written to exit.env: ``true``, or empty for off.

        Off is empty, not ``false``: click 8.2.0 and 8.2.1 (which homeport's
        ``click>=8.1`` allows) turn a flag on for any non-empty value, so
        ``false`` would switch the redirect on, and a node without HTTPS
        would not start. Every click 8 reads empty as unset (off) and
        ``true`` as on.
        """
        return "true" if self.https_redirect else ""

    def checked(self, port: int, control_port: int, tcp_ports: tuple[int, ...]) -> LetsEncrypt:
        """Itself with its names normalised, once the exit server would take every value.

        Names are lower-cased, lose a trailing dot and are kept once, as
        ``homeport server`` does. The exit server refuses the same at its
        start; refused here, nothing is created for a node that would never
        serve. The public port must be 80: Let's Encrypt checks each name
        with a request to port 80 (HTTP-01), and a node's firewall opens
        ``--port`` only.

        Raises:
            ExitNodeError: a value the exit server would refuse, or a port clash.
        """
        if self.issuer not in ISSUERS:
            raise ExitNodeError(
                f"--letsencrypt-issuer {self.issuer!r} must be {' or '.join(ISSUERS)}"
            )
        if not isinstance(self.https_redirect, bool):  # "false" would read as on
            raise ExitNodeError("--https-redirect is a flag: on (True) or off (False)")
        if not self.domains:
            if self.email is not None:
                raise ExitNodeError("--letsencrypt-email goes with --letsencrypt-domain")
            if self.issuer != ISSUERS[0]:
                raise ExitNodeError("--letsencrypt-issuer goes with --letsencrypt-domain")
            if self.https_redirect:
                # The exit server would refuse to start: "--https-redirect needs HTTPS".
                raise ExitNodeError(
                    "--https-redirect goes with --letsencrypt-domain: without a certificate "
                    "the node serves no HTTPS to redirect visitors to"
                )
            return self
        domains = tuple(dict.fromkeys(name.strip().lower().rstrip(".") for name in self.domains))
        for name in domains:
            problem = domain_problem(name)
            if problem is not None:
                raise ExitNodeError(f"--letsencrypt-domain {problem}")
            if _DOMAIN.fullmatch(name) is None:
                raise ExitNodeError(
                    f"--letsencrypt-domain {name!r} does not end in a top-level domain "
                    "(a label that starts with a letter, like .com)"
                )
        if len(domains) > MAX_DOMAINS:
            raise ExitNodeError(
                f"{len(domains)} names for --letsencrypt-domain: Let's Encrypt puts at most "
                f"{MAX_DOMAINS} in one certificate"
            )
        if self.email is not None:
            problem = email_problem(self.email)
            if problem is not None:
                raise ExitNodeError(problem)
            if _EMAIL.fullmatch(self.email) is None:
                raise ExitNodeError(
                    f"--letsencrypt-email {self.email!r}: an exit node takes letters, digits "
                    "and ._+- before the @, and a host name after it"
                )
        if port != 80:
            raise ExitNodeError(
                f"--letsencrypt-domain needs --port 80, not {port}: Let's Encrypt checks each "
                "name with a request to its port 80 (HTTP-01), and the node opens only --port"
            )
        if control_port == HTTPS_PORT:
            raise ExitNodeError(
                f"--control-port {HTTPS_PORT} is the HTTPS port of --letsencrypt-domain; "
                "pick another"
            )
        if HTTPS_PORT in tcp_ports:
            raise ExitNodeError(
                f"--tcp-port {HTTPS_PORT} is the HTTPS port of --letsencrypt-domain already"
            )
        problem = tcp_ports_problem(tcp_ports, port, control_port, HTTPS_PORT)
        if problem is not None:  # the exit server's own rule, should it ever grow
            raise ExitNodeError(problem)
        return LetsEncrypt(domains, self.email, self.issuer, self.https_redirect)


#: No HTTPS: what a node has without --letsencrypt-domain.
NO_HTTPS: Final = LetsEncrypt()


def check_pem(text: str, what: str) -> str:
    """One PEM block (a certificate or a PKCS#8 key), nothing around it.

    Raises:
        ExitNodeError: not exactly one such block.
    """
    if _PEM.fullmatch(text) is None:
        raise ExitNodeError(f"the {what} is not a single PEM block")
    return text


def check_unit(text: str) -> str:
    """A unit file that cannot end a here-document early.

    Raises:
        ExitNodeError: it has a line that would.
    """
    if _HEREDOC_ENDS & {line.strip() for line in text.splitlines()}:
        raise ExitNodeError("the unit file has a line that would end its here-document")
    return text


@dataclass(frozen=True)
class NodeSettings:
    """Everything the exit node's first boot needs; no secret the VM does not need.

    ``token_hash`` is the SHA-256 (hex) of the token: the server checks
    tokens against it and never holds the token. ``tls_key_pem`` is the
    control port's private key, made on the user's machine so that the
    client can pin the certificate from its very first connection.
    """

    package: str
    public_port: int
    control_port: int
    token_hash: str
    tls_cert_pem: str
    tls_key_pem: str
    tcp_ports: tuple[int, ...] = ()  #: raw TCP ports, carried to the client that serves each
    letsencrypt: LetsEncrypt = NO_HTTPS  #: HTTPS on port 443, if it has domains

    def checked_values(self) -> dict[str, str]:
        """The template values, each checked against its strict pattern.

        Raises:
            ExitNodeError: a value does not match.
        """
        check_port(self.public_port, "the public port")
        check_port(self.control_port, "the control port")
        if self.public_port == self.control_port:
            raise ExitNodeError("the public port and the control port must differ")
        check_tcp_ports(self.tcp_ports, self.public_port, self.control_port)
        letsencrypt = self.letsencrypt.checked(self.public_port, self.control_port, self.tcp_ports)
        if _TOKEN_HASH.fullmatch(self.token_hash) is None:
            raise ExitNodeError("the token hash must be 64 lowercase hex digits")
        return {
            "PACKAGE": check_package(self.package),
            "PUBLIC_PORT": str(self.public_port),
            "CONTROL_PORT": str(self.control_port),
            "TCP_PORTS": " ".join(str(tcp_port) for tcp_port in self.tcp_ports),
            "LETSENCRYPT_DOMAINS": " ".join(letsencrypt.domains),
            "LETSENCRYPT_EMAIL": letsencrypt.email or "",
            "LETSENCRYPT_ISSUER": letsencrypt.issuer,
            "HTTPS_REDIRECT": letsencrypt.https_redirect_value,
            "TOKEN_HASH": self.token_hash,
            "TLS_CERT": check_pem(self.tls_cert_pem, "TLS certificate"),
            "TLS_KEY": check_pem(self.tls_key_pem, "TLS key"),
            "EXIT_UNIT": check_unit(template(EXIT_UNIT)),
        }


def bootstrap_script(settings: NodeSettings) -> str:
    """The first-boot shell script for this node (Civo's ``script``).

    Raises:
        ExitNodeError: a setting does not match its pattern.
    """
    return render(template(BOOTSTRAP), settings.checked_values())


def cloud_config(settings: NodeSettings) -> str:
    """The same first boot as a ``#cloud-config`` document.

    Raises:
        ExitNodeError: a setting does not match its pattern.
    """
    return render(template(CLOUD_CONFIG), settings.checked_values())
