"""Rules of the Conveyor API that JSON Schema cannot state, for scripts/api-schema-test.sh.

The OpenAPI document carries every rule a schema can express. A few cannot be: a cron
expression's grammar, an IANA time zone name, a `run_at` within a day ago and five years
ahead (relative to now), `run_at` and `delay_seconds` not both, a schedule's `name`, `cron`
and `kind` required on create only (one body type serves create and update), a bulk
action's "at least one filter field, or `all: true`", and an enqueue's or event's
`idempotency_key` equal to its `Idempotency-Key` header when both are sent, a backup's source and
destination being ones the server's config names, the total size of an endpoint's
custom headers, and the grammar of an IPv6 address
in a webhook URL (the URL parser checks it), a remote worker's batch item's fields by its
`outcome`, a stats period's grammar and its point limit, an email address's grammar and an
email's recipients and body, an unsubscribe link's signed token, and integers written without a fraction (JSON Schema counts `2.0` as an integer). A schema-valid request that breaks one
of them gets a 422 naming the field; this hook accepts exactly that refusal and nothing else.
"""

import json
import re

import schemathesis

# (method, path template) -> fields whose 422 is a rule the schema cannot state.
UNSTATED = {
    # The body's key must equal the `Idempotency-Key` header when both are sent.
    ("POST", "/v1/jobs"): {"run_at", "delay_seconds", "idempotency_key"},
    # Job i's key is `<Idempotency-Key>:<i>`, which must fit in 255 characters.
    ("POST", "/v1/jobs/batch"): {"run_at", "delay_seconds", "idempotency_key"},
    ("POST", "/v1/jobs/bulk/{action}"): {"filter"},
    # As for jobs: the body's key must equal the `Idempotency-Key` header when both are sent.
    ("POST", "/v1/events"): {"idempotency_key"},
    ("POST", "/v1/schedules"): {"name", "cron", "kind", "timezone", "missed", "overlap"},
    # A PATCH may not rename (`name`, when given, is the path's), and `backfill_limit` 0 is
    # refused when the schedule's `missed` is `all`.
    ("PATCH", "/v1/schedules/{name}"): {"cron", "timezone", "missed", "overlap", "name", "backfill_limit"},
    # A batch item's fields depend on its `outcome` (`error` for fail, `seconds` for snooze,
    # `result` for complete).
    ("POST", "/v1/workers/finish"): {"error", "seconds", "retryable", "retry_after_seconds", "result"},
    # Custom headers: at most 16 KiB of names and values together (each is bounded in the
    # schema, their sum cannot be).
    ("POST", "/v1/webhooks/endpoints"): {"headers"},
    ("PATCH", "/v1/webhooks/endpoints/{endpoint}"): {"headers"},
    # A period's grammar (`15m`, `7d`), `from` and `period` not both, `from` before `to`, and
    # at most 10,000 points at the resolution.
    ("GET", "/v1/stats/jobs"): {"period", "from", "resolution"},
    ("GET", "/v1/stats/webhooks"): {"period", "from", "resolution"},
    # A backup source or destination must be one the server's `[backup]` config names.
    ("POST", "/v1/backups"): {"source", "destination", "queue"},
    ("GET", "/v1/backups"): {"destination"},
    ("GET", "/v1/backups/{id}"): {"destination"},
    ("POST", "/v1/backups/{id}/verify"): {"destination", "queue"},
    ("POST", "/v1/backups/prune"): {"destination", "queue"},
    # An email address's grammar (RFC 5322), one to 100 recipients in to, cc and bcc
    # together, a subject and a body or else a template (and not both), a header name's
    # grammar, base64 content, a transport that is configured.
    # (A field is matched by its last part: `to[1]` is `to`, `template.data` is `data`.)
    ("POST", "/v1/emails"): {"from", "reply_to", "to", "cc", "bcc", "subject", "text", "html", "headers", "attachments", "content", "content_type", "transport", "template", "name", "version", "data", "tags", "list"},
    # An email address's grammar.
    ("POST", "/v1/email-suppressions"): {"address", "list"},
    ("DELETE", "/v1/email-suppressions/{address}"): {"address"},
    # A template's grammar (minijinja), and a text or an HTML body.
    ("POST", "/v1/email-templates"): {"subject", "text", "html"},
    # A version the template has; data that gives every variable the template uses.
    ("POST", "/v1/email-templates/{name}/preview"): {"version", "data", "subject", "text", "html"},
    ("GET", "/v1/email-templates/{name}"): {"version"},
    # An unsubscribe link's token is valid only as signed by the server's secrets keys.
    ("GET", "/v1/unsubscribe/{token}"): {"token"},
    ("POST", "/v1/unsubscribe/{token}"): {"token"},
}


# An IPv6 literal's grammar is checked by the URL parser, not stated by the URL pattern.
IPV6_URL = {("POST", "/v1/webhooks/endpoints"), ("PATCH", "/v1/webhooks/endpoints/{endpoint}"), ("POST", "/v1/webhooks/messages")}


def _errors(response):
    try:
        problem = json.loads(response.content)
    except ValueError:
        return []
    return problem.get("errors") or [{}]


# A `?wait=` the server takes as a wait: bare seconds, or humantime's `<number><unit>` parts.
WAIT = re.compile(r"\s*(\d+\s*|(\d+\s*[a-zA-Zµ]+\s*)+)")


@schemathesis.hook
def before_call(context, case, **kwargs):
    """A claim's long-poll (up to 30 s) and a job read's `?wait=` (up to 60 s) are cut to
    1 s: the run exercises the routes, not the waits, and stays within its request
    timeout."""
    if case.operation.path == "/v1/workers/claim" and isinstance(case.body, dict):
        wait = case.body.get("wait_seconds")
        if isinstance(wait, (int, float)) and not isinstance(wait, bool) and 1 < wait <= 30:
            case.body["wait_seconds"] = type(wait)(1)
    if case.operation.path == "/v1/jobs/{id}" and isinstance(case.query, dict):
        wait = case.query.get("wait")
        if isinstance(wait, str) and WAIT.fullmatch(wait):
            case.query["wait"] = "1s"


def _fields(response):
    try:
        problem = json.loads(response.content)
    except ValueError:
        return set()
    names = set()
    for error in problem.get("errors") or []:
        field = str(error.get("field", ""))
        # `jobs[3].run_at` is `run_at` of one job of a batch.
        # `tags[0]` is `tags`: the rule is the list's.
        names.add(re.sub(r"\[\d+\]$", "", field.rsplit(".", 1)[-1]))
    return names


@schemathesis.hook
def filter_failure(context, failure, case, response):
    """Keeps every failure except a 422 that names only fields of an unstated rule."""
    if failure.code != "ST202" or response.status_code != 422:
        return True
    # JSON Schema counts `4856.0` as an integer; the API takes integers written as integers
    # (docs/api.md) and names the field of one written with a fraction.
    if all("invalid type: floating point" in e.get("message", "") for e in _errors(response)):
        return False
    key = (case.operation.method.upper(), case.operation.path)
    allowed = set(UNSTATED.get(key, set()))
    if key in IPV6_URL and isinstance(case.body, dict) and "[" in str(case.body.get("url", "")):
        allowed.add("url")
    fields = _fields(response)
    return not (fields and fields <= allowed)
