"""Which environment an argument names."""

from __future__ import annotations

import pytest

from server.classify.env import classify_env


@pytest.mark.parametrize(
    "text", ["prod-db.internal", "DATABASE=production", "orders_prod", "deploy to PROD", "eu-prd-1"]
)
def test_production_is_named(text: str) -> None:
    assert classify_env([text], [])["prod"]


@pytest.mark.parametrize("text", ["products", "preprod-db", "reproduce", "productivity", "staging.example.com"])
def test_lookalikes_are_not_production(text: str) -> None:
    assert not classify_env([text], [])["prod"]


def test_environment_names_are_collected() -> None:
    f = classify_env(["staging-db", "dev box", "stage"], [])
    assert f["names"] == ["staging", "development"]


def test_a_declared_environment_argument_is_read_as_a_name() -> None:
    f = classify_env([], ["Production"])
    assert f["prod"] and f["declared"] == ["Production"]
    assert classify_env([], ["live"])["prod"]
