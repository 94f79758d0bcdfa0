# Shared by scripts/run, scripts/test and scripts/bench: the project's virtualenv, made once.
# ensure_venv [EXTRAS]: create .venv with python3 >= 3.11 and install the package (editable) with
# the given extras, re-installing when pyproject.toml changed since the last install with them.

ensure_venv() {
    local extras="${1:-}" spec="." stamp=".venv/.installed${1:+-$1}"
    [ -n "$extras" ] && spec=".[$extras]"
    if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "python3 is $(python3 --version 2>&1); the gateway needs Python 3.11 or newer" >&2
        exit 1
    fi
    [ -x .venv/bin/python ] || python3 -m venv .venv
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "installing the gateway into .venv ($spec)" >&2
        .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null
        .venv/bin/python -m pip install --quiet -e "$spec"
        touch "$stamp"
        # an install with extras includes the plain one: scripts/run after scripts/test has
        # nothing to install
        [ -n "$extras" ] && touch ".venv/.installed"
    fi
}
