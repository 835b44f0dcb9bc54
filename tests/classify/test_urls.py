"""URL and host classification: where a request would really go."""

from __future__ import annotations

import pytest

from server.classify.urls import classify_urls


def test_a_public_https_url() -> None:
    f = classify_urls(["https://api.github.com/repos/x"], [])
    assert f["hosts"] == ["api.github.com"] and f["schemes"] == ["https"] and f["ports"] == [443]
    assert not f["private"] and not f["insecure"] and not f["unparseable"]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/",
        "http://localhost/admin",
        "http://[::1]/",
        "http://10.1.2.3/",
        "http://192.168.0.1/",
        "http://2130706433/",  # 127.0.0.1 as one decimal number
        "http://0x7f.1/",
        "http://[::ffff:127.0.0.1]/",
        "http://db.internal/",
        "http://intranet/",
    ],
)
def test_internal_destinations_are_private(url: str) -> None:
    assert classify_urls([url], [])["private"], url


def test_the_metadata_endpoint_is_named() -> None:
    f = classify_urls(["http://169.254.169.254/latest/meta-data/"], [])
    assert f["metadata_endpoint"] and f["private"]


def test_credentials_in_a_url_are_noticed() -> None:
    assert classify_urls(["https://user:pw@example.com/"], [])["credentials"]


@pytest.mark.parametrize("url", ["not a url", "http://", "https://exa mple.com/", "http://[::1/", "http://x:99999/", 7])
def test_bad_urls_are_unparseable_not_exceptions(url: object) -> None:
    f = classify_urls([url], [])
    assert f["unparseable"] and f["errors"]


def test_hosts_given_bare_with_a_port() -> None:
    f = classify_urls([], ["DB.Example.com:5432", "10.0.0.1"])
    assert f["hosts"] == ["db.example.com", "10.0.0.1"] and f["ports"] == [5432]
    assert f["private"]


@pytest.mark.parametrize(
    "url",
    [
        "http://017700000001/", "http://0x7f000001/", "http://127.1/", "http://127.0.0.1./", "http://0.0.0.0/",
        "http://0/", "http://[::]/", "http://[0:0:0:0:0:0:0:1]/", "http://[::ffff:7f00:1]/", "http://[::127.0.0.1]/",
        "http://[64:ff9b::7f00:1]/", "http://[2002:7f00:1::]/", "http://LOCALHOST./",
    ],
)
def test_every_spelling_of_this_machine_is_loopback(url: str) -> None:
    f = classify_urls([url], [])
    assert f["loopback"] and f["private"] and not f["unparseable"], url


@pytest.mark.parametrize(
    "url",
    [
        "http://100.64.0.1/", "http://224.0.0.1/", "http://240.0.0.1/", "http://[fc00::1]/", "http://[fe80::1]/",
        "http://[ff02::1]/", "http://[::ffff:10.0.0.1]/", "http://172.31.255.255/", "http://192.0.2.1/",
    ],
)
def test_internal_and_reserved_addresses_are_private(url: str) -> None:
    f = classify_urls([url], [])
    assert f["private"] and not f["loopback"], url


@pytest.mark.parametrize(
    "url", ["http://[fd00:ec2::254]/", "http://100.100.100.200/", "http://0xa9fea9fe/", "http://[::ffff:a9fe:a9fe]/"]
)
def test_metadata_endpoints_in_any_spelling(url: str) -> None:
    f = classify_urls([url], [])
    assert f["metadata_endpoint"] and f["private"], url


@pytest.mark.parametrize("url", ["https://8.8.8.8/", "https://[2606:4700::1111]/", "https://[::ffff:8.8.8.8]/"])
def test_public_addresses_are_not_private(url: str) -> None:
    f = classify_urls([url], [])
    assert not f["private"] and not f["loopback"] and not f["metadata_endpoint"], url


def test_a_numeric_host_that_is_no_address_is_unparseable() -> None:
    f = classify_urls(["http://999.1.1.1/"], [])
    assert f["unparseable"] and "not a valid IPv4" in f["errors"][0]
