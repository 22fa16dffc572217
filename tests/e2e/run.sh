#!/usr/bin/env bash
# make e2e: the whole product on a real cluster (kind). Needs docker, kind, kubectl and helm on PATH;
# CI here has none of them, so this runs on developer machines and GPU-less CI runners that do.
#
# kind cluster -> both images loaded -> helm install the operator chart -> a CPU LLMService serving the
# demo model baked into the test image -> kubectl wait Ready -> a chat through the Service -> kubectl scale
# -> delete (children garbage-collected) -> cluster deleted (also on failure, unless KEEP_CLUSTER=1).
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=${CLUSTER:-llmservice-e2e}
OPERATOR_IMAGE=${OPERATOR_IMAGE:-llmservice/operator:e2e}
INFERENCE_IMAGE=${INFERENCE_IMAGE:-llmservice/inference:e2e-cpu-demo}
NAMESPACE=llm-e2e

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "make e2e needs $tool on PATH" >&2; exit 2; }
done

cleanup() {
  if [ "${KEEP_CLUSTER:-0}" != "1" ]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }

step "images"
docker build -f operator/Dockerfile -t "$OPERATOR_IMAGE" .
docker build -f inference_image/Dockerfile.cpu --build-arg DEMO_MODEL=true -t "$INFERENCE_IMAGE" .

step "kind cluster $CLUSTER"
kind create cluster --name "$CLUSTER" --wait 120s
kind load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$INFERENCE_IMAGE"

step "helm install"
helm install llmservice-operator charts/llmservice-operator \
  --namespace llm-system --create-namespace --wait --timeout 5m \
  --set image.repository="${OPERATOR_IMAGE%:*}" --set image.tag="${OPERATOR_IMAGE##*:}" \
  --set image.pullPolicy=Never --set inferenceImage="$INFERENCE_IMAGE"
helm test llmservice-operator --namespace llm-system --timeout 2m

step "a CPU LLMService"
kubectl create namespace "$NAMESPACE"
# awk, not sed: BSD sed (macOS) writes "\n" in a replacement as a literal n
awk '{ print } /^  gpus: 0$/ { print "  imagePullPolicy: Never" }' examples/demo-cpu.yaml | kubectl -n "$NAMESPACE" apply -f -
kubectl -n "$NAMESPACE" wait llms/demo --for=condition=Ready --timeout=10m
kubectl -n "$NAMESPACE" get llms,deploy,svc,pods -o wide

step "a chat through the Service"
kubectl -n "$NAMESPACE" run chat --rm -i --restart=Never --image="$INFERENCE_IMAGE" --image-pull-policy=Never \
  --command -- python -c '
import json, urllib.request
body = json.dumps({"model": "demo-adapter", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}).encode()
request = urllib.request.Request("http://demo/v1/chat/completions", body, {"Content-Type": "application/json"})
reply = json.load(urllib.request.urlopen(request, timeout=60))
assert reply["choices"][0]["finish_reason"] in ("stop", "length"), reply
print("chat ok:", reply["usage"])
'

step "kubectl scale (the scale subresource)"
kubectl -n "$NAMESPACE" scale llms/demo --replicas=2
kubectl -n "$NAMESPACE" wait deploy/demo --for=jsonpath='{.spec.replicas}'=2 --timeout=60s
kubectl -n "$NAMESPACE" wait llms/demo --for=condition=Ready --timeout=10m
test "$(kubectl -n "$NAMESPACE" get llms/demo -o jsonpath='{.status.readyReplicas}')" = 2

step "autoscaling turned on: the HPA takes spec.replicas over without a scale-down"
# Server-side apply would reset replicas the operator stops sending to 1 (see operator handover.py).
kubectl -n "$NAMESPACE" patch llms/demo --type=merge -p '{"spec":{"autoscaling":{"minReplicas":2,"maxReplicas":3}}}'
kubectl -n "$NAMESPACE" wait hpa/demo --for=jsonpath='{.spec.minReplicas}'=2 --timeout=60s
for _ in $(seq 20); do
  test "$(kubectl -n "$NAMESPACE" get deploy/demo -o jsonpath='{.spec.replicas}')" = 2
  sleep 0.5
done

step "delete: children go with it"
kubectl -n "$NAMESPACE" delete llms/demo --wait --timeout=60s
kubectl -n "$NAMESPACE" wait deploy/demo --for=delete --timeout=120s
test -z "$(kubectl -n "$NAMESPACE" get deploy,svc,hpa,pdb,cm -l app.kubernetes.io/instance=demo -o name)"

step "helm uninstall keeps the CRD"
helm uninstall llmservice-operator --namespace llm-system --wait
kubectl get crd llmservices.serving.llmservice.io >/dev/null
echo "e2e passed"
