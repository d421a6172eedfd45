// SPDX-License-Identifier: GPL-2.0-only
/*
 * dynamos edition runtime: updating the updater.
 *
 * Every update registers, per function, the descriptor now serving it: a livepatch shadow
 * variable keyed by a constant and the function's control directory name, so it outlives
 * the module that wrote it. An update loaded with takeover (a replacing, cumulative one)
 * starts from its predecessor's route and retired editions, counts the predecessor's calls
 * in while both serve (during the transition), and folds its totals in once the transition
 * is over. The registry entry records the runtime version of its owner: only descriptors of
 * versions this runtime knows are read.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/bits.h>
#include <linux/jhash.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/mutex.h>
#include <linux/string.h>
#include "dynamos_internal.h"

/* The registry's shadow variables: a constant never dereferenced, ids apart from authors'. */
#define REGISTRY_OBJ ((void *)0x64796e616d6f7331UL)
#define REGISTRY_ID_BASE 0x6479000000000000UL

/* Layout shared by every runtime version: never change it. */
struct dynamos_registration {
	unsigned int version;			/* DYNAMOS_RUNTIME_VERSION of the owner */
	struct dynamos_function *owner;
};

static unsigned long registry_id(const struct dynamos_function *fn)
{
	return REGISTRY_ID_BASE | jhash(fn->dir, strlen(fn->dir), 0);
}

static struct dynamos_registration *registration(const struct dynamos_function *fn)
{
	return klp_shadow_get(REGISTRY_OBJ, registry_id(fn));
}

/* Start from the route of the update now serving this function (its editions permitting). */
void dynamos_take_over(struct dynamos_function *fn, struct dynamos_route *route)
{
	struct dynamos_registration *reg = registration(fn);
	struct dynamos_function *pred;
	int i, kept = 0;

	if (!reg || !reg->owner || reg->version > DYNAMOS_RUNTIME_VERSION)
		return;
	pred = reg->owner;
	mutex_lock(&pred->lock);
	*route = *rcu_dereference_protected(pred->route, lockdep_is_held(&pred->lock));
	mutex_unlock(&pred->lock);
	route->handler = route->handler && fn->has_handler;
	if (route->default_edition >= fn->nr_editions)
		route->default_edition = 0;
	for (i = 0; i < route->nr_rules; i++)
		if (route->rules[i].edition < fn->nr_editions)
			route->rules[kept++] = route->rules[i];
	route->nr_rules = kept;
	fn->retired = pred->retired & (BIT(fn->nr_editions) - 1);
	fn->predecessor = pred;
	fn->predecessor_version = reg->version;
	pr_info("%s: taking over route and counters from runtime version %u\n",
		fn->name, reg->version);
}

/* Whoever serves this function now: a kernel thread it restarted onto its code is ours. */
void dynamos_note_prior(struct dynamos_function *fn)
{
	struct dynamos_registration *reg = registration(fn);

	fn->prior = reg && reg->owner != fn ? reg->owner : NULL;
	fn->prior_version = reg ? reg->version : 0;
}

int dynamos_register(struct dynamos_function *fn)
{
	struct dynamos_registration *reg;

	reg = klp_shadow_get_or_alloc(REGISTRY_OBJ, registry_id(fn), sizeof(*reg), GFP_KERNEL,
				      NULL, NULL);
	if (!reg)
		return -ENOMEM;
	WRITE_ONCE(reg->version, DYNAMOS_RUNTIME_VERSION);
	WRITE_ONCE(reg->owner, fn);
	return 0;
}

void dynamos_unregister(struct dynamos_function *fn)
{
	struct dynamos_registration *reg = registration(fn);

	if (!reg || reg->owner != fn)
		return;
	if (fn->predecessor) {
		/* A takeover that never completed (its update failed): the predecessor serves on */
		WRITE_ONCE(reg->version, fn->predecessor_version);
		WRITE_ONCE(reg->owner, fn->predecessor);
	} else {
		klp_shadow_free(REGISTRY_OBJ, registry_id(fn), NULL);
	}
}

/* After a takeover's transition no call runs in the predecessor: keep its totals, drop it. */
void dynamos_takeover_complete(struct dynamos_function **fns, int count)
{
	struct dynamos_function *fn, *pred;
	u64 entered, left;
	int i, e;

	for (i = 0; i < count; i++) {
		fn = fns[i];
		pred = fn->predecessor;
		if (!pred)
			continue;
		mutex_lock(&fn->lock);
		for (e = 0; e < fn->nr_editions && e < pred->nr_editions; e++) {
			dynamos_edition_counts(pred, e, &entered, &left);
			fn->base_entered[e] += entered;
			fn->base_left[e] += left;
		}
		fn->predecessor = NULL;
		mutex_unlock(&fn->lock);
	}
}
