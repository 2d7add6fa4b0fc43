"""The few calls of the Civo API v2 an exit node needs, over aiohttp.

Every request carries ``Authorization: bearer KEY`` and the region as a
query parameter (as Civo's own Go client does); bodies are JSON. Foreign
exceptions (aiohttp, OSError, bad JSON) and HTTP errors become
:class:`CivoError` here, once, with a message a user can act on and never
the key. :class:`DryRunTransport` answers the same calls without the
network, printing each one with its secrets redacted.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from typing import Any, Final, Protocol

import aiohttp

from homeport.exitnode.errors import CivoError, ExitNodeError, NotFound

DEFAULT_API_URL: Final = "https://api.civo.com"
REQUEST_TIMEOUT_S: Final = 30.0
PAGE_SIZE: Final = 100
#: Request fields that must never be printed: the bootstrap script holds the TLS key.
SECRET_FIELDS: Final = {
    "script": "<redacted: the bootstrap script, holding the token's SHA-256 and the TLS key>"
}
_REASON_MAX_CHARS: Final = 300
#: Paths we build from ids the API gave us: nothing else may reach a URL.
_PATH: Final = re.compile(r"/v2/[a-z_]+(?:/[A-Za-z0-9_-]{1,128})*")

Json = Any


class Transport(Protocol):
    """Carries one API call and returns the decoded JSON answer."""

    async def call(
        self, method: str, path: str, query: dict[str, str], body: dict[str, Json] | None
    ) -> Json: ...


class HttpTransport:
    """The real API, over an aiohttp session the caller owns."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, api_key: str) -> None:
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"bearer {api_key}", "Accept": "application/json"}

    def __repr__(self) -> str:
        return f"HttpTransport({self._base_url}, <key redacted>)"

    async def call(
        self, method: str, path: str, query: dict[str, str], body: dict[str, Json] | None
    ) -> Json:
        """Send one request; decode its JSON answer.

        Raises:
            CivoError: the API cannot be reached, refuses, fails or answers nonsense.
        """
        if _PATH.fullmatch(path) is None:
            raise CivoError(f"refusing to call a malformed API path {path!r}")
        url = self._base_url + path
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                async with self._session.request(
                    method, url, params=query, json=body, headers=self._headers
                ) as response:
                    status, text = response.status, await response.text()
        except TimeoutError:
            raise CivoError(
                f"the Civo API at {self._base_url} did not answer {method} {path} "
                f"within {REQUEST_TIMEOUT_S:.0f} s"
            ) from None
        except (aiohttp.ClientError, OSError, UnicodeDecodeError) as exc:
            raise CivoError(
                f"cannot reach the Civo API at {self._base_url}: {_describe(exc)}"
            ) from None
        if status >= 400:
            raise api_error(method, path, status, text)
        try:
            return json.loads(text) if text.strip() else {}
        except ValueError:
            raise CivoError(
                f"the Civo API answered {method} {path} with something that is not JSON"
            ) from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _reason(text: str) -> tuple[str, str]:
    """Civo's error ``code`` and ``reason`` from an error body, made safe to print."""
    try:
        data = json.loads(text)
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    code, reason = str(data.get("code") or ""), str(data.get("reason") or data.get("error") or "")
    clean = "".join(c if c.isprintable() else " " for c in reason)[:_REASON_MAX_CHARS]
    return "".join(c for c in code if c.isalnum() or c in "_-.")[:80], clean


def api_error(method: str, path: str, status: int, text: str) -> CivoError:
    """The one place an HTTP error from Civo becomes a message."""
    code, reason = _reason(text)
    detail = f": {reason}" if reason else (f": {code}" if code else "")
    call = f"{method} {path}"
    if "quota" in f"{code} {reason}".lower():
        return CivoError(
            f"Civo quota exceeded (HTTP {status}{detail}); delete something or raise the "
            "quota in the Civo dashboard, then try again",
            status=status,
        )
    if status in (401, 403):
        return CivoError(
            f"the Civo API refused the API key (HTTP {status}{detail}); check "
            "--api-key-file or CIVO_TOKEN",
            status=status,
        )
    if status == 404:
        return NotFound(f"not found: {call} (HTTP 404{detail})", status=status)
    if status == 429:
        return CivoError(f"the Civo API is rate limiting us (HTTP 429) on {call}; wait a minute")
    if status >= 500:
        return CivoError(
            f"the Civo API failed on {call} (HTTP {status}{detail}); try again in a minute",
            status=status,
        )
    return CivoError(f"the Civo API rejected {call} (HTTP {status}{detail})", status=status)


class DryRunTransport:
    """Prints each call (method, path, JSON with secrets redacted) and makes none.

    It answers with placeholders so the flow can go on: ids in angle
    brackets, the default network, the disk image asked for.
    """

    def __init__(self, say: Callable[[str], None], image: str) -> None:
        self._say = say
        self._image = image

    async def call(
        self, method: str, path: str, query: dict[str, str], body: dict[str, Json] | None
    ) -> Json:
        """Print the call; return a placeholder answer."""
        suffix = "&".join(f"{key}={value}" for key, value in sorted(query.items()))
        self._say(f"{method} {path}" + (f"?{suffix}" if suffix else ""))
        if body is not None:
            shown = {key: SECRET_FIELDS.get(key, value) for key, value in body.items()}
            self._say(json.dumps(shown, indent=2, sort_keys=True))
        return self._answer(method, path)

    def _answer(self, method: str, path: str) -> Json:
        if path == "/v2/networks":
            return [{"id": "<default network id>", "label": "default", "default": True}]
        if path == "/v2/disk_images":
            return [{"id": f"<id of disk image {self._image}>", "name": self._image}]
        if path == "/v2/instances" and method == "GET":
            return {"page": 1, "pages": 1, "per_page": PAGE_SIZE, "items": []}
        if path == "/v2/firewalls" and method == "GET":
            return []
        if path == "/v2/firewalls":
            return {"id": "<firewall id>", "result": "success"}
        if path == "/v2/instances":
            return {"id": "<instance id>", "status": "BUILDING"}
        return {"result": "success"}


def _field(item: Json, key: str, call: str) -> str:
    """A string field of an API object, or a clear error."""
    value = item.get(key) if isinstance(item, dict) else None
    if not isinstance(value, str) or not value:
        raise CivoError(f"unexpected answer from the Civo API to {call}: no {key!r}")
    return value


def _list(answer: Json, call: str) -> list[dict[str, Json]]:
    if not isinstance(answer, list) or not all(isinstance(item, dict) for item in answer):
        raise CivoError(f"unexpected answer from the Civo API to {call}: not a list")
    return answer


class CivoClient:
    """Typed calls over a :class:`Transport`, all in one region."""

    def __init__(self, transport: Transport, region: str) -> None:
        self._transport = transport
        self.region = region

    async def _call(self, method: str, path: str, body: dict[str, Json] | None = None) -> Json:
        return await self._transport.call(method, path, {"region": self.region}, body)

    async def default_network(self) -> dict[str, Json]:
        """The region's default network.

        Raises:
            CivoError: the call failed, or the region has no default network.
        """
        networks = _list(await self._call("GET", "/v2/networks"), "GET /v2/networks")
        for network in networks:
            if network.get("default") is True:
                _field(network, "id", "GET /v2/networks")
                return network
        raise ExitNodeError(f"region {self.region} has no default network")

    async def disk_image(self, name: str) -> dict[str, Json]:
        """The disk image called ``name``.

        Raises:
            CivoError: the call failed.
            ExitNodeError: no image has that name (the message lists those that do exist).
        """
        images = _list(await self._call("GET", "/v2/disk_images"), "GET /v2/disk_images")
        for image in images:
            if image.get("name") == name:
                _field(image, "id", "GET /v2/disk_images")
                return image
        available = sorted(str(image.get("name")) for image in images if image.get("name"))
        raise ExitNodeError(
            f"region {self.region} has no disk image {name!r}; give --image with one of: "
            + (", ".join(available) or "(none listed)")
        )

    async def create_firewall(
        self, name: str, network_id: str, rules: list[dict[str, Json]]
    ) -> str:
        """Create a firewall with exactly ``rules`` (no default rules); return its id.

        Raises:
            CivoError: the call failed.
        """
        body = {
            "name": name,
            "region": self.region,
            "network_id": network_id,
            "create_rules": False,
            "rules": rules,
        }
        return _field(await self._call("POST", "/v2/firewalls", body), "id", "POST /v2/firewalls")

    async def firewalls(self) -> list[dict[str, Json]]:
        """Every firewall in the region.

        Raises:
            CivoError: the call failed.
        """
        return _list(await self._call("GET", "/v2/firewalls"), "GET /v2/firewalls")

    async def delete_firewall(self, firewall_id: str) -> None:
        """Delete a firewall.

        Raises:
            NotFound: it does not exist.
            CivoError: the call failed.
        """
        await self._call("DELETE", f"/v2/firewalls/{firewall_id}")

    async def create_instance(self, config: dict[str, Json]) -> dict[str, Json]:
        """Create an instance from ``config`` (hostname, size, template_id, ...).

        Raises:
            CivoError: the call failed.
        """
        answer = await self._call("POST", "/v2/instances", {"region": self.region, **config})
        _field(answer, "id", "POST /v2/instances")
        assert isinstance(answer, dict)
        return answer

    async def instance(self, instance_id: str) -> dict[str, Json]:
        """One instance.

        Raises:
            NotFound: it does not exist (any more).
            CivoError: the call failed.
        """
        call = f"GET /v2/instances/{instance_id}"
        answer = await self._call("GET", f"/v2/instances/{instance_id}")
        _field(answer, "id", call)
        assert isinstance(answer, dict)
        return answer

    async def instances(self) -> list[dict[str, Json]]:
        """Every instance in the region, all pages.

        Raises:
            CivoError: the call failed.
        """
        items: list[dict[str, Json]] = []
        page = 1
        while True:
            answer = await self._transport.call(
                "GET",
                "/v2/instances",
                {"region": self.region, "page": str(page), "per_page": str(PAGE_SIZE)},
                None,
            )
            if not isinstance(answer, dict):
                raise CivoError("unexpected answer from the Civo API to GET /v2/instances")
            items.extend(_list(answer.get("items", []), "GET /v2/instances"))
            pages = answer.get("pages")
            if not isinstance(pages, int) or page >= pages:
                return items
            page += 1

    async def delete_instance(self, instance_id: str) -> None:
        """Delete an instance (Civo removes it in the background).

        Raises:
            NotFound: it does not exist.
            CivoError: the call failed.
        """
        await self._call("DELETE", f"/v2/instances/{instance_id}")
