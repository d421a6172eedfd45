// SPDX-License-Identifier: GPL-2.0
#include <linux/sched/loadavg.h>
#include <linux/seq_file.h>

int loadavg_proc_show_fleet_good(struct seq_file *m, void *v)
{
	unsigned long avnrun[3];

	get_avenrun(avnrun, FIXED_1 / 200, 0);
	seq_printf(m, "%lu.%02lu %lu.%02lu %lu.%02lu fleet-good\n",
		   LOAD_INT(avnrun[0]), LOAD_FRAC(avnrun[0]),
		   LOAD_INT(avnrun[1]), LOAD_FRAC(avnrun[1]),
		   LOAD_INT(avnrun[2]), LOAD_FRAC(avnrun[2]));
	return 0;
}
