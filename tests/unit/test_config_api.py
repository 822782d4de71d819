"""``api.configs.parse``: one spec for EtcdConfig and ConsulConfig, two key shapes.

The kinds differ only in the prefix: etcd keys start with ``/``, Consul KV
keys do not. Everything else (data, from, prune, adopt, deletionPolicy) is
validated the same way for both.
"""

from __future__ import annotations

from typing import Any

import pytest

from tether.api import InvalidSpec
from tether.api import configs as api

FLAVORS = {"etcd": api.ETCD, "consul": api.CONSUL}


@pytest.fixture(params=sorted(FLAVORS))
def flavor(request: pytest.FixtureRequest) -> api.Flavor:
    return FLAVORS[request.param]


def prefix(flavor: api.Flavor, path: str) -> str:
    return "/" + path if flavor.rooted else path


def test_the_flavors() -> None:
    assert (api.ETCD.kind, api.ETCD.plural, api.ETCD.store) == ("EtcdConfig", "etcdconfigs", "etcd")
    consul = (api.CONSUL.kind, api.CONSUL.plural, api.CONSUL.store)
    assert consul == ("ConsulConfig", "consulconfigs", "Consul KV")
    assert (api.ETCD.revision_field, api.CONSUL.revision_field) == ("revision", "modifyIndex")
    assert api.ETCD.rooted and not api.CONSUL.rooted


def test_a_full_spec(flavor: api.Flavor) -> None:
    spec = api.parse(
        {
            "prefix": prefix(flavor, "shop/payments/"),
            "data": {"b": "2", "a/x": "1"},
            "from": [{"configMapRef": {"name": "cm"}}, {"secretRef": {"name": "s", "optional": True}}],
            "prune": False, "adopt": True, "deletionPolicy": "Orphan",
        },
        flavor,
    )
    assert spec.data == (("a/x", "1"), ("b", "2"))
    assert spec.sources == (api.Source("configMap", "cm"), api.Source("secret", "s", optional=True))
    assert (spec.prune, spec.adopt, spec.deletion_policy) == (False, True, "Orphan")
    assert spec.full_key("a/x") == prefix(flavor, "shop/payments/a/x")


def test_defaults(flavor: api.Flavor) -> None:
    spec = api.parse({"prefix": prefix(flavor, "app")}, flavor)
    assert (spec.data, spec.sources) == ((), ())
    assert (spec.prune, spec.adopt, spec.deletion_policy) == (True, False, "Delete")
    assert spec.full_key("k") == prefix(flavor, "app/k")


def test_the_etcd_root_is_a_prefix_and_consuls_is_not() -> None:
    assert api.parse({"prefix": "/"}, api.ETCD).full_key("k") == "/k"
    with pytest.raises(InvalidSpec, match="without a leading '/'"):
        api.parse({"prefix": "/"}, api.CONSUL)


@pytest.mark.parametrize(
    ("raw", "flavor_name", "message"),
    [
        ("app", "etcd", "starting with '/'"),
        ("/app", "consul", "without a leading '/'"),
        ("", "consul", "non-empty"),
        ("", "etcd", "starting with '/'"),
    ],
)
def test_the_prefix_has_its_stores_shape(raw: str, flavor_name: str, message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        api.parse({"prefix": raw}, FLAVORS[flavor_name])


@pytest.mark.parametrize("path", ["app//x", "app/./x", "app/..", "./app", "app/../etc"])
def test_prefixes_with_empty_or_dot_segments_are_invalid(flavor: api.Flavor, path: str) -> None:
    with pytest.raises(InvalidSpec, match=r"empty, '\.' or '\.\.' segment"):
        api.parse({"prefix": prefix(flavor, path)}, flavor)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"prefix": 5}, "must be a string"),
        ({"data": ["a"]}, "map of relative key"),
        ({"data": {"": "v"}}, "is empty"),
        ({"data": {"/a": "v"}}, "starts with '/'"),
        ({"data": {"a//b": "v"}}, "empty segment"),
        ({"data": {"a/": "v"}}, "empty segment"),
        ({"data": {"a/../b": "v"}}, "'..' segment"),
        ({"data": {"a": 1}}, "value must be a string"),
        ({"from": {"configMapRef": {"name": "x"}}}, "must be a list"),
        ({"from": ["x"]}, "must be an object"),
        ({"from": [{}]}, "exactly one of configMapRef, secretRef"),
        ({"from": [{"configMapRef": {"name": "a"}, "secretRef": {"name": "b"}}]}, "exactly one"),
        ({"from": [{"secretRef": {"name": ""}}]}, r"spec.from\[0\].secretRef.name: required"),
        ({"deletionPolicy": "Keep"}, "Delete or Orphan"),
    ],
)
def test_invalid_specs_name_the_field(flavor: api.Flavor, spec: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        api.parse({"prefix": prefix(flavor, "app"), **spec}, flavor)


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("a", None), ("a/b.c/d", None), ("..a", None), ("", "is empty"),
        ("/a", "starts with '/' (relative keys are joined to the prefix)"),
        ("a//b", "has an empty segment ('//' or a trailing '/')"), (".", "has a '.' segment"),
    ],
)
def test_key_problem(key: str, problem: str | None) -> None:
    assert api.key_problem(key) == problem


def test_join_drops_one_trailing_slash_of_the_prefix() -> None:
    assert api.join("shop/payments/", "db/host") == "shop/payments/db/host"
    assert api.join("/app", "k") == "/app/k"
