#!/usr/bin/env bash
# Builds the real control plane's binaries from their Go modules (versions pinned by the go.mod/go.sum
# beside this script) into a cache outside the repo, and prints the directory that holds them.
# Only what is missing is built; each step says what it did on stderr.
#   LLMSERVICE_CACHE   cache root (default ~/.cache/llmservice)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${LLMSERVICE_CACHE:-$HOME/.cache/llmservice}/controlplane"
export GOTOOLCHAIN=local GOFLAGS=-buildvcs=false CGO_ENABLED=0

k8s_version=v1.34.4
kwok_version=v0.7.0
helm_version=v3.19.5
etcd_version=v3.6.16  # a record of the pin only: etcd compiles its version in as a constant

# Without these the binaries report v0.0.0 and charts' kubeVersion checks, kubectl's skew warning and
# discovery see a version that never existed.
ldflags_for() {
  case "$1" in
    kubernetes)
      local v="$k8s_version" major minor
      major="${v#v}"; major="${major%%.*}"; minor="$(echo "$v" | cut -d. -f2)"
      local f=""
      for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        f+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
      done
      echo "-s -w$f" ;;
    kwok) echo "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$kwok_version" ;;
    helm) echo "-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version" ;;
    etcd) echo "-s -w" ;;
  esac
}

binaries_of() {
  case "$1" in
    kubernetes) echo "kube-apiserver kube-controller-manager kube-scheduler kubectl" ;;
    etcd) echo "etcd" ;;  # the tool is go.etcd.io/etcd/server/v3: go names its binary "server"
    kwok) echo "kwok" ;;
    helm) echo "helm" ;;
  esac
}

# One directory per module and pin: a changed go.mod/go.sum or flag builds anew beside the old one.
key_of() {
  cat "$here/modules/$1/go.mod" "$here/modules/$1/go.sum" <(ldflags_for "$1") <(go env GOVERSION) |
    sha256sum | cut -c1-16
}

bin="$cache/bin"
mkdir -p "$bin"
for module in etcd kubernetes kwok helm; do
  out="$cache/$module-$(key_of "$module")"
  missing=0
  for b in $(binaries_of "$module"); do [[ -x "$out/$b" ]] || missing=1; done
  if ((missing)); then
    echo "controlplane: building $module ($(binaries_of "$module")) into $out" >&2
    start=$SECONDS
    mkdir -p "$out.tmp"
    (cd "$here/modules/$module" && go build -ldflags "$(ldflags_for "$module")" -o "$out.tmp/" tool)
    [[ "$module" == etcd ]] && mv "$out.tmp/server" "$out.tmp/etcd"
    rm -rf "$out" && mv "$out.tmp" "$out"
    echo "controlplane: built $module in $((SECONDS - start)) s" >&2
  else
    echo "controlplane: $module cached in $out" >&2
  fi
  for b in $(binaries_of "$module"); do ln -sfn "$out/$b" "$bin/$b"; done
done
echo "$bin"
