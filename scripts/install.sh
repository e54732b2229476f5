#!/bin/sh
# `make install` / `make uninstall` (docs/operations.md "Install on a server"). Run from the repository's root.
#   scripts/install.sh install|uninstall
# Environment (the Makefile passes its variables): DESTDIR (a staging root, empty for the real system; a relative
# one is taken from the current folder), PREFIX (/opt/appliance: the program's venv and docs), UNITDIR,
# SYSUSERSDIR, TMPFILESDIR, PYTHON, PIP_ARGS, WITH_BENCH (1: the benchmark harness's extras too, `.[bench]`),
# FORCE (1: reinstall on the live system although appliance.service is running).
# The config folder /etc/appliance and the data folder /var/lib/appliance are fixed: the unit names them
# (ConfigurationDirectory=, StateDirectory=).
set -eu

action=${1:?usage: scripts/install.sh install|uninstall}
DESTDIR=${DESTDIR:-}
# Absolute and normalised before anything uses it: the relocation below rewrites the path the venv recorded, which
# is its absolute path with no ".." (Python's os.path.abspath: symlinks kept, as realpath -s). `make -C` runs
# here, so a relative DESTDIR is taken from the checkout's folder. "/" is the live system.
if [ -n "$DESTDIR" ]; then DESTDIR=$(realpath -m -s -- "$DESTDIR"); DESTDIR=${DESTDIR%/}; fi
PREFIX=${PREFIX:-/opt/appliance}
UNITDIR=${UNITDIR:-/etc/systemd/system}
SYSUSERSDIR=${SYSUSERSDIR:-/etc/sysusers.d}
TMPFILESDIR=${TMPFILESDIR:-/etc/tmpfiles.d}
PYTHON=${PYTHON:-python3}
PIP_ARGS=${PIP_ARGS:-}
WITH_BENCH=${WITH_BENCH:-}
FORCE=${FORCE:-}
CONFDIR=/etc/appliance
DATADIR=/var/lib/appliance
VENV=$PREFIX/.venv
UNITS=$(cd systemd && ls -- *.service *.timer)
case "$PREFIX" in /*) ;; *) echo "error: PREFIX '$PREFIX' must be an absolute path" >&2; exit 2;; esac

# The live system only: not under DESTDIR (a staging root for a package or a test), and as root.
live=no
if [ -z "$DESTDIR" ] && [ "$(id -u)" = 0 ]; then live=yes; fi
if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
    echo "error: make $action on this system needs root (or DESTDIR=/some/root to stage the files)" >&2
    exit 77  # EX_NOPERM
fi
# systemctl only where systemd is the init system (not in a container or a chroot).
systemd_runs=no
if [ -d /run/systemd/system ]; then systemd_runs=yes; fi

if [ "$action" = uninstall ]; then
    if [ "$live" = yes ] && [ "$systemd_runs" = yes ]; then
        # shellcheck disable=SC2086
        systemctl disable --now $UNITS 2>/dev/null || true
    fi
    # Only what install put there: PREFIX may be a shared folder (/usr/local, /opt) or hold a checkout with data.
    case "$PREFIX" in ""|/) echo "error: PREFIX '$PREFIX' is not a folder to uninstall from" >&2; exit 2;; esac
    rm -rf "$DESTDIR$PREFIX/.venv" "$DESTDIR$PREFIX/.venv.new" "$DESTDIR$PREFIX/.venv.old" "$DESTDIR$PREFIX/docs" \
        "$DESTDIR$PREFIX/systemd"
    rmdir "$DESTDIR$PREFIX" 2>/dev/null || true  # gone if nothing else was in it
    for unit in $UNITS; do rm -f "$DESTDIR$UNITDIR/$unit"; done
    rm -f "$DESTDIR$SYSUSERSDIR/appliance.conf" "$DESTDIR$TMPFILESDIR/appliance.conf"
    if [ "$live" = yes ] && [ "$systemd_runs" = yes ]; then systemctl daemon-reload; fi
    echo "removed $DESTDIR$PREFIX/{.venv,docs,systemd}, the units and the sysusers.d/tmpfiles.d snippets."
    echo "kept: $DESTDIR$CONFDIR (the config), $DESTDIR$DATADIR (the images, index, audit trail) and the user" \
         "'appliance' that owns them; remove them yourself if the data is to go."
    exit 0
fi
[ "$action" = install ] || { echo "error: unknown action $action" >&2; exit 2; }

# A reinstall over a running service would swap its code under it (a half-imported new version at the next
# worker start): refused on the live system unless FORCE=1. Before anything is built or written.
if [ "$live" = yes ] && [ "$FORCE" != 1 ] && command -v systemctl >/dev/null 2>&1 &&
        systemctl is-active --quiet appliance.service 2>/dev/null; then
    echo "error: appliance.service is active: systemctl stop appliance.service first (or FORCE=1 make install)" >&2
    exit 75  # EX_TEMPFAIL: try again once the service is stopped
fi

# The program: its own venv, a plain (non-editable, no dev tools) install of this source tree. pip byte-compiles
# what it installs: the unit makes /opt read-only, so Python could not write its caches at run time.
# Built as PREFIX/.venv.new beside the one in use and swapped in only once pip succeeded: a failed reinstall (no
# network, a wheel that does not build) leaves the installed program as it was. A fresh venv each time: nothing
# of an older version is left behind.
new_venv=$DESTDIR$VENV.new
src=$(mktemp -d "${TMPDIR:-/tmp}/appliance-install.XXXXXX")
trap 'rm -rf "$src" "$new_venv"' EXIT
trap 'exit 1' HUP INT TERM
# pip builds the wheel in the folder it is given: setuptools writes build/ and *.egg-info there (owned by root
# under sudo, and a stale build/ would bring back modules deleted since). So it builds a copy of the sources,
# without the dev venv, the data and earlier build products.
tar -cf - --exclude=./.git --exclude=./.venv --exclude=./var --exclude=./build --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.mypy_cache --exclude=.pytest_cache --exclude=.ruff_cache . | tar -xf - -C "$src"
what=$src
if [ "$WITH_BENCH" = 1 ]; then what="$src[bench]"; fi  # the benchmark harness (docs/benchmarks.md) for a vendor
rm -rf "$new_venv"
"$PYTHON" -m venv --prompt .venv "$new_venv"  # the prompt of the activate scripts: the final name
# shellcheck disable=SC2086
"$new_venv/bin/pip" install --quiet --no-warn-script-location $PIP_ARGS "$what"
# A venv records its own absolute path (script shebangs, activate, pyvenv.cfg): built as DESTDIR/PREFIX/.venv.new
# it names that. Rewritten to the final path, so that the tree (copied to / when staged) runs as built (only text
# files hold it; the .pyc files keep the build path as their source file name, which only shows in a traceback).
grep -rlI -- "$new_venv" "$new_venv/bin" "$new_venv/pyvenv.cfg" |
    while read -r file; do sed -i "s#$new_venv#$VENV#g" "$file"; done
# The swap: two renames in the same folder; the old venv goes only once the new one is in place.
rm -rf "$DESTDIR$VENV.old"
if [ -e "$DESTDIR$VENV" ]; then mv "$DESTDIR$VENV" "$DESTDIR$VENV.old"; fi
mv "$new_venv" "$DESTDIR$VENV"
rm -rf "$DESTDIR$VENV.old"

install -d "$DESTDIR$PREFIX/docs" "$DESTDIR$PREFIX/systemd/drop-ins"
install -m 0644 README.md docs/*.md "$DESTDIR$PREFIX/docs/"
install -m 0644 systemd/drop-ins/*.conf "$DESTDIR$PREFIX/systemd/drop-ins/"  # examples, not active
install -d "$DESTDIR$UNITDIR" "$DESTDIR$SYSUSERSDIR" "$DESTDIR$TMPFILESDIR"
for unit in $UNITS; do
    sed "s#/opt/appliance/#$PREFIX/#g" "systemd/$unit" > "$DESTDIR$UNITDIR/$unit"
    chmod 0644 "$DESTDIR$UNITDIR/$unit"
done
install -m 0644 systemd/sysusers.d/appliance.conf "$DESTDIR$SYSUSERSDIR/appliance.conf"
install -m 0644 systemd/tmpfiles.d/appliance.conf "$DESTDIR$TMPFILESDIR/appliance.conf"

if [ "$live" = yes ]; then
    systemd-sysusers "$SYSUSERSDIR/appliance.conf"  # the user and group 'appliance'
    systemd-tmpfiles --create "$TMPFILESDIR/appliance.conf"  # /var/lib/appliance/..., /etc/appliance
fi

# The config: written once, never over an admin's. Data paths absolute under /var/lib/appliance (the folder of a
# relative path would be /etc/appliance, read-only for the service).
config=$DESTDIR$CONFDIR/appliance.toml
wrote_config=no
if [ -e "$config" ]; then
    echo "kept the existing $config"
else
    install -d -m 0750 "$DESTDIR$CONFDIR"
    # -I: the installed program, not the checkout's appliance/ that `-m` would find first in this folder.
    "$DESTDIR$VENV/bin/python" -I -m appliance init -c "$config" --data-dir "$DATADIR" --config-only
    chmod 0640 "$config"
    wrote_config=yes
    # root:appliance (the service reads it, cannot change it) wherever the group exists: on the live system
    # (sysusers made it above), and under a DESTDIR staged by root on a machine that has it.
    if [ "$(id -u)" = 0 ] && getent group appliance >/dev/null 2>&1; then
        chown root:appliance "$DESTDIR$CONFDIR" "$config"
    fi
fi

if [ "$live" = yes ]; then
    if [ "$wrote_config" = yes ]; then
        # The default config's volume, as the service user: its name comes from the config.
        runuser -u appliance -- "$VENV/bin/appliance" volume init "$DATADIR/volumes/vol0" -c "$config"
    fi
    if [ "$systemd_runs" = yes ]; then systemctl daemon-reload; fi
    echo "installed. Next: edit $config ([server] host and port, [peers], [[volumes]]: $PREFIX/docs/operations.md),"
    echo "  appliance volume init PATH -c $config   for each other volume (as the user appliance), then"
    echo "  systemctl enable --now appliance.service"
    echo "  systemctl enable --now appliance-tier-run.timer appliance-compact.timer appliance-scrub.timer"
    echo "    (with storage.compaction_interval_s = 0 in the config: one scheduler, not two)"
else
    echo "installed under '$DESTDIR' (not the live system). On the target, as root: systemd-sysusers," \
         "systemd-tmpfiles --create, chown root:appliance $CONFDIR/appliance.toml, then" \
         "runuser -u appliance -- $VENV/bin/appliance volume init $DATADIR/volumes/vol0 -c $CONFDIR/appliance.toml"
fi
