"""Shared fixtures and the markers' skip rules."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    sd = os.environ.get("SD_SCRIPTS_DIR")
    for item in items:
        if "sd_scripts" in item.keywords and not sd:
            item.add_marker(
                pytest.mark.skip(reason="set SD_SCRIPTS_DIR to an sd-scripts checkout to run this")
            )
