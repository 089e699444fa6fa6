"""A scripted SMTP server for Conveyor's email tests (aiosmtpd).

    python server.py SCRIPT.json OUT_DIR

Prints the port it listens on (127.0.0.1, a free port) as its first line, then serves until
killed. Every message it accepts is written to OUT_DIR as NNNN.json: the envelope, the raw
message, and the message parsed back by Python's `email` package (headers decoded, each
part's type, decoded text and attachment bytes in base64), so a test checks what a mail
client would show. The script (JSON) says how to answer:

    {
      "rcpt": {"addr@x": [[450, "4.2.0 greylisted"], "ok"]},  # per recipient, in turn
      "data": [[451, "4.3.0 try later"], "drop", "ok"],       # per end of data, in turn
      "auth": {"user": "u", "password": "p"},                 # require AUTH PLAIN/LOGIN
      "starttls": {"cert": "cert.pem", "key": "key.pem"},     # offer (and require) STARTTLS
      "implicit_tls": {"cert": "cert.pem", "key": "key.pem"}, # TLS from the first byte
      "data_delay": 0.3                                       # seconds before answering DATA
    }

An answer is "ok", [code, text], or "drop" (close the connection without answering: the
client never hears 250, and nothing is stored). When a list is used up, the answer is "ok".
Every RCPT and DATA answered is logged to OUT_DIR/events.jsonl, with its time (`t`) and,
for an RCPT, the transactions then in progress to that recipient's domain (`inflight`,
counted from the first accepted RCPT to the end of the DATA), which the throttle tests read.
"""

import asyncio
import base64
import email
import email.policy
import json
import os
import ssl
import sys
import threading
import time

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

script = json.load(open(sys.argv[1]))
out = sys.argv[2]
os.makedirs(out, exist_ok=True)
lock = threading.Lock()
counters = {"rcpt": {}, "data": 0, "stored": 0}
inflight = {}


def domain_of(address):
    return address.rsplit("@", 1)[-1].lower()


def log(event):
    with lock:
        with open(os.path.join(out, "events.jsonl"), "a") as f:
            f.write(json.dumps(event) + "\n")


def next_answer(seq, i):
    if i < len(seq):
        return seq[i]
    return "ok"


def parse(raw):
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    headers = {}
    for k, v in msg.items():
        headers.setdefault(k.lower(), []).append(str(v))
    parts = []
    for part in msg.walk():
        if part.is_multipart():
            parts.append({"content_type": part.get_content_type(), "multipart": True})
            continue
        entry = {
            "content_type": part.get_content_type(),
            "disposition": part.get_content_disposition(),
            "filename": part.get_filename(),
            "transfer_encoding": part.get("content-transfer-encoding"),
        }
        if part.get_content_maintype() == "text":
            entry["text"] = part.get_content()
        else:
            entry["base64"] = base64.b64encode(part.get_payload(decode=True) or b"").decode()
        parts.append(entry)
    return {
        "headers": headers,
        "subject": str(msg["subject"]) if msg["subject"] is not None else None,
        "from": [{"name": a.display_name, "address": a.addr_spec} for a in msg["from"].addresses] if msg["from"] else [],
        "to": [{"name": a.display_name, "address": a.addr_spec} for a in msg["to"].addresses] if msg["to"] else [],
        "cc": [{"name": a.display_name, "address": a.addr_spec} for a in msg["cc"].addresses] if msg["cc"] else [],
        "content_type": msg.get_content_type(),
        "parts": parts,
    }


class Handler:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with lock:
            i = counters["rcpt"].get(address, 0)
            counters["rcpt"][address] = i + 1
        answer = next_answer(script.get("rcpt", {}).get(address, []), i)
        n = None
        if answer == "ok" and not envelope.rcpt_tos:
            with lock:
                n = inflight.get(domain_of(address), 0) + 1
                inflight[domain_of(address)] = n
        log({"event": "rcpt", "address": address, "answer": answer, "t": time.time(), "inflight": n})
        if answer == "ok":
            envelope.rcpt_tos.append(address)
            return "250 OK"
        if answer == "drop":
            server.transport.close()
            return "421 closing"
        return f"{answer[0]} {answer[1]}"

    async def handle_DATA(self, server, session, envelope):
        try:
            if script.get("data_delay"):
                await asyncio.sleep(script["data_delay"])
            return self.answer_data(server, session, envelope)
        finally:
            if envelope.rcpt_tos:
                with lock:
                    d = domain_of(envelope.rcpt_tos[0])
                    inflight[d] = inflight.get(d, 1) - 1

    def answer_data(self, server, session, envelope):
        with lock:
            i = counters["data"]
            counters["data"] = i + 1
        answer = next_answer(script.get("data", []), i)
        log({"event": "data", "rcpt_tos": envelope.rcpt_tos, "answer": answer, "t": time.time()})
        if answer == "drop":
            server.transport.abort()
            return "421 gone"
        if answer != "ok":
            return f"{answer[0]} {answer[1]}"
        raw = envelope.original_content or envelope.content
        with lock:
            n = counters["stored"]
            counters["stored"] = n + 1
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "raw": raw.decode("utf-8", "replace"),
            "tls": server.transport.get_extra_info("sslcontext") is not None or bool(session.ssl),
            "authenticated": bool(session.authenticated),
            "parsed": parse(raw),
        }
        tmp = os.path.join(out, f"{n:04}.json.tmp")
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.rename(tmp, os.path.join(out, f"{n:04}.json"))
        return "250 2.0.0 queued as %04d" % n


def authenticator(server, session, envelope, mechanism, auth_data):
    want = script["auth"]
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login.decode() == want["user"]
        and auth_data.password.decode() == want["password"]
    )
    log({"event": "auth", "mechanism": mechanism, "ok": ok})
    return AuthResult(success=ok, handled=False)


def context(spec):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(spec["cert"], spec["key"])
    return ctx


def factory():
    kwargs = {"hostname": "localhost", "decode_data": False, "enable_SMTPUTF8": True}
    if "auth" in script:
        kwargs["authenticator"] = authenticator
        kwargs["auth_required"] = True
        kwargs["auth_require_tls"] = "starttls" in script or "implicit_tls" in script
    if "starttls" in script:
        kwargs["tls_context"] = context(script["starttls"])
        kwargs["require_starttls"] = True
    return SMTP(Handler(), **kwargs)


async def main():
    loop = asyncio.get_running_loop()
    tls = context(script["implicit_tls"]) if "implicit_tls" in script else None
    server = await loop.create_server(factory, "127.0.0.1", 0, ssl=tls)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


asyncio.run(main())
