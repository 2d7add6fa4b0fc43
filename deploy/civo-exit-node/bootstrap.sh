#!/usr/bin/env bash
# homeport exit node bootstrap: run once, as root, at the VM's first boot
# (Civo's `script` field; cloud-config.yaml is the same for cloud-init).
#
# `homeport exit-node create` fills in the values between @@ marks after
# checking each against a strict pattern; this script checks them again.
# It carries the SHA-256 of the tunnel token, never the token itself.
# Installs homeport in a venv under /opt/homeport, writes its settings and
# secrets to /etc/homeport (root only), installs homeport-exit.service and
# starts it. Safe to run again.
#
# Tests run it against a scratch directory: HOMEPORT_ROOT=/tmp/x, with fake
# apt-get, python3 and systemctl first on PATH.
set -euo pipefail
export LC_ALL=C DEBIAN_FRONTEND=noninteractive
umask 022

ROOT=${HOMEPORT_ROOT:-}
PACKAGE='@@PACKAGE@@'
PUBLIC_PORT='@@PUBLIC_PORT@@'
CONTROL_PORT='@@CONTROL_PORT@@'
TCP_PORTS='@@TCP_PORTS@@'
LETSENCRYPT_DOMAINS='@@LETSENCRYPT_DOMAINS@@'
LETSENCRYPT_EMAIL='@@LETSENCRYPT_EMAIL@@'
LETSENCRYPT_ISSUER='@@LETSENCRYPT_ISSUER@@'
HTTPS_REDIRECT='@@HTTPS_REDIRECT@@'
TOKEN_HASH='@@TOKEN_HASH@@'

VENV=/opt/homeport/venv
CONF=/etc/homeport
UNIT=homeport-exit.service

die() {
  echo "homeport bootstrap: $*" >&2
  exit 1
}

# must_match NAME VALUE REGEX: refuse a value that is not exactly what we expect.
must_match() {
  [[ $2 =~ $3 ]] || die "$1 is malformed; nothing was changed"
}

# put MODE PATH: write standard input to ROOT/PATH with MODE, atomically.
put() {
  local mode=$1 path=$ROOT$2 tmp
  tmp=$(mktemp "$path.XXXXXX")
  cat >"$tmp"
  chmod "$mode" "$tmp"
  mv -f "$tmp" "$path"
}

must_match HOMEPORT_ROOT "$ROOT" '^(/[A-Za-z0-9._/-]+)?$'
must_match package "$PACKAGE" '^(homeport==[0-9A-Za-z.+!-]+|(git\+)?https://[A-Za-z0-9._~:/@+%#=?&-]+)$'
must_match "public port" "$PUBLIC_PORT" '^[1-9][0-9]{0,4}$'
must_match "control port" "$CONTROL_PORT" '^[1-9][0-9]{0,4}$'
must_match "token hash" "$TOKEN_HASH" '^[0-9a-f]{64}$'
((PUBLIC_PORT <= 65535 && CONTROL_PORT <= 65535 && PUBLIC_PORT != CONTROL_PORT)) ||
  die "the ports must be two different numbers from 1 to 65535"
# HTTPS for visitors (optional): lower-case DNS names one space apart, each
# ending in a top-level label that starts with a letter (no IP address, no
# wildcard); an email address of a plain alphabet; one of Let's Encrypt's CAs;
# plain HTTP redirected to HTTPS ("true") or not (empty: click 8.2.0 and 8.2.1
# read any other value, "false" too, as on).
domain='([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]([a-z0-9-]{0,61}[a-z0-9])?'
must_match "Let's Encrypt domain list" "$LETSENCRYPT_DOMAINS" "^($domain( $domain)*)?\$"
must_match "Let's Encrypt email" "$LETSENCRYPT_EMAIL" \
  '^([A-Za-z0-9._+-]{1,64}@[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})+)?$'
must_match "Let's Encrypt issuer" "$LETSENCRYPT_ISSUER" '^(production|staging)$'
must_match "HTTPS redirect" "$HTTPS_REDIRECT" '^(true)?$'
taken=" $PUBLIC_PORT $CONTROL_PORT "
if [[ -n $LETSENCRYPT_DOMAINS ]]; then
  # Let's Encrypt checks each name on port 80 (HTTP-01); visitors get HTTPS on 443.
  ((PUBLIC_PORT == 80)) || die "Let's Encrypt needs the public port to be 80"
  ((CONTROL_PORT != 443)) || die "the control port cannot be 443, the HTTPS port"
  taken+="443 "
elif [[ -n $LETSENCRYPT_EMAIL ]]; then
  die "a Let's Encrypt email goes with a Let's Encrypt domain"
elif [[ -n $HTTPS_REDIRECT ]]; then
  # The exit server would not start: --https-redirect needs HTTPS.
  die "the HTTPS redirect goes with a Let's Encrypt domain"
fi
# The raw TCP ports: port numbers one space apart, each once, none of the above.
must_match "TCP ports" "$TCP_PORTS" '^([1-9][0-9]{0,4}( [1-9][0-9]{0,4})*)?$'
read -ra tcp_ports <<<"$TCP_PORTS"
for port in "${tcp_ports[@]}"; do
  if ((port > 65535)) || [[ $taken == *" $port "* ]]; then
    die "TCP port $port is over 65535, given twice, or the public, control or HTTPS port"
  fi
  taken+="$port "
done

apt_get() {
  apt-get -o DPkg::Lock::Timeout=600 -q "$@"
}
apt_get update
# gcc and the headers: pip compiles the exit server's request path (below).
apt_get install -y --no-install-recommends ca-certificates python3 python3-venv \
  gcc libc6-dev python3-dev
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  die "homeport needs Python 3.11 or newer: pick a newer disk image (ubuntu-noble, debian-12)"

mkdir -p "$ROOT$CONF" "$ROOT/etc/systemd/system"
chmod 0700 "$ROOT$CONF"
put 0600 "$CONF/exit.env" <<EOF_ENV
HOMEPORT_PORT=$PUBLIC_PORT
HOMEPORT_CONTROL_PORT=$CONTROL_PORT
HOMEPORT_TCP_PORT="$TCP_PORTS"
HOMEPORT_LETSENCRYPT_DOMAIN="$LETSENCRYPT_DOMAINS"
HOMEPORT_LETSENCRYPT_EMAIL="$LETSENCRYPT_EMAIL"
HOMEPORT_LETSENCRYPT_ISSUER=$LETSENCRYPT_ISSUER
HOMEPORT_HTTPS_REDIRECT="$HTTPS_REDIRECT"
EOF_ENV
put 0600 "$CONF/token-hash" <<EOF_HASH
$TOKEN_HASH
EOF_HASH
put 0600 "$CONF/tls.crt" <<'EOF_CERT'
@@TLS_CERT@@
EOF_CERT
put 0600 "$CONF/tls.key" <<'EOF_KEY'
@@TLS_KEY@@
EOF_KEY
put 0644 "/etc/systemd/system/$UNIT" <<'EOF_UNIT'
@@EXIT_UNIT@@
EOF_UNIT

[[ -x $ROOT$VENV/bin/python ]] || python3 -m venv "$ROOT$VENV"
# HOMEPORT_COMPILE=1: built from source with the request path compiled by mypyc
# (docs/performance.md); the same code as the pure-Python wheel, about a fifth faster.
env HOMEPORT_COMPILE=1 "$ROOT$VENV/bin/pip" install --no-cache-dir \
  --disable-pip-version-check --no-binary homeport "$PACKAGE"
systemctl daemon-reload
systemctl enable "$UNIT"
systemctl restart "$UNIT"
echo "homeport bootstrap: $UNIT is running"
