"""Renders the chart with Helm's own library (helm-python-sdk) and checks what the security
settings produce: TLS on by default (a generated CA and certificate, https:// for data planes,
no --insecure-control-plane), bring-your-own and off modes, mTLS through cert-manager's
csi-driver, the NetworkPolicy, refusals of settings that cannot work, and that the PrometheusRule
and the dashboard ConfigMap carry alerts/relay.rules.yaml and dashboards/relay.json unchanged. Exits non-zero with
the reason on the first failure. Run by e2e/tests/chart.rs."""

import sys

import yaml
from helm_python import Chart, lint

CHART = sys.argv[1] if len(sys.argv) > 1 else "helm/relay"
BASE = {
    "secrets": {
        "databaseUrl": {"value": "postgres://relay:pw@db:5432/relay?sslmode=verify-full"},
        "masterKey": {"value": "A" * 43 + "="},
        "adminToken": {"value": "rat-" + "a" * 64},
        "dataPlaneToken": {"value": "rat-" + "b" * 64},
    }
}


def merge(a, b):
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def render(extra):
    with Chart.load(CHART) as chart:
        out = chart.render(values=merge(BASE, extra), name="demo", namespace="relay")
    docs = []
    for name, text in out.items():
        if not name.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["__file"] = name
                docs.append(doc)
    return docs


def one(docs, kind, name_part):
    found = [d for d in docs if d["kind"] == kind and name_part in d["metadata"]["name"]]
    assert len(found) == 1, f"expected one {kind} *{name_part}*, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def container(workload):
    return workload["spec"]["template"]["spec"]["containers"][0]


def env(c):
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def refuses(extra, message):
    try:
        render(extra)
    except Exception as e:  # the library raises HelmRenderError / HelmValuesError
        check(message in str(e), f"refusal should say {message!r}, said: {e}")
        return
    raise AssertionError(f"{extra} was accepted")


lint_result = lint(CHART)
check(not lint_result["errors"], f"lint: {lint_result}")

# Default: TLS with generated certificates, data planes verify them, a NetworkPolicy.
d = render({})
secret = one(d, "Secret", "control-plane-tls")
check(set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}, f"tls secret keys: {secret['data'].keys()}")
cp = container(one(d, "Deployment", "control-plane"))
check("--tls-cert=/etc/relay/tls/tls.crt" in cp["args"], f"cp args: {cp['args']}")
check("grpc" not in cp["readinessProbe"], "the kubelet's gRPC probe cannot speak TLS")
dpw = [x for x in d if x["kind"] in ("Deployment", "StatefulSet") and "data-plane" in x["metadata"]["name"]][0]
dp = container(dpw)
url = [a for a in dp["args"] if a.startswith("--control-plane=")][0]
check(url.startswith("--control-plane=https://demo-relay-control-plane.relay.svc:"), url)
check("--insecure-control-plane" not in dp["args"], f"dp args: {dp['args']}")
check(env(dp).get("RELAY_CONTROL_PLANE_CA") == "/etc/relay/cp-ca/ca.crt", f"dp env: {env(dp)}")
np = one(d, "NetworkPolicy", "control-plane")
grpc_rule = np["spec"]["ingress"][0]
check(grpc_rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "data-plane", str(grpc_rule))
check(len(grpc_rule["from"]) == 1, "only data planes by default")

# Off: plaintext, explicitly.
d = render({"tls": {"mode": "off"}, "networkPolicy": {"enabled": False}})
check(not [x for x in d if x["kind"] == "Secret" and "tls" in x["metadata"]["name"]], "no TLS secret when off")
check(not [x for x in d if x["kind"] == "NetworkPolicy"], "NetworkPolicy can be turned off")
dp = container([x for x in d if x["kind"] in ("Deployment", "StatefulSet") and "data-plane" in x["metadata"]["name"]][0])
check("--insecure-control-plane" in dp["args"], f"dp args: {dp['args']}")
check(any(a.startswith("--control-plane=http://") for a in dp["args"]), str(dp["args"]))

# Bring your own certificate; admins from a namespace.
d = render({"tls": {"mode": "secret", "secret": "my-cp-cert"},
            "networkPolicy": {"adminFrom": [{"namespaceSelector": {"matchLabels": {"team": "ops"}}}]}})
cpd = one(d, "Deployment", "control-plane")
vols = {v["name"]: v for v in cpd["spec"]["template"]["spec"]["volumes"]}
check(vols["tls"]["secret"]["secretName"] == "my-cp-cert", str(vols.get("tls")))
np = one(d, "NetworkPolicy", "control-plane")
check(np["spec"]["ingress"][0]["from"][1] == {"namespaceSelector": {"matchLabels": {"team": "ops"}}}, str(np))
refuses({"tls": {"mode": "secret"}}, "tls.secret is required")

# mTLS: a per-pod certificate for the pod name from cert-manager's csi-driver.
d = render({"tls": {"clientAuth": {"enabled": True, "issuer": {"name": "relay-dp"}, "caSecret": "relay-dp-ca"}}})
cp = container(one(d, "Deployment", "control-plane"))
check("--client-ca=/etc/relay/client-ca/ca.crt" in cp["args"], str(cp["args"]))
dpw = [x for x in d if x["kind"] in ("Deployment", "StatefulSet") and "data-plane" in x["metadata"]["name"]][0]
dp = container(dpw)
check("--tls-cert=/etc/relay/client/tls.crt" in dp["args"], str(dp["args"]))
csi = {v["name"]: v for v in dpw["spec"]["template"]["spec"]["volumes"]}["client-cert"]["csi"]
check(csi["volumeAttributes"]["csi.cert-manager.io/dns-names"] == "${POD_NAME}", str(csi))
check(csi["volumeAttributes"]["csi.cert-manager.io/issuer-name"] == "relay-dp", str(csi))
refuses({"tls": {"clientAuth": {"enabled": True, "issuer": {"name": "x"}}}}, "tls.clientAuth.caSecret is required")
refuses({"tls": {"mode": "off", "clientAuth": {"enabled": True, "issuer": {"name": "x"}, "caSecret": "y"}}},
        "tls.clientAuth.enabled needs TLS")
refuses({"tls": {"mode": "sometimes"}}, "tls/mode")

# Redis: both planes get RELAY_REDIS_URL, from the value or from a Secret (the URL may hold a password).
d = render({"redis": {"url": "redis://redis:6379/0"}})
for part in ("control-plane", "data-plane"):
    w = [x for x in d if x["kind"] in ("Deployment", "StatefulSet") and part in x["metadata"]["name"]][0]
    check(env(container(w)).get("RELAY_REDIS_URL") == "redis://redis:6379/0", f"{part} env: {env(container(w))}")
d = render({"redis": {"existingSecret": {"name": "relay-redis", "key": "url"}}})
dpw = [x for x in d if x["kind"] in ("Deployment", "StatefulSet") and "data-plane" in x["metadata"]["name"]][0]
ref = [e for e in container(dpw)["env"] if e["name"] == "RELAY_REDIS_URL"][0]["valueFrom"]["secretKeyRef"]
check(ref == {"name": "relay-redis", "key": "url"}, str(ref))
d = render({})
dpw = [x for x in d if x["kind"] in ("Deployment", "StatefulSet") and "data-plane" in x["metadata"]["name"]][0]
check("RELAY_REDIS_URL" not in env(container(dpw)), "no Redis unless asked")
refuses({"redis": {"url": "http://redis"}}, "redis")
# Leader election: etcd when enabled, else the Postgres advisory lock (no etcd env at all).
d = render({"etcd": {"enabled": True, "endpoints": ["http://etcd-0.etcd:2379", "http://etcd-1.etcd:2379"], "leaderTtlSecs": 6}})
e = env(container(one(d, "Deployment", "control-plane")))
check(e.get("RELAY_ETCD_ENDPOINTS") == "http://etcd-0.etcd:2379,http://etcd-1.etcd:2379", f"etcd env: {e}")
check(e.get("RELAY_LEADER_TTL_SECS") == "6" and e.get("RELAY_ETCD_PREFIX") == "/relay/", f"etcd env: {e}")
e = env(container(one(render({}), "Deployment", "control-plane")))
check("RELAY_ETCD_ENDPOINTS" not in e and e.get("RELAY_LEADER_TTL_SECS") == "10", f"no etcd: {e}")
refuses({"etcd": {"enabled": True}}, "etcd.endpoints")
refuses({"etcd": {"enabled": True, "endpoints": ["https://etcd:2379"]}}, "etcd")
# Monitoring: the PrometheusRule carries alerts/relay.rules.yaml's groups unchanged (templates in
# annotations included), and the dashboard ConfigMap the dashboard JSON.
import json  # noqa: E402
import os  # noqa: E402

d = render({"metrics": {"prometheusRule": {"enabled": True}}})
rule = one(d, "PrometheusRule", "demo")
with open(os.path.join(CHART, "alerts", "relay.rules.yaml")) as f:
    check(rule["spec"]["groups"] == yaml.safe_load(f)["groups"], "the PrometheusRule is alerts/relay.rules.yaml")
check(not [x for x in render({}) if x["kind"] == "PrometheusRule"], "no PrometheusRule unless enabled")
cm = one(render({}), "ConfigMap", "dashboard")
with open(os.path.join(CHART, "dashboards", "relay.json")) as f:
    check(json.loads(cm["data"]["relay.json"]) == json.load(f), "the dashboard ConfigMap is dashboards/relay.json")

print("chart security rendering: ok")
