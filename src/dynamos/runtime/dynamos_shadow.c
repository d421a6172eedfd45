// SPDX-License-Identifier: GPL-2.0-only
/* dynamos shadow data: the live counts behind dynamos_shadow.h, compiled into updates using it. */
#include "dynamos_shadow.h"

atomic_long_t dynamos_shadow_count[DYNAMOS_SHADOW_IDS];

void dynamos_shadow_free_all(unsigned long id)
{
	klp_shadow_free_all(id, NULL);
	if (id < DYNAMOS_SHADOW_IDS)
		atomic_long_set(&dynamos_shadow_count[id], 0);
}
