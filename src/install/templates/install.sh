#!/bin/sh
# Joins this host to the gitfleet fleet `@FLEET@`: installs opampsupervisor @SUPERVISOR_VERSION@
# and otelcol-contrib @COLLECTOR_VERSION@ as the systemd service gitfleet-collector.
# Written by gitfleet; run it again to update, it changes only what differs.
#
#   sh install.sh                install or update (as root)
#   sh install.sh --uninstall    remove the service and its files (keeps its state)
#
# Options:
#   --prefix DIR   install under DIR instead of / (no system user, no systemctl)
#   --no-systemd   do not install or start the systemd unit
#   --arch ARCH    amd64 or arm64 (default: this machine's)
#   --label K=V    a label this collector reports (rollout steps select by it); repeat
#                  for more, and give the same ones again when you run it again
#   --purge        with --uninstall: also remove the state directory and the system user
#
# It carries the fleet's supervisor.yaml, unit file and CA as they were when it was
# written, so it needs no other file. Next to the files of an offline bundle it installs
# the release files of the bundle; otherwise it downloads them from the gitfleet server
# when the server has them, else the official releases. Either way their SHA-256 is
# checked before anything is installed.
#
# It holds the fleet's install token (in supervisor.yaml, and to download from the
# server): keep it private.
set -eu

FLEET='@FLEET@'
COLLECTOR_VERSION='@COLLECTOR_VERSION@'
SUPERVISOR_VERSION='@SUPERVISOR_VERSION@'
RELEASES='https://github.com/open-telemetry/opentelemetry-collector-releases/releases/download'
# The gitfleet server's install files, and the release files it serves there: name and SHA-256.
DOWNLOAD_BASE='@DOWNLOAD_BASE@'
TOKEN='@TOKEN@'
SERVER_RELEASES='@SERVER_RELEASES@'
SERVICE='gitfleet-collector'
SERVICE_USER='gitfleet-collector'

say() { printf 'gitfleet-install: %s\n' "$*"; }
die() {
    printf 'gitfleet-install: error: %s\n' "$*" >&2
    exit 1
}

usage() { sed -n '2,18s/^# \{0,1\}//p' "$0"; }

prefix=''
systemd=1
action=install
purge=0
arch=''
# The labels as YAML lines under the Supervisor's non-identifying attributes.
labels=''
add_label() {
    key=${1%%=*}
    value=${1#*=}
    case $1 in *=*) ;; *) die "--label needs KEY=VALUE, like ring=canary" ;; esac
    case $key in
        '' | [!A-Za-z0-9]* | *[!A-Za-z0-9._-]*) die "--label key '$key': letters, digits, '.', '_' and '-', starting with a letter or digit" ;;
        gitfleet.fleet) die "--label gitfleet.fleet is set by gitfleet" ;;
    esac
    case $value in
        *[!A-Za-z0-9._:/@+-]*) die "--label value '$value': letters, digits and . _ : / @ + - only" ;;
    esac
    if [ "${#key}" -gt 64 ] || [ "${#value}" -gt 128 ]; then
        die "--label $key: at most 64 characters of key and 128 of value"
    fi
    case $labels in *"      $key: "*) die "--label $key is given twice" ;; esac
    labels="$labels      $key: \"$value\"
"
}
while [ $# -gt 0 ]; do
    case $1 in
        --label)
            [ $# -ge 2 ] || die '--label needs KEY=VALUE'
            add_label "$2"
            shift 2
            ;;
        --label=*)
            add_label "${1#--label=}"
            shift
            ;;
        --prefix)
            [ $# -ge 2 ] || die '--prefix needs a directory'
            prefix=$2
            shift 2
            ;;
        --prefix=*)
            prefix=${1#--prefix=}
            shift
            ;;
        --arch)
            [ $# -ge 2 ] || die '--arch needs amd64 or arm64'
            arch=$2
            shift 2
            ;;
        --arch=*)
            arch=${1#--arch=}
            shift
            ;;
        --no-systemd) systemd=0; shift ;;
        --uninstall) action=uninstall; shift ;;
        --purge) purge=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done

case $prefix in
    '') ;;
    /*) prefix=${prefix%/} ;;
    *) prefix=$(pwd)/${prefix%/} ;;
esac
case $prefix in
    *'#'* | *'&'* | *\\*) die "--prefix must not contain '#', '&' or a backslash" ;;
esac

if [ -z "$arch" ]; then
    machine=$(uname -m)
    case $machine in
        x86_64 | amd64) arch=amd64 ;;
        aarch64 | arm64) arch=arm64 ;;
        *) die "unsupported architecture '$machine': gitfleet installs on amd64 and arm64" ;;
    esac
fi
case $arch in
    amd64 | arm64) ;;
    *) die "unsupported --arch '$arch': use amd64 or arm64" ;;
esac

is_root=0
[ "$(id -u)" -eq 0 ] && is_root=1
# A real install manages the system user and the service; one under --prefix does not.
system=0
[ -z "$prefix" ] && system=1
if [ "$system" -eq 1 ] && [ "$is_root" -eq 0 ]; then
    die 'run as root (for example with sudo), or use --prefix DIR --no-systemd to install elsewhere'
fi

bin_dir=$prefix/opt/gitfleet-collector/bin
conf_dir=$prefix/etc/gitfleet-collector
state_dir=$prefix/var/lib/gitfleet-collector
unit_path=$prefix/etc/systemd/system/$SERVICE.service
here=$(cd "$(dirname "$0")" && pwd)

has_systemctl() { [ "$system" -eq 1 ] && [ "$systemd" -eq 1 ] && command -v systemctl >/dev/null 2>&1; }

if [ "$action" = uninstall ]; then
    if has_systemctl; then
        systemctl disable --now "$SERVICE" >/dev/null 2>&1 || true
    fi
    removed=0
    for path in "$unit_path" "$bin_dir/opampsupervisor" "$bin_dir/otelcol-contrib" "$conf_dir/supervisor.yaml" "$conf_dir/ca.pem"; do
        if [ -e "$path" ]; then
            rm -f "$path"
            removed=1
        fi
    done
    rmdir "$bin_dir" "$prefix/opt/gitfleet-collector" "$conf_dir" 2>/dev/null || true
    has_systemctl && systemctl daemon-reload
    if [ "$purge" -eq 1 ] && [ -d "$state_dir" ]; then
        rm -rf "$state_dir"
        removed=1
    fi
    if [ "$purge" -eq 1 ] && [ "$system" -eq 1 ] && id "$SERVICE_USER" >/dev/null 2>&1; then
        userdel "$SERVICE_USER" 2>/dev/null || deluser "$SERVICE_USER" >/dev/null 2>&1 || true
    fi
    if [ "$removed" -eq 1 ]; then
        say "removed the collector of fleet $FLEET"
        [ "$purge" -eq 0 ] && [ -d "$state_dir" ] && say "kept its state in $state_dir (--purge removes it)"
    else
        say 'nothing to remove: the collector is not installed here'
    fi
    exit 0
fi

sha256() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d ' ' -f 1
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 "$1" | cut -d ' ' -f 1
    else
        die 'neither sha256sum nor shasum is installed; cannot verify the downloads'
    fi
}

# verify FILE NAME SUMS: FILE's SHA-256 must be the one SUMS lists for NAME.
verify() {
    expected=$(awk -v name="$2" '$2 == name || $2 == "*" name { print $1; exit }' "$3")
    [ -n "$expected" ] || die "no checksum for $2 in $(basename "$3"); nothing was installed"
    actual=$(sha256 "$1")
    [ "$actual" = "$expected" ] ||
        die "checksum mismatch for $2: expected $expected, got $actual; nothing was installed"
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM

# The fleet's files, as gitfleet wrote them with this script.
cat >"$work/supervisor.yaml.in" <<'GITFLEET_SUPERVISOR_YAML'
@SUPERVISOR_YAML@GITFLEET_SUPERVISOR_YAML
cat >"$work/$SERVICE.service.in" <<'GITFLEET_SERVICE_UNIT'
@SERVICE_UNIT@GITFLEET_SERVICE_UNIT
cat >"$work/ca.pem" <<'GITFLEET_CA_PEM'
@CA_PEM@GITFLEET_CA_PEM
[ -s "$work/ca.pem" ] || rm -f "$work/ca.pem"

# The groups the fleet file's [install].groups gives the collector must exist here, or
# systemd would refuse to start it.
if [ "$system" -eq 1 ]; then
    groups=$(sed -n 's/^SupplementaryGroups=//p' "$work/$SERVICE.service.in")
    # Group names have no spaces or wildcards (gitfleet checks them): split on spaces.
    for group in $groups; do
        getent group "$group" >/dev/null 2>&1 ||
            die "group '$group' ([install].groups of the fleet file) does not exist on this host; nothing was installed"
    done
fi

# fetch URL FILE [server]: downloads URL into FILE. The official releases come over https
# only; from the gitfleet server, with the install token and the fleet's CA if it has one,
# over the scheme its collectors use.
fetch() {
    if [ "${3:-}" = server ]; then
        set -- "$1" "$2" "Authorization: Bearer $TOKEN"
    else
        set -- "$1" "$2"
    fi
    if command -v curl >/dev/null 2>&1; then
        if [ $# -eq 3 ]; then
            curl --proto '=http,https' -fsSL ${ca_option:+"$ca_option"} -H "$3" -o "$2" "$1"
        else
            curl --proto '=https' --tlsv1.2 -fsSL -o "$2" "$1"
        fi
    elif command -v wget >/dev/null 2>&1; then
        if [ $# -eq 3 ]; then
            wget -q ${ca_option:+"--ca-certificate=$work/ca.pem"} --header "$3" -O "$2" "$1"
        else
            wget -q --https-only -O "$2" "$1"
        fi
    else
        die 'neither curl nor wget is installed; use the offline bundle'
    fi
}
ca_option=''
[ -f "$work/ca.pem" ] && ca_option="--cacert=$work/ca.pem"

# server_sum NAME: the SHA-256 of NAME if the gitfleet server serves it.
server_sum() { printf '%s\n' "$SERVER_RELEASES" | awk -v name="$1" '$1 == name { print $2; exit }'; }

collector_archive="otelcol-contrib_${COLLECTOR_VERSION}_linux_${arch}.tar.gz"
supervisor_binary="opampsupervisor_${SUPERVISOR_VERSION}_linux_${arch}"
if [ -f "$here/$collector_archive" ] || [ -f "$here/$supervisor_binary" ]; then
    [ -f "$here/SHA256SUMS" ] || die "SHA256SUMS is missing next to $0; nothing was installed"
    for name in "$collector_archive" "$supervisor_binary"; do
        [ -f "$here/$name" ] || die "$name is missing next to $0; nothing was installed"
        verify "$here/$name" "$name" "$here/SHA256SUMS"
        cp "$here/$name" "$work/$name"
    done
    say "using the release files of the bundle ($arch)"
else
    for other in "$here"/otelcol-contrib_*_linux_*.tar.gz; do
        [ -f "$other" ] && die "this bundle holds $(basename "$other"), not $collector_archive: use the bundle for $arch"
    done
    from_server=0
    if [ -n "$(server_sum "$collector_archive")" ] && [ -n "$(server_sum "$supervisor_binary")" ]; then
        say "downloading otelcol-contrib $COLLECTOR_VERSION and opampsupervisor $SUPERVISOR_VERSION ($arch) from gitfleet"
        : >"$work/server.sums"
        from_server=1
        for name in "$collector_archive" "$supervisor_binary"; do
            if ! fetch "$DOWNLOAD_BASE/$name" "$work/$name" server; then
                say "gitfleet did not serve $name; trying the official releases"
                from_server=0
                break
            fi
            printf '%s  %s\n' "$(server_sum "$name")" "$name" >>"$work/server.sums"
        done
    fi
    if [ "$from_server" -eq 1 ]; then
        verify "$work/$collector_archive" "$collector_archive" "$work/server.sums"
        verify "$work/$supervisor_binary" "$supervisor_binary" "$work/server.sums"
    else
        say "downloading otelcol-contrib $COLLECTOR_VERSION and opampsupervisor $SUPERVISOR_VERSION ($arch)"
        fetch "$RELEASES/v$COLLECTOR_VERSION/$collector_archive" "$work/$collector_archive" ||
            die "cannot download $collector_archive; nothing was installed"
        fetch "$RELEASES/v$COLLECTOR_VERSION/opentelemetry-collector-releases_otelcol-contrib_checksums.txt" "$work/collector.sums" ||
            die "cannot download the checksums of $collector_archive; nothing was installed"
        fetch "$RELEASES/cmd%2Fopampsupervisor%2Fv$SUPERVISOR_VERSION/$supervisor_binary" "$work/$supervisor_binary" ||
            die "cannot download $supervisor_binary; nothing was installed"
        fetch "$RELEASES/cmd%2Fopampsupervisor%2Fv$SUPERVISOR_VERSION/checksums.txt" "$work/supervisor.sums" ||
            die "cannot download the checksums of $supervisor_binary; nothing was installed"
        verify "$work/$collector_archive" "$collector_archive" "$work/collector.sums"
        verify "$work/$supervisor_binary" "$supervisor_binary" "$work/supervisor.sums"
    fi
fi
mkdir "$work/collector"
tar -xzf "$work/$collector_archive" -C "$work/collector" otelcol-contrib ||
    die "$collector_archive does not hold otelcol-contrib; nothing was installed"

# Paths in the config and the unit follow --prefix.
relocate() { sed -e "s#/opt/gitfleet-collector#$prefix/opt/gitfleet-collector#g" -e "s#/etc/gitfleet-collector#$prefix/etc/gitfleet-collector#g" -e "s#/var/lib/gitfleet-collector#$prefix/var/lib/gitfleet-collector#g" "$1"; }
relocate "$work/supervisor.yaml.in" >"$work/supervisor.relocated"
# The labels go right after the fleet's own attribute.
awk -v labels="$labels" '{ print } /^      gitfleet\.fleet: / { printf "%s", labels }' "$work/supervisor.relocated" >"$work/supervisor.yaml"
[ "$systemd" -eq 0 ] || relocate "$work/$SERVICE.service.in" >"$work/$SERVICE.service"

changed=0
# place SOURCE TARGET MODE: installs SOURCE as TARGET unless it is already there.
place() {
    if [ -f "$2" ] && cmp -s "$1" "$2"; then
        chmod "$3" "$2"
        return 0
    fi
    cp "$1" "$2.new"
    chmod "$3" "$2.new"
    mv -f "$2.new" "$2"
    say "installed $2"
    changed=1
}

if [ "$system" -eq 1 ] && ! id "$SERVICE_USER" >/dev/null 2>&1; then
    if command -v useradd >/dev/null 2>&1; then
        useradd --system --no-create-home --home-dir /var/lib/gitfleet-collector --shell /usr/sbin/nologin "$SERVICE_USER"
    else
        adduser -S -D -H -h /var/lib/gitfleet-collector -s /sbin/nologin "$SERVICE_USER"
    fi
    say "created the system user $SERVICE_USER"
    changed=1
fi

mkdir -p "$bin_dir" "$conf_dir" "$state_dir"
chmod 0755 "$bin_dir"
chmod 0750 "$conf_dir"
chmod 0700 "$state_dir"
place "$work/collector/otelcol-contrib" "$bin_dir/otelcol-contrib" 0755
place "$work/$supervisor_binary" "$bin_dir/opampsupervisor" 0755
# The config holds the fleet's install token.
place "$work/supervisor.yaml" "$conf_dir/supervisor.yaml" 0600
# A server with a private CA: the certificates the supervisor trusts (its tls.ca_file).
if [ -f "$work/ca.pem" ]; then
    place "$work/ca.pem" "$conf_dir/ca.pem" 0644
fi
if [ "$system" -eq 1 ]; then
    chown "$SERVICE_USER:" "$conf_dir/supervisor.yaml" "$state_dir"
    chgrp "$SERVICE_USER" "$conf_dir"
fi

if [ "$systemd" -eq 1 ]; then
    mkdir -p "$(dirname "$unit_path")"
    place "$work/$SERVICE.service" "$unit_path" 0644
fi

if has_systemctl; then
    systemctl daemon-reload
    systemctl enable --now "$SERVICE" >/dev/null
    if [ "$changed" -eq 1 ]; then
        systemctl restart "$SERVICE"
    fi
    systemctl is-active --quiet "$SERVICE" || die "$SERVICE did not start: see journalctl -u $SERVICE"
    say "$SERVICE is running; it appears in fleet $FLEET once it has connected"
elif [ "$systemd" -eq 1 ] && [ "$system" -eq 1 ]; then
    say "systemctl is not available: start it with $bin_dir/opampsupervisor --config $conf_dir/supervisor.yaml"
fi

if [ "$changed" -eq 0 ]; then
    say "already up to date; nothing changed"
else
    say "installed the collector of fleet $FLEET under ${prefix:-/}"
fi
