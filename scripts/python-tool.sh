#!/usr/bin/env bash
# Installs a Python tool from PyPI, pinned, into a venv of its own in
# ${XDG_CACHE_HOME:-~/.cache}/projector (or $PROJECTOR_CACHE), and prints the venv's bin folder.
#   bash scripts/python-tool.sh PACKAGE VERSION
# Nothing is installed system-wide (except python3-venv through apt where Debian lacks it).
# Idempotent and safe to run from parallel processes: the install happens once per version.
# It needs python3 with the venv module ($PYTHON picks another).
set -euo pipefail
package="$1"
version="$2"
cache="${PROJECTOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/projector}"
venv="$cache/$package-$version"
python="${PYTHON:-python3}"
mkdir -p "$cache"
exec 9>"$cache/.$package.lock"
if command -v flock >/dev/null 2>&1; then
  flock 9
fi
# A venv that finished installing says so; a half-installed one is made anew.
if [[ ! -f "$venv/.installed" ]]; then
  echo "python-tool: installing $package $version into $venv" >&2
  # A venv records its own path in its scripts: it is built where it will live.
  rm -rf "$venv"
  # A fresh Debian has python3 without its venv module (or no python3 at all): install them
  # as the PostgreSQL script installs postgresql.
  # Best effort: the venv step below says what to do when it is still missing.
  if ! "$python" -m venv --help >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    bash "$(dirname "${BASH_SOURCE[0]}")/apt-install.sh" python-tool python3 python3-venv || true
  fi
  if ! "$python" -m venv "$venv" >&2; then
    rm -rf "$venv"
    echo "python-tool: \`$python -m venv\` failed: install Python 3 with its venv module" \
      "(Debian: apt-get install python3-venv), or point \$PYTHON at one" >&2
    exit 1
  fi
  if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "$package==$version" >&2; then
    rm -rf "$venv"
    echo "python-tool: pip could not install $package $version" >&2
    exit 1
  fi
  touch "$venv/.installed"
fi
echo "$venv/bin"
