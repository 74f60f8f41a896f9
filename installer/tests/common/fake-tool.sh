#!/bin/bash
# A stand-in for talosctl, helm, kubectl and docker (linked under those names) for the
# installer's tests. It records its command line in $FAKE_LOG, fails on demand when the line
# contains $FAKE_FAIL, and otherwise does the least the installer relies on: writes the
# kubeconfig/talosconfig/secrets/machine configs it was asked for, prints versions, and
# remembers made clusters and configured nodes as marker files in $FAKE_STATE.
set -u
tool=$(basename "$0" .real)
line="$tool $*"
echo "$line" >> "$FAKE_LOG"

if [ -n "${FAKE_FAIL:-}" ] && [[ "$line" == *"$FAKE_FAIL"* ]]; then
  echo "fake $tool: failing on demand" >&2
  echo "token: fake-secret-token-1234567890" >&2
  exit 1
fi

after() { # the value after flag $1 in the remaining arguments
  local want=$1; shift
  while [ $# -gt 0 ]; do
    if [ "$1" = "$want" ]; then echo "$2"; return 0; fi
    shift
  done
  return 1
}
last() { local l=""; for a in "$@"; do l=$a; done; echo "$l"; }

kubeconfig() {
  mkdir -p "$(dirname "$1")"
  cat > "$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: sre-lab
  cluster:
    server: ${FAKE_API_URL}
contexts:
- name: admin@sre-lab
  context:
    cluster: sre-lab
    user: admin@sre-lab
current-context: admin@sre-lab
users:
- name: admin@sre-lab
  user:
    token: fake-kube-token
KC
}

case "$tool" in
talosctl)
  case "$line" in
  *" version --client"*) printf 'Client:\n\tTag:         %s\n' "${FAKE_TALOSCTL_VERSION:-v1.13.9}" ;;
  *"cluster create "*)
    [ -f "${FAKE_STATE}/cluster" ] && { echo "cluster already exists" >&2; exit 1; }
    # Like Talos >= v1.13 with a CNI to fetch: its checks wait for Ready nodes, which a
    # `custom` CNI served by nobody never gives (`none` skips that check).
    patch=$(after --config-patch "$@"); patch=${patch#@}
    if grep -q 'name: custom' "$patch"; then echo "nodes never became Ready" >&2; exit 1; fi
    touch "${FAKE_STATE}/cluster"
    kubeconfig "$KUBECONFIG"
    dest=$(after --talosconfig-destination "$@")
    printf 'context: sre-lab\ncontexts:\n  sre-lab:\n    endpoints: [127.0.0.1]\n    key: ZmFrZS1rZXk=\n' > "$dest"
    ;;
  *"cluster destroy"*) rm -f "${FAKE_STATE}/cluster" ;;
  *"gen secrets"*) printf 'cluster:\n  secret: c2VjcmV0\n' > "$(after --output-file "$@")" ;;
  *"gen config"*)
    out=$(after --output "$@"); mkdir -p "$out"
    for f in controlplane.yaml worker.yaml talosconfig; do echo "# fake $f" > "$out/$f"; done ;;
  *"apply-config"*) touch "${FAKE_STATE}/configured-$(after --nodes "$@")" ;;
  *" version")
    [ -f "${FAKE_STATE}/configured-$(after --nodes "$@")" ] || [ -f "${FAKE_STATE}/cluster" ] || { echo "connection refused" >&2; exit 1; }
    printf 'Client:\n\tTag:         %s\nServer:\n\tNODE:        %s\n\tTag:         %s\n' "${FAKE_TALOSCTL_VERSION:-v1.13.9}" "$(after --nodes "$@")" "${FAKE_TALOS_SERVER:-v1.13.9}" ;;
  *" bootstrap") touch "${FAKE_STATE}/bootstrapped" ;;
  *" etcd status") [ -f "${FAKE_STATE}/bootstrapped" ] || { echo "etcd not running" >&2; exit 1; } ;;
  *" kubeconfig "*) kubeconfig "$(last "$@")" ;;
  esac ;;
helm)
  case "$line" in
  *"version --short"*) echo "${FAKE_HELM_VERSION:-v3.17.3+ge4da497}" ;;
  "helm upgrade --install "*) touch "${FAKE_STATE}/release-$3" ;;
  "helm status "*)
    [ -f "${FAKE_STATE}/release-$2" ] || { echo "Error: release: not found" >&2; exit 1; }
    printf '{"name":"%s","info":{"status":"%s"}}\n' "$2" "${FAKE_RELEASE_STATUS:-deployed}" ;;
  *" list --all-namespaces"*)
    releases='[{"name":"cilium","namespace":"kube-system","chart":"cilium-1.18.12","app_version":"1.18.12"},{"name":"kube-prometheus-stack","namespace":"monitoring","chart":"kube-prometheus-stack-88.5.3","app_version":"v0.88.0"},{"name":"loki","namespace":"monitoring","chart":"loki-18.11.0","app_version":"3.6.0"}]'
    printf '%s\n' "${FAKE_HELM_LIST:-$releases}" ;;
  esac ;;
docker)
  case "$line" in
  *"container inspect"*"-registry") [ -f "${FAKE_STATE}/registry" ] && echo "/$(last "$@")" || { echo "Error: No such container" >&2; exit 1; } ;;
  *"container inspect"*) [ -f "${FAKE_STATE}/cluster" ] && echo "/$(last "$@")" || { echo "Error: No such container" >&2; exit 1; } ;;
  "docker run "*) touch "${FAKE_STATE}/registry"; echo "4f1c0ffee" ;;
  "docker rm "*) rm -f "${FAKE_STATE}/registry" ;;
  "docker push "*) echo "0.1.0: digest: sha256:${FAKE_DIGEST:-4c1b8e3a0f0d9a6b5e2c7d1f8a9b0c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3} size: 528" ;;
  "docker --version") echo "Docker version 27.3.1, build ce12230" ;;
  *"info --format"*) echo "27.3.1" ;;
  esac ;;
kubectl)
  case "$line" in
  *"version --client"*) echo "Client Version: v1.34.1" ;;
  esac ;;
esac
exit 0
