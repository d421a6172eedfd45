// SPDX-License-Identifier: GPL-2.0-only
/* Edition 1 of cmdline_proc_show waits (interruptibly) while /sys/module/held_edition/parameters/hold is 1. */
#include <linux/delay.h>
#include <linux/module.h>
#include <linux/sched/signal.h>
#include <linux/seq_file.h>

int dynamos_original__cmdline_proc_show(struct seq_file *m, void *v);

static int hold;
module_param(hold, int, 0600);

int cmdline_show_held(struct seq_file *m, void *v)
{
	while (READ_ONCE(hold) && !signal_pending(current))
		msleep_interruptible(20);
	seq_puts(m, "[held] ");
	return dynamos_original__cmdline_proc_show(m, v);
}
