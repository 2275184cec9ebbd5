#!/usr/bin/env python3
"""Independent OAuth 2.0 client for Portcullis end-to-end tests.

Uses authlib (OAuth2Session) for the OAuth exchanges and pyjwt for access
token verification, so that the Rust server is checked against third-party
implementations rather than against itself.

Every invocation prints exactly one JSON object on stdout. On failure the
object is {"error": "...", "detail": ..., ["status": <http status>]} and the
exit code is 1.

Subcommands:
  token       client_credentials grant   -> {"token_response": {...}, "discovery": {...}}
  verify      verify a JWT access token  -> {"header": {...}, "claims": {...}}
  introspect  RFC 7662 introspection     -> {<introspection response>..., "status": N}
  revoke      RFC 7009 revocation        -> {"status": N}
"""

import argparse
import json
import sys

import jwt
import requests
from authlib.integrations.requests_client import OAuth2Session

AUTH_METHODS = ("client_secret_basic", "client_secret_post")
ACCESS_TOKEN_TYPES = ("at+jwt", "application/at+jwt")


class Failure(Exception):
    """A failure to report as {"error": ..., "detail": ..., "status": ...}."""

    def __init__(self, error, detail=None, status=None):
        super().__init__(error)
        self.error = error
        self.detail = detail
        self.status = status

    def to_json(self):
        out = {"error": self.error, "detail": self.detail}
        if self.status is not None:
            out["status"] = self.status
        return out


def emit(obj, code=0):
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()
    sys.exit(code)


def response_json(resp):
    try:
        return resp.json()
    except ValueError:
        return None


def error_from_response(resp, default_error="http_error"):
    body = response_json(resp)
    if isinstance(body, dict) and "error" in body:
        return Failure(str(body["error"]), body.get("error_description"), resp.status_code)
    return Failure(default_error, resp.text[:2000], resp.status_code)


def discover(issuer, timeout):
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    try:
        resp = requests.get(url, timeout=timeout, headers={"Accept": "application/json"})
    except requests.RequestException as e:
        raise Failure("discovery_failed", f"GET {url}: {e}")
    if resp.status_code != 200:
        raise Failure("discovery_failed", f"GET {url}: HTTP {resp.status_code}: {resp.text[:2000]}",
                      resp.status_code)
    doc = response_json(resp)
    if not isinstance(doc, dict):
        raise Failure("discovery_failed", f"GET {url}: body is not a JSON object", resp.status_code)
    if doc.get("issuer") != issuer:
        raise Failure("issuer_mismatch",
                      f"discovery issuer {doc.get('issuer')!r} != expected {issuer!r}")
    return doc


def endpoint(doc, name):
    value = doc.get(name)
    if not isinstance(value, str) or not value:
        raise Failure("discovery_failed", f"discovery document has no {name}")
    return value


def make_session(args, scope=None):
    """OAuth2Session recording the last HTTP response it received."""
    sess = OAuth2Session(
        client_id=args.client_id,
        client_secret=args.client_secret,
        scope=scope,
        token_endpoint_auth_method=args.auth,
        # authlib uses revocation_endpoint_auth_method for introspection too.
        revocation_endpoint_auth_method=args.auth,
        default_timeout=args.timeout,
    )
    sess.last_response = None

    def record(resp, *_a, **_kw):
        sess.last_response = resp
        return resp

    sess.hooks["response"].append(record)
    return sess


def last_status(sess):
    resp = getattr(sess, "last_response", None)
    return resp.status_code if resp is not None else None


def oauth_call(sess, fn):
    """Run an authlib call, turning its exceptions into Failure."""
    try:
        return fn()
    except Failure:
        raise
    except requests.HTTPError as e:
        if e.response is not None:
            raise error_from_response(e.response)
        raise Failure("http_error", str(e), last_status(sess))
    except requests.RequestException as e:
        raise Failure("request_failed", str(e), last_status(sess))
    except Exception as e:  # authlib OAuthError and friends
        error = getattr(e, "error", None)
        if error:
            raise Failure(str(error), getattr(e, "description", None) or str(e), last_status(sess))
        raise Failure("client_error", f"{type(e).__name__}: {e}", last_status(sess))


# ------------------------------------------------------------------ commands


def cmd_token(args):
    doc = discover(args.issuer, args.timeout)
    token_endpoint = endpoint(doc, "token_endpoint")
    sess = make_session(args, scope=args.scope)
    extra = {}
    if args.resource:
        extra["resource"] = args.resource
    token = oauth_call(sess, lambda: sess.fetch_token(
        token_endpoint, grant_type="client_credentials", **extra))
    # Report the server's raw response (authlib adds fields such as expires_at).
    raw = response_json(sess.last_response) if sess.last_response is not None else None
    if not isinstance(raw, dict):
        raw = dict(token)
    return {"token_response": raw, "discovery": doc}


def cmd_verify(args):
    doc = discover(args.issuer, args.timeout)
    jwks_uri = endpoint(doc, "jwks_uri")
    try:
        header = jwt.get_unverified_header(args.token)
    except jwt.PyJWTError as e:
        raise Failure("invalid_token", f"{type(e).__name__}: {e}")
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() not in ACCESS_TOKEN_TYPES:
        raise Failure("invalid_token", f"JWT header typ is {typ!r}, expected 'at+jwt' (RFC 9068)")
    try:
        key = jwt.PyJWKClient(jwks_uri, timeout=args.timeout).get_signing_key_from_jwt(args.token)
    except jwt.PyJWKClientError as e:
        raise Failure("jwks_error", f"{type(e).__name__}: {e}")
    except jwt.PyJWTError as e:
        raise Failure("invalid_token", f"{type(e).__name__}: {e}")
    try:
        claims = jwt.decode(
            args.token,
            key.key,
            algorithms=[args.alg],
            audience=args.audience,
            issuer=args.issuer,
            options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"]},
        )
    except jwt.PyJWTError as e:
        raise Failure("invalid_token", f"{type(e).__name__}: {e}")
    return {"header": header, "claims": claims}


def cmd_introspect(args):
    doc = discover(args.issuer, args.timeout)
    url = endpoint(doc, "introspection_endpoint")
    sess = make_session(args)
    resp = oauth_call(sess, lambda: sess.introspect_token(url, token=args.token))
    if resp.status_code >= 400:
        raise error_from_response(resp)
    body = response_json(resp)
    if not isinstance(body, dict):
        raise Failure("invalid_response", f"introspection body is not a JSON object: {resp.text[:2000]}",
                      resp.status_code)
    out = dict(body)
    out["status"] = resp.status_code
    return out


def cmd_revoke(args):
    doc = discover(args.issuer, args.timeout)
    url = endpoint(doc, "revocation_endpoint")
    sess = make_session(args)
    resp = oauth_call(sess, lambda: sess.revoke_token(url, token=args.token))
    if resp.status_code >= 400:
        raise error_from_response(resp)
    return {"status": resp.status_code}


# ---------------------------------------------------------------------- CLI


class JsonArgumentParser(argparse.ArgumentParser):
    """Report usage errors as a JSON object (exit 1) like any other failure."""

    def error(self, message):
        emit({"error": "usage", "detail": message}, 1)


def build_parser():
    common = JsonArgumentParser(add_help=False)
    common.add_argument("--issuer", required=True, help="issuer URL (must match discovery)")
    common.add_argument("--timeout", type=float, default=10.0, help="HTTP timeout in seconds")

    client = JsonArgumentParser(add_help=False)
    client.add_argument("--client-id", required=True)
    client.add_argument("--client-secret", required=True)
    client.add_argument("--auth", choices=AUTH_METHODS, default="client_secret_basic",
                        help="token endpoint client authentication method")

    parser = JsonArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=JsonArgumentParser)

    p = sub.add_parser("token", parents=[common, client], help="client_credentials grant")
    p.add_argument("--scope", help='space-separated scopes, e.g. "a b"')
    p.add_argument("--resource", help="RFC 8707 resource indicator")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("verify", parents=[common], help="verify a JWT access token")
    p.add_argument("--token", required=True)
    p.add_argument("--audience", required=True)
    p.add_argument("--alg", default="ES256")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("introspect", parents=[common, client], help="RFC 7662 introspection")
    p.add_argument("--token", required=True)
    p.set_defaults(func=cmd_introspect)

    p = sub.add_parser("revoke", parents=[common, client], help="RFC 7009 revocation")
    p.add_argument("--token", required=True)
    p.set_defaults(func=cmd_revoke)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except Failure as f:
        emit(f.to_json(), 1)
    except Exception as e:  # never die with a traceback instead of JSON
        emit({"error": "internal_error", "detail": f"{type(e).__name__}: {e}"}, 1)
    emit(result, 0)


if __name__ == "__main__":
    main()
