#!/bin/sh
# A private CA and a broker certificate for Mosquitto's TLS listener
# (docs/SECURITY.md, "Certificates with openssl"). CI runs this file and
# checks that the agent accepts the certificate (tests/docs:
# tls_recipe_makes_a_certificate_the_agent_accepts).
#
#   tls-certs.sh BROKER_NAME [BROKER_IP]
#
# Writes into the current directory: ca.pem (every agent's mqtt.ca_file),
# ca.key (keep it offline), server.pem and server.key (Mosquitto's certfile
# and keyfile). BROKER_NAME is the mqtt.host the agents use.
set -eu
name="${1:?usage: tls-certs.sh BROKER_NAME [BROKER_IP]}"
san="DNS:$name${2:+,IP:$2}"

# The CA: an X.509 v3 certificate (req -x509 adds the extensions), 10 years.
openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout ca.key -out ca.pem -days 3650 -subj "/CN=ESL broker CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign"

# The broker's key and certificate. The -extfile makes it v3 with the name
# in subjectAltName: the agent (rustls) checks only subjectAltName, never
# the CN, and refuses v1 certificates (x509 -req without extensions).
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout server.key -out server.csr -subj "/CN=$name"
cat >server.ext <<EXT
subjectAltName = $san
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
EXT
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
    -days 825 -out server.pem -extfile server.ext
rm -f server.csr server.ext ca.srl
chmod 600 ca.key server.key
