// SPDX-License-Identifier: GPL-2.0
/*
 * New edition of cmdline_proc_show().  The boot command line itself lives in a kernel
 * variable that is not exported to modules, so this edition shows a banner with the
 * release and the number of online CPUs, which exported interfaces give.
 */
#include <linux/cpumask.h>
#include <linux/seq_file.h>
#include <linux/utsname.h>

int cmdline_proc_show_banner(struct seq_file *m, void *v)
{
	seq_printf(m, "dynamos live update on %s: %u CPUs online\n",
		   utsname()->release, num_online_cpus());
	return 0;
}
