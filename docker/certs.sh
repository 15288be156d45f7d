#!/usr/bin/env bash
# Test credentials for compose.tls.yaml, written to docker/certs/ (git-ignored):
#   ca.crt, ca.key                 a self-signed test CA
#   superlink.pem, superlink.key   the SuperLink's TLS certificate, signed by the CA, valid for the
#                                  names it is reached by: `superlink` (inside the compose network),
#                                  localhost and 127.0.0.1 (`flwr` on the host)
#   supernode-N, supernode-N.pub   an ECDSA P-384 key pair (OpenSSH format) per SuperNode, N = 1..3,
#                                  for SuperNode authentication (`flwr supernode register`)
# For testing only: a real federation takes its certificates from its own PKI. Key files are made
# readable by the containers' non-root user `app` (the CA key stays private to this folder).
# Usage: bash docker/certs.sh [--force]   (refuses to overwrite existing credentials without --force;
# CERTS_DIR=<folder> writes elsewhere)
set -euo pipefail
out="${CERTS_DIR:-$(cd "$(dirname "$0")" && pwd)/certs}"
nodes=3

for tool in openssl ssh-keygen; do
  command -v "$tool" >/dev/null || { echo "certs.sh: $tool not found (install openssl / openssh-client)" >&2; exit 1; }
done
if [[ -e "$out/ca.crt" && "${1:-}" != "--force" ]]; then
  echo "certs.sh: $out already holds credentials; pass --force to replace them" >&2
  exit 1
fi
rm -rf "$out"
mkdir -p "$out"
cd "$out"

openssl req -x509 -newkey rsa:4096 -sha256 -days 365 -nodes -subj "/CN=fedlora-flwr test CA" \
  -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey rsa:4096 -sha256 -nodes -subj "/CN=superlink" \
  -keyout superlink.key -out superlink.csr 2>/dev/null
printf '%s\n' "subjectAltName = DNS:superlink, DNS:localhost, IP:127.0.0.1" \
  "basicConstraints = CA:FALSE" "keyUsage = digitalSignature, keyEncipherment" \
  "extendedKeyUsage = serverAuth" > superlink.ext
openssl x509 -req -in superlink.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -sha256 \
  -extfile superlink.ext -out superlink.pem 2>/dev/null
rm superlink.csr superlink.ext ca.srl
openssl verify -CAfile ca.crt superlink.pem >/dev/null

for n in $(seq 1 "$nodes"); do
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "supernode-$n" -f "supernode-$n"
done
chmod 644 ./*
chmod 600 ca.key  # only certs.sh needs it
echo "certs.sh: wrote $(ls | tr '\n' ' ')to $out"
