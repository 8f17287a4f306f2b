#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Makes a throwaway test PKI: a CA, a KME server certificate for localhost/127.0.0.1,
# and one client certificate per SAE (common name = SAE ID).
#   scripts/make-test-pki.sh DIR [SAE_ID ...]      (default SAEs: sae-a sae-b sae-c)
# Nothing here is secret or committed; tests and the demo make it at run time.
# OTPGATE_PKI_EXTRA_SANS adds names to the KME certificate (e.g. "IP:10.200.1.1").
set -euo pipefail
dir=${1:?usage: make-test-pki.sh DIR [SAE_ID ...]}
shift
saes=("$@")
[ ${#saes[@]} -gt 0 ] || saes=(sae-a sae-b sae-c)
ca_name=${OTPGATE_PKI_CA_NAME:-otpgate test CA}

mkdir -p "$dir"
cd "$dir"
umask 077
# A PKI kept from an earlier run is made anew when its CA has less than 60 days left
# (--check-config warns about certificates that expire within 30 days).
if [ -f ca.crt ] && ! openssl x509 -checkend $((60 * 86400)) -noout -in ca.crt >/dev/null; then
  rm -f ./*.crt ./*.key ./*.srl ./*.ext
fi
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

if [ ! -f ca.crt ]; then
  key ca.key
  openssl req -x509 -new -key ca.key -sha256 -days 365 -subj "/CN=$ca_name" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out ca.crt 2>/dev/null
fi

issue() {  # issue NAME CN EXTFILE
  key "$1.key"
  local cn=${2//\\/\\\\}          # escape \ / + = for -subj
  cn=${cn//\//\\/}; cn=${cn//+/\\+}; cn=${cn//=/\\=}
  openssl req -new -key "$1.key" -subj "/CN=$cn" -out "$1.csr" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -sha256 \
    -extfile "$3" -out "$1.crt" 2>/dev/null
  rm -f "$1.csr"
}

if [ ! -f kme.crt ]; then
  printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=digitalSignature" \
    "extendedKeyUsage=serverAuth" "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1${OTPGATE_PKI_EXTRA_SANS:+,$OTPGATE_PKI_EXTRA_SANS}" > server.ext
  issue kme localhost server.ext
fi
printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=digitalSignature" \
  "extendedKeyUsage=clientAuth" > client.ext
for sae in "${saes[@]}"; do
  [ -f "$sae.crt" ] || issue "$sae" "$sae" client.ext
done
chmod 644 ./*.crt
echo "test PKI in $dir: ca.crt, kme.crt/kme.key, ${saes[*]/%/.crt}"
