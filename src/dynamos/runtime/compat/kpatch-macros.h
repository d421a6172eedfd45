/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * dynamos' kpatch-macros.h: the macros patches written for kpatch-build use, with their
 * documented meaning mapped onto dynamos (written for dynamos, not kpatch's file). A patch's
 * `#include "kpatch-macros.h"` finds this one when `dynamos build --patch` compiles it.
 *
 *   KPATCH_PRE_PATCH_CALLBACK(fn)     int fn(patch_object *obj): before the object is patched
 *   KPATCH_POST_PATCH_CALLBACK(fn)    void fn(patch_object *obj): after it is patched
 *   KPATCH_PRE_UNPATCH_CALLBACK(fn)   void fn(patch_object *obj): before it is unpatched
 *   KPATCH_POST_UNPATCH_CALLBACK(fn)  void fn(patch_object *obj): after it is unpatched
 *        -> the update's livepatch callbacks (what update.toml's [hooks] gives an update source)
 *   KPATCH_IGNORE_FUNCTION(fn)        changes to fn are left out of the update
 *   KPATCH_IGNORE_SECTION(".name")    changes to what that section holds are left out
 *   KPATCH_FORCE_UNSAFE(fn)           refused at compile time: dynamos never skips livepatch's
 *                                     consistency model (see the message below)
 *   kpatch_shadow_alloc/get/free(obj, "var", ...)  -> livepatch shadow variables (klp_shadow_*),
 *                                     the id a hash of the name; klp_shadow_* itself just works
 */
#ifndef DYNAMOS_KPATCH_MACROS_H
#define DYNAMOS_KPATCH_MACROS_H

#include <linux/compiler.h>
#include <linux/gfp.h>
#include <linux/livepatch.h>
#include "dynamos_directives.h"

typedef struct klp_object patch_object;

#define KPATCH_PRE_PATCH_CALLBACK(fn)		DYNAMOS_PRE_PATCH_CALLBACK(fn)
#define KPATCH_POST_PATCH_CALLBACK(fn)		DYNAMOS_POST_PATCH_CALLBACK(fn)
#define KPATCH_PRE_UNPATCH_CALLBACK(fn)		DYNAMOS_PRE_UNPATCH_CALLBACK(fn)
#define KPATCH_POST_UNPATCH_CALLBACK(fn)	DYNAMOS_POST_UNPATCH_CALLBACK(fn)

#define KPATCH_IGNORE_FUNCTION(fn)		DYNAMOS_IGNORE_FUNCTION(fn)
#define KPATCH_IGNORE_SECTION(name)		DYNAMOS_IGNORE_SECTION(name)

#define KPATCH_FORCE_UNSAFE(fn) \
	_Static_assert(0, "KPATCH_FORCE_UNSAFE(" #fn ") has no dynamos meaning: dynamos never skips " \
		"livepatch's consistency check. Remove it. A function that never leaves a task's stack " \
		"(a kernel thread's loop) needs an update source (update.toml) with a [[kthread]] restart " \
		"or consistency = \"global\"; see the README")

/* kpatch's older shadow API named variables by string: the id is a 64-bit FNV-1a hash of the
 * name with the top bit set, so it cannot meet the small ids updates choose themselves. */
static inline unsigned long __dynamos_kpatch_shadow_id(const char *var)
{
	unsigned long hash = 0xcbf29ce484222325UL;

	while (*var)
		hash = (hash ^ (unsigned char)*var++) * 0x100000001b3UL;
	return hash | (1UL << 63);
}

/* Created zeroed on first use; an existing one is returned as it is (never a duplicate). */
static inline void *kpatch_shadow_alloc(void *obj, const char *var, size_t size, gfp_t gfp)
{
	return klp_shadow_get_or_alloc(obj, __dynamos_kpatch_shadow_id(var), size, gfp, NULL, NULL);
}

static inline void *kpatch_shadow_get(void *obj, const char *var)
{
	return klp_shadow_get(obj, __dynamos_kpatch_shadow_id(var));
}

static inline void kpatch_shadow_free(void *obj, const char *var)
{
	klp_shadow_free(obj, __dynamos_kpatch_shadow_id(var), NULL);
}

#endif /* DYNAMOS_KPATCH_MACROS_H */
