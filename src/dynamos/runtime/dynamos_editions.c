// SPDX-License-Identifier: GPL-2.0-only
/*
 * dynamos edition runtime: control files and route changes (the fast path is in the header).
 *
 * Route commands, one per write to .../route (what `dynamos switch` writes):
 *   default E          edition E serves every call no rule takes
 *   pids E P[,P...]    calls from these pids or tgids go to E
 *   cgroup E ID LEVEL  calls from tasks in the cgroup v2 with this id (at this depth) or below
 *   cpus E LIST        calls on these CPUs ("0-1,3")
 *   share E BP         this many basis points of the calls (1/10000), spread evenly
 *   handler on|off     consult the update's adaptation handler after the rules
 *   reset              the route the update was loaded with
 * A rule replaces an earlier one of the same kind that routes to the same edition or selects
 * the same calls (the same pids, cgroup or CPUs); rules are tried in the order first given. Routing to a retired edition brings it back into service.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/sysfs.h>
#include <linux/mutex.h>
#include <linux/delay.h>
#include <linux/stop_machine.h>
#include <linux/jhash.h>
#include <linux/timekeeping.h>
#include "dynamos_editions.h"

/* The registry's shadow variables: a constant never dereferenced, and ids apart from authors'. */
#define DYNAMOS_REGISTRY_OBJ ((void *)0x64796e616d6f7331UL)
#define DYNAMOS_REGISTRY_ID(fn) (0x6479000000000000UL | jhash((fn)->dir, strlen((fn)->dir), 0))

struct dynamos_registration {
	unsigned int version;			/* DYNAMOS_RUNTIME_VERSION of the owner */
	struct dynamos_function *owner;
};

#define DYNAMOS_NOP5 "\x0f\x1f\x44\x00\x00"
#define DYNAMOS_X86_CALL 0xe8
#define DYNAMOS_X86_JMP 0xe9

static struct dynamos_global *dynamos_global;	/* set when the update has global consistency */

static struct dynamos_function *kobj_function(struct kobject *kobj)
{
	return container_of(kobj, struct dynamos_function, kobj);
}

static bool edition_is_live(struct dynamos_function *fn, int edition)
{
	return edition >= 0 && edition < fn->nr_editions && !test_bit(edition, &fn->retired);
}

/* Calls that entered and left an edition here; sums what left first, so left <= entered. */
static void edition_counts(struct dynamos_function *fn, int edition, u64 *entered, u64 *left)
{
	int cpu;

	*entered = *left = 0;
	for_each_possible_cpu(cpu)
		*left += READ_ONCE(per_cpu_ptr(fn->stats, cpu)->left[edition]);
	smp_rmb();
	for_each_possible_cpu(cpu)
		*entered += READ_ONCE(per_cpu_ptr(fn->stats, cpu)->entered[edition]);
}

/* The same, with what a taken-over predecessor counted (its totals, or its live counts). */
static void edition_totals(struct dynamos_function *fn, int edition, u64 *entered, u64 *left)
{
	struct dynamos_function *pred = fn->predecessor;
	u64 pe, pl;

	edition_counts(fn, edition, entered, left);
	*entered += fn->base_entered[edition];
	*left += fn->base_left[edition];
	if (pred && edition < pred->nr_editions) {
		edition_counts(pred, edition, &pe, &pl);
		*entered += pe;
		*left += pl;
	}
}

static ssize_t editions_show(struct kobject *kobj, struct kobj_attribute *attr, char *buf)
{
	struct dynamos_function *fn = kobj_function(kobj);
	ssize_t len = 0;
	int edition;

	mutex_lock(&fn->lock);		/* the predecessor may be folded in meanwhile */
	for (edition = 0; edition < fn->nr_editions; edition++) {
		u64 entered, left;

		edition_totals(fn, edition, &entered, &left);
		len += sysfs_emit_at(buf, len, "%d %s %llu %lld %s\n", edition, fn->edition_names[edition],
				     entered, (s64)(entered - left),
				     edition_is_live(fn, edition) ? "live" : "retired");
	}
	mutex_unlock(&fn->lock);
	return len;
}

static ssize_t latency_show(struct kobject *kobj, struct kobj_attribute *attr, char *buf)
{
	struct dynamos_function *fn = kobj_function(kobj);
	ssize_t len = 0;
	int edition, bucket, cpu;

	for (edition = 0; edition < fn->nr_editions; edition++) {
		u64 total = 0;

		for_each_possible_cpu(cpu)
			total += READ_ONCE(per_cpu_ptr(fn->stats, cpu)->latency_ns[edition]);
		len += sysfs_emit_at(buf, len, "%d %llu", edition, total);
		for (bucket = 0; bucket < DYNAMOS_LATENCY_BUCKETS; bucket++) {
			u64 count = 0;

			for_each_possible_cpu(cpu)
				count += READ_ONCE(per_cpu_ptr(fn->stats, cpu)->latency[edition][bucket]);
			len += sysfs_emit_at(buf, len, " %llu", count);
		}
		len += sysfs_emit_at(buf, len, "\n");
	}
	return len;
}

static ssize_t route_show(struct kobject *kobj, struct kobj_attribute *attr, char *buf)
{
	struct dynamos_function *fn = kobj_function(kobj);
	const struct dynamos_route *route;
	ssize_t len = 0;
	int i, j;

	mutex_lock(&fn->lock);
	route = rcu_dereference_protected(fn->route, lockdep_is_held(&fn->lock));
	len += sysfs_emit_at(buf, len, "default %d\n", route->default_edition);
	if (fn->has_handler)
		len += sysfs_emit_at(buf, len, "handler %s\n", route->handler ? "on" : "off");
	for (i = 0; i < route->nr_rules; i++) {
		const struct dynamos_rule *rule = &route->rules[i];

		switch (rule->kind) {
		case DYNAMOS_RULE_PIDS:
			len += sysfs_emit_at(buf, len, "pids %d ", rule->edition);
			for (j = 0; j < rule->pids.count; j++)
				len += sysfs_emit_at(buf, len, "%s%d", j ? "," : "", rule->pids.ids[j]);
			len += sysfs_emit_at(buf, len, "\n");
			break;
		case DYNAMOS_RULE_CGROUP:
			len += sysfs_emit_at(buf, len, "cgroup %d %llu %d\n", rule->edition,
					     rule->cgroup.id, rule->cgroup.level);
			break;
		case DYNAMOS_RULE_CPUS:
			len += sysfs_emit_at(buf, len, "cpus %d %*pbl\n", rule->edition,
					     cpumask_pr_args(&rule->cpus));
			break;
		case DYNAMOS_RULE_SHARE:
			len += sysfs_emit_at(buf, len, "share %d %u\n", rule->edition, rule->share);
			break;
		}
	}
	mutex_unlock(&fn->lock);
	return len;
}

static int parse_edition(struct dynamos_function *fn, const char *word, int *edition)
{
	int err = kstrtoint(word, 10, edition);

	if (err)
		return err;
	if (*edition < 0 || *edition >= fn->nr_editions) {
		pr_warn("dynamos: %s has no edition %d (it has 0..%d)\n", fn->name, *edition,
			fn->nr_editions - 1);
		return -ERANGE;
	}
	return 0;
}

static int parse_pids(char *list, struct dynamos_rule *rule)
{
	char *item;
	int err;

	rule->pids.count = 0;
	while ((item = strsep(&list, ",")) != NULL) {
		if (!*item)
			continue;
		if (rule->pids.count == DYNAMOS_MAX_PIDS)
			return -E2BIG;
		err = kstrtoint(item, 10, &rule->pids.ids[rule->pids.count]);
		if (err)
			return err;
		if (rule->pids.ids[rule->pids.count] <= 0)
			return -EINVAL;
		rule->pids.count++;
	}
	return rule->pids.count ? 0 : -EINVAL;
}

/* Parse one rule command ("pids 2 10,11") into @rule. */
static int parse_rule(struct dynamos_function *fn, char *verb, char *rest, struct dynamos_rule *rule)
{
	char *word = strsep(&rest, " ");
	char *arg;
	int err;

	memset(rule, 0, sizeof(*rule));
	if (!word || !rest)
		return -EINVAL;
	err = parse_edition(fn, word, &rule->edition);
	if (err)
		return err;
	if (!strcmp(verb, "pids")) {
		rule->kind = DYNAMOS_RULE_PIDS;
		return parse_pids(rest, rule);
	}
	if (!strcmp(verb, "cgroup")) {
		rule->kind = DYNAMOS_RULE_CGROUP;
		arg = strsep(&rest, " ");
		if (!arg || !rest)
			return -EINVAL;
		err = kstrtou64(arg, 10, &rule->cgroup.id);
		if (!err)
			err = kstrtoint(rest, 10, &rule->cgroup.level);
		return err ? err : (rule->cgroup.level < 0 ? -EINVAL : 0);
	}
	if (!strcmp(verb, "cpus")) {
		rule->kind = DYNAMOS_RULE_CPUS;
		return cpulist_parse(rest, &rule->cpus);
	}
	if (!strcmp(verb, "share")) {
		rule->kind = DYNAMOS_RULE_SHARE;
		err = kstrtouint(rest, 10, &rule->share);
		return err ? err : (rule->share > DYNAMOS_SHARE_SCALE ? -ERANGE : 0);
	}
	return -EINVAL;
}

/* Whether two rules of one kind select the same calls. */
static bool same_selector(const struct dynamos_rule *a, const struct dynamos_rule *b)
{
	switch (a->kind) {
	case DYNAMOS_RULE_PIDS:
		return a->pids.count == b->pids.count &&
		       !memcmp(a->pids.ids, b->pids.ids, a->pids.count * sizeof(pid_t));
	case DYNAMOS_RULE_CGROUP:
		return a->cgroup.id == b->cgroup.id;
	case DYNAMOS_RULE_CPUS:
		return cpumask_equal(&a->cpus, &b->cpus);
	}
	return false;
}

static void add_rule(struct dynamos_route *route, const struct dynamos_rule *rule, int *err)
{
	int i;

	for (i = 0; i < route->nr_rules; i++) {
		const struct dynamos_rule *old = &route->rules[i];

		if (old->kind == rule->kind && (old->edition == rule->edition || same_selector(old, rule))) {
			route->rules[i] = *rule;
			return;
		}
	}
	if (route->nr_rules == DYNAMOS_MAX_RULES) {
		*err = -ENOSPC;
		return;
	}
	route->rules[route->nr_rules++] = *rule;
}

static void initial_route(struct dynamos_function *fn, struct dynamos_route *route)
{
	memset(route, 0, sizeof(*route));
	route->default_edition = fn->initial_edition;
	route->handler = fn->has_handler;
}

/* Apply one command to a copy of the route and publish the copy. */
static int change_route(struct dynamos_function *fn, char *command)
{
	struct dynamos_route *old, *route;
	struct dynamos_rule rule;
	char *verb = strsep(&command, " ");
	int err = 0, edition = -1;

	route = kmalloc(sizeof(*route), GFP_KERNEL);
	if (!route)
		return -ENOMEM;
	mutex_lock(&fn->lock);
	old = rcu_dereference_protected(fn->route, lockdep_is_held(&fn->lock));
	*route = *old;
	if (!strcmp(verb, "reset") && !command) {
		initial_route(fn, route);
		edition = route->default_edition;
	} else if (!strcmp(verb, "default") && command) {
		err = parse_edition(fn, command, &edition);
		route->default_edition = edition;
	} else if (!strcmp(verb, "handler") && command && fn->has_handler) {
		if (!strcmp(command, "on") || !strcmp(command, "off"))
			route->handler = !strcmp(command, "on");
		else
			err = -EINVAL;
	} else {
		err = parse_rule(fn, verb, command, &rule);
		if (!err) {
			edition = rule.edition;
			add_rule(route, &rule, &err);
		}
	}
	if (err) {
		mutex_unlock(&fn->lock);
		kfree(route);
		return err;
	}
	if (edition > 0)
		clear_bit(edition, &fn->retired);
	rcu_assign_pointer(fn->route, route);
	mutex_unlock(&fn->lock);
	kfree_rcu(old, rcu);
	return 0;
}

static ssize_t route_store(struct kobject *kobj, struct kobj_attribute *attr, const char *buf, size_t count)
{
	struct dynamos_function *fn = kobj_function(kobj);
	char *command;
	int err;

	if (dynamos_global)
		return -EPERM;	/* its editions change together, through .../dynamos/global */
	command = kstrndup(buf, count, GFP_KERNEL);
	if (!command)
		return -ENOMEM;
	err = change_route(fn, strim(command));
	kfree(command);
	return err ? err : count;
}

static ssize_t retire_store(struct kobject *kobj, struct kobj_attribute *attr, const char *buf, size_t count)
{
	struct dynamos_function *fn = kobj_function(kobj);
	int edition, err = kstrtoint(buf, 10, &edition);

	if (err)
		return err;
	if (edition <= 0 || edition >= fn->nr_editions)
		return -ERANGE;		/* edition 0, the kernel's own code, always stays selectable */
	set_bit(edition, &fn->retired);
	/* Every call that picked the edition before the bit was seen is now counted in flight. */
	synchronize_rcu();
	return count;
}

static ssize_t thread_show(struct kobject *kobj, struct kobj_attribute *attr, char *buf)
{
	struct dynamos_kthread *k = kobj_function(kobj)->kthread;

	return sysfs_emit(buf, "on %s\npid %d\nrestarts %u\nlast_restart_ns %llu\nlast_error %d\n",
			  READ_ONCE(k->on_new) ? "new" : "original", READ_ONCE(k->pid), READ_ONCE(k->restarts),
			  READ_ONCE(k->last_restart_ns), READ_ONCE(k->last_error));
}

static struct kobj_attribute thread_attr = __ATTR(thread, 0400, thread_show, NULL);
static struct kobj_attribute editions_attr = __ATTR(editions, 0400, editions_show, NULL);
static struct kobj_attribute route_attr = __ATTR(route, 0600, route_show, route_store);
static struct kobj_attribute retire_attr = __ATTR(retire, 0200, NULL, retire_store);
static struct kobj_attribute latency_attr = __ATTR(latency, 0400, latency_show, NULL);

static struct attribute *function_attrs[] = {
	&editions_attr.attr, &route_attr.attr, &retire_attr.attr, NULL,
};

static void function_release(struct kobject *kobj)
{
	/* The function structures are static data of the update module; nothing to free here. */
}

static struct kobj_type function_ktype = {
	.release = function_release,
	.sysfs_ops = &kobj_sysfs_ops,
};

static struct kobject *dynamos_dir;
static struct dynamos_function **global_fns;
static int global_count;

static s64 edition_in_flight(struct dynamos_function *fn, int edition)
{
	u64 entered, left;

	edition_counts(fn, edition, &entered, &left);
	return entered - left;
}

struct global_switch {
	bool to_new;
	struct dynamos_route **routes;	/* prepared for each function, published by the switch */
	u64 check_ns;
};

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
	u64 start = local_clock();
	int i, e;

	for (i = 0; i < global_count; i++) {
		for (e = 0; e < global_fns[i]->nr_editions; e++) {
			s64 busy = edition_in_flight(global_fns[i], e);

			if (busy) {
				snprintf(dynamos_global->last_busy, sizeof(dynamos_global->last_busy),
					 "%s edition %d: %lld call(s) in flight", global_fns[i]->name, e, busy);
				return -EBUSY;
			}
		}
	}
	if (dynamos_global->transfer)
		dynamos_global->transfer(sw->to_new);
	for (i = 0; i < global_count; i++) {
		struct dynamos_route *old = rcu_dereference_protected(global_fns[i]->route, true);

		rcu_assign_pointer(global_fns[i]->route, sw->routes[i]);
		sw->routes[i] = old;	/* freed by the caller after a grace period */
	}
	sw->check_ns = local_clock() - start;
	return 0;
}

static int global_switch(bool to_new, unsigned int timeout_ms)
{
	struct global_switch sw = { .to_new = to_new };
	unsigned long deadline = jiffies + msecs_to_jiffies(timeout_ms);
	unsigned int backoff_ms = 1;
	int i, err;

	if (dynamos_global->on_new == to_new)
		return 0;
	sw.routes = kcalloc(global_count, sizeof(*sw.routes), GFP_KERNEL);
	if (!sw.routes)
		return -ENOMEM;
	for (i = 0; i < global_count; i++) {
		struct dynamos_function *fn = global_fns[i];

		sw.routes[i] = kmalloc(sizeof(*sw.routes[i]), GFP_KERNEL);
		if (!sw.routes[i]) {
			err = -ENOMEM;
			goto out;
		}
		mutex_lock(&fn->lock);
		*sw.routes[i] = *rcu_dereference_protected(fn->route, lockdep_is_held(&fn->lock));
		mutex_unlock(&fn->lock);
		sw.routes[i]->default_edition = to_new ? fn->global_edition : 0;
	}
	for (i = 0; i < global_count; i++)
		mutex_lock(&global_fns[i]->lock);	/* no route writer may race the switch */
	for (;;) {
		u64 start = local_clock(), took;

		dynamos_global->attempts++;
		err = stop_machine(global_switch_stopped, &sw, NULL);
		took = local_clock() - start;
		dynamos_global->last_stop_ns = took;
		dynamos_global->longest_stop_ns = max(dynamos_global->longest_stop_ns, took);
		if (err != -EBUSY || time_after(jiffies, deadline))
			break;
		msleep(backoff_ms);
		backoff_ms = min(backoff_ms * 2, 64U);
	}
	for (i = global_count - 1; i >= 0; i--)
		mutex_unlock(&global_fns[i]->lock);
	if (!err) {
		dynamos_global->on_new = to_new;
		dynamos_global->switches++;
		dynamos_global->longest_check_ns = max(dynamos_global->longest_check_ns, sw.check_ns);
		dynamos_global->last_busy[0] = 0;
		synchronize_rcu();	/* the old routes may still be read by calls that began before */
	}
out:
	for (i = 0; i < global_count; i++)
		kfree(sw.routes[i]);	/* the old routes after a switch, the unused new ones otherwise */
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
			 g->longest_check_ns, g->last_stop_ns, g->last_busy[0] ? g->last_busy : "-");
	mutex_unlock(&g->lock);
	return len;
}

static ssize_t global_store(struct kobject *kobj, struct kobj_attribute *attr, const char *buf, size_t count)
{
	char word[8];
	unsigned int timeout_ms;
	int err;

	if (sscanf(buf, "%7s %u", word, &timeout_ms) != 2 || (strcmp(word, "new") && strcmp(word, "old")))
		return -EINVAL;
	mutex_lock(&dynamos_global->lock);
	err = global_switch(!strcmp(word, "new"), timeout_ms);
	mutex_unlock(&dynamos_global->lock);
	return err ? err : count;
}

static struct kobj_attribute global_attr = __ATTR(global, 0600, global_show, global_store);

static void unregister_function(struct dynamos_function *fn);

static void free_function(struct dynamos_function *fn)
{
	unregister_function(fn);
	if (fn->kobj_added)
		kobject_put(&fn->kobj);
	fn->kobj_added = false;
	kfree(rcu_dereference_protected(fn->route, true));
	RCU_INIT_POINTER(fn->route, NULL);
	free_percpu(fn->stats);
	fn->stats = NULL;
}

/* Start from the route of the update now serving this function (its editions permitting). */
static void take_over(struct dynamos_function *fn, struct dynamos_route *route)
{
	struct dynamos_registration *reg = klp_shadow_get(DYNAMOS_REGISTRY_OBJ, DYNAMOS_REGISTRY_ID(fn));
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
	pr_info("dynamos: %s: taking over route and counters from runtime version %u\n", fn->name, reg->version);
}

static int register_function(struct dynamos_function *fn)
{
	struct dynamos_registration *reg;

	reg = klp_shadow_get_or_alloc(DYNAMOS_REGISTRY_OBJ, DYNAMOS_REGISTRY_ID(fn), sizeof(*reg), GFP_KERNEL,
				      NULL, NULL);
	if (!reg)
		return -ENOMEM;
	WRITE_ONCE(reg->version, DYNAMOS_RUNTIME_VERSION);
	WRITE_ONCE(reg->owner, fn);
	return 0;
}

static void unregister_function(struct dynamos_function *fn)
{
	struct dynamos_registration *reg = klp_shadow_get(DYNAMOS_REGISTRY_OBJ, DYNAMOS_REGISTRY_ID(fn));

	if (!reg || reg->owner != fn)
		return;
	if (fn->predecessor) {
		/* A takeover that never completed (its update failed): the predecessor serves on. */
		WRITE_ONCE(reg->version, fn->predecessor_version);
		WRITE_ONCE(reg->owner, fn->predecessor);
	} else {
		klp_shadow_free(DYNAMOS_REGISTRY_OBJ, DYNAMOS_REGISTRY_ID(fn), NULL);
	}
}

/* After a takeover's transition no call runs in the predecessor: keep its totals, drop it. */
void dynamos_takeover_complete(struct dynamos_function **fns, int count)
{
	int i, e;

	for (i = 0; i < count; i++) {
		struct dynamos_function *fn = fns[i], *pred = fn->predecessor;

		if (!pred)
			continue;
		mutex_lock(&fn->lock);
		for (e = 0; e < fn->nr_editions && e < pred->nr_editions; e++) {
			u64 entered, left;

			edition_counts(pred, e, &entered, &left);
			fn->base_entered[e] += entered;
			fn->base_left[e] += left;
		}
		fn->predecessor = NULL;
		mutex_unlock(&fn->lock);
	}
}

/* Whoever serves this function now: a kernel thread it restarted onto its code is ours to take. */
static void note_prior(struct dynamos_function *fn)
{
	struct dynamos_registration *reg = klp_shadow_get(DYNAMOS_REGISTRY_OBJ, DYNAMOS_REGISTRY_ID(fn));

	fn->prior = reg && reg->owner != fn ? reg->owner : NULL;
	fn->prior_version = reg ? reg->version : 0;
}

static int init_function(struct dynamos_function *fn, bool takeover)
{
	struct dynamos_route *route;
	int err;

	if (fn->nr_editions < 1 || fn->nr_editions > DYNAMOS_MAX_EDITIONS)
		return -EINVAL;
	mutex_init(&fn->lock);
	fn->retired = 0;
	fn->stats = alloc_percpu(struct dynamos_cpu_stats);
	route = kmalloc(sizeof(*route), GFP_KERNEL);
	if (!fn->stats || !route) {
		kfree(route);
		return -ENOMEM;
	}
	initial_route(fn, route);
	fn->predecessor = NULL;
	memset(fn->base_entered, 0, sizeof(fn->base_entered));
	memset(fn->base_left, 0, sizeof(fn->base_left));
	if (takeover)
		take_over(fn, route);
	RCU_INIT_POINTER(fn->route, route);
	note_prior(fn);
	err = register_function(fn);
	if (err)
		return err;
	err = kobject_init_and_add(&fn->kobj, &function_ktype, dynamos_dir, "%s", fn->dir);
	fn->kobj_added = true;		/* even on failure the reference must be put */
	if (!err)
		err = sysfs_create_files(&fn->kobj, (const struct attribute *const *)function_attrs);
	if (!err && fn->monitor)
		err = sysfs_create_file(&fn->kobj, &latency_attr.attr);
	if (!err && fn->kthread)
		err = sysfs_create_file(&fn->kobj, &thread_attr.attr);
	return err;
}

/* Set up every multi-edition function and its control files, before the patch is enabled. */
int dynamos_runtime_init(struct module *mod, struct dynamos_function **fns, int count,
			 struct dynamos_global *global, bool takeover)
{
	int i, err = 0;

	dynamos_dir = kobject_create_and_add("dynamos", &mod->mkobj.kobj);
	if (!dynamos_dir)
		return -ENOMEM;
	for (i = 0; i < count && !err; i++) {
		fns[i]->module = mod;
		err = init_function(fns[i], takeover);
	}
	if (err) {
		pr_err("dynamos: cannot set up editions of %s: %d\n", fns[i - 1]->name, err);
	} else if (global) {
		mutex_init(&global->lock);
		dynamos_global = global;
		global_fns = fns;
		global_count = count;
		err = sysfs_create_file(dynamos_dir, &global_attr.attr);
	}
	if (err)
		dynamos_runtime_exit(fns, count);
	return err;
}

void dynamos_runtime_exit(struct dynamos_function **fns, int count)
{
	int i;

	for (i = 0; i < count; i++)
		free_function(fns[i]);
	kobject_put(dynamos_dir);
	dynamos_dir = NULL;
	dynamos_global = NULL;
}

/*
 * Edition 0 jumps into the kernel function just past its ftrace call site. Before the patch
 * goes live (livepatch has applied the thunks' relocations by now), check that the site is
 * where the build expected it: a 5-byte NOP, or a call when something already traces it.
 */
int dynamos_check_entries(struct dynamos_function **fns, int count)
{
	int i;

	for (i = 0; i < count; i++) {
		const u8 *thunk = fns[i]->original;
		const u8 *site;
		s32 rel;

		if (thunk[0] != DYNAMOS_X86_JMP) {
			pr_err("dynamos: edition 0 of %s: unexpected thunk\n", fns[i]->name);
			return -EINVAL;
		}
		memcpy(&rel, thunk + 1, sizeof(rel));
		site = thunk + 5 + rel - 5;
		if (site[0] != DYNAMOS_X86_CALL && memcmp(site, DYNAMOS_NOP5, 5)) {
			pr_err("dynamos: %s has no ftrace call site at offset %u (found %5ph); refusing to enter its original code\n",
			       fns[i]->name, fns[i]->ftrace_site, site);
			return -EINVAL;
		}
	}
	return 0;
}

/* The earlier update whose copy of this function the kernel thread runs now, if any. */
static struct dynamos_function *thread_holder(struct dynamos_function *fn)
{
	struct dynamos_function *prior = fn->prior;

	if (!prior || !prior->kthread || !READ_ONCE(prior->kthread->on_new))
		return NULL;
	return prior;
}

/* The thread left the earlier update's code for ours: that update lets go of it and its module. */
static void release_holder(struct dynamos_function *fn, struct dynamos_function *holder)
{
	WRITE_ONCE(holder->kthread->on_new, false);
	if (fn->prior_version >= 2) {
		pr_info("dynamos: %s: thread taken over from %s\n", fn->name, module_name(holder->module));
		module_put(holder->module);
	} else {
		pr_warn("dynamos: %s: thread taken over from an update of runtime version %u, which cannot be told to let go of its module\n",
			fn->name, fn->prior_version);
	}
}

/*
 * Move one kernel thread between the kernel's code and the update's: stop it, carry its state
 * across, start it on the other side. Any failure puts it back where it was (state included)
 * and returns the error; only when even that fails is the thread left stopped, said loudly.
 * Onto the update's code, the thread may come from an earlier update's copy rather than from
 * the kernel's: it goes back there on failure, and that update lets go of it on success.
 */
static int restart_kthread(struct dynamos_function *fn, bool to_new)
{
	struct dynamos_kthread *k = fn->kthread;
	struct dynamos_function *holder = to_new ? thread_holder(fn) : NULL;
	int (*there)(void *) = to_new ? k->entry : (int (*)(void *))fn->original;
	int (*back)(void *) = !to_new ? k->entry : holder ? holder->kthread->entry : (int (*)(void *))fn->original;
	const char *side = to_new ? "the update's edition" : "the kernel's code";
	const char *from = !to_new ? "the update's edition" : holder ? "the earlier update's copy" : "the kernel's code";
	u64 t0 = ktime_get_ns();
	int err, undo;

	if (k->on_new == to_new)
		return 0;
	err = k->stop();
	if (err) {
		pr_err("dynamos: %s: the thread's stop hook failed (%d); it keeps running %s\n", fn->name, err, from);
		goto out;
	}
	if (k->transfer) {
		err = k->transfer(to_new);
		if (err) {
			pr_err("dynamos: %s: the state transfer failed (%d)\n", fn->name, err);
			goto restore;
		}
	}
	if (to_new)
		__module_get(THIS_MODULE);	/* the thread is about to run this module's code */
	err = k->start(there);
	if (!err) {
		if (!to_new)
			module_put(THIS_MODULE);
		if (holder)
			release_holder(fn, holder);
		WRITE_ONCE(k->on_new, to_new);
		WRITE_ONCE(k->restarts, k->restarts + 1);
		WRITE_ONCE(k->last_restart_ns, ktime_get_ns() - t0);
		pr_info("dynamos: %s: thread restarted onto %s in %llu us\n", fn->name, side,
			(ktime_get_ns() - t0) / 1000);
		goto out;
	}
	if (to_new)
		module_put(THIS_MODULE);
	pr_err("dynamos: %s: the thread's start hook failed (%d) starting it on %s\n", fn->name, err, side);
	if (k->transfer && k->transfer(!to_new))
		pr_err("dynamos: %s: carrying the state back failed too\n", fn->name);
restore:
	undo = k->start(back);
	if (undo)
		pr_crit("dynamos: %s: the thread could not be restarted on either side (%d): it is stopped\n",
			fn->name, undo);
	else
		pr_info("dynamos: %s: thread restarted back onto %s\n", fn->name, from);
out:
	WRITE_ONCE(k->last_error, err);
	return err;
}

int dynamos_kthreads_to_new(struct dynamos_function **fns, int count)
{
	int i, err = 0;

	for (i = 0; i < count && !err; i++)
		if (fns[i]->kthread)
			err = restart_kthread(fns[i], true);
	if (err)
		for (i -= 2; i >= 0; i--)	/* the failed one has put itself back already */
			if (fns[i]->kthread)
				restart_kthread(fns[i], false);
	for (i = 0; i < count; i++)
		fns[i]->prior = NULL;	/* the earlier update may go away from now on */
	return err;
}

/*
 * Called before unpatching and again after (a reversed or cancelled transition calls only the
 * latter). When the patched module itself is going away, its exit has stopped its threads: there
 * is nothing to restart, only the module reference to drop.
 */
void dynamos_kthreads_to_original(struct dynamos_function **fns, int count, struct klp_object *obj)
{
	bool going = obj && obj->mod && obj->mod->state == MODULE_STATE_GOING;
	int i;

	for (i = count - 1; i >= 0; i--) {
		struct dynamos_kthread *k = fns[i]->kthread;

		if (!k || !k->on_new)
			continue;
		if (going) {
			WRITE_ONCE(k->on_new, false);
			module_put(THIS_MODULE);
		} else if (restart_kthread(fns[i], false)) {
			pr_err("dynamos: %s: the thread still runs this update's code; the update module stays loaded\n",
			       fns[i]->name);
		}
	}
}
