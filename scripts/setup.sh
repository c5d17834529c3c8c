#!/usr/bin/env bash
# Idempotent environment setup: creates .venv (if missing), installs the pinned CPU torch and m3vit
# in editable mode with the dev extra. Re-running skips whatever is already in place.
#   M3VIT_TORCH_SPEC   pip requirement for torch (default: torch==2.13.0, the CPU wheel)
#   M3VIT_PYTHON       interpreter used to create .venv (default: python3)
#   M3VIT_EXTRAS       extras to install (default: dev)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_SPEC="${M3VIT_TORCH_SPEC:-torch==2.13.0}"
PYTHON="${M3VIT_PYTHON:-python3}"
EXTRAS="${M3VIT_EXTRAS:-dev}"
VENV=.venv
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
  "$PY" -m pip install --quiet --upgrade pip
fi

# torch: install only if missing or not matching the requested spec.
if ! "$PY" - "$TORCH_SPEC" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
try:
    from packaging.requirements import Requirement
except ImportError:  # a fresh venv has only pip's vendored copy
    from pip._vendor.packaging.requirements import Requirement
req = Requirement(sys.argv[1])
sys.exit(0 if req.specifier.contains(version(req.name).split("+")[0], prereleases=True) else 1)
PYEOF
then
  echo "[setup] installing $TORCH_SPEC"
  "$PY" -m pip install --quiet "$TORCH_SPEC"
fi

# m3vit itself (editable) + extras; re-run only when pyproject.toml changed since the last install.
stamp="$VENV/.m3vit-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $EXTRAS"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PY" -c "import m3vit" 2>/dev/null; then
  echo "[setup] installing m3vit[$EXTRAS] (editable)"
  "$PY" -m pip install --quiet -e ".[$EXTRAS]"
  echo "$want" > "$stamp"
fi

# Chromium for the browser test of `m3vit serve` (tests/serve/test_browser.py drives Debian's package through
# Playwright; browser downloads are not used). Only as root with apt-get, only when missing; the test skips
# with its reason otherwise.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing chromium (apt) for the browser test"
  if ! { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; }; then
    echo "[setup] could not install chromium (apt-get install chromium failed); tests/serve/test_browser.py will be skipped"
  fi
fi
