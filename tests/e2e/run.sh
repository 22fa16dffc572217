#!/usr/bin/env bash
# make e2e: the whole product on a real cluster (kind). Needs docker, kind, kubectl and helm on PATH;
# CI here has none of them, so this runs on developer machines and GPU-less CI runners that do.
#
# The scenarios of tests/cluster/ (the loopback control plane, where kwok's pods run nothing), here with a
# real kubelet, real images and the real server: the CRD and admission; a CPU LLMService serving the demo
# model baked into the test image, Ready, `kubectl get llms`, a chat through the Service; kubectl scale to 3;
# autoscaling on without a dip and off keeping the count; a hand-deleted Service and a hand-edited ConfigMap
# repaired; Unschedulable (more GPUs than kind has), an image that does not pull and a server that crash-loops,
# each with its reason; a name the operator did not create left alone; --cascade=orphan; delete (children
# garbage-collected); helm upgrade changing the CRD; helm uninstall keeping the CRD and the LLMServices.
# The cluster is deleted at the end (also on failure, unless KEEP_CLUSTER=1).
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=${CLUSTER:-llmservice-e2e}
OPERATOR_IMAGE=${OPERATOR_IMAGE:-llmservice/operator:e2e}
INFERENCE_IMAGE=${INFERENCE_IMAGE:-llmservice/inference:e2e-cpu-demo}
NAMESPACE=llm-e2e
RELEASE=llmservice-operator
CRD=llmservices.serving.llmservice.io

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "make e2e needs $tool on PATH" >&2; exit 2; }
done

workdir="$(mktemp -d)"
cleanup() {
  rm -rf "$workdir"
  if [ "${KEEP_CLUSTER:-0}" != "1" ]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }
fail() { echo "FAILED: $*" >&2; exit 1; }
k() { kubectl -n "$NAMESPACE" "$@"; }

# Runs a command until it succeeds, for at most $1 seconds; fails (returns 1) after that.
eventually() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 1
  done
}

conditions() {
  k get llms "$1" -o jsonpath='{range .status.conditions[*]}{.type}={.status} {.reason}: {.message}{"\n"}{end}'
}

# reported NAME REASON STALLED TEXT: in one read (a crash-looping pod moves between reasons), Ready False
# for REASON with TEXT in its message, Stalled as given, and Reconciling True when it is not Stalled.
reported() {
  local now
  now="$(conditions "$1")"
  grep -qF "Ready=False $2: " <<<"$now" || return 1
  grep -F "Ready=False" <<<"$now" | grep -qF "$4" || return 1
  grep -qx "Stalled=$3 .*" <<<"$now" || return 1
  [ "$3" = True ] || grep -q "^Reconciling=True " <<<"$now"
}

wait_reported() {
  if ! eventually 300 reported "$@"; then
    conditions "$1" >&2
    fail "llms/$1 never reported $2 (Stalled $3, \"$4\")"
  fi
  conditions "$1"
}

# column NAME COLUMN: that column of `kubectl get llms NAME` (its cells must not be empty).
column() {
  k get llms "$1" | awk -v col="$2" 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == col) n = i } NR == 2 { print $n }'
}

owners() { k get "$1" -o jsonpath='{.metadata.ownerReferences[*].uid}'; }
exists() { k get "$1" >/dev/null 2>&1; }
gone() { test -z "$(k get "$1" -l "app.kubernetes.io/instance=$2" -o name)"; }
replicas() { k get deploy "$1" -o jsonpath='{.spec.replicas}'; }
replicas_are() { [ "$(replicas "$1")" = "$2" ]; }
config_port_is() { [ "$(k get configmap "$1-config" -o jsonpath='{.data.LLM_PORT}')" = "$2" ]; }

# The field managers (manager/operation) that own the Deployment's spec.replicas.
replicas_owners() {
  k get deploy "$1" --show-managed-fields \
    -o jsonpath='{range .metadata.managedFields[*]}{.manager}/{.operation} {.fieldsV1.f:spec}{"\n"}{end}' |
    awk '/"f:replicas"/ { print $1 }'
}

# spec.replicas of the Deployment must stay $2 for 10 s.
stays() {
  for _ in $(seq 20); do
    [ "$(replicas "$1")" = "$2" ] || fail "deploy/$1 has $(replicas "$1") replicas, not $2"
    sleep 0.5
  done
}

# llmservice NAME IMAGE [SPEC LINE...]: an LLMService of the demo model with a small footprint. The model is
# in the image: nothing is downloaded, so a 1Gi cache is plenty (the default, 50Gi, is requested as
# ephemeral storage per pod, more than a kind node may have for several).
llmservice() {
  local name=$1 image=$2
  shift 2
  cat <<YAML
apiVersion: serving.llmservice.io/v1alpha1
kind: LLMService
metadata:
  name: $name
spec:
  model:
    source: file:///models/demo/model
  image: $image
  imagePullPolicy: IfNotPresent
  resources:
    requests: {cpu: 100m, memory: 256Mi}
  cache:
    sizeLimit: 1Gi
YAML
  for line in "$@"; do printf '  %s\n' "$line"; done
}

step "images"
docker build -f operator/Dockerfile -t "$OPERATOR_IMAGE" .
docker build -f inference_image/Dockerfile.cpu --build-arg DEMO_MODEL=true -t "$INFERENCE_IMAGE" .

step "kind cluster $CLUSTER"
kind create cluster --name "$CLUSTER" --wait 120s
kind load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$INFERENCE_IMAGE"

step "helm install"
chart_values=(
  --set image.repository="${OPERATOR_IMAGE%:*}" --set image.tag="${OPERATOR_IMAGE##*:}"
  --set image.pullPolicy=Never --set inferenceImage="$INFERENCE_IMAGE"
)
helm install "$RELEASE" charts/llmservice-operator --namespace llm-system --create-namespace \
  --wait --timeout 5m "${chart_values[@]}"
helm test "$RELEASE" --namespace llm-system --timeout 2m

step "the CRD: established, and a bad spec refused by the API server, naming the field"
kubectl wait "crd/$CRD" --for=condition=Established --timeout=60s
kubectl create namespace "$NAMESPACE"
if refusal="$(llmservice bad "$INFERENCE_IMAGE" "gpus: 9" | k create --dry-run=server -f - 2>&1)"; then
  fail "gpus: 9 was accepted"
fi
echo "$refusal"
grep -q "spec.gpus" <<<"$refusal" || fail "the refusal does not name spec.gpus"

step "a CPU LLMService: Ready, kubectl get llms"
# From the example, with the image loaded into kind, and small enough requests for three replicas on one
# kind node beside its own pods (awk, not sed: BSD sed writes "\n" in a replacement as a literal n).
awk '{ sub(/cpu: "1"/, "cpu: 250m"); print }
     /^  gpus: 0$/ { print "  imagePullPolicy: Never"; print "  cache: {sizeLimit: 1Gi}" }' \
  examples/demo-cpu.yaml | k apply -f -
k wait llms/demo --for=condition=Ready --timeout=10m
k get llms,deploy,svc,pods -o wide
[ "$(column demo READY)" = True ] || fail "READY column: $(column demo READY)"
[ "$(column demo READY-REPLICAS)" = 1 ] || fail "READY-REPLICAS column: $(column demo READY-REPLICAS)"
uid="$(k get llms demo -o jsonpath='{.metadata.uid}')"
for child in configmap/demo-config deploy/demo svc/demo; do
  [ "$(owners "$child")" = "$uid" ] || fail "$child is not owned by llms/demo"
done

step "a chat through the Service"
k run chat --rm -i --restart=Never --image="$INFERENCE_IMAGE" --image-pull-policy=Never \
  --command -- python -c '
import json, urllib.request
body = json.dumps({"model": "demo-adapter", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}).encode()
request = urllib.request.Request("http://demo/v1/chat/completions", body, {"Content-Type": "application/json"})
reply = json.load(urllib.request.urlopen(request, timeout=60))
assert reply["choices"][0]["finish_reason"] in ("stop", "length"), reply
print("chat ok:", reply["usage"])
'

step "kubectl scale to 3 (the scale subresource)"
k scale llms/demo --replicas=3
k wait llms/demo --for=jsonpath='{.status.readyReplicas}'=3 --timeout=10m
k wait llms/demo --for=condition=Ready --timeout=5m

step "autoscaling on: the HPA takes spec.replicas over without a dip"
# Server-side apply would reset replicas the operator stops sending to 1 (see operator handover.py).
k patch llms/demo --type=merge -p '{"spec":{"replicas":null,"autoscaling":{"minReplicas":2,"maxReplicas":4}}}'
k wait hpa/demo --for=jsonpath='{.spec.minReplicas}'=2 --timeout=60s
stays demo 3  # no metrics adapter here: the HPA keeps a count within its bounds
owners_now="$(replicas_owners demo)"
echo "spec.replicas owned by: $owners_now"
grep -qx "llmservice-operator-handover/Apply" <<<"$owners_now" || fail "the handover manager does not own replicas"
if grep -qx "llmservice-operator/Apply" <<<"$owners_now"; then fail "the operator's apply still owns replicas"; fi

step "autoscaling off with spec.replicas unset: the live count stays"
k patch llms/demo --type=merge -p '{"spec":{"autoscaling":null}}'
k wait hpa/demo --for=delete --timeout=60s
stays demo 3
k scale llms/demo --replicas=1
eventually 60 replicas_are demo 1 || fail "kubectl scale did not reach deploy/demo"

step "hand edits and deletions are repaired"
k delete svc demo
eventually 30 exists svc/demo || fail "the Service was not restored"
k patch configmap demo-config --type=merge -p '{"data":{"LLM_PORT":"9999"}}'
eventually 30 config_port_is demo 8000 || fail "the ConfigMap edit was not reverted"

step "more GPUs than the cluster has: Unschedulable, in the scheduler's words, and still Reconciling"
llmservice big "$INFERENCE_IMAGE" "gpus: 8" | k apply -f -
wait_reported big Unschedulable False "Insufficient nvidia.com/gpu"

step "an image that does not pull: ImagePullBackOff, still Reconciling"
llmservice pull pull-fails.invalid/x:1 "gpus: 0" | k apply -f -
wait_reported pull ImagePullBackOff False "pull-fails.invalid/x:1"

step "a server that exits on start: CrashLoopBackOff with its exit, Stalled at once"
# The model directory is no adapter: the server fails its start-up (exit 1) with the reason.
llmservice crash "$INFERENCE_IMAGE" "gpus: 0" "adapters: [{name: broken, source: 'file:///models/demo/model'}]" |
  k apply -f -
wait_reported crash CrashLoopBackOff True "exit code 1"
k delete llms/pull llms/crash --wait --timeout=120s

step "an object the operator did not create is not taken over"
k create configmap second-config --from-literal=owner=someone-else
llmservice second "$INFERENCE_IMAGE" "gpus: 0" | k apply -f -
wait_reported second NameConflict True "ConfigMap second-config"
[ "$(k get configmap second-config -o jsonpath='{.data.owner}')" = someone-else ] || fail "the ConfigMap changed"
[ -z "$(owners configmap/second-config)" ] || fail "the ConfigMap was adopted"
if exists deploy/second; then fail "a Deployment was created beside the conflict"; fi
k delete configmap second-config
k wait llms/second --for=condition=Ready --timeout=10m

step "kubectl delete --cascade=orphan: the children stay, unowned"
k delete llms/second --cascade=orphan --wait --timeout=60s
sleep 5  # time for a wrongly restored owner reference, and for the collector to act on it
for child in configmap/second-config deploy/second svc/second; do
  exists "$child" || fail "$child is gone"
  [ -z "$(owners "$child")" ] || fail "$child is still owned"
done
[ "$(k get pods -l app.kubernetes.io/instance=second -o jsonpath='{.items[*].status.phase}')" = Running ] ||
  fail "the orphaned pod is not running"
k delete deploy,svc,configmap,pdb -l app.kubernetes.io/instance=second --wait --timeout=120s

step "delete: the garbage collector takes the children"
k delete llms/demo --wait --timeout=60s
for resource in configmap deploy replicaset svc hpa pdb networkpolicy pods; do
  eventually 180 gone "$resource" demo || fail "$resource of demo left behind"
done

step "helm upgrade changes the CRD"
# A copy of the chart with one more printer column, then the chart as it is again.
cp -R charts/llmservice-operator "$workdir/chart"
awk '{ print } /jsonPath: \.metadata\.creationTimestamp$/ {
  print "        - name: Generation"; print "          type: integer"; print "          jsonPath: .metadata.generation" }' \
  charts/llmservice-operator/templates/crd-llmservices.yaml >"$workdir/chart/templates/crd-llmservices.yaml"
printer_columns() { kubectl get crd "$CRD" -o jsonpath='{.spec.versions[0].additionalPrinterColumns[*].name}'; }
has_generation_column() { k get llms big | head -1 | grep -qw GENERATION; }
helm upgrade "$RELEASE" "$workdir/chart" --namespace llm-system --wait --timeout 5m "${chart_values[@]}"
printer_columns | grep -qw Generation || fail "the upgrade did not reach the CRD: $(printer_columns)"
eventually 30 has_generation_column || fail "kubectl get llms has no GENERATION column"
helm upgrade "$RELEASE" charts/llmservice-operator --namespace llm-system --wait --timeout 5m "${chart_values[@]}"
if printer_columns | grep -qw Generation; then fail "the second upgrade left the column"; fi

step "helm uninstall keeps the CRD and the LLMServices"
big_deployment="$(k get deploy big -o jsonpath='{.metadata.uid}')"
helm uninstall "$RELEASE" --namespace llm-system --wait | tee "$workdir/uninstall.txt"
grep -q "kept due to the resource policy" "$workdir/uninstall.txt" || fail "helm did not keep the CRD"
kubectl wait "crd/$CRD" --for=condition=Established --timeout=10s
exists llms/big || fail "llms/big is gone"
[ "$(k get deploy big -o jsonpath='{.metadata.uid}')" = "$big_deployment" ] || fail "deploy/big was replaced"
echo "e2e passed"
