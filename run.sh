#!/usr/bin/env bash
# One entry point that does the whole set-up on a fresh machine of this kind, then runs what you ask:
#   bash run.sh demo   - the main job on the embedded default dataset (digits); results under runs/
#   bash run.sh test   - the test suite
# Set-up is idempotent: system packages via apt-get (root only), a virtual environment at .venv, pip install.
set -euo pipefail
cd "$(dirname "$0")"

setup() {
    if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
    fi
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    if ! .venv/bin/python -c "import fedcl, strategies, flwr, avalanche, torchvision, pytest, pytest_timeout, hypothesis" 2>/dev/null \
        || [ pyproject.toml -nt .venv/.fedcl-installed ]; then
        .venv/bin/pip install -q --disable-pip-version-check -e ".[all,test]"
        touch .venv/.fedcl-installed
    fi
}

export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0
case "${1:-}" in
    demo) setup; shift; exec .venv/bin/fedcl demo "$@" ;;
    test) setup; shift; exec .venv/bin/python -m pytest "$@" ;;
    setup) setup ;;
    *) echo "usage: bash run.sh demo|test|setup [args...]" >&2; exit 2 ;;
esac
