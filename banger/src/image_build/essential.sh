# banger image build: runs in mmdebstrap's essential hook, before the kernel is installed, so
# that the initrd the kernel's package makes holds what a Firecracker guest needs.
# $1 is the root being built.
set -eu
mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d"
printf 'MODULES=list\nCOMPRESS=gzip\n' > "$1/etc/initramfs-tools/conf.d/banger.conf"
# Loaded at boot by the initrd, in this order. Debian's kernel has these as modules: virtio-mmio
# (Firecracker's transport), virtio-pci (qemu's), the block and network devices, vsock, ext4.
printf '%s\n' virtio_mmio virtio_pci virtio_blk virtio_net vsock vmw_vsock_virtio_transport ext4 \
  > "$1/usr/share/initramfs-tools/modules.d/banger"
