"""Renders the chart with Helm's own library (helm-python-sdk) and prints every manifest as one
JSON list (release "relay", namespace "relay"). The values come as JSON on stdin. Used by
e2e/tests/chart_run.rs, which starts the binaries with what the chart renders."""

import json
import sys

import yaml
from helm_python import Chart

chart_dir = sys.argv[1] if len(sys.argv) > 1 else "helm/relay"
values = json.load(sys.stdin)
with Chart.load(chart_dir) as chart:
    out = chart.render(values=values, name="relay", namespace="relay")
docs = []
for name, text in sorted(out.items()):
    if name.endswith((".yaml", ".yml")):
        docs.extend(d for d in yaml.safe_load_all(text) if d)
json.dump(docs, sys.stdout)
