#!/usr/bin/env bash
# Set up .venv if needed, then run the main job (`m3vit demo`). Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/m3vit demo "$@"
