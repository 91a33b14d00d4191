#!/bin/sh
# Installs the real OpAMP clients the tests run against, at pinned versions:
# opentelemetry-opamp-client (PyPI) in tests/peers/.venv, @elastic/opamp-client-node (npm)
# in tests/peers/node/node_modules. Safe to run again.
set -eu
cd "$(dirname "$0")"

if ! command -v python3 >/dev/null 2>&1; then
  echo "install.sh: python3 is needed for the Python OpAMP client" >&2
  exit 1
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "install.sh: npm is needed for the Node OpAMP client" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check --requirement python/requirements.txt
(cd node && npm ci --no-audit --no-fund --loglevel=error)
echo "install.sh: OpAMP peers ready"
