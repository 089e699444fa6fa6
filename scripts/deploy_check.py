"""Checks deploy/ offline; run by scripts/deploy-check.sh (which runs promtool and
kubernetes-validate itself). Subcommands:

  rules DIR        every alert has a runbook that exists and a unit test that expects it to fire;
                   writes DIR/queries.yml: every Grafana and KEDA query as a recording rule, for
                   `promtool check rules` to parse
  compose SCHEMA   deploy/compose.yaml against the compose specification's JSON schema
  k8s              what kubernetes-validate has no schema for: the kustomization's files, the
                   KEDA ScaledObject's target, the migration Job's and Deployments' Secret keys
  selftest SCHEMA DIR  each of the validators above refuses a broken copy
  run BIN URL      the image's entrypoint and environment (deploy/Dockerfile, compose.yaml,
                   k8s/*.yaml) run with the real binary on the store at URL: each role's probes
                   answer through `conveyor health`, and /metrics passes `promtool check metrics`
"""

import json
import os
import pathlib
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
failures = []


def fail(msg):
    failures.append(msg)
    print(f"FAIL {msg}", file=sys.stderr)


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def rules(out_dir):
    alerts = yaml.safe_load(open(DEPLOY / "prometheus/alerts.yml"))
    tests = yaml.safe_load(open(DEPLOY / "prometheus/alerts_test.yml"))
    tested = {
        t["alertname"]
        for group in tests["tests"]
        for t in group.get("alert_rule_test", [])
        if t.get("exp_alerts")
    }
    silent = {
        t["alertname"]
        for group in tests["tests"]
        for t in group.get("alert_rule_test", [])
        if not t.get("exp_alerts")
    }
    names = []
    for group in alerts["groups"]:
        for rule in group["rules"]:
            name = rule["alert"]
            names.append(name)
            runbook = rule.get("annotations", {}).get("runbook_url", "")
            if not runbook.startswith("docs/runbooks/") or not (ROOT / runbook).is_file():
                fail(f"alert {name}: runbook_url `{runbook}` is not a file under docs/runbooks/")
            elif name not in (ROOT / runbook).read_text():
                fail(f"alert {name}: its runbook {runbook} does not name it")
            if name not in tested:
                fail(f"alert {name}: no test in alerts_test.yml expects it to fire")
            if name not in silent:
                fail(f"alert {name}: no test in alerts_test.yml expects it to stay silent")
    print(f"alerts: {len(names)}, each with a runbook and a firing and a silent test")

    queries = []
    dashboards = sorted((DEPLOY / "grafana/dashboards").glob("*.json"))
    for path in dashboards:
        dash = json.load(open(path))
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                queries.append((f"{path.name}: {panel['title']} {target['refId']}", target["expr"]))
    for doc in load_all(DEPLOY / "k8s/worker-scaledobject.yaml"):
        for trig in doc["spec"]["triggers"]:
            queries.append(("worker-scaledobject.yaml", trig["metadata"]["query"]))
    group = {
        "groups": [
            {
                "name": "queries",
                "rules": [
                    {"record": f"query:{i}", "expr": expr, "labels": {"source": where}}
                    for i, (where, expr) in enumerate(queries)
                ],
            }
        ]
    }
    pathlib.Path(out_dir, "queries.yml").write_text(yaml.safe_dump(group, sort_keys=False))
    # Every metric a query or rule names must be one Conveyor exports (or Prometheus' own `up`).
    exported = metric_families()
    exprs = [e for _, e in queries] + [
        r["expr"] for g in alerts["groups"] for r in g["rules"]
    ]
    for expr in exprs:
        for name in re.findall(r"\b(conveyor_[a-z_]+)", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if name not in exported and base not in exported:
                fail(f"`{name}` in `{expr.strip()}` is not a family Conveyor exports")
    print(f"queries: {len(queries)} written for promtool; metric names checked against the code")


def metric_families():
    """The family names in the code that renders /metrics."""
    names = set()
    for path in ["worker/src/metrics.rs", "api/src/route/system.rs", "backup/src/status.rs"]:
        names |= set(re.findall(r"# TYPE (conveyor_[a-z_]+)", (ROOT / path).read_text()))
        names |= set(re.findall(r'"(conveyor_[a-z_]+)"', (ROOT / path).read_text()))
    return names


def compose(schema_path):
    import jsonschema

    schema = json.load(open(schema_path))
    doc = yaml.safe_load(open(DEPLOY / "compose.yaml"))
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    for e in errors:
        fail(f"compose.yaml {'/'.join(map(str, e.path))}: {e.message}")
    for name, svc in doc["services"].items():
        for path in [v.split(":")[0] for v in svc.get("volumes", []) if v.startswith("./")]:
            if not (DEPLOY / path).exists():
                fail(f"compose.yaml: service {name} mounts {path}, which does not exist")
    for name, secret in doc.get("secrets", {}).items():
        if not secret["file"].startswith("./secrets/"):
            fail(f"compose.yaml: secret {name} should be a file under ./secrets/")
    if not errors:
        print(f"compose.yaml: valid against the compose specification ({len(doc['services'])} services)")


def k8s():
    kust = yaml.safe_load(open(DEPLOY / "k8s/kustomization.yaml"))
    docs = {}
    for res in kust["resources"]:
        if not (DEPLOY / "k8s" / res).is_file():
            fail(f"kustomization.yaml names {res}, which does not exist")
            continue
        for d in load_all(DEPLOY / "k8s" / res):
            docs[(d["kind"], d["metadata"]["name"])] = d
    if "secret.example.yaml" in kust["resources"]:
        fail("kustomization.yaml must not apply the example Secret")
    so = yaml.safe_load(open(DEPLOY / "k8s/worker-scaledobject.yaml"))
    required = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject"}
    for k, v in required.items():
        if so.get(k) != v:
            fail(f"worker-scaledobject.yaml: {k} must be {v}")
    target = so["spec"]["scaleTargetRef"]["name"]
    if ("Deployment", target) not in docs:
        fail(f"worker-scaledobject.yaml scales {target}, which no manifest defines")
    spec = so["spec"]
    if not (1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]):
        fail("worker-scaledobject.yaml: min/max replica counts out of order")
    for trig in spec["triggers"]:
        if trig["type"] != "prometheus" or not {"serverAddress", "query", "threshold"} <= set(trig["metadata"]):
            fail("worker-scaledobject.yaml: a prometheus trigger needs serverAddress, query, threshold")
    secret = yaml.safe_load(open(DEPLOY / "k8s/secret.example.yaml"))
    keys = set(secret["stringData"])
    pods = [d for d in docs.values() if d["kind"] == "Deployment"]
    pods += load_all(DEPLOY / "k8s/migrate-job.yaml")
    roles = set()
    for d in pods:
        for c in d["spec"]["template"]["spec"]["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and (ref["name"] != secret["metadata"]["name"] or ref["key"] not in keys):
                    fail(f"{d['metadata']['name']}: env {e['name']} reads a Secret key the example does not have")
            if d["kind"] == "Deployment":
                args = c["args"]
                roles.add(args[args.index("--roles") + 1])
                for probe in ["livenessProbe", "readinessProbe"]:
                    path = c[probe]["httpGet"]["path"]
                    if path not in ("/livez", "/readyz"):
                        fail(f"{d['metadata']['name']}: {probe} on {path}")
                if "resources" not in c:
                    fail(f"{d['metadata']['name']}: no resources")
        if d["kind"] == "Deployment" and ("PodDisruptionBudget", d["metadata"]["name"]) not in docs:
            fail(f"{d['metadata']['name']}: no PodDisruptionBudget")
    if roles != {"api", "worker", "scheduler"}:
        fail(f"one Deployment per role expected, found roles {sorted(roles)}")
    print(f"k8s: {len(docs)} resources in the kustomization; ScaledObject, Secret keys, probes, PDBs checked")


# --- the binary with the deployment's settings -------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dockerfile():
    """ENV, ENTRYPOINT, CMD and the HEALTHCHECK command of deploy/Dockerfile's final stage."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    final = text[text.rindex("\nFROM ") :]
    env, entry, cmd, health = {}, None, None, None
    for line in final.splitlines():
        line = line.strip()
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                k, v = pair.split("=", 1)
                env[k] = v
        elif line.startswith("ENTRYPOINT "):
            entry = json.loads(line[len("ENTRYPOINT ") :])
        elif line.startswith("CMD "):
            cmd = json.loads(line[4:])
        elif line.startswith("HEALTHCHECK "):
            health = json.loads(line[line.index("CMD ") + 4 :])
        elif line.startswith("USER "):
            if line.split()[1].split(":")[0] in ("0", "root"):
                fail("Dockerfile: the runtime user is root")
    if None in (entry, cmd, health):
        fail("Dockerfile: ENTRYPOINT, CMD and HEALTHCHECK CMD are all needed")
    return env, entry, cmd, health


def localize(env, ports):
    """The deployment's listen addresses, moved to free loopback ports (0.0.0.0:8080 -> 127.0.0.1:N)."""
    out = dict(env)
    for key in ("CONVEYOR_SERVE__LISTEN", "CONVEYOR_API__METRICS__LISTEN"):
        if key in out:
            port = ports.setdefault(out[key].rsplit(":", 1)[1], free_port())
            out[key] = f"127.0.0.1:{port}"
    return out


def run_role(label, binary, argv, env, health_cmd, ports, store_env):
    """Starts `binary argv` with env, waits for the healthcheck, checks /readyz and /metrics."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_") and k != "RUST_LOG"}
    full_env.update(localize(env, ports))
    full_env.update(store_env)
    metrics_addr = full_env["CONVEYOR_API__METRICS__LISTEN"]
    probe = [binary if a == "conveyor" else a for a in health_cmd]
    probe = [a.replace("127.0.0.1:9090", metrics_addr) for a in probe]
    proc = subprocess.Popen([binary] + argv, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=os.environ.get("TMPDIR", "/tmp"))
    try:
        deadline = time.time() + 30
        while True:
            r = subprocess.run(probe, capture_output=True, text=True)
            if r.returncode == 0:
                break
            if proc.poll() is not None or time.time() > deadline:
                log = proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ""
                fail(f"{label}: the healthcheck {' '.join(health_cmd)} never passed: {r.stderr.strip()}\n{log}")
                return
            time.sleep(0.3)
        ready = [probe[0], "health", "--url", f"http://{metrics_addr}/readyz"]
        r = subprocess.run(ready, capture_output=True, text=True)
        if r.returncode != 0 or r.stdout.strip() != "ready":
            fail(f"{label}: /readyz: {r.stdout} {r.stderr}")
        import urllib.request

        body = urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=5).read()
        lint = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
        # promtool lints naming conventions too; only a parse error fails here.
        if b"error while linting" in lint.stderr or b"text format parsing error" in lint.stderr:
            fail(f"{label}: /metrics does not parse: {lint.stderr.decode()}")
        if b"conveyor_store_up 1" not in body:
            fail(f"{label}: /metrics lacks conveyor_store_up 1")
        print(f"{label}: healthcheck, /readyz and /metrics answer ({len(body)} bytes of metrics)")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=40)
            if code != 0:
                fail(f"{label}: exit status {code} after SIGTERM")
        except subprocess.TimeoutExpired:
            proc.kill()
            fail(f"{label}: still running 40 s after SIGTERM")


def run(binary, url):
    env_image, entry, cmd, health = dockerfile()
    key = subprocess.run([binary, "secrets", "generate-key"], capture_output=True, text=True, check=True).stdout.strip()
    store_env = {"CONVEYOR_DATABASE__URL": url, "CONVEYOR_SECRETS__KEYS": key}
    entry = [binary if a == "conveyor" else a for a in entry]
    ports = {}
    # The migration Job first, as Kubernetes runs it.
    job = load_all(DEPLOY / "k8s/migrate-job.yaml")[0]
    c = job["spec"]["template"]["spec"]["containers"][0]
    env = {**env_image, **{e["name"]: e["value"] for e in c["env"] if "value" in e}}
    full = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    full.update(env)
    full.update(store_env)
    r = subprocess.run(entry + c["args"], env=full, capture_output=True, text=True)
    if r.returncode != 0 or "migrations applied" not in r.stdout:
        fail(f"k8s migrate Job ({c['args']}): {r.stdout} {r.stderr}")
    else:
        print(f"k8s migrate Job: {r.stdout.strip()}")
    # The image's default command (every role).
    run_role("image CMD " + " ".join(cmd), binary, cmd, env_image, health, ports, store_env)
    # Each Kubernetes Deployment: its args and env, over the image's env.
    for res in ("api.yaml", "worker.yaml", "scheduler.yaml"):
        for d in load_all(DEPLOY / "k8s" / res):
            if d["kind"] != "Deployment":
                continue
            c = d["spec"]["template"]["spec"]["containers"][0]
            env = {**env_image, **{e["name"]: e["value"] for e in c["env"] if "value" in e}}
            run_role(f"k8s {d['metadata']['name']}", binary, c["args"], env, health, ports, store_env)
    # Each compose service of the roles: its command and environment.
    # The secrets key comes from a compose secret, mounted as a file under /run/secrets/.
    doc = yaml.safe_load(open(DEPLOY / "compose.yaml"))
    secrets_dir = pathlib.Path(os.environ.get("TMPDIR", "/tmp"), "run-secrets")
    secrets_dir.mkdir(exist_ok=True)
    for secret in doc["secrets"]:
        (secrets_dir / secret).write_text(key + "\n")
    for name in ("api", "worker", "scheduler"):
        svc = doc["services"][name]
        env = {**env_image}
        for k, v in svc["environment"].items():
            if k == "CONVEYOR_DATABASE__URL":
                continue
            env[k] = str(v).replace("/run/secrets/", f"{secrets_dir}/")
        if "CONVEYOR_SECRETS__KEY_FILE" not in env:
            fail(f"compose {name}: no CONVEYOR_SECRETS__KEY_FILE")
        test = [a for a in svc["healthcheck"]["test"] if a != "CMD"]
        role_store = {"CONVEYOR_DATABASE__URL": url}
        run_role(f"compose {name}", binary, svc["command"], env, test, ports, role_store)


def selftest(schema_path, tmp):
    """Each validator refuses a broken copy: a check that cannot fail checks nothing."""
    import jsonschema

    doc = yaml.safe_load(open(DEPLOY / "compose.yaml"))
    doc["services"]["worker"]["deploy"]["replicas"] = "two"
    if not list(jsonschema.Draft7Validator(json.load(open(schema_path))).iter_errors(doc)):
        fail("selftest: the compose schema accepted replicas: two")
    broken = pathlib.Path(tmp, "broken-deployment.yaml")
    text = (DEPLOY / "k8s/worker.yaml").read_text().replace("containerPort: 9090", "containerPort: nine")
    broken.write_text(text)
    validate = pathlib.Path(sys.executable).parent / "kubernetes-validate"
    if subprocess.run([str(validate), "--strict", "--quiet", str(broken)], capture_output=True).returncode == 0:
        fail("selftest: kubernetes-validate accepted containerPort: nine")
    rules_dir = pathlib.Path(tmp, "rules")
    rules_dir.mkdir(exist_ok=True)
    alerts = (DEPLOY / "prometheus/alerts.yml").read_text().replace("> 26 * 3600", "> 30 * 3600")
    (rules_dir / "alerts.yml").write_text(alerts)
    (rules_dir / "alerts_test.yml").write_text((DEPLOY / "prometheus/alerts_test.yml").read_text())
    r = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"], cwd=rules_dir, capture_output=True)
    if r.returncode == 0:
        fail("selftest: the alert unit tests passed with the backup threshold moved to 30 h")
    print("selftest: the compose schema, kubernetes-validate and the alert tests each refuse a broken copy")


def main():
    what = sys.argv[1]
    if what == "rules":
        rules(sys.argv[2])
    elif what == "compose":
        compose(sys.argv[2])
    elif what == "k8s":
        k8s()
    elif what == "selftest":
        selftest(sys.argv[2], sys.argv[3])
    elif what == "run":
        run(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"unknown check {what}")
    if failures:
        sys.exit(f"{len(failures)} problem(s) in deploy/")


if __name__ == "__main__":
    main()
