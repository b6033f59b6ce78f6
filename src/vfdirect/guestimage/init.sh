#!/bin/sh
# vfdirect guest init (PID 1 of the initramfs scripts/mkinitramfs.sh builds).
#
# Kernel command line (read from /proc/cmdline):
#   vfdirect.disks=T:L[,T:L...]  the virtual disk addresses (virtio-scsi target, LUN) the
#                                hypervisor assigned (claim A8); "-" for none
#   vfdirect.fs=T:L              the disk to keep an ext4 filesystem on (default: the first)
#   vfdirect.vm=NAME             the VM's name (goes into the marker it writes)
#   vfdirect.probe=1             only report that userspace runs, then power off
#
# It loads the virtio/SCSI/ext4 modules, lists the SCSI devices the kernel found
# (host:channel:target:LUN, from /sys/class/scsi_device), checks them against the addresses
# it was given, then on the fs disk: if it holds no ext4 yet, makes one and writes files
# whose sha256 it records; if it does, runs `e2fsck -f -n` and verifies the checksums.
# It prints one line `VFDIRECT-RESULT {json}` and powers off.
export PATH=/usr/sbin:/sbin:/bin
/bin/busybox mkdir -p /proc /sys /dev /mnt /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/busybox --install -s /bin
exec </dev/console >/dev/console 2>&1

uptime_s() { cut -d' ' -f1 /proc/uptime; }
param() {
    for word in $(cat /proc/cmdline); do
        case "$word" in "$1="*) echo "${word#*=}"; return ;; esac
    done
}
result() {  # $1: the JSON object's members; then power off
    sync
    echo "VFDIRECT-RESULT {$1,\"uptime_s\":$(uptime_s),\"kernel\":\"$(uname -r)\"}"
    sync
    poweroff -f
    sleep 5
}

vm="$(param vfdirect.vm)"
echo "VFDIRECT-BOOT {\"vm\":\"$vm\",\"uptime_s\":$(uptime_s)}"
if [ "$(param vfdirect.probe)" = 1 ]; then
    result "\"ok\":true,\"probe\":true,\"vm\":\"$vm\""
fi

# -- modules, in the order the builder resolved from modules.dep ----------------------
mod_failed=""
while read -r ko; do
    name="${ko##*/}"
    # the CPU-specific variants (kernel/arch/...) need CPU features a TCG CPU may lack;
    # their generic versions stand in
    case "$ko" in
        */kernel/arch/*) insmod "$ko" 2>/dev/null ;;
        *) insmod "$ko" 2>/dev/null || mod_failed="$mod_failed ${name%.ko}" ;;
    esac
done </etc/vfdirect-modules

# -- SCSI devices ---------------------------------------------------------------------
disks="$(param vfdirect.disks)"
[ "$disks" = "-" ] && disks=""
expected="$(echo "$disks" | tr ',' '\n' | grep -v '^$' | sort | tr '\n' ' ')"
want_n="$(echo "$expected" | wc -w)"
# the scan is synchronous (scsi_mod.scan=sync); sd attaches asynchronously: wait until
# every disk found has its block device (bounded)
i=0
while [ "$i" -lt 200 ]; do
    missing=0
    n=0
    for d in /sys/class/scsi_device/*; do
        [ -e "$d" ] || continue
        n=$((n + 1))
        [ "$(cat "$d/device/type" 2>/dev/null)" = 0 ] || continue
        ls "$d/device/block/" >/dev/null 2>&1 || missing=1
    done
    [ "$missing" = 0 ] && [ "$n" -ge "$want_n" ] && break
    i=$((i + 1))
    sleep 0.1
done

found=""
devices=""
for d in /sys/class/scsi_device/*; do
    [ -e "$d" ] || continue
    hctl="${d##*/}"
    t="$(echo "$hctl" | cut -d: -f3)"
    l="$(echo "$hctl" | cut -d: -f4)"
    blk="$(ls "$d/device/block/" 2>/dev/null | head -n1)"
    vendor="$(cat "$d/device/vendor" 2>/dev/null | tr -d ' "\\')"
    model="$(cat "$d/device/model" 2>/dev/null | tr -d ' "\\')"
    size=0
    [ -n "$blk" ] && size="$(cat "/sys/block/$blk/size")"
    echo "VFDIRECT-SCSI $hctl type=$(cat "$d/device/type") block=${blk:--} vendor=$vendor model=$model sectors=$size"
    found="$found$t:$l
"
    devices="$devices{\"hctl\":\"$hctl\",\"target\":$t,\"lun\":$l,\"block\":\"$blk\",\"vendor\":\"$vendor\",\"model\":\"$model\",\"sectors_512\":$size},"
done
found="$(echo "$found" | grep -v '^$' | sort | tr '\n' ' ')"
devices="[${devices%,}]"
as_json() { echo "$1" | tr ' ' '\n' | grep -v '^$' | sed 's/.*/"&"/' | tr '\n' ',' | sed 's/,$//'; }
match=false
[ "$found" = "$expected" ] && match=true
common="\"vm\":\"$vm\",\"expected\":[$(as_json "$expected")],\"found\":[$(as_json "$found")],\"match\":$match,\"devices\":$devices,\"modules_failed\":[$(as_json "$mod_failed")]"

# -- the filesystem -------------------------------------------------------------------
fs="$(param vfdirect.fs)"
[ -n "$fs" ] || fs="$(echo "$disks" | cut -d, -f1)"
if [ -z "$fs" ]; then
    result "\"ok\":$match,$common,\"fs\":null"
fi
fs_t="${fs%%:*}"
fs_l="${fs##*:}"
dev=""
for d in /sys/class/scsi_device/*:*:"$fs_t":"$fs_l"; do
    [ -e "$d" ] || continue
    blk="$(ls "$d/device/block/" 2>/dev/null | head -n1)"
    [ -n "$blk" ] && dev="/dev/$blk"
done
if [ -z "$dev" ] || [ ! -b "$dev" ]; then
    result "\"ok\":false,$common,\"fs\":\"$fs\",\"error\":\"no block device for $fs\""
fi

magic="$(dd if="$dev" bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' \n')"
if [ "$magic" != "53ef" ]; then
    # first boot: a new filesystem and files with known checksums
    boot_id="$(cat /proc/sys/kernel/random/uuid)"
    marker="VFDIRECT-MARKER:$vm:$boot_id"
    if ! out="$(/usr/sbin/mke2fs -t ext4 -F -q -L vfdirect -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "$dev" 2>&1)"; then
        result "\"ok\":false,$common,\"fs\":\"$fs\",\"error\":\"mke2fs: $(echo "$out" | tr -d '"\\' | tr '\t\n' '  ' | cut -c1-200)\""
    fi
    mount -t ext4 "$dev" /mnt || result "\"ok\":false,$common,\"fs\":\"$fs\",\"error\":\"mount failed\""
    i=0
    while [ "$i" -lt 128 ]; do echo "$marker:$i"; i=$((i + 1)); done >/mnt/marker.txt
    dd if=/dev/urandom of=/mnt/random.bin bs=4096 count=64 2>/dev/null
    mkdir -p /mnt/dir
    echo "written by $vm at boot $boot_id" >/mnt/dir/hello.txt
    (cd /mnt && sha256sum marker.txt random.bin dir/hello.txt >SHA256SUMS)
    sums="$(awk '{ printf "\"%s\":\"%s\",", $2, $1 }' /mnt/SHA256SUMS | sed 's/,$//')"
    sync
    umount /mnt || result "\"ok\":false,$common,\"fs\":\"$fs\",\"error\":\"umount failed\""
    sync
    result "\"ok\":$match,$common,\"boot\":\"first\",\"fs\":\"$fs\",\"device\":\"$dev\",\"marker\":\"$marker\",\"sha256\":{$sums}"
fi

# a later boot: the filesystem must be clean and the files as written
/usr/sbin/e2fsck -f -n "$dev" >/tmp/fsck.log 2>&1
fsck_rc=$?
sed 's/^/VFDIRECT-FSCK /' /tmp/fsck.log
mount -t ext4 -o ro "$dev" /mnt || result "\"ok\":false,$common,\"boot\":\"again\",\"fs\":\"$fs\",\"fsck_rc\":$fsck_rc,\"error\":\"mount failed\""
sums_ok=false
(cd /mnt && sha256sum -c SHA256SUMS) >/tmp/sums.log 2>&1 && sums_ok=true
sed 's/^/VFDIRECT-SHA256 /' /tmp/sums.log
marker="$(head -n1 /mnt/marker.txt | sed 's/:0$//')"
sums="$(awk '{ printf "\"%s\":\"%s\",", $2, $1 }' /mnt/SHA256SUMS | sed 's/,$//')"
umount /mnt
ok=false
[ "$match" = true ] && [ "$fsck_rc" = 0 ] && [ "$sums_ok" = true ] && ok=true
result "\"ok\":$ok,$common,\"boot\":\"again\",\"fs\":\"$fs\",\"device\":\"$dev\",\"fsck_rc\":$fsck_rc,\"checksums_ok\":$sums_ok,\"marker\":\"$marker\",\"sha256\":{$sums}"
