# banger image build: runs in mmdebstrap's customize hook, in its namespace (where the root's
# files are owned by uid 0), after every package is installed. $1 is the root being built.
# It leaves in $1/.banger-out: vmlinuz, initrd.img and rootfs.ext4 (made with mkfs.ext4 -d, so
# owners and modes are those seen here), for mmdebstrap's download hooks to hand out.
set -eu
root=$1
out=$root/.banger-out
mkdir -p "$out"

# The guest's network comes from the kernel's ip= argument, applied in userspace: Debian's kernel
# ignores it (its NIC driver is a module). systemd-network-generator turns it into a .network
# file, systemd-networkd applies it. bangerd's command line keeps the kernel's interface names
# (net.ifnames=0), so eth0 is the interface ip= names.
chroot "$root" systemctl enable systemd-networkd.service systemd-network-generator.service
chroot "$root" systemctl enable ssh.service

# Nothing of this host and nothing shared between VMs: no SSH host keys (banger writes one per
# VM), an empty machine-id (systemd makes one at first boot), a neutral hostname and hosts file,
# no resolv.conf (banger writes the host's resolvers per VM).
rm -f "$root"/etc/ssh/ssh_host_*
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id" "$root/etc/resolv.conf"
echo localhost > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"
printf '/dev/vda\t/\text4\tdefaults\t0\t1\n' > "$root/etc/fstab"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
rm -f "$root"/var/log/*.log "$root"/var/log/apt/*

# The kernel and initrd boot from outside the root.
for f in "$root"/boot/vmlinuz-*; do mv "$f" "$out/vmlinuz"; done
for f in "$root"/boot/initrd.img-*; do mv "$f" "$out/initrd.img"; done
rm -f "$root/vmlinuz" "$root/vmlinuz.old" "$root/initrd.img" "$root/initrd.img.old"

# mkfs.ext4 -d copies a directory tree. $root has mmdebstrap's mounts (proc, sys, dev) and its
# temporary files (tmp), so the tree is first moved aside without them (renames, no copy), then
# moved back for mmdebstrap to finish.
stage=$root/.banger-stage
mkdir "$stage"
for entry in "$root"/*; do
  name=${entry##*/}
  case $name in
    proc|sys) mkdir -m 0555 "$stage/$name" ;;
    dev) mkdir -m 0755 "$stage/$name" ;;
    tmp) mkdir -m 1777 "$stage/$name" ;;
    *) mv "$entry" "$stage/" ;;
  esac
done
used_mib=$(du -s -m "$stage" | cut -f1)
size_mib=$((used_mib + used_mib / 2 + 256))
status=0
mkfs.ext4 -q -F -L banger-root -d "$stage" "$out/rootfs.ext4" "${size_mib}M" || status=$?
for entry in "$stage"/*; do
  name=${entry##*/}
  case $name in
    proc|sys|dev|tmp) rmdir "$entry" ;;
    *) mv "$entry" "$root/" ;;
  esac
done
rmdir "$stage"
exit "$status"
