#!/usr/bin/env python3
"""A real SMTP server for the Auth API end-to-end tests (tests/auth_e2e.rs), on aiosmtpd.

    smtp_sink.py serve --dir=DIR [--port=N] [--fail-first=N]
                       [--tls-cert=FILE --tls-key=FILE (--starttls | --implicit-tls)]
                       [--auth=USER:PASSWORD]
        Listens on 127.0.0.1:N (0, the default: a free port) and prints `ready PORT` once it
        accepts connections. Every message is written to DIR as NNNN.eml (the raw bytes as
        received) and, beside it, NNNN.json: the envelope, how the session was secured (`tls`:
        whether the message came over TLS, with `tls_version` and `cipher`; `auth_user`: who
        authenticated, or null) and the message as Python's `email` module parses it
        (headers, each part's content type and decoded body). Both files appear atomically
        (written under a hidden name, then renamed; the .json last).
        With --fail-first=N the first N deliveries are answered `451` (a temporary error, so
        the sender must keep the message and retry); each is recorded as rejected-NNNN.json.

        Without TLS options the sink speaks plain SMTP and offers no AUTH. With --tls-cert and
        --tls-key (PEM; the certificate file may hold the chain) and
          --starttls      the server offers STARTTLS and requires it before MAIL (RFC 3207);
          --implicit-tls  the listening socket itself is TLS (SMTPS, RFC 8314), as aiosmtpd's
                          `Controller(..., ssl_context=...)` does.
        With --auth=USER:PASSWORD (needs one of the TLS modes) every message must come from a
        session that authenticated (AUTH PLAIN or LOGIN, only once the session is TLS) as USER
        with PASSWORD. A refused AUTH is answered `535` and recorded as auth-failed-NNNN.json
        (the user tried and whether the session was TLS; never the password).

    smtp_sink.py parse FILE
        Prints FILE (an RFC 5322 message, e.g. from Portcullis's outbox) parsed as above.

Needs the `aiosmtpd` package (scripts/test.sh installs it).
"""

import argparse
import asyncio
import email
import email.policy
import hmac
import json
import os
import ssl
import sys
import warnings


def parse_message(raw: bytes) -> dict:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    parts = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        parts.append(
            {
                "content_type": part.get_content_type(),
                "charset": part.get_content_charset(),
                "transfer_encoding": part.get("Content-Transfer-Encoding", ""),
                "body": part.get_content(),
            }
        )
    return {
        "content_type": msg.get_content_type(),
        "headers": {k.lower(): str(v) for k, v in msg.items()},
        "message_id": str(msg.get("Message-ID", "")),
        "from": str(msg.get("From", "")),
        "to": str(msg.get("To", "")),
        "to_addresses": [a.addr_spec for a in msg["To"].addresses] if msg["To"] else [],
        "subject": str(msg.get("Subject", "")),
        "date": str(msg.get("Date", "")),
        "parts": parts,
    }


def write_atomic(directory: str, name: str, data: bytes) -> None:
    tmp = os.path.join(directory, f".{name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(directory, name))


def tls_info(server) -> dict:
    """How the session's transport is secured: by the transport itself, so that it holds for
    STARTTLS (the transport is replaced after the handshake) and implicit TLS alike."""
    ssl_object = server.transport.get_extra_info("ssl_object") if server.transport else None
    if ssl_object is None:
        return {"tls": False, "tls_version": None, "cipher": None}
    cipher = ssl_object.cipher()
    return {"tls": True, "tls_version": ssl_object.version(), "cipher": cipher[0] if cipher else None}


def auth_user(session):
    """The user the session authenticated as, or None."""
    if not session.authenticated or session.auth_data is None:
        return None
    login = getattr(session.auth_data, "login", None)
    return login.decode("utf-8", "replace") if isinstance(login, bytes) else login


class Sink:
    def __init__(self, directory: str, fail_first: int, credentials=None):
        self.directory = directory
        self.fail_first = fail_first
        self.credentials = credentials  # (user, password) as bytes, or None
        self.deliveries = 0
        self.auth_failures = 0

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        """aiosmtpd's `authenticator`: USER:PASSWORD from --auth, compared in constant time."""
        from aiosmtpd.smtp import AuthResult, LoginPassword

        if self.credentials is not None and isinstance(auth_data, LoginPassword):
            user, password = self.credentials
            login, given = auth_data.login or b"", auth_data.password or b""
            user_ok = hmac.compare_digest(login, user)
            password_ok = hmac.compare_digest(given, password)
            if user_ok and password_ok:
                return AuthResult(success=True, auth_data=auth_data)
        else:
            login = b""
        self.auth_failures += 1
        meta = {"n": self.auth_failures, "mechanism": mechanism, "user": login.decode("utf-8", "replace")}
        meta.update(tls_info(server))
        write_atomic(self.directory, f"auth-failed-{self.auth_failures:04d}.json", json.dumps(meta).encode())
        # Not handled: aiosmtpd answers `535 5.7.8 Authentication credentials invalid`.
        return AuthResult(success=False, handled=False)

    async def handle_DATA(self, server, session, envelope):
        self.deliveries += 1
        n = self.deliveries
        meta = {
            "n": n,
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "peer": str(session.peer[0]) if session.peer else None,
            "auth_user": auth_user(session),
        }
        meta.update(tls_info(server))
        if n <= self.fail_first:
            write_atomic(self.directory, f"rejected-{n:04d}.json", json.dumps(meta).encode())
            return "451 4.3.0 Temporary failure (smtp_sink --fail-first)"
        raw = envelope.original_content or envelope.content
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        write_atomic(self.directory, f"{n:04d}.eml", raw)
        try:
            meta["message"] = parse_message(raw)
        except Exception as e:  # the test fails on a missing "message", with this reason
            meta["parse_error"] = repr(e)
        write_atomic(self.directory, f"{n:04d}.json", json.dumps(meta).encode())
        return "250 2.0.0 OK: queued as %04d" % n


def smtp_class():
    from aiosmtpd.smtp import SMTP

    class ImplicitTlsAwareSMTP(SMTP):
        """aiosmtpd counts a session as TLS only after STARTTLS (aio-libs/aiosmtpd#281,
        #274): on an implicit-TLS socket it would neither offer nor accept AUTH while
        `auth_require_tls` (the default, kept). When the transport already is TLS, mark the
        session so, as STARTTLS would have."""

        def connection_made(self, transport):
            super().connection_made(transport)
            if self._tls_protocol is None and transport.get_extra_info("ssl_object") is not None:
                self._tls_protocol = getattr(transport, "_ssl_protocol", None) or transport
                self.session.ssl = {
                    k: transport.get_extra_info(k) for k in ("ssl_object", "cipher", "peercert", "sslcontext")
                }

    return ImplicitTlsAwareSMTP


async def serve(args) -> None:
    SMTP = smtp_class()

    os.makedirs(args.dir, exist_ok=True)
    credentials = None
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            raise SystemExit("--auth wants USER:PASSWORD")
        credentials = (user.encode(), password.encode())
    handler = Sink(args.dir, args.fail_first, credentials)
    # aiosmtpd itself sets the deprecated Session.login_data after each successful AUTH.
    warnings.filterwarnings("ignore", message="Session.login_data is deprecated")
    tls_context = None
    if args.starttls or args.implicit_tls:
        tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls_context.load_cert_chain(args.tls_cert, args.tls_key)
    options = dict(hostname="sink.example.test", decode_data=False, enable_SMTPUTF8=True)
    if args.starttls:
        options.update(tls_context=tls_context, require_starttls=True)
    if credentials is not None:
        # auth_require_tls stays True (the default): AUTH only inside TLS.
        options.update(authenticator=handler.authenticate, auth_required=True)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, **options),
        host="127.0.0.1",
        port=args.port,
        ssl=tls_context if args.implicit_tls else None,
    )
    port = server.sockets[0].getsockname()[1]
    print(f"ready {port}", flush=True)
    # Serve until the test kills us or closes our standard input.
    stdin_closed = loop.create_future()

    def on_stdin():
        try:
            data = os.read(sys.stdin.fileno(), 1024)
        except OSError:
            data = b""
        if not data and not stdin_closed.done():
            stdin_closed.set_result(None)

    try:
        loop.add_reader(sys.stdin.fileno(), on_stdin)
    except (OSError, ValueError, NotImplementedError):
        pass
    async with server:
        await stdin_closed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--dir", required=True)
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--fail-first", type=int, default=0)
    s.add_argument("--tls-cert", metavar="FILE")
    s.add_argument("--tls-key", metavar="FILE")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--starttls", action="store_true")
    mode.add_argument("--implicit-tls", action="store_true")
    s.add_argument("--auth", metavar="USER:PASSWORD")
    q = sub.add_parser("parse")
    q.add_argument("file")
    args = p.parse_args()
    if args.cmd == "serve":
        tls_mode = args.starttls or args.implicit_tls
        if tls_mode != bool(args.tls_cert and args.tls_key) or bool(args.tls_cert) != bool(args.tls_key):
            p.error("--starttls and --implicit-tls need --tls-cert and --tls-key, and those need one of them")
        if args.auth is not None and not tls_mode:
            p.error("--auth needs --starttls or --implicit-tls (AUTH only inside TLS)")
    if args.cmd == "parse":
        with open(args.file, "rb") as f:
            print(json.dumps(parse_message(f.read())))
        return 0
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
