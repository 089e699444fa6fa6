"""Verifies the DKIM signature of a message with dkimpy, an implementation independent of the
one that signed it (lettre's).

    python dkim_verify.py RECORDS.json MESSAGE.eml

RECORDS.json maps DNS names (`<selector>._domainkey.<domain>`) to the TXT record published
there (`v=DKIM1; k=rsa; p=…`); the verifier asks for them through `dnsfunc` instead of DNS.
Prints {"ok": bool, "domain": d=, "selector": s=, "algorithm": a=} and exits 0 when the
signature verifies, 1 when it does not.
"""

import json
import sys

import dkim

records = json.load(open(sys.argv[1]))
message = open(sys.argv[2], "rb").read()


def dnsfunc(name, timeout=5):
    name = name.decode() if isinstance(name, bytes) else name
    txt = records.get(name.rstrip("."))
    return txt.encode() if txt is not None else None


d = dkim.DKIM(message)
try:
    ok = bool(d.verify(dnsfunc=dnsfunc))
    error = None
except dkim.DKIMException as e:
    ok = False
    error = str(e)
print(
    json.dumps(
        {
            "ok": ok,
            "domain": (d.domain or b"").decode(),
            "selector": (d.selector or b"").decode(),
            "algorithm": (d.signature_fields.get(b"a", b"") if d.signature_fields else b"").decode(),
            "error": error,
        }
    )
)
sys.exit(0 if ok else 1)
