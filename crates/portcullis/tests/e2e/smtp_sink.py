#!/usr/bin/env python3
"""A real SMTP server for the Auth API end-to-end tests (tests/auth_e2e.rs), on aiosmtpd.

    smtp_sink.py serve --dir=DIR [--port=N] [--fail-first=N]
        Listens on 127.0.0.1:N (0, the default: a free port) and prints `ready PORT` once it
        accepts connections. Every message is written to DIR as NNNN.eml (the raw bytes as
        received) and, beside it, NNNN.json: the envelope and the message as Python's `email`
        module parses it (headers, each part's content type and decoded body). Both files
        appear atomically (written under a hidden name, then renamed; the .json last).
        With --fail-first=N the first N deliveries are answered `451` (a temporary error, so
        the sender must keep the message and retry); each is recorded as rejected-NNNN.json.

    smtp_sink.py parse FILE
        Prints FILE (an RFC 5322 message, e.g. from Portcullis's outbox) parsed as above.

Needs the `aiosmtpd` package (scripts/test.sh installs it).
"""

import argparse
import asyncio
import email
import email.policy
import json
import os
import sys


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


class Sink:
    def __init__(self, directory: str, fail_first: int):
        self.directory = directory
        self.fail_first = fail_first
        self.deliveries = 0

    async def handle_DATA(self, server, session, envelope):
        self.deliveries += 1
        n = self.deliveries
        meta = {
            "n": n,
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "peer": str(session.peer[0]) if session.peer else None,
        }
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


async def serve(args) -> None:
    from aiosmtpd.smtp import SMTP

    os.makedirs(args.dir, exist_ok=True)
    handler = Sink(args.dir, args.fail_first)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="sink.example.test", decode_data=False, enable_SMTPUTF8=True),
        host="127.0.0.1",
        port=args.port,
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
    q = sub.add_parser("parse")
    q.add_argument("file")
    args = p.parse_args()
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
