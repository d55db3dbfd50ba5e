#!/usr/bin/env bash
# The lock: hash-pinned requirements files compiled from pyproject.toml by `uv pip compile`.
#   lock.sh compile    re-resolve, keeping today's pins where they still fit (make lock)
#   lock.sh upgrade    re-resolve at the newest releases (make upgrade, which then runs the suite)
#   lock.sh check      fail when a lock no longer satisfies pyproject.toml (make test runs it)
#
# Universal (one lock for every platform and Python >= 3.11: Debian 12's 3.11.2 needs
# async-timeout, 3.11.3+ does not) and naming no package index: installs use the index the
# machine is configured for (UV_DEFAULT_INDEX / uv.toml for uv, pip.conf for pip).
# Each file is compiled under the one before it (-c), so a package has one version in all.
set -euo pipefail
cd "$(dirname "$0")"
uv=${UV:-../.venv/bin/uv}
mode=${1:-compile}

compile() {  # compile OUTPUT [uv args...]: pyproject.toml (or an .in file) -> OUTPUT
  local output=$1
  shift
  "$uv" pip compile --quiet --universal --python-version 3.11 --generate-hashes \
    --custom-compile-command "make lock" --output-file "$output" "$@"
}

lock_all() {  # lock_all DIR [uv args...]: every lock file, written into DIR
  local dir=$1
  shift
  compile "$dir/uv.txt" uv.in "$@"
  compile "$dir/runtime.txt" ../pyproject.toml "$@"
  compile "$dir/build.txt" ../pyproject.toml --extra build -c "$dir/runtime.txt" "$@"
  compile "$dir/dev.txt" ../pyproject.toml --extra dev -c "$dir/build.txt" "$@"
  compile "$dir/bench.txt" ../pyproject.toml --extra dev --extra bench -c "$dir/dev.txt" "$@"
}

pins() {  # the name==version lines of a lock, markers included, hashes and comments left out
  grep -E '^[A-Za-z0-9]' "$1" | sed 's/ *\\$//'
}

case $mode in
  compile) lock_all . ;;
  upgrade) lock_all . --upgrade ;;
  check)
    # Re-resolve against the existing pins (uv prefers what an output file already holds) and
    # compare versions only: a wheel added to an old release must not fail the check.
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    cp ./*.txt "$scratch/"
    if ! lock_all "$scratch" 2>"$scratch/errors"; then
      cat "$scratch/errors" >&2
      echo "error: the lock in requirements/ cannot be resolved against pyproject.toml;" \
        "run 'make lock' and commit requirements/" >&2
      exit 1
    fi
    stale=0
    for lock in uv runtime build dev bench; do
      if ! diff -u <(pins "$lock.txt") <(pins "$scratch/$lock.txt") >"$scratch/diff"; then
        echo "error: requirements/$lock.txt no longer satisfies pyproject.toml:" >&2
        cat "$scratch/diff" >&2
        stale=1
      fi
    done
    if [ $stale -ne 0 ]; then
      echo "fix: run 'make lock' (keeps every pin that still fits) and commit requirements/" >&2
      exit 1
    fi
    ;;
  *)
    echo "usage: lock.sh compile|upgrade|check" >&2
    exit 2
    ;;
esac
