/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * dynamos' linux/livepatch_helpers.h: the patch helpers of upstream klp-build (Linux 6.19+),
 * mapped onto dynamos for a 6.1 kernel that has no such header (written for dynamos).
 *
 *   KLP_PRE_PATCH_CALLBACK(fn) ... KLP_POST_UNPATCH_CALLBACK(fn)
 *        -> the update's livepatch callbacks, as KPATCH_*_CALLBACK (struct klp_object *obj)
 *   KLP_STATIC_CALL(name)   an indirect call through the static call's key (its current
 *                           function), for a key the update could not reach as a static call
 *   KLP_SYSCALL_DEFINEn     a replacement syscall body: the kernel's own SYSCALL_DEFINEn (names
 *                           __x64_sys_/__ia32_sys_/__se_sys_/__do_sys_, metadata unchanged)
 */
#ifndef DYNAMOS_LIVEPATCH_HELPERS_H
#define DYNAMOS_LIVEPATCH_HELPERS_H

#include <linux/syscalls.h>
#include <linux/livepatch.h>
#include <linux/static_call.h>
#include "../dynamos_directives.h"

#define KLP_PRE_PATCH_CALLBACK(fn)	DYNAMOS_PRE_PATCH_CALLBACK(fn)
#define KLP_POST_PATCH_CALLBACK(fn)	DYNAMOS_POST_PATCH_CALLBACK(fn)
#define KLP_PRE_UNPATCH_CALLBACK(fn)	DYNAMOS_PRE_UNPATCH_CALLBACK(fn)
#define KLP_POST_UNPATCH_CALLBACK(fn)	DYNAMOS_POST_UNPATCH_CALLBACK(fn)

#define KLP_STATIC_CALL(name) \
	((typeof(STATIC_CALL_TRAMP(name)) *)READ_ONCE(STATIC_CALL_KEY(name).func))

#define KLP_SYSCALL_DEFINE0(name)		SYSCALL_DEFINE0(name)
#define KLP_SYSCALL_DEFINE1(name, ...)		SYSCALL_DEFINE1(name, __VA_ARGS__)
#define KLP_SYSCALL_DEFINE2(name, ...)		SYSCALL_DEFINE2(name, __VA_ARGS__)
#define KLP_SYSCALL_DEFINE3(name, ...)		SYSCALL_DEFINE3(name, __VA_ARGS__)
#define KLP_SYSCALL_DEFINE4(name, ...)		SYSCALL_DEFINE4(name, __VA_ARGS__)
#define KLP_SYSCALL_DEFINE5(name, ...)		SYSCALL_DEFINE5(name, __VA_ARGS__)
#define KLP_SYSCALL_DEFINE6(name, ...)		SYSCALL_DEFINE6(name, __VA_ARGS__)

#endif /* DYNAMOS_LIVEPATCH_HELPERS_H */
