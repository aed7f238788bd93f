"""Token authentication with roles, for every face of the service.

A client sends ``authorization: Bearer <token>``; ``serve.tokens`` maps each token to a role:

- ``fleet``: Triage, TriageStream, Report, GetProfile, Stats, and every call of the Open Inference
  Protocol (``inference.GRPCInferenceService``).
- ``reviewer``: SubmitVerdicts, GetProfile, Stats.
- ``admin``: everything, ReloadProfile included.

``grpc.health.v1``, server reflection and the inference protocol's health probes (ServerLive,
ServerReady, ModelReady: what Kubernetes and KServe probe without credentials) answer without a
token. A call without a token, or with
one the server does not know, ends UNAUTHENTICATED; a known token whose role does not cover the
call ends PERMISSION_DENIED; both messages say what was expected. No tokens configured: no
authentication (the server logs it at start).

The gRPC port uses :class:`AuthInterceptor`; other faces call :meth:`Authorizer.check` with the
``triage.v1`` method a call stands for. The Flight face (flight_server.py) takes it as is::

    authorizer = Authorizer(config.tokens)
    start_flight_server(service, config, authorize=authorizer.check)
    # in a handler: authorizer.check(token, "/triage.v1.Triage/SubmitVerdicts") -> "reviewer",
    # or raises Unauthenticated / PermissionDenied, whose ``code`` is the grpc.StatusCode

``Authorizer({})`` (no tokens) lets every call through: ``check`` returns None.

A token may be bound to a reviewer and to tiers (``[serve.tokens]`` entry ``{role = "reviewer",
reviewer = "ana", tiers = ["expert"]}``): then a verdict it submits that names another reviewer,
or a tier not listed, is PERMISSION_DENIED (:meth:`Authorizer.check_verdicts`, asked by
SubmitVerdicts and Flight's ``verdicts`` exchange), and nothing of that submission is stored.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from .config import TokenGrant

logger = logging.getLogger(__name__)

FLEET, REVIEWER, ADMIN = "fleet", "reviewer", "admin"
TRIAGE = "/triage.v1.Triage/"
INFERENCE = "/inference.GRPCInferenceService/"

# Calls anyone may make, token or not (a name ending in "/" covers every method of that service).
EXEMPT: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
    INFERENCE + "ServerLive",
    INFERENCE + "ServerReady",
    INFERENCE + "ModelReady",
)

# Who may call what besides admin, who may call everything; a call listed nowhere is admin's only.
ALLOWED: dict[str, frozenset[str]] = {
    TRIAGE + "Triage": frozenset({FLEET}),
    TRIAGE + "TriageStream": frozenset({FLEET}),
    TRIAGE + "Report": frozenset({FLEET}),
    TRIAGE + "SubmitVerdicts": frozenset({REVIEWER}),
    TRIAGE + "GetProfile": frozenset({FLEET, REVIEWER}),
    TRIAGE + "Stats": frozenset({FLEET, REVIEWER}),
    INFERENCE: frozenset({FLEET}),
}


class AuthError(Exception):
    """A call the tokens do not allow; ``code`` is the gRPC status it ends with."""

    code = grpc.StatusCode.UNAUTHENTICATED


class Unauthenticated(AuthError):
    """No token, a malformed header, or a token the server does not know."""


class PermissionDenied(AuthError):
    code = grpc.StatusCode.PERMISSION_DENIED


def _matches(method: str, names: Iterable[str]) -> str | None:
    for name in names:
        if method == name or (name.endswith("/") and method.startswith(name)):
            return name
    return None


def roles_for(method: str) -> frozenset[str] | None:
    """The roles allowed to call ``method`` (a full gRPC name, ``/package.Service/Method``); None
    when it is exempt (no token needed)."""
    if _matches(method, EXEMPT):
        return None
    name = _matches(method, ALLOWED)
    return (ALLOWED[name] if name is not None else frozenset()) | {ADMIN}


def bearer_token(value) -> str | None:
    """The token of an ``authorization`` header value (``Bearer <token>``); a list of values (as
    Flight gives) uses the first. None when absent; "" when present but not a bearer token."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else ""


def _digest(token: str) -> bytes:
    # Tokens are looked up by their SHA-256, so the time a lookup takes says nothing about a token.
    return hashlib.sha256(token.encode()).digest()


class Authorizer:
    """``Authorizer(tokens)`` with ``tokens`` {token: role}. ``check(token, method)`` returns the
    caller's role (None when the call is exempt or no tokens are configured) or raises
    :class:`Unauthenticated` / :class:`PermissionDenied`."""

    def __init__(self, tokens: Mapping[str, object]):
        self._grants = {_digest(token): _grant(entry) for token, entry in tokens.items()}
        self._roles = {key: grant.role for key, grant in self._grants.items()}

    @property
    def enabled(self) -> bool:
        return bool(self._roles)

    def check(self, token: str | None, method: str) -> str | None:
        if not self._roles:
            return None
        allowed = roles_for(method)
        if allowed is None:
            return None
        if token is None:
            raise Unauthenticated(f"{method}: expected metadata 'authorization: Bearer <token>', found none")
        if not token:
            raise Unauthenticated(f"{method}: expected metadata 'authorization: Bearer <token>', "
                                  "found an authorization value of another form")
        role = self._roles.get(_digest(token))
        if role is None:
            raise Unauthenticated(f"{method}: expected a token listed in serve.tokens, found an unknown one")
        if role not in allowed:
            wanted = [r for r in (FLEET, REVIEWER, ADMIN) if r in allowed]
            raise PermissionDenied(f"{method}: expected a token of role {' or '.join(wanted)}, "
                                   f"found one of role {role}")
        return role


    def check_verdicts(self, token: str | None, verdicts) -> None:
        """Refuse (PermissionDenied) verdicts naming a reviewer or a tier the token is not bound
        to; tokens without a binding (and no tokens at all) may name any."""
        if not self._grants or token is None:
            return
        grant = self._grants.get(_digest(token))
        if grant is None or (not grant.reviewer and not grant.tiers):
            return
        names = verdicts.schema.names
        for column, allowed in (("reviewer", [grant.reviewer] if grant.reviewer else []), ("tier", list(grant.tiers))):
            if not allowed or column not in names:
                continue
            values = verdicts.column(column).to_pylist()
            for row, value in enumerate(values):
                if value not in allowed:
                    raise PermissionDenied(f"verdicts: expected {column} {' or '.join(map(repr, allowed))} (the ones "
                                           f"this token holds), found {value!r} in row {row}; nothing stored")


def _grant(entry) -> "TokenGrant":
    from .config import TokenGrant

    return entry if isinstance(entry, TokenGrant) else TokenGrant(role=str(entry))


def metadata_token(metadata) -> str | None:
    """The bearer token of a gRPC call's metadata (None: none)."""
    return _metadata_token(metadata)


def _metadata_token(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return bearer_token(value)
    return None


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses, before the handler runs, every call that ``authorizer`` does not allow."""

    def __init__(self, authorizer: Authorizer):
        self.authorizer = authorizer

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not self.authorizer.enabled:
            return handler
        try:
            self.authorizer.check(_metadata_token(handler_call_details.invocation_metadata),
                                  handler_call_details.method)
        except AuthError as exc:
            return _refusing(handler, exc.code, str(exc))
        return handler


def _refusing(handler, code: grpc.StatusCode, message: str):
    """A handler of the same kind as ``handler`` that ends the call with ``code``."""

    def refuse(request_or_iterator, context):
        context.abort(code, message)

    kind = (handler.request_streaming, handler.response_streaming)
    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}[kind]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def log_mode(tokens: Mapping[str, object]) -> None:
    """One line at start: whether calls need a token, and how many of each role exist."""
    if not tokens:
        logger.warning("authentication: off (serve.tokens is empty): every call is allowed")
        return
    roles = [_grant(entry).role for entry in tokens.values()]
    counts = {role: sum(1 for r in roles if r == role) for role in (FLEET, REVIEWER, ADMIN)}
    logger.info("authentication: bearer tokens (%s); health and reflection exempt",
                ", ".join(f"{n} {role}" for role, n in counts.items()))


def server_credentials(config) -> grpc.ServerCredentials | None:
    """TLS for the gRPC port from ``config.tls_cert`` / ``config.tls_key`` (PEM files: the
    certificate chain and its private key); None (plain TCP) when they are not set. With
    ``config.tls_client_ca`` every client must present a certificate that CA signed (mutual TLS)."""
    if not config.tls_cert:
        return None
    with open(config.tls_cert, "rb") as cert, open(config.tls_key, "rb") as key:
        chain, private_key = cert.read(), key.read()
    client_ca = client_ca_pem(config)
    logger.info("TLS: gRPC port with certificate %s%s", config.tls_cert,
                f"; client certificates signed by {config.tls_client_ca} required" if client_ca else "")
    return grpc.ssl_server_credentials([(private_key, chain)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def client_ca_pem(config) -> bytes | None:
    """The PEM bytes of ``config.tls_client_ca`` (None: client certificates not asked for)."""
    if not getattr(config, "tls_client_ca", ""):
        return None
    with open(config.tls_client_ca, "rb") as handle:
        return handle.read()
