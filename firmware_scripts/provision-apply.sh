#!/bin/sh
# provision-apply.sh DIR [--root R] [--group G]
#
# On the device: install the bundle `fleetctl provision` wrote (DIR) into
# R/etc/edge-runtime/ (R defaults to /; tests give a staging root). Files are owned by
# root and the service user's group (G, default edgefleet: the group install.sh creates),
# secrets (device.key, broker.pass) 0640 and the rest 0644, so the agent can read them and
# nobody else can read the secrets. Each file is copied to a temporary name beside its
# target and renamed over it, config.toml last, so a reader sees the old file or the new
# one. The group is looked up in R/etc/group when R has one (install.sh --root R puts the
# service user there), else in this system's groups. Ownership is left alone (and the
# script says so) when not run as root or when the group does not exist. Then:
# systemctl restart edge-runtime.
set -eu

usage() {
    echo "usage: $0 DIR [--root R] [--group G]" >&2
    exit 2
}

src=""
root=""
group="edgefleet"
while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || usage; root="$2"; shift 2 ;;
        --root=*) root="${1#--root=}"; shift ;;
        --group) [ $# -ge 2 ] || usage; group="$2"; shift 2 ;;
        --group=*) group="${1#--group=}"; shift ;;
        -h|--help) usage ;;
        -*) echo "$0: unknown option $1" >&2; usage ;;
        *) [ -z "$src" ] || usage; src="$1"; shift ;;
    esac
done
[ -n "$src" ] || usage

required="device.pem device.key ca.pem root.json config.toml"
for f in $required; do
    if [ ! -f "$src/$f" ]; then
        echo "$0: $src/$f is missing: is $src a bundle from 'fleetctl provision'?" >&2
        exit 1
    fi
done

dest="${root%/}/etc/edge-runtime"

# The group's id from the root's own group file when it has one (install.sh --root R adds
# the service user there), else from this system's.
if [ -f "${root%/}/etc/group" ] && [ -n "$root" ]; then
    groups_db="${root%/}/etc/group"
    gid=$(awk -F: -v n="$group" '$1 == n {print $3}' "$groups_db")
else
    groups_db="this system's groups"
    gid=$(getent group "$group" 2>/dev/null | cut -d: -f3) || gid=""
fi
chown_to=""
if [ "$(id -u)" -ne 0 ]; then
    echo "not root: files keep your ownership (run as root to give them to root:$group)"
elif [ -z "$gid" ]; then
    echo "group $group does not exist in $groups_db (run install.sh first): ownership left as it is"
else
    chown_to="0:$gid"
fi

if [ ! -d "$dest" ]; then
    mkdir -p "$dest"
    chmod 0750 "$dest"
    if [ -n "$chown_to" ]; then chown "$chown_to" "$dest"; fi
fi

# install_file NAME MODE: copy, set owner and mode on the temporary file, rename over.
install_file() {
    tmp="$dest/.$1.provision.$$"
    cp "$src/$1" "$tmp"
    if [ -n "$chown_to" ]; then chown "$chown_to" "$tmp"; fi
    chmod "$2" "$tmp"
    mv -f "$tmp" "$dest/$1"
    echo "  $dest/$1 ($2${chown_to:+, root:$group})"
}

trap 'rm -f "$dest"/.*.provision.$$' EXIT
echo "installing $src into $dest:"
for f in device.pem ca.pem root.json; do install_file "$f" 0644; done
install_file device.key 0640
if [ -f "$src/broker.pass" ]; then install_file broker.pass 0640; fi
install_file config.toml 0644
sync

echo "done; now restart the agent: systemctl restart edge-runtime"
