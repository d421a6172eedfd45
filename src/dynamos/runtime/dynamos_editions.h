/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * dynamos edition runtime: several editions of one kernel function live at once.
 *
 * Livepatch redirects the kernel function to a generated dispatcher; the dispatcher asks the
 * function's route which edition serves this call, counts the call, runs the edition and
 * counts it out again. Edition 0 is the kernel's own code, entered past its ftrace call site.
 *
 * The fast path takes no lock, allocates nothing and never sleeps: the route is an immutable
 * snapshot replaced whole under RCU, and counters are per CPU. A call picks its edition with
 * preemption disabled and marks itself in flight before preemption is enabled again, so once
 * a writer has published a new route and waited one RCU grace period, every call that could
 * still pick an old edition is visible in that edition's in-flight count.
 *
 * This header is the runtime's interface: to the generated glue of an update, and to
 * dynamos' Python (src/dynamos/abi.py mirrors the limits below and the control files'
 * names; a unit test holds the two equal). The runtime itself is
 *   dynamos_routes.c    route commands, per-function control files, setup and teardown
 *   dynamos_global.c    the global consistency switch
 *   dynamos_takeover.c  the registry through which a later update takes routes over
 *   dynamos_kthread.c   restarting kernel threads onto and off the update's code
 * built as one translation unit into each update module that has a dispatcher.
 *
 * Control files (root only) live in /sys/module/<update>/dynamos/<function>/:
 *   editions   "index name calls in_flight live|retired" per edition
 *   route      the route as commands; writing one command changes it (see dynamos_routes.c)
 *   retire     write an edition index: no new call reaches it (waits one grace period)
 *   thread     for a kernel thread's main function: "on new|original", "pid N", "restarts N",
 *              "last_restart_ns N", "last_error N"
 *   latency    with monitor: "index total_ns count_bucket0 ... count_bucketN" per edition,
 *              bucket b counting calls that took [2^b, 2^(b+1)) ns (bucket 0 also holds 0 ns)
 * and, for an update with global consistency, /sys/module/<update>/dynamos/global:
 *   read       "state old|new", "switches N", "attempts N", "longest_stop_ns N",
 *              "longest_check_ns N", "last_stop_ns N", "last_busy TEXT"
 *   write      "new TIMEOUT_MS" or "old TIMEOUT_MS" (-EBUSY when in-flight calls never drained)
 *
 * The layout of struct dynamos_function and of everything it points to is ABI as well: an
 * update taking over reads its predecessor's descriptors (dynamos_takeover.c). Change a
 * layout only together with DYNAMOS_RUNTIME_VERSION.
 */
#ifndef DYNAMOS_EDITIONS_H
#define DYNAMOS_EDITIONS_H

#include <linux/types.h>
#include <linux/cpumask.h>
#include <linux/kobject.h>
#include <linux/mutex.h>
#include <linux/percpu.h>
#include <linux/preempt.h>
#include <linux/rcupdate.h>
#include <linux/sched.h>
#include <linux/sched/clock.h>
#include <linux/cgroup.h>
#include <linux/bitops.h>
#include <linux/livepatch.h>

#define DYNAMOS_RUNTIME_VERSION 2	/* 2: module and prior, for kernel-thread handover */
#define DYNAMOS_MAX_EDITIONS 16		/* edition 0 included */
#define DYNAMOS_MAX_RULES 8
#define DYNAMOS_MAX_PIDS 16
#define DYNAMOS_LATENCY_BUCKETS 40	/* 2^40 ns is 18 minutes: enough for any call */
#define DYNAMOS_SHARE_SCALE 10000	/* shares are given in basis points */
#define DYNAMOS_ASK_HANDLER (-1)	/* a route's answer: ask the adaptation handler */

#define DYNAMOS_CONTROL_DIR "dynamos"	/* under /sys/module/<update>/ */

enum dynamos_rule_kind {
	DYNAMOS_RULE_PIDS = 1,
	DYNAMOS_RULE_CGROUP,
	DYNAMOS_RULE_CPUS,
	DYNAMOS_RULE_SHARE,
};

struct dynamos_rule {
	int kind;
	int edition;
	union {
		struct {
			int count;
			pid_t ids[DYNAMOS_MAX_PIDS];
		} pids;
		struct {
			u64 id;		/* cgroup v2 id: the inode number of its directory */
			int level;	/* depth below the root cgroup */
		} cgroup;
		unsigned int share;	/* basis points of the calls */
		struct cpumask cpus;
	};
};

/* Immutable once published: a change builds a new route and swaps the pointer. */
struct dynamos_route {
	struct rcu_head rcu;
	int default_edition;
	bool handler;			/* consult the author's adaptation handler */
	int nr_rules;
	struct dynamos_rule rules[DYNAMOS_MAX_RULES];
};

struct dynamos_cpu_stats {
	/*
	 * Calls that entered and left each edition here: one increment each way, and the
	 * difference of the totals is the calls in flight (a call may leave on another CPU).
	 */
	u64 entered[DYNAMOS_MAX_EDITIONS];
	u64 left[DYNAMOS_MAX_EDITIONS];
	u64 share_seq[DYNAMOS_MAX_RULES];	/* calls each share rule saw on this CPU */
	u64 latency_ns[DYNAMOS_MAX_EDITIONS];
	u64 latency[DYNAMOS_MAX_EDITIONS][DYNAMOS_LATENCY_BUCKETS];
};

/*
 * A kernel thread whose main function the update replaces never leaves its loop, so livepatch's
 * per-task switch would wait for it for ever. Instead the update restarts it, with the author's
 * hooks: stop() stops the running thread(s) at a safe point of their loop (kthread_stop(), seen by
 * the loop's kthread_should_stop() check); transfer(to_new), if given, carries their state into
 * the form the other side expects; start(threadfn) starts them again running threadfn. On apply
 * threadfn is a copy of the function's dispatcher (not livepatch's new function, so a reversed
 * transition never waits for the thread); on revert it is edition 0, the kernel's own code. While
 * a thread runs the update's code the runtime holds a reference on the update module, so the
 * module cannot be unloaded under it even if restarting it back failed.
 */
struct dynamos_kthread {
	int (*stop)(void);
	int (*transfer)(bool to_new);	/* may be NULL */
	int (*start)(int (*threadfn)(void *data));
	int (*entry)(void *data);	/* the dispatcher's copy the restarted thread runs */
	/* runtime state */
	pid_t pid;			/* the thread that last entered the update's code */
	bool on_new;
	unsigned int restarts;
	u64 last_restart_ns;		/* stop + transfer + start */
	int last_error;
};

struct dynamos_function {
	/* set by the generated code */
	const char *name;		/* kernel function */
	const char *dir;		/* control directory name: name, or "name,sympos" */
	int nr_editions;		/* edition 0 included */
	const char *const *edition_names;
	int initial_edition;
	int global_edition;		/* with global consistency: the edition switched to */
	bool has_handler;
	bool monitor;
	void *original;			/* edition 0: "jmp <function> + <ftrace site end>" */
	unsigned int ftrace_site;	/* offset of the ftrace call site in the kernel function */
	struct dynamos_kthread *kthread; /* the function is a kernel thread's main function */
	/* runtime state */
	struct dynamos_route __rcu *route;
	unsigned long retired;		/* bit per edition; edition 0 never */
	struct dynamos_cpu_stats __percpu *stats;
	struct kobject kobj;
	struct mutex lock;		/* serialises route writers */
	bool kobj_added;
	/*
	 * Runtime takeover (a replacing update carrying a newer runtime): the descriptor this one
	 * took the route from, counted in until its calls are over; then its totals, as a base.
	 */
	struct dynamos_function *predecessor;
	unsigned int predecessor_version;
	u64 base_entered[DYNAMOS_MAX_EDITIONS];
	u64 base_left[DYNAMOS_MAX_EDITIONS];
	/*
	 * Since version 2. The update module this descriptor is in, and the registry's owner
	 * before this one (any update, replacing or not), valid until this update's pre_patch is
	 * over: a kernel thread that owner restarted onto its code is handed over then.
	 */
	struct module *module;
	struct dynamos_function *prior;
	unsigned int prior_version;
	/*
	 * A lockdep class of this function's own for @lock: the global switch holds every
	 * function's lock at once, which one shared class would report as recursive locking.
	 * Empty without CONFIG_LOCKDEP; last, and never read by another runtime version.
	 */
	struct lock_class_key lock_key;
};

static __always_inline bool dynamos_rule_matches(struct dynamos_function *fn,
						 const struct dynamos_rule *rule, int slot)
{
	struct task_struct *task = current;
	struct cgroup *cgrp;
	unsigned int share;
	u64 seq;
	int i;

	switch (rule->kind) {
	case DYNAMOS_RULE_PIDS:
		for (i = 0; i < rule->pids.count; i++)
			if (rule->pids.ids[i] == task->pid || rule->pids.ids[i] == task->tgid)
				return true;
		return false;
	case DYNAMOS_RULE_CGROUP:
		cgrp = task_dfl_cgroup(task);
		return cgrp->level >= rule->cgroup.level &&
		       cgroup_id(cgrp->ancestors[rule->cgroup.level]) == rule->cgroup.id;
	case DYNAMOS_RULE_CPUS:
		return cpumask_test_cpu(smp_processor_id(), &rule->cpus);
	case DYNAMOS_RULE_SHARE:
		/*
		 * Deterministic: call n of a CPU is taken when n * share crosses a
		 * multiple of the scale.
		 */
		share = rule->share;
		seq = this_cpu_inc_return(fn->stats->share_seq[slot]);
		return (seq * share) / DYNAMOS_SHARE_SCALE !=
		       ((seq - 1) * share) / DYNAMOS_SHARE_SCALE;
	}
	return false;
}

/* The edition the route picks for this call, or DYNAMOS_ASK_HANDLER. Preemption is off. */
static __always_inline int dynamos_route_edition(struct dynamos_function *fn)
{
	const struct dynamos_route *route = rcu_dereference_sched(fn->route);
	int i;

	for (i = 0; i < route->nr_rules; i++)
		if (dynamos_rule_matches(fn, &route->rules[i], i))
			return route->rules[i].edition;
	return route->handler ? DYNAMOS_ASK_HANDLER : route->default_edition;
}

/* Make a choice safe to run: unknown or retired editions fall back to the default, then to 0. */
static __always_inline int dynamos_settle_edition(struct dynamos_function *fn, int edition)
{
	const struct dynamos_route *route;

	if (likely(edition >= 0 && edition < fn->nr_editions && !test_bit(edition, &fn->retired)))
		return edition;
	route = rcu_dereference_sched(fn->route);
	edition = route->default_edition;
	if (edition >= 0 && edition < fn->nr_editions && !test_bit(edition, &fn->retired))
		return edition;
	return 0;
}

static __always_inline void dynamos_call_begins(struct dynamos_function *fn, int edition)
{
	this_cpu_inc(fn->stats->entered[edition]);
}

static __always_inline void dynamos_call_ends(struct dynamos_function *fn, int edition)
{
	this_cpu_inc(fn->stats->left[edition]);
}

static __always_inline void dynamos_record_latency(struct dynamos_function *fn, int edition,
						   u64 start)
{
	u64 took = local_clock() - start;
	int bucket = took ? fls64(took) - 1 : 0;

	if (bucket >= DYNAMOS_LATENCY_BUCKETS)
		bucket = DYNAMOS_LATENCY_BUCKETS - 1;
	this_cpu_add(fn->stats->latency_ns[edition], took);
	this_cpu_inc(fn->stats->latency[edition][bucket]);
}

/*
 * Global consistency: the update loads with every function on edition 0 (the kernel's code),
 * so livepatch's per-task transition changes nothing anyone can see; then one write to
 * .../dynamos/global moves every function to its new edition at one instant, with all CPUs
 * stopped, after checking that no call is in flight in any edition of the update. A busy
 * check is retried with backoff until the given timeout. The author's transfer hook runs in
 * the same instant, to convert shared data to the new editions' format (and back).
 */
struct dynamos_global {
	void (*transfer)(bool to_new);	/* may be NULL; runs with all CPUs stopped: no sleeping */
	bool on_new;			/* every function is on its global edition */
	unsigned int switches;
	unsigned int attempts;		/* stop_machine rounds, failed ones included */
	u64 longest_stop_ns;		/* whole stop_machine() call, seen by the caller */
	u64 longest_check_ns;		/* check + switch with every CPU stopped */
	u64 last_stop_ns;
	char last_busy[96];		/* what was in flight at the last failed attempt */
	struct mutex lock;
};

/* Called by the generated glue: module init and exit (dynamos_routes.c). */
int dynamos_runtime_init(struct module *mod, struct dynamos_function **fns, int count,
			 struct dynamos_global *global, bool takeover);
void dynamos_runtime_exit(struct dynamos_function **fns, int count);
/* A patched object's pre_patch: is edition 0's way into each function where it should be? */
int dynamos_check_entries(struct dynamos_function **fns, int count);
/* A patched object's post_patch: no call runs in a predecessor any more (dynamos_takeover.c). */
void dynamos_takeover_complete(struct dynamos_function **fns, int count);
/*
 * Restart the threads of those functions that are kernel threads' main functions: onto the
 * update's code (all or none: on failure the ones restarted go back), or back to the
 * kernel's (dynamos_kthread.c).
 */
int dynamos_kthreads_to_new(struct dynamos_function **fns, int count);
void dynamos_kthreads_to_original(struct dynamos_function **fns, int count,
				  struct klp_object *obj);

#endif /* DYNAMOS_EDITIONS_H */
