#!/usr/bin/env python3
"""Checks the agent's Helm chart (deploy/helm/sre-lab-agent) with Helm's own engine.

  helm-chart-check.py [--chart DIR] [--kube-version V]

1. Lints the chart (strict: warnings fail) with its defaults and with every switch flipped.
2. Renders it offline, as `helm template sre-lab-agent CHART --namespace monitoring` would, for
   each case below, and validates every rendering with the same schema checks as the kustomize
   output (`scripts/validate-manifests.py manifests`).
3. Compares the renderings with the kustomize snapshots the installer applies:
     defaults                == deploy/rendered/lab.yaml     (deploy/overlays/lab)
     flows.enabled=false     == deploy/rendered/no-ebpf.yaml (deploy/overlays/no-ebpf)
   "Equal" means the same objects (kind, namespace, name) with the same contents once Helm's
   own labels (helm.sh/chart, app.kubernetes.io/managed-by|instance|version) and the pod
   template's checksum/ annotations are set aside and kustomize's ConfigMap hash suffix is
   taken off the name and its references.
4. Checks that the values do what they say: serviceMonitor/dashboards off remove exactly those
   objects; image, resources, tolerations, config and extraEnv land where they should.

Helm's engine is the PyPI package helm-python-sdk (Helm v4 as a library; no helm binary).
Needs it, PyPI kubernetes-validate, jsonschema and PyYAML. Exits 0 when every check passed,
1 when one failed, 2 on a usage error.
"""

import argparse
import copy
import importlib.util
import logging
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
RELEASE = "sre-lab-agent"
NAMESPACE = "monitoring"
APP_VERSION = None  # the chart's appVersion, read in main()


def helm_label(k, v):
    """Helm's own labels, as the chart renders them for RELEASE."""
    return (k == "helm.sh/chart" or (k, v) == ("app.kubernetes.io/managed-by", "Helm")
            or (k, v) == ("app.kubernetes.io/instance", RELEASE)
            or (k, v) == ("app.kubernetes.io/version", APP_VERSION))


def kustomize_label(k, v):
    """The kustomize way's counterpart of Helm's managed-by label."""
    return (k, v) == ("app.kubernetes.io/managed-by", "sre-lab-installer")
# kustomize's name suffix: 10 hex digits with 0, 1, 3, a, e written g, h, k, m, t (the same
# alphabet installer/src/kube.rs prunes by).
HASH_SUFFIX = re.compile(r"^(.*)-[bcdfghkmt2456789]{10}$")

failures = []


def check(ok, what):
    print(f"{'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        failures.append(what)
    return ok


def documents(text):
    import yaml

    return [d for d in yaml.safe_load_all(text) if d]


def key(doc):
    meta = doc.get("metadata") or {}
    return (doc["kind"], meta.get("namespace") or "", meta["name"])


def strip(value, is_label, parent=None):
    """A copy of an object without the labels `is_label` names (in labels and selectors) and
    without the pod template's checksum/ annotations."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if parent in ("labels", "matchLabels", "selector") and isinstance(v, str) and is_label(k, v):
                continue
            if parent == "annotations" and k.startswith("checksum/"):
                continue
            v = strip(v, is_label, k)
            if k in ("labels", "annotations", "matchLabels", "selector") and v == {}:
                continue
            out[k] = v
        return out
    if isinstance(value, list):
        return [strip(v, is_label, parent) for v in value]
    return value


def unhash(docs):
    """kustomize's objects with the hash suffix taken off generated ConfigMaps and references."""
    renamed = {}
    for d in docs:
        if d["kind"] == "ConfigMap":
            m = HASH_SUFFIX.match(d["metadata"]["name"])
            if m:
                renamed[d["metadata"]["name"]] = m.group(1)

    def walk(v):
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, str) and v in renamed:
            return renamed[v]
        return v

    return [walk(d) for d in docs]


def differences(a, b, path=""):
    """Where a and b differ, as `path: a != b` lines."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            p = f"{path}.{k}" if path else str(k)
            if k not in a:
                out.append(f"{p}: only in kustomize's rendering")
            elif k not in b:
                out.append(f"{p}: only in the chart's")
            else:
                out.extend(differences(a[k], b[k], p))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out.extend(differences(x, y, f"{path}[{i}]"))
        return out
    if a != b:
        show = lambda v: (repr(v)[:120] + "...") if len(repr(v)) > 120 else repr(v)
        return [f"{path}: chart {show(a)} != kustomize {show(b)}"]
    return []


def compare(chart_docs, snapshot, label):
    with open(os.path.join(ROOT, snapshot)) as f:
        kustomize = unhash(documents(f.read()))
    mine = {key(d): strip(d, helm_label) for d in chart_docs}
    theirs = {key(d): strip(d, kustomize_label) for d in kustomize}
    check(sorted(mine) == sorted(theirs),
          f"{label}: the same objects as {snapshot} "
          f"(chart only: {sorted(set(mine) - set(theirs))}, kustomize only: {sorted(set(theirs) - set(mine))})")
    for k in sorted(set(mine) & set(theirs)):
        diff = differences(mine[k], theirs[k])
        check(not diff, f"{label}: {k[0]} {k[1]}/{k[2]} equals kustomize's" + "".join(f"\n       {d}" for d in diff[:20]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chart", default=os.path.join(ROOT, "deploy", "helm", "sre-lab-agent"))
    ap.add_argument("--kube-version", default="1.33.0")
    args = ap.parse_args(argv)
    missing = [m for m in ("helm_python", "yaml") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"error: missing Python modules {', '.join(missing)}; pip install helm-python-sdk pyyaml",
              file=sys.stderr)
        return 2
    import helm_python as helm
    global APP_VERSION

    # The SDK logs each symbolic link it follows (files/ links to deploy/base and deploy/dashboards).
    logging.getLogger().setLevel(logging.WARNING)
    print(f"Helm SDK {helm.helm_sdk_version()} (helm-python-sdk), chart {os.path.relpath(args.chart, ROOT)}")

    all_off = {"flows": {"enabled": False}, "serviceMonitor": {"enabled": False},
               "dashboards": {"enabled": False}, "rbac": {"create": False},
               "serviceAccount": {"create": False, "name": "x"}, "existingConfigMap": "cm"}
    for label, values in [("defaults", None), ("every switch flipped", all_off)]:
        report = helm.lint(args.chart, values, strict=True, namespace=NAMESPACE,
                           kube_version=f"v{args.kube_version}")
        bad = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2] + \
              [{"error": e} for e in report.get("errors") or []]
        linted = report.get("total_charts_linted")
        check(not bad and linted == 1, f"helm lint --strict ({label}), {linted} chart linted"
              + "".join(f"\n       {m}" for m in bad))

    chart = helm.Chart.load(args.chart)
    APP_VERSION = str(chart.metadata.get("appVersion", ""))

    def render(values=None, name=RELEASE, namespace=NAMESPACE):
        out = chart.render(values, name=name, namespace=namespace, is_install=True)
        docs = []
        for path in sorted(out):
            if path.endswith(".yaml") or path.endswith(".yml"):
                docs.extend(documents(out[path]))
        return docs

    import yaml

    cases = {
        "defaults": render(),
        "flows off": render({"flows": {"enabled": False}}),
        "serviceMonitor and dashboards off": render({"serviceMonitor": {"enabled": False},
                                                     "dashboards": {"enabled": False}}),
        "custom values": render({
            "image": {"repository": "registry.example/agent", "tag": "1.2.3", "pullPolicy": "Always"},
            "resources": {"requests": {"cpu": "250m", "memory": "1Gi"}},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "obs", "effect": "NoSchedule"}],
            "config": "global:\n  scrape_interval: 30s\n",
            "extraEnv": [{"name": "CLUSTER_NAME", "value": "prod"}],
            "serviceMonitor": {"labels": {"release": "kps"}},
            "dashboards": {"namespace": "grafana", "name": "agent-dashboards"},
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["obs"]}]}]}}},
            "priorityClassName": "high",
            "podAnnotations": {"example.com/team": "sre"},
            "podLabels": {"team": "sre"},
        }),
        # `helm install agent -n obs`: names from the release, references kept consistent.
        "release agent in obs": render(name="agent", namespace="obs"),
        "existingConfigMap": render({"existingConfigMap": "my-agent-config"}),
        "every switch flipped": render(all_off),
    }

    # Schema checks, the same as the kustomize output gets.
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for label, docs in cases.items():
            path = os.path.join(tmp, re.sub(r"\W+", "-", label) + ".yaml")
            with open(path, "w") as f:
                yaml.safe_dump_all(docs, f)
            files.append(path)
        out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "validate-manifests.py"),
                              "manifests", "--kube-version", args.kube_version, *files],
                             capture_output=True, text=True)
        summary = (out.stdout.strip().splitlines() or ["(no output)"])[-1]
        check(out.returncode == 0, f"schema checks of every rendering (validate-manifests.py manifests): {summary}"
              + "".join(f"\n       {l}" for l in (out.stdout + out.stderr).splitlines() if l.startswith(("FAIL", "error"))))

    compare(cases["defaults"], "deploy/rendered/lab.yaml", "defaults")
    compare(cases["flows off"], "deploy/rendered/no-ebpf.yaml", "flows.enabled=false")

    # The switches remove exactly their objects.
    defaults = {key(d) for d in cases["defaults"]}
    off = {key(d) for d in cases["serviceMonitor and dashboards off"]}
    check(defaults - off == {("ServiceMonitor", NAMESPACE, RELEASE), ("ConfigMap", NAMESPACE, "sre-lab-dashboards")},
          f"serviceMonitor.enabled=false and dashboards.enabled=false remove those two objects only: {sorted(defaults - off)}")
    flipped = {k[0] for k in map(key, cases["every switch flipped"])}
    check(flipped == {"DaemonSet", "Service"},
          f"with every switch off only the DaemonSet and its Service remain: {sorted(flipped)}")

    # Values land where they say.
    custom = {key(d): d for d in cases["custom values"]}
    ds = custom[("DaemonSet", NAMESPACE, RELEASE)]
    pod = ds["spec"]["template"]["spec"]
    c = pod["containers"][0]
    check(c["image"] == "registry.example/agent:1.2.3" and c["imagePullPolicy"] == "Always", f"image: {c['image']}")
    # Helm merges maps with the defaults: the requests given, the default limits kept.
    check(c["resources"] == {"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
          f"resources: {c['resources']}")
    check(pod["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "obs", "effect": "NoSchedule"}],
          f"tolerations: {pod['tolerations']}")
    check({"name": "CLUSTER_NAME", "value": "prod"} in c["env"], "extraEnv")
    cm = custom[("ConfigMap", NAMESPACE, f"{RELEASE}-config")]
    check(cm["data"]["agent.yml"] == "global:\n  scrape_interval: 30s\n", f"config: {cm['data']['agent.yml']!r}")
    default_ds = {key(d): d for d in cases["defaults"]}[("DaemonSet", NAMESPACE, RELEASE)]
    check(ds["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
          != default_ds["spec"]["template"]["metadata"]["annotations"]["checksum/config"],
          "a changed config changes the pod template (checksum/config), so the pods roll")
    check(pod.get("nodeSelector") == {"kubernetes.io/os": "linux"} and "nodeAffinity" in pod.get("affinity", {})
          and pod.get("priorityClassName") == "high", "nodeSelector, affinity, priorityClassName")
    meta = ds["spec"]["template"]["metadata"]
    check(meta["annotations"].get("example.com/team") == "sre" and meta["labels"].get("team") == "sre"
          and ds["spec"]["selector"]["matchLabels"].get("team") is None,
          "podAnnotations and podLabels on the pods (not in the selector)")
    sm = custom[("ServiceMonitor", NAMESPACE, RELEASE)]
    check(sm["metadata"]["labels"].get("release") == "kps", "serviceMonitor.labels")
    check(("ConfigMap", "grafana", "agent-dashboards") in custom, "dashboards.namespace and .name")

    # Another release name and namespace: every reference follows.
    other = {key(d): d for d in cases["release agent in obs"]}
    fullname = "agent-sre-lab-agent"
    ds = other.get(("DaemonSet", "obs", fullname))
    if check(ds is not None, f"release agent in obs: DaemonSet obs/{fullname} ({sorted(other)})"):
        pod = ds["spec"]["template"]["spec"]
        sel = ds["spec"]["selector"]["matchLabels"]
        svc = other[("Service", "obs", fullname)]
        sm = other[("ServiceMonitor", "obs", fullname)]
        crb = other[("ClusterRoleBinding", "", fullname)]
        check(pod["serviceAccountName"] == fullname and ("ServiceAccount", "obs", fullname) in other,
              "release agent in obs: the pods run as the release's ServiceAccount")
        check(crb["subjects"] == [{"kind": "ServiceAccount", "name": fullname, "namespace": "obs"}]
              and crb["roleRef"]["name"] == fullname and ("ClusterRole", "", fullname) in other,
              f"release agent in obs: the ClusterRoleBinding binds that ServiceAccount in obs: {crb['subjects']}")
        volume = next(v for v in pod["volumes"] if v["name"] == "config")["configMap"]["name"]
        check(("ConfigMap", "obs", volume) in other,
              f"release agent in obs: the config volume's ConfigMap {volume} is rendered")
        labels = ds["spec"]["template"]["metadata"]["labels"]
        check(sel["app.kubernetes.io/instance"] == "agent"
              and svc["spec"]["selector"].get("app.kubernetes.io/instance") == "agent"
              and sm["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/instance") == "agent"
              and all(labels.get(k) == v for k, v in sel.items())
              and all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
              and all(svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items()),
              "release agent in obs: the DaemonSet, Service and ServiceMonitor selectors match the pods and Service")
    existing = {key(d): d for d in cases["existingConfigMap"]}
    ds = existing[("DaemonSet", NAMESPACE, RELEASE)]
    volume = next(v for v in ds["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")["configMap"]["name"]
    check(volume == "my-agent-config" and ("ConfigMap", NAMESPACE, f"{RELEASE}-config") not in existing
          and "checksum/config" not in (ds["spec"]["template"]["metadata"].get("annotations") or {}),
          "existingConfigMap: mounted, no chart ConfigMap, no checksum of a config the chart does not hold")

    print(f"{'FAILED' if failures else 'passed'}: {len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
