"""Checks the Kubernetes manifests under a directory (deploy/k8s), for
tests/tests/deploy_k8s.rs.

Every YAML document is validated strictly (unknown fields refused) by
kubernetes-validate against the Kubernetes 1.37 schemas, except
Kustomizations, for which it has no schema: their resources and patches
must exist. On top of the schemas: every container runs the given image,
probes are httpGet /ready (readiness) and /live (liveness) on the port the
workload's ConfigMap sets in [telemetry] prometheus_port (bound to
0.0.0.0), and a [datastore] kind = "postgres" names a password_file inside
a mounted volume. Patches (named in a Kustomization) may leave probes out.

Usage: k8s_check.py DIR IMAGE. Prints one line per document and each
problem; exits 1 if there was a problem.
"""

import pathlib
import sys
import tomllib

import kubernetes_validate
import yaml

K8S_VERSION = "1.37.0"


def main() -> int:
    root = pathlib.Path(sys.argv[1])
    image = sys.argv[2]
    problems = []
    docs = []
    for path in sorted(root.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    patches = {
        (path.parent / p["path"]).resolve()
        for path, doc in docs
        if doc.get("kind") == "Kustomization"
        for p in doc.get("patches", [])
    }
    configs = {}
    for path, doc in docs:
        name = f"{path.relative_to(root)} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc.get("kind") == "Kustomization":
            for ref in doc.get("resources", []) + [p["path"] for p in doc.get("patches", [])]:
                if not (path.parent / ref).exists():
                    problems.append(f"{name}: {ref} does not exist")
            print(f"checked {name}")
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{name}: {e.message} at {'.'.join(map(str, e.path))}")
            continue
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{name}: no schema")
            continue
        print(f"valid {name}")
        if doc["kind"] == "ConfigMap":
            for key, text in doc.get("data", {}).items():
                if key.endswith(".toml"):
                    configs[(path, key)] = tomllib.loads(text)

    for (path, key), cfg in configs.items():
        where = f"{path.relative_to(root)} {key}"
        tel = cfg.get("telemetry", {})
        want = {"server.toml": 9988, "agent.toml": 9989}.get(key)
        if tel.get("prometheus_port") != want or tel.get("prometheus_host") != "0.0.0.0":
            problems.append(f"{where}: [telemetry] should be port {want} on 0.0.0.0, is {tel}")
        ds = cfg.get("datastore", {})
        if ds.get("kind") == "postgres":
            pw = ds.get("password_file", "")
            mounts = [
                m["mountPath"]
                for _, d in docs
                if d.get("kind") == "StatefulSet"
                for c in d["spec"]["template"]["spec"]["containers"]
                for m in c.get("volumeMounts", [])
            ]
            if not pw or not any(pw.startswith(m.rstrip("/") + "/") for m in mounts):
                problems.append(f"{where}: password_file {pw!r} is not under a mounted volume")

    for path, doc in docs:
        if doc.get("kind") not in ("StatefulSet", "DaemonSet", "Deployment"):
            continue
        spec = doc["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            name = f"{path.relative_to(root)} {doc['kind']}/{doc['metadata']['name']} {c['name']}"
            if c.get("image") != image:
                problems.append(f"{name}: image {c.get('image')!r}, want {image!r}")
        for c in spec["containers"]:
            name = f"{path.relative_to(root)} {doc['kind']}/{doc['metadata']['name']} {c['name']}"
            want = 9988 if "server" in c["name"] else 9989
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            for probe, http_path in (("readinessProbe", "/ready"), ("livenessProbe", "/live")):
                get = c.get(probe, {}).get("httpGet")
                if get is None:
                    # A patch leaves the base's probes in place.
                    if path.resolve() in patches:
                        continue
                    problems.append(f"{name}: {probe} is not httpGet")
                    continue
                port = ports.get(get["port"], get["port"])
                if get.get("path") != http_path or port != want:
                    problems.append(f"{name}: {probe} is {get}, want {http_path} on {want}")
    for p in problems:
        print(f"PROBLEM {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
