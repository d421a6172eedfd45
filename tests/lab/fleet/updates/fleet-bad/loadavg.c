// SPDX-License-Identifier: GPL-2.0
#include <linux/bug.h>
#include <linux/sched/loadavg.h>
#include <linux/seq_file.h>

int loadavg_proc_show_fleet_bad(struct seq_file *m, void *v)
{
	unsigned long avnrun[3];

	WARN(1, "fleet-bad: this edition is broken on purpose\n");
	get_avenrun(avnrun, FIXED_1 / 200, 0);
	seq_printf(m, "%lu.%02lu %lu.%02lu %lu.%02lu fleet-bad\n",
		   LOAD_INT(avnrun[0]), LOAD_FRAC(avnrun[0]),
		   LOAD_INT(avnrun[1]), LOAD_FRAC(avnrun[1]),
		   LOAD_INT(avnrun[2]), LOAD_FRAC(avnrun[2]));
	return 0;
}
