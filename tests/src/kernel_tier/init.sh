#!/bin/busybox sh
# The kernel tier's guest init (PID 1 in the initramfs). Settings come from /kernel-tier.conf,
# written for each run (see guest_init.rs). Every step that fails ends the guest with a reason
# written to the results share (when it is mounted) and the console.
/bin/busybox --install -s /bin
export PATH=/bin
. /kernel-tier.conf

say() { echo "kernel-tier: $*"; }

# Ends the guest with CODE through qemu's isa-debug-exit device (qemu exits with
# (CODE << 1) | 1); powers off if that device is missing. Never returns: PID 1 must not exit.
finish() {
  code=$1
  [ "$code" -gt 127 ] && code=127
  sync
  printf "\\$(printf %03o "$code")" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
  say "isa-debug-exit did not end the guest; powering off"
  poweroff -f
  while :; do sleep 1; done
}

fail() {
  say "guest setup failed: $*"
  if [ -n "$out_mounted" ]; then echo "$*" >/out/setup-error; fi
  finish 125
}

uptime_s() { cut -d' ' -f1 /proc/uptime; }

mount -t proc proc /proc && mount -t sysfs sysfs /sys && mount -t devtmpfs devtmpfs /dev \
  || fail "mounting /proc, /sys and /dev"
for m in $KT_INITRAMFS_MODULES; do
  insmod "/$m" || fail "insmod $m"
done

# The run's directory on the host, writable: job scripts in, statuses and logs out.
mkdir -p /out && mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 out /out \
  || fail "mounting the run's directory (9p tag out)"
out_mounted=1

# The host's root, read-only, seen writable through an overlay whose upper layer is tmpfs.
mkdir -p /host /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host \
  || fail "mounting the host's root (9p tag hostroot)"
mount -t tmpfs -o mode=0755 tmpfs /rw && mkdir /rw/upper /rw/work || fail "mounting the overlay's tmpfs"
mount -t overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
  || fail "mounting the overlay over the host's root"
n=/newroot
mount -t proc proc $n/proc && mount -t sysfs sysfs $n/sys && mount -t devtmpfs devtmpfs $n/dev \
  && mkdir -p $n/dev/pts $n/dev/shm && mount -t devpts devpts $n/dev/pts \
  && mount -t tmpfs -o mode=1777 tmpfs $n/dev/shm && mount -t tmpfs -o mode=0755 tmpfs $n/run \
  || fail "mounting /proc, /sys, /dev and /run in the root"
# /tmp stays the host's (seen through the overlay, writes kept in the guest), so that a working
# directory or a build under /tmp is there too.
mount -t cgroup2 cgroup2 $n/sys/fs/cgroup 2>/dev/null || say "no cgroup2 in the guest"
mkdir -p "$n$KT_OUT" && mount --bind /out "$n$KT_OUT" || fail "binding the run's directory at $KT_OUT"

# The kernel's modules where the shared root's modprobe looks for them. The kernel's module
# autoload runs this initramfs's /sbin/modprobe, which runs that modprobe in the root.
release=$(uname -r)
chroot $n /bin/sh -c "mkdir -p /lib/modules/$release && mount --bind '$KT_KERNEL_MODULES' /lib/modules/$release" \
  || fail "binding $KT_KERNEL_MODULES at /lib/modules/$release"
hostname kernel-tier
say "guest ready after $(uptime_s) s of guest time"

overall=0
i=1
while [ "$i" -le "$KT_JOBS" ]; do
  say "job $i starts"
  # In a mount namespace of its own whose root is the shared root itself (moved over /, as
  # switch_root does), not a chroot: the kernel refuses user namespaces to a chrooted process,
  # and the Firecracker double's guest needs them.
  env -i /bin/unshare --mount --propagation private /bin/sh -c \
    'cd "$1" && /bin/mount --move . / && exec /bin/chroot . /bin/sh "$2"' \
    job "$n" "$KT_OUT/job-$i.sh" </dev/null
  status=$?
  echo "$status" >/out/status-$i
  say "job $i exited with status $status"
  [ "$overall" -eq 0 ] && overall=$status
  i=$((i + 1))
done
finish "$overall"
