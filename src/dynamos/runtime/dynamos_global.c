// SPDX-License-Identifier: GPL-2.0-only
/*
 * dynamos edition runtime: the global consistency switch (see struct dynamos_global).
 *
 * A write of "new TIMEOUT_MS" or "old TIMEOUT_MS" to /sys/module/<update>/dynamos/global
 * prepares a route for every function, then stops every CPU and, if no call is in flight in
 * any edition of the update, runs the author's transfer hook and publishes the routes. A busy
 * attempt is retried with a backoff doubling up to 64 ms until the timeout has passed.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/delay.h>
#include <linux/jiffies.h>
#include <linux/kernel.h>
#include <linux/minmax.h>
#include <linux/mutex.h>
#include <linux/slab.h>
#include <linux/stop_machine.h>
#include <linux/sysfs.h>
#include "dynamos_internal.h"

#define GLOBAL_BACKOFF_MAX_MS 64U

/* Set while the update has global consistency: its functions and the switch's state. */
static struct dynamos_global *dynamos_global;
static struct dynamos_function **global_fns;
static int global_count;

bool dynamos_global_active(void)
{
	return dynamos_global;
}

struct global_switch {
	bool to_new;
	struct dynamos_route **routes;	/* prepared for each function, published by the switch */
	u64 check_ns;
};

static s64 edition_in_flight(struct dynamos_function *fn, int edition)
{
	u64 entered, left;

	dynamos_edition_counts(fn, edition, &entered, &left);
	return entered - left;
}

/* Whether a call is in flight in any edition of the update; if so, g->last_busy says where. */
static bool calls_in_flight(struct dynamos_global *g)
{
	struct dynamos_function *fn;
	s64 busy;
	int i, e;

	for (i = 0; i < global_count; i++) {
		fn = global_fns[i];
		for (e = 0; e < fn->nr_editions; e++) {
			busy = edition_in_flight(fn, e);
			if (!busy)
				continue;
			snprintf(g->last_busy, sizeof(g->last_busy),
				 "%s edition %d: %lld call(s) in flight", fn->name, e, busy);
			return true;
		}
	}
	return false;
}

/*
 * With every other CPU stopped, interrupts off: no task can be between choosing an edition
 * and counting itself in (that window runs with preemption disabled), so an in-flight count
 * of zero everywhere means no task is inside any edition of the update, the kernel's code
 * reached as edition 0 included: livepatch's completed transition sends every call through
 * a dispatcher.
 */
static int global_switch_stopped(void *data)
{
	struct global_switch *sw = data;
	struct dynamos_global *g = dynamos_global;
	struct dynamos_route *old;
	u64 start = local_clock();
	int i;

	if (calls_in_flight(g))
		return -EBUSY;
	if (g->transfer)
		g->transfer(sw->to_new);
	for (i = 0; i < global_count; i++) {
		old = rcu_dereference_protected(global_fns[i]->route, true);
		rcu_assign_pointer(global_fns[i]->route, sw->routes[i]);
		sw->routes[i] = old;	/* freed by the caller after a grace period */
	}
	sw->check_ns = local_clock() - start;
	return 0;
}

/* Each function's route as it is, its default turned to the side the switch goes to. */
static int prepare_routes(struct global_switch *sw)
{
	struct dynamos_function *fn;
	int i;

	for (i = 0; i < global_count; i++) {
		fn = global_fns[i];
		sw->routes[i] = kmalloc(sizeof(*sw->routes[i]), GFP_KERNEL);
		if (!sw->routes[i])
			return -ENOMEM;
		mutex_lock(&fn->lock);
		*sw->routes[i] = *rcu_dereference_protected(fn->route, lockdep_is_held(&fn->lock));
		mutex_unlock(&fn->lock);
		sw->routes[i]->default_edition = sw->to_new ? fn->global_edition : 0;
	}
	return 0;
}

/* Stop the machine until the switch is made or @timeout_ms has passed. */
static int switch_stopped(struct global_switch *sw, unsigned int timeout_ms)
{
	unsigned long deadline = jiffies + msecs_to_jiffies(timeout_ms);
	struct dynamos_global *g = dynamos_global;
	unsigned int backoff_ms = 1;
	u64 start, took;
	int i, err;

	for (i = 0; i < global_count; i++)
		mutex_lock(&global_fns[i]->lock);	/* no route writer may race the switch */
	for (;;) {
		start = local_clock();
		g->attempts++;
		err = stop_machine(global_switch_stopped, sw, NULL);
		took = local_clock() - start;
		g->last_stop_ns = took;
		g->longest_stop_ns = max(g->longest_stop_ns, took);
		if (err != -EBUSY || time_after(jiffies, deadline))
			break;
		msleep(backoff_ms);
		backoff_ms = min(backoff_ms * 2, GLOBAL_BACKOFF_MAX_MS);
	}
	for (i = global_count - 1; i >= 0; i--)
		mutex_unlock(&global_fns[i]->lock);
	return err;
}

static int global_switch(bool to_new, unsigned int timeout_ms)
{
	struct global_switch sw = { .to_new = to_new };
	struct dynamos_global *g = dynamos_global;
	int i, err;

	if (g->on_new == to_new)
		return 0;
	sw.routes = kcalloc(global_count, sizeof(*sw.routes), GFP_KERNEL);
	if (!sw.routes)
		return -ENOMEM;
	err = prepare_routes(&sw);
	if (!err)
		err = switch_stopped(&sw, timeout_ms);
	if (!err) {
		g->on_new = to_new;
		g->switches++;
		g->longest_check_ns = max(g->longest_check_ns, sw.check_ns);
		g->last_busy[0] = 0;
		synchronize_rcu();	/* calls that began before may still read the old routes */
	}
	for (i = 0; i < global_count; i++)
		kfree(sw.routes[i]);	/* the old routes after a switch, else the unused ones */
	kfree(sw.routes);
	return err;
}

static ssize_t global_show(struct kobject *kobj, struct kobj_attribute *attr, char *buf)
{
	struct dynamos_global *g = dynamos_global;
	ssize_t len;

	mutex_lock(&g->lock);
	len = sysfs_emit(buf, "state %s\nswitches %u\nattempts %u\nlongest_stop_ns %llu\n"
			 "longest_check_ns %llu\nlast_stop_ns %llu\nlast_busy %s\n",
			 g->on_new ? "new" : "old", g->switches, g->attempts, g->longest_stop_ns,
			 g->longest_check_ns, g->last_stop_ns,
			 g->last_busy[0] ? g->last_busy : "-");
	mutex_unlock(&g->lock);
	return len;
}

static ssize_t global_store(struct kobject *kobj, struct kobj_attribute *attr, const char *buf,
			    size_t count)
{
	unsigned int timeout_ms;
	char side[8];
	int err;

	if (sscanf(buf, "%7s %u", side, &timeout_ms) != 2 ||
	    (strcmp(side, "new") && strcmp(side, "old")))
		return -EINVAL;
	mutex_lock(&dynamos_global->lock);
	err = global_switch(!strcmp(side, "new"), timeout_ms);
	mutex_unlock(&dynamos_global->lock);
	return err ? err : count;
}

/* The attribute's name is the control file's name (mirrored in abi.py). */
static struct kobj_attribute global_attr = __ATTR_RW_MODE(global, 0600);

int dynamos_global_init(struct kobject *dir, struct dynamos_global *global,
			struct dynamos_function **fns, int count)
{
	mutex_init(&global->lock);
	dynamos_global = global;
	global_fns = fns;
	global_count = count;
	return sysfs_create_file(dir, &global_attr.attr);
}

/* Once the control file is gone (no reader left), forget the switch. */
void dynamos_global_exit(struct kobject *dir)
{
	if (!dynamos_global)
		return;
	sysfs_remove_file(dir, &global_attr.attr);
	dynamos_global = NULL;
	global_fns = NULL;
	global_count = 0;
}
