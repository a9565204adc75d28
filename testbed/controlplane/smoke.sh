#!/usr/bin/env bash
# Smoke test of the test bed's control plane, fault proxy and lease baseline, with the
# real kubectl. Builds (timing the build, then a warm rebuild), starts `controlplane
# --components=all` in a temporary directory, and checks: Deployment -> ReplicaSet ->
# 2 Pods bound by the scheduler to a registered Node, garbage collection, ServiceAccount
# and root-CA controllers, a CRD with a custom resource, RBAC (403 for the unprivileged
# token until a RoleBinding grants it), every fault-proxy mode, a client-go Lease
# failover labelling the new leader's pod, then SIGTERM -> exit 0 with nothing left.
# Prints build times, start -> ready, RSS and stop time.
#
# With a build it also runs `go vet` and the fault proxy's Go tests (cmd/faultproxy).
# Usage: testbed/controlplane/smoke.sh [--no-build]
# Skips (exit 0, with a message) where Go is missing; CI has Go.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="$root/testbed/bin"
build=1
[ "${1:-}" = "--no-build" ] && build=0

if [ "$build" = 1 ] && ! command -v go >/dev/null 2>&1; then
  echo "smoke: SKIP: go not found; install Go >= 1.25 to build and test the control plane"
  exit 0
fi
"$root/scripts/install-kube-tools" >/dev/null
kubectl="$root/.tools/bin/kubectl"

ms_now() { echo $(($(date +%s%N) / 1000000)); }
fail() { echo "smoke: FAIL: $*" >&2; exit 1; }
ok() { echo "smoke: ok: $*"; }

if [ "$build" = 1 ]; then
  t0=$(ms_now)
  "$root/scripts/testbed-controlplane-build" >/dev/null
  t1=$(ms_now)
  "$root/scripts/testbed-controlplane-build" >/dev/null
  t2=$(ms_now)
  echo "smoke: build (with the Go build cache as found): $((t1 - t0)) ms; warm rebuild: $((t2 - t1)) ms"
  # CGO off like the build, so vet and test reuse its cache entries instead of compiling
  # every package a second time.
  (cd "$root/testbed/controlplane" && export CGO_ENABLED=0 &&
    nice -n 10 go vet ./... && nice -n 10 go test -count=1 ./cmd/faultproxy ./internal/...) \
    || fail "go vet / go test of the fault proxy"
fi
for b in controlplane faultproxy leasebaseline; do
  [ -x "$bin/$b" ] || fail "$bin/$b missing (run scripts/testbed-controlplane-build)"
done

dir="$(mktemp -d /tmp/cp-smoke.XXXXXX)"
cp_pid=""
proxy_pid=""
baseline_pids=()
cleanup() {
  local p
  for p in "${baseline_pids[@]}" $proxy_pid $cp_pid; do
    kill -KILL "$p" 2>/dev/null || true
  done
  if [ "${SMOKE_KEEP:-0}" = 1 ]; then echo "smoke: kept $dir"; else rm -rf "$dir"; fi
}
trap cleanup EXIT

# wait_until SECONDS DESCRIPTION COMMAND...: polls every 100 ms.
wait_until() {
  local limit=$(($(ms_now) + $1 * 1000)) what="$2"
  shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$(ms_now)" -lt "$limit" ] || fail "timed out waiting for: $what"
    sleep 0.1
  done
}

# ---- start the control plane
t_start=$(ms_now)
"$bin/controlplane" --dir "$dir" --components=all >"$dir/stdout" &
cp_pid=$!
until [ -f "$dir/ready" ]; do
  kill -0 "$cp_pid" 2>/dev/null || { cat "$dir/stdout"; tail -30 "$dir/controlplane.log"; fail "controlplane exited before ready"; }
  [ $(($(ms_now) - t_start)) -lt 120000 ] || fail "not ready within 120 s"
  sleep 0.05
done
t_ready=$(ms_now)
echo "smoke: start -> ready: $((t_ready - t_start)) ms"
for f in kubeconfig user.kubeconfig ca.crt admin.token user.token apiserver.env controlplane.pid; do
  [ -s "$dir/$f" ] || fail "$dir/$f missing"
done
grep -q "^pid=$cp_pid$" "$dir/ready" || fail "ready marker does not name pid $cp_pid"
if "$bin/controlplane" --dir "$dir" >"$dir/second.out" 2>&1; then fail "a second controlplane started on $dir"; fi
grep -q "in use by running controlplane pid $cp_pid" "$dir/second.out" || fail "second instance: $(cat "$dir/second.out")"
[ -f "$dir/ready" ] || fail "the refused second instance removed the ready marker"
ok "a second controlplane on the same directory is refused"
export KUBECONFIG="$dir/kubeconfig"
server="$(sed -n 's/^SERVER=//p' "$dir/apiserver.env")"
admin="$(cat "$dir/admin.token")"
user="$(cat "$dir/user.token")"

ver="$("$kubectl" version -o json)"
[[ "$ver" == *'"gitVersion": "v1.35.4"'* ]] || fail "server version is not v1.35.4: $ver"
ok "kubectl v1.35.2 talks to kube-apiserver v1.35.4 at $server (CA verified, no insecure flag)"
[ "$(curl -s --cacert "$dir/ca.crt" -H "Authorization: Bearer $admin" -o /dev/null -w '%{http_code}' "$server/readyz")" = 200 ] \
  || fail "/readyz with ca.crt and admin.token"
"$kubectl" -n default get serviceaccount default >/dev/null || fail "default ServiceAccount missing at ready"

# ---- workloads: controllers and scheduler
"$kubectl" create namespace smoke >/dev/null
wait_until 10 "ServiceAccount default in smoke" "$kubectl" -n smoke get serviceaccount default
wait_until 10 "ConfigMap kube-root-ca.crt in smoke" "$kubectl" -n smoke get configmap kube-root-ca.crt
ok "ServiceAccount and root-CA controllers populate a new namespace"

"$kubectl" apply -f - >/dev/null <<'EOF'
apiVersion: v1
kind: Node
metadata:
  name: smoke-node
  labels: {kubernetes.io/hostname: smoke-node}
EOF
"$kubectl" patch node smoke-node --subresource=status --type=merge -p \
  '{"status":{"capacity":{"cpu":"4","memory":"8Gi","pods":"110"},"allocatable":{"cpu":"4","memory":"8Gi","pods":"110"},"conditions":[{"type":"Ready","status":"True","reason":"Smoke","message":"registered by smoke.sh","lastHeartbeatTime":null,"lastTransitionTime":null}]}}' >/dev/null
"$kubectl" apply -f - >/dev/null <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata: {name: smoke, namespace: smoke}
spec:
  replicas: 2
  selector: {matchLabels: {app: smoke}}
  template:
    metadata: {labels: {app: smoke}}
    spec:
      containers:
      - {name: app, image: raft-elector:smoke, command: ["sleep", "3600"]}
EOF
pods_bound() {
  local nodes
  nodes="$("$kubectl" -n smoke get pods -l app=smoke -o jsonpath='{range .items[*]}{.spec.nodeName}{"\n"}{end}')"
  [ "$(grep -c '^smoke-node$' <<<"$nodes")" = 2 ]
}
wait_until 20 "ReplicaSet of Deployment smoke" bash -c "[ \"\$('$kubectl' -n smoke get rs -l app=smoke -o name | wc -l)\" = 1 ]"
wait_until 20 "2 Pods bound to smoke-node" pods_bound
ok "Deployment -> 1 ReplicaSet -> 2 Pods, both bound to smoke-node by kube-scheduler"
sa_mount="$("$kubectl" -n smoke get pods -l app=smoke -o jsonpath='{.items[0].spec.volumes[0].projected.sources[0].serviceAccountToken.path}')"
[ "$sa_mount" = token ] || fail "ServiceAccount admission did not add the kube-api-access volume (got '$sa_mount')"
ok "ServiceAccount admission adds the projected token volume"
"$kubectl" -n smoke delete deployment smoke --wait=false >/dev/null
wait_until 20 "garbage collection of the ReplicaSet" bash -c "[ -z \"\$('$kubectl' -n smoke get rs -o name)\" ]"
ok "garbage collector removes the ReplicaSet of a deleted Deployment"

# ---- CRD
"$kubectl" apply -f - >/dev/null <<'EOF'
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.smoke.raft-elector.io}
spec:
  group: smoke.raft-elector.io
  names: {kind: Widget, plural: widgets, singular: widget, shortNames: [wd]}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec: {type: object, properties: {size: {type: integer, minimum: 1}}}
          status: {type: object, properties: {leader: {type: string}}}
EOF
"$kubectl" wait --for=condition=Established --timeout=20s crd/widgets.smoke.raft-elector.io >/dev/null
wait_until 10 "Widget API discoverable" "$kubectl" -n smoke get wd
printf 'apiVersion: smoke.raft-elector.io/v1\nkind: Widget\nmetadata: {name: w1, namespace: smoke}\nspec: {size: 3}\n' \
  | "$kubectl" apply -f - >/dev/null
"$kubectl" -n smoke patch widget w1 --subresource=status --type=merge -p '{"status":{"leader":"pod-0"}}' >/dev/null
[ "$("$kubectl" -n smoke get wd w1 -o jsonpath='{.status.leader}')" = pod-0 ] || fail "CR status not written"
if printf 'apiVersion: smoke.raft-elector.io/v1\nkind: Widget\nmetadata: {name: w2, namespace: smoke}\nspec: {size: 0}\n' \
  | "$kubectl" apply -f - >/dev/null 2>&1; then fail "schema validation accepted size 0"; fi
ok "CRD established; custom resource, status subresource and schema validation work"

# ---- RBAC
code="$(curl -s --cacert "$dir/ca.crt" -H "Authorization: Bearer $user" -o /dev/null -w '%{http_code}' "$server/api/v1/namespaces/smoke/pods")"
[ "$code" = 403 ] || fail "unprivileged token listing pods: HTTP $code, want 403"
if "$kubectl" --kubeconfig "$dir/user.kubeconfig" -n smoke get pods >/dev/null 2>"$dir/rbac.err"; then fail "unprivileged kubectl get pods succeeded"; fi
grep -q Forbidden "$dir/rbac.err" || fail "unprivileged kubectl error is not Forbidden: $(cat "$dir/rbac.err")"
"$kubectl" -n smoke create role pod-reader --verb=get,list --resource=pods >/dev/null
"$kubectl" -n smoke create rolebinding pod-reader --role=pod-reader --user=testbed-user >/dev/null
wait_until 10 "RoleBinding takes effect" "$kubectl" --kubeconfig "$dir/user.kubeconfig" -n smoke get pods
code="$(curl -s --cacert "$dir/ca.crt" -H "Authorization: Bearer $user" -o /dev/null -w '%{http_code}' "$server/api/v1/namespaces/default/pods")"
[ "$code" = 403 ] || fail "RoleBinding in smoke leaked to default: HTTP $code"
ok "RBAC: unprivileged token gets 403, a Role+RoleBinding grants exactly its namespace"

# ---- fault proxy
"$bin/faultproxy" --dir "$dir" --kubeconfig-out "$dir/proxy.kubeconfig" --info-out "$dir/proxy.json" \
  --dropwatch-after 300ms >"$dir/proxy.stdout" &
proxy_pid=$!
wait_until 10 "faultproxy info file" test -s "$dir/proxy.json"
purl="$(sed -n 's/.*"proxy":"\([^"]*\)".*/\1/p' "$dir/proxy.json")"
ctl="$(sed -n 's/.*"control":"\([^"]*\)".*/\1/p' "$dir/proxy.json")"
[ -n "$purl" ] && [ -n "$ctl" ] || fail "cannot parse $dir/proxy.json: $(cat "$dir/proxy.json")"
pk=(--kubeconfig "$dir/proxy.kubeconfig")
through() { # curl through the proxy with the admin token: prints the HTTP code
  curl -s --cacert "$dir/ca.crt" -H "Authorization: Bearer $admin" -o /dev/null -w '%{http_code}' "$@"
}
mode() { curl -sf -X POST "$ctl/$1" >/dev/null || fail "control $1"; }

"$kubectl" "${pk[@]}" -n smoke get wd w1 >/dev/null || fail "kubectl through the proxy in mode pass"
ok "faultproxy pass: kubectl works through $purl with the proxy kubeconfig"

mode 'error?code=500'
[ "$(through "$purl/api/v1/namespaces/smoke/pods")" = 500 ] || fail "error mode did not answer 500"
if "$kubectl" "${pk[@]}" --request-timeout=5s -n smoke get wd w1 >/dev/null 2>"$dir/e.err"; then fail "kubectl succeeded in error mode"; fi
grep -qi 'internal' "$dir/e.err" || fail "kubectl error in error mode: $(cat "$dir/e.err")"
mode 'error?code=503'
[ "$(through "$purl/api")" = 503 ] || fail "error?code=503 did not answer 503"
ok "faultproxy error: 500 and 503 answered to everything"

mode conflict
[ "$(through -X PATCH -H 'Content-Type: application/merge-patch+json' -d '{"metadata":{"labels":{"a":"b"}}}' "$purl/api/v1/namespaces/smoke")" = 409 ] \
  || fail "conflict mode did not answer 409 to PATCH"
[ "$(through -X POST -H 'Content-Type: application/json' -d '{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"}}' "$purl/api/v1/namespaces/smoke/configmaps")" = 409 ] \
  || fail "conflict mode did not answer 409 to POST"
[ "$(through "$purl/api/v1/namespaces/smoke")" = 200 ] || fail "conflict mode broke a GET"
"$kubectl" get ns smoke -o jsonpath='{.metadata.labels.a}' | grep -q b && fail "a 409'd PATCH reached the API server"
ok "faultproxy conflict: writes get 409, reads pass"

mode 'slow?ms=400'
t0=$(ms_now)
[ "$(through "$purl/api/v1/namespaces/smoke")" = 200 ] || fail "slow mode GET"
dt=$(($(ms_now) - t0))
[ "$dt" -ge 400 ] || fail "slow?ms=400 answered in $dt ms"
ok "faultproxy slow: a GET took $dt ms with ?ms=400"

mode down
set +e
curl -s --cacert "$dir/ca.crt" --max-time 5 -o /dev/null "$purl/api"
rc=$?
set -e
[ "$rc" = 7 ] || fail "down mode: curl exit $rc, want 7 (connection refused)"
if "$kubectl" "${pk[@]}" --request-timeout=5s get ns smoke >/dev/null 2>&1; then fail "kubectl succeeded in down mode"; fi
mode pass
[ "$(through "$purl/api/v1/namespaces/smoke")" = 200 ] || fail "pass after down"
ok "faultproxy down: connections refused; pass reopens the same port"

# A watch through the proxy must be cut when dropwatch starts, and new ones after ~300 ms.
set +e
curl -s -N --cacert "$dir/ca.crt" -H "Authorization: Bearer $admin" --max-time 30 \
  "$purl/api/v1/namespaces/smoke/configmaps?watch=1" >/dev/null &
watch_pid=$!
sleep 0.5
t0=$(ms_now)
mode dropwatch
wait "$watch_pid"
rc=$?
dt=$(($(ms_now) - t0))
[ "$rc" != 0 ] && [ "$rc" != 28 ] && [ "$dt" -lt 5000 ] || fail "open watch not dropped (curl exit $rc after $dt ms)"
t0=$(ms_now)
curl -s -N --cacert "$dir/ca.crt" -H "Authorization: Bearer $admin" --max-time 30 \
  "$purl/api/v1/namespaces/smoke/configmaps?watch=1" >/dev/null
rc=$?
dt=$(($(ms_now) - t0))
set -e
[ "$rc" != 0 ] && [ "$rc" != 28 ] && [ "$dt" -lt 5000 ] || fail "new watch not dropped (curl exit $rc after $dt ms)"
[ "$(through "$purl/api/v1/namespaces/smoke")" = 200 ] || fail "dropwatch mode broke a GET"
ok "faultproxy dropwatch: open watch cut at once, a new one after $dt ms, GETs pass"

code="$(curl -s -o /dev/null -w '%{http_code}' -X POST "$ctl/slow?ms=abc")"
[ "$code" = 400 ] || fail "control slow?ms=abc: HTTP $code, want 400"
stats="$(curl -sf "$ctl/stats")"
[[ "$stats" == *'"mode":"dropwatch?after_ms=300"'* ]] || fail "a bad control request changed the mode: $stats"
[[ "$stats" == *'"conflict":{'*'"PATCH":1'* ]] || fail "stats miss the conflict PATCH: $stats"
[[ "$stats" == *'"WATCH":'* ]] && [[ "$stats" == *'"watches_dropped":2'* ]] || fail "stats miss the dropped watches: $stats"
[[ "$stats" == *'"409":2'* ]] || fail "stats miss the injected 409s: $stats"
ok "faultproxy stats: $stats"
kill -TERM "$proxy_pid"
wait "$proxy_pid" || fail "faultproxy exited $? on SIGTERM"
proxy_pid=""

# ---- client-go Lease baseline: kill -9 the leader, the other labels its own pod.
for i in 0 1; do
  printf 'apiVersion: v1\nkind: Pod\nmetadata: {name: base-%s, namespace: smoke}\nspec: {nodeName: smoke-node, containers: [{name: c, image: x}]}\n' "$i" \
    | "$kubectl" apply -f - >/dev/null
  "$bin/leasebaseline" --kubeconfig "$dir/kubeconfig" --namespace smoke --lease-name smoke --id "base-$i" \
    --pod-name "base-$i" --lease-duration 2s --renew-deadline 1500ms --retry-period 250ms >"$dir/base-$i.out" 2>"$dir/base-$i.err" &
  baseline_pids+=($!)
done
leader_labelled() { grep -l '^labelled ' "$dir"/base-*.out; }
wait_until 20 "a lease baseline replica leads and labels its pod" leader_labelled
first="$(basename "$(leader_labelled | head -1)" .out)"
[ "$("$kubectl" -n smoke get pod "$first" -o jsonpath='{.metadata.labels.raft-elector\.io/role}')" = leader ] \
  || fail "$first printed 'labelled' but its pod has no leader label"
idx="${first#base-}"
other=$((1 - idx))
t_kill=$(date +%s%N)
{ kill -KILL "${baseline_pids[$idx]}" && wait "${baseline_pids[$idx]}"; } 2>/dev/null || true
wait_until 20 "base-$other takes over" grep -q '^labelled ' "$dir/base-$other.out"
t_lab="$(sed -n 's/^labelled //p' "$dir/base-$other.out" | head -1)"
ok "lease baseline: kill -9 $first -> base-$other labelled leader after $(((t_lab - t_kill) / 1000000)) ms (lease 2 s)"
kill -TERM "${baseline_pids[$other]}"
wait "${baseline_pids[$other]}" || fail "leasebaseline exited $? on SIGTERM"
baseline_pids=()

# ---- measure and stop
rss_kb="$(awk '/^VmRSS/ {print $2}' "/proc/$cp_pid/status")"
echo "smoke: controlplane RSS (etcd + apiserver + controller-manager + scheduler): $((rss_kb / 1024)) MiB"
port="$(sed -n 's/^KUBERNETES_SERVICE_PORT=//p' "$dir/apiserver.env")"
t0=$(ms_now)
kill -TERM "$cp_pid"
set +e
wait "$cp_pid"
rc=$?
set -e
dt=$(($(ms_now) - t0))
cp_pid_done="$cp_pid"
cp_pid=""
[ "$rc" = 0 ] || { tail -5 "$dir/stdout"; fail "controlplane exited $rc on SIGTERM"; }
echo "smoke: SIGTERM -> exit 0 in $dt ms"
[ "$dt" -lt 15000 ] || fail "shutdown took $dt ms"
[ ! -e "$dir/ready" ] || fail "ready marker left behind"
if pgrep -f -- "$dir" >/dev/null; then fail "processes left: $(pgrep -af -- "$dir")"; fi
kill -0 "$cp_pid_done" 2>/dev/null && fail "controlplane pid $cp_pid_done still alive"
if ss -ltn "sport = :$port" | grep -q LISTEN; then fail "port $port still listening"; fi
ok "stopped cleanly: no process, no listener, no ready marker"
echo "smoke: PASS"
