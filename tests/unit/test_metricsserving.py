"""The ``/metrics`` authorisation decision and its cache, with fake reviews (no server, no API).

The HTTPS server, the real reviews and certificate rotation are tested end to end in
``tests/e2e/test_metrics_auth.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tether import metricsserving
from tether.metricsserving import (
    Authorizer,
    Identity,
    Options,
    ReviewUnavailable,
    Verdict,
    bearer_token,
)


class FakeReviews:
    """Tokens the fake API server knows, who they are and whether they may read /metrics."""

    def __init__(self) -> None:
        self.users = {"reader-token": Identity("reader", groups=("team",)),
                      "other-token": Identity("other")}
        self.allowed = {"reader"}
        self.down = False
        self.token_reviews = 0
        self.access_reviews = 0

    async def authenticate(self, token: str) -> Identity | None:
        self.token_reviews += 1
        if self.down:
            raise ReviewUnavailable("connection refused")
        return self.users.get(token)

    async def authorize(self, identity: Identity) -> bool:
        self.access_reviews += 1
        if self.down:
            raise ReviewUnavailable("connection refused")
        return identity.username in self.allowed


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def reviews() -> FakeReviews:
    return FakeReviews()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def authorizer(reviews: FakeReviews, clock: Clock, **kwargs: float) -> Authorizer:
    return Authorizer(reviews.authenticate, reviews.authorize, clock=clock,
                      allowed_ttl=60, denied_ttl=10, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("header, token", [
    (None, None), ("", None), ("Bearer", None), ("Bearer   ", None), ("Basic dXNlcg==", None),
    ("Bearer abc", "abc"), ("bearer abc", "abc"), ("  Bearer  abc  ", "abc"),
])
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


async def test_verdicts(reviews: FakeReviews, clock: Clock) -> None:
    auth = authorizer(reviews, clock)
    assert await auth.decide(None) is Verdict.UNAUTHENTICATED
    assert await auth.decide("Basic x") is Verdict.UNAUTHENTICATED
    assert await auth.decide("Bearer nobody-knows-me") is Verdict.UNAUTHENTICATED
    assert await auth.decide("Bearer other-token") is Verdict.FORBIDDEN
    assert await auth.decide("Bearer reader-token") is Verdict.ALLOWED
    # No token: no review at all; an unknown token: no SubjectAccessReview.
    assert reviews.token_reviews == 3
    assert reviews.access_reviews == 2
    assert [v.value for v in Verdict] == [200, 401, 403, 503]


async def test_allowed_is_cached_for_its_ttl(reviews: FakeReviews, clock: Clock) -> None:
    auth = authorizer(reviews, clock)
    for _ in range(5):
        assert await auth.decide("Bearer reader-token") is Verdict.ALLOWED
        clock.now += 11  # past the denied TTL, within the allowed one
    assert (reviews.token_reviews, reviews.access_reviews) == (1, 1)
    clock.now += 10  # 65 s after the first review
    reviews.allowed.clear()  # the binding was removed meanwhile
    assert await auth.decide("Bearer reader-token") is Verdict.FORBIDDEN
    assert (reviews.token_reviews, reviews.access_reviews) == (2, 2)


async def test_refusals_are_cached_shorter(reviews: FakeReviews, clock: Clock) -> None:
    auth = authorizer(reviews, clock)
    assert await auth.decide("Bearer other-token") is Verdict.FORBIDDEN
    assert await auth.decide("Bearer unknown") is Verdict.UNAUTHENTICATED
    clock.now += 9
    reviews.allowed.add("other")
    reviews.users["unknown"] = Identity("reader")
    assert await auth.decide("Bearer other-token") is Verdict.FORBIDDEN
    assert await auth.decide("Bearer unknown") is Verdict.UNAUTHENTICATED
    assert reviews.token_reviews == 2
    clock.now += 2
    assert await auth.decide("Bearer other-token") is Verdict.ALLOWED
    assert await auth.decide("Bearer unknown") is Verdict.ALLOWED
    assert reviews.token_reviews == 4


async def test_unavailable_is_503_and_never_cached(reviews: FakeReviews, clock: Clock) -> None:
    auth = authorizer(reviews, clock)
    reviews.down = True
    assert await auth.decide("Bearer reader-token") is Verdict.UNAVAILABLE
    assert await auth.decide("Bearer reader-token") is Verdict.UNAVAILABLE
    assert reviews.token_reviews == 2 and len(auth) == 0
    reviews.down = False
    assert await auth.decide("Bearer reader-token") is Verdict.ALLOWED


async def test_unavailable_authorization_is_503(reviews: FakeReviews, clock: Clock) -> None:
    """Authenticated, but the SubjectAccessReview fails: still no metrics."""
    async def down(_identity: Identity) -> bool:
        raise ReviewUnavailable("503 Service Unavailable")

    auth = Authorizer(reviews.authenticate, down, clock=clock)
    assert await auth.decide("Bearer reader-token") is Verdict.UNAVAILABLE
    assert len(auth) == 0


async def test_cache_is_bounded_oldest_first(reviews: FakeReviews, clock: Clock) -> None:
    auth = authorizer(reviews, clock, size=3)
    for n in range(5):
        reviews.users[f"t{n}"] = Identity("reader")
        assert await auth.decide(f"Bearer t{n}") is Verdict.ALLOWED
    assert len(auth) == 3
    before = reviews.token_reviews
    assert await auth.decide("Bearer t4") is Verdict.ALLOWED  # still cached
    assert reviews.token_reviews == before
    assert await auth.decide("Bearer t0") is Verdict.ALLOWED  # evicted: asked again
    assert reviews.token_reviews == before + 1


async def test_tokens_are_kept_only_as_digests(reviews: FakeReviews, clock: Clock) -> None:
    auth = authorizer(reviews, clock)
    await auth.decide("Bearer reader-token")
    assert "reader-token" not in repr(vars(auth))


def test_options(tmp_path: Path) -> None:
    assert Options().problem() is None
    assert "--metrics-cert-dir" in (Options(secure=True).problem() or "")
    (tmp_path / "tls.crt").write_text("x")
    assert "tls.key" in (Options(secure=True, cert_dir=tmp_path).problem() or "")
    (tmp_path / "tls.key").write_text("x")
    assert Options(secure=True, cert_dir=tmp_path).problem() is None


@pytest.mark.parametrize("value, secure", [
    ("true", True), ("1", True), ("TRUE", True), ("yes", True),
    ("", False), ("false", False), ("0", False),
])
def test_env_secure(value: str, secure: bool) -> None:
    assert metricsserving.env_secure({"TETHER_METRICS_SECURE": value}) is secure


def test_run_refuses_secure_metrics_without_certificates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tether import cli

    with pytest.raises(SystemExit) as exited:
        cli.main(["run", "--metrics-secure", "--metrics-port", "8443"])
    assert exited.value.code == 2
    assert "--metrics-secure needs --metrics-cert-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["run", "--metrics-secure", "--metrics-cert-dir", str(tmp_path)])
    assert "no tls.crt or tls.key" in capsys.readouterr().err
