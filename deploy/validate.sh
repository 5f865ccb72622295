#!/usr/bin/env bash
# Validates the deployment files without Docker or a cluster:
#   1. YAML syntax of every .yml/.yaml under deploy/ (PyYAML; installed with pip if missing)
#   2. JSON syntax of the Grafana dashboard
#   3. every credvault_* metric used by the alert rules and the dashboard exists in the code
#   4. the Kubernetes manifests agree with each other and with the daemon's configuration
#   5. the ConfigMap's credvault.toml and deploy/credvault.toml are accepted by the real
#      daemon (when a built binary is found; otherwise skipped)
#   6. promtool check rules / check config / test rules (when promtool is installed)
#   7. kubectl kustomize, and kubectl apply --dry-run=client when a cluster is reachable
#   8. docker compose config (when the compose plugin is installed)
# Exits non-zero if any check that ran failed.
set -uo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cd "$here"

failures=0
pass() { printf '  ok    %s\n' "$*"; }
fail() { printf '  FAIL  %s\n' "$*"; failures=$((failures + 1)); }
skip() { printf '  skip  %s\n' "$*"; }
section() { printf '\n== %s\n' "$*"; }

command -v python3 >/dev/null || { echo "python3 is required"; exit 2; }

section "YAML syntax"
if ! python3 -c 'import yaml' 2>/dev/null; then
  echo "  PyYAML not found; installing it for this user with pip"
  python3 -m pip install --quiet --user pyyaml 2>/dev/null ||
    python3 -m pip install --quiet --user --break-system-packages pyyaml 2>/dev/null ||
    true
fi
if python3 -c 'import yaml' 2>/dev/null; then
  while IFS= read -r -d '' f; do
    if out=$(python3 - "$f" 2>&1 <<'PY'
import sys, yaml
with open(sys.argv[1]) as fh:
    docs = [d for d in yaml.safe_load_all(fh) if d is not None]
if not docs:
    sys.exit("no YAML documents")
PY
    ); then pass "${f#./}"; else fail "${f#./}: $out"; fi
  done < <(find . -type f \( -name '*.yml' -o -name '*.yaml' \) -print0 | sort -z)
else
  fail "PyYAML is not available and could not be installed (apt-get install python3-yaml)"
fi

section "JSON syntax"
for f in grafana/*.json; do
  if out=$(python3 -m json.tool "$f" 2>&1 >/dev/null); then pass "$f"; else fail "$f: $out"; fi
done

section "Metric names used by rules and dashboard exist in the code"
if out=$(python3 - "$repo" 2>&1 <<'PY'
import json, pathlib, re, sys
repo = pathlib.Path(sys.argv[1])
defined = set()
for src in ("src/telemetry.rs", "src/audit/mod.rs", "src/limits.rs"):
    defined |= set(re.findall(r'"(credvault_[a-z0-9_]+)"', (repo / src).read_text()))
if not defined:
    sys.exit("found no metric names in src/telemetry.rs, src/audit/mod.rs or src/limits.rs")
def base(name):
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in defined:
            return name[: -len(suffix)]
    return name
used = {}
for rel in ("deploy/prometheus/rules.yml", "deploy/grafana/credvault-dashboard.json"):
    for name in re.findall(r"\bcredvault_[a-z0-9_]+", (repo / rel).read_text()):
        used.setdefault(base(name), set()).add(rel)
unknown = {n: sorted(f) for n, f in used.items() if n not in defined}
if unknown:
    sys.exit("unknown metric names: " + "; ".join(f"{n} (in {', '.join(f)})" for n, f in sorted(unknown.items())))
print(f"{len(used)} names used, all among the {len(defined)} the daemon defines")
PY
); then pass "$out"; else fail "$out"; fi

section "Kubernetes manifests are consistent"
if python3 -c 'import yaml' 2>/dev/null; then
  if out=$(python3 - 2>&1 <<'PY'
import pathlib, sys, tomllib, yaml
problems = []
docs = []
for f in sorted(pathlib.Path("kubernetes").glob("*.yaml")):
    if f.name == "kustomization.yaml":
        continue
    for d in yaml.safe_load_all(f.read_text()):
        if d:
            docs.append((f.name, d))
by_kind = {}
for f, d in docs:
    for key in ("apiVersion", "kind", "metadata"):
        if key not in d:
            problems.append(f"{f}: missing {key}")
    by_kind.setdefault(d.get("kind"), []).append(d)
    if d.get("kind") != "Namespace" and d.get("metadata", {}).get("namespace") != "credvault":
        problems.append(f"{f}: {d.get('kind')} is not in namespace credvault")
listed = set(yaml.safe_load(pathlib.Path("kubernetes/kustomization.yaml").read_text())["resources"])
on_disk = {f.name for f in pathlib.Path("kubernetes").glob("*.yaml")} - {"kustomization.yaml"}
if listed != on_disk:
    problems.append(f"kustomization resources {sorted(listed)} differ from files {sorted(on_disk)}")

cm = by_kind["ConfigMap"][0]
secret = by_kind["Secret"][0]
dep = by_kind["Deployment"][0]
conf = tomllib.loads(cm["data"]["credvault.toml"])
pod = dep["spec"]["template"]
c = pod["spec"]["containers"][0]
grpc_port = int(conf["listen"].rsplit(":", 1)[1])
metrics_port = int(conf["metrics_listen"].rsplit(":", 1)[1])
for host_key in ("listen", "metrics_listen"):
    if not conf[host_key].startswith("0.0.0.0:"):
        problems.append(f"ConfigMap {host_key} must bind 0.0.0.0 in a pod, not {conf[host_key]}")
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
if ports.get("grpc") != grpc_port or ports.get("metrics") != metrics_port:
    problems.append(f"container ports {ports} do not match listen/metrics_listen {grpc_port}/{metrics_port}")
for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
    p = c.get(probe, {})
    if p.get("grpc", {}).get("port") != grpc_port:
        problems.append(f"{probe} is not a gRPC probe on port {grpc_port}")
ann = pod["metadata"].get("annotations", {})
if ann.get("prometheus.io/port") != str(metrics_port) or ann.get("prometheus.io/path") != "/metrics":
    problems.append("prometheus.io annotations do not point at the metrics listener")
if dep["spec"]["replicas"] < 2:
    problems.append("the Deployment should run at least 2 replicas")

mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
env = {e["name"]: e for e in c.get("env", [])}
config_path = env.get("CREDVAULT_CONFIG", {}).get("value", "")
if config_path != f"{mounts.get('config')}/credvault.toml":
    problems.append(f"CREDVAULT_CONFIG {config_path!r} is not the mounted ConfigMap file")
if volumes["config"]["configMap"]["name"] != cm["metadata"]["name"]:
    problems.append("the config volume does not use the ConfigMap")
secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
sv = volumes["secret"]["secret"]
if sv["secretName"] != secret["metadata"]["name"]:
    problems.append("the secret volume does not use the Secret")
for item in sv.get("items", []):
    if item["key"] not in secret_keys:
        problems.append(f"the secret volume wants key {item['key']!r}, which the Secret lacks")
if "passphrase_file" in conf:
    mounted = {f"{mounts['secret']}/{i['path']}" for i in sv.get("items", [])}
    if conf["passphrase_file"] not in mounted:
        problems.append(f"passphrase_file {conf['passphrase_file']} is not a mounted Secret item")
for e in env.values():
    ref = e.get("valueFrom", {}).get("secretKeyRef")
    if ref and (ref["name"] != secret["metadata"]["name"] or ref["key"] not in secret_keys):
        problems.append(f"env {e['name']} refers to a missing Secret key {ref}")
if conf.get("data_dir") != mounts.get("data"):
    problems.append(f"data_dir {conf.get('data_dir')} is not the data volume {mounts.get('data')}")
sel = dep["spec"]["selector"]["matchLabels"]
for kind in ("Service", "PodDisruptionBudget", "NetworkPolicy"):
    for d in by_kind.get(kind, []):
        s = d["spec"].get("selector") or d["spec"].get("podSelector")
        s = s.get("matchLabels", s)
        if s != sel:
            problems.append(f"{kind} {d['metadata']['name']} selects {s}, the pods carry {sel}")
if problems:
    sys.exit("\n        ".join(problems))
print(f"{len(docs)} objects; ports, probes, mounts, Secret keys and selectors agree")
PY
  ); then pass "$out"; else fail "$out"; fi
else
  skip "needs PyYAML"
fi

section "Example application with the agent as a native sidecar"
if python3 -c 'import yaml' 2>/dev/null; then
  if out=$(python3 - 2>&1 <<'PY'
import pathlib, sys, tomllib, yaml
docs = [d for d in yaml.safe_load_all(pathlib.Path("kubernetes/examples/app-with-agent.yaml").read_text()) if d]
by_kind = {d["kind"]: d for d in docs}
problems = []
cm, dep = by_kind["ConfigMap"], by_kind["Deployment"]
conf = tomllib.loads(cm["data"]["agent.toml"])
pod = dep["spec"]["template"]["spec"]
agents = [c for c in pod.get("initContainers", []) if "agent" in c.get("args", [])]
if len(agents) != 1:
    problems.append("exactly one init container must run `credvault agent`")
else:
    a = agents[0]
    if a.get("restartPolicy") != "Always":
        problems.append("the agent init container needs restartPolicy: Always (a native sidecar)")
    volumes = {v["name"]: v for v in pod["volumes"]}
    amounts = {m["name"]: m["mountPath"] for m in a["volumeMounts"]}
    cfg = a["args"][a["args"].index("--config") + 1]
    cfg_vol = [n for n, p in amounts.items() if cfg.startswith(p + "/")]
    if not cfg_vol or volumes[cfg_vol[0]].get("configMap", {}).get("name") != cm["metadata"]["name"]:
        problems.append(f"--config {cfg} is not a file of the ConfigMap")
    shared = [n for n, p in amounts.items() if p == conf["agent"]["dir"]]
    if not shared or volumes[shared[0]].get("emptyDir", {}).get("medium") != "Memory":
        problems.append(f"agent.dir {conf['agent']['dir']} is not an in-memory emptyDir")
    elif not any(m["name"] == shared[0] for c in pod["containers"] for m in c.get("volumeMounts", [])):
        problems.append("no application container mounts the agent's directory")
    port = int(conf["agent"]["listen"].rsplit(":", 1)[1])
    for probe in ("startupProbe", "livenessProbe"):
        if a.get(probe, {}).get("httpGet", {}).get("port") != port:
            problems.append(f"the agent's {probe} is not on its health port {port}")
    token = conf.get("daemon", {}).get("token_file", "")
    if not any(token.startswith(p + "/") and "secret" in volumes[n] for n, p in amounts.items()):
        problems.append(f"daemon.token_file {token} is not a mounted Secret")
if problems:
    sys.exit("\n        ".join(problems))
print("native sidecar, in-memory volume shared with the application, probes and mounts agree")
PY
  ); then pass "$out"; else fail "$out"; fi
else
  skip "needs PyYAML"
fi

section "Daemon accepts the configuration files"
bin="${CREDVAULT_BIN:-}"
if [ -z "$bin" ]; then
  for candidate in "$repo/target/dist/credvault" "$repo/target/release/credvault" "$repo/target/debug/credvault" "$(command -v credvault 2>/dev/null)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then bin="$candidate"; break; fi
  done
fi
if [ -z "$bin" ]; then
  skip "no credvault binary (build one, or set CREDVAULT_BIN)"
elif ! python3 -c 'import yaml' 2>/dev/null; then
  skip "needs PyYAML to extract the ConfigMap"
else
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  python3 -c '
import sys, yaml
docs = list(yaml.safe_load_all(open("kubernetes/configmap.yaml")))
open(sys.argv[1], "w").write(docs[0]["data"]["credvault.toml"])' "$tmp/configmap.toml"
  for conf in "$here/credvault.toml" "$tmp/configmap.toml"; do
    # A clean environment, a passphrase so no key file is read, and a database address
    # where nothing listens: parsing and validation run for real, then start-up stops at
    # "cannot open storage" (exit 1). A rejected file exits 2.
    out=$(cd "$tmp" && timeout 60 env -i PATH="$PATH" HOME="$tmp" \
      CREDVAULT_PASSPHRASE=validate-only \
      CREDVAULT_DATABASE_URL=postgres://validate@127.0.0.1:1/validate \
      CREDVAULT_LOG_FORMAT=text \
      "$bin" serve --config "$conf" 2>&1)
    rc=$?
    name="${conf#"$here/"}"
    [ "$conf" = "$tmp/configmap.toml" ] && name="kubernetes/configmap.yaml (credvault.toml)"
    if [ "$rc" -eq 1 ] && grep -q "cannot open storage" <<<"$out"; then
      pass "$name accepted by $bin"
    else
      fail "$name (exit $rc): $(grep -E 'error|unknown field|invalid' <<<"$out" | head -n 3 | tr '\n' ' ')"
    fi
  done
  python3 -c '
import sys, yaml
docs = [d for d in yaml.safe_load_all(open("kubernetes/examples/app-with-agent.yaml")) if d and d["kind"] == "ConfigMap"]
open(sys.argv[1], "w").write(docs[0]["data"]["agent.toml"])' "$tmp/agent.toml"
  if out=$(cd "$tmp" && timeout 60 env -i PATH="$PATH" HOME="$tmp" "$bin" agent --config "$tmp/agent.toml" --check 2>&1); then
    pass "kubernetes/examples/app-with-agent.yaml (agent.toml) accepted by $bin agent --check"
  else
    fail "kubernetes/examples/app-with-agent.yaml (agent.toml): $out"
  fi
fi

section "promtool"
if command -v promtool >/dev/null; then
  if out=$(promtool check rules prometheus/rules.yml 2>&1); then pass "check rules"; else fail "check rules: $out"; fi
  if out=$(promtool check config prometheus/prometheus.yml 2>&1); then pass "check config"; else fail "check config: $out"; fi
  if out=$(cd prometheus && promtool test rules rules_test.yml 2>&1); then pass "test rules"; else fail "test rules: $out"; fi
else
  skip "promtool not installed (Debian: apt-get install prometheus)"
fi

section "kubectl"
if command -v kubectl >/dev/null; then
  if out=$(kubectl kustomize kubernetes 2>&1 >/dev/null); then pass "kubectl kustomize kubernetes"; else fail "kustomize: $out"; fi
  if kubectl version --request-timeout=5s >/dev/null 2>&1; then
    if out=$(kubectl apply --dry-run=client -k kubernetes 2>&1); then pass "kubectl apply --dry-run=client -k kubernetes"; else fail "dry run: $out"; fi
  else
    skip "kubectl apply --dry-run=client: no cluster reachable (client-side dry runs still need the API server's schema)"
  fi
else
  skip "kubectl not installed"
fi

section "docker compose"
if command -v docker >/dev/null && docker compose version >/dev/null 2>&1; then
  # `config` only parses and resolves the file; it needs no Docker engine.
  if out=$(docker compose -f docker-compose.yml config --quiet 2>&1); then pass "docker compose config"; else fail "compose: $out"; fi
else
  skip "docker compose plugin not installed"
fi

echo
if [ "$failures" -gt 0 ]; then
  echo "validate.sh: $failures check(s) failed"
  exit 1
fi
echo "validate.sh: all checks that ran passed"
