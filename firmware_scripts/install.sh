#!/usr/bin/env bash
# install.sh: install (or remove) the edgefleet device runtime on Debian, Raspberry Pi OS or
# Ubuntu (Jetson), and enable its systemd unit.
#
#   sudo firmware_scripts/install.sh                      # from this checkout, deps from PyPI
#   sudo firmware_scripts/install.sh --wheel edgefleet-0.1.0-py3-none-any.whl \
#        --find-links wheelhouse/                         # offline: the wheel and its deps
#   sudo firmware_scripts/install.sh --uninstall [--purge]
#
# What it makes (paths below DIR with --root DIR):
#   user, group   edgefleet: system account, no login shell, no home
#   /opt/edgefleet/venv        the runtime: a venv with edgefleet[EXTRA], root:root 0755 (the
#                              agent cannot rewrite its own code)
#   /etc/edge-runtime/         root:edgefleet 0750; config.toml (root:edgefleet 0640) from
#                              edge-runtime.example.toml only when there is none: an
#                              operator's config is never touched; config.example.toml is
#                              refreshed so new keys show after an upgrade
#   /var/lib/edge-runtime/     the agent's state (store, trust floors, outbox), edgefleet 0750
#   /etc/systemd/system/edge-runtime.service (0644), enabled for multi-user.target; with
#                              systemd >= 254 also edge-runtime.service.d/restart-backoff.conf
#
# Idempotent: a second run with the same arguments changes no file, mode or mtime, and does
# not run pip when the same version, extra and dependency mode are installed
# (/opt/edgefleet/venv/.edgefleet-install records them; --force reinstalls).
#
# Options:
#   --root DIR       install into a staging root. Tested by tests/integration/test_install.py.
#                    No useradd: the user and group are appended to DIR/etc/passwd and
#                    DIR/etc/group (DIR/etc/shadow, gshadow when present) with the first free
#                    system id from 999 down; files are chowned to those ids when run as root,
#                    otherwise ownership is reported and skipped. The unit is "enabled" by the
#                    symlink systemctl would make; systemctl is never called. The checks (Python,
#                    architecture) are of this machine, and the venv is not relocatable (its
#                    scripts name DIR/opt/edgefleet/venv): --root is for tests and inspection,
#                    not for building another machine's image.
#   --wheel PATH     install this wheel with pip --no-index (offline); dependencies come from
#                    --find-links DIR, or must already be importable (--system-site-packages)
#   --find-links DIR wheels of the dependencies (pip download 'edgefleet[EXTRA]' -d DIR on a
#                    machine with the same architecture and Python)
#   --extra NAME     the interpreter backend: litert (ai-edge-litert; default), legacy
#                    (tflite-runtime, NumPy < 2: Raspberry Pi OS images, armv7l's default) or
#                    none (bring your own)
#   --python PY      the Python to build the venv from (default: python3), e.g. python3.9 on a
#                    Jetson with JetPack 5, whose python3 is 3.8
#   --system-site-packages   let the venv see the system's packages (python3-numpy from apt)
#   --no-deps        install edgefleet alone; every dependency must already be importable.
#                    The tests use it with a staging root: no network, no wheelhouse.
#   --force          reinstall the package even when the same version is installed
#   --uninstall      stop and disable the unit, remove it, the venv, the user and the group;
#                    keep /var/lib/edge-runtime and /etc/edge-runtime
#   --purge          with --uninstall: remove those two as well
#
# Not tested automatically: useradd/userdel and systemctl on a live system (the tests use
# --root), and pip resolving dependencies from a wheelhouse or PyPI (the tests use --no-deps).
# Exit status: 0 done, 1 a check failed (every missing piece is named), 2 bad usage.
set -euo pipefail

MIN_PYTHON=3.9          # pyproject.toml requires-python (a test keeps the two equal)
SUPPORTED_ARCHES="aarch64 armv7l x86_64"
SERVICE_USER=edgefleet
UNIT=edge-runtime.service
BACKOFF_DROPIN=restart-backoff.conf
MARKER=.edgefleet-install

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")

root=""
wheel=""
find_links=""
extra=""
python=python3
system_site=0
no_deps=0
force=0
uninstall=0
purge=0

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

die_usage() {
    echo "install.sh: $*" >&2
    echo "install.sh: see install.sh --help" >&2
    exit 2
}

need_arg() {
    if [ "$#" -lt 2 ] || [ -z "$2" ]; then
        die_usage "$1 needs a value"
    fi
}

while [ "$#" -gt 0 ]; do
    case "$1" in
        --root) need_arg "$@"; root=$2; shift 2 ;;
        --wheel) need_arg "$@"; wheel=$2; shift 2 ;;
        --find-links) need_arg "$@"; find_links=$2; shift 2 ;;
        --extra) need_arg "$@"; extra=$2; shift 2 ;;
        --python) need_arg "$@"; python=$2; shift 2 ;;
        --system-site-packages) system_site=1; shift ;;
        --no-deps) no_deps=1; shift ;;
        --force) force=1; shift ;;
        --uninstall) uninstall=1; shift ;;
        --purge) purge=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die_usage "unknown argument: $1" ;;
    esac
done

[ "$purge" -eq 0 ] || [ "$uninstall" -eq 1 ] || die_usage "--purge goes with --uninstall"
case "$extra" in
    ""|litert|legacy|none) ;;
    *) die_usage "--extra must be litert, legacy or none, not '$extra'" ;;
esac
if [ -n "$root" ]; then
    mkdir -p "$root"
    root=$(cd "$root" && pwd)
    [ "$root" != / ] || root=""
fi
if [ -n "$wheel" ]; then
    [ -f "$wheel" ] || die_usage "--wheel $wheel: no such file"
    wheel=$(cd "$(dirname "$wheel")" && pwd)/$(basename "$wheel")
fi
if [ -n "$find_links" ]; then
    [ -d "$find_links" ] || die_usage "--find-links $find_links: no such directory"
    find_links=$(cd "$find_links" && pwd)
fi

# Paths as the device sees them, and where this run writes them.
PREFIX=/opt/edgefleet
VENV=$PREFIX/venv
CONF_DIR=/etc/edge-runtime
STATE_DIR=/var/lib/edge-runtime
UNIT_DIR=/etc/systemd/system
WANTS_DIR=$UNIT_DIR/multi-user.target.wants

say() { echo "install.sh: $*"; }
warn() { echo "install.sh: warning: $*" >&2; }

is_root() { [ "$(id -u)" -eq 0 ]; }
# systemd is PID 1 and we act on this machine (sd_booted(3)'s test).
systemd_live() { [ -z "$root" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; }

# --- checks ----------------------------------------------------------------------------

problems=()

check_arch() {
    local machine
    machine=$(uname -m)
    case "$machine" in
        aarch64|arm64) machine=aarch64 ;;
        armv7l|armv7|armv8l) machine=armv7l ;;
        x86_64|amd64) machine=x86_64 ;;
    esac
    ARCH=$machine
    case " $SUPPORTED_ARCHES " in
        *" $machine "*) ;;
        *) problems+=("architecture $(uname -m) is not supported: the TFLite interpreter wheels exist for $SUPPORTED_ARCHES (armv6l boards such as the Pi Zero W / Pi 1 cannot run it)") ;;
    esac
}

# Prints "MAJOR.MINOR BITS" (the tests put a fake python printing that on PATH).
PY_QUERY='import struct, sys; print("%d.%d %d" % (sys.version_info[0], sys.version_info[1], 8 * struct.calcsize("P")))'

check_python() {
    local out version bits
    if ! command -v "$python" >/dev/null 2>&1; then
        problems+=("$python not found: apt-get install python3 python3-venv (edgefleet needs Python >= $MIN_PYTHON)")
        return
    fi
    if ! out=$(env -u PYTHONPATH -u PYTHONHOME "$python" -c "$PY_QUERY" 2>&1); then
        problems+=("$python does not run: $out")
        return
    fi
    read -r version bits <<<"$out"
    if ! version_ge "$version" "$MIN_PYTHON"; then
        problems+=("$python is Python $version; edgefleet needs Python >= $MIN_PYTHON. Debian/Raspberry Pi OS 11+ and Ubuntu 22.04 ship one (apt-get install python3 python3-venv); on Ubuntu 20.04 / JetPack 5: apt-get install python3.9 python3.9-venv, then run install.sh --python python3.9")
        return
    fi
    # A 64-bit kernel under a 32-bit userland (Raspberry Pi OS 32-bit on a Pi 4) says
    # aarch64; the interpreter's pointer size says what pip will install for.
    if [ "$ARCH" = aarch64 ] && [ "$bits" = 32 ]; then
        ARCH=armv7l
        say "$python is a 32-bit (armv7l) Python on a 64-bit kernel: installing for armv7l"
    fi
    if ! env -u PYTHONPATH -u PYTHONHOME "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        problems+=("$python has no venv/ensurepip module: apt-get install python3-venv (or python$version-venv)")
    fi
}

version_ge() {  # version_ge 3.11 3.9
    local a_major a_minor b_major b_minor
    IFS=. read -r a_major a_minor <<<"$1"
    IFS=. read -r b_major b_minor <<<"$2"
    [[ "$a_major" =~ ^[0-9]+$ && "$a_minor" =~ ^[0-9]+$ ]] || return 1
    [ "$a_major" -gt "$b_major" ] || { [ "$a_major" -eq "$b_major" ] && [ "$a_minor" -ge "$b_minor" ]; }
}

check_tools() {
    local tool
    for tool in install cmp sed; do
        command -v "$tool" >/dev/null 2>&1 || problems+=("$tool not found (coreutils/diffutils/sed)")
    done
    if [ -z "$root" ] && is_root; then
        for tool in useradd groupadd; do
            command -v "$tool" >/dev/null 2>&1 || problems+=("$tool not found: apt-get install passwd")
        done
    fi
    if [ -z "$root" ] && ! is_root; then
        problems+=("installing into / needs root: run it with sudo (or use --root DIR to stage)")
    fi
}

report_problems() {
    local p
    if [ "${#problems[@]}" -gt 0 ]; then
        for p in "${problems[@]}"; do
            echo "install.sh: missing: $p" >&2
        done
        echo "install.sh: nothing was changed" >&2
        exit 1
    fi
}

# --- the user --------------------------------------------------------------------------

# Ids in a staging root: the first system id (999 down to 100) free in both files.
free_system_id() {
    local id
    for ((id = 999; id >= 100; id--)); do
        if ! cut -d: -f3 "$root/etc/passwd" "$root/etc/group" | grep -qx "$id"; then
            echo "$id"
            return
        fi
    done
    echo "install.sh: no free system id in $root/etc/passwd" >&2
    exit 1
}

ensure_user() {
    if [ -z "$root" ]; then
        if ! getent group "$SERVICE_USER" >/dev/null; then
            groupadd --system "$SERVICE_USER"
            say "created group $SERVICE_USER"
        fi
        if ! getent passwd "$SERVICE_USER" >/dev/null; then
            useradd --system --gid "$SERVICE_USER" --no-create-home --home-dir /nonexistent \
                --shell /usr/sbin/nologin --comment "edgefleet device agent" "$SERVICE_USER"
            say "created user $SERVICE_USER"
        fi
        SVC_UID=$(id -u "$SERVICE_USER")
        SVC_GID=$(getent group "$SERVICE_USER" | cut -d: -f3)
        return
    fi
    mkdir -p "$root/etc"
    [ -e "$root/etc/passwd" ] || : >"$root/etc/passwd"
    [ -e "$root/etc/group" ] || : >"$root/etc/group"
    local id
    SVC_GID=$(awk -F: -v n="$SERVICE_USER" '$1 == n {print $3}' "$root/etc/group")
    if [ -z "$SVC_GID" ]; then
        id=$(free_system_id)
        echo "$SERVICE_USER:x:$id:" >>"$root/etc/group"
        [ ! -f "$root/etc/gshadow" ] || echo "$SERVICE_USER:!::" >>"$root/etc/gshadow"
        SVC_GID=$id
        say "added group $SERVICE_USER ($id) to $root/etc/group"
    fi
    SVC_UID=$(awk -F: -v n="$SERVICE_USER" '$1 == n {print $3}' "$root/etc/passwd")
    if [ -z "$SVC_UID" ]; then
        id=$SVC_GID
        if cut -d: -f3 "$root/etc/passwd" | grep -qx "$id"; then
            id=$(free_system_id)
        fi
        echo "$SERVICE_USER:x:$id:$SVC_GID:edgefleet device agent:/nonexistent:/usr/sbin/nologin" >>"$root/etc/passwd"
        [ ! -f "$root/etc/shadow" ] || echo "$SERVICE_USER:!*:::::::" >>"$root/etc/shadow"
        SVC_UID=$id
        say "added user $SERVICE_USER ($id) to $root/etc/passwd"
    fi
}

remove_user() {
    if [ -z "$root" ]; then
        if getent passwd "$SERVICE_USER" >/dev/null; then
            userdel "$SERVICE_USER"
            say "removed user $SERVICE_USER"
        fi
        if getent group "$SERVICE_USER" >/dev/null; then
            groupdel "$SERVICE_USER"
            say "removed group $SERVICE_USER"
        fi
        return
    fi
    local f
    for f in passwd shadow group gshadow; do
        if [ -f "$root/etc/$f" ] && grep -q "^$SERVICE_USER:" "$root/etc/$f"; then
            sed -i "/^$SERVICE_USER:/d" "$root/etc/$f"
            say "removed $SERVICE_USER from $root/etc/$f"
        fi
    done
}

# --- files -----------------------------------------------------------------------------

# own OWNER:GROUP MODE PATH: set both when they differ (never touches the mtime).
own() {
    local owner=$1 mode=$2 path=$3
    if [ "$(stat -c %a "$path")" != "${mode#0}" ]; then
        chmod "$mode" "$path"
    fi
    if [ "$(stat -c %u:%g "$path")" != "$owner" ]; then
        if is_root; then
            chown "$owner" "$path"
        else
            say "not root: $path stays $(stat -c %u:%g "$path"), would be $owner"
        fi
    fi
}

ensure_dir() {  # ensure_dir OWNER MODE PATH
    [ -d "$3" ] || { mkdir -p "$3"; say "created $3"; }
    own "$1" "$2" "$3"
}

# put_file OWNER MODE SRC DEST: copy when the content differs (an unchanged file keeps its
# mtime), then owner and mode.
put_file() {
    local owner=$1 mode=$2 src=$3 dest=$4
    if ! cmp -s "$src" "$dest"; then
        local tmp
        tmp=$(mktemp "$dest.XXXXXX")
        cat "$src" >"$tmp"
        chmod "$mode" "$tmp"
        mv -f "$tmp" "$dest"
        say "wrote $dest"
    fi
    own "$owner" "$mode" "$dest"
}

systemd_version() {
    systemctl --version 2>/dev/null | awk 'NR == 1 {print $2 + 0}'
}

# --- the package -----------------------------------------------------------------------

package_version() {
    if [ -n "$wheel" ]; then
        basename "$wheel" | awk -F- '{print $2}'
    else
        sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$repo/pyproject.toml" | head -n 1
    fi
}

install_package() {
    local venv=$root$VENV version marker_text spec
    version=$(package_version)
    [ -n "$version" ] || { echo "install.sh: cannot tell the package version" >&2; exit 1; }
    marker_text="version=$version extra=$extra deps=$([ "$no_deps" -eq 1 ] && echo none || echo pip) system_site_packages=$system_site"
    if [ "$force" -eq 0 ] && [ -f "$venv/$MARKER" ] && [ "$(cat "$venv/$MARKER")" = "$marker_text" ] \
        && compgen -G "$venv/lib/python3*/site-packages/edgefleet-$version.dist-info" >/dev/null; then
        say "edgefleet $version [$extra] is installed in $venv (--force reinstalls)"
        PACKAGE_CHANGED=0
        return
    fi
    ensure_dir 0:0 0755 "$root$PREFIX"
    if [ ! -x "$venv/bin/python" ]; then
        local venv_args=()
        [ "$system_site" -eq 0 ] || venv_args+=(--system-site-packages)
        env -u PYTHONPATH -u PYTHONHOME "$python" -m venv "${venv_args[@]}" "$venv"
        say "created the venv $venv"
    fi
    local pip_args=(--disable-pip-version-check --no-input --quiet)
    [ "$force" -eq 0 ] || pip_args+=(--force-reinstall)
    [ "$no_deps" -eq 0 ] || pip_args+=(--no-deps)
    if [ -n "$wheel" ]; then
        pip_args+=(--no-index)
        [ -z "$find_links" ] || pip_args+=(--find-links "$find_links")
        spec=$wheel
    else
        [ -z "$find_links" ] || pip_args+=(--find-links "$find_links")
        [ -f "$repo/pyproject.toml" ] || { echo "install.sh: no --wheel and no checkout at $repo" >&2; exit 1; }
        spec=$repo
    fi
    [ "$extra" = none ] || spec="${spec}[$extra]"
    say "pip install $spec"
    if ! env -u PYTHONPATH -u PYTHONHOME "$venv/bin/python" -m pip install "${pip_args[@]}" "$spec"; then
        echo "install.sh: pip could not install $spec into $venv." >&2
        if [ -n "$wheel" ] && [ "$no_deps" -eq 0 ]; then
            echo "install.sh: offline install: --find-links DIR must hold every dependency's wheel for $ARCH / $python (on a connected machine: pip download '$(basename "$wheel")[$extra]' -d DIR)." >&2
        fi
        if [ "$extra" = litert ] && [ "$ARCH" = armv7l ]; then
            echo "install.sh: ai-edge-litert publishes no armv7l wheels: use --extra legacy (tflite-runtime)." >&2
        fi
        exit 1
    fi
    echo "$marker_text" >"$venv/$MARKER"
    PACKAGE_CHANGED=1
}

# --- install / uninstall ---------------------------------------------------------------

do_install() {
    check_arch
    check_python
    check_tools
    report_problems
    if [ -z "$extra" ]; then
        if [ "$ARCH" = armv7l ]; then extra=legacy; else extra=litert; fi
    fi
    local src_unit=$repo/systemd/$UNIT src_config=$here/edge-runtime.example.toml
    [ -f "$src_unit" ] || { echo "install.sh: $src_unit is missing (run install.sh from an edgefleet checkout)" >&2; exit 1; }
    [ -f "$src_config" ] || { echo "install.sh: $src_config is missing" >&2; exit 1; }

    ensure_user
    local svc="$SVC_UID:$SVC_GID" rootgrp="0:$SVC_GID"

    install_package

    ensure_dir 0:0 0755 "$root/etc"
    ensure_dir "$rootgrp" 0750 "$root$CONF_DIR"
    put_file "$rootgrp" 0640 "$src_config" "$root$CONF_DIR/config.example.toml"
    if [ -e "$root$CONF_DIR/config.toml" ]; then
        say "kept $root$CONF_DIR/config.toml"
    else
        put_file "$rootgrp" 0640 "$src_config" "$root$CONF_DIR/config.toml"
        say "edit $CONF_DIR/config.toml (device_id, broker) or apply a provisioning bundle before starting"
    fi

    mkdir -p "$root/var/lib"
    ensure_dir "$svc" 0750 "$root$STATE_DIR"
    if is_root && [ -n "$(find "$root$STATE_DIR" -mindepth 1 ! -uid "$SVC_UID" -print -quit)" ]; then
        chown -R "$svc" "$root$STATE_DIR"  # state kept from an earlier install, another uid
        say "gave $root$STATE_DIR to $SERVICE_USER"
    fi

    mkdir -p "$root$UNIT_DIR"
    put_file 0:0 0644 "$src_unit" "$root$UNIT_DIR/$UNIT"
    local dropin_dir=$root$UNIT_DIR/$UNIT.d sdv
    sdv=$(systemd_version)
    if [ -z "$root" ] && [ -n "$sdv" ] && [ "$sdv" -ge 254 ]; then
        ensure_dir 0:0 0755 "$dropin_dir"
        put_file 0:0 0644 "$repo/systemd/$UNIT.d/$BACKOFF_DROPIN" "$dropin_dir/$BACKOFF_DROPIN"
    elif [ -n "$root" ]; then
        say "--root: the target's systemd version is unknown; with systemd >= 254 copy systemd/$UNIT.d/$BACKOFF_DROPIN to $UNIT_DIR/$UNIT.d/ (exponential restart back-off)"
    fi

    if systemd_live; then
        systemctl daemon-reload
        if ! systemctl is-enabled --quiet "$UNIT"; then
            systemctl enable "$UNIT"
        fi
        if [ "${PACKAGE_CHANGED:-0}" -eq 1 ] && systemctl is-active --quiet "$UNIT"; then
            systemctl restart "$UNIT"
            say "restarted $UNIT on the new version"
        fi
        say "start it with: systemctl start $UNIT   (logs: journalctl -u $UNIT)"
    else
        # What `systemctl enable` does for WantedBy=multi-user.target, without systemd.
        mkdir -p "$root$WANTS_DIR"
        if [ "$(readlink "$root$WANTS_DIR/$UNIT" 2>/dev/null)" != "$UNIT_DIR/$UNIT" ]; then
            ln -sfn "$UNIT_DIR/$UNIT" "$root$WANTS_DIR/$UNIT"
            say "enabled $UNIT (linked $WANTS_DIR/$UNIT)"
        fi
        say "systemd is not running here${root:+ (--root $root)}: not running systemctl daemon-reload; on the device, after boot: systemctl start $UNIT"
    fi
    say "done: edgefleet in $VENV, config $CONF_DIR, state $STATE_DIR"
}

do_uninstall() {
    check_tools
    report_problems
    if systemd_live; then
        if systemctl is-enabled --quiet "$UNIT" 2>/dev/null || systemctl is-active --quiet "$UNIT" 2>/dev/null; then
            systemctl disable --now "$UNIT"
        fi
    fi
    local dropin_dir=$root$UNIT_DIR/$UNIT.d
    if [ -e "$root$UNIT_DIR/$UNIT" ]; then
        say "removing $UNIT_DIR/$UNIT"
    fi
    rm -f "$root$WANTS_DIR/$UNIT" "$root$UNIT_DIR/$UNIT" "$dropin_dir/$BACKOFF_DROPIN"
    if [ "$purge" -eq 1 ]; then
        rm -rf "$dropin_dir"  # the operator's drop-ins (systemctl edit) too
    elif [ -d "$dropin_dir" ]; then
        rmdir "$dropin_dir" 2>/dev/null || say "kept $UNIT_DIR/$UNIT.d (operator drop-ins)"
    fi
    rmdir "$root$WANTS_DIR" 2>/dev/null || true
    systemd_live && systemctl daemon-reload
    if [ -d "$root$VENV" ]; then
        rm -rf "$root$VENV"
        say "removed $VENV"
    fi
    rmdir "$root$PREFIX" 2>/dev/null || true
    remove_user
    if [ "$purge" -eq 1 ]; then
        rm -rf "$root$STATE_DIR" "$root$CONF_DIR"
        say "purged $STATE_DIR and $CONF_DIR"
    else
        say "kept $STATE_DIR and $CONF_DIR (--purge removes them; a reinstall takes them over)"
    fi
}

if [ "$uninstall" -eq 1 ]; then
    do_uninstall
else
    do_install
fi
