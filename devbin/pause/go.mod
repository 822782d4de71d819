// Build module for the pause program of the kind node image's sandbox image
// (registry.k8s.io/pause:3.10.1, the name kubeadm v1.35.4 and containerd expect).
// Kubernetes' own pause is C; this is a small Go program with the same contract.
module tether.dev/devbin/pause

go 1.25.0
