/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * dynamos build directives: what the compatibility headers (kpatch-macros.h, kpatch-syscall.h,
 * linux/livepatch_helpers.h) expand to. Each directive is a variable in a .dynamos.* section of
 * the patched object; `dynamos build --patch` reads them from the object and never carries them
 * into the update (see the special-section table, builder/elf/sections.py):
 *
 *   .dynamos.callbacks.<kind>   a pointer to a livepatch callback of the patched unit's object
 *                               (kind: pre_patch, post_patch, pre_unpatch, post_unpatch)
 *   .dynamos.ignore.functions   a pointer to a function whose change the update leaves out
 *   .dynamos.ignore.sections    the NUL-terminated name of a section whose contents it leaves out
 *
 * A callback takes livepatch's struct klp_object *, as livepatch's own callbacks do; pre_patch
 * returns 0 or a negative errno (which stops the patching), the others return nothing.
 */
#ifndef DYNAMOS_DIRECTIVES_H
#define DYNAMOS_DIRECTIVES_H

#include <linux/compiler.h>
#include <linux/livepatch.h>

typedef int (*dynamos_pre_patch_callback_t)(struct klp_object *obj);
typedef void (*dynamos_callback_t)(struct klp_object *obj);

/* Names from the function or the line, never __COUNTER__: a patch must not renumber the
 * file's own __UNIQUE_ID statics. */
#define __DYNAMOS_DIRECTIVE(kind, type, name, value) \
	static type __used __section(".dynamos." kind) name = (value)

#define DYNAMOS_PRE_PATCH_CALLBACK(fn) \
	__DYNAMOS_DIRECTIVE("callbacks.pre_patch", dynamos_pre_patch_callback_t, __dynamos_pre_patch_##fn, fn)
#define DYNAMOS_POST_PATCH_CALLBACK(fn) \
	__DYNAMOS_DIRECTIVE("callbacks.post_patch", dynamos_callback_t, __dynamos_post_patch_##fn, fn)
#define DYNAMOS_PRE_UNPATCH_CALLBACK(fn) \
	__DYNAMOS_DIRECTIVE("callbacks.pre_unpatch", dynamos_callback_t, __dynamos_pre_unpatch_##fn, fn)
#define DYNAMOS_POST_UNPATCH_CALLBACK(fn) \
	__DYNAMOS_DIRECTIVE("callbacks.post_unpatch", dynamos_callback_t, __dynamos_post_unpatch_##fn, fn)

#define DYNAMOS_IGNORE_FUNCTION(fn) \
	__DYNAMOS_DIRECTIVE("ignore.functions", void *, __dynamos_ignore_function_##fn, (void *)(fn))
#define DYNAMOS_IGNORE_SECTION(name) \
	static const char __PASTE(__dynamos_ignore_section_, __LINE__)[] __used \
		__section(".dynamos.ignore.sections") = name

#endif /* DYNAMOS_DIRECTIVES_H */
