// SPDX-License-Identifier: GPL-2.0-only
/* Editions 1 and 2 of cmdline_proc_show: the kernel's own output behind a tag saying which ran. */
#include <linux/seq_file.h>

/* Edition 0, the kernel's own code; the dispatcher dynamos generates provides it. */
int dynamos_original__cmdline_proc_show(struct seq_file *m, void *v);

int cmdline_show_tag_one(struct seq_file *m, void *v)
{
	seq_puts(m, "[edition 1] ");
	return dynamos_original__cmdline_proc_show(m, v);
}

int cmdline_show_tag_two(struct seq_file *m, void *v)
{
	seq_puts(m, "[edition 2] ");
	return dynamos_original__cmdline_proc_show(m, v);
}
