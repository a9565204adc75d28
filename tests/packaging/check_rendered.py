#!/usr/bin/env python3
"""Checks what the chart renders for one value set (scripts/check-packaging).

    check_rendered.py SET RENDERED.yaml

SET names a file of tests/packaging/values/ (or "default"). Every set must
render the group's fixed parts (RBAC with exactly the sidecar's verbs, the
headless Service, a hardened sidecar); each set then has its own checks.
Prints one line per set; exits 1 naming the first broken expectation.
"""
import sys

import yaml

ROLE_RULES = [
    ([""], ["pods"], ["get", "list", "watch", "patch"]),
    (["raft-elector.io"], ["leaderelections"], ["get", "list", "watch", "create"]),
    (["raft-elector.io"], ["leaderelections/status"], ["update"]),
    ([""], ["events"], ["create"]),
]

class Broken(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise Broken(what)


def one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    expect(len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0]


def none_of(docs, kind):
    expect(not [d for d in docs if d["kind"] == kind], f"expected no {kind}")


def sidecars(docs):
    """Every raft-elector container of every pod template, with its pod spec."""
    for d in docs:
        spec = d.get("spec", {}).get("template", {}).get("spec")
        if spec:
            for c in spec["containers"]:
                if c["name"] == "raft-elector":
                    yield d, spec, c


def arg(container, flag):
    values = [a.split("=", 1)[1] for a in container["args"] if a.startswith(flag + "=")]
    return values[0] if values else None


def env(container, name):
    for e in container.get("env", []):
        if e["name"] == name:
            return e
    return None


def check_hardened(container, what):
    sc = container.get("securityContext", {})
    expect(sc.get("runAsNonRoot") is True, f"{what}: runAsNonRoot")
    expect(isinstance(sc.get("runAsUser"), int) and sc["runAsUser"] > 0, f"{what}: numeric non-root runAsUser")
    expect(sc.get("readOnlyRootFilesystem") is True, f"{what}: readOnlyRootFilesystem")
    expect(sc.get("allowPrivilegeEscalation") is False, f"{what}: allowPrivilegeEscalation false")
    expect(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{what}: capabilities drop ALL")
    expect(sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{what}: seccomp RuntimeDefault")
    res = container.get("resources", {})
    for part in ("requests", "limits"):
        expect("memory" in res.get(part, {}), f"{what}: resources.{part}.memory")
        expect("cpu" in res.get(part, {}), f"{what}: resources.{part}.cpu")


def check_common(docs, fullname, group, sa_name):
    role = one(docs, "Role")
    rules = [(r["apiGroups"], r["resources"], r["verbs"]) for r in role["rules"]]
    expect(rules == ROLE_RULES, f"Role rules are exactly the sidecar's calls, got {rules}")
    binding = one(docs, "RoleBinding")
    expect(binding["roleRef"]["name"] == role["metadata"]["name"], "RoleBinding refers to the Role")
    expect(binding["subjects"] == [{"kind": "ServiceAccount", "name": sa_name, "namespace": "packaging"}],
           f"RoleBinding binds ServiceAccount {sa_name}, got {binding['subjects']}")
    svc = one(docs, "Service", f"{fullname}-peers")
    spec = svc["spec"]
    expect(spec["clusterIP"] == "None", "peer Service is headless")
    expect(spec["publishNotReadyAddresses"] is True, "peer Service publishes not-ready addresses")
    expect(spec["selector"] == {"raft-elector.io/group": group}, f"peer Service selects group {group}")
    ports = {p["name"]: p["port"] for p in spec["ports"]}
    expect(ports.get("raft") == 4041, "peer Service port named raft (SRV _raft._tcp) on 4041")
    expect(ports.get("http") == 4040, "peer Service port named http on 4040")
    one(docs, "CustomResourceDefinition", "leaderelections.raft-elector.io")
    le = one(docs, "LeaderElection", group)
    expect(le["spec"]["service"] == f"{fullname}-peers", "LeaderElection names the peer Service")
    expect(le["spec"]["podSelector"] == f"raft-elector.io/group={group}", "LeaderElection selects the group's pods")
    expect("status" not in le, "the chart leaves the LeaderElection status to the leader")
    for d in docs:
        if d["kind"] != "CustomResourceDefinition":
            expect(d["metadata"].get("namespace") in ("packaging", "monitoring"),
                   f"{d['kind']} {d['metadata']['name']} is namespaced")
    for workload, pod, c in sidecars(docs):
        what = f"{workload['metadata']['name']}/raft-elector"
        check_hardened(c, what)
        expect(c["args"][0] == "run", f"{what}: runs `raft-elector run`")
        expect(arg(c, "--service") == f"{fullname}-peers", f"{what}: --service is the peer Service")
        expect(arg(c, "--cluster-id") == group, f"{what}: --cluster-id is the group")
        expect(arg(c, "--state-dir") == "/var/lib/raft-elector", f"{what}: --state-dir on the state volume")
        for name, field in [("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace"),
                            ("POD_UID", "metadata.uid"), ("POD_IP", "status.podIP")]:
            e = env(c, name)
            expect(e and e["valueFrom"]["fieldRef"]["fieldPath"] == field, f"{what}: {name} from {field}")
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        expect(mounts.get("raft-elector-state") == "/var/lib/raft-elector", f"{what}: state volume mounted")
        vols = {v["name"]: v for v in pod["volumes"]}
        expect("emptyDir" in vols.get("raft-elector-state", {}), f"{what}: state volume is an emptyDir")
        expect(pod["serviceAccountName"] == sa_name, f"{what}: pod runs as {sa_name}")
        labels = workload["spec"]["template"]["metadata"]["labels"]
        expect(labels.get("raft-elector.io/group") == group, f"{what}: pod carries the group label")
        for other in pod["containers"]:
            check_hardened(other, f"{workload['metadata']['name']}/{other['name']}")
        probe = c["readinessProbe"]["httpGet"]
        expect(probe["path"] == "/readyz" and probe["port"] == 4040, f"{what}: ready on /readyz")


def secret_ref(docs):
    refs = {(env(c, "RAFT_ELECTOR_SECRET")["valueFrom"]["secretKeyRef"]["name"],
             env(c, "RAFT_ELECTOR_SECRET")["valueFrom"]["secretKeyRef"]["key"]) for _, _, c in sidecars(docs)}
    expect(len(refs) <= 1, f"one secret for every sidecar, got {refs}")
    return refs.pop() if refs else None


def check_set(name, docs):
    if name == "existing-secret":
        fullname, group, sa = "t-raft-elector", "orders", "my-app"
    elif name == "everything":
        fullname, group, sa = "elector", "elector", "elector"
    else:
        fullname, group, sa = "t-raft-elector", "t-raft-elector", "t-raft-elector"
    check_common(docs, fullname, group, sa)

    if name in ("default", "service-monitor", "network-policy", "demo"):
        secret = one(docs, "Secret", f"{fullname}-peer-secret")
        expect(len(secret["data"]["secret"]) >= 44, "generated peer secret has at least 32 bytes")
        one(docs, "ServiceAccount", sa)
    if name == "default":
        for kind in ("Deployment", "ServiceMonitor", "NetworkPolicy", "PodDisruptionBudget", "ConfigMap"):
            none_of(docs, kind)
    if name in ("demo", "everything"):
        deploy = one(docs, "Deployment", f"{fullname}-demo")
        replicas = 5 if name == "everything" else 3
        expect(deploy["spec"]["replicas"] == replicas, f"demo runs {replicas} replicas")
        expect(deploy["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0},
               "demo rolls one member at a time")
        names = [c["name"] for c in deploy["spec"]["template"]["spec"]["containers"]]
        expect(names == ["app", "raft-elector"], f"demo pod has app and sidecar, got {names}")
        app = deploy["spec"]["template"]["spec"]["containers"][0]
        expect("/is-leader\"" in app["args"][0] and "?wait=" in app["args"][0], "demo app long-polls /is-leader")
        expect("singleton work unit" in app["args"][0], "demo app logs countable work units")
        leader = one(docs, "Service", f"{fullname}-demo-leader")
        expect(leader["spec"]["selector"].get("raft-elector.io/role") == "leader",
               "leader Service selects raft-elector.io/role=leader")
        expect(leader["spec"]["selector"].get("raft-elector.io/group") == group, "leader Service stays in the group")
        expect(secret_ref(docs) == (f"{fullname}-peer-secret", "secret"), "demo uses the chart's Secret")
    if name == "existing-secret":
        none_of(docs, "Secret")
        none_of(docs, "ServiceAccount")
    if name in ("service-monitor", "everything"):
        sm = one(docs, "ServiceMonitor")
        svc = one(docs, "Service", f"{fullname}-peers")
        sel = sm["spec"]["selector"]["matchLabels"]
        expect(all(svc["metadata"]["labels"].get(k) == v for k, v in sel.items()),
               "ServiceMonitor selects the peer Service")
        expect(sm["spec"]["endpoints"][0]["port"] == "http", "ServiceMonitor scrapes the http port")
        expect(sm["spec"]["endpoints"][0]["path"] == "/metrics", "ServiceMonitor scrapes /metrics")
        if name == "service-monitor":
            expect(sm["metadata"]["labels"].get("release") == "prometheus", "ServiceMonitor extra labels")
    if name in ("network-policy", "everything"):
        np = one(docs, "NetworkPolicy")
        member = {"raft-elector.io/group": group}
        expect(np["spec"]["podSelector"]["matchLabels"] == member, "NetworkPolicy selects the group's pods")
        peer_rules = [r for r in np["spec"]["ingress"] if {"port": 4041, "protocol": "TCP"} in r.get("ports", [])]
        expect(len(peer_rules) == 1, "one ingress rule for the peer port")
        expect(peer_rules[0]["from"] == [{"podSelector": {"matchLabels": member}}],
               "peer port admits the group's pods only")
        if name == "network-policy":
            http = [r for r in np["spec"]["ingress"] if {"port": 4040, "protocol": "TCP"} in r.get("ports", [])][0]
            expect(http["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"},
                   "http port admits networkPolicy.httpFrom")
            expect({"ports": [{"port": 8080, "protocol": "TCP"}]} in np["spec"]["ingress"], "extraIngress kept")
    if name == "subchart":
        deploy = one(docs, "Deployment", "my-app")
        names = [c["name"] for c in deploy["spec"]["template"]["spec"]["containers"]]
        expect(names == ["app", "raft-elector"], f"the user's pod has app and sidecar, got {names}")
        sidecar = deploy["spec"]["template"]["spec"]["containers"][1]
        expect(arg(sidecar, "--bootstrap-expect") == "5", "the sidecar follows the parent's values for the subchart")
        one(docs, "Secret", f"{fullname}-peer-secret")
    if name == "everything":
        one(docs, "PodDisruptionBudget")
        cm = one(docs, "ConfigMap", "elector-dashboard")
        expect(cm["metadata"]["labels"].get("grafana_dashboard") == "1", "dashboard has the Grafana sidecar label")
        expect('"raft_elector_is_leader' in cm["data"]["raft-elector.json"] or
               "raft_elector_is_leader{" in cm["data"]["raft-elector.json"], "dashboard queries raft_elector_ metrics")
        for _, _, c in sidecars(docs):
            expect(c["image"].startswith("registry.example.com/raft-elector@sha256:"), "digest wins over tag")
            for flag, value in [("--election-timeout-min", "300ms"), ("--election-timeout-max", "600ms"),
                                ("--heartbeat-interval", "100ms"), ("--max-voters", "3"), ("--log-format", "json")]:
                expect(arg(c, flag) == value, f"{flag}={value}")
            expect("--no-kubernetes" in c["args"], "kubernetes=false adds --no-kubernetes")
            expect("--removal-grace=1m" in c["args"], "extraArgs appended")
            expect(env(c, "RUST_BACKTRACE") is not None, "extraEnv appended")
        for d in docs:
            if d["kind"] != "CustomResourceDefinition":
                expect(d["metadata"]["labels"].get("team") == "platform", f"commonLabels on {d['kind']}")
    else:
        for _, _, c in sidecars(docs):
            expect("--no-kubernetes" not in c["args"], "Kubernetes publishing on by default")
            expect(arg(c, "--election-timeout-min") is None, "timing left to the binary's defaults")


def main():
    name, path = sys.argv[1], sys.argv[2]
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    try:
        check_set(name, docs)
    except (Broken, KeyError, TypeError, IndexError) as e:
        print(f"rendered set {name}: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    kinds = sorted({d["kind"] for d in docs})
    print(f"rendered set {name}: {len(docs)} objects ({', '.join(kinds)}) as expected")


if __name__ == "__main__":
    main()
