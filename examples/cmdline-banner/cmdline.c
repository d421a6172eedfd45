// SPDX-License-Identifier: GPL-2.0
/*
 * New edition of cmdline_proc_show(): the boot command line behind a banner.
 *
 * saved_command_line is not exported to modules; dynamos reaches it through a livepatch
 * relocation that the kernel resolves when the update loads, so the edition reads the
 * same variable the original does.
 */
#include <linux/seq_file.h>

extern char *saved_command_line;

int cmdline_proc_show_banner(struct seq_file *m, void *v)
{
	seq_printf(m, "[live-updated by dynamos] %s\n", saved_command_line);
	return 0;
}
