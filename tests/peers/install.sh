#!/bin/sh
# Installs the real peers the tests run against, at pinned versions. Safe to run again; what
# is in place and unchanged is kept.
#
# - opentelemetry-opamp-client (PyPI) in tests/peers/.venv;
# - @elastic/opamp-client-node (npm) in tests/peers/node/node_modules;
# - the upstream OpAMP Supervisor at each version in SUPERVISORS, and a collector built from
#   upstream modules at the newest of them (tests/peers/collector), into tests/peers/releases/
#   under their official release names, with the releases' checksums files, so that the
#   directory serves as gitfleet's --artifacts-dir.
#
# Go's module and build caches live in ${XDG_CACHE_HOME:-$HOME/.cache}/gitfleet-peers/go,
# so a second run on the same machine takes seconds.
set -eu
cd "$(dirname "$0")"

# The Supervisor releases gitfleet's install files support: the default pin first, then the
# oldest supported (src/install/supervisor.rs has the same two).
SUPERVISORS='0.158.0 0.149.0'
COLLECTOR=0.158.0

need() {
    command -v "$1" >/dev/null 2>&1 || {
        echo "install.sh: $1 is needed for $2 (tests/setup.sh installs what is missing)" >&2
        exit 1
    }
}
need python3 'the Python OpAMP client'
need npm 'the Node OpAMP client'
need go 'the OpAMP Supervisor and the collector'

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check --requirement python/requirements.txt
(cd node && npm ci --no-audit --no-fund --loglevel=error)

cache=${XDG_CACHE_HOME:-$HOME/.cache}/gitfleet-peers/go
GOMODCACHE=$cache/mod
GOCACHE=$cache/build
GOPATH=$cache/path
# The go.mod and go.sum files here pin every module; nothing may move them.
GOFLAGS='-mod=readonly -buildvcs=false -trimpath'
CGO_ENABLED=0
export GOMODCACHE GOCACHE GOPATH GOFLAGS CGO_ENABLED
arch=$(go env GOARCH)
releases=$PWD/releases
mkdir -p "$releases"

# Built binaries and what each was built from live in releases/.build/.
build_dir=$releases/.build
mkdir -p "$build_dir"

# inputs DIR: what a build from the module in DIR depends on.
inputs() { (go version && cat "$1"/go.mod "$1"/go.sum "$1"/*.go 2>/dev/null) | sha256sum | cut -d ' ' -f 1; }

# build NAME DIR PACKAGE LDFLAGS: builds PACKAGE from the module in DIR into
# releases/.build/NAME, unless it was built from the same inputs. Returns 1 when it did
# nothing.
build() {
    wanted=$(inputs "$2")
    if [ -f "$build_dir/$1" ] && [ "$(cat "$build_dir/$1.inputs" 2>/dev/null)" = "$wanted" ]; then
        return 1
    fi
    echo "install.sh: building $1 (a first build takes minutes)"
    started=$(date +%s)
    (cd "$2" && go build -ldflags "-s -w $4" -o "$build_dir/$1.tmp" "$3")
    mv -f "$build_dir/$1.tmp" "$build_dir/$1"
    echo "$wanted" >"$build_dir/$1.inputs"
    echo "install.sh: built $1 in $(($(date +%s) - started)) s"
}

for version in $SUPERVISORS; do
    name=opampsupervisor_${version}_linux_$arch
    if build "$name" "supervisor/v$version" github.com/open-telemetry/opentelemetry-collector-contrib/cmd/opampsupervisor '' ||
        [ ! -f "$releases/$name" ]; then
        ln -f "$build_dir/$name" "$releases/$name"
    fi
done

# The collector ships as an archive holding the binary, as upstream releases it.
archive=otelcol-contrib_${COLLECTOR}_linux_$arch.tar.gz
if build "otelcol-contrib_$COLLECTOR" collector . "-X main.version=$COLLECTOR" || [ ! -f "$releases/$archive" ]; then
    work=$(mktemp -d)
    cp "$build_dir/otelcol-contrib_$COLLECTOR" "$work/otelcol-contrib"
    tar -czf "$releases/$archive.tmp" -C "$work" otelcol-contrib
    rm -rf "$work"
    mv -f "$releases/$archive.tmp" "$releases/$archive"
fi

# The checksums files, named as upstream names them.
(
    cd "$releases"
    sha256sum opampsupervisor_*_linux_"$arch" >checksums.txt
    sha256sum otelcol-contrib_*_linux_"$arch".tar.gz >opentelemetry-collector-releases_otelcol-contrib_checksums.txt
)
echo "install.sh: peers ready (releases in tests/peers/releases)"
