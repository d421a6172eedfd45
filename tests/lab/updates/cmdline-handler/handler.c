// SPDX-License-Identifier: GPL-2.0-only
/* Editions tag /proc/cmdline; the handler sends tasks named "reader-<n>" to edition n. */
#include <linux/sched.h>
#include <linux/seq_file.h>
#include <linux/string.h>

int dynamos_original__cmdline_proc_show(struct seq_file *m, void *v);

int cmdline_show_one(struct seq_file *m, void *v)
{
	seq_puts(m, "[one] ");
	return dynamos_original__cmdline_proc_show(m, v);
}

int cmdline_show_two(struct seq_file *m, void *v)
{
	seq_puts(m, "[two] ");
	return dynamos_original__cmdline_proc_show(m, v);
}

/* Runs with preemption disabled on every call: no sleeping, no locks. -1: the route's default. */
int cmdline_pick_edition(struct seq_file *m, void *v)
{
	if (!strcmp(current->comm, "reader-1"))
		return 1;
	if (!strcmp(current->comm, "reader-2"))
		return 2;
	return -1;
}
