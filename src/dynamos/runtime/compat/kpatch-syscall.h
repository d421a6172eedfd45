/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * dynamos' kpatch-syscall.h (written for dynamos, not kpatch's file): KPATCH_SYSCALL_DEFINEn
 * gives a syscall a replacement body. On Debian's 6.1 x86-64 kernel SYSCALL_DEFINEn makes the
 * wrappers __x64_sys_<name> and __ia32_sys_<name> around __se_sys_<name>/__do_sys_<name>, plus
 * trace metadata; these macros expand to exactly that, so the patched object keeps the kernel's
 * names and metadata, and dynamos replaces whichever of those functions the new body changes
 * (the wrappers, as __do_sys_ is inlined into them).
 */
#ifndef DYNAMOS_KPATCH_SYSCALL_H
#define DYNAMOS_KPATCH_SYSCALL_H

#include <linux/syscalls.h>

#define KPATCH_SYSCALL_DEFINE0(name)		SYSCALL_DEFINE0(name)
#define KPATCH_SYSCALL_DEFINE1(name, ...)	SYSCALL_DEFINE1(name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE2(name, ...)	SYSCALL_DEFINE2(name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE3(name, ...)	SYSCALL_DEFINE3(name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE4(name, ...)	SYSCALL_DEFINE4(name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE5(name, ...)	SYSCALL_DEFINE5(name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE6(name, ...)	SYSCALL_DEFINE6(name, __VA_ARGS__)

#endif /* DYNAMOS_KPATCH_SYSCALL_H */
