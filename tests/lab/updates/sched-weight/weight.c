// SPDX-License-Identifier: GPL-2.0-only
/*
 * CFS picks the task with the least virtual runtime, so charging a task more virtual time per
 * real nanosecond shrinks its CPU share. These editions run the kernel's update_curr and then
 * scale what it added to the current task's vruntime. The running task is not in the CFS tree,
 * so its vruntime may change here; when update_curr accounts another queue (a remote enqueue),
 * current's vruntime did not move and nothing is scaled.
 */
#include <linux/sched.h>

struct cfs_rq;
void dynamos_original__update_curr(struct cfs_rq *cfs_rq);

/* Edition 1: three times the virtual runtime, a quarter of the CPU against an equal peer. */
void update_curr_heavy(struct cfs_rq *cfs_rq)
{
	u64 before = current->se.vruntime;

	dynamos_original__update_curr(cfs_rq);
	if ((s64)(current->se.vruntime - before) > 0)
		current->se.vruntime += 2 * (current->se.vruntime - before);
}

/* Edition 2: half the virtual runtime, two thirds of the CPU against an equal peer. */
void update_curr_light(struct cfs_rq *cfs_rq)
{
	u64 before = current->se.vruntime;

	dynamos_original__update_curr(cfs_rq);
	if ((s64)(current->se.vruntime - before) > 0)
		current->se.vruntime -= (current->se.vruntime - before) / 2;
}
