"""A real Kubernetes control plane on loopback, built from Go modules (see build.sh): etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and kwok's fake nodes, with the operator chart installed by helm."""
