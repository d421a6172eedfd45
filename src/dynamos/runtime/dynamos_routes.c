// SPDX-License-Identifier: GPL-2.0-only
/*
 * dynamos edition runtime: route commands, the per-function control files, and setting up
 * and tearing down an update's functions. The fast path a dispatcher runs is in
 * dynamos_editions.h.
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
 * the same calls (the same pids, cgroup or CPUs); rules are tried in the order first given.
 * Routing to a retired edition brings it back into service.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/build_bug.h>
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/sysfs.h>
#include "dynamos_internal.h"

/* x86-64 instructions an ftrace call site may hold. */
#define X86_NOP5 "\x0f\x1f\x44\x00\x00"
#define X86_CALL 0xe8
#define X86_JMP 0xe9

static struct kobject *dynamos_dir;	/* /sys/module/<update>/dynamos */

static struct dynamos_function *kobj_function(struct kobject *kobj)
{
	return container_of(kobj, struct dynamos_function, kobj);
}

static bool edition_is_live(struct dynamos_function *fn, int edition)
{
	return edition >= 0 && edition < fn->nr_editions && !test_bit(edition, &fn->retired);
}

/* Calls that entered and left an edition here; sums what left first, so left <= entered. */
void dynamos_edition_counts(struct dynamos_function *fn, int edition, u64 *entered, u64 *left)
{
	u64 in = 0, out = 0;
	int cpu;

	for_each_possible_cpu(cpu)
		out += READ_ONCE(per_cpu_ptr(fn->stats, cpu)->left[edition]);
	/*
	 * Read every count out before any count in: a call is counted in before it is counted
	 * out, on x86 stores are seen in order, and a call that moved CPUs passed the
	 * scheduler's barriers in between.
	 */
	smp_rmb();
	for_each_possible_cpu(cpu)
		in += READ_ONCE(per_cpu_ptr(fn->stats, cpu)->entered[edition]);
	*entered = in;
	*left = out;
}

/* The same, with what a taken-over predecessor counted (its totals, or its live counts). */
static void edition_totals(struct dynamos_function *fn, int edition, u64 *entered, u64 *left)
{
	struct dynamos_function *pred = fn->predecessor;
	u64 pred_entered, pred_left;

	dynamos_edition_counts(fn, edition, entered, left);
	*entered += fn->base_entered[edition];
	*left += fn->base_left[edition];
	if (pred && edition < pred->nr_editions) {
		dynamos_edition_counts(pred, edition, &pred_entered, &pred_left);
		*entered += pred_entered;
		*left += pred_left;
	}
}

static ssize_t editions_show(struct kobject *kobj, struct kobj_attribute *attr, char *buf)
{
	struct dynamos_function *fn = kobj_function(kobj);
	ssize_t len = 0;
	u64 entered, left;
	int edition;

	mutex_lock(&fn->lock);		/* the predecessor may be folded in meanwhile */
	for (edition = 0; edition < fn->nr_editions; edition++) {
		edition_totals(fn, edition, &entered, &left);
		len += sysfs_emit_at(buf, len, "%d %s %llu %lld %s\n", edition,
				     fn->edition_names[edition], entered, (s64)(entered - left),
				     edition_is_live(fn, edition) ? "live" : "retired");
	}
	mutex_unlock(&fn->lock);
	return len;
}

static ssize_t latency_show(struct kobject *kobj, struct kobj_attribute *attr, char *buf)
{
	struct dynamos_function *fn = kobj_function(kobj);
	struct dynamos_cpu_stats *stats;
	int edition, bucket, cpu;
	ssize_t len = 0;
	u64 sum;

	for (edition = 0; edition < fn->nr_editions; edition++) {
		sum = 0;
		for_each_possible_cpu(cpu)
			sum += READ_ONCE(per_cpu_ptr(fn->stats, cpu)->latency_ns[edition]);
		len += sysfs_emit_at(buf, len, "%d %llu", edition, sum);
		for (bucket = 0; bucket < DYNAMOS_LATENCY_BUCKETS; bucket++) {
			sum = 0;
			for_each_possible_cpu(cpu) {
				stats = per_cpu_ptr(fn->stats, cpu);
				sum += READ_ONCE(stats->latency[edition][bucket]);
			}
			len += sysfs_emit_at(buf, len, " %llu", sum);
		}
		len += sysfs_emit_at(buf, len, "\n");
	}
	return len;
}

static ssize_t route_show(struct kobject *kobj, struct kobj_attribute *attr, char *buf)
{
	struct dynamos_function *fn = kobj_function(kobj);
	const struct dynamos_route *route;
	const struct dynamos_rule *rule;
	ssize_t len = 0;
	int i, j;

	mutex_lock(&fn->lock);
	route = rcu_dereference_protected(fn->route, lockdep_is_held(&fn->lock));
	len += sysfs_emit_at(buf, len, "default %d\n", route->default_edition);
	if (fn->has_handler)
		len += sysfs_emit_at(buf, len, "handler %s\n", route->handler ? "on" : "off");
	for (i = 0; i < route->nr_rules; i++) {
		rule = &route->rules[i];
		switch (rule->kind) {
		case DYNAMOS_RULE_PIDS:
			len += sysfs_emit_at(buf, len, "pids %d ", rule->edition);
			for (j = 0; j < rule->pids.count; j++)
				len += sysfs_emit_at(buf, len, "%s%d", j ? "," : "",
						     rule->pids.ids[j]);
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
		pr_warn("%s has no edition %d (it has 0..%d)\n", fn->name, *edition,
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

static int parse_cgroup(char *args, struct dynamos_rule *rule)
{
	char *id = strsep(&args, " ");
	int err;

	if (!id || !args)
		return -EINVAL;
	err = kstrtou64(id, 10, &rule->cgroup.id);
	if (!err)
		err = kstrtoint(args, 10, &rule->cgroup.level);
	if (!err && rule->cgroup.level < 0)
		err = -EINVAL;
	return err;
}

/* Parse one rule command ("pids 2 10,11") into @rule. */
static int parse_rule(struct dynamos_function *fn, const char *verb, char *args,
		      struct dynamos_rule *rule)
{
	char *word = strsep(&args, " ");
	int err;

	memset(rule, 0, sizeof(*rule));
	if (!word || !args)
		return -EINVAL;
	err = parse_edition(fn, word, &rule->edition);
	if (err)
		return err;
	if (!strcmp(verb, "pids")) {
		rule->kind = DYNAMOS_RULE_PIDS;
		return parse_pids(args, rule);
	}
	if (!strcmp(verb, "cgroup")) {
		rule->kind = DYNAMOS_RULE_CGROUP;
		return parse_cgroup(args, rule);
	}
	if (!strcmp(verb, "cpus")) {
		rule->kind = DYNAMOS_RULE_CPUS;
		return cpulist_parse(args, &rule->cpus);
	}
	if (!strcmp(verb, "share")) {
		rule->kind = DYNAMOS_RULE_SHARE;
		err = kstrtouint(args, 10, &rule->share);
		if (!err && rule->share > DYNAMOS_SHARE_SCALE)
			err = -ERANGE;
		return err;
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

static int add_rule(struct dynamos_route *route, const struct dynamos_rule *rule)
{
	struct dynamos_rule *old;
	int i;

	for (i = 0; i < route->nr_rules; i++) {
		old = &route->rules[i];
		if (old->kind == rule->kind &&
		    (old->edition == rule->edition || same_selector(old, rule))) {
			*old = *rule;
			return 0;
		}
	}
	if (route->nr_rules == DYNAMOS_MAX_RULES)
		return -ENOSPC;
	route->rules[route->nr_rules++] = *rule;
	return 0;
}

static void initial_route(struct dynamos_function *fn, struct dynamos_route *route)
{
	memset(route, 0, sizeof(*route));
	route->default_edition = fn->initial_edition;
	route->handler = fn->has_handler;
}

/* Apply one command to @route, a copy of the live route; the edition it routes to, if any. */
static int apply_command(struct dynamos_function *fn, struct dynamos_route *route,
			 char *command, int *edition)
{
	char *verb = strsep(&command, " ");
	struct dynamos_rule rule;
	int err;

	*edition = -1;
	if (!strcmp(verb, "reset") && !command) {
		initial_route(fn, route);
		*edition = route->default_edition;
		return 0;
	}
	if (!strcmp(verb, "default") && command) {
		err = parse_edition(fn, command, edition);
		if (!err)
			route->default_edition = *edition;
		return err;
	}
	if (!strcmp(verb, "handler") && command && fn->has_handler) {
		if (strcmp(command, "on") && strcmp(command, "off"))
			return -EINVAL;
		route->handler = !strcmp(command, "on");
		return 0;
	}
	err = parse_rule(fn, verb, command, &rule);
	if (!err)
		err = add_rule(route, &rule);
	if (!err)
		*edition = rule.edition;
	return err;
}

/* Apply one command to a copy of the route and publish the copy. */
static int change_route(struct dynamos_function *fn, char *command)
{
	struct dynamos_route *old, *route;
	int err, edition;

	route = kmalloc(sizeof(*route), GFP_KERNEL);
	if (!route)
		return -ENOMEM;
	mutex_lock(&fn->lock);
	old = rcu_dereference_protected(fn->route, lockdep_is_held(&fn->lock));
	*route = *old;
	err = apply_command(fn, route, command, &edition);
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

static ssize_t route_store(struct kobject *kobj, struct kobj_attribute *attr, const char *buf,
			   size_t count)
{
	struct dynamos_function *fn = kobj_function(kobj);
	char *command;
	int err;

	if (dynamos_global_active())
		return -EPERM;	/* its editions change together, through .../dynamos/global */
	command = kstrndup(buf, count, GFP_KERNEL);
	if (!command)
		return -ENOMEM;
	err = change_route(fn, strim(command));
	kfree(command);
	return err ? err : count;
}

static ssize_t retire_store(struct kobject *kobj, struct kobj_attribute *attr, const char *buf,
			    size_t count)
{
	struct dynamos_function *fn = kobj_function(kobj);
	int edition, err;

	err = kstrtoint(buf, 10, &edition);
	if (err)
		return err;
	if (edition <= 0 || edition >= fn->nr_editions)
		return -ERANGE;	/* edition 0, the kernel's own code, always stays selectable */
	set_bit(edition, &fn->retired);
	/* Every call that picked the edition before the bit was seen is now counted in flight. */
	synchronize_rcu();
	return count;
}

static ssize_t thread_show(struct kobject *kobj, struct kobj_attribute *attr, char *buf)
{
	struct dynamos_kthread *k = kobj_function(kobj)->kthread;

	return sysfs_emit(buf, "on %s\npid %d\nrestarts %u\nlast_restart_ns %llu\nlast_error %d\n",
			  READ_ONCE(k->on_new) ? "new" : "original", READ_ONCE(k->pid),
			  READ_ONCE(k->restarts), READ_ONCE(k->last_restart_ns),
			  READ_ONCE(k->last_error));
}

/* The attribute names are the control files' names (mirrored in abi.py). */
static struct kobj_attribute editions_attr = __ATTR_RO_MODE(editions, 0400);
static struct kobj_attribute route_attr = __ATTR_RW_MODE(route, 0600);
static struct kobj_attribute retire_attr = __ATTR_WO(retire);
static struct kobj_attribute latency_attr = __ATTR_RO_MODE(latency, 0400);
static struct kobj_attribute thread_attr = __ATTR_RO_MODE(thread, 0400);

static struct attribute *function_attrs[] = {
	&editions_attr.attr,
	&route_attr.attr,
	&retire_attr.attr,
	&latency_attr.attr,
	&thread_attr.attr,
	NULL,
};

/* latency only for a monitored function, thread only for a kernel thread's main function */
static umode_t function_attr_visible(struct kobject *kobj, struct attribute *attr, int n)
{
	struct dynamos_function *fn = kobj_function(kobj);

	if (attr == &latency_attr.attr && !fn->monitor)
		return 0;
	if (attr == &thread_attr.attr && !fn->kthread)
		return 0;
	return attr->mode;
}

static const struct attribute_group function_group = {
	.attrs = function_attrs,
	.is_visible = function_attr_visible,
};
__ATTRIBUTE_GROUPS(function);

static void function_release(struct kobject *kobj)
{
	/* The function structures are static data of the update module: nothing to free. */
}

static const struct kobj_type function_ktype = {
	.release = function_release,
	.sysfs_ops = &kobj_sysfs_ops,
	.default_groups = function_groups,
};

static void free_function(struct dynamos_function *fn)
{
	dynamos_unregister(fn);
	if (fn->kobj_added)
		kobject_put(&fn->kobj);
	fn->kobj_added = false;
	kfree(rcu_dereference_protected(fn->route, true));
	RCU_INIT_POINTER(fn->route, NULL);
	free_percpu(fn->stats);
	fn->stats = NULL;
}

static int init_function(struct dynamos_function *fn, bool takeover)
{
	struct dynamos_route *route;
	int err;

	if (fn->nr_editions < 1 || fn->nr_editions > DYNAMOS_MAX_EDITIONS)
		return -EINVAL;
	/*
	 * The key is in the update module's static data: lockdep takes such keys as they are,
	 * and the module loader forgets them when the module is freed (lockdep_free_key_range).
	 */
	__mutex_init(&fn->lock, fn->name, &fn->lock_key);
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
		dynamos_take_over(fn, route);
	RCU_INIT_POINTER(fn->route, route);
	dynamos_note_prior(fn);
	err = dynamos_register(fn);
	if (err)
		return err;
	err = kobject_init_and_add(&fn->kobj, &function_ktype, dynamos_dir, "%s", fn->dir);
	fn->kobj_added = true;		/* even on failure the reference must be put */
	return err;
}

/* Set up every multi-edition function and its control files, before the patch is enabled. */
int dynamos_runtime_init(struct module *mod, struct dynamos_function **fns, int count,
			 struct dynamos_global *global, bool takeover)
{
	int i, err = 0;

	/* fn->retired has a bit per edition */
	BUILD_BUG_ON(DYNAMOS_MAX_EDITIONS > BITS_PER_LONG);

	dynamos_dir = kobject_create_and_add(DYNAMOS_CONTROL_DIR, &mod->mkobj.kobj);
	if (!dynamos_dir)
		return -ENOMEM;
	for (i = 0; i < count && !err; i++) {
		fns[i]->module = mod;
		err = init_function(fns[i], takeover);
	}
	if (err)
		pr_err("cannot set up editions of %s: %d\n", fns[i - 1]->name, err);
	else if (global)
		err = dynamos_global_init(dynamos_dir, global, fns, count);
	if (err)
		dynamos_runtime_exit(fns, count);
	return err;
}

void dynamos_runtime_exit(struct dynamos_function **fns, int count)
{
	int i;

	for (i = 0; i < count; i++)
		free_function(fns[i]);
	dynamos_global_exit(dynamos_dir);
	kobject_put(dynamos_dir);
	dynamos_dir = NULL;
}

/*
 * Edition 0 jumps into the kernel function just past its ftrace call site. Before the patch
 * goes live (livepatch has applied the thunks' relocations by now), check that the site is
 * where the build expected it: a 5-byte NOP, or a call when something already traces it.
 */
int dynamos_check_entries(struct dynamos_function **fns, int count)
{
	const u8 *thunk, *site;
	s32 rel;
	int i;

	for (i = 0; i < count; i++) {
		thunk = fns[i]->original;
		if (thunk[0] != X86_JMP) {
			pr_err("edition 0 of %s: unexpected thunk\n", fns[i]->name);
			return -EINVAL;
		}
		memcpy(&rel, thunk + 1, sizeof(rel));
		site = thunk + 5 + rel - 5;	/* jmp's end + rel is the site's end */
		if (site[0] != X86_CALL && memcmp(site, X86_NOP5, 5)) {
			pr_err("%s has no ftrace call site at offset %u (found %5ph); refusing to enter its original code\n",
			       fns[i]->name, fns[i]->ftrace_site, site);
			return -EINVAL;
		}
	}
	return 0;
}
