/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * dynamos shadow data: new fields for existing kernel objects, without changing their layout.
 *
 * An update's C includes this header (dynamos puts it on the include path) and keeps
 * per-object data keyed by the object's address and a number the update chooses. These are
 * thin wrappers over livepatch's shadow variables (Documentation/livepatch/shadow-vars.rst),
 * which do the work: a hash table under a spinlock, safe from any context that may allocate
 * with the given gfp flags.
 *
 *   dynamos_shadow_get(obj, id)               the data, or NULL
 *   dynamos_shadow_get_or_zalloc(obj, id, size, gfp)   created zeroed on first use
 *   dynamos_shadow_free(obj, id)              when the object goes away
 *   dynamos_shadow_free_all(id)               when the update goes away (a post_unpatch hook)
 *
 * dynamos_shadow_live(id) counts the live shadows of an id (0..7), for leak checks. The counts
 * are themselves a shadow variable, so like the shadows they outlive the module: a cumulative
 * update that takes the shadows over (same klp_state) goes on with the same counts.
 */
#ifndef DYNAMOS_SHADOW_H
#define DYNAMOS_SHADOW_H

#include <linux/atomic.h>
#include <linux/livepatch.h>

#define DYNAMOS_SHADOW_IDS 8	/* ids 0..7 are counted */

static inline void *dynamos_shadow_get(void *obj, unsigned long id)
{
	return klp_shadow_get(obj, id);
}

void *dynamos_shadow_get_or_zalloc(void *obj, unsigned long id, size_t size, gfp_t gfp);
void dynamos_shadow_free(void *obj, unsigned long id);
void dynamos_shadow_free_all(unsigned long id);
long dynamos_shadow_live(unsigned long id);

#endif /* DYNAMOS_SHADOW_H */
