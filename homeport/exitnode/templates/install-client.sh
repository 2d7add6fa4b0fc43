#!/usr/bin/env bash
# Install the homeport client on the machine at home (a Raspberry Pi running
# Raspberry Pi OS, or any Debian): homeport in a venv under /opt/homeport, the
# token in /etc/homeport/token (root only, 0600), the settings in
# /etc/homeport/client.env, and homeport-client.service, enabled and started,
# so the tunnel comes back after every reboot and power cut.
#
#   sudo bash install-client.sh --url wss://IP:8123 --fingerprint sha256:HEX \
#        --token-file FILE [--upstream [HOST=]URL]... [--allow-path ROUTE=PREFIX]... \
#        [--tcp PUBLIC_PORT=ADDRESS:PORT]... [--proxy-protocol PUBLIC_PORT=v1|v2]... \
#        [--name NAME] [--connections N] [--package SPEC]
#
# --upstream: default http://127.0.0.1:8080, unless only --tcp ports are given.
# --tcp: serve the exit server's raw TCP port PUBLIC_PORT (its --tcp-port) from
# ADDRESS:PORT on the LAN, e.g. --tcp 2222=127.0.0.1:22 for the Pi's SSH.
# --proxy-protocol: open each connection to that --tcp port's upstream with a
# PROXY protocol header naming the visitor (for nginx, Caddy, HAProxy, Postfix).
# --connections: websocket connections the client keeps (default 2, so that a
# download over a lossy home uplink does not hold back other visitors).
#
# `homeport exit-node create` prints this command with the values filled in.
# Run it again to change a setting: it only rewrites what it owns. The token is
# never printed. --token-file - reads it from standard input.
#
# Tests run it against a scratch directory: HOMEPORT_ROOT=/tmp/x, with fake
# apt-get, python3 and systemctl first on PATH.
set -euo pipefail
export LC_ALL=C DEBIAN_FRONTEND=noninteractive
umask 022

ROOT=${HOMEPORT_ROOT:-}
VENV=/opt/homeport/venv
CONF=/etc/homeport
UNIT=homeport-client.service
PACKAGE='homeport==0.1.0'  # this release; a test keeps it equal to pyproject.toml

die() {
  echo "install-client.sh: $*" >&2
  exit 1
}

usage() {
  sed -n '8,19p' "$0" >&2
  exit 2
}

# must_match WHAT VALUE REGEX: refuse a value that is not exactly what we expect.
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

url='' fingerprint='' token_file='' name='' connections=2
upstreams=() allow_paths=() tcps=() proxies=()
while (($# > 0)); do
  (($# >= 2)) || usage
  case $1 in
    --url) url=$2 ;;
    --fingerprint) fingerprint=$2 ;;
    --token-file) token_file=$2 ;;
    --upstream) upstreams+=("$2") ;;
    --allow-path) allow_paths+=("$2") ;;
    --tcp) tcps+=("$2") ;;
    --proxy-protocol) proxies+=("$2") ;;
    --name) name=$2 ;;
    --connections) connections=$2 ;;
    --package) PACKAGE=$2 ;;
    *) usage ;;
  esac
  shift 2
done
[[ -n $url && -n $fingerprint && -n $token_file ]] || usage
((${#upstreams[@]} > 0 || ${#tcps[@]} > 0)) || upstreams=(http://127.0.0.1:8080)

host='([A-Za-z0-9-]+\.)*[A-Za-z0-9-]+|\[[0-9A-Fa-f:.]+\]'
must_match HOMEPORT_ROOT "$ROOT" '^(/[A-Za-z0-9._/-]+)?$'
must_match --url "$url" "^wss://($host):[0-9]{1,5}/?$"
must_match --fingerprint "$fingerprint" '^sha256:[0-9a-f]{64}$'
for upstream in "${upstreams[@]}"; do
  must_match --upstream "$upstream" "^([A-Za-z0-9.-]+=)?https?://($host)(:[0-9]{1,5})?/?$"
done
for prefix in "${allow_paths[@]}"; do
  must_match --allow-path "$prefix" '^[A-Za-z0-9.-]+=/[A-Za-z0-9._~/-]*$'
done
tcp_ports=' '
for tcp in "${tcps[@]}"; do
  must_match --tcp "$tcp" "^[1-9][0-9]{0,4}=($host):[1-9][0-9]{0,4}$"
  public_port=${tcp%%=*} lan_port=${tcp##*:}
  ((public_port <= 65535 && lan_port <= 65535)) ||
    die "--tcp has a port over 65535; nothing was changed"
  [[ $tcp_ports != *" $public_port "* ]] ||
    die "--tcp port $public_port is given twice; nothing was changed"
  tcp_ports+="$public_port "
done
proxied=' '
for proxy in "${proxies[@]}"; do
  must_match --proxy-protocol "$proxy" '^[1-9][0-9]{0,4}=v[12]$'
  [[ $tcp_ports == *" ${proxy%%=*} "* ]] ||
    die "--proxy-protocol port ${proxy%%=*} is not a --tcp port; nothing was changed"
  [[ $proxied != *" ${proxy%%=*} "* ]] ||
    die "--proxy-protocol port ${proxy%%=*} is given twice; nothing was changed"
  proxied+="${proxy%%=*} "
done
[[ -z $name ]] || must_match --name "$name" '^[A-Za-z0-9._-]{1,63}$'
must_match --connections "$connections" '^[1-8]$'
must_match --package "$PACKAGE" '^(homeport==[0-9A-Za-z.+!-]+|(git\+)?https://[A-Za-z0-9._~:/@+%#=?&-]+)$'

# The token: one line of printable ASCII, read without ever being echoed.
token=''
if [[ $token_file == - ]]; then
  IFS= read -r token || [[ -n $token ]] || die "no token on standard input"
else
  [[ -r $token_file ]] || die "cannot read the token file $token_file"
  IFS= read -r token <"$token_file" || [[ -n $token ]] || die "the token file $token_file is empty"
fi
token=${token%$'\r'}
must_match "the token" "$token" '^[!-~]{16,4096}$'

[[ -n $ROOT || $EUID -eq 0 ]] || die "run it as root: sudo bash $0 ..."

if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  apt-get -o DPkg::Lock::Timeout=600 -q update
  apt-get -o DPkg::Lock::Timeout=600 -q install -y --no-install-recommends python3 python3-venv
fi
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  die "homeport needs Python 3.11 or newer (Raspberry Pi OS 12 \"bookworm\" has it)"

mkdir -p "$ROOT$CONF" "$ROOT/etc/systemd/system"
chmod 0700 "$ROOT$CONF"
printf '%s\n' "$token" | put 0600 "$CONF/token"
{
  echo "HOMEPORT_URL=$url"
  echo "HOMEPORT_FINGERPRINT=$fingerprint"
  if ((${#upstreams[@]} > 0)); then
    echo "HOMEPORT_UPSTREAM=\"${upstreams[*]}\""
  fi
  if ((${#tcps[@]} > 0)); then
    echo "HOMEPORT_TCP=\"${tcps[*]}\""
  fi
  if ((${#proxies[@]} > 0)); then
    echo "HOMEPORT_PROXY_PROTOCOL=\"${proxies[*]}\""
  fi
  if ((${#allow_paths[@]} > 0)); then
    echo "HOMEPORT_ALLOW_PATH=\"${allow_paths[*]}\""
  fi
  if [[ -n $name ]]; then
    echo "HOMEPORT_NAME=$name"
  fi
  echo "HOMEPORT_CONNECTIONS=$connections"
} | put 0600 "$CONF/client.env"
put 0644 "/etc/systemd/system/$UNIT" <<'EOF_UNIT'
# homeport client, on the machine at home (a Raspberry Pi): dials out to the exit
# server and serves the LAN services in /etc/homeport/client.env
# (deploy/civo-exit-node/README.md). Comes back after every reboot and power cut.
[Unit]
Description=homeport client
Wants=network-online.target
After=network-online.target
# Restart forever: after a power cut the network may take minutes to return.
StartLimitIntervalSec=0

[Service]
Type=notify
NotifyAccess=main
# It pings systemd from its event loop: a loop stuck for 30 s gets the
# process restarted (a live process serving nothing would never be noticed).
WatchdogSec=30
# HOMEPORT_URL, HOMEPORT_FINGERPRINT, HOMEPORT_UPSTREAM, ...: no secrets in there.
EnvironmentFile=/etc/homeport/client.env
Environment=PYTHONDONTWRITEBYTECODE=1
ExecStart=/opt/homeport/venv/bin/homeport client --token-file %d/token
LoadCredential=token:/etc/homeport/token
Restart=always
RestartSec=5

DynamicUser=yes
CapabilityBoundingSet=
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateMounts=yes
PrivateUsers=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
ProcSubset=pid
# AF_UNIX: asyncio's self-pipe is a Unix socket pair.
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RemoveIPC=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
UMask=0077
MemoryMax=128M
TasksMax=32

[Install]
WantedBy=multi-user.target
EOF_UNIT

[[ -x $ROOT$VENV/bin/python ]] || python3 -m venv "$ROOT$VENV"
"$ROOT$VENV/bin/pip" install --no-cache-dir --disable-pip-version-check "$PACKAGE"
systemctl daemon-reload
systemctl enable "$UNIT"
systemctl restart "$UNIT"
echo "homeport client installed and started; watch it with: journalctl -u $UNIT -f"
