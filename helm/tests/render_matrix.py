"""Lints the chart and renders it with Helm's own library (helm-python-sdk) under several value
sets, then validates every rendered manifest with kubernetes-validate against each Kubernetes
minor version the chart claims to support (Chart.yaml's kubeVersion, up to the newest schema
kubernetes-validate ships). Custom resources (ServiceMonitor, PrometheusRule: not in Kubernetes'
own schemas) and cert-manager's Certificate get structural checks here instead. Finally, the default render is compared with
the committed snapshot helm/tests/snapshots/default.yaml (generated TLS material and the
dashboard's JSON, checked to be dashboards/relay.json as it is, masked).

    python3 helm/tests/render_matrix.py helm/relay            check
    python3 helm/tests/render_matrix.py helm/relay --update   rewrite the snapshot

Run by e2e/tests/chart.rs (RELAY_UPDATE_SNAPSHOTS=1 passes --update). Exits non-zero with the
reason on the first failure."""

import difflib
import os
import re
import sys

import kubernetes_validate
import yaml
from helm_python import Chart, lint

CHART = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else "helm/relay"
UPDATE = "--update" in sys.argv
SNAPSHOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "snapshots", "default.yaml")

SECRETS = {
    "databaseUrl": {"value": "postgres://relay:pw@db:5432/relay?sslmode=verify-full"},
    "masterKey": {"value": "A" * 43 + "="},
    "adminToken": {"value": "rat-" + "a" * 64},
    "dataPlaneToken": {"value": "rat-" + "b" * 64},
}
EXISTING = {
    "databaseUrl": {"existingSecret": "relay-db"},
    "masterKey": {"existingSecret": "relay-keys"},
    "adminToken": {"existingSecret": "relay-keys"},
    "dataPlaneToken": {"existingSecret": "relay-keys"},
    "dataPlaneCacheKey": {"existingSecret": "relay-keys"},
}
MTLS = {"clientAuth": {"enabled": True, "issuer": {"name": "relay-dp"}, "caSecret": "relay-dp-ca"}}
MONITORING = {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}

# name -> (values, what must be rendered: list of (kind, name part))
VALUE_SETS = {
    "defaults with secrets": ({"secrets": SECRETS}, [("Secret", "relay"), ("Deployment", "data-plane")]),
    "existing Secrets": ({"secrets": EXISTING}, [("Deployment", "control-plane")]),
    "persistence on": (
        {"secrets": SECRETS, "dataPlane": {"persistence": {"enabled": True}}},
        [("StatefulSet", "data-plane")],
    ),
    "HPA on": (
        {"secrets": SECRETS, "dataPlane": {"autoscaling": {"enabled": True}}},
        [("HorizontalPodAutoscaler", "data-plane")],
    ),
    "TLS from a Secret, mTLS on": (
        {"secrets": SECRETS, "tls": dict(MTLS, mode="secret", secret="relay-cp-cert")},
        [("Deployment", "control-plane")],
    ),
    "TLS from cert-manager, mTLS on": (
        {"secrets": SECRETS, "tls": dict(MTLS, mode="cert-manager", certManager={"issuer": {"name": "relay-ca", "kind": "ClusterIssuer"}})},
        [("Certificate", "control-plane"), ("Deployment", "data-plane")],
    ),
    "TLS off, no NetworkPolicy": (
        {"secrets": SECRETS, "tls": {"mode": "off"}, "networkPolicy": {"enabled": False}},
        [("Deployment", "data-plane")],
    ),
    "Redis and etcd on": (
        {
            "secrets": SECRETS,
            "redis": {"existingSecret": {"name": "relay-redis", "key": "url"}},
            "etcd": {"enabled": True, "endpoints": ["http://etcd-0.etcd:2379"]},
        },
        [("Deployment", "control-plane")],
    ),
    "etcd with auth and TLS": (
        {
            "secrets": SECRETS,
            "etcd": {
                "enabled": True,
                "endpoints": ["https://etcd-0.etcd:2379", "https://etcd-1.etcd:2379"],
                "auth": {"user": "relay", "existingSecret": {"name": "etcd-relay-user"}},
                "tls": {"caSecret": {"name": "etcd-ca"}, "clientCertSecret": "etcd-relay-client"},
            },
        },
        [("Deployment", "control-plane")],
    ),
    "ServiceMonitor and PrometheusRule on": (
        {"secrets": SECRETS, "metrics": MONITORING},
        [("ServiceMonitor", "relay"), ("PrometheusRule", "relay")],
    ),
    "dashboards on": ({"secrets": SECRETS, "dashboards": {"enabled": True}}, [("ConfigMap", "dashboard")]),
    "everything on": (
        {
            "secrets": EXISTING,
            "tls": MTLS,
            "dataPlane": {"persistence": {"enabled": True}, "autoscaling": {"enabled": True}},
            "redis": {"url": "redis://redis:6379/0"},
            "etcd": {"enabled": True, "endpoints": ["http://etcd-0.etcd:2379"]},
            "metrics": MONITORING,
            "dashboards": {"enabled": True},
        },
        [("StatefulSet", "data-plane"), ("HorizontalPodAutoscaler", "data-plane"), ("PrometheusRule", "relay")],
    ),
}


def fail(what):
    print(f"FAIL: {what}", file=sys.stderr)
    sys.exit(1)


def render_raw(values, release="relay"):
    with Chart.load(CHART) as chart:
        return chart.render(values=values, name=release, namespace="relay")


def documents(out):
    docs = []
    for name, text in sorted(out.items()):
        if not name.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((name, doc))
    return docs


def supported_versions():
    """The minor versions kubeVersion (">=1.X.0-0") admits that kubernetes-validate has schemas for."""
    chart = yaml.safe_load(open(os.path.join(CHART, "Chart.yaml")))
    m = re.fullmatch(r">=\s*1\.(\d+)\.0(-0)?", chart.get("kubeVersion", ""))
    if not m:
        fail(f"kubeVersion {chart.get('kubeVersion')!r}: this check understands '>=1.N.0-0'")
    lowest = int(m.group(1))
    newest = int(kubernetes_validate.latest_version().split(".")[1])
    versions = [f"1.{n}.0" for n in range(lowest, newest + 1)]
    schemas = os.path.join(os.path.dirname(kubernetes_validate.__file__), "kubernetes-json-schema")
    for v in versions:
        if not os.path.isdir(os.path.join(schemas, f"v{v}-local")):
            fail(f"kubeVersion claims {v} but kubernetes-validate has no schema for it: raise kubeVersion")
    return versions


def check_custom_resource(name, doc):
    kind = doc["kind"]
    if kind == "ServiceMonitor":
        eps = doc["spec"]["endpoints"]
        if not eps or not all("port" in e and e.get("path") == "/metrics" for e in eps):
            fail(f"{name}: ServiceMonitor endpoints {eps}")
        if not doc["spec"].get("selector", {}).get("matchLabels"):
            fail(f"{name}: ServiceMonitor without a selector")
    elif kind == "PrometheusRule":
        groups = doc["spec"]["groups"]
        for g in groups:
            for r in g["rules"]:
                if not ("alert" in r or "record" in r) or not r.get("expr"):
                    fail(f"{name}: rule {r}")
        if not groups:
            fail(f"{name}: PrometheusRule without groups")
    elif kind == "Certificate":
        spec = doc["spec"]
        if not spec.get("secretName") or not spec.get("dnsNames") or not spec.get("issuerRef", {}).get("name"):
            fail(f"{name}: Certificate without secretName, dnsNames or issuerRef: {spec}")
        if "server auth" not in spec.get("usages", []):
            fail(f"{name}: the control plane's Certificate must allow server auth: {spec.get('usages')}")
        known = {"secretName", "secretTemplate", "commonName", "dnsNames", "duration", "renewBefore", "privateKey", "usages", "issuerRef"}
        if set(spec) - known:
            fail(f"{name}: unknown Certificate fields {set(spec) - known}")
    else:
        fail(f"{name}: {doc['apiVersion']} {kind} is neither in Kubernetes' schemas nor a known custom resource")


# What the API server checks and the schemas do not: a Service's name is a DNS-1035 label (63
# characters), and a StatefulSet's at most 52 (its pods' controller-revision-hash label is the name
# and 11 more characters, within a label value's 63).
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
NAME_LIMITS = {"Service": 63, "StatefulSet": 52}


def check_names(label, docs):
    for name, doc in docs:
        limit = NAME_LIMITS.get(doc["kind"])
        meta_name = doc["metadata"]["name"]
        if limit and (len(meta_name) > limit or not DNS_1035.fullmatch(meta_name)):
            fail(f"[{label}] {name}: {doc['kind']} name {meta_name!r} ({len(meta_name)} characters) is not a DNS-1035 label of at most {limit}")


def validate(label, docs, versions):
    check_names(label, docs)
    for name, doc in docs:
        if doc["apiVersion"] in ("monitoring.coreos.com/v1", "cert-manager.io/v1"):
            check_custom_resource(name, doc)
            continue
        for v in versions:
            try:
                kubernetes_validate.validate(doc, v, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(f"[{label}] {name} {doc['kind']}/{doc['metadata']['name']} on Kubernetes {v}: {e.message} at {list(e.path)}")
            except kubernetes_validate.SchemaNotFoundError:
                fail(f"[{label}] {name}: no schema for {doc['apiVersion']} {doc['kind']} on Kubernetes {v}")


GENERATED = re.compile(r"^(  (?:tls\.crt|tls\.key|ca\.crt): ).+$", re.M)


def snapshot_text(out):
    parts = []
    for name, text in sorted(out.items()):
        if name.endswith("tls-secret.yaml"):
            text = GENERATED.sub(r"\1<generated at install: genCA/genSignedCert>", text)
        if name.endswith("dashboard-configmap.yaml"):
            # The dashboard is its own file (owned and reviewed there): check it is carried as it
            # is, and keep its body out of the snapshot.
            doc = yaml.safe_load(text)
            with open(os.path.join(CHART, "dashboards", "relay.json")) as f:
                if doc["data"]["relay.json"].strip() != f.read().strip():
                    fail("the dashboard ConfigMap does not carry dashboards/relay.json as it is")
            head, _, _ = text.partition("  relay.json: |-")
            text = head + "  relay.json: <helm/relay/dashboards/relay.json, as it is>\n"
        parts.append(f"# ---- {name} ----\n{text.strip()}\n")
    return "\n".join(parts)


result = lint(CHART, values={"secrets": SECRETS})
if result["errors"]:
    fail(f"helm lint: {result}")
versions = supported_versions()
counted = 0
for label, (values, expected) in VALUE_SETS.items():
    try:
        docs = documents(render_raw(values))
    except Exception as e:  # HelmRenderError and friends: the message says what
        fail(f"[{label}] render: {e}")
    for kind, part in expected:
        if not any(d["kind"] == kind and part in d["metadata"]["name"] for _, d in docs):
            fail(f"[{label}] no {kind} *{part}* rendered: {[(d['kind'], d['metadata']['name']) for _, d in docs]}")
    validate(label, docs, versions)
    counted += len(docs)
    print(f"  {label}: {len(docs)} manifests valid on Kubernetes {versions[0]}..{versions[-1]}")

# Helm's longest release name (53 characters): every name still fits, and with persistence (a
# StatefulSet, at most 52) rendering says what to do instead of rendering what Kubernetes refuses.
LONG = "relay-" + "x" * 47
for label, values in [
    ("longest release name", {"secrets": SECRETS, "metrics": MONITORING}),
    ("longest release name, fullnameOverride, persistence", {"secrets": SECRETS, "fullnameOverride": "r" * 60, "dataPlane": {"persistence": {"enabled": True}}}),
]:
    try:
        docs = documents(render_raw(values, release=LONG))
    except Exception as e:
        if "persistence" in label and "Kubernetes allows 52" in str(e) and "fullnameOverride" in str(e):
            print(f"  {label}: refused ({str(e).split(': ', 2)[-1][:80]}...)")
            continue
        fail(f"[{label}] render: {e}")
    if "persistence" in label:
        fail(f"[{label}] rendered a StatefulSet whose name Kubernetes cannot use")
    validate(label, docs, versions)
    print(f"  {label}: {len(docs)} manifests valid")

text = snapshot_text(render_raw({"secrets": SECRETS}))
if UPDATE:
    os.makedirs(os.path.dirname(SNAPSHOT), exist_ok=True)
    with open(SNAPSHOT, "w") as f:
        f.write(text)
    print(f"snapshot written: {SNAPSHOT}")
else:
    try:
        old = open(SNAPSHOT).read()
    except FileNotFoundError:
        old = ""
    if old != text:
        diff = "".join(difflib.unified_diff(old.splitlines(True), text.splitlines(True), "snapshot", "rendered"))
        fail(
            "the default render differs from helm/tests/snapshots/default.yaml; if the change is meant, "
            "update it with `RELAY_UPDATE_SNAPSHOTS=1 cargo test -p relay-e2e --test chart` and commit it:\n"
            + diff[:20000]
        )
print(f"chart lint, render and validation: ok ({counted} manifests, {len(VALUE_SETS)} value sets)")
