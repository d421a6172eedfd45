// SPDX-License-Identifier: GPL-2.0
/*
 * An edition of kswapd that counts what it does. The loop is the kernel's reclaim protocol:
 * take the order and zone a waker asked for, doze (a short nap, then a full sleep once every
 * zone is balanced), reclaim with balance_pgdat(), and doze at the order reclaim reached.
 * mm/vmscan.c's own helpers do the work; those that are static or not exported are resolved by
 * livepatch when the update loads.
 */
#include <linux/mm.h>
#include <linux/compaction.h>
#include <linux/cpumask.h>
#include <linux/freezer.h>
#include <linux/kthread.h>
#include <linux/memory_hotplug.h>
#include <linux/mmzone.h>
#include <linux/module.h>
#include <linux/nodemask.h>
#include <linux/sched.h>
#include <linux/topology.h>
#include <linux/vmstat.h>
#include <linux/wait.h>

/* static in mm/vmscan.c */
extern bool prepare_kswapd_sleep(pg_data_t *pgdat, int order, int highest_zoneidx);
extern int balance_pgdat(pg_data_t *pgdat, int order, int highest_zoneidx);

static unsigned long wakeups, passes;
module_param(wakeups, ulong, 0444);
module_param(passes, ulong, 0444);

/* Reclaim requests pending when the threads were stopped, per node: the new threads start on them. */
static int carried_order[MAX_NUMNODES];
static int carried_zone[MAX_NUMNODES];
static nodemask_t stopped;

static unsigned int wanted_zone(pg_data_t *pgdat, unsigned int fallback)
{
	unsigned int zone = READ_ONCE(pgdat->kswapd_highest_zoneidx);

	return zone == MAX_NR_ZONES ? fallback : zone;
}

/* Sleep until woken for reclaim: first briefly, then for good once the node stays balanced. */
static void doze(pg_data_t *pgdat, int alloc_order, int reclaim_order, unsigned int zone)
{
	long left = 0;
	DEFINE_WAIT(wait);

	if (freezing(current) || kthread_should_stop())
		return;
	prepare_to_wait(&pgdat->kswapd_wait, &wait, TASK_INTERRUPTIBLE);
	if (prepare_kswapd_sleep(pgdat, reclaim_order, zone)) {
		reset_isolation_suitable(pgdat);
		wakeup_kcompactd(pgdat, alloc_order, zone);
		left = schedule_timeout(HZ / 10);
		if (left) {	/* woken early: keep the request that woke us */
			WRITE_ONCE(pgdat->kswapd_highest_zoneidx, wanted_zone(pgdat, zone));
			if (READ_ONCE(pgdat->kswapd_order) < reclaim_order)
				WRITE_ONCE(pgdat->kswapd_order, reclaim_order);
		}
		finish_wait(&pgdat->kswapd_wait, &wait);
		prepare_to_wait(&pgdat->kswapd_wait, &wait, TASK_INTERRUPTIBLE);
	}
	if (!left && prepare_kswapd_sleep(pgdat, reclaim_order, zone)) {
		/* Asleep, vmstat's per-CPU drift may be as large as normal; awake it must be small. */
		set_pgdat_percpu_threshold(pgdat, calculate_normal_threshold);
		if (!kthread_should_stop())
			schedule();
		set_pgdat_percpu_threshold(pgdat, calculate_pressure_threshold);
	} else {
		count_vm_event(left ? KSWAPD_LOW_WMARK_HIT_QUICKLY : KSWAPD_HIGH_WMARK_HIT_QUICKLY);
	}
	finish_wait(&pgdat->kswapd_wait, &wait);
}

int kswapd_counted(void *arg)
{
	pg_data_t *pgdat = arg;
	const struct cpumask *cpus = cpumask_of_node(pgdat->node_id);
	unsigned int zone = MAX_NR_ZONES - 1;
	unsigned int alloc_order, reclaim_order;
	bool thawed;

	if (!cpumask_empty(cpus))
		set_cpus_allowed_ptr(current, cpus);
	current->flags |= PF_MEMALLOC | PF_KSWAPD;	/* reclaim may dip into reserves, never recurse */
	set_freezable();
	WRITE_ONCE(pgdat->kswapd_order, carried_order[pgdat->node_id]);
	WRITE_ONCE(pgdat->kswapd_highest_zoneidx, carried_zone[pgdat->node_id]);
	carried_order[pgdat->node_id] = 0;
	carried_zone[pgdat->node_id] = MAX_NR_ZONES;
	atomic_set(&pgdat->nr_writeback_throttled, 0);

	for (;;) {
		alloc_order = reclaim_order = READ_ONCE(pgdat->kswapd_order);
		zone = wanted_zone(pgdat, zone);
again:
		doze(pgdat, alloc_order, reclaim_order, zone);
		alloc_order = READ_ONCE(pgdat->kswapd_order);
		zone = wanted_zone(pgdat, zone);
		WRITE_ONCE(pgdat->kswapd_order, 0);
		WRITE_ONCE(pgdat->kswapd_highest_zoneidx, MAX_NR_ZONES);
		thawed = try_to_freeze();
		if (kthread_should_stop())
			break;
		if (thawed)
			continue;
		WRITE_ONCE(wakeups, wakeups + 1);
		reclaim_order = balance_pgdat(pgdat, alloc_order, zone);
		WRITE_ONCE(passes, passes + 1);
		if (reclaim_order < alloc_order)
			goto again;
	}
	current->flags &= ~(PF_MEMALLOC | PF_KSWAPD);
	return 0;
}

/* Stop every node's kswapd at its loop's safe point, noting the request each had pending. */
int kswapd_restart_stop(void)
{
	int nid;

	nodes_clear(stopped);
	for_each_node_state(nid, N_MEMORY) {
		pg_data_t *pgdat = NODE_DATA(nid);

		pgdat_kswapd_lock(pgdat);
		if (pgdat->kswapd) {
			carried_order[nid] = READ_ONCE(pgdat->kswapd_order);
			carried_zone[nid] = READ_ONCE(pgdat->kswapd_highest_zoneidx);
			kthread_stop(pgdat->kswapd);
			pgdat->kswapd = NULL;
			node_set(nid, stopped);
		}
		pgdat_kswapd_unlock(pgdat);
	}
	return 0;
}

/* The kernel's kswapd starts from a clean request; the edition starts from the carried one. */
int kswapd_restart_carry(bool to_new)
{
	int nid;

	if (!to_new)
		for_each_node_mask(nid, stopped) {
			carried_order[nid] = 0;
			carried_zone[nid] = MAX_NR_ZONES;
		}
	return 0;
}

/* Start a kswapd running threadfn on every node stopped; all or none. */
int kswapd_restart_start(int (*threadfn)(void *))
{
	int nid, undo;

	for_each_node_mask(nid, stopped) {
		pg_data_t *pgdat = NODE_DATA(nid);
		struct task_struct *task = kthread_run(threadfn, pgdat, "kswapd%d", nid);

		if (IS_ERR(task)) {
			for_each_node_mask(undo, stopped) {
				if (undo == nid)
					break;
				pgdat_kswapd_lock(NODE_DATA(undo));
				kthread_stop(NODE_DATA(undo)->kswapd);
				NODE_DATA(undo)->kswapd = NULL;
				pgdat_kswapd_unlock(NODE_DATA(undo));
			}
			return PTR_ERR(task);
		}
		pgdat_kswapd_lock(pgdat);
		pgdat->kswapd = task;
		pgdat_kswapd_unlock(pgdat);
	}
	return 0;
}
