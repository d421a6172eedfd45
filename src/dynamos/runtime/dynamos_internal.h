/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * dynamos edition runtime: what its files share with each other. Generated glue includes
 * dynamos_editions.h only.
 */
#ifndef DYNAMOS_INTERNAL_H
#define DYNAMOS_INTERNAL_H

#include "dynamos_editions.h"

/* dynamos_routes.c */
void dynamos_edition_counts(struct dynamos_function *fn, int edition, u64 *entered, u64 *left);

/* dynamos_global.c */
int dynamos_global_init(struct kobject *dir, struct dynamos_global *global,
			struct dynamos_function **fns, int count);
void dynamos_global_exit(struct kobject *dir);
bool dynamos_global_active(void);

/* dynamos_takeover.c */
void dynamos_note_prior(struct dynamos_function *fn);
void dynamos_take_over(struct dynamos_function *fn, struct dynamos_route *route);
int dynamos_register(struct dynamos_function *fn);
void dynamos_unregister(struct dynamos_function *fn);

#endif /* DYNAMOS_INTERNAL_H */
