#!/bin/sh
# Regenerates the test certificates (run in tests/tls). Valid from 2020 to 2120 so that neither a
# machine's clock nor the years a checkout lives can make them fail.
set -eu
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cat > "$dir/ca.cnf" <<CNF
[ca]
default_ca = test
[test]
database = $dir/index
new_certs_dir = $dir
serial = $dir/serial
default_md = sha256
policy = any
unique_subject = no
copy_extensions = none
[any]
commonName = supplied
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[node]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth,clientAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[writer]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectAltName = DNS:orders.svc.example,URI:spiffe://example.test/ns/orders/sa/writer
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
CNF
# Signs certificate $2 (subject $3, extensions section $4) with CA $1.
sign() {
  openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out "$2.key"
  openssl req -new -key "$2.key" -subj "/CN=$3" -out "$dir/$2.csr"
  openssl ca -batch -config "$dir/ca.cnf" -cert "$1.pem" -keyfile "$dir/$1.key" -in "$dir/$2.csr" \
    -extensions "$4" -startdate 20200101000000Z -enddate 21200101000000Z -notext -out "$2.pem" 2>/dev/null
}
# Creates CA $1 (subject $2) and signs node certificate $3 (subject $4) with it.
pair() {
  : > "$dir/index"; echo 01 > "$dir/serial"
  openssl ecparam -name prime256v1 -genkey -noout -out "$dir/$1.key"
  openssl req -new -key "$dir/$1.key" -subj "/CN=$2" -out "$dir/$1.csr"
  openssl ca -batch -config "$dir/ca.cnf" -selfsign -keyfile "$dir/$1.key" -in "$dir/$1.csr" \
    -extensions v3_ca -startdate 20200101000000Z -enddate 21200101000000Z -notext -out "$1.pem" 2>/dev/null
  sign "$1" "$3" "$4" node
}
pair ca "dci test CA" node "dci test node"
# A client only (a writer service), known by its DNS and SPIFFE names.
sign ca writer "orders writer" writer
pair other-ca "another CA" other-node "a node of another CA"
