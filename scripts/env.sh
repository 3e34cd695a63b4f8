# Sourced by the other scripts: use the active virtual environment, or create ./.venv.
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  . .venv/bin/activate
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
