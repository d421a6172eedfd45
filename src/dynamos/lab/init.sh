#!/bin/sh
# dynamos lab init (PID 1 in the initramfs): load the virtio/9p modules of this kernel, mount the
# host's root read-only with writable tmpfs where a system needs them, then start the guest agent
# that runs commands sent by the host over virtio-serial.  Settings come from /lab.conf.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
. /lab.conf
say() { echo "dynamos-lab: $*" > /dev/kmsg; }
for m in $(cat /lib/modules/order); do
    insmod /lib/modules/$m || say "insmod $m failed"
done
say "modules loaded"
if [ -n "$ROOT_DISK" ]; then
    # A system lab (dynamos/lab/sysimage.py): the root is a Debian system on a disk image, with the
    # target's modules over 9p at /lib/modules; its own init (systemd) starts the agent.
    R=/newroot
    mount -t ext4 -o rw "$ROOT_DISK" $R || { say "cannot mount the root disk $ROOT_DISK"; poweroff -f; }
    if [ -n "$MODULES_RELEASE" ]; then
        mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose modules $R/usr/lib/modules \
            || say "cannot mount the target's modules"
    fi
    say "starting the system on $ROOT_DISK"
    umount /proc /sys
    mount -o move /dev $R/dev 2>/dev/null || umount /dev
    exec switch_root $R /sbin/init
fi
R=/newroot
if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,$ROOT_CACHE hostroot $R; then
    say "cannot mount the host root over 9p"; poweroff -f
fi
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mount -t tmpfs -o mode=1777 tmpfs $R/tmp
for d in /run /var/tmp /var/log /var/lib /var/cache; do
    [ -d $R$d ] && mount -t tmpfs -o mode=755 tmpfs $R$d
done
mount -t tmpfs tmpfs $R/dev/shm 2>/dev/null
mkdir -p $R/dev/pts; mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts 2>/dev/null
mount -t tracefs tracefs $R/sys/kernel/tracing 2>/dev/null
mount -t securityfs securityfs $R/sys/kernel/security 2>/dev/null
mount -t debugfs debugfs $R/sys/kernel/debug 2>/dev/null
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup 2>/dev/null || say "cannot mount cgroup2"
# The target's own modules at /lib/modules (see dynamos/lab/modules.py): the cache's tree over 9p
# as the read-only lower layer, a tmpfs as the upper one, so the guest may add modules and run
# depmod while the host's cache is never written.  A host without /lib/modules (a container)
# has no mount point for it: /lib then gets a tmpfs-backed overlay of its own to make one.
if [ -n "$MODULES_RELEASE" ]; then
    mkdir -p /lab/modules /lab/rw
    mount -t tmpfs -o mode=755 tmpfs /lab/rw
    mkdir -p /lab/rw/mods /lab/rw/mods.work /lab/rw/lib /lab/rw/lib.work
    if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose modules /lab/modules; then
        say "cannot mount the target's modules"
    elif [ ! -d $R/lib/modules ] && ! { mount -t overlay -o lowerdir=$R/lib,upperdir=/lab/rw/lib,workdir=/lab/rw/lib.work \
            overlay $R/lib && mkdir $R/lib/modules; }; then
        say "cannot make a mount point for /lib/modules"
    elif ! mount -t overlay -o lowerdir=/lab/modules,upperdir=/lab/rw/mods,workdir=/lab/rw/mods.work \
            overlay $R/lib/modules; then
        say "cannot mount the target's modules at /lib/modules"
    fi
fi
# Extra shares, "ro:PATH" or "rw:PATH" in mount order: the working directory and caches read-only,
# the outputs a command asked for writable; uncached so host changes show at once.
i=0
for spec in $SHARES; do
    mode=${spec%%:*}; path=${spec#*:}
    mkdir -p "$R$path" 2>/dev/null
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none,$mode share$i "$R$path" \
        || say "cannot mount share $path"
    i=$((i+1))
done
hostname dynamos-lab
# The guest's trust store: the lab key only, in the guest's own /run (never the host's /etc), so
# packages built for the lab apply there and nowhere else unless a host trusts that key.
if [ -n "$TRUST_KEYRING" ]; then
    mkdir -p $R/run/dynamos-trusted && cp "$R$TRUST_KEYRING" $R/run/dynamos-trusted/lab.gpg \
        || say "cannot install the lab key from $TRUST_KEYRING"
fi
say "agent starting"
# Commands in the guest use the host's dynamos cache (shared at the same path), and root's usual
# PATH: /bin alone (the initramfs' busybox) would hide modprobe, depmod, sysctl and the like.
export HOME=/root DYNAMOS_CACHE DYNAMOS_TRUST_STORE=/run/dynamos-trusted PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
chroot $R $AGENT_PYTHON -S -E $AGENT_PATH
say "agent exited with status $?"
poweroff -f
