// SPDX-License-Identifier: GPL-2.0-only
/* dynamos shadow data: the helpers behind dynamos_shadow.h, compiled into updates using them. */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/slab.h>
#include "dynamos_shadow.h"

/*
 * The live counts: one shadow variable on a constant never dereferenced, with an id apart from
 * authors' (and from the edition runtime's registry).
 */
#define DYNAMOS_COUNTS_OBJ ((void *)0x64796e616d6f7332UL)
#define DYNAMOS_COUNTS_ID 0x6479736800000000UL

static atomic_long_t *counts(gfp_t gfp)
{
	atomic_long_t *found = klp_shadow_get(DYNAMOS_COUNTS_OBJ, DYNAMOS_COUNTS_ID);

	if (found || !gfp)
		return found;
	return klp_shadow_get_or_alloc(DYNAMOS_COUNTS_OBJ, DYNAMOS_COUNTS_ID,
				       sizeof(atomic_long_t) * DYNAMOS_SHADOW_IDS, gfp, NULL, NULL);
}

/* Runs under livepatch's shadow lock when the shadow is really created: count it there. */
static int count_created(void *obj, void *shadow, void *ctor_data)
{
	if (ctor_data)
		atomic_long_inc(ctor_data);
	return 0;
}

void *dynamos_shadow_get_or_zalloc(void *obj, unsigned long id, size_t size, gfp_t gfp)
{
	void *shadow = klp_shadow_get(obj, id);
	atomic_long_t *all;

	if (shadow)
		return shadow;
	all = id < DYNAMOS_SHADOW_IDS ? counts(gfp) : NULL;
	/* The allocation is zeroed by livepatch; the constructor only counts it. */
	return klp_shadow_get_or_alloc(obj, id, size, gfp, count_created, all ? &all[id] : NULL);
}

void dynamos_shadow_free(void *obj, unsigned long id)
{
	atomic_long_t *all = counts(0);

	if (klp_shadow_get(obj, id)) {
		klp_shadow_free(obj, id, NULL);
		if (all && id < DYNAMOS_SHADOW_IDS)
			atomic_long_dec(&all[id]);
	}
}

/* When no id has a live shadow left, the counts go too: nothing stays behind in the kernel. */
void dynamos_shadow_free_all(unsigned long id)
{
	atomic_long_t *all = counts(0);
	int i;

	klp_shadow_free_all(id, NULL);
	if (!all || id >= DYNAMOS_SHADOW_IDS)
		return;
	atomic_long_set(&all[id], 0);
	for (i = 0; i < DYNAMOS_SHADOW_IDS; i++)
		if (atomic_long_read(&all[i]))
			return;
	klp_shadow_free(DYNAMOS_COUNTS_OBJ, DYNAMOS_COUNTS_ID, NULL);
}

long dynamos_shadow_live(unsigned long id)
{
	atomic_long_t *all = counts(0);

	if (id >= DYNAMOS_SHADOW_IDS)
		return -1;
	return all ? atomic_long_read(&all[id]) : 0;
}
