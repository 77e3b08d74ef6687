#!/usr/bin/env bash
# One prepared check of a lent NVIDIA GPU (H100/H200), from a fresh machine holding only the repo:
#
#   bash scripts/device_check.sh            # venv + `.[gpu]` from PyPI, then scripts/device_check.py
#   bash scripts/device_check.sh --tiny     # the same on the tiny model (any machine)
#
# Everything must end within DEVICE_CHECK_SECONDS (default 480 = 8 minutes, install included): the
# Python part runs under `timeout` with what is left, and skips sections that would not fit. Logs
# go to stderr; stdout gets one JSON object: device_check.py's figures (as far as it got) plus
# install_seconds, total_seconds, python_rc. Arguments are passed on to device_check.py.
# DEVICE_CHECK_PYTHON=path/to/python skips the venv and the install (e.g. an existing venv);
# DEVICE_CHECK_VENV (default /tmp/paligemma_seg_device_venv) and DEVICE_CHECK_OUT (the JSON
# file, default /tmp/device_check.json) move what it writes.
set -uo pipefail

start=$SECONDS
budget=${DEVICE_CHECK_SECONDS:-480}
cd "$(dirname "$0")/.." || exit 1
out=${DEVICE_CHECK_OUT:-/tmp/device_check.json}
log() { echo "[device_check.sh $(date +%H:%M:%S)] $*" >&2; }

python=${DEVICE_CHECK_PYTHON:-}
install_rc=0
if [ -z "$python" ]; then
  venv=${DEVICE_CHECK_VENV:-/tmp/paligemma_seg_device_venv}
  if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    log "python3 is $(python3 --version 2>&1); the project needs >= 3.11"
    echo '{"complete": false, "error": "python3 < 3.11"}'
    exit 1
  fi
  log "creating $venv and installing .[gpu] (nvidia-smi: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
  python3 -m venv "$venv" >&2 && python=$venv/bin/python
  # uv (from PyPI) downloads in parallel, several times faster than pip; pip is the fallback.
  if "$python" -m pip install -q --disable-pip-version-check uv >&2; then
    VIRTUAL_ENV=$venv "$venv/bin/uv" pip install -q --python "$python" -e ".[gpu]" >&2
    install_rc=$?
  else
    install_rc=1
  fi
  if [ "$install_rc" != 0 ]; then
    log "uv failed; trying pip"
    "$python" -m pip install -q --disable-pip-version-check -e ".[gpu]" >&2
    install_rc=$?
  fi
fi
install_seconds=$((SECONDS - start))
log "install: rc $install_rc in ${install_seconds} s"

left=$((budget - (SECONDS - start) - 10))
python_rc=1
rm -f "$out"
if [ "$install_rc" = 0 ] && [ "$left" -gt 30 ]; then
  log "running scripts/device_check.py with ${left} s left"
  timeout --kill-after=10 "$left" "$python" scripts/device_check.py --out "$out" \
    --budget $((left - 15)) "$@" >/dev/null
  python_rc=$?
else
  log "no time or no install: skipping the Python part"
fi

# The figures as far as they got, and how the run went; one JSON object on stdout.
python3 - "$out" "$install_rc" "$install_seconds" "$python_rc" "$((SECONDS - start))" <<'EOF'
import json, os, sys
path, install_rc, install_seconds, python_rc, total = sys.argv[1:]
data = {"complete": False}
if os.path.exists(path):
    with open(path) as f:
        data = json.load(f)
data.update(install_rc=int(install_rc), install_seconds=int(install_seconds),
            python_rc=int(python_rc), total_seconds=int(total))
if int(python_rc) in (124, 137):
    data["timed_out"] = True
print(json.dumps(data))
EOF
