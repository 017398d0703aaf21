#!/usr/bin/env python3
"""Validate deploy/kubernetes (run by scripts/check-kubernetes.sh in its venv).

1. Render the kustomize base: `kubectl kustomize` or `kustomize build` where installed;
   otherwise the same objects are assembled here from kustomization.yaml (resources,
   namespace, labels, images, configMapGenerator without the hash suffix), and the script
   says so.
2. Validate every rendered object with kubernetes-validate, strict (unknown fields are
   errors), against each Kubernetes version in KUBERNETES_VERSIONS; the ServiceMonitor
   (a prometheus-operator CRD that kubernetes-validate has no schema for) against a schema
   of the fields it uses; the prometheus-adapter rules file likewise.
3. Check what the manifests promise: the copies of runtimes.toml and the seccomp profile
   equal the repo's, the security context (SYS_ADMIN only, never privileged, Localhost
   seccomp, AppArmor unconfined, unmasked /proc), the probes, and that
   terminationGracePeriodSeconds covers preStop + the drain of config.toml.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib

import jsonschema
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "deploy", "kubernetes")
VENV_BIN = os.path.dirname(sys.executable)
KUBERNETES_VERSIONS = ["1.33.0", "1.36.0"]

failures = []


def fail(message):
    failures.append(message)
    print(f"FAIL: {message}")


def render():
    kubectl = shutil.which("kubectl")
    kustomize = shutil.which("kustomize")
    if kustomize:
        cmd = [kustomize, "build", BASE]
    elif kubectl:
        cmd = [kubectl, "kustomize", BASE]
    else:
        print("kustomize and kubectl are not installed: assembling the base here instead")
        return assemble()
    print("rendering with:", " ".join(cmd))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def assemble():
    with open(os.path.join(BASE, "kustomization.yaml")) as f:
        k = yaml.safe_load(f)
    docs = []
    for res in k["resources"]:
        with open(os.path.join(BASE, res)) as f:
            docs.extend(d for d in yaml.safe_load_all(f) if d)
    for gen in k.get("configMapGenerator", []):
        data = {}
        for name in gen["files"]:
            with open(os.path.join(BASE, name)) as f:
                data[os.path.basename(name)] = f.read()
        docs.append({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": gen["name"]}, "data": data})
    images = {i["name"]: f'{i["newName"]}:{i["newTag"]}' for i in k.get("images", [])}
    labels = {}
    for entry in k.get("labels", []):
        labels.update(entry["pairs"])
    for d in docs:
        meta = d.setdefault("metadata", {})
        if d["kind"] != "Namespace" and "namespace" in k:
            meta["namespace"] = k["namespace"]
        meta.setdefault("labels", {}).update(labels)
        spec = d.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            c["image"] = images.get(c["image"], c["image"])
    return docs


SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object",
                                                   "additionalProperties": {"type": "string"}}},
                },
                "namespaceSelector": {"type": "object"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string"},
                            "relabelings": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "sourceLabels": {"type": "array"},
                                        "targetLabel": {"type": "string"},
                                        "replacement": {"type": "string"},
                                        "regex": {"type": "string"},
                                        "action": {"type": "string"},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}

ADAPTER_RULES_SCHEMA = {
    "type": "object",
    "required": ["rules"],
    "properties": {
        "rules": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["seriesQuery", "resources", "name", "metricsQuery"],
                "additionalProperties": False,
                "properties": {
                    "seriesQuery": {"type": "string"},
                    "resources": {"type": "object"},
                    "name": {"type": "object", "required": ["matches", "as"]},
                    "metricsQuery": {"type": "string"},
                },
            },
        }
    },
}


def validate(docs):
    builtin = [d for d in docs if d["kind"] != "ServiceMonitor"]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump_all(builtin, f)
        rendered = f.name
    adapter = os.path.join(BASE, "prometheus-adapter-rules.yaml")
    for version in KUBERNETES_VERSIONS:
        for path in (rendered, adapter):
            r = subprocess.run([os.path.join(VENV_BIN, "kubernetes-validate"), "--strict",
                                "--quiet", "-k", version, path],
                               capture_output=True, text=True)
            if r.returncode != 0 or "ERROR" in r.stdout + r.stderr:
                fail(f"kubernetes-validate {version} {os.path.basename(path)}:\n"
                     f"{r.stdout}{r.stderr}")
        print(f"kubernetes-validate --strict -k {version}: "
              f"{len(builtin) + 1} objects checked")
    os.unlink(rendered)
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    if len(monitors) != 1:
        fail(f"expected one ServiceMonitor, found {len(monitors)}")
    for m in monitors:
        try:
            jsonschema.validate(m, SERVICE_MONITOR_SCHEMA)
        except jsonschema.ValidationError as e:
            fail(f"ServiceMonitor: {e.message}")
    with open(adapter) as f:
        cm = yaml.safe_load(f)
    try:
        rules = yaml.safe_load(cm["data"]["config.yaml"])
        jsonschema.validate(rules, ADAPTER_RULES_SCHEMA)
        if not any("mde_queue_depth" in r["seriesQuery"] and r["name"]["as"] == "mde_queue_depth"
                   for r in rules["rules"]):
            fail("the prometheus-adapter rules do not expose mde_queue_depth")
    except (KeyError, jsonschema.ValidationError) as e:
        fail(f"prometheus-adapter rules: {e}")


def one(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    if len(found) != 1:
        fail(f"expected one {kind}, found {len(found)}")
        return {}
    return found[0]


def check_promises(docs):
    for copy, original in [("runtimes.toml", "runtimes.toml"),
                           ("seccomp-bwrap.json", "docker/seccomp-bwrap.json")]:
        with open(os.path.join(BASE, copy), "rb") as a, open(os.path.join(ROOT, original), "rb") as b:
            if a.read() != b.read():
                fail(f"deploy/kubernetes/{copy} differs from {original}: "
                     f"`cp {original} deploy/kubernetes/{copy}` (kustomize reads no file "
                     "outside its directory, so the base keeps a copy)")
    with open(os.path.join(BASE, "config.toml"), "rb") as f:
        config = tomllib.load(f)
    dep = one(docs, "Deployment")
    pod = dep.get("spec", {}).get("template", {}).get("spec", {})
    [c] = pod.get("containers", [{}])
    sc = c.get("securityContext", {})
    if sc.get("privileged"):
        fail("the executor must not be privileged")
    if sc.get("capabilities", {}).get("add") != ["SYS_ADMIN"]:
        fail(f"capabilities.add must be SYS_ADMIN only, not {sc.get('capabilities')}")
    if sc.get("procMount") != "Unmasked" or pod.get("hostUsers") is not False:
        fail("bubblewrap needs procMount: Unmasked, which needs hostUsers: false")
    psc = pod.get("securityContext", {})
    if psc.get("seccompProfile", {}).get("type") != "Localhost":
        fail("the seccomp profile must be the Localhost one")
    if psc.get("appArmorProfile", {}).get("type") != "Unconfined":
        fail("AppArmor must be unconfined")
    if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/health":
        fail("liveness must probe /health")
    if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/ready":
        fail("readiness must probe /ready")
    pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_stop = int(pre[1]) if len(pre) == 2 and pre[0] == "sleep" else 0
    grace = config["server"]["shutdown_grace_seconds"]
    termination = pod.get("terminationGracePeriodSeconds", 30)
    if termination < pre_stop + grace + 15:
        fail(f"terminationGracePeriodSeconds {termination} < preStop {pre_stop} + "
             f"shutdown_grace_seconds {grace} + 15 s to answer and clean up")
    for kind in ["Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
                 "NetworkPolicy", "DaemonSet", "Namespace"]:
        one(docs, kind)
    hpa = one(docs, "HorizontalPodAutoscaler")
    metrics = {m["type"]: m for m in hpa.get("spec", {}).get("metrics", [])}
    if "Resource" not in metrics or metrics.get("Pods", {}).get("pods", {}).get(
            "metric", {}).get("name") != "mde_queue_depth":
        fail("the HPA must scale on CPU and on mde_queue_depth")
    np = one(docs, "NetworkPolicy")
    if "Egress" not in np.get("spec", {}).get("policyTypes", []) or np["spec"].get("egress"):
        fail("the NetworkPolicy must deny all egress")
    runtimes = [d for d in docs if d["kind"] == "ConfigMap"
                and d["metadata"]["name"] == "mixed-docker-executor-runtimes"]
    if not runtimes:
        fail("runtimes.toml must be a ConfigMap named without a hash (so it reloads in place)")
    for m in c.get("volumeMounts", []):
        if "subPath" in m:
            fail(f"volume {m['name']} uses subPath, which the kubelet never refreshes")
    return config


def main():
    docs = render()
    print(f"{len(docs)} objects: " + ", ".join(sorted(d["kind"] for d in docs)))
    validate(docs)
    check_promises(docs)
    if failures:
        print(f"{len(failures)} Kubernetes check(s) failed")
        sys.exit(1)
    print("deploy/kubernetes: every check passed")


if __name__ == "__main__":
    main()
