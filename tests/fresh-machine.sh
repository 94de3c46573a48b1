#!/bin/sh
# Proof that the README's two commands work on a fresh machine (issue 14 §1),
# opt-in (`make test-fresh`, as root; not part of `make test` or CI: it takes
# minutes and downloads a Debian system).
#
# Builds a minimal Debian bookworm root with debootstrap (--variant=minbase:
# dpkg, apt, coreutils, perl-base, ... and no compiler), adds only what a
# Debian machine has before any project is cloned on it:
#   make             the README's commands are make commands
#   git              the project arrives as a git clone
#   ca-certificates  apt and git over https
# copies a clean `git clone` of this repository (its committed HEAD) into it,
# and inside a chroot runs `make demo` and then `make test` exactly as the
# README writes them.  Everything else (compiler, libraries, python3, ...)
# must come from the project's own `make deps`.
#
#   tests/fresh-machine.sh [ROOT_DIR]
#     FRESH_MIRROR  Debian mirror (default: the first one in the host's apt sources)
#     FRESH_KEEP=1  keep ROOT_DIR afterwards (default: removed on success)
# Exit status: that of the failing command, 0 when both passed.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "fresh-machine: needs root (debootstrap, chroot)" >&2; exit 2; }
command -v debootstrap >/dev/null 2>&1 || {
	echo "fresh-machine: installing debootstrap"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
}
mirror=${FRESH_MIRROR:-$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p; s/^deb \(\[[^]]*\] \)\{0,1\}\([^ ]*\) .*/\2/p' \
	/etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | grep -v security | head -n 1)}
mirror=${mirror:-http://deb.debian.org/debian}
root=${1:-$(mktemp -d /var/tmp/cdmoe-fresh.XXXXXX)}
mkdir -p "$root"

mounted=
cleanup() {
	for m in $mounted; do umount -l "$root/$m" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

step() { echo "== fresh-machine: $* ($(date -u +%H:%M:%S))"; }

if [ ! -x "$root/usr/bin/apt-get" ]; then
	step "debootstrap bookworm from $mirror into $root"
	debootstrap --variant=minbase --include=make,git,ca-certificates bookworm "$root" "$mirror" \
		>"$root.debootstrap.log" 2>&1 || {
		tail -n 20 "$root.debootstrap.log" >&2
		echo "fresh-machine: debootstrap failed (log: $root.debootstrap.log)" >&2
		exit 3
	}
fi

step "clean clone of $(git -C "$here" rev-parse --short HEAD)"
rm -rf "$root/root/cdmoe"
git clone -q --no-local "$here" "$root/root/cdmoe"
cp /etc/resolv.conf "$root/etc/resolv.conf"
for m in proc sys dev dev/pts dev/shm; do
	mkdir -p "$root/$m"
	case $m in
	proc) mount -t proc proc "$root/proc" ;;
	sys) mount -t sysfs sys "$root/sys" ;;
	dev) mount --bind /dev "$root/dev" ;;
	dev/pts) mount -t devpts devpts "$root/dev/pts" ;;
	dev/shm) mount -t tmpfs shm "$root/dev/shm" ;;
	esac
	mounted="$m $mounted"
done

# A login environment as on a new machine: root's, nothing of ours.
run_in_root() {
	chroot "$root" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
		PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		/bin/sh -c "cd /root/cdmoe && $1"
}
step "make demo"
run_in_root "make demo"
step "make test"
run_in_root "make test"
step "both passed"
cleanup
mounted=
trap - EXIT INT TERM
[ "${FRESH_KEEP:-0}" = 1 ] || rm -rf "$root" "$root.debootstrap.log"
