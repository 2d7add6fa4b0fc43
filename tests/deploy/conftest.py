"""Fixtures for the deploy tests: fake commands, a node's secrets, the fake Civo API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from homeport.exitnode.material import NodeSecrets, generate_secrets
from tests.deploy.fakecivo import FakeCivo, start_fake_civo
from tests.deploy.helpers import FakeBin, make_fakebin


@pytest.fixture
def fakebin(tmp_path: Path) -> FakeBin:
    return make_fakebin(tmp_path / "fakebin")


@pytest.fixture(scope="session")
def secrets() -> NodeSecrets:
    return generate_secrets("test")


@pytest.fixture
async def fake_civo() -> AsyncIterator[FakeCivo]:
    fake = FakeCivo()
    runner = await start_fake_civo(fake)
    try:
        yield fake
    finally:
        await runner.cleanup()
