/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * dynamos shadow data: new fields for existing kernel objects, without changing their layout.
 *
 * An update's C includes "dynamos_shadow.h" (dynamos puts it on the include path) and keeps
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
 * dynamos_shadow_live(id) counts the shadows of an id this update holds, for leak checks.
 */
#ifndef DYNAMOS_SHADOW_H
#define DYNAMOS_SHADOW_H

#include <linux/atomic.h>
#include <linux/livepatch.h>

#define DYNAMOS_SHADOW_IDS 8	/* ids 0..7 are counted */

extern atomic_long_t dynamos_shadow_count[DYNAMOS_SHADOW_IDS];

static inline int dynamos_shadow_counted(void *obj, void *shadow, void *ctor_data)
{
	unsigned long id = (unsigned long)ctor_data;

	if (id < DYNAMOS_SHADOW_IDS)
		atomic_long_inc(&dynamos_shadow_count[id]);
	return 0;
}

static inline void dynamos_shadow_uncount(unsigned long id)
{
	if (id < DYNAMOS_SHADOW_IDS)
		atomic_long_dec(&dynamos_shadow_count[id]);
}

static inline void *dynamos_shadow_get(void *obj, unsigned long id)
{
	return klp_shadow_get(obj, id);
}

static inline void *dynamos_shadow_get_or_zalloc(void *obj, unsigned long id, size_t size, gfp_t gfp)
{
	void *shadow = klp_shadow_get(obj, id);

	if (shadow)
		return shadow;
	/* The allocation is zeroed by livepatch; the constructor only counts it. */
	return klp_shadow_get_or_alloc(obj, id, size, gfp, dynamos_shadow_counted, (void *)id);
}

static inline void dynamos_shadow_free(void *obj, unsigned long id)
{
	if (klp_shadow_get(obj, id)) {
		klp_shadow_free(obj, id, NULL);
		dynamos_shadow_uncount(id);
	}
}

void dynamos_shadow_free_all(unsigned long id);

static inline long dynamos_shadow_live(unsigned long id)
{
	return id < DYNAMOS_SHADOW_IDS ? atomic_long_read(&dynamos_shadow_count[id]) : -1;
}

#endif /* DYNAMOS_SHADOW_H */
