"""HTTPS on an exit node: what `create` takes for Let's Encrypt, the firewall and what it prints.

The running pieces (the bootstrap script, the unit, a real certificate from
Pebble) are in test_bootstrap.py and test_civo_cli.py; here are the checks
made on the laptop before anything is created, and the words the user reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from homeport.cli import https_options
from homeport.exitnode.cli import ready_message
from homeport.exitnode.errors import ExitNodeError
from homeport.exitnode.provision import CreateRequest, firewall_rules, https_cell
from homeport.exitnode.render import LetsEncrypt
from homeport.exitnode.store import NodeRecord, NodeStore

FINGERPRINT = "sha256:" + "ab" * 32


def checked(
    domains: tuple[str, ...] = ("fn.example.com",),
    email: str | None = None,
    issuer: str = "production",
    port: int = 80,
    control_port: int = 8123,
    tcp_ports: tuple[int, ...] = (),
    https_redirect: bool = False,
) -> LetsEncrypt:
    letsencrypt = LetsEncrypt(domains, email, issuer, https_redirect)
    return letsencrypt.checked(port, control_port, tcp_ports)


def test_names_are_normalised_as_the_exit_server_does() -> None:
    given = ("FN.Example.COM.", " www.example.com", "fn.example.com")

    letsencrypt = checked(given, "owner@example.com")

    assert letsencrypt.domains == ("fn.example.com", "www.example.com")
    served = https_options(
        domains=given,
        email="owner@example.com",
        issuer="production",
        directory=None,
        ca_file=None,
        cert=None,
        key=None,
    )
    assert served["acme_domains"] == letsencrypt.domains
    assert letsencrypt.email == "owner@example.com"


def test_no_names_is_no_https() -> None:
    assert LetsEncrypt().checked(8080, 8123, (443,)) == LetsEncrypt()


def test_the_redirect_is_kept_with_the_names_normalised() -> None:
    letsencrypt = checked(("FN.Example.com.",), https_redirect=True)

    assert letsencrypt == LetsEncrypt(("fn.example.com",), https_redirect=True)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"domains": ("*.example.com",)}, "a wildcard needs a DNS-01 challenge"),
        ({"domains": ("203.0.113.7",)}, "203.0.113.7: Let's Encrypt certifies names, not IP"),
        ({"domains": ("2001:db8::7",)}, "certifies names, not IP addresses"),
        ({"domains": ("localhost",)}, "'localhost' is not a DNS name a CA certifies"),
        ({"domains": ("fn..example.com",)}, "is not a DNS name a CA certifies"),
        ({"domains": ("-fn.example.com",)}, "is not a DNS name a CA certifies"),
        ({"domains": ("fn_1.example.com",)}, "is not a DNS name a CA certifies"),
        ({"domains": ("bücher.example",)}, "is not a DNS name a CA certifies"),
        ({"domains": ("fn.example.com; reboot",)}, "is not a DNS name a CA certifies"),
        ({"domains": ("fn.example.com\nHOMEPORT_INSECURE=1",)}, "is not a DNS name"),
        ({"domains": ("",)}, "'' is not a DNS name"),
        ({"domains": ("fn.example.123",)}, "does not end in a top-level domain"),
        (
            {"domains": tuple(f"n{i}.example.com" for i in range(101))},
            "101 names for --letsencrypt-domain: Let's Encrypt puts at most 100",
        ),
        ({"email": "owner.example.com"}, "'owner.example.com' is not an email address"),
        ({"email": "owner@localhost"}, "is not an email address"),
        ({"email": "owner @example.com"}, "is not an email address"),
        ({"email": "owner@example.com\nX=1"}, "is not an email address"),
        ({"email": "o'$(reboot)'@example.com"}, "an exit node takes letters, digits and ._+-"),
        ({"email": 'o"@example.com'}, "an exit node takes letters, digits"),
        ({"email": "o`reboot`@example.com"}, "an exit node takes letters, digits"),
        ({"email": "owner@exa_mple.com"}, "an exit node takes letters, digits"),
        ({"issuer": "prod"}, "--letsencrypt-issuer 'prod' must be production or staging"),
        ({"port": 8080}, "--letsencrypt-domain needs --port 80, not 8080: Let's Encrypt checks"),
        ({"control_port": 443}, "--control-port 443 is the HTTPS port of --letsencrypt-domain"),
        ({"tcp_ports": (2222, 443)}, "--tcp-port 443 is the HTTPS port of --letsencrypt-domain"),
        ({"domains": (), "email": "owner@example.com"}, "--letsencrypt-email goes with --lets"),
        ({"domains": (), "issuer": "staging"}, "--letsencrypt-issuer goes with --letsencrypt-d"),
        (
            {"domains": (), "https_redirect": True},
            "--https-redirect goes with --letsencrypt-domain: without a certificate the node "
            "serves no HTTPS to redirect visitors to",
        ),
        ({"https_redirect": "false"}, "--https-redirect is a flag: on (True) or off (False)"),
        ({"domains": ("*.example.com",), "https_redirect": True}, "a wildcard needs a DNS-01"),
        ({"port": 8080, "https_redirect": True}, "--letsencrypt-domain needs --port 80"),
    ],
)
def test_what_the_exit_server_would_refuse_is_refused_on_the_laptop(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ExitNodeError) as refused:
        checked(**changes)
    assert message in str(refused.value)


def request(**changes: Any) -> CreateRequest:
    values: dict[str, Any] = {
        "name": "exit",
        "region": "lon1",
        "size": "g3.xsmall",
        "image": "ubuntu-noble",
        "port": 80,
        "control_port": 8123,
        "allow_ssh_from": (),
        "ssh_key_id": None,
        "package": "homeport==0.1.0",
        "timeout_s": 60.0,
        "poll_interval_s": 1.0,
    }
    return CreateRequest(**{**values, **changes})


def test_a_create_request_comes_back_with_its_names_normalised() -> None:
    given = request(letsencrypt=LetsEncrypt(("FN.example.com.",), None, "staging"))

    assert given.checked().letsencrypt == LetsEncrypt(("fn.example.com",), None, "staging")


def test_a_create_request_with_a_redirect_alone_is_refused() -> None:
    given = request(letsencrypt=LetsEncrypt(https_redirect=True))

    with pytest.raises(ExitNodeError, match="--https-redirect goes with --letsencrypt-domain"):
        given.checked()


def test_a_create_request_checks_its_tcp_ports_before_https() -> None:
    given = request(tcp_ports=(80,), letsencrypt=LetsEncrypt(("fn.example.com",)))

    with pytest.raises(ExitNodeError, match="--tcp-port 80 is the --port already"):
        given.checked()


def ingress(rules: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r["start_port"], r["label"]) for r in rules if r["direction"] == "ingress"]


def test_the_firewall_opens_443_only_for_https() -> None:
    assert ingress(firewall_rules(80, 8123, (), (2222,))) == [
        ("80", "homeport public port"),
        ("8123", "homeport control"),
        ("2222", "homeport tcp 2222"),
    ]
    assert ingress(firewall_rules(80, 8123, (), (2222,), https_port=443)) == [
        ("80", "homeport public port"),
        ("8123", "homeport control"),
        ("443", "homeport https"),
        ("2222", "homeport tcp 2222"),
    ]


def ready(tmp_path: Path, **changes: Any) -> str:
    record = NodeRecord(
        "exit", "civo", "lon1", 80, 8123, FINGERPRINT, public_ip="203.0.113.5", **changes
    )
    return ready_message(record, NodeStore(tmp_path))


def test_the_ready_message_gives_the_https_urls_and_what_they_wait_for(tmp_path: Path) -> None:
    text = ready(tmp_path, letsencrypt_domains=("fn.example.com", "www.example.com"))

    lines = text.splitlines()
    assert lines[0].startswith("exit node exit is ready: visitors on http://203.0.113.5/,")
    assert lines[1].startswith("HTTPS: https://fn.example.com/, https://www.example.com/ with")
    assert all(len(line) <= 88 for line in lines[1:5])
    said = " ".join(text.split())
    assert (
        "with a certificate from Let's Encrypt, once the DNS A record of fn.example.com, "
        "www.example.com is 203.0.113.5. The exit server asks as it starts and, until it has "
        "the certificate, again 10 minutes later, then twice as long each time, up to 12 hours "
        "apart (`sudo systemctl reload homeport-exit` on the VM asks at once)."
    ) in said
    assert "Then browse https://fn.example.com/ (or http://203.0.113.5/)" in lines


def test_the_ready_message_warns_that_staging_is_not_trusted(tmp_path: Path) -> None:
    text = ready(tmp_path, letsencrypt_domains=("fn.example.com",), letsencrypt_issuer="staging")

    assert "from Let's Encrypt's staging CA (browsers do not trust it)" in " ".join(text.split())


def test_the_ready_message_says_plain_http_is_redirected_and_browses_https_only(
    tmp_path: Path,
) -> None:
    text = ready(tmp_path, letsencrypt_domains=("fn.example.com",), https_redirect=True)

    lines = text.splitlines()
    assert all(len(line) <= 88 for line in lines[1:6])
    said = " ".join(text.split())
    assert (
        "once the DNS A record of fn.example.com is 203.0.113.5. Plain HTTP is answered with "
        "a redirect (308) to the same URL over HTTPS (Let's Encrypt's checks excepted), so "
        "visitors wait for the certificate too. The exit server asks as it starts"
    ) in said
    # http://203.0.113.5/ would be sent to https://203.0.113.5/, which no certificate names.
    assert "Then browse https://fn.example.com/" in lines


def test_the_ready_message_without_the_redirect_offers_plain_http_too(tmp_path: Path) -> None:
    text = ready(tmp_path, letsencrypt_domains=("fn.example.com",))

    assert "redirect" not in text
    assert "Then browse https://fn.example.com/ (or http://203.0.113.5/)" in text.splitlines()


def test_list_shows_the_https_urls_and_whether_plain_http_is_redirected() -> None:
    def cell(**changes: Any) -> str:
        return https_cell(NodeRecord("exit", "civo", "lon1", 80, 8123, FINGERPRINT, **changes))

    names = ("fn.example.com", "www.example.com")
    assert cell() == ""
    assert cell(letsencrypt_domains=names) == "https://fn.example.com/,https://www.example.com/"
    assert cell(letsencrypt_domains=names, https_redirect=True) == (
        "https://fn.example.com/,https://www.example.com/ (http redirected)"
    )


def test_the_ready_message_says_nothing_of_https_without_it(tmp_path: Path) -> None:
    text = ready(tmp_path)

    assert "https" not in text.lower()
    assert "Then browse http://203.0.113.5/" in text
