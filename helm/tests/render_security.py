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

# The control plane's certificate from cert-manager: a Certificate for its Service names, into the
# Secret the control plane mounts and whose ca.crt data planes trust; no generated Secret.
d = render({"tls": {"mode": "cert-manager", "certManager": {"issuer": {"name": "relay-ca", "kind": "ClusterIssuer"}}}})
cert = one(d, "Certificate", "control-plane")
check(cert["spec"]["issuerRef"] == {"name": "relay-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}, str(cert))
check(any(n.endswith("-control-plane.relay.svc") for n in cert["spec"]["dnsNames"]), str(cert["spec"]["dnsNames"]))
cpd = one(d, "Deployment", "control-plane")
vols = {v["name"]: v for v in cpd["spec"]["template"]["spec"]["volumes"]}
check(vols["tls"]["secret"]["secretName"] == cert["spec"]["secretName"], str(vols.get("tls")))
check(not [x for x in d if x["kind"] == "Secret" and x["metadata"]["name"] == cert["spec"]["secretName"]],
      "cert-manager writes the Secret, not the chart")
dp = container([x for x in d if x["kind"] in ("Deployment", "StatefulSet") and "data-plane" in x["metadata"]["name"]][0])
check(any(a.startswith("--control-plane=https://") for a in dp["args"]), str(dp["args"]))
refuses({"tls": {"mode": "cert-manager"}}, "tls.certManager.issuer.name is required")

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
# A password in redis.url would sit in the workloads' spec for anyone who reads Deployments: refused
# (without repeating it), pointing at redis.existingSecret.
for url in ("redis://:hunter2@redis:6379/0", "rediss://relay:hunter2@redis:6380"):
    refuses({"redis": {"url": url}}, "redis.existingSecret")
    try:
        render({"redis": {"url": url}})
    except Exception as e:
        check("hunter2" not in str(e), f"the refusal repeats the password: {e}")
# Leader election: etcd when enabled, else the Postgres advisory lock (no etcd env at all).
d = render({"etcd": {"enabled": True, "endpoints": ["http://etcd-0.etcd:2379", "http://etcd-1.etcd:2379"], "leaderTtlSecs": 6}})
e = env(container(one(d, "Deployment", "control-plane")))
check(e.get("RELAY_ETCD_ENDPOINTS") == "http://etcd-0.etcd:2379,http://etcd-1.etcd:2379", f"etcd env: {e}")
check(e.get("RELAY_LEADER_TTL_SECS") == "6" and e.get("RELAY_ETCD_PREFIX") == "/relay/", f"etcd env: {e}")
e = env(container(one(render({}), "Deployment", "control-plane")))
check("RELAY_ETCD_ENDPOINTS" not in e and e.get("RELAY_LEADER_TTL_SECS") == "10", f"no etcd: {e}")
refuses({"etcd": {"enabled": True}}, "etcd.endpoints")
refuses({"etcd": {"enabled": True, "endpoints": ["etcd:2379"]}}, "etcd")
# etcd with authentication and TLS: the user in env, the password, the CA and the client
# certificate from the operator's Secrets, mounted as files the flags name; no secret in env.
ETCD_SECURE = {
    "enabled": True,
    "endpoints": ["https://etcd-0.etcd:2379"],
    "auth": {"user": "relay", "existingSecret": {"name": "etcd-relay-user", "key": "etcd-password"}},
    "tls": {"caSecret": {"name": "etcd-ca", "key": "ca.pem"}, "clientCertSecret": "etcd-relay-client"},
}
d = render({"etcd": ETCD_SECURE})
cpw = one(d, "Deployment", "control-plane")
c = container(cpw)
e = env(c)
check(e.get("RELAY_ETCD_ENDPOINTS") == "https://etcd-0.etcd:2379", f"etcd env: {e}")
check(e.get("RELAY_ETCD_USER") == "relay", f"etcd env: {e}")
volumes = {v["name"]: v for v in cpw["spec"]["template"]["spec"]["volumes"]}
mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}


def mounted_file(path):
    """The (Secret, key) a file path in the container reads, or None."""
    for mount_path, name in mounts.items():
        if path.startswith(mount_path + "/") and "secret" in volumes[name]:
            rel = path[len(mount_path) + 1 :]
            sec = volumes[name]["secret"]
            for item in sec.get("items", []):
                if item["path"] == rel:
                    return (sec["secretName"], item["key"])
    return None


check(mounted_file(e.get("RELAY_ETCD_PASSWORD_FILE", "")) == ("etcd-relay-user", "etcd-password"), f"{e} {volumes}")
check(mounted_file(e.get("RELAY_ETCD_CA_FILE", "")) == ("etcd-ca", "ca.pem"), f"{e} {volumes}")
check(mounted_file(e.get("RELAY_ETCD_CERT_FILE", "")) == ("etcd-relay-client", "tls.crt"), f"{e} {volumes}")
check(mounted_file(e.get("RELAY_ETCD_KEY_FILE", "")) == ("etcd-relay-client", "tls.key"), f"{e} {volumes}")
for ev in c["env"]:
    ref = ev.get("valueFrom", {}).get("secretKeyRef", {})
    check(ref.get("name") not in ("etcd-relay-user", "etcd-relay-client"), f"an etcd secret in env: {ev}")
check(all(m["readOnly"] for m in c["volumeMounts"] if m["name"].startswith("etcd-")), str(c["volumeMounts"]))
# Without auth and TLS: none of it.
d = render({"etcd": {"enabled": True, "endpoints": ["http://etcd-0.etcd:2379"]}})
cpw = one(d, "Deployment", "control-plane")
e = env(container(cpw))
check(not [k for k in e if k.startswith(("RELAY_ETCD_USER", "RELAY_ETCD_PASSWORD", "RELAY_ETCD_CA", "RELAY_ETCD_CERT", "RELAY_ETCD_KEY"))], f"{e}")
check(not [v for v in cpw["spec"]["template"]["spec"]["volumes"] if v["name"].startswith("etcd-")], "no etcd volumes")
# Refused: a user without its password Secret (and the reverse), TLS files with http:// endpoints.
refuses({"etcd": {"enabled": True, "endpoints": ["http://e:2379"], "auth": {"user": "relay"}}}, "etcd.auth.existingSecret.name")
refuses(
    {"etcd": {"enabled": True, "endpoints": ["http://e:2379"], "auth": {"existingSecret": {"name": "s"}}}},
    "etcd.auth.user",
)
refuses({"etcd": dict(ETCD_SECURE, endpoints=["https://etcd-0:2379", "http://etcd-1:2379"])}, "https://")
refuses({"etcd": dict(ETCD_SECURE, endpoints=["http://etcd-0:2379"], auth={})}, "etcd.tls is for https:// endpoints")
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
