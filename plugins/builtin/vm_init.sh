#!/bin/busybox sh
# dtbuild's VM init (written into the initramfs by plugins/builtin/vm_executor.py): build one
# root layer, power off. The host puts the script's environment in place of its placeholder.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
off() { sync; umount /out 2>/dev/null; umount /job 2>/dev/null; poweroff -f; sleep 60; }
say() { echo "dtbuild-vm: $*"; }
while read -r module; do
  insmod "/modules/$module.ko" || say "cannot load the module $module"
done < /modules/order
P9="trans=virtio,version=9p2000.L,msize=262144"
# /out is the only writable share: the host reads from it only what it expects, as plain files.
mount -t 9p -o "$P9" out /out || { say "cannot mount the output directory (9p)"; off; }
status() { echo "$1 $2" > /out/status; }
fail() { say "$2"; echo "$2" > /out/message; status "$1" 1; off; }
mount -t 9p -o "$P9,ro" job /job || fail mount "cannot mount the job directory (9p)"
mount -t 9p -o "$P9,ro" lower /lower || fail mount "cannot mount the base's root file system (9p)"
mount -t 9p -o "$P9,ro" seed /seed || fail mount "cannot mount copy_to_root (9p)"
# run_as_root's toolbox (no share when the job has none).
T=.dtbuild-toolbox
mount -t 9p -o "$P9,ro" toolbox /toolbox 2>/dev/null && toolbox=yes || toolbox=""
mke2fs -q -F /dev/vda >/dev/null 2>&1 || fail mount "cannot format the VM's disk /dev/vda"
mount -t ext4 /dev/vda /disk || fail mount "cannot mount the VM's disk"
mkdir /disk/upper /disk/work /disk/merged /disk/probe /disk/check
cp -a /seed/. /disk/upper/ || fail prepare "cannot copy copy_to_root into the layer (is disk_size large enough?)"
OVERLAY="lowerdir=/lower,upperdir=/disk/upper,workdir=/disk/work,redirect_dir=nofollow,metacopy=off,index=off"
mount -t overlay overlay -o "$OVERLAY,xino=off,volatile" /disk/merged 2>/dev/null \
  || mount -t overlay overlay -o "$OVERLAY,xino=off" /disk/merged || fail mount "cannot mount the overlay"
M=/disk/merged
created=""
for d in dev proc sys; do
  if [ ! -e "$M/$d" ] && [ ! -L "$M/$d" ]; then mkdir "$M/$d"; created="$created $d"; fi
done
[ -d "$M/dev" ] && [ ! -L "$M/dev" ] && mount --bind /dev "$M/dev"
[ -d "$M/proc" ] && [ ! -L "$M/proc" ] && mount -t proc proc "$M/proc"
[ -d "$M/sys" ] && [ ! -L "$M/sys" ] && mount -t sysfs -o ro sysfs "$M/sys"
if [ -n "$toolbox" ]; then
  if [ ! -e "$M/$T" ] && [ ! -L "$M/$T" ]; then mkdir "$M/$T"; created="$created $T"; fi
  if [ -d "$M/$T" ] && [ ! -L "$M/$T" ]; then
    mount --bind /toolbox "$M/$T" && mount -o remount,bind,ro,nosuid,nodev "$M/$T" \
      || fail mount "cannot mount the toolbox"
  else
    say "/$T in the image is not a directory: run_as_root gets no toolbox"
    toolbox=""
  fi
fi
if [ -f /job/network ]; then
  ip link set lo up
  ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2 \
    || say "cannot configure the network"
fi
: > /out/log
# The image's /bin/sh, else the toolbox's.
shell=""
if [ -e "$M/bin/sh" ] || [ -L "$M/bin/sh" ]; then
  shell=/bin/sh
elif [ -n "$toolbox" ] && { [ -e "$M/$T/bin/sh" ] || [ -L "$M/$T/bin/sh" ]; }; then
  shell=/$T/bin/sh
fi
if [ -n "$shell" ]; then
  env -i @SCRIPT_ENV@ chroot "$M" "$shell" -c "set -e
$(cat /job/run_as_root.sh)" < /dev/null >> /out/log 2>&1
  rc=$?
else
  echo "dtbuild: the base image has no /bin/sh and run_as_root's toolbox has no sh: install a static busybox" \
    "on this machine (apt-get install busybox-static) or name a shell in the target's \`tools\`" >> /out/log
  rc=127
fi
for p in /proc/[0-9]*; do
  pid=${p#/proc/}
  [ "$pid" = 1 ] && continue
  [ -n "$(cat "$p/cmdline" 2>/dev/null)" ] && kill -9 "$pid" 2>/dev/null
done
sleep 0.2
for d in dev proc sys $T; do umount "$M/$d" 2>/dev/null; done
for d in $created; do rmdir "$M/$d"; done
umount "$M" || fail run_as_root "cannot unmount the overlay"
[ "$rc" = 0 ] || { status run_as_root "$rc"; off; }
if [ -s /job/extra_commands.sh ]; then
  mkdir -p /tmp/home
  (cd /disk/upper && env -i PATH=/bin HOME=/tmp/home TMPDIR=/tmp out=/disk/upper SOURCE_DATE_EPOCH=1 TZ=UTC \
    LANG=C.UTF-8 /bin/sh -c "set -e
$(cat /job/extra_commands.sh)") < /dev/null >> /out/log 2>&1
  rc=$?
  [ "$rc" = 0 ] || { status extra_commands "$rc"; off; }
fi
cd /disk/upper
find . -mindepth 1 -type d -exec sh -c \
  'for d; do mkdir -p "/disk/probe/$d" && : > "/disk/probe/$d/.dtbuild-opaque-probe" || exit 1; done' sh {} + \
  || fail pack "cannot make the opaque-directory probe"
mount -t overlay overlay -o ro,lowerdir=/disk/upper:/disk/probe /disk/check || fail pack "cannot mount the probe"
find . -mindepth 1 -type d -exec sh -c \
  'for d; do [ -e "/disk/check/$d/.dtbuild-opaque-probe" ] || printf "%s\0" "$d"; done' sh {} + > /out/opaque \
  || fail pack "cannot list the opaque directories"
umount /disk/check
cd /
tar -cf /out/upper.tar -C /disk/upper . || fail pack "cannot write the layer's directory as a tar"
status done 0
off
