#!/usr/bin/env bash
# A private certificate authority and one certificate signed by it, for dask's TLS between the
# scheduler, the workers and dva (each side presents the certificate and checks the other's
# against the CA; dask does not compare host names, so one certificate serves every machine).
#
#   deploy/tls/make-certs.sh OUT_DIR [HOST_OR_IP ...]
#
# Writes OUT_DIR/ca.pem (give it to every machine), OUT_DIR/ca-key.pem (keep it off the cluster:
# it signs new certificates), OUT_DIR/node.pem and OUT_DIR/node-key.pem (every machine; the key
# is readable by its owner only). The hosts (default: localhost 127.0.0.1) go into the
# certificate's subjectAltName for tools that check names. Valid for DAYS days (default 365).
#
#   dask scheduler --protocol tls --tls-ca-file ca.pem --tls-cert node.pem --tls-key node-key.pem
#   dask cuda worker tls://SCHEDULER:8786 --tls-ca-file ca.pem --tls-cert node.pem --tls-key node-key.pem
#   dva run ... --scheduler tls://SCHEDULER:8786 --tls-ca-file ca.pem --tls-cert node.pem --tls-key node-key.pem
set -euo pipefail

if (($# < 1)); then
    echo "usage: $0 OUT_DIR [HOST_OR_IP ...]" >&2
    exit 2
fi
out=$1
shift
(($# > 0)) || set -- localhost 127.0.0.1
days=${DAYS:-365}

san=()
for host in "$@"; do
    if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then san+=("IP:$host"); else san+=("DNS:$host"); fi
done

# openssl, its chatter shown only when it fails
quiet() {
    local log
    log=$(mktemp)
    if ! "$@" 2>"$log"; then cat "$log" >&2; rm -f "$log"; return 1; fi
    rm -f "$log"
}

if [[ -e $out/ca.pem ]]; then
    echo "$0: $out/ca.pem exists; give a new OUT_DIR (a new CA invalidates the certificates it signed)" >&2
    exit 2
fi
mkdir -p "$out"
umask 077
cd "$out"

quiet openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 -days "$days" \
    -subj "/CN=dva dask CA" -keyout ca-key.pem -out ca.pem \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"

quiet openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 \
    -subj "/CN=dva dask node" -keyout node-key.pem -out node.csr
(IFS=,; printf '%s\n' \
    "basicConstraints=CA:FALSE" \
    "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth,clientAuth" \
    "subjectAltName=${san[*]}") >node.ext
quiet openssl x509 -req -in node.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -sha256 -days "$days" \
    -extfile node.ext -out node.pem
rm -f node.csr node.ext ca.srl

chmod 644 ca.pem node.pem
openssl verify -CAfile ca.pem node.pem >/dev/null
echo "wrote $out/ca.pem, ca-key.pem (keep private), node.pem, node-key.pem for ${san[*]}" >&2
