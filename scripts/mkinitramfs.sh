#!/usr/bin/env bash
# vfdirect: the Linux guest of a QEMU VM -- a Debian kernel and a small initramfs.
#
#   scripts/mkinitramfs.sh [--cache DIR] [--kernel-deb FILE] [--init FILE] [--force]
#
# Everything comes from Debian packages:
#   * the kernel: the package linux-image-amd64 depends on (linux-image-<version>-amd64),
#     fetched once with `apt-get download` and unpacked with `dpkg-deb -x` into the cache
#     (or unpacked from --kernel-deb);
#   * busybox-static (/bin/busybox) for the shell and the tools of the init;
#   * the kernel's own modules virtio_pci, virtio_scsi, sd_mod, ext4 and crc32c_generic
#     with every module they depend on (modules.dep, made by kmod's depmod; .ko.xz and
#     .ko.zst are decompressed);
#   * e2fsprogs' mke2fs and e2fsck with the shared libraries they load.
# The init is src/vfdirect/guestimage/init.sh (or --init).
#
# The cache is $VFDIRECT_GUEST_CACHE, else ~/.cache/vfdirect/guest. A second run reuses the
# kernel and rebuilds the initramfs only when its inputs (init, this script, kernel
# version, tool binaries) changed. Concurrent runs serialise on a lock in the cache.
# On success the last two lines of stdout are:
#   KERNEL=<path of vmlinuz>
#   INITRD=<path of the initramfs (gzip'd newc cpio)>
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${VFDIRECT_GUEST_CACHE:-${HOME:-/root}/.cache/vfdirect/guest}"
init="$here/../src/vfdirect/guestimage/init.sh"
kernel_deb=""
force=0
# the modules the guest needs; their dependencies are found through modules.dep
modules=(virtio_pci virtio_scsi sd_mod crc32c_generic ext4)

die() { printf 'mkinitramfs: error: %s\n' "$*" >&2; exit 1; }
log() { printf 'mkinitramfs: %s\n' "$*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --cache) cache="$2"; shift 2 ;;
        --kernel-deb) kernel_deb="$2"; shift 2 ;;
        --init) init="$2"; shift 2 ;;
        --force) force=1; shift ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

for tool in busybox cpio gzip depmod modprobe mke2fs e2fsck ldd sha256sum flock; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found (install Debian packages busybox-static cpio kmod e2fsprogs)"
done
busybox_bin="$(command -v busybox)"
applets="$("$busybox_bin" --list)"
grep -qx sh <<<"$applets" || die "$busybox_bin has no sh applet"
ldd "$busybox_bin" >/dev/null 2>&1 && die "$busybox_bin is dynamically linked: install busybox-static"
[ -f "$init" ] || die "init script $init not found"

mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"
exec 9>"$cache/.lock"
flock -w 600 9 || die "cache $cache is locked by another build for too long"

# -- the kernel ---------------------------------------------------------------------
kernel_root=""
if [ -n "$kernel_deb" ]; then
    [ -f "$kernel_deb" ] || die "kernel package $kernel_deb not found"
    pkg="$(dpkg-deb -f "$kernel_deb" Package)"
    kernel_root="$cache/$pkg"
    if [ ! -d "$kernel_root/boot" ]; then
        log "unpacking $kernel_deb"
        rm -rf "$kernel_root.tmp" && dpkg-deb -x "$kernel_deb" "$kernel_root.tmp"
        mv "$kernel_root.tmp" "$kernel_root"
    fi
else
    # a kernel unpacked before is reused (no network needed); else fetch one
    for d in "$cache"/linux-image-*-amd64; do
        [ -d "$d/boot" ] && kernel_root="$d"
    done
    if [ -z "$kernel_root" ]; then
        command -v apt-cache >/dev/null 2>&1 || die "no cached kernel and no apt-cache: pass --kernel-deb"
        pkg="$(apt-cache depends linux-image-amd64 2>/dev/null \
               | sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | sed -n 1p)"
        [ -n "$pkg" ] || die "cannot tell which kernel linux-image-amd64 depends on (apt-get update?)"
        dl="$cache/download"
        rm -rf "$dl" && mkdir -p "$dl"
        log "apt-get download $pkg"
        (cd "$dl" && apt-get download -q "$pkg" >&2 2>/dev/null) \
            || (cd "$dl" && apt-get download "$pkg" >&2) || die "apt-get download $pkg failed"
        deb="$(ls "$dl"/"$pkg"_*.deb | sed -n 1p)"
        kernel_root="$cache/$pkg"
        rm -rf "$kernel_root.tmp" && dpkg-deb -x "$deb" "$kernel_root.tmp"
        mv "$kernel_root.tmp" "$kernel_root"
        rm -rf "$dl"
    fi
fi
vmlinuz="$(ls "$kernel_root"/boot/vmlinuz-* 2>/dev/null | sed -n 1p)"
[ -n "$vmlinuz" ] || die "no vmlinuz in $kernel_root/boot"
kver="${vmlinuz##*/vmlinuz-}"
moddir="$kernel_root/lib/modules/$kver"
[ -d "$moddir" ] || die "no modules for $kver in $kernel_root"
[ -f "$moddir/modules.dep" ] || depmod -b "$kernel_root" "$kver" || die "depmod failed"

# -- up to date? ----------------------------------------------------------------------
initrd="$cache/initrd-$kver.img"
stamp="$(cat "$init" "$0" "$busybox_bin" "$(command -v mke2fs)" "$(command -v e2fsck)" \
         | sha256sum | cut -c1-32)-$kver"
if [ "$force" = 0 ] && [ -f "$initrd" ] && [ "$(cat "$initrd.stamp" 2>/dev/null)" = "$stamp" ]; then
    echo "KERNEL=$vmlinuz"
    echo "INITRD=$initrd"
    exit 0
fi

# -- the tree -------------------------------------------------------------------------
log "building $initrd (kernel $kver)"
root="$(mktemp -d "$cache/root.XXXXXX")"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,usr/sbin,etc,proc,sys,dev,mnt,tmp,run,lib/modules/"$kver"}
cp "$busybox_bin" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
install -m 0755 "$init" "$root/init"

# modules in load order: modprobe --show-depends walks modules.dep of the unpacked kernel
order="$root/etc/vfdirect-modules"
: >"$order"
for m in "${modules[@]}"; do
    modprobe -d "$kernel_root" -S "$kver" --show-depends "$m" \
        || die "module $m (or a dependency) missing from $kver"
done | awk '$1 == "insmod" { print $2 }' | while read -r ko; do
    rel="${ko#"$moddir"/}"
    out="$root/lib/modules/$kver/${rel%.xz}"
    out="${out%.zst}"
    grep -qx "${out#"$root"}" "$order" && continue
    mkdir -p "$(dirname "$out")"
    case "$ko" in
        *.ko.xz) xz -dc "$ko" >"$out" ;;
        *.ko.zst) zstd -qdc "$ko" >"$out" ;;
        *.ko) cp "$ko" "$out" ;;
        *) die "unexpected module file $ko" ;;
    esac
    echo "${out#"$root"}" >>"$order"
done
[ -s "$order" ] || die "no modules selected"

# e2fsprogs and the shared libraries they load (with the dynamic loader)
for bin in mke2fs e2fsck; do
    cp "$(command -v "$bin")" "$root/usr/sbin/$bin"
    ldd "$(command -v "$bin")" | awk '/=>/ { print $3 } /^\t\/.*ld-linux/ { print $1 }' \
        | while read -r lib; do
            [ -f "$lib" ] || continue
            mkdir -p "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
        done
done
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/mke2fs.conf"
# the loader is looked up at /lib64 on x86-64
if [ -d "$root/usr/lib64" ] && [ ! -e "$root/lib64" ]; then ln -s usr/lib64 "$root/lib64"; fi
if [ -d "$root/usr/lib/x86_64-linux-gnu" ] && [ ! -e "$root/lib/x86_64-linux-gnu" ]; then
    ln -s ../usr/lib/x86_64-linux-gnu "$root/lib/x86_64-linux-gnu"
fi
echo "$kver" >"$root/etc/vfdirect-kernel"

(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) \
    | gzip -9 >"$initrd.tmp"
mv "$initrd.tmp" "$initrd"
echo "$stamp" >"$initrd.stamp"
log "$(du -h "$initrd" | cut -f1) initramfs with $(wc -l <"$order") modules"
echo "KERNEL=$vmlinuz"
echo "INITRD=$initrd"
