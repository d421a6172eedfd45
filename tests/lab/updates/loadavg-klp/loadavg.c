// SPDX-License-Identifier: GPL-2.0
#include <linux/pid_namespace.h>
#include <linux/sched/loadavg.h>
#include <linux/sched/stat.h>
#include <linux/seq_file.h>

extern int nr_threads;  /* kernel/fork.c, not exported */

int loadavg_proc_show_klp(struct seq_file *m, void *v)
{
	unsigned long avnrun[3];

	get_avenrun(avnrun, FIXED_1 / 200, 0);
	seq_printf(m, "%lu.%02lu %lu.%02lu %lu.%02lu %u/%d %d dynamos\n",
		   LOAD_INT(avnrun[0]), LOAD_FRAC(avnrun[0]),
		   LOAD_INT(avnrun[1]), LOAD_FRAC(avnrun[1]),
		   LOAD_INT(avnrun[2]), LOAD_FRAC(avnrun[2]),
		   nr_running(), nr_threads,
		   idr_get_cursor(&task_active_pid_ns(current)->idr) - 1);
	return 0;
}
