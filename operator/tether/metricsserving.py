"""``/metrics`` over plain HTTP, or over HTTPS for callers the API server vouches for.

Plain HTTP (the default) is prometheus_client's own server, as before. With
``--metrics-secure`` the endpoint follows the kubebuilder v4 convention:

- TLS with ``tls.crt`` and ``tls.key`` from ``--metrics-cert-dir`` (the layout of
  a cert-manager Certificate's Secret mounted as a volume). The kubelet rewrites
  a mounted Secret in place when the certificate renews; the files' stat is
  checked at most every :data:`RELOAD_CHECK_SECONDS` during handshakes and a new
  ``SSLContext`` is handed to the connection from the SNI callback (called on
  every handshake, with or without a server name), so a rotated certificate is
  presented without a restart. A half-written pair (new certificate, old key)
  fails to load and the previous context stays in use until the next check.
- Every request's bearer token is authenticated with a TokenReview and the user
  it names is authorised with a SubjectAccessReview for ``get`` on the
  non-resource URL ``/metrics`` (the ``metrics-reader`` ClusterRole grants it).
  Answers are cached by a hash of the token — allowed for
  :data:`ALLOWED_TTL`, refused for :data:`DENIED_TTL` — so a scrape every few
  seconds costs the API server two calls a minute per scraper, not two a scrape.
  401 without or with an unknown token, 403 when not allowed, 503 when the API
  server cannot be asked (never the metrics without an answer).

:class:`Authorizer` is the decision and its cache, with the reviews injected:
it does no I/O itself and is unit-tested with a fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import os
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tether import metrics

if TYPE_CHECKING:
    # Imported when serving securely only: the plain default loads neither
    # aiohttp's server nor the Kubernetes session.
    from aiohttp import web

    from tether.clients.kube.http import KubeHttp

log = logging.getLogger("tether.metrics")

#: How often, at most, the certificate files are checked for a change.
RELOAD_CHECK_SECONDS = 10.0
#: How long an allowed token is trusted without asking again.
ALLOWED_TTL = 60.0
#: How long a refused token (unauthenticated, or not allowed) stays refused.
DENIED_TTL = 10.0
#: Tokens remembered at most; the oldest answer goes first.
CACHE_SIZE = 1024
#: What the SubjectAccessReview asks about.
METRICS_PATH = "/metrics"
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    """How ``/metrics`` is served: plain, or secure with the certificate in ``cert_dir``."""

    secure: bool = False
    cert_dir: Path | None = None

    def problem(self) -> str | None:
        """Why these options cannot work, for a start-up error; ``None`` when they can."""
        if not self.secure:
            return None
        if self.cert_dir is None:
            return ("--metrics-secure needs --metrics-cert-dir DIR holding tls.crt and tls.key "
                    "(cert-manager, or any tool that writes a PEM certificate and key)")
        missing = [name for name in (CERT_FILE, KEY_FILE) if not (self.cert_dir / name).is_file()]
        if missing:
            return f"--metrics-cert-dir {self.cert_dir}: no {' or '.join(missing)} there"
        return None


_options = Options()


def configure(options: Options) -> None:
    """Set how the next :func:`serve` serves (``tether run`` calls it from its flags)."""
    global _options
    _options = options


def env_secure(env: Mapping[str, str] | None = None) -> bool:
    """``TETHER_METRICS_SECURE``: true for ``1``, ``true``, ``yes`` or ``on``."""
    env = os.environ if env is None else env
    return env.get("TETHER_METRICS_SECURE", "").strip().lower() in {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------- the decision


class Verdict(enum.Enum):
    """What one request gets, with its HTTP status."""

    ALLOWED = 200
    UNAUTHENTICATED = 401
    FORBIDDEN = 403
    UNAVAILABLE = 503


@dataclass(frozen=True)
class Identity:
    """The user a TokenReview found behind a token."""

    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: dict[str, list[str]] = field(default_factory=dict, hash=False, compare=False)


class ReviewUnavailable(Exception):
    """The API server could not be asked (unreachable, 5xx, or the operator may not ask)."""


#: TokenReview: the identity behind a token, ``None`` when the token is not valid.
Authenticate = Callable[[str], Awaitable[Identity | None]]
#: SubjectAccessReview: may this identity ``get`` ``/metrics``?
Authorize = Callable[[Identity], Awaitable[bool]]


class Authorizer:
    """Decides a request from its bearer token, and remembers recent decisions.

    The reviews are injected; they raise :class:`ReviewUnavailable` when the API
    server cannot answer, which is never cached (the next scrape asks again).
    Tokens are kept only as SHA-256 digests.
    """

    def __init__(
        self, authenticate: Authenticate, authorize: Authorize, *,
        allowed_ttl: float = ALLOWED_TTL, denied_ttl: float = DENIED_TTL, size: int = CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._authenticate = authenticate
        self._authorize = authorize
        self._allowed_ttl = allowed_ttl
        self._denied_ttl = denied_ttl
        self._size = size
        self._clock = clock
        self._cache: OrderedDict[str, tuple[Verdict, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._cache)

    async def decide(self, authorization: str | None) -> Verdict:
        """The verdict for a request with this ``Authorization`` header (or none)."""
        token = bearer_token(authorization)
        if token is None:
            return Verdict.UNAUTHENTICATED
        key = hashlib.sha256(token.encode()).hexdigest()
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None:
            verdict, expires = cached
            if now < expires:
                return verdict
            del self._cache[key]
        try:
            verdict = await self._review(token)
        except ReviewUnavailable as exc:
            log.warning("cannot review a /metrics request: %s", exc)
            return Verdict.UNAVAILABLE
        ttl = self._allowed_ttl if verdict is Verdict.ALLOWED else self._denied_ttl
        self._cache[key] = (verdict, self._clock() + ttl)
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return verdict

    async def _review(self, token: str) -> Verdict:
        identity = await self._authenticate(token)
        if identity is None:
            return Verdict.UNAUTHENTICATED
        return Verdict.ALLOWED if await self._authorize(identity) else Verdict.FORBIDDEN


def bearer_token(authorization: str | None) -> str | None:
    """The token of a ``Bearer`` header; ``None`` for none, another scheme, or an empty token."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


# --------------------------------------------------------------------------- the reviews


class KubeReviews:
    """TokenReview and SubjectAccessReview through the operator's Kubernetes session."""

    def __init__(self, http: KubeHttp) -> None:
        self._http = http

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        from tether.clients.kube.http import KubeError

        try:
            answer: dict[str, Any] = await self._http.post(path, body)
        except KubeError as exc:
            raise ReviewUnavailable(str(exc)) from exc
        return answer

    async def authenticate(self, token: str) -> Identity | None:
        review = await self._post("/apis/authentication.k8s.io/v1/tokenreviews", {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token},
        })
        status = review.get("status") or {}
        if not status.get("authenticated"):
            return None
        user = status.get("user") or {}
        return Identity(
            username=user.get("username", ""), uid=user.get("uid", ""),
            groups=tuple(user.get("groups") or ()), extra=dict(user.get("extra") or {}),
        )

    async def authorize(self, identity: Identity) -> bool:
        spec: dict[str, Any] = {
            "user": identity.username, "groups": list(identity.groups),
            "nonResourceAttributes": {"path": METRICS_PATH, "verb": "get"},
        }
        if identity.uid:
            spec["uid"] = identity.uid
        if identity.extra:
            spec["extra"] = identity.extra
        review = await self._post("/apis/authorization.k8s.io/v1/subjectaccessreviews", {
            "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec,
        })
        return bool((review.get("status") or {}).get("allowed"))


# --------------------------------------------------------------------------- certificates


class CertificateReloader:
    """The TLS context to serve with, rebuilt when ``tls.crt`` or ``tls.key`` changes on disk."""

    def __init__(
        self, cert_dir: Path, *, check_every: float = RELOAD_CHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cert = cert_dir / CERT_FILE
        self._key = cert_dir / KEY_FILE
        self._check_every = check_every
        self._clock = clock
        self._stamp = self._stat()
        # Raises at start-up on a bad pair: a clear error, not a server without TLS.
        self._current = self._build()
        self._checked = clock()
        #: The context given to the server: it only dispatches to the current one.
        self.context = self._build()
        self.context.sni_callback = self._on_hello

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        # stat() follows the kubelet's ..data symlink swap; the inode tells a
        # replaced file apart even within one mtime tick.
        stats = [os.stat(path) for path in (self._cert, self._key)]
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in stats)

    def _build(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self._cert, self._key)
        return context

    def current(self) -> ssl.SSLContext:
        """The context for a new connection, after a check of the files if one is due."""
        now = self._clock()
        if now - self._checked >= self._check_every:
            self._checked = now
            self._reload_if_changed()
        return self._current

    def _reload_if_changed(self) -> None:
        try:
            stamp = self._stat()
            if stamp == self._stamp:
                return
            context = self._build()
        except (OSError, ssl.SSLError) as exc:
            # Mid-rotation (one file replaced, not yet the other) or gone for a
            # moment: keep serving the last good pair, look again next time.
            log.warning("metrics certificate not reloaded, keeping the previous one: %s", exc)
            return
        self._stamp, self._current = stamp, context
        log.info("metrics certificate reloaded from %s", self._cert.parent)

    def _on_hello(self, sock: ssl.SSLObject | ssl.SSLSocket, _name: str | None,
                  _context: ssl.SSLContext) -> None:
        sock.context = self.current()


# --------------------------------------------------------------------------- the server


async def serve(port: int) -> None:
    """Serve ``/metrics`` on ``port`` as :func:`configure` said (plain by default).

    The secure server runs on this event loop until the loop ends; a bad
    certificate directory is an error here, at start-up.
    """
    options = _options
    if not options.secure:
        metrics.serve(port)
        return
    problem = options.problem()
    if problem:
        raise ValueError(problem)
    assert options.cert_dir is not None
    from tether.clients.kube.http import KubeHttp

    reloader = CertificateReloader(options.cert_dir)
    http = KubeHttp()
    reviews = KubeReviews(http)
    runner = await _start(port, reloader.context, Authorizer(reviews.authenticate, reviews.authorize))
    log.info("serving /metrics over HTTPS on port %d (TokenReview and SubjectAccessReview)", port)
    _keepers.add(asyncio.get_running_loop().create_task(_keep(runner, http), name="metrics-https"))


# Strong references to the keeper tasks (the loop keeps only weak ones).
_keepers: set[asyncio.Task[None]] = set()


async def _keep(runner: web.AppRunner, http: KubeHttp) -> None:
    """Hold the server until the loop ends (the task is cancelled), then close it."""
    try:
        await asyncio.Event().wait()
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()
        with contextlib.suppress(Exception):
            await http.close()


async def _start(port: int, context: ssl.SSLContext, authorizer: Authorizer) -> web.AppRunner:
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    async def handle(request: web.Request) -> web.Response:
        verdict = await authorizer.decide(request.headers.get("Authorization"))
        if verdict is Verdict.ALLOWED:
            return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})
        headers = {"WWW-Authenticate": 'Bearer realm="tether"'} if verdict is Verdict.UNAUTHENTICATED else {}
        return web.Response(status=verdict.value, text=verdict.name.lower() + "\n", headers=headers)

    app = web.Application()
    app.router.add_get(METRICS_PATH, handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, port=port, ssl_context=context).start()
    return runner
