#!/usr/bin/env python3
"""Independent private_key_jwt (RFC 7523) client for Portcullis end-to-end tests.

The happy path goes through authlib (OAuth2Session with its PrivateKeyJWT client
authentication); assertions for the refusal cases are signed with authlib's
RFC 7523 signer or, for what no library will produce (`alg: none`, HS256 keyed
with a public key), assembled by hand. pyjwt checks what authlib signed.

Every invocation prints exactly one JSON object on stdout. On failure the
object is {"error": "...", "detail": ..., ["status": <http status>]} and the
exit code is 1.

Subcommands:
  token   client_credentials with private_key_jwt via authlib
          -> {"token_response": {...}, "assertion": "...", "status": N}
  sign    a client assertion                 -> {"assertion": "...", "header": {...}, "claims": {...}}
  sign-batch  many: --specs '[[sign args...], ...]' -> {"assertions": [...]}
"""

import argparse
import base64
import hashlib
import hmac
import json
import sys
import time
import urllib.parse
import uuid

import jwt
import requests
from authlib.integrations.requests_client import OAuth2Session
from authlib.oauth2.rfc7523 import PrivateKeyJWT, private_key_jwt_sign
from joserfc.jwk import ECKey, OKPKey, RSAKey

# The sibling client's reporting and discovery (the script's directory is on sys.path).
from oauth_client import Failure, discover, emit


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_key(path, alg):
    """The private key as a joserfc key object of the type `alg` needs."""
    with open(path, "rb") as f:
        pem = f.read()
    if alg.startswith("ES"):
        return ECKey.import_key(pem)
    if alg == "EdDSA":
        return OKPKey.import_key(pem)
    return RSAKey.import_key(pem)


def discover_pkjwt(issuer, timeout):
    """The discovery document, which must advertise private_key_jwt."""
    doc = discover(issuer, timeout)
    methods = doc.get("token_endpoint_auth_methods_supported") or []
    if "private_key_jwt" not in methods:
        raise Failure("discovery_failed", f"private_key_jwt not among {methods!r}")
    return doc


def assertion_claims(args, now):
    claims = {
        "iss": args.client_id,
        "sub": args.sub or args.client_id,
        "aud": [args.aud, args.aud_extra] if args.aud_extra else args.aud,
        "iat": now + args.iat_offset,
        "exp": now + args.exp_in,
        "jti": args.jti or str(uuid.uuid4()),
    }
    if args.nbf_offset is not None:
        claims["nbf"] = now + args.nbf_offset
    return claims


def cmd_token(args):
    doc = discover_pkjwt(args.issuer, args.timeout)
    token_endpoint = doc["token_endpoint"]
    key = load_key(args.key, args.alg)
    now = int(time.time())
    auth = PrivateKeyJWT(
        token_endpoint,
        claims={"exp": now + args.exp_in, "jti": str(uuid.uuid4())},
        headers={"kid": args.kid} if args.kid else None,
        alg=args.alg,
    )
    sess = OAuth2Session(
        client_id=args.client_id,
        client_secret=key,
        token_endpoint_auth_method="private_key_jwt",
        default_timeout=args.timeout,
    )
    sess.register_client_auth_method(auth)
    seen = {}

    def record(resp, *_a, **_kw):
        seen["resp"] = resp
        return resp

    sess.hooks["response"].append(record)
    try:
        sess.fetch_token(token_endpoint, grant_type="client_credentials")
    except Exception as e:  # authlib OAuthError and friends
        resp = seen.get("resp")
        raise Failure(str(getattr(e, "error", None) or type(e).__name__),
                      getattr(e, "description", None) or str(e),
                      resp.status_code if resp is not None else None)
    resp = seen["resp"]
    body = resp.request.body or ""
    if isinstance(body, bytes):
        body = body.decode()
    sent = (urllib.parse.parse_qs(body).get("client_assertion") or [""])[0]
    if not sent:
        raise Failure("no_assertion", f"authlib sent no client_assertion: {body[:2000]}")
    # Check what authlib sent with pyjwt against the public key.
    header = jwt.get_unverified_header(sent)
    public = key.as_pem(private=False)
    claims = jwt.decode(sent, public, algorithms=[args.alg], audience=token_endpoint,
                        issuer=args.client_id, options={"require": ["exp", "jti", "sub"]})
    return {"token_response": resp.json(), "status": resp.status_code, "assertion": sent,
            "header": header, "claims": claims}


def cmd_sign_batch(args):
    specs = json.loads(args.specs)
    out = []
    for spec in specs:
        sub = build_parser().parse_args(["sign"] + list(spec))
        out.append(cmd_sign(sub)["assertion"])
    return {"assertions": out}


def cmd_sign(args):
    now = int(time.time())
    claims = assertion_claims(args, now)
    header = {"typ": "JWT"}
    if args.kid:
        header["kid"] = args.kid
    if args.extra_header:
        header.update(json.loads(args.extra_header))
    if args.alg == "none":
        header["alg"] = "none"
        token = (b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode()) + ".")
    elif args.alg.startswith("HS"):
        # The classic key-confusion attack: the public key as the HMAC secret.
        if not args.hmac_secret_file:
            raise Failure("usage", "--hmac-secret-file is required for HS*")
        with open(args.hmac_secret_file, "rb") as f:
            secret = f.read()
        header["alg"] = args.alg
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[args.alg]
        signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
        sig = hmac.new(secret, signing_input.encode(), digest).digest()
        token = signing_input + "." + b64url(sig)
    elif args.extra_header:
        # pyjwt signs any header (joserfc refuses some, such as crit, on purpose).
        with open(args.key, "rb") as f:
            pem = f.read()
        fields = {k: v for k, v in header.items() if k != "alg"}
        token = jwt.encode(claims, pem, algorithm=args.alg, headers=fields)
    else:
        key = load_key(args.key, args.alg)
        extra = {k: v for k, v in claims.items() if k not in ("iss", "iat")}
        token = private_key_jwt_sign(key, client_id=args.client_id, token_endpoint=args.aud,
                                     alg=args.alg, claims=extra, header=dict(header),
                                     issued_at=claims["iat"])
        if isinstance(token, bytes):
            token = token.decode()
    head, body = token.split(".")[:2]
    return {"assertion": token, "header": json.loads(b64url_decode(head)),
            "claims": json.loads(b64url_decode(body))}


class JsonArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        emit({"error": "usage", "detail": message}, 1)


def build_parser():
    parser = JsonArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=JsonArgumentParser)

    p = sub.add_parser("token")
    p.add_argument("--issuer", required=True)
    p.add_argument("--client-id", required=True)
    p.add_argument("--key", required=True, help="PEM private key file")
    p.add_argument("--kid")
    p.add_argument("--alg", default="ES256")
    p.add_argument("--exp-in", type=int, default=60)
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("sign-batch")
    p.add_argument("--specs", required=True, help="JSON list of argument lists of sign")
    p.set_defaults(func=cmd_sign_batch)

    p = sub.add_parser("sign")
    p.add_argument("--client-id", required=True)
    p.add_argument("--aud", required=True)
    p.add_argument("--key", help="PEM private key file")
    p.add_argument("--kid")
    p.add_argument("--alg", default="ES256")
    p.add_argument("--exp-in", type=int, default=60, help="seconds from now; negative for expired")
    p.add_argument("--jti")
    p.add_argument("--sub", help="default: the client id")
    p.add_argument("--aud-extra", help="make aud an array: [aud, this]")
    p.add_argument("--iat-offset", type=int, default=0, help="iat = now + this")
    p.add_argument("--nbf-offset", type=int, help="add nbf = now + this")
    p.add_argument("--extra-header", help="JSON object merged into the JOSE header")
    p.add_argument("--hmac-secret-file", help="HS*: the bytes of this file are the secret")
    p.set_defaults(func=cmd_sign)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except Failure as f:
        emit(f.to_json(), 1)
    except Exception as e:  # never a traceback instead of JSON
        emit({"error": "internal_error", "detail": f"{type(e).__name__}: {e}"}, 1)
    emit(result, 0)


if __name__ == "__main__":
    main()
