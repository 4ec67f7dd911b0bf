#!/usr/bin/env bash
# Installs banger on a Debian or Ubuntu host with KVM, or removes what an earlier run added.
#
#   sudo ./install.sh [--user NAME] [--bin-dir DIR] [--firecracker PATH]
#   sudo ./install.sh --uninstall
#
# What it does, each step only when it is not done already (so running it again changes nothing):
#  1. Firecracker: the binary given with --firecracker, or the official release of the version
#     banger is tested against, checked against its published SHA-256 (kept in this script).
#     Without network it stops here, before changing anything, and prints the manual step.
#  2. Debian packages banger needs (apt-get), and to build it a C toolchain and libdevmapper's and
#     libclang's headers.
#  3. The binaries: from --bin-dir, or prebuilt ones next to this script, or built from this
#     checkout as the user who ran sudo (their rustup toolchain lives in their home), installed
#     to /usr/local/bin with their debug info stripped.
#  4. The group `banger` (the helper socket's group), the user in it and in `kvm`.
#  5. /etc/banger/policy.toml (packaging/policy.toml: it admits the group `banger`), unless a
#     policy is there already.
#  6. /dev/net/tun usable by every user and /dev/kvm by the group `kvm` (a udev rule where udev
#     runs; otherwise set now, until the next boot).
#  7. Subordinate uid and gid ranges for the user (`banger image build` runs mmdebstrap in a user
#     namespace).
#  8. The helper's systemd units, enabled and started when systemd runs; otherwise the command
#     that starts the helper by hand.
#
# Everything it adds is listed in /var/lib/banger-install/manifest, and --uninstall removes
# exactly that, in reverse order, putting back any file it replaced (and nothing else: your
# VMs' state under ~/.local/state/banger is yours to delete).
set -euo pipefail
umask 022

# The Firecracker release banger is tested against (banger's TESTED_FIRECRACKER_VERSION).
FIRECRACKER_VERSION=1.16.1
# The SHA-256 of each official release archive of that version, as Firecracker publishes it
# (firecracker-v1.16.1-ARCH.tgz.sha256.txt): a download must match this, not a file fetched
# from the same place as the archive. Change both together.
declare -A FIRECRACKER_SHA256=(
  [x86_64]=382a02a869e4d6d5cb14c40577f9545e8458021ea8b0b2d3fc10ec14d9c242e6
  [aarch64]=8d0e69f6d6f9a1724551f607f18504052c16c1828ee3d4d7b6e6c73380871e0e
)
GROUP=banger
PREFIX=/usr/local
BIN=$PREFIX/bin
ETC=/etc/banger
POLICY=$ETC/policy.toml
UNIT_DIR=/etc/systemd/system
UDEV_RULE=/etc/udev/rules.d/70-banger.rules
MANIFEST_DIR=${BANGER_INSTALL_STATE:-/var/lib/banger-install}
MANIFEST=$MANIFEST_DIR/manifest
HELPER_SOCKET=/run/banger/helper.sock
HELPER_STATE=/var/lib/banger-helper
# Directories the helper makes when it runs: removed on uninstall if they were not there before.
HELPER_RUNTIME=(/run/banger "$HELPER_STATE" /var/log/banger /dev/banger)
RUNTIME_PACKAGES=(iptables iproute2 e2fsprogs openssh-client mmdebstrap uidmap binutils login passwd)
BUILD_PACKAGES=(build-essential pkg-config libdevmapper-dev libclang-dev)
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

say() { printf 'install.sh: %s\n' "$*"; }
is_exe() { [[ -f $1 && -x $1 ]]; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

usage() {
  cat <<EOF
usage: sudo $0 [--user NAME] [--bin-dir DIR] [--firecracker PATH]
       sudo $0 --uninstall

  --user NAME         the user to set up (default: the user who ran sudo)
  --bin-dir DIR       install banger, bangerd and banger-helper from DIR instead of building
  --firecracker PATH  install this firecracker binary instead of downloading release v$FIRECRACKER_VERSION
  --uninstall         remove everything an earlier run added (listed in $MANIFEST)
EOF
}

user='' bin_dir='' firecracker='' uninstall=0
while (($#)); do
  case $1 in
    --user) user=${2:?--user needs a name}; shift 2 ;;
    --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift 2 ;;
    --firecracker) firecracker=${2:?--firecracker needs a path}; shift 2 ;;
    --uninstall) uninstall=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument $1" ;;
  esac
done

[[ $(id -u) == 0 ]] || die "run as root: sudo $0 $*"

# --- the manifest -----------------------------------------------------------------------------
# One record per line, fields separated by tabs: what was added, so --uninstall can remove it.
#   pkg NAME | file PATH [backup] | dir PATH | group NAME | member USER GROUP | subid FILE LINE
#   devmode PATH UID GID MODE | unit NAME | runtime PATH
record() {
  local line
  line=$(printf '%s\t' "$@")
  line=${line%$'\t'}
  mkdir -p "$MANIFEST_DIR"
  chmod 0700 "$MANIFEST_DIR"
  touch "$MANIFEST"
  grep -qxF -- "$line" "$MANIFEST" || printf '%s\n' "$line" >>"$MANIFEST"
}
recorded() { # KIND FIELD...: whether the manifest holds a record starting with these fields
  local prefix line
  prefix=$(printf '%s\t' "$@")
  prefix=${prefix%$'\t'}
  [[ -f $MANIFEST ]] || return 1
  while IFS= read -r line; do
    [[ $line == "$prefix" || $line == "$prefix"$'\t'* ]] && return 0
  done <"$MANIFEST"
  return 1
}

# Installs SRC_FILE at DEST with MODE, keeping a copy of a file that was there and not ours.
put_file() {
  local src=$1 dest=$2 mode=$3
  if [[ -e $dest ]] && ! recorded file "$dest"; then
    mkdir -p "$MANIFEST_DIR/backup$(dirname "$dest")"
    cp -a "$dest" "$MANIFEST_DIR/backup$dest"
    record file "$dest" backup
  elif ! recorded file "$dest"; then
    record file "$dest"
  fi
  install -m "$mode" "$src" "$dest.banger-new"
  mv -f "$dest.banger-new" "$dest"
}

make_dir() {
  [[ -d $1 ]] && return
  mkdir -p "$1"
  record dir "$1"
}

# --- uninstall --------------------------------------------------------------------------------
do_uninstall() {
  if [[ ! -f $MANIFEST ]]; then
    say "nothing to remove: $MANIFEST does not exist"
    return
  fi
  # A helper started by hand holds the lock of its state directory while it runs.
  local lock=$HELPER_STATE/lock holder
  if [[ ! -d /run/systemd/system && -f $lock ]] && ! flock -n "$lock" true; then
    holder=$(find /proc/[0-9]*/fd -lname "$lock" 2>/dev/null | head -1 | cut -d/ -f3) || true
    die "banger-helper runs (pid ${holder:-unknown}, holding $lock): stop it first (sudo kill ${holder:-PID}), then run $0 --uninstall again"
  fi
  # The helper's ledger names every TAP, NAT rule, loop device and dm target it holds for users'
  # VMs, and forwarding.json that it turned net.ipv4.ip_forward on: removing them now would leave
  # those kernel objects (and forwarding) with nothing that ever cleans them.
  if [[ -f $HELPER_STATE/forwarding.json ]] ||
    { [[ -f $HELPER_STATE/objects.json ]] && ! grep -Eq '"entries":[[:space:]]*\[[[:space:]]*\]' "$HELPER_STATE/objects.json"; }; then
    die "banger-helper still holds kernel objects for VMs ($HELPER_STATE/objects.json): have every user run 'banger vm delete' on their VMs (or stop them), then run $0 --uninstall again"
  fi
  local -a lines failed=()
  mapfile -t lines <"$MANIFEST"
  local i kind a b c d
  for ((i = ${#lines[@]} - 1; i >= 0; i--)); do
    IFS=$'\t' read -r kind a b c d <<<"${lines[i]}"
    case $kind in
      unit)
        systemctl disable --now "$a" >/dev/null 2>&1 || failed+=("disable $a")
        ;;
      file)
        if [[ $b == backup ]]; then
          cp -a "$MANIFEST_DIR/backup$a" "$a" || failed+=("restore $a")
        elif [[ $a == /etc/subuid || $a == /etc/subgid ]]; then
          # Made by install.sh, but other users may have ranges in it since: only an empty one goes.
          [[ -s $a ]] || rm -f "$a"
        else
          rm -f "$a"
        fi
        [[ $a == "$UDEV_RULE" ]] && udev_reload
        [[ $a == "$UNIT_DIR"/* && -d /run/systemd/system ]] && systemctl daemon-reload
        ;;
      dir) [[ ! -d $a ]] || rmdir "$a" 2>/dev/null || failed+=("remove $a (not empty)") ;;
      runtime) rm -rf "$a" ;;
      member)
        if id -nG "$a" 2>/dev/null | tr ' ' '\n' | grep -qxF -- "$b"; then
          gpasswd -d "$a" "$b" >/dev/null || failed+=("remove $a from group $b")
        fi
        ;;
      group) ! getent group "$a" >/dev/null || groupdel "$a" || failed+=("delete group $a") ;;
      subid)
        if [[ -f $a ]] && grep -qxF -- "$b" "$a"; then
          { grep -vxF -- "$b" "$a" || true; } >"$a.banger-new"
          chmod --reference="$a" "$a.banger-new" && mv -f "$a.banger-new" "$a" || failed+=("remove '$b' from $a")
        fi
        ;;
      devmode)
        if [[ -e $a ]]; then
          chown "$b:$c" "$a" && chmod "$d" "$a" || failed+=("restore owner and mode of $a")
        fi
        ;;
      pkg)
        # Removed only when nothing else goes with it (a package installed since may need it).
        if dpkg-query -W -f '${Status}' "$a" 2>/dev/null | grep -q ' installed$'; then
          if [[ $(apt-get -s remove "$a" 2>/dev/null | grep -c '^Remv ') == 1 ]]; then
            apt-get remove -y -qq "$a" >/dev/null || failed+=("apt-get remove $a")
          else
            apt-mark auto "$a" >/dev/null || failed+=("apt-mark auto $a")
            say "kept package $a: other packages need it now (marked as automatically installed)"
          fi
        fi
        ;;
      *) failed+=("unknown manifest record: ${lines[i]}") ;;
    esac
  done
  if ((${#failed[@]})); then
    printf 'install.sh: could not: %s\n' "${failed[@]}" >&2
    die "the manifest stays in $MANIFEST; fix the above and run $0 --uninstall again"
  fi
  rm -rf "$MANIFEST_DIR"
  say "removed everything install.sh had added"
}

udev_runs() { [[ -S /run/udev/control ]] && command -v udevadm >/dev/null; }
udev_reload() {
  if udev_runs; then { udevadm control --reload && udevadm trigger --subsystem-match=misc; } || true; fi
}

if ((uninstall)); then
  do_uninstall
  exit 0
fi

# --- who is being set up ----------------------------------------------------------------------
if [[ -z $user && -n ${SUDO_USER:-} && $SUDO_USER != root ]]; then
  user=$SUDO_USER
fi
if [[ -n $user ]]; then
  getent passwd "$user" >/dev/null || die "no user $user: give an existing user with --user NAME"
fi

# --- 1. Firecracker, before anything changes --------------------------------------------------
fc_version() { "$1" --version 2>/dev/null | sed -n 's/^Firecracker v\([0-9][0-9.]*\).*/\1/p' | head -1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fc_new='' jailer_new=''
if [[ -n $firecracker ]]; then
  is_exe "$firecracker" || die "--firecracker $firecracker is not an executable file"
  v=$(fc_version "$firecracker")
  [[ -n $v ]] || die "$firecracker --version does not print \"Firecracker vX.Y.Z\": is it firecracker?"
  [[ $v == "$FIRECRACKER_VERSION" ]] ||
    say "warning: $firecracker is Firecracker v$v; banger is tested against v$FIRECRACKER_VERSION"
  fc_new=$firecracker
elif [[ -x $BIN/firecracker && $(fc_version "$BIN/firecracker") == "$FIRECRACKER_VERSION" ]]; then
  say "firecracker v$FIRECRACKER_VERSION is installed already"
else
  arch=$(uname -m)
  sum=${FIRECRACKER_SHA256[$arch]:-}
  [[ -n $sum ]] ||
    die "no official Firecracker v$FIRECRACKER_VERSION release is known for $arch: build it and give it with --firecracker PATH"
  tgz=firecracker-v$FIRECRACKER_VERSION-$arch.tgz
  url=https://github.com/firecracker-microvm/firecracker/releases/download/v$FIRECRACKER_VERSION/$tgz
  if ! command -v curl >/dev/null ||
    ! curl -fsSL --connect-timeout 15 --retry 2 -o "$tmp/$tgz" "$url"; then
    cat >&2 <<EOF
install.sh: error: cannot download Firecracker v$FIRECRACKER_VERSION from
  $url
Nothing was changed. On a machine with network, fetch and check the release:
  curl -fLO $url
  echo '$sum  $tgz' | sha256sum -c
  tar -xzf $tgz
copy release-v$FIRECRACKER_VERSION-$arch/firecracker-v$FIRECRACKER_VERSION-$arch here, then run:
  sudo $0 --firecracker ./firecracker-v$FIRECRACKER_VERSION-$arch
EOF
    exit 1
  fi
  (cd "$tmp" && printf '%s  %s\n' "$sum" "$tgz" | sha256sum --quiet -c) ||
    die "$tgz does not have the SHA-256 of the official release ($sum): not installed"
  tar -xzf "$tmp/$tgz" -C "$tmp"
  fc_new=$tmp/release-v$FIRECRACKER_VERSION-$arch/firecracker-v$FIRECRACKER_VERSION-$arch
  jailer_new=$tmp/release-v$FIRECRACKER_VERSION-$arch/jailer-v$FIRECRACKER_VERSION-$arch
  [[ -x $fc_new ]] || die "the release archive $tgz has no $fc_new"
fi

# --- 2. Debian packages -----------------------------------------------------------------------
need_build=0
if [[ -z $bin_dir ]]; then
  if is_exe "$SRC/banger" && is_exe "$SRC/bangerd" && is_exe "$SRC/banger-helper"; then
    bin_dir=$SRC
  else
    need_build=1
  fi
fi
packages=("${RUNTIME_PACKAGES[@]}")
((need_build)) && packages+=("${BUILD_PACKAGES[@]}")
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  command -v apt-get >/dev/null || die "missing packages ${missing[*]}, and no apt-get to install them"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed: check the machine's apt sources and network"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
    die "apt-get install ${missing[*]} failed"
  for p in "${missing[@]}"; do record pkg "$p"; done
fi

# --- 3. the binaries --------------------------------------------------------------------------
if ((need_build)); then
  [[ -f $SRC/Cargo.toml ]] || die "no prebuilt binaries next to $0 and no source to build: give --bin-dir DIR"
  builder=${user:-root}
  builder_home=$(getent passwd "$builder" | cut -d: -f6)
  cargo=$builder_home/.cargo/bin/cargo
  [[ -x $cargo ]] || cargo=$(runuser -u "$builder" -- bash -lc 'command -v cargo' 2>/dev/null) || true
  [[ -n $cargo && -x $cargo ]] ||
    die "no cargo for $builder: install Rust with rustup as $builder (https://rustup.rs), then run $0 again"
  target=$(stat -c %U "$SRC")
  [[ $target == "$builder" ]] ||
    die "$SRC belongs to $target, not $builder: run $0 through sudo as $target, or give --user $target"
  say "building banger as $builder (cargo build --release)"
  runuser -u "$builder" -- env HOME="$builder_home" PATH="$(dirname "$cargo"):$PATH" \
    "$cargo" build --release --locked --manifest-path "$SRC/Cargo.toml" -p banger -p banger-helper --bins ||
    die "the build failed (see above)"
  bin_dir=$SRC/target/release
fi
for b in banger bangerd banger-helper; do
  is_exe "$bin_dir/$b" || die "$bin_dir/$b is missing or not executable"
done
install_binary() { # SRC NAME: installed to $BIN/NAME with debug info stripped
  cp "$1" "$tmp/$2"
  strip --strip-debug "$tmp/$2"
  put_file "$tmp/$2" "$BIN/$2" 0755
}
for b in banger bangerd banger-helper; do install_binary "$bin_dir/$b" "$b"; done
[[ -n $fc_new ]] && install_binary "$fc_new" firecracker
[[ -n $jailer_new ]] && install_binary "$jailer_new" jailer
say "installed banger, bangerd and banger-helper to $BIN"

# --- 4. groups --------------------------------------------------------------------------------
for g in "$GROUP" kvm; do
  if ! getent group "$g" >/dev/null; then
    groupadd --system "$g"
    record group "$g"
  fi
done
new_groups=()
if [[ -n $user ]]; then
  for g in "$GROUP" kvm; do
    if ! id -nG "$user" | tr ' ' '\n' | grep -qxF "$g"; then
      usermod -aG "$g" "$user"
      record member "$user" "$g"
      new_groups+=("$g")
    fi
  done
fi

# --- 5. the policy ----------------------------------------------------------------------------
make_dir "$ETC"
if [[ ! -e $POLICY ]]; then
  put_file "$SRC/packaging/policy.toml" "$POLICY" 0644
  say "wrote $POLICY: members of group $GROUP may use the helper"
fi
"$BIN/banger-helper" policy check "$POLICY" >/dev/null || die "$POLICY is not valid (see above)"
if [[ -n $user ]] && ! "$BIN/banger-helper" policy explain "$POLICY" --user "$user" | grep -q 'may connect ('; then
  say "warning: $POLICY does not admit $user: add \"$GROUP\" to access.groups (or $user to access.users)"
fi

# --- 6. devices -------------------------------------------------------------------------------
set_device() { # PATH GROUP MODE: records the old owner and mode once, then sets them
  local dev=$1 group=$2 mode=$3
  [[ -e $dev ]] || return 0
  if [[ $(stat -c '%G %a' "$dev") != "$group $mode" ]]; then
    recorded devmode "$dev" || record devmode "$dev" "$(stat -c %u "$dev")" "$(stat -c %g "$dev")" "$(stat -c %a "$dev")"
    chgrp "$group" "$dev"
    chmod "$mode" "$dev"
  fi
}
if [[ ! -e /dev/net/tun ]]; then
  modprobe tun 2>/dev/null || true
fi
[[ -e /dev/net/tun ]] || say "warning: no /dev/net/tun: this kernel needs the tun module (CONFIG_TUN)"
[[ -e /dev/kvm ]] || say "warning: no /dev/kvm: enable virtualization in the firmware and load kvm_intel or kvm_amd"
if udev_runs; then
  make_dir "$(dirname "$UDEV_RULE")"
  cmp -s "$SRC/packaging/udev/70-banger.rules" "$UDEV_RULE" ||
    put_file "$SRC/packaging/udev/70-banger.rules" "$UDEV_RULE" 0644
  udev_reload
fi
set_device /dev/net/tun root 666
# Where /dev/kvm is open to everyone already (some distributions make it 0666), it stays so.
if [[ -e /dev/kvm && $(($(stat -c '0%a' /dev/kvm) & 8#006)) != 6 ]]; then set_device /dev/kvm kvm 660; fi
if ! udev_runs && recorded devmode; then
  say "udev does not run here: /dev/net/tun and /dev/kvm are set for this boot only; after a reboot run $0 again"
fi

# --- 7. subordinate ids -----------------------------------------------------------------------
if [[ -n $user ]]; then
  for f in /etc/subuid /etc/subgid; do
    [[ -f $f ]] || { touch "$f" && record file "$f"; }
    grep -q "^$user:" "$f" && continue
    start=$(awk -F: 'BEGIN { m = 100000 } $2 + $3 > m { m = $2 + $3 } END { print m }' "$f")
    line="$user:$start:65536"
    printf '%s\n' "$line" >>"$f"
    record subid "$f" "$line"
  done
fi

# --- 8. the helper's units --------------------------------------------------------------------
for d in "${HELPER_RUNTIME[@]}"; do
  [[ -e $d ]] || recorded runtime "$d" || record runtime "$d"
done
for u in banger-helper.socket banger-helper.service; do
  cmp -s "$SRC/packaging/$u" "$UNIT_DIR/$u" || put_file "$SRC/packaging/$u" "$UNIT_DIR/$u" 0644
done
helper_cmd="$BIN/banger-helper serve --policy $POLICY --socket $HELPER_SOCKET --state-dir $HELPER_STATE"
if [[ -d /run/systemd/system ]]; then
  systemctl daemon-reload
  if ! recorded unit banger-helper.socket; then
    systemctl enable banger-helper.socket >/dev/null
    record unit banger-helper.socket
  fi
  systemctl start banger-helper.socket
  # A helper already running keeps its old binary and policy until it restarts.
  systemctl try-restart banger-helper.service
  say "banger-helper.socket is enabled and listening on $HELPER_SOCKET"
else
  say "systemd does not run here: start the helper by hand, as root, and keep it running:"
  printf '\n    sudo %s\n\n' "$helper_cmd"
fi

# --- done -------------------------------------------------------------------------------------
if [[ -n $user ]]; then
  first="banger vm run --name demo -- cat /etc/hostname"
  if ((${#new_groups[@]})) || recorded member "$user"; then
    say "$user is in group(s) $GROUP and kvm since install.sh added them, which earlier logins lack:"
    say "log out and in again, or run commands through sudo -u $user (which reads the groups afresh):"
    printf '\n    sudo -u %s %s\n\n' "$user" "$first"
    say "(if bangerd already runs for $user, run \`banger daemon stop\` first so it restarts with the groups)"
  else
    say "ready: $first"
  fi
else
  say "no user set up: run $0 through sudo, or give --user NAME (each user needs group $GROUP and kvm)"
fi
say "check the host with: banger doctor"
