#!/bin/sh
# Sets up what the tests need on a Debian-like machine, then the real peers
# (tests/peers/install.sh). Run as root it installs the missing system packages with apt;
# otherwise it names the command that would, and stops. Safe to run again.
#
#   ./tests/setup.sh && cargo test --locked
set -eu
cd "$(dirname "$0")"

# command:package pairs. git builds fixture repositories and serves file:// remotes; tar,
# curl, shellcheck and systemd-analyze run and check the install files; Python and Node
# run the SDK-level OpAMP clients; Chromium loads the status page; openssl makes the TLS
# test certificates; setpriv runs PostgreSQL as nobody when the tests run as root.
wanted='git:git tar:tar curl:curl shellcheck:shellcheck systemd-analyze:systemd openssl:openssl
python3:python3 npm:npm node:nodejs chromium:chromium setpriv:util-linux'

missing=''
for pair in $wanted; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing="$missing ${pair#*:}"
done
# Debian's python3 comes without venv and ensurepip.
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    missing="$missing python3-venv"
fi
# The browser test reads text off pages: it needs a font.
if command -v fc-list >/dev/null 2>&1 && [ -z "$(fc-list 2>/dev/null | head -n 1)" ]; then
    missing="$missing fonts-dejavu-core"
fi
case $missing in
    *chromium*) missing="$missing fonts-dejavu-core" ;;
esac
# The PostgreSQL store's tests start a private server from Debian's packages, whose
# programs are not on PATH.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    missing="$missing postgresql"
fi

# The replica tests put Debian's HAProxy in front of three servers (deploy/haproxy.cfg);
# it lives in /usr/sbin, off a user's PATH.
if ! [ -x /usr/sbin/haproxy ] && ! command -v haproxy >/dev/null 2>&1; then
    missing="$missing haproxy"
fi

if [ -n "$missing" ]; then
    # shellcheck disable=SC2086 # one word per package
    set -- $missing
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup.sh: missing system packages; run: sudo apt-get install -y --no-install-recommends $*" >&2
        exit 1
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "setup.sh: missing system packages ($*) and no apt-get to install them with" >&2
        exit 1
    fi
    echo "setup.sh: installing $*"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
fi

# Go builds the Supervisor and the collector. Debian's golang-go is older than the go.mod
# files here ask for, so it is not installed from apt.
go_minor=$(go env GOVERSION 2>/dev/null | sed -n 's/^go1\.\([0-9]*\).*/\1/p')
if [ -z "$go_minor" ] || [ "$go_minor" -lt 25 ]; then
    echo "setup.sh: Go 1.25 or newer is needed to build the OpAMP Supervisor and the collector (https://go.dev/doc/install)" >&2
    exit 1
fi

exec ./peers/install.sh
